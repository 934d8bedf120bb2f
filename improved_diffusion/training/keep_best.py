"""--keep_best: the figures a run measures, which way each improves, and the checkpoint of the best value so far.

With --keep_best <figure>, rank 0 writes the EMA checkpoint (first rate) to <run dir>/best_<figure>.pt
whenever a measurement (validation.py) gives a better value of the figure than any before. The file
also holds the figure's name, its value and the step, which a resumed run reads back, so a resume
keeps comparing against the best value of the whole run.
"""

import math

from ..checkpoints import read_checkpoint_file
from ..errors import CheckpointError, ConfigError
from ..evaluation import action_following as following
from ..evaluation import on_manifold as manifold
from ..evaluation.evaluate import HIGHER_IS_BETTER
from . import checkpoint_io

VAL_FIGURES = ("val_loss", "val_loss_q0", "val_loss_q1", "val_loss_q2", "val_loss_q3")
# Evaluation figures: eval_<name of compute_metrics' overall value>, and where each applies.
EVAL_FIGURES = {"eval_psnr": None, "eval_ssim": None, "eval_fvd": None, "eval_cue_recall": ("cue_recall",),
                "eval_on_manifold_last_quarter": manifold.DATASETS, "eval_time_to_drift": manifold.DATASETS,
                "eval_action_following": (following.DATASET,)}


def figure_direction(figure):
    """'lower' or 'higher': which way `figure` improves; ConfigError for a figure no measurement gives."""
    if figure in VAL_FIGURES:
        return "lower"
    if figure in EVAL_FIGURES:
        return "higher" if HIGHER_IS_BETTER[figure[len("eval_"):]] else "lower"
    raise ConfigError(f"--keep_best {figure} is not a figure a run measures; choose one of "
                      f"{', '.join(VAL_FIGURES + tuple(EVAL_FIGURES))}.")


def best_path(run_dir, figure):
    """The file --keep_best `figure` keeps: <run dir>/best_<figure>.pt."""
    return checkpoint_io.bf.join(run_dir, f"best_{figure}.pt")


def read_best(path, logger=None):
    """(value, step) of the best checkpoint file `path` (best_<figure>.pt), or None when there is none.

    An unreadable file counts as none (with a note): the next measurement then writes a new one.
    """
    if not checkpoint_io.bf.exists(path):
        return None
    try:
        saved = read_checkpoint_file(path)
        return float(saved["value"]), int(saved["step"])
    except (CheckpointError, KeyError, TypeError, ValueError) as e:
        if logger is not None:
            logger.info(f"ignoring the best checkpoint {path}, which cannot be read ({e})")
        return None


class BestCheckpoint:
    """The best value of one figure so far and its checkpoint file, best_<figure>.pt.

    `best` is (value, step) or None; with `read` (rank 0) it starts as the file's, so a resumed run
    goes on from the best value it had. ConfigError for a figure no measurement gives.
    """

    def __init__(self, run_dir, figure, logger, read=True):
        self.figure = figure
        self.path = best_path(run_dir, figure)
        self.higher = figure_direction(figure) == "higher"
        self.logger = logger
        self.best = read_best(self.path, logger) if read else None

    def improves(self, value):
        """Whether `value` beats the best so far: a NaN never does; the first finite-or-infinite value always does."""
        if math.isnan(value):
            return False
        return self.best is None or (value > self.best[0] if self.higher else value < self.best[0])

    def keep_if_better(self, figures, step, checkpoint):
        """When `figures` gives the figure a better value than the best so far, write the checkpoint dict
        `checkpoint()` with the figure's name and value to the file; returns whether it did."""
        if self.figure not in figures:
            return False
        value = float(figures[self.figure])
        if not self.improves(value):
            return False
        checkpoint_io.atomic_save({**checkpoint(), "figure": self.figure, "value": value}, self.path)
        self.best = (value, step)
        self.logger.info(f"step {step}: best {self.figure} so far ({value:.6g}), saved to {self.path}")
        return True
