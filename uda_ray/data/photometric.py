"""Batched photometric augmentations on (B, 3, H, W) images in [0, 1], reproducible from a torch.Generator.

Used on the ClassMix image (DACS: colour jitter strength 0.2 with p 0.8, Gaussian blur σ ∈ [0.15, 1.15] with p 0.5)
and for the strong view of the cross-view contrast. Every function draws its random numbers for the whole batch
from ``generator`` (the same number of draws whatever the outcome), applies the change to the images whose
Bernoulli(prob) draw succeeded, leaves the others bit-identical, and never changes the geometry.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# ITU-R BT.601 luma, as in torchvision's rgb_to_grayscale.
_LUMA = (0.299, 0.587, 0.114)


def _check(images: torch.Tensor, name: str) -> None:
    if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(f"{name}: expected float images (B, 3, H, W) in [0, 1], got {images.dtype} "
                         f"{tuple(images.shape)}")


def _uniform(n: int, low: float, high: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    u = torch.rand(n, generator=generator, device=generator.device)  # (n,)
    return (low + (high - low) * u).to(device)


def _chosen(n: int, prob: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """(n,) bool: which images are augmented."""
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"photometric: prob={prob}, expected a probability in [0, 1]")
    return torch.rand(n, generator=generator, device=generator.device).to(device) < prob


def _gray(images: torch.Tensor) -> torch.Tensor:
    r, g, b = images.unbind(1)  # 3 × (B, H, W)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b)[:, None]  # (B, 1, H, W)


def _blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``factor · images + (1 − factor) · other`` clamped to [0, 1]; factor (B,)."""
    f = factor[:, None, None, None]  # (B, 1, 1, 1)
    return (f * images + (1 - f) * other).clamp(0, 1)


def rgb_to_hsv(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] → (B, 3, H, W) HSV, hue in [0, 1) turns."""
    r, g, b = images.unbind(1)  # 3 × (B, H, W)
    maxc, _ = images.max(dim=1)  # (B, H, W)
    minc, _ = images.min(dim=1)  # (B, H, W)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hue = torch.where(maxc == r, ((g - b) / safe) % 6,
                      torch.where(maxc == g, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = torch.where(delta > 0, hue / 6, torch.zeros_like(hue)) % 1.0
    sat = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    return torch.stack([hue, sat, maxc], dim=1)  # (B, 3, H, W)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of ``rgb_to_hsv``: channel n ∈ (5, 3, 1) for (R, G, B) is v − v·s·clamp(min(k, 4 − k), 0, 1)
    with k = (n + 6h) mod 6."""
    h, s, v = hsv.unbind(1)  # 3 × (B, H, W)
    out = []
    for n in (5.0, 3.0, 1.0):
        k = (n + 6 * h) % 6
        out.append(v - v * s * torch.minimum(k, 4 - k).clamp(0, 1))
    return torch.stack(out, dim=1)  # (B, 3, H, W)


def color_jitter(images: torch.Tensor, *, strength: float, prob: float, generator: torch.Generator) -> torch.Tensor:
    """Brightness, contrast, saturation and hue jitter, in that fixed order, each image with probability ``prob``.

    Factors per image: brightness b, contrast c, saturation s ~ U[max(0, 1 − strength), 1 + strength], hue shift
    h ~ U[−strength, strength] turns (torchvision's ColorJitter(strength, strength, strength, strength) ranges).
    ``x ← clamp(b·x)``, ``x ← clamp(c·x + (1 − c)·mean(gray(x)))``, ``x ← clamp(s·x + (1 − s)·gray(x))``,
    hue rotated by h in HSV.
    """
    _check(images, "color_jitter")
    if strength < 0:
        raise ValueError(f"color_jitter: strength={strength}, expected >= 0")
    n, device = images.shape[0], images.device
    chosen = _chosen(n, prob, generator, device)
    low, high = max(0.0, 1.0 - strength), 1.0 + strength
    brightness = _uniform(n, low, high, generator, device)
    contrast = _uniform(n, low, high, generator, device)
    saturation = _uniform(n, low, high, generator, device)
    hue = _uniform(n, -strength, strength, generator, device)
    if not bool(chosen.any()):
        return images
    x = (images * brightness[:, None, None, None]).clamp(0, 1)
    x = _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), contrast)
    x = _blend(x, _gray(x), saturation)
    hsv = rgb_to_hsv(x)  # (B, 3, H, W)
    hsv = torch.cat([(hsv[:, :1] + hue[:, None, None, None]) % 1.0, hsv[:, 1:]], dim=1)  # (B, 3, H, W)
    x = hsv_to_rgb(hsv).clamp(0, 1)
    return torch.where(chosen[:, None, None, None], x, images)


def gaussian_kernels(sigma: torch.Tensor) -> torch.Tensor:
    """(B,) sigmas → (B, K) normalised 1-D Gaussian kernels; image b's kernel has radius ceil(3σ_b) (taps beyond it
    are 0) and all share the largest radius so that one grouped convolution blurs the batch."""
    radius = torch.ceil(3 * sigma).clamp_min(1)  # (B,)
    r_max = int(radius.max())
    x = torch.arange(-r_max, r_max + 1, device=sigma.device, dtype=sigma.dtype)  # (K,)
    k = torch.exp(-0.5 * (x[None] / sigma[:, None]) ** 2)  # (B, K)
    k = torch.where(x[None].abs() <= radius[:, None], k, torch.zeros_like(k))
    return k / k.sum(dim=1, keepdim=True)


def gaussian_blur(images: torch.Tensor, *, sigma_min: float, sigma_max: float, prob: float,
                  generator: torch.Generator) -> torch.Tensor:
    """Separable Gaussian blur, σ_b ~ U[sigma_min, sigma_max] per image, kernel radius ceil(3σ_b), replicate
    padding (any radius works on any image size), each image with probability ``prob``."""
    _check(images, "gaussian_blur")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"gaussian_blur: sigma range [{sigma_min}, {sigma_max}], expected 0 < min <= max")
    n, _, height, width = images.shape
    chosen = _chosen(n, prob, generator, images.device)
    sigma = _uniform(n, sigma_min, sigma_max, generator, images.device)
    if not bool(chosen.any()):
        return images
    kernels = gaussian_kernels(sigma.to(images.dtype))  # (B, K)
    r = (kernels.shape[1] - 1) // 2
    weight = kernels.repeat_interleave(3, dim=0)  # (3B, K)
    x = images.reshape(1, 3 * n, height, width)  # (1, 3B, H, W)
    x = F.pad(x, (r, r, r, r), mode="replicate")  # (1, 3B, H + 2r, W + 2r)
    x = F.conv2d(x, weight[:, None, None, :], groups=3 * n)  # (1, 3B, H + 2r, W)
    x = F.conv2d(x, weight[:, None, :, None], groups=3 * n)  # (1, 3B, H, W)
    x = x.reshape(n, 3, height, width).clamp(0, 1)  # (B, 3, H, W)
    return torch.where(chosen[:, None, None, None], x, images)


def jitter_then_blur(images: torch.Tensor, *, strength: float, jitter_prob: float, blur_prob: float,
                     blur_sigma: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    """DACS's colour augmentation (the ClassMix image, MIC's masked image): ``color_jitter`` then ``gaussian_blur``,
    drawn in that order from ``generator``."""
    x = color_jitter(images, strength=strength, prob=jitter_prob, generator=generator)
    return gaussian_blur(x, sigma_min=blur_sigma[0], sigma_max=blur_sigma[1], prob=blur_prob, generator=generator)


def grayscale(images: torch.Tensor, *, prob: float, generator: torch.Generator) -> torch.Tensor:
    """BT.601 luma copied to the three channels, each image with probability ``prob``."""
    _check(images, "grayscale")
    chosen = _chosen(images.shape[0], prob, generator, images.device)
    gray = _gray(images).expand_as(images)  # (B, 3, H, W)
    return torch.where(chosen[:, None, None, None], gray, images)


__all__ = ["color_jitter", "gaussian_blur", "grayscale", "rgb_to_hsv", "hsv_to_rgb", "gaussian_kernels"]
