"""Losses: pure functions of tensors (formulas, shapes and papers in each docstring)."""

from uda_ray.losses.ce import cross_entropy
from uda_ray.losses.cross_view import cross_view_contrast, cross_view_prototype_contrast
from uda_ray.losses.entropy import entropy_loss
from uda_ray.losses.feature_distance import downscale_label_ratio, feature_distance
from uda_ray.losses.lovasz import lovasz_softmax
from uda_ray.losses.multires_contrast import multires_pixel_contrast
from uda_ray.losses.pixel_contrast import pixel_contrast
from uda_ray.losses.prototype_contrast import bank_class_means, prototype_contrast
from uda_ray.losses.prototypes import class_prototypes
from uda_ray.losses.sdca import sdca_loss

__all__ = [
    "bank_class_means",
    "class_prototypes",
    "cross_entropy",
    "cross_view_contrast",
    "cross_view_prototype_contrast",
    "downscale_label_ratio",
    "entropy_loss",
    "feature_distance",
    "lovasz_softmax",
    "multires_pixel_contrast",
    "pixel_contrast",
    "prototype_contrast",
    "sdca_loss",
]
