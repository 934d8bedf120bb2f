"""--keep_best: the EMA checkpoint of the best value of one figure, written when and only when it improves,
and read back by a resumed run."""

import os

import torch

from improved_diffusion.checkpoints import read_checkpoint_file
from improved_diffusion.training import checkpoint_io
from improved_diffusion.training.keep_best import read_best
from improved_diffusion.training.test_train_loop import tiny_loop


def stub_figures(loop, monkeypatch, name, values):
    """Make the loop's measurement give `name` the next of `values` at each call; returns the steps it was written."""
    values = list(values)
    method = "validate" if name.startswith("val") else "evaluate"
    monkeypatch.setattr(loop, method, lambda: {name: values.pop(0)})
    if method == "evaluate":
        loop.evaluation = object()  # anything: evaluate itself is replaced
    written = []
    save = checkpoint_io.atomic_save

    def spy(obj, path):
        if os.path.basename(path).startswith("best_"):
            written.append(obj["step"])
        return save(obj, path)

    monkeypatch.setattr(checkpoint_io, "atomic_save", spy)
    return written


def test_keep_best_writes_the_ema_checkpoint_when_and_only_when_the_figure_improves(tmp_path, monkeypatch,
                                                                                    one_thread):
    loop = tiny_loop(tmp_path, monkeypatch, val_interval=1, keep_best="val_loss", max_steps=5)
    loop.validation = object()
    written = stub_figures(loop, monkeypatch, "val_loss", [3.0, 2.0, 2.5, 2.0, 1.0])
    loop.run()
    assert written == [1, 2, 5]  # lower is better; equal is no improvement
    best = read_checkpoint_file(os.path.join(loop.run_dir, "best_val_loss.pt"))
    assert (best["step"], best["value"], best["figure"]) == (5, 1.0, "val_loss")
    ema = read_checkpoint_file(os.path.join(loop.run_dir, "ema_0.9_000005.pt"))["state_dict"]
    assert best["state_dict"].keys() == ema.keys() and all(torch.equal(best["state_dict"][k], ema[k]) for k in ema)
    # A resumed run reads the best value back from the file: only a lower value replaces it.
    resumed = tiny_loop(tmp_path, monkeypatch, val_interval=1, keep_best="val_loss", max_steps=8)
    assert resumed.best_checkpoint.best == (1.0, 5) == read_best(os.path.join(loop.run_dir, "best_val_loss.pt"))
    resumed.load_newest_readable([5])
    resumed.validation = object()
    written = stub_figures(resumed, monkeypatch, "val_loss", [1.5, 0.5, float("nan")])
    resumed.run()
    assert written == [7]


def test_keep_best_of_an_eval_figure_that_grows(tmp_path, monkeypatch, one_thread):
    loop = tiny_loop(tmp_path, monkeypatch, eval_interval=2, keep_best="eval_psnr", max_steps=8)
    written = stub_figures(loop, monkeypatch, "eval_psnr", [10.0, 12.0, 11.0, 12.5])
    loop.run()
    assert written == [2, 4, 8]  # higher is better
    assert read_best(os.path.join(loop.run_dir, "best_eval_psnr.pt")) == (12.5, 8)
