"""Where a sampling run's conditions come from: a checkpoint's conditioning checked against the flags.

A conditional checkpoint (cond_dim, num_classes in its config) samples each test video driven by its
own actions from the dataset by default; an --actions file (T x D reals, or T integers made one-hot)
drives every video with the same actions instead; --label gives every video a class label; --uncond
shows the model its null condition (a model trained with cond_drop_prob > 0), which
classifier-free guidance (guidance_scale != 1) needs too. `sampling_conditions` checks the flags
against the checkpoint before any model is loaded, `SamplingConditions` records the choice (in
sampling_config.json and the default folder's name) and `batch_conditions` makes the
guidance.Conditions of one batch.
"""

import copy
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..data.actions import read_actions_file
from ..errors import ConfigError, DatasetError
from .guidance import Conditions


@dataclass(frozen=True)
class SamplingConditions:
    """Where a sampling run's conditions come from (checked against the checkpoint by `sampling_conditions`).

    source: "none" (an unconditional checkpoint), "dataset" (each test video's own actions),
    "file" (the actions of `actions_file` for every video) or "null" (the model's null condition);
    label: every video's class label (None: no labels).
    """

    source: str = "none"
    actions_file: Optional[str] = None
    label: Optional[int] = None

    def describe(self):
        """One string for sampling_config.json's "conditions" (PINNED_SETTINGS compares it)."""
        text = {"none": "none", "dataset": "dataset actions", "null": "null"}.get(self.source)
        if self.source == "file":
            text = f"actions from {self.actions_file}"
        return text if self.label is None else f"{text}, label {self.label}"

    def record(self):
        """What sampling_config.json records of the conditions."""
        return {"conditions": self.describe(), "actions_source": self.source, "actions_file": self.actions_file,
                "label": self.label}

    def folder_suffix(self):
        """What the default results folder adds: the dataset's own conditions (or none) add nothing."""
        suffix = ""
        if self.source == "file":
            suffix += "_actions-" + os.path.splitext(os.path.basename(self.actions_file))[0]
        elif self.source == "null":
            suffix += "_uncond"
        if self.label is not None:
            suffix += f"_label{self.label}"
        return suffix


def checkpoint_conditioning(config):
    """(cond_dim, num_classes, has null conditions) of a checkpoint's flat config; older configs: unconditional."""
    return (int(config.get("cond_dim") or 0), int(config.get("num_classes") or 0),
            float(config.get("cond_drop_prob") or 0) > 0)


def sampling_conditions(config, checkpoint_path, *, actions=None, label=None, uncond=False, guidance_scale=1.0):
    """The SamplingConditions the flags ask for, or a one-sentence ConfigError if the checkpoint cannot take them.

    Checks only the flags against the checkpoint; `read_actions` and `dataset_actions` check the
    actions themselves.
    """
    cond_dim, num_classes, has_null = checkpoint_conditioning(config)
    guiding = float(guidance_scale) != 1.0
    if not (cond_dim or num_classes):
        if actions is not None:
            raise ConfigError(f"--actions {actions}: checkpoint {checkpoint_path} is unconditional (trained without "
                              f"--cond_dim), so actions cannot drive it.")
        if label is not None:
            raise ConfigError(f"--label {label}: checkpoint {checkpoint_path} is unconditional (trained without "
                              f"--num_classes), so it takes no class label.")
        if guiding:
            raise ConfigError(f"--guidance_scale {guidance_scale:g} needs a conditional model trained with "
                              f"--cond_drop_prob > 0, but checkpoint {checkpoint_path} is unconditional.")
        if uncond:
            raise ConfigError(f"--uncond True: checkpoint {checkpoint_path} is unconditional, so its samples are "
                              f"unconditional already; leave the flag out.")
        return SamplingConditions("none")
    if (guiding or uncond) and not has_null:
        flag = "--uncond True" if uncond else f"--guidance_scale {guidance_scale:g}"
        raise ConfigError(f"{flag} needs the null condition of a model trained with --cond_drop_prob > 0, but "
                          f"checkpoint {checkpoint_path} was trained with --cond_drop_prob 0.")
    if uncond:
        if guiding or actions is not None or label is not None:
            raise ConfigError("--uncond True samples with the null condition alone, so it takes no --actions, "
                              "--label or --guidance_scale other than 1.")
        return SamplingConditions("null")
    if actions is not None and not cond_dim:
        raise ConfigError(f"--actions {actions}: checkpoint {checkpoint_path} is conditioned on class labels only, "
                          f"not on per-frame actions.")
    if label is not None and not num_classes:
        raise ConfigError(f"--label {label}: checkpoint {checkpoint_path} is conditioned on actions only, not on "
                          f"class labels.")
    if num_classes:
        if label is None:
            raise ConfigError(f"checkpoint {checkpoint_path} is conditioned on class labels ({num_classes} classes) "
                              f"and the datasets have none: pass --label L with 0 <= L < {num_classes}, or "
                              f"--uncond True.")
        if not 0 <= label < num_classes:
            raise ConfigError(f"--label {label} is out of range: checkpoint {checkpoint_path} knows labels 0 to "
                              f"{num_classes - 1}.")
    if not cond_dim:
        return SamplingConditions("none", label=label)
    if actions is not None:
        return SamplingConditions("file", actions_file=os.path.abspath(str(actions)), label=label)
    return SamplingConditions("dataset", label=label)


def read_actions(path, T, cond_dim):
    """float32 [T x cond_dim] from an --actions file: its first T rows; T integers become one-hot vectors.

    A [T x D] real array must have D = cond_dim; integers must lie in [0, cond_dim). ConfigError
    (or DatasetError for an unreadable file) in one sentence otherwise.
    """
    stored = read_actions_file(path)
    if len(stored) < T:
        raise ConfigError(f"--actions {path} holds {len(stored)} actions, fewer than the --T {T} frames it must "
                          f"cover (one action per frame).")
    stored = stored[:T]
    if stored.ndim == 1:
        if stored.size and stored.max() >= cond_dim:
            raise ConfigError(f"--actions {path} holds action {int(stored.max())}, but the checkpoint knows "
                              f"{cond_dim} actions (0 to {cond_dim - 1}).")
        return np.eye(cond_dim, dtype=np.float32)[stored]
    if stored.shape[1] != cond_dim:
        raise ConfigError(f"--actions {path} has {stored.shape[1]} values per frame, but the checkpoint is "
                          f"conditioned on {cond_dim} (its cond_dim).")
    return stored.astype(np.float32)


def dataset_actions(data, indices, T, cond_dim, dataset_name):
    """{index: float32 [T x cond_dim] tensor} of test videos' own actions over T frames; ConfigError if absent.

    The videos are those of `data` (built as for the given frames, so an index names the same video),
    read up to T frames as the ground truth is (evaluation/ground_truth.py).
    """
    check_dataset_actions(data, cond_dim, dataset_name)
    view = copy.copy(data)  # the same videos, read up to T frames
    view.T = T
    found = {}
    for i in indices:
        try:
            found[i] = torch.from_numpy(np.ascontiguousarray(view.frames_and_actions(i)[1]))
        except DatasetError as e:
            raise ConfigError(f"--T {T}: the actions of test video {i} of {dataset_name} cannot cover {T} frames "
                              f"({e}); pass --actions FILE.npy or a smaller --T.") from None
    return found


def check_dataset_actions(data, cond_dim, dataset_name):
    """A ConfigError unless the dataset `data` has actions as wide as the checkpoint's cond_dim."""
    if data.action_dim is None:
        raise ConfigError(f"the checkpoint is conditioned on actions, but dataset {dataset_name} has none: pass "
                          f"--actions FILE.npy (T x {cond_dim} values, or T integers) or --uncond True.")
    if data.action_dim != cond_dim:
        raise ConfigError(f"the actions of dataset {dataset_name} have {data.action_dim} values per frame, but the "
                          f"checkpoint is conditioned on {cond_dim}; pass --actions FILE.npy or another --dataset.")


def batch_conditions(conditions, batch_idx, own_actions, file_actions, device):
    """The guidance.Conditions of the videos `batch_idx` (None for an unconditional checkpoint)."""
    if conditions.source == "none" and conditions.label is None:
        return None
    B = len(batch_idx)
    actions = None
    if conditions.source == "dataset":
        actions = torch.stack([own_actions[i] for i in batch_idx]).to(device)
    elif conditions.source == "file":
        actions = file_actions[None].expand(B, -1, -1).to(device)
    labels = None if conditions.label is None else torch.full((B,), conditions.label, dtype=torch.long, device=device)
    return Conditions(actions=actions, labels=labels, null=conditions.source == "null")
