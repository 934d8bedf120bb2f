"""Reading checkpoint files: every bad file is one sentence naming it."""

import pytest
import torch

from improved_diffusion.checkpoints import read_checkpoint_file, read_model_checkpoint
from improved_diffusion.errors import CheckpointError


def one_sentence(text):
    return text.count(". ") == 0 and text.endswith(".") and "\n" not in text


def test_bad_files_each_get_one_sentence(tmp_path):
    good = tmp_path / "model000010.pt"
    torch.save({"config": {"image_size": 8}, "state_dict": {"w": torch.ones(3)}, "step": 10}, good)
    data = good.read_bytes()
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "folder.pt").mkdir()
    cases = {"empty.pt": "is empty", "truncated.pt": "is corrupt or not a checkpoint",
             "folder.pt": "is a directory", "missing.pt": "does not exist"}
    for name, expected in cases.items():
        with pytest.raises(CheckpointError) as info:
            read_checkpoint_file(str(tmp_path / name))
        message = str(info.value)
        assert expected in message and name in message and one_sentence(message), message
    assert read_model_checkpoint(str(good))["step"] == 10
