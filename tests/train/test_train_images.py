"""The prediction grid's legend names every colour a grid draws, black (ignore) included."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from uda_ray.data.labels import CLASS_COLOURS, CLASSES, IGNORE_INDEX
from uda_ray.train import images


def test_legend_has_every_class_and_ignore_in_black() -> None:
    entries = images.legend_entries()
    assert [n for n, _ in entries[:-1]] == list(CLASSES)
    assert [c for _, c in entries[:-1]] == [tuple(c) for c in CLASS_COLOURS]
    name, colour = entries[-1]
    assert "ignore" in name and colour == tuple(images.colorize(np.array([[IGNORE_INDEX]]))[0, 0]) == (0, 0, 0)


def test_grid_draws_the_ignore_swatch() -> None:
    tile = images.colorize(np.full((8, 16), IGNORE_INDEX, np.uint8))
    photo = np.full((8, 16, 3), 128, np.uint8)
    png = images.grid_png([("val", ["image", "ground truth"], [[photo, tile]])], title="t", width=64)
    canvas = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    h, w, _ = canvas.shape
    rows = -(-len(images.legend_entries()) // 4)
    assert rows == 5  # 19 classes and ignore, 4 a row
    top = h - rows * 16 - 2 * images._PAD  # where the legend starts
    k = len(images.legend_entries()) - 1
    x0, y0 = images._PAD + (k % 4) * (w // 4), top + images._PAD + (k // 4) * 16
    assert tuple(canvas[y0 + 7, x0 + 6]) == (0, 0, 0)  # inside the swatch
    label = canvas[y0:y0 + 14, x0 + 16:x0 + 120]
    assert (label.sum(axis=2) < 300).any()  # its name is written beside it
    previous = k - 1  # the last class's swatch is in its colour, not black
    px, py = images._PAD + (previous % 4) * (w // 4), top + images._PAD + (previous // 4) * 16
    assert tuple(canvas[py + 7, px + 6]) == tuple(CLASS_COLOURS[-1])
