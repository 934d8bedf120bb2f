"""One model call's input: chosen frames of B videos gathered into K slots, with indices and masks.

Training and sampling both show the network a few frames of each video: slot k of video b holds
frame `frame_indices[b, k]`, flagged observed (`obs_mask`), to be denoised (`latent_mask`), or
padding (neither). Both build that layout here, so it is written once.

A frame's condition vector (its action) travels with it: given the videos' per-frame vectors,
slot k also gets the vector of the frame it holds, a padding slot the vector of its own frame
(of the video the padding frame came from).
"""

import torch


def gather_frames(videos, frames, observed, length=None, pad=None, actions=None):
    """Gather per-video frame lists into slots.

    videos: [B x T x C x H x W]; frames[b]: video b's frame indices in slot order; observed[b]: one
    bool per entry of frames[b]. length: number of slots K (default: the longest list). Slots past
    a video's own frames are padding, in neither mask: by default they repeat frame 0 (index 0);
    `pad(b, n)` may instead return (n frames [n x C x H x W], their n indices), and with `actions`
    also their n vectors [n x D] as a third element. actions: [B x T x D] per-frame vectors or None.
    Returns dict(x [B x K x C x H x W], frame_indices [B x K] long, obs_mask and latent_mask
    [B x K x 1 x 1 x 1] float, and with actions `cond` [B x K x D], each slot's frame's vector),
    on the device of `videos`.
    """
    B = videos.shape[0]
    K = max(len(f) for f in frames) if length is None else length
    device = videos.device
    x = torch.zeros(B, K, *videos.shape[2:], dtype=videos.dtype, device=device)
    frame_indices = torch.zeros(B, K, dtype=torch.long)
    obs_mask = torch.zeros(B, K, 1, 1, 1)
    latent_mask = torch.zeros(B, K, 1, 1, 1)
    cond = None if actions is None else torch.zeros(B, K, actions.shape[-1], dtype=actions.dtype,
                                                    device=actions.device)
    for b in range(B):
        idx = torch.as_tensor([int(i) for i in frames[b]], dtype=torch.long)
        flags = torch.as_tensor([bool(o) for o in observed[b]], dtype=torch.bool)
        if len(flags) != len(idx) or len(idx) > K:
            raise ValueError(f"video {b}: {len(idx)} frames, {len(flags)} observed flags, {K} slots.")
        n = len(idx)
        frame_indices[b, :n] = idx
        obs_mask[b, :n, 0, 0, 0] = flags.float()
        latent_mask[b, :n, 0, 0, 0] = (~flags).float()
        x[b, :n] = videos[b, idx.to(device)]
        if cond is not None:
            cond[b, :n] = actions[b, idx.to(actions.device)]
        if n < K:
            if pad is None:
                x[b, n:] = videos[b, 0]
                if cond is not None:
                    cond[b, n:] = actions[b, 0]
            else:
                padded = pad(b, K - n)
                x[b, n:] = padded[0]
                frame_indices[b, n:] = torch.as_tensor(padded[1], dtype=torch.long)
                if cond is not None:
                    cond[b, n:] = padded[2]
    out = {"x": x, "frame_indices": frame_indices.to(device), "obs_mask": obs_mask.to(device),
           "latent_mask": latent_mask.to(device)}
    if cond is not None:
        out["cond"] = cond
    return out
