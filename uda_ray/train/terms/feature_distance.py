"""Thing-class ImageNet Feature Distance (DAFormer, METHODS.md §9): keep the student's deepest backbone features of
thing classes on the source image close to those of the backbone as it was initialised from ImageNet.

    L_FD = λ · mean over thing-class cells of ‖F_S − F_I‖₂      (``uda_ray.losses.feature_distance``)

F_S: the student's last backbone stage on the source batch (the source pass of the step, with gradients; under HRDA
the context pass's, as HRDA and MIC compute FD on the 0.5-scale features); F_I: the
same stage of a frozen copy of the backbone taken when the term is built, i.e. right after the pretrained weights
were loaded (eval mode, no gradients, not in the optimiser, not EMA-updated, and not in any checkpoint: a resumed run
rebuilds it from ``model.pretrained_path``). The cells' labels are the source labels downscaled to the feature grid
by majority with ``scale_min_ratio``. The term is meant for pretrained weights; with a random initialisation it still
runs (the tests use that) but pulls towards random features.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from uda_ray.config import Config
from uda_ray.data.labels import NUM_CLASSES
from uda_ray.losses import feature_distance
from uda_ray.models import Segmenter, unwrap
from uda_ray.train.context import SRC, StepContext


class FeatureDistanceTerm(nn.Module):
    name = "fd"
    reads = frozenset({SRC})

    def __init__(self, imagenet_backbone: nn.Module, *, weight: float, classes: tuple[int, ...],
                 scale_min_ratio: float, num_classes: int) -> None:
        super().__init__()
        frozen = imagenet_backbone.eval().requires_grad_(False)
        # a list, not a submodule: the frozen copy stays out of state_dict(), parameters() and .to()
        self._frozen: list[nn.Module] = [frozen]
        self.weight, self.classes, self.scale_min_ratio = weight, classes, scale_min_ratio
        self.num_classes = num_classes

    def imagenet_features(self, model: Segmenter, x: Tensor) -> Tensor:
        """The frozen backbone's last stage on ``x`` (the source as the student saw it): (B, C, h, w)."""
        frozen = self._frozen[0]
        first = next(frozen.parameters())
        if first.device != x.device:
            frozen.to(x.device)
        with torch.no_grad():
            return frozen(model.normalize(x))[-1]

    def forward(self, ctx: StepContext) -> dict[str, Tensor]:
        model = unwrap(ctx.student)
        student = ctx.out_src.features[-1]  # (B, C, h, w), with gradients
        with ctx.autocast():
            imagenet = self.imagenet_features(model, model.context_input(ctx.x_src))
        loss = feature_distance(student.float(), imagenet.float(), ctx.y_src, classes=self.classes,
                                scale_min_ratio=self.scale_min_ratio, num_classes=self.num_classes)
        return {self.name: self.weight * loss}


def build_feature_distance(cfg: Config, model: Segmenter) -> FeatureDistanceTerm | None:
    f = cfg.loss.fd
    if f.weight == 0:
        return None
    return FeatureDistanceTerm(copy.deepcopy(model.backbone), weight=f.weight, classes=tuple(f.classes),
                               scale_min_ratio=f.scale_min_ratio, num_classes=NUM_CLASSES)
