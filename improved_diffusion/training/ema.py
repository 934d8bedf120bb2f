"""Exponential moving averages of the weights: their update, and the model and state dict holding them.

TrainLoop keeps one list of tensors per --ema_rate; checkpoints, previews and measurements see the
model with one of them in place of its parameters.
"""

import copy

import torch

from .checkpoint_io import to_cpu


def update_ema(target_params, source_params, rate):
    """target <- rate * target + (1 - rate) * source, as one multi-tensor operation."""
    with torch.no_grad():
        torch._foreach_lerp_(list(target_params), list(source_params), 1 - rate)


def ema_state_dict(model, ema, model_state=None):
    """`model`'s state dict (on the CPU; `model_state` when given) with the EMA weights `ema` in place of its
    parameters."""
    names = [name for name, _ in model.named_parameters()]
    state = copy.copy(to_cpu(model.state_dict()) if model_state is None else model_state)
    state.update({n: p.detach().cpu() for n, p in zip(names, ema)})
    return state


def model_with_ema(model, ema):
    """A copy of `model` holding the EMA weights `ema`, in eval mode."""
    copied = copy.deepcopy(model)
    with torch.no_grad():
        for p, e in zip(copied.parameters(), ema):
            p.copy_(e)
    return copied.eval()
