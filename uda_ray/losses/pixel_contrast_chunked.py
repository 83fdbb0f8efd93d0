"""Anchor-blocked CLUDA pixel contrast with a hand-written backward that recomputes each block.

Memory: only (chunk, n) blocks ever exist, and backward needs nothing from forward but the inputs and one value per
anchor (the log-sum-exp of its negatives), so the peak grows with chunk·n instead of n². Gradients, for anchor i
with ``ℓ_i = lse_{k∈N(i)} s_ik``, ``c_i = 1[N(i) ≠ ∅] / max(|P(i)|, 1)`` and
``L_i = c_i Σ_{j∈P(i)} π_ij softplus(ℓ_i − s_ij)``:

- ``∂L_i/∂s_ij = −c_i π_ij σ(ℓ_i − s_ij)`` for j ∈ P(i);
- ``∂L_i/∂s_ik = a_i · exp(s_ik − ℓ_i)`` for k ∈ N(i), with ``a_i = c_i Σ_{j∈P(i)} π_ij σ(ℓ_i − s_ij)``;
- with G = ∂L/∂s for the block B of anchors and ``s = f_B fᵀ / τ``: ``∂L/∂f_B += G f / τ``, ``∂L/∂f += Gᵀ f_B / τ``;
- ``∂L/∂w_i += Σ_j E_ij w_j``, ``∂L/∂w_j += Σ_i E_ij w_i`` with ``E_ij = c_i softplus(ℓ_i − s_ij) 1[j ∈ P(i)]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def _block(f: torch.Tensor, labels: torch.Tensor, start: int, stop: int, inv_temperature: float
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Similarities and masks of anchors [start, stop): sim (b, n), positive (b, n), negative (b, n), has_neg (b,),
    c (b,) = 1[has_neg] / max(|P|, 1)."""
    sim = f[start:stop] @ f.T  # (b, n)
    sim.mul_(inv_temperature)
    same = labels[start:stop, None] == labels[None, :]  # (b, n)
    negative = ~same
    positive = same
    rows = torch.arange(stop - start, device=f.device)  # (b,)
    positive[rows, rows + start] = False  # self is not a positive (same is not used again)
    has_neg = negative.any(dim=1)  # (b,)
    c = has_neg.to(f.dtype) / positive.sum(dim=1).clamp_min(1).to(f.dtype)  # (b,)
    return sim, positive, negative, has_neg, c


def _negative_lse(sim: torch.Tensor, negative: torch.Tensor, has_neg: torch.Tensor) -> torch.Tensor:
    """(b,) ``lse_{k∈N(i)} s_ik``; 0 (a placeholder, c_i = 0 there) for anchors without negatives."""
    neg_sim = sim.masked_fill(~negative, float("-inf"))  # (b, n)
    shift = torch.where(has_neg, neg_sim.amax(dim=1), torch.zeros_like(has_neg, dtype=sim.dtype))  # (b,)
    total = neg_sim.sub_(shift[:, None]).exp_().sum(dim=1)  # (b,)
    return shift + torch.log(torch.where(has_neg, total, torch.ones_like(total)))


def _pair_weights(weights: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    return None if weights is None else weights[start:stop, None] * weights[None, :]  # (b, n)


class ChunkedPixelContrast(torch.autograd.Function):
    """Σ_i L_i (not yet divided by |A|) over unit rows ``f`` (n, D), all of them valid anchors."""

    @staticmethod
    def forward(ctx, f: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None, chunk_size: int,
                inv_temperature: float) -> torch.Tensor:
        n = f.shape[0]
        lse = f.new_empty(n)  # (n,)
        total = f.new_zeros(())
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            sim, positive, negative, has_neg, c = _block(f, labels, start, stop, inv_temperature)
            lse[start:stop] = _negative_lse(sim, negative, has_neg)
            pair = F.softplus(sim.neg_().add_(lse[start:stop, None]))  # (b, n): softplus(ℓ_i − s_ij)
            pi = _pair_weights(weights, start, stop)
            if pi is not None:
                pair.mul_(pi)
            total += (pair.masked_fill_(~positive, 0).sum(dim=1) * c).sum()
        ctx.save_for_backward(f, labels, weights, lse)
        ctx.chunk_size, ctx.inv_temperature = chunk_size, inv_temperature
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        f, labels, weights, lse = ctx.saved_tensors
        chunk_size, inv_t = ctx.chunk_size, ctx.inv_temperature
        need_w = weights is not None and ctx.needs_input_grad[2]
        grad_f = torch.zeros_like(f)
        grad_w = torch.zeros_like(weights) if need_w else None
        n = f.shape[0]
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            sim, positive, negative, has_neg, c = _block(f, labels, start, stop, inv_t)
            ell = lse[start:stop, None]  # (b, 1)
            pi = _pair_weights(weights, start, stop)
            # negatives: exp(s_ik − ℓ_i) ≤ 1 on N(i); positives: σ(ℓ_i − s_ij)
            soft_neg = sim.masked_fill(~negative, float("-inf")).sub_(ell).exp_()  # (b, n)
            shifted = sim.neg_().add_(ell)  # (b, n): ℓ_i − s_ij, reuses sim's storage
            if need_w:
                energy = F.softplus(shifted).masked_fill_(~positive, 0).mul_(c[:, None])  # (b, n): E_ij
                grad_w[start:stop] += energy @ weights
                grad_w += energy.T @ weights[start:stop]
                del energy
            g_pos = shifted.sigmoid_()  # (b, n)
            if pi is not None:
                g_pos.mul_(pi)
            g_pos.masked_fill_(~positive, 0).mul_(c[:, None])  # c_i π_ij σ_ij on P(i)
            a = g_pos.sum(dim=1, keepdim=True)  # (b, 1)
            grad_sim = soft_neg.mul_(a).sub_(g_pos).mul_(grad_out * inv_t)  # (b, n): ∂L/∂s · (1/τ)
            del g_pos
            grad_f[start:stop] += grad_sim @ f
            grad_f += grad_sim.T @ f[start:stop]
        if grad_w is not None:
            grad_w.mul_(grad_out)
        return grad_f, None, grad_w, None, None


def chunked_pixel_contrast_sum(f: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None,
                               chunk_size: int, inv_temperature: float) -> torch.Tensor:
    """Σ over anchors of the CLUDA anchor loss (see ``pixel_contrast``), in blocks of ``chunk_size`` anchors."""
    return ChunkedPixelContrast.apply(f, labels, weights, chunk_size, inv_temperature)
