"""CFContra's fine stage: class-wise contrast of projected features against per-domain memory banks (§3).

Two optional starts of the official run (shiyutang/Coarse-to-fine-UDA, ``train_UDA.py``, ``train_minent``):

- ``loss.cfcontra.init_centroids``: the banks start from a centroids stage's file, as the official run loads
  ``src_center_minent_20.pkl`` / ``tgt_center_minent_20.pkl`` into ``HybridMemory.features``. Those files hold layer4
  centroids (19×2048, no negative entry: post-ReLU maps, see ``uda_ray.train.offline.compute_centroids``) while the
  banks then compare and absorb the projection head's output (``head_mode: moco``, 2048 wide): the official banks
  start in layer4's space and drift into the projection's with every momentum update. uda-ray does the same, so the
  file's width must equal ``proj_dim``.
- ``teacher.kind: nearest_centroid``: the target labels are the official ``get_pseudo_labels`` (``pseudolabel_cluster``
  True, ``ignore_instances`` True, ``normEuclid`` False): each pixel of the student's projected target features (as
  they are, not normalised) takes the class of its nearest source-bank centroid by Euclidean distance, ignored where
  the two nearest are within ``margin`` (``nearest_centroid_labels``), with the bank as it was before this batch.
  With ``teacher.kind: ema`` they are the teacher's pseudo-labels, pixels whose two nearest source centroids are
  within ``margin`` in cosine distance ignored (``ambiguous_mask``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from uda_ray.adaptation import MemoryBank, ambiguous_mask
from uda_ray.adaptation.centroids import nearest_centroid_labels
from uda_ray.config import Config
from uda_ray.losses import bank_class_means, prototype_contrast
from uda_ray.models import Segmenter
from uda_ray.train.context import SRC, TGT, StepContext, resize_labels
from uda_ray.train.offline import load_centroids

IGNORE = 255

# (ctx, target projection (B, P, h, w), source bank (C, K, P), margin) -> target labels (B*h*w,)
TargetLabels = Callable[[StepContext, Tensor, Tensor, float], Tensor]


def teacher_labels(ctx: StepContext, proj: Tensor, bank_src: Tensor, margin: float) -> Tensor:
    """``teacher.kind: ema``: the teacher's pseudo-labels on the projection's grid, ambiguous pixels ignored."""
    y = resize_labels(ctx.pseudo.labels, proj.shape[-2:]).reshape(-1)  # (B*h*w,)
    if margin > 0:
        f = proj.detach().float().permute(0, 2, 3, 1).reshape(-1, proj.shape[1])  # (B*h*w, P)
        y = torch.where(ambiguous_mask(f, bank_src, margin), torch.full_like(y, IGNORE), y)
    return y


def nearest_centroid_teacher(ctx: StepContext, proj: Tensor, bank_src: Tensor, margin: float) -> Tensor:
    """``teacher.kind: nearest_centroid``: the nearest source centroid of each projected target pixel."""
    centroids, _ = bank_class_means(bank_src)  # (C, P), zero rows for empty classes
    return nearest_centroid_labels(proj, centroids, margin=margin).reshape(-1)  # (B*h*w,)


TARGET_LABELS: dict[str, TargetLabels] = {"ema": teacher_labels, "nearest_centroid": nearest_centroid_teacher}


class CFContraTerm(nn.Module):
    """Four pairs src→M_src, tgt→M_tgt, tgt→M_src, src→M_tgt, each ``weight``·NLL over class scores.

    Target labels come from ``target_labels`` (``TARGET_LABELS``, by ``teacher.kind``). Losses use the banks as they
    were before this batch; the banks are then updated with the batch's detached, normalised features (all ranks
    update identically).
    """

    name = "cfcontra"
    reads = frozenset({SRC, TGT})

    def __init__(self, *, num_classes: int, proj_dim: int, weight: float, temperature: float, bank_size: int,
                 momentum: float, margin: float, target_labels: TargetLabels = teacher_labels) -> None:
        super().__init__()
        self.weight, self.temperature, self.margin = weight, temperature, margin
        self.target_labels = target_labels
        self.bank_src = MemoryBank(num_classes, proj_dim, bank_size, momentum)
        self.bank_tgt = MemoryBank(num_classes, proj_dim, bank_size, momentum)

    @staticmethod
    def _pixels(proj: Tensor) -> Tensor:
        f = F.normalize(proj.float(), dim=1)  # (B, P, h, w)
        return f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])  # (B*h*w, P)

    def forward(self, ctx: StepContext) -> dict[str, Tensor]:
        f_src, y_src = self._pixels(ctx.out_src.proj), resize_labels(ctx.y_src, ctx.out_src.proj.shape[-2:]).reshape(-1)
        proj_tgt = ctx.out_tgt.proj
        f_tgt = self._pixels(proj_tgt)
        y_tgt = self.target_labels(ctx, proj_tgt, self.bank_src.entries(), self.margin)
        m_src, m_tgt = self.bank_src.entries(), self.bank_tgt.entries()
        t = self.temperature
        loss = (prototype_contrast(f_src, y_src, m_src, temperature=t)
                + prototype_contrast(f_tgt, y_tgt, m_tgt, temperature=t)
                + prototype_contrast(f_tgt, y_tgt, m_src, temperature=t)
                + prototype_contrast(f_src, y_src, m_tgt, temperature=t))
        self.bank_src.update(f_src.detach(), y_src)
        self.bank_tgt.update(f_tgt.detach(), y_tgt)
        return {self.name: self.weight * loss}


def build_cfcontra(cfg: Config, model: Segmenter) -> CFContraTerm | None:
    num_classes = model.num_classes
    c = cfg.loss.cfcontra
    if c.weight == 0:
        return None
    term = CFContraTerm(num_classes=num_classes, proj_dim=c.proj_dim, weight=c.weight, temperature=c.temperature,
                        bank_size=c.bank_size, momentum=c.momentum, margin=c.margin,
                        target_labels=TARGET_LABELS[cfg.teacher.kind])
    if c.init_centroids:
        src, tgt = load_centroids(c.init_centroids, key="loss.cfcontra.init_centroids", num_classes=num_classes,
                                  dim=c.proj_dim)
        term.bank_src.start_from(src)
        term.bank_tgt.start_from(tgt)
    return term
