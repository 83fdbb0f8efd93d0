"""Teacher pseudo-labels with confidence weighting (DACS / DAFormer, METHODS.md §1)."""

from __future__ import annotations

import torch

WEIGHTINGS = ("scalar", "pixel", "batch")


def pseudo_labels(logits: torch.Tensor, *, threshold: float, weighting: str = "scalar", ignore_top: int = 0,
                  ignore_bottom: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hard pseudo-labels, their loss weights and the teacher confidence.

    ``ŷ = argmax_c softmax(z)_c``, ``p = max_c softmax(z)_c``. Let R be the pixels outside the margins (the top
    ``ignore_top`` and bottom ``ignore_bottom`` rows, rectification artefacts) and K = {p ∈ R: p ≥ threshold}.

    - ``"scalar"`` (DAFormer): every pixel of image b in R gets ω_b = |K_b| / |R_b|; margin pixels get 0.
      The margin rows are excluded from the fraction's denominator, so ω_b is the confident share of the pixels
      that can carry a weight at all.
    - ``"pixel"``: ω_p = 1[p ∈ K].
    - ``"batch"`` (DAFormer's code, ``dacs.py``): one scalar for the whole target batch, the share of all B·H·W
      pixels (margins included) at or above the threshold, ω = |{p ≥ threshold}| / (B·H·W); the margin rows are
      zeroed after it is computed. Its mean is then not |K| / (B·H·W).

    In the scalar and pixel modes ``weights.mean()`` is |K| / (B·H·W), the fraction of all target pixels kept (see
    ``keep_fraction``). No gradient flows through the result.

    Args:
        logits: (B, C, H, W) teacher scores on the un-augmented target image.

    Returns:
        labels (B, H, W) int64, weights (B, H, W) float32, confidence (B, H, W) float32.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"pseudo_labels: weighting={weighting!r}, expected one of {WEIGHTINGS}")
    if logits.dim() != 4:
        raise ValueError(f"pseudo_labels: expected logits (B, C, H, W), got {tuple(logits.shape)}")
    height = logits.shape[2]
    if ignore_top < 0 or ignore_bottom < 0 or ignore_top + ignore_bottom >= height:
        raise ValueError(f"pseudo_labels: ignore_top={ignore_top}, ignore_bottom={ignore_bottom}: expected "
                         f"non-negative margins leaving at least one of the {height} rows")
    with torch.no_grad():
        z = logits.detach().float()  # (B, C, H, W)
        top, labels = z.max(dim=1)  # (B, H, W), (B, H, W)
        # max softmax = 1 / Σ_c exp(z_c − max z): no (B, C, H, W) division
        confidence = (z - top[:, None]).exp_().sum(dim=1).reciprocal_()  # (B, H, W)
        region = torch.zeros_like(confidence, dtype=torch.bool)  # (B, H, W)
        region[:, ignore_top:height - ignore_bottom] = True
        kept = (confidence >= threshold) & region  # (B, H, W)
        if weighting == "pixel":
            weights = kept.float()
        elif weighting == "batch":
            fraction = (confidence >= threshold).float().mean()  # (): margins included, as DAFormer
            weights = fraction * region  # (B, H, W)
        else:
            rows = height - ignore_top - ignore_bottom
            fraction = kept.flatten(1).sum(1).float() / (rows * logits.shape[3])  # (B,)
            weights = fraction[:, None, None] * region  # (B, H, W)
    return labels, weights, confidence


def keep_fraction(weights: torch.Tensor) -> float:
    """Fraction of target pixels at or above the threshold (outside the margins): ``pseudo/keep_frac``.

    Pass the weights returned by ``pseudo_labels`` (either weighting): their mean equals |K| / (B·H·W).
    """
    return float(weights.float().mean())
