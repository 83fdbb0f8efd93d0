"""Strong view of a target image for the cross-view contrast (METHODS.md §4)."""

from __future__ import annotations

import torch

from uda_ray.data.photometric import color_jitter, gaussian_blur, grayscale


def strong_view(images: torch.Tensor, *, generator: torch.Generator, jitter_strength: float = 0.4,
                grayscale_prob: float = 0.2, blur_prob: float = 0.5, jitter_prob: float = 0.8,
                blur_sigma_min: float = 0.1, blur_sigma_max: float = 2.0) -> torch.Tensor:
    """Colour jitter (p ``jitter_prob``), grayscale (p ``grayscale_prob``), Gaussian blur (p ``blur_prob``,
    σ ~ U[blur_sigma_min, blur_sigma_max]), SimCLR-style. The geometry is untouched, so pixel i of the strong view
    corresponds to pixel i of the weak (un-augmented) view.

    Args:
        images: (B, 3, H, W) in [0, 1].

    Returns:
        (B, 3, H, W) in [0, 1].
    """
    x = color_jitter(images, strength=jitter_strength, prob=jitter_prob, generator=generator)
    x = grayscale(x, prob=grayscale_prob, generator=generator)
    return gaussian_blur(x, sigma_min=blur_sigma_min, sigma_max=blur_sigma_max, prob=blur_prob, generator=generator)
