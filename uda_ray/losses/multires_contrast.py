"""CLUDA's learned-weighted multi-resolution pixel contrast (CLUDA on HRDA, METHODS.md §11), direct or in anchor
blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from uda_ray.losses.precision import upcast


def _masked_nll(anchors: torch.Tensor, cands: torch.Tensor, anchor_labels: torch.Tensor, cand_labels: torch.Tensor,
                self_col: torch.Tensor, inv_temperature: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One term for a block of anchors: ``M_ij = −log p_ij`` on positives, 0 elsewhere (b, k); has_neg (b,);
    positive (b, k).

    ``−log p_ij = softplus(lse_{k∈N(i)} s_ik − s_ij)`` with N(i) = candidates with another label. Positives: same
    label, except column ``self_col[i]`` (the anchor's own position; −1 when it is not a candidate). The log-sum-exp
    subtracts the row's largest negative and masked entries never meet a product with inf, so nothing turns into NaN
    for any temperature. A row without negatives gets a finite placeholder; the caller multiplies it by has_neg = 0.
    """
    sim = anchors @ cands.T  # (b, k)
    if inv_temperature != 1.0:
        sim = sim * inv_temperature
    same = anchor_labels[:, None] == cand_labels[None, :]  # (b, k)
    no_neg = same.all(dim=1, keepdim=True)  # (b, 1)
    neg_sim = sim.masked_fill(same, float("-inf"))  # (b, k)
    with torch.no_grad():
        shift = neg_sim.amax(dim=1, keepdim=True).masked_fill(no_neg, 0.0)  # (b, 1)
    neg_sum = torch.exp(neg_sim - shift).sum(dim=1, keepdim=True)  # (b, 1)
    lse = shift + torch.log(neg_sum.masked_fill(no_neg, 1.0))  # (b, 1)
    positive = same.clone()  # (b, k); ``same`` itself is saved by masked_fill
    rows = torch.arange(sim.shape[0], device=sim.device)  # (b,)
    col = self_col.clamp_min(0)  # (b,); a row without a self column rewrites its column 0 with its own value
    positive[rows, col] = positive[rows, col] & (self_col < 0)
    nll = torch.where(positive, F.softplus(lse - sim), 0.0)  # (b, k)
    return nll, ~no_neg.squeeze(1), positive


def _block_sum(lr: torch.Tensor, hr: torch.Tensor, labels: torch.Tensor, att: torch.Tensor, inside: torch.Tensor,
               weights: torch.Tensor | None, cand: torch.Tensor, cand_of: torch.Tensor, start: int, stop: int,
               inv_temperature: float) -> torch.Tensor:
    """Σ over anchors i ∈ [start, stop) of the bracket in ``multires_pixel_contrast``'s formula (before 0.5/|A|).

    lr: (n, D) unit rows (every anchor); hr: (m, D) unit rows of the LR–HR candidates, whose positions among the
    anchors are ``cand`` (m,), and ``cand_of`` (n,) the inverse map (−1: not a candidate); labels, att, inside,
    weights: (n,). The pair weights are outer products of vectors, so each term's weighted sum over j is a
    matrix-vector product of the masked ``−log p`` block: no (b, k) weight matrix is built.
    """
    rows = torch.arange(start, stop, device=lr.device)  # (b,)
    anchor_labels = labels[start:stop]  # (b,)
    w_b = None if weights is None else weights[start:stop]  # (b,)
    anchor_w = att[start:stop] * inside[start:stop].to(att.dtype)  # (b,): a_i h_i (ω_i)
    cand_w = att if weights is None else att * weights  # (n,): a_j (ω_j)
    if w_b is not None:
        anchor_w = anchor_w * w_b

    # LR–LR, candidates = the anchors: Σ_j ω_i ω_j W_ij M_ij = (a_i h_i ω_i) · (M @ (a ω))_i
    nll, has_neg, positive = _masked_nll(lr[start:stop], lr, anchor_labels, labels, rows, inv_temperature)
    n_pos = positive.sum(dim=1)  # (b,)
    total = anchor_w * (nll @ cand_w) * has_neg  # (b,)
    del nll, positive

    # LR–HR, candidates = HR features inside the detail crop: Σ_j ω_i ω_j (1 − W_ij) M_ij
    if cand.numel():
        nll, has_neg, _ = _masked_nll(lr[start:stop], hr, anchor_labels, labels[cand], cand_of[start:stop],
                                      inv_temperature)
        if w_b is None:
            hr_sum = nll.sum(dim=1) - anchor_w * (nll @ cand_w[cand])  # (b,)
        else:
            sums = nll @ torch.stack([weights[cand], cand_w[cand]], dim=1)  # (b, 2)
            hr_sum = w_b * sums[:, 0] - anchor_w * sums[:, 1]  # (b,)
        total = total + hr_sum * has_neg
    return (total / n_pos.clamp_min(1).to(total.dtype)).sum()


def multires_pixel_contrast(lr: torch.Tensor, hr: torch.Tensor, labels: torch.Tensor, *, att: torch.Tensor,
                            inside: torch.Tensor, weights: torch.Tensor | None = None, temperature: float = 1.0,
                            chunk_size: int | None = None, ignore_index: int = 255) -> torch.Tensor:
    """CLUDA's multi-resolution contrast of context (LR) features with themselves and with detail (HR) features.

    With ``l̂, ĥ`` the L2-normalised rows of ``lr`` and ``hr`` (normalised here), ``a`` = ``att``, ``h`` = ``inside``,
    ``ω`` = ``weights`` (1 without), τ = ``temperature``:

    - anchors A = pixels whose label is not ``ignore_index``; HR candidates C = pixels of A inside the detail crop;
    - ``s^L_ij = l̂_i·l̂_j / τ``, ``s^H_ij = l̂_i·ĥ_j / τ``; P(i) = {j ∈ A, j ≠ i, y_j = y_i};
      N(i) = {k ∈ A: y_k ≠ y_i};
    - ``log p^L_ij = s^L_ij − log(exp s^L_ij + Σ_{k∈N(i)} exp s^L_ik)``,
      ``log p^H_ij = s^H_ij − log(exp s^H_ij + Σ_{k∈N(i)∩C} exp s^H_ik)`` (0 for an anchor without negatives);
    - ``W_ij = a_i a_j h_i``;
    - ``L = 0.5/|A| Σ_{i∈A} 1/max(|P(i)|, 1) · [ −Σ_{j∈P(i)} ω_i ω_j W_ij log p^L_ij
      − Σ_{j∈P(i)∩C} ω_i ω_j (1 − W_ij) log p^H_ij ]``.

    The anchor's own position is a candidate in neither term (its HR feature included). An anchor without positives
    adds 0 and still counts in |A|; with no anchor the loss is 0 (zero gradients). Differentiable w.r.t. ``lr``,
    ``hr``, ``att`` and ``weights``.

    The official code (``mmseg/models/losses/contrastive_loss.py:multi_resolution_cl`` of user0407/CLUDA) computes
    the same sum with these differences, all deliberate here:

    - it flattens features pixel-major but labels, ``att`` and weights batch-major, so for batch > 1 features meet the
      wrong labels; here every input comes flattened in one order by the caller;
    - label 255 is a class there (ignore pixels are anchors, positives of each other and negatives of the rest, and
      count in the mean); here they are neither anchors nor candidates and the mean is over A;
    - "inside the detail crop" is ``hr_label != 0`` there (the label map multiplied by the crop mask), so road
      (train id 0) inside the crop counts as outside (W = 0, no LR–LR term for those anchors); here it is the
      explicit ``inside`` mask. Its LR–HR positives use ``mix_lbl``, which equals the context label at every pixel
      (both are the same nearest-resized label map), hence one ``labels`` for both terms here;
    - its LR–HR candidates are *all* positions of a zero canvas into which the detail features were pasted: outside
      the crop ``ĥ_j = 0``, so ``s^H_ij = 0`` — information-free pairs that add a constant ``exp 0`` per negative to
      every denominator (most of the grid: the detail crop covers a quarter of the context) and constant positive
      terms. Here only pixels inside the crop are HR candidates, i.e. the official pair terms that involve a missing
      HR feature are dropped; the normaliser stays |P(i)| of the LR term, as in the official code (which divides
      both terms by the LR positives' count and takes the mean over every row, anchors without positives included).
    - the official thing-class ``imnet_mask`` multiplies only same-label pairs, where it is always 1: a no-op, left out;
      τ = 1 there (no temperature argument).

    The direct form (``chunk_size`` None or 0) builds (|A|, |A|) and (|A|, |C|) matrices. With ``chunk_size`` the
    anchors are processed in blocks of that many rows, each under non-reentrant ``torch.utils.checkpoint``: forward
    keeps one scalar per block and backward recomputes the block's (chunk, |A|) matrices, so peak memory grows with
    chunk·N instead of N², for the same value and gradients (up to float summation order). Computed in at least
    float32 with autocast off. Reference: Vayyat et al., "CLUDA: Contrastive Learning in Unsupervised Domain
    Adaptation for Semantic Segmentation", 2022 (its HRDA variant).

    Args:
        lr: (N, D) context features (upsampled to detail coordinates, resized to the contrast grid, flattened).
        hr: (N, D) detail features on the same grid (any values outside the detail crop: they are not used).
        labels: (N,) class ids or ``ignore_index``.
        att: (N,) learned pixel weights a ∈ (0, 1) (the weight head's sigmoid).
        inside: (N,) bool, pixel inside the detail crop.
        weights: None or (N,) pseudo-label weights ω (mixed images).
    """
    n_all = lr.shape[0]
    if lr.dim() != 2 or hr.shape != lr.shape or labels.shape != (n_all,):
        raise ValueError(f"multires_pixel_contrast: expected lr and hr (N, D) of one shape and labels (N,), got "
                         f"{tuple(lr.shape)}, {tuple(hr.shape)} and {tuple(labels.shape)}")
    for name, t in (("att", att), ("inside", inside), ("weights", weights)):
        if t is not None and t.shape != (n_all,):
            raise ValueError(f"multires_pixel_contrast: {name} must be (N,) = ({n_all},), got {tuple(t.shape)}")
    if inside.dtype != torch.bool:
        raise ValueError(f"multires_pixel_contrast: inside must be a bool mask, got {inside.dtype}")
    if temperature <= 0:
        raise ValueError(f"multires_pixel_contrast: temperature={temperature}, expected > 0")
    if chunk_size is not None and chunk_size < 0:
        raise ValueError(f"multires_pixel_contrast: chunk_size={chunk_size}, expected None, 0 (direct) or a positive "
                         "size")
    with torch.autocast(device_type=lr.device.type, enabled=False):
        valid = labels != ignore_index  # (N,)
        lr_a = F.normalize(upcast(lr)[valid], dim=1)  # (n, D)
        y = labels[valid]  # (n,)
        n = y.shape[0]
        a = upcast(att)[valid]  # (n,)
        h = inside[valid]  # (n,)
        w = None if weights is None else upcast(weights)[valid]  # (n,)
        cand = torch.nonzero(h).squeeze(1)  # (m,): positions of the HR candidates among the anchors
        cand_of = torch.full((n,), -1, dtype=torch.long, device=y.device)  # (n,): −1 = not an HR candidate
        cand_of[cand] = torch.arange(cand.numel(), device=y.device)
        hr_c = F.normalize(upcast(hr)[valid][cand], dim=1)  # (m, D)
        if n == 0:
            return (upcast(lr).sum() + upcast(hr).sum() + upcast(att).sum()) * 0.0
        inv_t = 1.0 / temperature
        if not chunk_size:
            total = _block_sum(lr_a, hr_c, y, a, h, w, cand, cand_of, 0, n, inv_t)
        else:
            total = lr_a.new_zeros(())
            for start in range(0, n, chunk_size):
                stop = min(start + chunk_size, n)
                total = total + checkpoint(_block_sum, lr_a, hr_c, y, a, h, w, cand, cand_of, start, stop, inv_t,
                                           use_reentrant=False, preserve_rng_state=False)
        return 0.5 * total / n
