"""mIoU on the target val split: one confusion matrix accumulated over the whole split (METHODS.md §1).

IoU_c = TP / (TP + FP + FN) per class; mIoU is the mean over the protocol's classes (19, 16 or 13) of the classes
that occur in the ground truth or the prediction. Under ``torch.distributed`` every rank evaluates its shard and
the confusion matrices are summed before the metrics are computed, so all ranks report the same numbers.

With a held-out report half (``eval.holdout``, ``uda_ray.data.holdout``) one pass over the split fills two confusion
matrices: the selection half's metrics are ``val/*``, the report half's ``holdout/*``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from uda_ray.data.labels import CLASSES
from uda_ray.models import unwrap
from uda_ray.models.infer import slide_logits
from uda_ray.train.context import upsample

IGNORE = 255


def confusion_matrix(pred: Tensor, label: Tensor, num_classes: int) -> Tensor:
    """(num_classes, num_classes) int64 counts, rows = ground truth, columns = prediction; 255 is skipped."""
    keep = label != IGNORE
    idx = label[keep].long() * num_classes + pred[keep].long()  # (K,)
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_from_confusion(conf: np.ndarray) -> np.ndarray:
    """Per-class IoU; NaN for classes absent from both ground truth and prediction."""
    tp = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.maximum(union, 1), np.nan)


def miou_metrics(conf: np.ndarray, class_ids: Sequence[int], prefix: str = "val") -> dict[str, float]:
    """``{prefix}/miou`` over ``class_ids`` and ``{prefix}/iou/<class>`` for each of them (names with '_')."""
    iou = iou_from_confusion(conf)
    sel = iou[list(class_ids)]
    out = {f"{prefix}/miou": float(np.nanmean(sel)) if np.isfinite(sel).any() else float("nan")}
    for c in class_ids:
        out[f"{prefix}/iou/{CLASSES[c].replace(' ', '_')}"] = float(iou[c])
    return out


HOLDOUT_PREFIX = "holdout"


def predict_labels(model: nn.Module, x: Tensor, size: Sequence[int], *,
                   infer: Callable[[nn.Module, Tensor], Tensor] | None = None,
                   autocast_dtype: torch.dtype | None = None) -> Tensor:
    """Argmax train ids (B, H, W) at ``size`` of images x (B, 3, h, w): logits from ``infer(model, x)`` (default one
    whole-image pass) under autocast with ``autocast_dtype`` (None: full precision), upsampled bilinearly (with
    align_corners as the model's ``model.align_corners`` says)."""
    with torch.autocast(x.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        logits = infer(model, x) if infer is not None else model(x).logits
    corners = getattr(unwrap(model), "align_corners", False)
    return upsample(logits.float(), tuple(size), corners).argmax(dim=1)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[dict[str, Tensor]], *, num_classes: int,
             class_ids: Sequence[int], device: torch.device, autocast_dtype: torch.dtype | None = None,
             prefix: str = "val", report_indices: Collection[int] | None = None,
             infer: Callable[[nn.Module, Tensor], Tensor] | None = None) -> dict[str, float]:
    """Evaluate ``model`` on the val batches (image at the inference size, label at full resolution, and, with
    ``report_indices``, the dataset ``index`` of each image). With ``report_indices`` the images of those indices
    are scored apart, as ``holdout/*``; the others give ``{prefix}/*``. ``infer(model, images)`` gives the logits
    (default: one whole-image pass; ``inference_fn`` builds the sliding-window one of ``eval.mode: slide``)."""
    was_training = model.training
    model.eval()
    conf = torch.zeros(2, num_classes, num_classes, dtype=torch.int64, device=device)  # (selection, report)
    report = frozenset(int(i) for i in report_indices) if report_indices is not None else frozenset()
    for batch in batches:
        x = batch["image"].to(device, non_blocking=True)
        y = batch["label"].to(device, non_blocking=True)
        pred = predict_labels(model, x, y.shape[-2:], infer=infer, autocast_dtype=autocast_dtype)  # (B, H, W)
        if report_indices is None:
            conf[0] += confusion_matrix(pred, y, num_classes)
            continue
        for b, index in enumerate(batch["index"].tolist()):
            conf[int(index in report)] += confusion_matrix(pred[b], y[b], num_classes)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(conf)
    model.train(was_training)
    conf_np = conf.cpu().numpy()
    out = miou_metrics(conf_np[0], class_ids, prefix)
    if report_indices is not None:
        out.update(miou_metrics(conf_np[1], class_ids, HOLDOUT_PREFIX))
    return out


def inference_fn(mode: str, *, num_classes: int, crop: tuple[int, int] = (0, 0), stride: tuple[int, int] = (0, 0),
                 batch_windows: int = 0) -> Callable[[nn.Module, Tensor], Tensor] | None:
    """``eval.mode``'s logits function for ``evaluate``: None (whole image, one pass) or sliding windows of ``crop``
    every ``stride`` pixels over the val image, batched, averaged over overlaps (``uda_ray.models.infer``)."""
    if mode == "whole":
        return None
    if mode != "slide":
        raise ValueError(f"eval.mode = {mode!r}: expected 'whole' or 'slide'")

    def slide(model: nn.Module, x: Tensor) -> Tensor:
        return slide_logits(lambda w: model(w).logits, x, num_classes=num_classes, crop=crop, stride=stride,
                            batch_windows=batch_windows)

    return slide
