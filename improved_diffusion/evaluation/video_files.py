"""Writing sampled videos to look at: mp4 (imageio-ffmpeg) and gif, side by side with
ground truth, observed frames framed in one colour and generated frames in another."""

import numpy as np

OBSERVED_COLOUR = (40, 110, 255)  # blue border: a frame the model was given
GENERATED_COLOUR = (230, 40, 40)  # red border: a frame the model generated
BORDER = 2


def to_hwc_uint8(frames):
    """uint8 [T x C x H x W] or [T x H x W x C] -> uint8 [T x H x W x 3]."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames, got {frames.dtype}")
    if frames.ndim != 4:
        raise ValueError(f"expected 4-d frames, got shape {frames.shape}")
    if frames.shape[1] in (1, 3) and frames.shape[-1] not in (1, 3):
        frames = frames.transpose(0, 2, 3, 1)
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    return frames


def add_borders(frames, observed):
    """Frame each image [T x H x W x 3] with the observed or generated colour."""
    T, H, W, _ = frames.shape
    out = np.empty((T, H + 2 * BORDER, W + 2 * BORDER, 3), dtype=np.uint8)
    for t in range(T):
        out[t] = OBSERVED_COLOUR if observed[t] else GENERATED_COLOUR
        out[t, BORDER:BORDER + H, BORDER:BORDER + W] = frames[t]
    return out


def upscale(frames, factor):
    """Nearest-neighbour upscaling so small videos are visible (and ffmpeg-friendly sizes)."""
    if factor <= 1:
        return frames
    return frames.repeat(factor, axis=1).repeat(factor, axis=2)


def side_by_side(sample, observed, ground_truth=None, scale=4):
    """[T x H' x W' x 3]: the bordered sample, and the ground truth to its right when given.

    Ground truth shorter than the sample is padded with black frames.
    """
    sample = to_hwc_uint8(sample)
    left = add_borders(sample, observed)
    panels = [left]
    if ground_truth is not None:
        gt = to_hwc_uint8(ground_truth)[: len(sample)]
        if len(gt) < len(sample):
            gt = np.concatenate([gt, np.zeros((len(sample) - len(gt), *gt.shape[1:]), dtype=np.uint8)])
        panels.append(add_borders(gt, np.ones(len(sample), dtype=bool)))
    gap = np.full((len(sample), left.shape[1], 2, 3), 255, dtype=np.uint8)
    frames = np.concatenate([p for panel in panels for p in (panel, gap)][:-1], axis=2)
    frames = upscale(frames, scale)
    # H.264 wants even sizes.
    H, W = frames.shape[1:3]
    return np.pad(frames, ((0, 0), (0, H % 2), (0, W % 2), (0, 0)))


def write_mp4(frames, path, fps=8):
    import imageio.v2 as imageio

    with imageio.get_writer(path, fps=fps, codec="libx264", quality=8, macro_block_size=1,
                            ffmpeg_log_level="error") as writer:
        for frame in frames:
            writer.append_data(frame)


def write_gif(frames, path, fps=8):
    import imageio.v2 as imageio

    imageio.mimsave(path, list(frames), duration=1.0 / fps, loop=0)
