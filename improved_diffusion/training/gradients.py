"""A step's gradients before the optimizer takes them: fp16 loss scaling, the finiteness check, the global norm.

A step whose gradients are not finite is skipped (TrainLoop.skip_step, skip_overflow); the global
2-norm is clipped with --grad_clip and logged as grad_norm either way.
"""

import torch

# Below this loss scale fp16 gradients stay non-finite however small the loss is scaled (from the
# initial 2**16 that takes 30 overflowing steps in a row): training stops rather than skip forever.
MIN_LOSS_SCALE = 2.0 ** -14


def grad_scaler(device, precision, fp16_scale_growth):
    """torch.amp.GradScaler for dynamic fp16 loss scaling (disabled, a no-op, in fp32 and bf16).

    FDM raises log2(loss scale) by fp16_scale_growth after every step and lowers it by 1 on an
    overflow: the scale doubles every 1 / fp16_scale_growth overflow-free steps and halves on an
    overflow. GradScaler does the same in whole doublings: growth_factor 2 after growth_interval
    = 1 / fp16_scale_growth steps without an overflow, backoff 0.5. fp16_scale_growth 0: never grows.
    """
    interval = max(1, round(1 / fp16_scale_growth)) if fp16_scale_growth > 0 else 2 ** 30
    return torch.amp.GradScaler(torch.device(device).type, growth_factor=2.0, backoff_factor=0.5,
                                growth_interval=interval, enabled=precision == "fp16")


def gradient_norm(params):
    """The global 2-norm of the parameters' gradients (a 0-d tensor), as clip_grad_norm_ computes it."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6
        return torch.nn.utils.get_total_norm(grads, foreach=True)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)


def grads_finite(params):
    """Whether every gradient of `params` is finite."""
    grads = [p.grad for p in params if p.grad is not None]
    # The max-abs norm is non-finite exactly when some element is (it cannot overflow).
    return bool(torch.isfinite(torch.stack(torch._foreach_norm(grads, float("inf")))).all()) if grads else True
