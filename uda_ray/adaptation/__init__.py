"""The UDA machinery that is not a loss: pseudo-labels, mixing, views, memory bank, class statistics."""

from uda_ray.adaptation.class_stats import ClassStatistics
from uda_ray.adaptation.classmix import classmix_masks, mix, num_mixed_classes
from uda_ray.adaptation.masking import apply_mask, block_mask
from uda_ray.adaptation.memory_bank import MemoryBank, ambiguous_mask
from uda_ray.adaptation.pseudo_label import keep_fraction, pseudo_labels
from uda_ray.adaptation.target_to_source import target_to_source_mix
from uda_ray.adaptation.views import strong_view

__all__ = [
    "ClassStatistics",
    "MemoryBank",
    "ambiguous_mask",
    "apply_mask",
    "block_mask",
    "classmix_masks",
    "keep_fraction",
    "mix",
    "num_mixed_classes",
    "pseudo_labels",
    "strong_view",
    "target_to_source_mix",
]
