"""Pictures of what a model predicts: the prediction grid written at every evaluation, and coloured label maps.

Segmentation researchers judge adaptation by looking at target images next to their ground truth, the student's
prediction and the teacher's pseudo-labels. At every evaluation ``fit`` writes one small PNG
(``images/iter_<k>.png`` beside the run's checkpoints, rank 0 only) holding:

- for a fixed, seeded set of target **val** images: image | ground truth | student prediction;
- for a fixed, seeded set of target **train** images: image | teacher pseudo-label (pixels below the pseudo-label
  threshold drawn dimmed: they carry less weight) | student prediction;

in the Cityscapes palette with a legend of the classes and of black, which stands for ignore (the void pixels of
the ground truth: ego vehicle, rectification border, unlabelled). The sets are drawn once from ``run.seed``, so
the grids of one run show the same images at every iteration, and the grids of two runs with the same seed are
comparable.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor, nn

from uda_ray.data.labels import CLASS_COLOURS, CLASSES, IGNORE_INDEX
from uda_ray.train.context import upsample

TILE_WIDTH = 256  # pixels per tile in the grid: the PNG stays small (tens to a few hundred kB)
_PAD, _TITLE = 4, 18
_PALETTE = np.zeros((256, 3), dtype=np.uint8)  # ignore (255) and unused ids draw black
_PALETTE[: len(CLASS_COLOURS)] = np.array(CLASS_COLOURS, dtype=np.uint8)


IGNORE_LABEL = "ignore (void)"


def legend_entries() -> list[tuple[str, tuple[int, int, int]]]:
    """The grid's legend: every class in its Cityscapes colour, then ignore in black (``colorize`` of 255)."""
    return [*zip(CLASSES, (tuple(c) for c in CLASS_COLOURS)), (IGNORE_LABEL, tuple(int(v) for v in _PALETTE[255]))]


def colorize(labels: np.ndarray) -> np.ndarray:
    """(H, W) train ids (255 = ignore) → (H, W, 3) uint8 in the Cityscapes palette."""
    return _PALETTE[labels.astype(np.uint8)]


def pick_indices(size: int, count: int, seed: int, salt: int) -> list[int]:
    """A fixed, seeded choice of ``min(count, size)`` distinct indices of a split (sorted)."""
    n = min(count, size)
    return sorted(np.random.default_rng([seed, salt]).choice(size, size=n, replace=False).tolist())


def _font(size: int = 12) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _tile(array: np.ndarray, width: int, label: bool) -> Image.Image:
    img = Image.fromarray(array)
    h = max(1, round(img.height * width / img.width))
    return img.resize((width, h), Image.Resampling.NEAREST if label else Image.Resampling.BILINEAR)


def grid_png(blocks: Sequence[tuple[str, Sequence[str], Sequence[Sequence[np.ndarray]]]], *, title: str,
             width: int = TILE_WIDTH) -> bytes:
    """A PNG of titled blocks of rows of (H, W, 3) uint8 tiles, each block with its column titles, and a legend.

    ``blocks``: ``(block title, column titles, rows)``; every tile is resized to ``width`` pixels wide, the first
    column (the photograph) bilinearly and the others (label maps) with nearest neighbour.
    """
    font, small = _font(14), _font(12)
    rendered = []
    for name, columns, rows in blocks:
        tiles = [[_tile(t, width, label=j > 0) for j, t in enumerate(row)] for row in rows]
        rendered.append((name, columns, tiles))
    n_cols = max(len(c) for _, c, _ in rendered)
    total_w = _PAD + n_cols * (width + _PAD)
    legend = legend_entries()
    legend_rows = -(-len(legend) // 4)
    heights = [_TITLE * 2 + sum(max(t.height for t in row) + _PAD for row in tiles) for _, _, tiles in rendered]
    total_h = _TITLE + sum(heights) + legend_rows * 16 + 2 * _PAD
    canvas = Image.new("RGB", (total_w, total_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((_PAD, 2), title, fill=(0, 0, 0), font=font)
    y = _TITLE
    for (name, columns, tiles), h in zip(rendered, heights):
        draw.text((_PAD, y + 2), name, fill=(0, 0, 0), font=font)
        for j, col in enumerate(columns):
            draw.text((_PAD + j * (width + _PAD), y + _TITLE + 2), col, fill=(60, 60, 60), font=small)
        yy = y + 2 * _TITLE
        for row in tiles:
            for j, t in enumerate(row):
                canvas.paste(t, (_PAD + j * (width + _PAD), yy))
            yy += max(t.height for t in row) + _PAD
        y += h
    col_w = total_w // 4
    for c, (cls, colour) in enumerate(legend):
        x0, y0 = _PAD + (c % 4) * col_w, y + _PAD + (c // 4) * 16
        draw.rectangle((x0, y0 + 2, x0 + 12, y0 + 12), fill=colour, outline=(0, 0, 0))
        draw.text((x0 + 16, y0), cls, fill=(0, 0, 0), font=small)
    buf = io.BytesIO()
    # zlib's default level: optimize=True (level 9) took 0.63 s for a 784×1614 grid against 0.19 s, for a file
    # 2.5% smaller (349 against 358 kB); an evaluation of a short run or a tiny trial waited on it
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def _image_u8(x: Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] → (H, W, 3) uint8."""
    return (x.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)


@torch.no_grad()
def _labels(model: nn.Module, x: Tensor, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Argmax and max-softmax of ``model`` on one (1, 3, h, w) image, at ``size``."""
    logits = upsample(model(x).logits.float(), size)  # (1, K, H, W)
    prob = logits.softmax(dim=1)
    conf, pred = prob.max(dim=1)
    return pred[0].cpu().numpy(), conf[0].cpu().numpy()


@torch.no_grad()
def prediction_grid(student: nn.Module, teacher: nn.Module, val_items: Sequence[dict], target_items: Sequence[dict],
                    *, device: torch.device, threshold: float, title: str) -> bytes:
    """The grid of the module docstring for already-loaded val and target-train items (``dataset[i]`` dicts)."""
    was = student.training, teacher.training
    student.eval()
    teacher.eval()
    try:
        val_rows = []
        for item in val_items:
            x = item["image"][None].to(device)
            label = item["label"].numpy()
            pred, _ = _labels(student, x, label.shape)
            image = _image_u8(upsample(x, label.shape)[0])
            val_rows.append([image, colorize(label), colorize(pred)])
        tgt_rows = []
        for item in target_items:
            x = item["image"][None].to(device)
            size = tuple(x.shape[-2:])
            pseudo, conf = _labels(teacher, x, size)
            pred, _ = _labels(student, x, size)
            shown = colorize(np.where(conf >= threshold, pseudo, IGNORE_INDEX))
            low = conf < threshold
            shown[low] = (colorize(pseudo)[low] * 0.3).astype(np.uint8)  # below the threshold: dimmed
            tgt_rows.append([_image_u8(x[0]), shown, colorize(pred)])
    finally:
        student.train(was[0])
        teacher.train(was[1])
    blocks = [("target val", ("image", "ground truth", "student prediction"), val_rows)]
    if tgt_rows:
        blocks.append(("target train", ("image", f"teacher pseudo-label (dim: p < {threshold:g})",
                                        "student prediction"), tgt_rows))
    return grid_png(blocks, title=title)


def label_png(labels: np.ndarray) -> bytes:
    """A coloured PNG of (H, W) train ids."""
    buf = io.BytesIO()
    Image.fromarray(colorize(labels)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()
