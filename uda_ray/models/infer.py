"""Inference geometry: sliding-window logits (mmseg/HRDA ``slide_inference``, METHODS.md §10) and whole-image logits
at a fixed inference size (DAFormer, METHODS.md §1).

``predict`` maps a (n, 3, h, w) batch of windows to (n, K, h', w') logits at any resolution (a segmentor's output
stride); the logits are upsampled bilinearly (align_corners False) to the window. Call these under
``torch.no_grad()`` for evaluation; they do not switch modes or gradients themselves.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

Predict = Callable[[Tensor], Tensor]


def _resize(x: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """Bilinear (align_corners False) resize of a (n, C, h, w) map; the map itself when the size already matches."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def window_boxes(height: int, width: int, crop: tuple[int, int], stride: tuple[int, int]
                 ) -> list[tuple[int, int, int, int]]:
    """(y1, y2, x1, x2) of every window, rows of windows top to bottom, each row left to right.

    As mmseg's ``slide_inference`` (also HRDA's ``extract_slide_feat``): ``h_grids = max(H − h_crop + h_stride − 1,
    0) // h_stride + 1`` windows per column, window k starts at ``k · h_stride`` and the last ones are moved back
    inside the image (``y1 = min(k · h_stride, H − h_crop)``); the same along the width. Unlike mmseg, a crop larger
    than the image is an error (mmseg would decode the smaller image), and so is a stride larger than the crop
    (mmseg would leave uncovered pixels and fail on its ``count_mat == 0`` assertion).
    """
    (h_crop, w_crop), (h_stride, w_stride) = crop, stride
    if min(h_crop, w_crop, h_stride, w_stride) < 1:
        raise ValueError(f"window_boxes: crop {crop} and stride {stride} must be positive")
    if h_crop > height or w_crop > width:
        raise ValueError(f"window_boxes: crop {h_crop}×{w_crop} is larger than the image {height}×{width}")
    if h_stride > h_crop or w_stride > w_crop:
        raise ValueError(f"window_boxes: stride {h_stride}×{w_stride} is larger than the crop {h_crop}×{w_crop}, "
                         "which leaves pixels uncovered")
    h_grids = max(height - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(width - w_crop + w_stride - 1, 0) // w_stride + 1
    boxes = []
    for i in range(h_grids):
        y1 = min(i * h_stride, height - h_crop)
        for j in range(w_grids):
            x1 = min(j * w_stride, width - w_crop)
            boxes.append((y1, y1 + h_crop, x1, x1 + w_crop))
    return boxes


def overlap_counts(height: int, width: int, crop: tuple[int, int], stride: tuple[int, int]) -> Tensor:
    """(H, W) int64: how many windows of ``window_boxes`` cover each pixel (all ≥ 1)."""
    counts = torch.zeros(height, width, dtype=torch.int64)
    for y1, y2, x1, x2 in window_boxes(height, width, crop, stride):
        counts[y1:y2, x1:x2] += 1
    return counts


def _cut(image: Tensor, box: tuple[int, int, int, int]) -> Tensor:
    y1, y2, x1, x2 = box
    return image[:, y1:y2, x1:x2]  # (C, h_crop, w_crop)


def _window_logits(predict: Predict, windows: Tensor, num_classes: int, size: tuple[int, int]) -> Tensor:
    logits = predict(windows)  # (n, K, h', w')
    if logits.dim() != 4 or logits.shape[:2] != (windows.shape[0], num_classes):
        raise ValueError(f"predict returned logits of shape {tuple(logits.shape)} for {windows.shape[0]} windows, "
                         f"expected ({windows.shape[0]}, {num_classes}, h, w)")
    return _resize(logits, size)  # (n, K, h_crop / s, w_crop / s)


def slide_logits(predict: Predict, x: Tensor, *, num_classes: int, crop: tuple[int, int], stride: tuple[int, int],
                 batch_windows: int = 0, output_stride: int = 1) -> Tensor:
    """Logits of (B, 3, H, W) images averaged over overlapping windows: (B, K, H / s, W / s), s = ``output_stride``.

    Every window of every image (``window_boxes``) goes through ``predict``, ``batch_windows`` of them per call
    (0: all at once; ordered window-major, images within a window, as HRDA's batched slide), its logits are
    resized to the window's size / s, added to a canvas at the window's place and divided by the overlap counts.
    s = 1 (evaluation) averages at the image's resolution; HRDA's detail windows average at the logits' (s = 4),
    which needs the image, the crop and the stride divisible by s. The canvas is in at least float32.
    """
    if x.dim() != 4:
        raise ValueError(f"slide_logits: expected images (B, C, H, W), got {tuple(x.shape)}")
    if batch_windows < 0:
        raise ValueError(f"slide_logits: batch_windows={batch_windows}, expected 0 (all at once) or a positive size")
    b, _, height, width = x.shape
    s = output_stride
    if s < 1 or any(v % s for v in (height, width, *crop, *stride)):
        raise ValueError(f"slide_logits: image {height}×{width}, crop {crop} and stride {stride} must be divisible by "
                         f"output_stride {s}")
    boxes = window_boxes(height, width, crop, stride)
    jobs = [(k, i) for k in range(len(boxes)) for i in range(b)]  # (window, image) pairs
    step = batch_windows or len(jobs)
    canvas = None
    for start in range(0, len(jobs), step):
        part = jobs[start:start + step]
        windows = torch.stack([_cut(x[i], boxes[k]) for k, i in part])  # (n, C, h_crop, w_crop)
        logits = _window_logits(predict, windows, num_classes, (crop[0] // s, crop[1] // s))  # (n, K, h_c/s, w_c/s)
        if canvas is None:
            dtype = torch.promote_types(logits.dtype, torch.float32)
            canvas = torch.zeros(b, num_classes, height // s, width // s, dtype=dtype, device=logits.device)
        for (k, i), window in zip(part, logits):
            y1, y2, x1, x2 = boxes[k]
            canvas[i, :, y1 // s:y2 // s, x1 // s:x2 // s] += window
    # every box corner is a multiple of s: the counts at 1/s are the full-resolution counts sampled every s pixels
    counts = overlap_counts(height, width, crop, stride)[::s, ::s].to(canvas.device, canvas.dtype)  # (H/s, W/s)
    return canvas / counts


def whole_logits(predict: Predict, x: Tensor, *, size: tuple[int, int]) -> Tensor:
    """Logits of (B, 3, H, W) images predicted at ``size`` (bilinear resize of the image) and upsampled back to
    (B, K, H, W) (bilinear, align_corners False)."""
    if x.dim() != 4:
        raise ValueError(f"whole_logits: expected images (B, C, H, W), got {tuple(x.shape)}")
    logits = predict(_resize(x, size))  # (B, K, h', w')
    if logits.dim() != 4 or logits.shape[0] != x.shape[0]:
        raise ValueError(f"whole_logits: predict returned {tuple(logits.shape)} for {x.shape[0]} images, expected "
                         "(B, K, h, w)")
    return _resize(logits, x.shape[-2:])  # (B, K, H, W)
