"""A frame plan as a picture, like the sampling-scheme figures of the FDM paper.

One row per stage (first stage at the top), one column per frame. Each cell is coloured by what the
frame is during that stage; the colours are `COLOURS`, and a legend is drawn under the grid.
Only numpy and pillow are used.
"""

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLOURS = {
    "observed": (40, 110, 220),  # blue: fed to the model as a clean frame in this stage
    "generated": (220, 50, 40),  # red: generated in this stage
    "done": (170, 170, 170),  # grey: known (given or generated earlier) but not used in this stage
    "not yet": (255, 255, 255),  # white: not known yet
}
_GRID_LINE = (225, 225, 225)


def plan_image(stages, T):
    """[stages x T x 3] uint8 array, one pixel per (stage, frame), coloured as in COLOURS.

    Frames that no stage generates are taken to be given, i.e. known from the start.
    """
    generated = {i for _, latent in stages for i in latent}
    done = set(range(T)) - generated
    image = np.empty((len(stages), T, 3), dtype=np.uint8)
    for row, (obs, latent) in enumerate(stages):
        for frame in range(T):
            if frame in latent:
                kind = "generated"
            elif frame in obs:
                kind = "observed"
            elif frame in done:
                kind = "done"
            else:
                kind = "not yet"
            image[row, frame] = COLOURS[kind]
        done.update(latent)
    return image


def draw_plan(stages, T, path):
    """Save `stages` ((obs, latent) index lists) of a T-frame plan as a PNG at `path`."""
    cell = max(2, min(16, 960 // max(T, 1)))
    grid = plan_image(stages, T).repeat(cell, axis=0).repeat(cell, axis=1)
    if cell >= 6:  # thin lines between cells when cells are big enough to see them
        grid[::cell, :] = _GRID_LINE
        grid[:, ::cell] = _GRID_LINE

    font = ImageFont.load_default()
    swatch, gap, margin = 12, 6, 8
    labels = list(COLOURS)
    text_w = [int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(label, font=font)) for label in labels]
    legend_w = sum(swatch + 4 + w + 3 * gap for w in text_w)
    width = max(grid.shape[1], legend_w) + 2 * margin
    height = grid.shape[0] + swatch + 3 * margin

    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    if grid.size:
        canvas.paste(Image.fromarray(grid), (margin, margin))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle([margin - 1, margin - 1, margin + grid.shape[1], margin + grid.shape[0]], outline=(0, 0, 0))
    x, y = margin, grid.shape[0] + 2 * margin
    for label, w in zip(labels, text_w):
        draw.rectangle([x, y, x + swatch, y + swatch], fill=COLOURS[label], outline=(0, 0, 0))
        draw.text((x + swatch + 4, y), label, fill=(0, 0, 0), font=font)
        x += swatch + 4 + w + 3 * gap
    canvas.save(path, format="PNG")
