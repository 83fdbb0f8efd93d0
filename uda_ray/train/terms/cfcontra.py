"""CFContra's fine stage: class-wise contrast of projected features against per-domain memory banks (§3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from uda_ray.adaptation import MemoryBank, ambiguous_mask
from uda_ray.config import Config
from uda_ray.losses import prototype_contrast
from uda_ray.models import Segmenter
from uda_ray.train.context import StepContext, resize_labels

IGNORE = 255


class CFContraTerm(nn.Module):
    """Four pairs src→M_src, tgt→M_tgt, tgt→M_src, src→M_tgt, each ``weight``·NLL over class scores.

    Target labels are the teacher's pseudo-labels, with pixels whose two nearest source centroids are closer
    than ``margin`` ignored. Losses use the banks as they were before this batch; the banks are then updated
    with the batch's detached, normalised features (all ranks update identically).
    """

    name = "cfcontra"

    def __init__(self, *, num_classes: int, proj_dim: int, weight: float, temperature: float, bank_size: int,
                 momentum: float, margin: float) -> None:
        super().__init__()
        self.weight, self.temperature, self.margin = weight, temperature, margin
        self.bank_src = MemoryBank(num_classes, proj_dim, bank_size, momentum)
        self.bank_tgt = MemoryBank(num_classes, proj_dim, bank_size, momentum)

    @staticmethod
    def _pixels(proj: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        f = F.normalize(proj.float(), dim=1)  # (B, P, h, w)
        f = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])  # (B*h*w, P)
        y = resize_labels(labels, proj.shape[-2:]).reshape(-1)  # (B*h*w,)
        return f, y

    def forward(self, ctx: StepContext) -> dict[str, Tensor]:
        f_src, y_src = self._pixels(ctx.out_src.proj, ctx.y_src)
        f_tgt, y_tgt = self._pixels(ctx.out_tgt.proj, ctx.pseudo.labels)
        if self.margin > 0:
            y_tgt = torch.where(ambiguous_mask(f_tgt.detach(), self.bank_src.entries(), self.margin),
                                torch.full_like(y_tgt, IGNORE), y_tgt)
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
    return CFContraTerm(num_classes=num_classes, proj_dim=c.proj_dim, weight=c.weight, temperature=c.temperature,
                        bank_size=c.bank_size, momentum=c.momentum, margin=c.margin)
