"""CFContra's class centroids and nearest-centroid labels (METHODS.md §3, §14).

CFContra (shiyutang/Coarse-to-fine-UDA, ``advent/domain_adaptation/train_UDA.py``) starts its two memory banks from
class centroids of a trained MinEnt model (``src_center_minent_20.pkl`` / ``tgt_center_minent_20.pkl``, loaded as
``HybridMemory.features``), and labels target pixels in training by their nearest source centroid:

- ``calculate_src_center`` → ``source_centroids``: per source image and class, the mean feature of the pixels whose
  label equals the network's prediction (labels and logits resized nearest to the feature grid); averaged over the
  images that have such pixels; L2-normalised.
- ``calculate_tgt_center`` → ``target_centroids``: the same averaging over target pixels labelled by the nearest
  source centroid (Euclidean), pixels whose two nearest centroids are within the margin left out.
- ``get_pseudo_labels`` with ``ignore_instances`` → ``nearest_centroid_labels`` (``normEuclid`` is ``normalize``).

Quirks. A per-image class mean divides by ``count + 1e-6·h·w``, not the count: the official code divides the
feature map's average pool by the class share plus 1e-6; reproduced. A class with no pixel anywhere makes the
official code stop at an assertion; here its centroid is a zero row, which the memory bank reads as "unfilled" and
``nearest_centroid_labels`` leaves out of the candidates. The official second-nearest distance is the smallest
distance that differs from the nearest one (every copy of the minimum is replaced by 1000 first), so a tie for the
nearest centroid is not treated as ambiguous and distances above 1000 compare against 1000; here it is the second
smallest distance (a tie is ambiguous), the plain reading of "the two nearest centroids".
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
import torch.nn.functional as F

IGNORE = 255
MEAN_EPS = 1e-6  # the official per-image class mean: Σ f / (count + 1e-6 · h · w)


def _resize_nearest(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) labels or (B, C, H, W) maps resized with nearest neighbours (F.interpolate's 'nearest')."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if x.dim() == 3:
        return F.interpolate(x[:, None].float(), size=size, mode="nearest")[:, 0].to(x.dtype)  # (B, h, w)
    return F.interpolate(x.float(), size=size, mode="nearest")  # (B, C, h, w)


class _ImageMeanAverage:
    """Running sum over images of each class's per-image mean feature, and how many images contributed."""

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None  # (C, D) float64
        self.images: torch.Tensor | None = None  # (C,)

    def add(self, features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
        """features (B, D, h, w), labels (B, h, w) in [0, C) or anything else (= not counted)."""
        b, d, h, w = features.shape
        f = features.detach().double().flatten(2)  # (B, D, h*w)
        y = labels.reshape(b, -1).long()  # (B, h*w)
        onehot = F.one_hot(y.clamp(0, num_classes), num_classes + 1)[..., :num_classes].double()  # (B, h*w, C)
        onehot = onehot * ((y >= 0) & (y < num_classes))[..., None]  # labels out of range count nowhere
        counts = onehot.sum(1)  # (B, C)
        class_sums = torch.bmm(f, onehot).transpose(1, 2)  # (B, C, D)
        means = class_sums / (counts + MEAN_EPS * h * w)[..., None]  # (B, C, D)
        present = counts > 0  # (B, C)
        if self.sums is None:
            self.sums = torch.zeros(num_classes, d, dtype=torch.float64, device=f.device)
            self.images = torch.zeros(num_classes, dtype=torch.float64, device=f.device)
        self.sums += (means * present[..., None]).sum(0)
        self.images += present.sum(0)

    def centroids(self, num_classes: int) -> torch.Tensor:
        """(C, D) float32: the average over images, L2-normalised; zero rows for classes no image had."""
        if self.sums is None:
            raise ValueError("centroids: no batch was given")
        mean = self.sums / self.images.clamp_min(1)[:, None]  # (C, D)
        return F.normalize(mean, dim=1).float()


def _batches(batches: Iterable, max_batches: int | None, who: str) -> Iterable:
    """The first ``max_batches`` batches (all for None), without drawing one more (a lazy source runs a model)."""
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"{who}: max_batches = {max_batches}: expected >= 1 or None (all)")
    return itertools.islice(batches, max_batches)


def source_centroids(batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], num_classes: int, *,
                     max_batches: int | None = None) -> torch.Tensor:
    """CFContra's ``calculate_src_center``: (C, D) unit source centroids of the correctly predicted pixels.

    Each batch is ``(features (B, D, h, w), labels (B, H, W), logits (B, C, h', w'))``. Labels and logits are
    resized (nearest) to the feature grid; a pixel counts for class c in its image when its label and the logits'
    argmax are both c. Per image and class, ``m = Σ f / (count + 1e-6·h·w)`` over those pixels; the centroid is the
    mean of m over the images that have such pixels, L2-normalised; a class no image has is a zero row.
    ``max_batches`` stops after that many batches (the official loop breaks after index 300: 301 batches).
    """
    acc = _ImageMeanAverage()
    for features, labels, logits in _batches(batches, max_batches, "source_centroids"):
        if features.dim() != 4 or labels.dim() != 3 or logits.dim() != 4 or logits.shape[1] != num_classes:
            raise ValueError(f"source_centroids: expected features (B, D, h, w), labels (B, H, W) and logits "
                             f"(B, {num_classes}, h', w'), got {tuple(features.shape)}, {tuple(labels.shape)} and "
                             f"{tuple(logits.shape)}")
        size = tuple(features.shape[-2:])
        y = _resize_nearest(labels.to(features.device), size).long()  # (B, h, w)
        pred = _resize_nearest(logits.detach().to(features.device), size).argmax(dim=1)  # (B, h, w)
        acc.add(features, torch.where(y == pred, y, torch.full_like(y, IGNORE)), num_classes)
    return acc.centroids(num_classes)


def nearest_centroid_labels(features: torch.Tensor, centroids: torch.Tensor, *, margin: float,
                            normalize: bool = False) -> torch.Tensor:
    """CFContra's ``get_pseudo_labels`` (``ignore_instances``): each pixel's nearest centroid by Euclidean distance,
    ``IGNORE`` where the two nearest are closer than ``margin``: ``d_(2) − d_(1) < margin``.

    ``d_c = ‖f − c_c‖₂`` with the features as they are (the official code does not normalise them; its centroids
    are unit vectors). ``normalize`` (the official ``normEuclid``) first divides every channel by its L2 norm over
    the whole batch and grid, ``f_d / max(‖f_d‖, 1e-12)``. Zero rows of ``centroids`` (classes never seen) are not
    candidates; with one candidate every pixel gets it, with none every pixel is ``IGNORE``.

    Args:
        features: (B, D, h, w); centroids: (C, D).

    Returns:
        (B, h, w) int64 class ids or ``IGNORE``.
    """
    if features.dim() != 4 or centroids.dim() != 2 or centroids.shape[1] != features.shape[1]:
        raise ValueError(f"nearest_centroid_labels: expected features (B, D, h, w) and centroids (C, D) of one D, "
                         f"got {tuple(features.shape)} and {tuple(centroids.shape)}")
    b, d, h, w = features.shape
    f = features.detach().float()
    if normalize:
        scale = f.transpose(0, 1).reshape(d, -1).norm(dim=1).clamp_min(1e-12)  # (D,)
        f = f / scale.view(1, d, 1, 1)
    f = f.permute(0, 2, 3, 1).reshape(-1, d)  # (B*h*w, D)
    c = centroids.detach().float().to(f.device)  # (C, D)
    dist = torch.cdist(f, c, compute_mode="donot_use_mm_for_euclid_dist")  # (B*h*w, C): ‖f − c‖ from differences
    candidate = c.abs().sum(dim=1) > 0  # (C,)
    dist = dist.masked_fill(~candidate, float("inf"))
    if int(candidate.sum()) == 0:
        return torch.full((b, h, w), IGNORE, dtype=torch.long, device=f.device)
    if int(candidate.sum()) == 1:
        return dist.argmin(dim=1).view(b, h, w)
    nearest = dist.topk(2, dim=1, largest=False)  # values and indices (B*h*w, 2), nearest first
    labels = nearest.indices[:, 0]  # (B*h*w,)
    ambiguous = (nearest.values[:, 1] - nearest.values[:, 0]) < margin  # (B*h*w,)
    return labels.masked_fill(ambiguous, IGNORE).view(b, h, w)


def target_centroids(batches: Iterable[torch.Tensor], source_centroids: torch.Tensor, num_classes: int, *,
                     margin: float, max_batches: int | None = None) -> torch.Tensor:
    """CFContra's ``calculate_tgt_center``: (C, D) unit target centroids of the pixels labelled by their nearest
    source centroid (``nearest_centroid_labels`` with ``margin``, no normalisation).

    Each batch is target features (B, D, h, w); per image and class ``m = Σ f / (count + 1e-6·h·w)``, averaged over
    the images that have the class, L2-normalised; a class no pixel is labelled with is a zero row. ``max_batches``
    stops after that many batches (the official loop breaks after index 1600: 1601 batches).
    """
    if source_centroids.shape[0] != num_classes:
        raise ValueError(f"target_centroids: source_centroids {tuple(source_centroids.shape)}: expected "
                         f"{num_classes} rows")
    acc = _ImageMeanAverage()
    for features in _batches(batches, max_batches, "target_centroids"):
        labels = nearest_centroid_labels(features, source_centroids, margin=margin)  # (B, h, w)
        acc.add(features, labels.to(features.device), num_classes)
    return acc.centroids(num_classes)
