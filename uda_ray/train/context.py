"""What one UDA iteration knows: the batches, the student's and teacher's outputs, pseudo-labels and mixes.

Loss terms read from a ``StepContext``; outputs that only some terms need (the student on the plain target image,
pseudo-labels) are computed on first use and cached, so a term with weight 0 costs nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from uda_ray.adaptation import pseudo_labels
from uda_ray.models import SegOutput, unwrap
from uda_ray.models.segmenter import upsample

# The student's passes of an iteration that several losses may read (``Term.reads``): the source batch
# (``out_src``), the ClassMix batch (``extra["mix_out"]``) and the plain target batch (``out_tgt``). A pass that a
# term makes for itself alone (MIC's masked image, a strong view) is not one of them.
SRC, MIX, TGT = "src", "mix", "tgt"

@dataclass(frozen=True)
class PseudoLabels:
    labels: Tensor  # (B, H, W) int64, teacher argmax
    weights: Tensor  # (B, H, W) float, confidence weighting (scalar per image or per pixel)
    confidence: Tensor  # (B, H, W) float, max softmax of the teacher


@dataclass
class StepContext:
    """Inputs and lazily computed outputs of one iteration; terms read, never write, what they did not create."""

    student: nn.Module
    teacher: nn.Module
    # the batches; None for a domain that nothing of the iteration reads (``uda_ray.train.step.batches_read``)
    x_src: Tensor | None  # (B, 3, H, W) in [0, 1]
    y_src: Tensor | None  # (B, H, W) train ids, 255 = ignore
    x_tgt: Tensor | None  # (B, 3, H, W) in [0, 1]
    out_src: SegOutput | None  # None when nothing reads the source pass (the step then skips it)
    pseudo_fn: Callable[[Tensor], PseudoLabels]
    generator: torch.Generator
    autocast: Callable[[], torch.autocast]
    num_classes: int
    aux_bn_update: bool = True  # whether auxiliary passes update BatchNorm running statistics
    teacher_bn_batch: bool = False  # teacher.bn_mode = batch: the teacher's BatchNorm uses the target batch's stats
    tgt_valid: Tensor | None = None  # (B, H, W) bool: target pixels whose pseudo-labels may count (HRDA's margins)
    y_tgt: Tensor | None = None  # (B, H, W) offline target labels (data.target_pseudo_labels); None otherwise
    _pseudo: PseudoLabels | None = None
    _out_tgt: SegOutput | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # what the step leaves for terms (mix_out, mix_labels, …)

    @property
    def pseudo(self) -> PseudoLabels:
        """Teacher pseudo-labels of the un-augmented target batch (computed once)."""
        if self._pseudo is None:
            with torch.no_grad(), self.autocast(), teacher_bn_mode(self.teacher, self.teacher_bn_batch):
                logits = self.teacher(self.x_tgt).logits
            corners = getattr(unwrap(self.teacher), "align_corners", False)  # model.align_corners
            logits = upsample(logits.float(), self.x_tgt.shape[-2:], corners)  # (B, C, H, W)
            pseudo = self.pseudo_fn(logits)
            if self.tgt_valid is not None:  # HRDA: the confidence weight times its valid_pseudo_mask
                pseudo = PseudoLabels(pseudo.labels, pseudo.weights * self.tgt_valid.to(pseudo.weights.dtype),
                                      pseudo.confidence)
            self._pseudo = pseudo
        return self._pseudo

    @property
    def has_pseudo(self) -> bool:
        """Whether some term (or the mix) asked for pseudo-labels in this iteration."""
        return self._pseudo is not None

    @property
    def out_tgt(self) -> SegOutput:
        """The student on the plain target batch (computed once, with gradients)."""
        if self._out_tgt is None:
            self._out_tgt = self.aux_forward(self.x_tgt)
        return self._out_tgt

    def aux_forward(self, x: Tensor) -> SegOutput:
        """The student on a batch that only a loss term needs (not the source or the mixed batch), with gradients;
        its BatchNorm running statistics stay put unless ``aux_bn_update``."""
        with self.autocast(), (contextlib.nullcontext() if self.aux_bn_update else bn_stats_frozen(self.student)):
            return self.student(x)


@contextlib.contextmanager
def bn_stats_frozen(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers in train mode still normalise with the batch's statistics, but their running mean, variance
    and batch count are left as they were (momentum 0 for the pass, the count restored after it)."""
    saved = [(m, m.momentum, m.num_batches_tracked.clone()) for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
    for m, _, _ in saved:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, count in saved:
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


@contextlib.contextmanager
def teacher_bn_mode(teacher: nn.Module, batch: bool) -> Iterator[None]:
    """With ``batch``, the (eval-mode) teacher's BatchNorm layers normalise with the statistics of the batch they
    see, as in train mode, while dropout and drop-path stay off and the running statistics stay as they are
    (DAFormer's teacher runs in train mode with only dropout and drop-path switched off; ``teacher.bn_mode``)."""
    if not batch:
        yield
        return
    norms = [m for m in teacher.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.training]
    for m in norms:
        m.train()
    try:
        with bn_stats_frozen(teacher):
            yield
    finally:
        for m in norms:
            m.eval()


def resize_labels(labels: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """Nearest resize of (B, H, W) integer labels (or weights) to ``size``."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    out = F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")  # (B, 1, h, w)
    return out[:, 0].to(labels.dtype)  # (B, h, w)


def make_pseudo_fn(*, threshold: float, weighting: str, ignore_top: int,
                   ignore_bottom: int) -> Callable[[Tensor], PseudoLabels]:
    def fn(logits: Tensor) -> PseudoLabels:
        labels, weights, confidence = pseudo_labels(logits, threshold=threshold, weighting=weighting,
                                                    ignore_top=ignore_top, ignore_bottom=ignore_bottom)
        return PseudoLabels(labels, weights, confidence)

    return fn
