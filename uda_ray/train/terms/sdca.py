"""SDCA: semantic-distribution-aware contrast, the infinite-pair upper bound (METHODS.md §5).

Applied at two levels, the deepest backbone features and the logits, each with its own running class
statistics estimated from source pixels; source pixels use GT labels, target pixels the teacher's pseudo-labels
where its confidence is at least ``delta``. With ``loss.sdca.init_stats`` both statistics start from a class_stats
stage's file (SDCA's ``semantic_dist_init.py`` over the source split, loaded through ``CV_DIR``) instead of empty.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from uda_ray.adaptation import ClassStatistics
from uda_ray.config import Config
from uda_ray.losses import sdca_loss
from uda_ray.models import Segmenter
from uda_ray.train.context import SRC, TGT, StepContext, resize_labels
from uda_ray.train.offline import load_class_statistics

IGNORE = 255


def _pixels(x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    f = x.float().permute(0, 2, 3, 1).reshape(-1, x.shape[1])  # (B*h*w, D)
    y = resize_labels(labels, x.shape[-2:]).reshape(-1)  # (B*h*w,)
    return f, y


class SDCATerm(nn.Module):
    name = "sdca"
    reads = frozenset({SRC, TGT})

    def __init__(self, *, num_classes: int, feat_dim: int, weight_feat: float, weight_out: float, tau: float,
                 delta: float) -> None:
        super().__init__()
        self.weight_feat, self.weight_out, self.tau, self.delta = weight_feat, weight_out, tau, delta
        self.stats_feat = ClassStatistics(num_classes, feat_dim)
        self.stats_out = ClassStatistics(num_classes, num_classes)

    def _level(self, stats: ClassStatistics, src: Tensor, tgt: Tensor, y_src: Tensor, y_tgt: Tensor) -> Tensor:
        f_src, l_src = _pixels(src, y_src)
        stats.update(f_src.detach(), l_src)
        f_tgt, l_tgt = _pixels(tgt, y_tgt)
        loss = sdca_loss(f_src, l_src, stats.mean, stats.var, tau=self.tau)
        return loss + sdca_loss(f_tgt, l_tgt, stats.mean, stats.var, tau=self.tau)

    def forward(self, ctx: StepContext) -> dict[str, Tensor]:
        p = ctx.pseudo
        y_tgt = torch.where(p.confidence >= self.delta, p.labels, torch.full_like(p.labels, IGNORE))  # (B, H, W)
        loss = ctx.x_src.new_zeros(())
        if self.weight_feat > 0:
            loss = loss + self.weight_feat * self._level(self.stats_feat, ctx.out_src.features[-1],
                                                         ctx.out_tgt.features[-1], ctx.y_src, y_tgt)
        if self.weight_out > 0:
            loss = loss + self.weight_out * self._level(self.stats_out, ctx.out_src.logits, ctx.out_tgt.logits,
                                                        ctx.y_src, y_tgt)
        return {self.name: loss}


def build_sdca(cfg: Config, model: Segmenter) -> SDCATerm | None:
    num_classes = model.num_classes
    feat_dim = model.feature_channels[-1]
    c = cfg.loss.sdca
    if c.weight_feat == 0 and c.weight_out == 0:
        return None
    term = SDCATerm(num_classes=num_classes, feat_dim=feat_dim, weight_feat=c.weight_feat, weight_out=c.weight_out,
                    tau=c.tau, delta=c.delta)
    if c.init_stats:
        feat, out = load_class_statistics(c.init_stats, key="loss.sdca.init_stats", num_classes=num_classes,
                                          feat_dim=feat_dim)
        term.stats_feat.load_state_dict(feat)
        term.stats_out.load_state_dict(out)
    return term
