"""Small PNG figures for evaluation reports, drawn with pillow so reports need no plotting library.

- `plot_per_frame`: one or more metric-vs-frame-index lines, with the observed frames shaded.
- `frame_strip`: a row of a video's frames, observed and generated frames framed in different colours.
"""

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .video_files import GENERATED_COLOUR, OBSERVED_COLOUR, add_borders, to_hwc_uint8

# Line colours, in order (matplotlib's "tab10", so the plots look familiar).
LINE_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
SHADE = (225, 232, 245)  # background of the observed frames
_AXIS = (0, 0, 0)
_GRID = (235, 235, 235)


def nice_ticks(low, high, count=5):
    """About `count` round tick values (1, 2 or 5 times a power of ten apart) covering [low, high]."""
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        return [low]
    raw = (high - low) / max(count - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = min((m * power for m in (1, 2, 5, 10)), key=lambda candidate: abs(candidate - raw))
    first = math.ceil(low / step - 1e-9) * step
    ticks = []
    value = first
    while value <= high + 1e-9 * step:
        ticks.append(round(value, 12))
        value += step
    return ticks


def _label(value):
    return f"{value:.4g}"


def plot_per_frame(series, path, title="", ylabel="", n_obs=0, size=(640, 360)):
    """Save a line plot of per-frame values at `path` (PNG).

    series: {label: values}, values[t] belonging to frame t (lists may differ in length).
    Frames 0..n_obs-1 are shaded: they were given, not generated. Non-finite values (e.g. the
    infinite PSNR of an observed frame copied from the ground truth) are left out of the line.
    """
    width, height = size
    font = ImageFont.load_default()
    left, right, top, bottom = 64, 16, 28, 44
    legend_rows = len(series) if len(series) > 1 else 0
    bottom += 14 * legend_rows + (8 if legend_rows else 0)
    height += 14 * legend_rows + (8 if legend_rows else 0)
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    x0, x1, y0, y1 = left, width - right, top, height - bottom  # plot area, y0 on top

    n_frames = max((len(v) for v in series.values()), default=0)
    finite = [float(v) for values in series.values() for v in values if v is not None and math.isfinite(v)]
    y_low, y_high = (min(finite), max(finite)) if finite else (0.0, 1.0)
    if y_high - y_low < 1e-12:
        y_low, y_high = y_low - 1.0, y_high + 1.0
    pad = 0.05 * (y_high - y_low)
    y_low, y_high = y_low - pad, y_high + pad
    x_high = max(n_frames - 1, 1)

    def px(t):
        return x0 + (x1 - x0) * t / x_high

    def py(value):
        return y1 - (y1 - y0) * (value - y_low) / (y_high - y_low)

    if n_obs > 0:  # frame t covers [t - 0.5, t + 0.5]
        draw.rectangle([x0, y0, min(px(n_obs - 0.5), x1), y1], fill=SHADE)
    for tick in nice_ticks(y_low, y_high):
        if y_low <= tick <= y_high:
            draw.line([x0, py(tick), x1, py(tick)], fill=_GRID)
            text = _label(tick)
            draw.text((x0 - 6 - draw.textlength(text, font=font), py(tick) - 6), text, fill=_AXIS, font=font)
    for tick in nice_ticks(0, x_high):
        if float(tick).is_integer():
            draw.line([px(tick), y1, px(tick), y1 + 4], fill=_AXIS)
            text = str(int(tick))
            draw.text((px(tick) - draw.textlength(text, font=font) / 2, y1 + 6), text, fill=_AXIS, font=font)
    draw.rectangle([x0, y0, x1, y1], outline=_AXIS)

    for k, (label, values) in enumerate(series.items()):
        colour = LINE_COLOURS[k % len(LINE_COLOURS)]
        segment = []
        for t, v in enumerate(list(values) + [None]):  # None ends the last segment
            if v is not None and math.isfinite(v):
                segment.append((px(t), py(float(v))))
                continue
            if len(segment) > 1:
                draw.line(segment, fill=colour, width=2)
            for x, y in segment:
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
            segment = []
        if legend_rows:
            y = y1 + 36 + 14 * k
            draw.line([x0, y + 6, x0 + 20, y + 6], fill=colour, width=2)
            draw.text((x0 + 26, y), str(label), fill=_AXIS, font=font)

    draw.text((x0, 8), title, fill=_AXIS, font=font)
    if ylabel:
        draw.text((4, 8), ylabel, fill=_AXIS, font=font)
    xlabel = "frame index" + (f" (shaded: observed frames 0..{n_obs - 1})" if n_obs > 0 else "")
    draw.text(((x0 + x1 - draw.textlength(xlabel, font=font)) / 2, y1 + 20), xlabel, fill=_AXIS, font=font)
    if not finite:
        draw.text((x0 + 8, y0 + 8), "no finite values", fill=_AXIS, font=font)
    image.save(path, format="PNG")


def frame_strip(video, n_obs, path, max_frames=32, scale=None, gap=2):
    """Save a row of frames of `video` (uint8 [T x C x H x W]) at `path` (PNG).

    Observed frames (index < n_obs) get the observed border colour of video_io (blue), generated
    frames the generated one (red). Videos longer than `max_frames` show `max_frames` frames evenly
    spaced from first to last, so a strip stays readable for long rollouts. Small frames are
    enlarged (nearest neighbour, `scale` times; by default to at least 64 pixels).
    """
    frames = to_hwc_uint8(video)
    T = len(frames)
    if T == 0:
        raise ValueError("frame_strip needs at least one frame.")
    shown = np.unique(np.linspace(0, T - 1, min(T, max_frames)).round().astype(int))
    bordered = add_borders(frames[shown], shown < n_obs)
    if scale is None:
        scale = max(1, 64 // frames.shape[1])
    bordered = bordered.repeat(scale, axis=1).repeat(scale, axis=2)
    _, h, w, _ = bordered.shape
    canvas = np.full((h + 14, len(shown) * (w + gap) - gap, 3), 255, dtype=np.uint8)
    for k, frame in enumerate(bordered):
        canvas[:h, k * (w + gap): k * (w + gap) + w] = frame
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    for k, index in enumerate(shown):  # frame numbers under the frames
        text = str(int(index))
        draw.text((k * (w + gap) + (w - draw.textlength(text, font=font)) / 2, h + 1), text, fill=_AXIS, font=font)
    image.save(path, format="PNG")
    return [int(i) for i in shown]


__all__ = ["plot_per_frame", "frame_strip", "nice_ticks", "OBSERVED_COLOUR", "GENERATED_COLOUR"]
