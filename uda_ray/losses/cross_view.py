"""InfoNCE between a weak and a strong view of target images, per pixel and per class prototype (METHODS.md §4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from uda_ray.losses.precision import upcast


def cross_view_contrast(a: torch.Tensor, b: torch.Tensor, *, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE (NT-Xent) between matching rows of two views.

    With ``z = [â; b̂]`` (2N rows, L2-normalised) and ``s_ij = z_i·z_j / τ``: for each of the 2N anchors i the positive
    is the same row in the other view, p(i) = i ± N, and the negatives are every other row of both views:
    ``L = 1/(2N) Σ_i −log( exp(s_{i,p(i)}) / Σ_{k ≠ i} exp(s_ik) )``.
    Reference: the high-quality target information method (weak/strong pixel contrast, τ = 0.05); Chen et al., SimCLR.

    Args:
        a, b: (N, D) rows of the two views (pixel features or class probabilities); row i of a matches row i of b.
    """
    if a.dim() != 2 or a.shape != b.shape or a.shape[0] == 0:
        raise ValueError(f"cross_view_contrast: a {tuple(a.shape)} and b {tuple(b.shape)} must both be (N >= 1, D)")
    if temperature <= 0:
        raise ValueError(f"cross_view_contrast: temperature={temperature}, expected > 0")
    n = a.shape[0]
    z = F.normalize(upcast(torch.cat([a, b])), dim=1)  # (2N, D)
    sim = z @ z.T / temperature  # (2N, 2N)
    eye = torch.eye(2 * n, dtype=torch.bool, device=z.device)  # (2N, 2N)
    sim = sim.masked_fill(eye, float("-inf"))
    partner = torch.arange(2 * n, device=z.device).roll(n)  # (2N,): i ↦ i ± N
    return F.cross_entropy(sim, partner)


def cross_view_prototype_contrast(pa: torch.Tensor, pb: torch.Tensor, *, temperature: float) -> torch.Tensor:
    """``cross_view_contrast`` over class prototypes: row c of ``pa`` and ``pb`` (C', D) is the same class's mean
    feature in each view (``class_prototypes``); negatives are the other classes' prototypes of both views."""
    return cross_view_contrast(pa, pb, temperature=temperature)
