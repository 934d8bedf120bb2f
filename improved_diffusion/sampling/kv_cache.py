"""A key/value cache for rollouts of causal models: unchanged earlier frames are not recomputed.

In a causal network (`--causal True`: temporal attention never looks at a larger frame index,
every other layer acts on each frame alone) a frame's activations depend only on its own input
(image, observed indicator, noise level, index, and its conditions: its vector `cond`, its video's
label `y` and null flag `drop_cond`) and those of the frames before it. So when a
model call shows a prefix of frames (in index order) exactly as the previous call did, their
activations at every layer are what they were then. `CausalCache` keeps, from the previous call,
each temporal-attention layer's keys and values per frame (and each frame's output), finds the
longest such prefix, and runs the network only on the remaining frames, which attend to the
cached keys and values. Nothing is assumed about the sampler: equality of the inputs is checked
on every call, so results are those of the uncached model up to float rounding, and a frame
whose input changed (or that comes after a changed frame) is always recomputed.

When it helps: within a stage, Diffusion Forcing's stabilization with DDIM shows every context
frame at a fixed noise level without fresh noise, so in a one-new-frame-per-stage rollout only the
new frame is recomputed at each denoising step (frames finished earlier in a stage join the
prefix the same way). Schemes that show context frames with fresh noise at every step (DDPM
context, "generated" stabilization) or at the latent frames' changing noise level (FDM's plans
without stabilization) change the context's input at every call: the cache then finds no prefix
and costs only the comparison. Observed frames after a generated one (hierarchy plans) are never
part of a prefix, so they stay exact.
"""

import torch

from ..models.unet import UNetVideoModel
from ..models.video_attention import EarlierFrames


def supports_cache(model):
    """Whether `model` is a network whose frames are causal in the sense above (FDM's causal UNet)."""
    inner = getattr(model, "_orig_mod", model)  # a torch.compile'd module wraps the original
    return isinstance(inner, UNetVideoModel) and inner.config.causal


class CausalCache:
    """Call it like the model: `cache(x, timesteps, x0=, frame_indices=, obs_mask=, latent_mask=)`.

    `frames_requested` and `frames_computed` count frame slots asked for and actually run through
    the network, so a caller can report the hit rate.
    """

    def __init__(self, model):
        if not supports_cache(model):
            raise ValueError("the key/value cache needs FDM's UNet built with causal=True: in any other network "
                             "later frames can change earlier frames' activations.")
        self.model = model
        self.state = None  # the previous call's frames, sorted per video (see `_sorted_inputs`)
        self.frames_requested = 0
        self.frames_computed = 0

    def __getattr__(self, name):  # config, parameters(), ... of the wrapped model
        return getattr(self.__dict__["model"], name)

    def __call__(self, x, timesteps, x0=None, frame_indices=None, obs_mask=None, latent_mask=None, cond=None,
                 y=None, drop_cond=None, **kwargs):
        inputs, order = _sorted_inputs(x, timesteps, x0, frame_indices, obs_mask, latent_mask, cond)
        B, T = inputs["t"].shape
        P = min(self._reusable_prefix(inputs, _video_conditions(y, drop_cond, B)), T - 1)  # >= 1 frame is run
        query = {name: value[:, P:] for name, value in inputs.items()}
        old = self.state
        earlier = EarlierFrames()
        if P:
            earlier = EarlierFrames([(k[:, :, :, :P], v[:, :, :, :P]) for k, v in old["layers"]],
                                    old["temb"][:, :P], old["frame_indices"][:, :P])
        out = self.model(query["x"], query["t"], x0=query["x"], frame_indices=query["frame_indices"],
                         obs_mask=query["obs"], latent_mask=query["in_model"] - query["obs"], earlier=earlier,
                         cond=query.get("cond"), y=y, drop_cond=drop_cond, **kwargs)
        temb = earlier.recorded_temb
        if P:
            out = torch.cat([old["out"][:, :P], out], dim=1)
            temb = torch.cat([old["temb"][:, :P], temb], dim=1)
        self.state = {**inputs, "layers": earlier.recorded, "temb": temb, "out": out,
                      "video_conditions": _video_conditions(y, drop_cond, B)}
        self.frames_requested += B * T
        self.frames_computed += B * (T - P)
        unsorted = torch.empty_like(out)
        unsorted.scatter_(1, order.view(B, T, 1, 1, 1).expand_as(out), out)
        return unsorted

    def _reusable_prefix(self, new, video_conditions):
        """Number P of leading (sorted) frames, the same for every video, whose cached activations hold."""
        old = self.state
        if old is None or old["x"].shape[0] != new["x"].shape[0] or old["x"].shape[2:] != new["x"].shape[2:]:
            return 0
        if not _same_conditions(old, new, video_conditions):
            return 0
        n = min(old["t"].shape[1], new["t"].shape[1])
        same = (_flags(old["in_model"], n) & _flags(new["in_model"], n)
                & (old["frame_indices"][:, :n] == new["frame_indices"][:, :n])
                & (old["t"][:, :n] == new["t"][:, :n])
                & (_flags(old["obs"], n) == _flags(new["obs"], n))
                & (old["x"][:, :n] == new["x"][:, :n]).flatten(2).all(dim=2))
        if "cond" in new:  # each frame's own vector
            same = same & (old["cond"][:, :n] == new["cond"][:, :n]).all(dim=2)
        P = int(same.long().cumprod(dim=1).sum(dim=1).min()) if n else 0
        # A prefix frame attends to every in-model frame of its own index: keep ties out of the prefix.
        while P and (_ties(old, P) or _ties(new, P)):
            P -= 1
        return P


def _video_conditions(y, drop_cond, B):
    """Per-video conditions [B x 2] (label or -1, null flag), or None when the call has neither."""
    if y is None and drop_cond is None:
        return None
    labels = torch.full((B,), -1, dtype=torch.long) if y is None else torch.as_tensor(y).long().reshape(B).cpu()
    dropped = torch.zeros(B, dtype=torch.long) if drop_cond is None else torch.as_tensor(drop_cond).long().reshape(B)
    return torch.stack([labels, dropped.cpu()], dim=1)


def _same_conditions(old, new, video_conditions):
    """Whether both calls carry the same kinds of conditions and the same per-video ones."""
    if ("cond" in old) != ("cond" in new):
        return False
    if "cond" in new and old["cond"].shape[2:] != new["cond"].shape[2:]:
        return False
    previous = old["video_conditions"]
    if previous is None or video_conditions is None:
        return previous is None and video_conditions is None
    return torch.equal(previous, video_conditions)


def _flags(mask, n):
    """The first n entries of a [B x T x 1 x 1 x 1] 0/1 mask as bool [B x n]."""
    return mask[:, :n].reshape(mask.shape[0], -1).bool()


def _ties(inputs, P):
    """Whether a frame after the first P has an index equal to the P-th frame's (in some video)."""
    if P >= inputs["t"].shape[1]:
        return False
    nxt = _flags(inputs["in_model"][:, P:], 1)[:, 0] & (
        inputs["frame_indices"][:, P] == inputs["frame_indices"][:, P - 1])
    return bool(nxt.any())


def _sorted_inputs(x, timesteps, x0, frame_indices, obs_mask, latent_mask, cond=None):
    """What the network sees of each frame, with each video's frames sorted: in-model by index, padding last.

    Returns a dict of x (the shown image: x0 where observed, else x) [B x T x C x H x W], t, frame
    indices [B x T], obs and in_model flags (x's float dtype, shaped as the model's masks), and
    with `cond` [B x T x D] each frame's vector; and `order` [B x T], the slot each sorted position
    came from.
    """
    B, T = x.shape[:2]
    device = x.device
    if obs_mask is None:
        obs_mask = torch.zeros(B, T, 1, 1, 1, dtype=x.dtype, device=device)
    if latent_mask is None:
        latent_mask = 1 - obs_mask
    if frame_indices is None:
        frame_indices = torch.arange(T, device=device).expand(B, T)
    t = torch.as_tensor(timesteps, device=device)
    t = t.reshape(B, -1).expand(B, T) if t.dim() else t.expand(B, T)
    shown = torch.where(obs_mask.bool(), torch.zeros_like(x) if x0 is None else x0, x)
    in_model = (obs_mask + latent_mask).clamp(max=1)
    key = torch.where(in_model.view(B, T).bool(), frame_indices, frame_indices.max() + 1 + frame_indices)
    order = torch.sort(key, dim=1, stable=True).indices

    def take(value):
        return value.gather(1, order.view(B, T, *[1] * (value.dim() - 2)).expand_as(value))

    inputs = {"x": take(shown), "t": take(t.contiguous()), "frame_indices": take(frame_indices.contiguous()),
               "obs": take(obs_mask), "in_model": take(in_model)}
    if cond is not None:
        inputs["cond"] = take(cond.contiguous())
    return inputs, order
