"""Per-frame weights of the training loss from each frame's signal-to-noise ratio.

- none: every frame weighs 1 (FDM, improved DDPM).
- min_snr: min-SNR-gamma weighting (Hang et al. 2023, "Efficient Diffusion Training via
  Min-SNR Weighting Strategy"), as Diffusion Forcing's `compute_loss_weights` without fused
  SNR (algorithms/diffusion_forcing/models/diffusion.py): with SNR = abar / (1 - abar) and
  S = min(SNR, snr_clip), the weight is S / SNR for eps prediction, S for x0 and
  S / (SNR + 1) for v. All three give the same effective x0-space weight S.
- fused_snr: Diffusion Forcing's fused SNR (the same function with `use_fused_snr`). A
  frame that follows well-known frames is easier to denoise, so its weight should reflect
  the information already available. Along the frames of an example, in order, a running
  value of the normalized clipped SNR s_k = S_k / snr_clip is kept:
      r_0 = s_0,  r_k = decay * r_{k-1} + (1 - decay) * s_k,
  and frame k sees the value before it, c_k = r_{k-1} (c_0 = 0). Its own SNR is fused with
  that context as a probability of "knowing" either:
      fused_clipped = 1 - (1 - decay * c_k) * (1 - s_k)
      fused         = 1 - (1 - decay * c_k) * (1 - SNR_k / snr_clip)
  and the weight is fused_clipped / fused (eps), fused_clipped * snr_clip (x0),
  fused_clipped * snr_clip / (fused * snr_clip + 1) (v). With no context (c_k = 0) this is
  exactly min_snr.

How our training examples map onto this (DF's examples are contiguous clips, every frame at
its own noise level; ours may also hold observed and padding frames):

- The running value runs along the example's frame slots in order (ascending frame index:
  training puts an example's chosen frames first, sorted, then padding). One decay step per
  slot, whatever the spacing of the frame indices, as DF steps once per frame of its clip
  (DF raises the decay to its frame_skip for subsampled datasets: pass decay**skip yourself).
- Observed frames carry no loss but do feed the running value: a clean observed frame is
  fully known (s = 1, its SNR clipped at snr_clip), an observed frame shown noisy counts at
  its own noise level.
- Padding frames (another video's frames, trained unconditionally) neither feed the running
  value nor read it: their weight is the min_snr one.
- Per-video timesteps (shape B) give every latent frame of a video the same SNR; the weights
  still differ along the frames through the running value.

These are pure functions of SNR tensors; GaussianDiffusion.loss_frame_weights turns
timesteps and masks into them.
"""

import torch

LOSS_WEIGHTINGS = ("none", "min_snr", "fused_snr")
OBJECTIVES = ("eps", "x0", "v")


def min_snr_weights(snr, objective, snr_clip):
    """min-SNR weights of frames with signal-to-noise ratio `snr` (any shape, float64 advised)."""
    clipped = snr.clamp(max=snr_clip)
    if objective == "eps":
        return clipped / snr
    if objective == "x0":
        return clipped
    if objective == "v":
        return clipped / (snr + 1)
    raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")


def running_context(normalized_clipped_snr, decay, in_sequence=None):
    """c [B x K]: the running normalized clipped SNR of the frames before each frame (see module doc).

    normalized_clipped_snr: [B x K] values in [0, 1]; in_sequence: bool [B x K], the frames that
    feed and read the running value (None: all). Frames outside it get c = 0 and leave the
    running value unchanged.
    """
    B, K = normalized_clipped_snr.shape
    if in_sequence is None:
        in_sequence = torch.ones(B, K, dtype=torch.bool, device=normalized_clipped_snr.device)
    context = torch.zeros_like(normalized_clipped_snr)
    running = torch.zeros(B, dtype=normalized_clipped_snr.dtype, device=normalized_clipped_snr.device)
    started = torch.zeros(B, dtype=torch.bool, device=normalized_clipped_snr.device)
    for k in range(K):
        here = in_sequence[:, k]
        s = normalized_clipped_snr[:, k]
        context[:, k] = torch.where(here, running, torch.zeros_like(running))
        updated = torch.where(started, decay * running + (1 - decay) * s, s)  # the first frame starts it
        running = torch.where(here, updated, running)
        started = started | here
    return context


def fused_snr_weights(snr, objective, snr_clip, decay, in_sequence=None, known=None):
    """Fused-SNR weights [B x K] of frames with SNR `snr` [B x K] (inf allowed where `known`).

    known: bool [B x K], frames shown clean (they feed the running value with s = 1; their own
    weight is meaningless and returned as 0). in_sequence: see running_context.
    """
    if known is None:
        known = torch.zeros_like(snr, dtype=torch.bool)
    snr = torch.where(known, torch.full_like(snr, snr_clip), snr)  # a clean frame: fully known
    normalized_clipped = snr.clamp(max=snr_clip) / snr_clip
    normalized = snr / snr_clip
    c = decay * running_context(normalized_clipped, decay, in_sequence)
    fused_clipped = 1 - (1 - c) * (1 - normalized_clipped)
    fused = 1 - (1 - c) * (1 - normalized)
    if objective == "eps":
        weights = fused_clipped / fused
    elif objective == "x0":
        weights = fused_clipped * snr_clip
    elif objective == "v":
        weights = fused_clipped * snr_clip / (fused * snr_clip + 1)
    else:
        raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")
    return torch.where(known, torch.zeros_like(weights), weights)


def frame_loss_weights(kind, snr, objective, snr_clip, decay, in_sequence=None, known=None):
    """[B x K] weights of `kind` (one of LOSS_WEIGHTINGS) for per-frame SNRs `snr` [B x K]; None for 'none'."""
    if kind == "none":
        return None
    if kind == "min_snr":
        weights = min_snr_weights(snr, objective, snr_clip)
        return weights if known is None else torch.where(known, torch.zeros_like(weights), weights)
    if kind == "fused_snr":
        return fused_snr_weights(snr, objective, snr_clip, decay, in_sequence, known)
    raise ValueError(f"unknown loss weighting {kind!r}; expected one of {LOSS_WEIGHTINGS}")
