"""Segmentation models: timm backbone + multi-level fusion decoder (+ projection head), and the EMA teacher."""

from uda_ray.models.decoder import FusionDecoder, ProjectionHead
from uda_ray.models.ema import ema_alpha, ema_update, make_teacher, unwrap
from uda_ray.models.segmenter import Segmenter, SegOutput, build_segmenter, load_backbone_checkpoint

__all__ = [
    "FusionDecoder",
    "ProjectionHead",
    "SegOutput",
    "Segmenter",
    "build_segmenter",
    "ema_alpha",
    "ema_update",
    "load_backbone_checkpoint",
    "make_teacher",
    "unwrap",
]
