"""
Reading one video file: uint8 [T x H x W x 3] frames from .npy, .pt, .gif or an ffmpeg format.

Every file dataset reads through here: `video_length` and `read_video` (a window of T frames),
`cached_copy` (the local copy under DATA_ROOT a file is read from) and `to_model_range` (uint8
frames to the package's float32 [T x 3 x S x S] in [-1, 1]). Errors name the file in one sentence.
"""

import hashlib
import os
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageSequence

from ..errors import DatasetError
from .pixels import from_uint8

VIDEO_SUFFIXES = (".mp4", ".gif", ".npy", ".pt", ".webm", ".mov", ".avi", ".mkv")


def natural_key(path):
    """Sort key that puts 2.npy before 10.npy."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def one_line(e):
    """An exception as at most 200 characters on one line, for the parentheses of a DatasetError."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:200]


# ---------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------


def _open_array(path):
    """A lazily readable array ([T x ...]) from .npy or .pt, without loading every frame."""
    if path.suffix.lower() == ".npy":
        return np.load(path, mmap_mode="r", allow_pickle=False)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # files in the legacy (non-zip) format cannot be memory-mapped
        data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, torch.Tensor):
        raise ValueError(f"it holds a {type(data).__name__}, not a tensor")
    return data


def _layout(shape, dtype, path):
    """How to turn a stored array into [T x H x W x 3]: 'thwc', 'tchw' or 'thw'; DatasetError if neither."""
    expected = f"expected a uint8 video of shape [T x H x W x 3], got {dtype} with shape {tuple(shape)}"
    if dtype not in (np.uint8, torch.uint8):
        raise DatasetError(f"Bad video file {path}: {expected}.")
    if len(shape) == 3 and min(shape) > 0:
        return "thw"
    if len(shape) == 4 and min(shape) > 0:
        if shape[3] in (1, 3):
            return "thwc"
        if shape[1] in (1, 3):
            return "tchw"
    raise DatasetError(f"Bad video file {path}: {expected}.")


def _to_thwc(frames, layout):
    frames = np.array(frames)  # a copy: detaches memory-mapped frames from the file
    if layout == "thw":
        frames = frames[..., None]
    elif layout == "tchw":
        frames = frames.transpose(0, 2, 3, 1)
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    return np.ascontiguousarray(frames)


def _read_gif(path, start, T):
    with Image.open(path) as image:
        frames = [np.asarray(frame.convert("RGB")) for i, frame in enumerate(ImageSequence.Iterator(image)) if i < start + T]
    return np.stack(frames[start : start + T]) if len(frames) > start else np.zeros((0, 1, 1, 3), np.uint8)


def read_ffmpeg(path, start, T):
    """uint8 frames start .. start + T - 1 of a file ffmpeg decodes (fewer if it ends first)."""
    import imageio_ffmpeg  # optional dependency (ffmpeg): only files ffmpeg decodes need it

    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    try:
        meta = next(reader)
        width, height = meta["size"]
        frames = []
        for i, buffer in enumerate(reader):
            if i >= start:
                frames.append(np.frombuffer(buffer, dtype=np.uint8).reshape(height, width, 3))
            if len(frames) == T:
                break
    finally:
        reader.close()
    return np.stack(frames) if frames else np.zeros((0, height, width, 3), np.uint8)


# ---------------------------------------------------------------------------
# Length and windows
# ---------------------------------------------------------------------------


def video_length(path):
    """Number of frames in a video file, read as cheaply as the format allows."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix in (".npy", ".pt"):
            array = _open_array(path)
            _layout(array.shape, array.dtype, path)
            return int(array.shape[0])
        if suffix == ".gif":
            with Image.open(path) as image:
                return int(getattr(image, "n_frames", 1))
        import imageio_ffmpeg  # optional dependency (ffmpeg): only files ffmpeg decodes need it

        return int(imageio_ffmpeg.count_frames_and_secs(str(path))[0])
    except DatasetError:
        raise
    except Exception as e:
        raise DatasetError(f"Could not read video file {path} ({one_line(e)}).") from e


def window_start(length, T, rng, path, start=None):
    """First frame of a T-frame window of a video of `length` frames: `start` if given (checked),
    else 0 without rng, else drawn from rng; DatasetError naming `path` if the video is too short."""
    if length < T:
        raise DatasetError(f"Video file {path} has {length} frames, fewer than T={T}.")
    if start is not None:
        if not 0 <= start <= length - T:
            raise DatasetError(f"A window of T={T} frames from frame {start} does not fit in video file {path} ({length} frames).")
        return int(start)
    return 0 if rng is None else int(rng.integers(0, length - T + 1))


def read_video(path, T, rng=None, known_length=None, start=None):
    """
    uint8 [T x H x W x 3] frames of one file: a window starting at a position drawn
    from rng, or the first T frames if rng is None; or, if given, at frame `start`.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix in (".npy", ".pt"):
            array = _open_array(path)
            layout = _layout(array.shape, array.dtype, path)
            start = window_start(len(array), T, rng, path, start)
            window = array[start : start + T]
            return _to_thwc(window.numpy() if isinstance(window, torch.Tensor) else window, layout)
        length = known_length if known_length is not None else video_length(path)
        start = window_start(length, T, rng, path, start)
        frames = _read_gif(path, start, T) if suffix == ".gif" else read_ffmpeg(path, start, T)
        if len(frames) < T:
            raise DatasetError(f"Video file {path} ended after {start + len(frames)} frames, fewer than expected.")
        return frames
    except DatasetError:
        raise
    except Exception as e:
        raise DatasetError(f"Could not read video file {path} ({one_line(e)}).") from e


# ---------------------------------------------------------------------------
# Local copies (DATA_ROOT) and conversion to model inputs
# ---------------------------------------------------------------------------


def cached_copy(path, source_root):
    """
    The path to read `path` from: itself, or, if DATA_ROOT is set, a copy under it
    made on first access (atomically, so concurrent ranks never see half a file).
    """
    cache_root = os.environ.get("DATA_ROOT", "")
    if not cache_root:
        return path
    source_root = Path(source_root).resolve()
    path = Path(path).resolve()
    tag = hashlib.md5(str(source_root).encode()).hexdigest()[:8]
    target = Path(cache_root) / f"{source_root.name}-{tag}" / path.relative_to(source_root)
    size = path.stat().st_size
    if target.exists() and target.stat().st_size == size:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + f".{os.getpid()}.part")
    shutil.copyfile(path, part)
    os.replace(part, target)
    return target


def to_model_range(frames, image_size):
    """
    uint8 [T x H x W x 3] -> float32 [T x 3 x S x S] in [-1, 1]: `pixels.from_uint8`, then
    resize so the shorter side is S (area averaging when shrinking), then crop the centre.
    Both resizings average neighbouring pixels, so the result stays in [-1, 1] up to round-off.
    """
    x = from_uint8(torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2))
    height, width = x.shape[-2:]
    if (height, width) != (image_size, image_size):
        scale = image_size / min(height, width)
        size = (max(image_size, round(height * scale)), max(image_size, round(width * scale)))
        if scale < 1:
            x = F.interpolate(x, size=size, mode="area")
        else:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        top, left = (size[0] - image_size) // 2, (size[1] - image_size) // 2
        x = x[:, :, top : top + image_size, left : left + image_size]
    return x.clamp(-1, 1).contiguous()
