"""Registered loss terms: each contrastive method is one term that the step sums and reports.

A term is a callable ``term(ctx) -> {name: weighted loss}``; it reads what it needs from the ``StepContext``
(the fused map, a backbone level, logits, the projection, pseudo-labels), which computes those on first use.
Terms that keep state (memory banks, class statistics) are ``nn.Module``s so their buffers move to the device
and are saved in checkpoints. ``TERMS`` maps the config's method names to builders; a builder returns ``None``
when the method's weights are 0, which removes the term and its compute.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from torch import Tensor

from uda_ray.config import Config
from uda_ray.models import Segmenter
from uda_ray.train.context import StepContext
from uda_ray.train.terms.cfcontra import build_cfcontra
from uda_ray.train.terms.cluda import build_cluda
from uda_ray.train.terms.cross_view import build_cross_view
from uda_ray.train.terms.entropy import build_entropy
from uda_ray.train.terms.feature_distance import build_feature_distance
from uda_ray.train.terms.lovasz import build_lovasz
from uda_ray.train.terms.mic import build_mic
from uda_ray.train.terms.sdca import build_sdca
from uda_ray.train.terms.self_training import build_self_training
from uda_ray.train.terms.target_mix import build_target_mix


class Term(Protocol):
    name: str
    # the step's passes its losses read (context.SRC, MIX, TGT): the step backpropagates a loss once no loss still
    # to come reads them, and computes a term that reads only the source pass right after it, before the mixed pass
    # (so such a term draws nothing from the generator and runs no student pass). A term that reads only SRC uses no
    # target image, one that reads only TGT no source image: the loop then leaves that batch out (step.batches_read)
    reads: frozenset[str]

    def __call__(self, ctx: StepContext) -> dict[str, Tensor]: ...


TermBuilder = Callable[[Config, Segmenter], "Term | None"]

# name -> builder(cfg, student): the student as built (pretrained weights loaded, not yet wrapped for DDP or moved
# to the device) gives the number of classes, the feature channels, and what a term must copy (the FD backbone)
TERMS: dict[str, TermBuilder] = {
    "fd": build_feature_distance,
    "cluda": build_cluda,
    "cfcontra": build_cfcontra,
    "entropy": build_entropy,
    "sdca": build_sdca,
    "cross_view": build_cross_view,
    "target_mix": build_target_mix,
    "mic": build_mic,
    "lovasz": build_lovasz,
    "self_training": build_self_training,
}


def build_terms(cfg: Config, model: Segmenter) -> list[Term]:
    """The enabled terms of a config for the student ``model``, in registry order."""
    terms = (build(cfg, model) for build in TERMS.values())
    return [t for t in terms if t is not None]
