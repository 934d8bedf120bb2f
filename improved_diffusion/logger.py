"""Training logs to a CSV file and wandb, messages to stderr — from rank 0 only.

wandb never blocks: without a login (no WANDB_API_KEY and no ~/.netrc entry) it runs
offline, and WANDB_MODE (online / offline / disabled) is honoured when set. A resumed
offline run writes a new `offline-run-*-<id>` folder with the same id; `wandb sync` them
in order to get one run. FDM's `--unobserve` (`offline=True`) keeps wandb offline even with
a login, writing under $WANDB_DIR_DRYRUN when that is set (FDM's variable).
"""

import csv
import os
import sys
import uuid
from collections import defaultdict


def wandb_mode(offline=False):
    """'online', 'offline' or 'disabled', never waiting for a login prompt; never 'online' when `offline`."""
    if offline and os.environ.get("WANDB_MODE") != "disabled":
        return "offline"
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

    def __init__(self, log_dir=None, rank=0, run_id=None, config=None, project="video-diffusion", resume=False,
                 offline=False):
        self.enabled = rank == 0
        self.means = defaultdict(list)
        self.values = {}
        self.csv_path = os.path.join(log_dir, "progress.csv") if (log_dir and self.enabled) else None
        self.csv_fields = None
        self.run = None
        self.run_id = run_id
        mode = wandb_mode(offline)
        if self.enabled and mode != "disabled":
            import wandb  # seconds to import; only a run that logs to wandb pays for it

            # resume="allow" continues run `run_id` (online, or as a new offline segment with
            # the same id that `wandb sync` appends to it).
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", project),
                id=run_id,
                resume="allow" if resume else None,
                mode=mode,
                dir=(os.environ.get("WANDB_DIR_DRYRUN") if offline else None) or log_dir or None,
                settings=wandb.Settings(silent=True, console="off"),
            )
            if config:  # a resumed run may change housekeeping values such as max_steps
                self.run.config.update(config, allow_val_change=True)
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

    def log_row(self, row, step):
        """Write `row` now as a row of its own (CSV and wandb), leaving the values being accumulated alone.

        For figures measured at a step that has no log line (validation between log intervals), so they
        are recorded at the step they belong to.
        """
        if not self.enabled or not row:
            return row
        if self.run is not None:
            self.run.log(dict(row), step=step)
        if self.csv_path:
            self._write_csv(dict(row))
        return row

    def _write_csv(self, row):
        if self.csv_fields is None and os.path.exists(self.csv_path):
            with open(self.csv_path, newline="") as f:
                self.csv_fields = next(csv.reader(f), None)
        new_keys = sorted(set(row) - set(self.csv_fields or []))
        if new_keys:  # a key seen for the first time: rewrite the file with a wider header
            old_rows = []
            if self.csv_fields and os.path.exists(self.csv_path):
                with open(self.csv_path, newline="") as f:
                    old_rows = list(csv.DictReader(f))
            self.csv_fields = (self.csv_fields or []) + new_keys
            with open(self.csv_path, "w", newline="") as f:
                writer = csv.DictWriter(f, self.csv_fields)
                writer.writeheader()
                writer.writerows(old_rows)
        with open(self.csv_path, "a", newline="") as f:
            csv.DictWriter(f, self.csv_fields).writerow(row)

    def forget_after(self, step):
        """Drop CSV rows logged after `step` (a run resumed from that step logs them again)."""
        if not self.csv_path or not os.path.exists(self.csv_path):
            return
        with open(self.csv_path, newline="") as f:
            rows = list(csv.reader(f))
        if not rows or "step" not in rows[0]:
            return
        column = rows[0].index("step")
        kept = [rows[0]] + [r for r in rows[1:] if r[column] and float(r[column]) <= step]
        with open(self.csv_path, "w", newline="") as f:
            csv.writer(f).writerows(kept)

    def log_video(self, key, frames, step, fps=4):
        """A uint8 [T x C x H x W] video to wandb (when a run is active)."""
        if self.run is not None:
            import wandb  # seconds to import; only a run that logs to wandb pays for it

            self.run.log({key: wandb.Video(frames, fps=fps, format="gif")}, step=step)

    def info(self, message):
        if self.enabled:
            print(message, file=sys.stderr, flush=True)

    def close(self):
        if self.run is not None:
            self.run.finish()
            self.run = None
