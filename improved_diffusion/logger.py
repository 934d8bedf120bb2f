"""Training logs to stdout, a CSV file and wandb — from rank 0 only.

wandb never blocks: without a login (no WANDB_API_KEY and no ~/.netrc entry) it runs
offline, and WANDB_MODE (online / offline / disabled) is honoured when set.
"""

import csv
import os
import sys
import uuid
from collections import defaultdict


def wandb_mode():
    """'online', 'offline' or 'disabled', never waiting for a login prompt."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = os.path.join(os.path.expanduser("~"), ".netrc")
    if os.path.exists(netrc) and "api.wandb.ai" in open(netrc).read():
        return "online"
    return "offline"


def new_run_id():
    """A wandb-style 8-character run id."""
    return uuid.uuid4().hex[:8]


class Logger:
    """Accumulates key/values and writes one row per `dump`; a no-op away from rank 0."""

    def __init__(self, log_dir=None, rank=0, run_id=None, config=None, project="video-diffusion", resume=False):
        self.enabled = rank == 0
        self.means = defaultdict(list)
        self.values = {}
        self.csv_path = os.path.join(log_dir, "progress.csv") if (log_dir and self.enabled) else None
        self.csv_fields = None
        self.run = None
        self.run_id = run_id
        if self.enabled and wandb_mode() != "disabled":
            import wandb

            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", project),
                id=run_id,
                resume="allow" if resume else None,
                config=config,
                mode=wandb_mode(),
                dir=log_dir or None,
                settings=wandb.Settings(silent=True, console="off"),
            )
            self.run_id = self.run.id

    def logkv(self, key, value):
        self.values[key] = value

    def logkv_mean(self, key, value):
        self.means[key].append(float(value))

    def dump(self, step):
        row = dict(self.values)
        row.update({k: sum(v) / len(v) for k, v in self.means.items()})
        self.values, self.means = {}, defaultdict(list)
        if not self.enabled or not row:
            return row
        if self.run is not None:
            self.run.log(row, step=step)
        if self.csv_path:
            self._write_csv(row)
        return row

    def _write_csv(self, row):
        fields = sorted(row)
        new_file = not os.path.exists(self.csv_path)
        if self.csv_fields is None and not new_file:
            with open(self.csv_path) as f:
                self.csv_fields = next(csv.reader(f), None)
        if self.csv_fields is None or new_file:
            self.csv_fields = fields
            with open(self.csv_path, "w", newline="") as f:
                csv.writer(f).writerow(fields)
        with open(self.csv_path, "a", newline="") as f:
            csv.DictWriter(f, self.csv_fields, extrasaction="ignore").writerow(row)

    def info(self, message):
        if self.enabled:
            print(message, file=sys.stderr, flush=True)

    def close(self):
        if self.run is not None:
            self.run.finish(quiet=True)
            self.run = None
