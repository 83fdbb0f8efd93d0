"""Per-class memory bank of normalised features (CFContra, METHODS.md §3), and its nearest-centroid margin."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from uda_ray.adaptation.checks import check_pixel_batch
from uda_ray.adaptation.distributed import gather_rows, sum_over_ranks
from uda_ray.losses.prototype_contrast import bank_class_means


class MemoryBank(nn.Module):
    """``size_per_class`` unit feature vectors per class, kept in buffers (saved in ``state_dict`` / checkpoints).

    - ``size_per_class == 1``, centroid mode (CFContra): ``M_k ← normalise(m·M_k + (1 − m)·mean(f̂ | y = k))`` for
      every class in the batch; a class's first update sets ``M_k = normalise(mean(f̂ | y = k))``.
    - ``size_per_class > 1``, queue mode: every batch pixel of class k is pushed, in order, into k's FIFO ring of
      ``size_per_class`` slots (the oldest are overwritten); ``momentum`` is unused.

    Unfilled slots are all-zero rows and filled ones are unit vectors: ``prototype_contrast`` reads emptiness from the
    norm, ``fill`` counts the filled slots per class and ``ptr`` is each ring's next write slot.
    One bank per domain (M_src, M_tgt). Under torch.distributed every rank sees the whole global batch (per-class sums
    and counts in centroid mode, the gathered features in queue mode), so all ranks hold identical banks, equal to one
    process updating on the rank-ordered concatenation of the ranks' batches.
    """

    bank: torch.Tensor
    fill: torch.Tensor
    ptr: torch.Tensor

    def __init__(self, num_classes: int, dim: int, size_per_class: int = 1, momentum: float = 0.9) -> None:
        super().__init__()
        if num_classes < 1 or dim < 1 or size_per_class < 1:
            raise ValueError(f"MemoryBank: num_classes={num_classes}, dim={dim}, size_per_class={size_per_class}: "
                             f"all must be >= 1")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"MemoryBank: momentum={momentum}, expected a value in [0, 1]")
        self.num_classes, self.dim, self.size_per_class, self.momentum = num_classes, dim, size_per_class, momentum
        self.register_buffer("bank", torch.zeros(num_classes, size_per_class, dim))
        self.register_buffer("fill", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros(num_classes, dtype=torch.long))

    def entries(self) -> torch.Tensor:
        """(C, K, D) entries for ``prototype_contrast`` (all-zero rows are unfilled)."""
        return self.bank

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, dim={self.dim}, size_per_class={self.size_per_class}, "
                f"momentum={self.momentum}")

    @torch.no_grad()
    def start_from(self, centroids: torch.Tensor) -> None:
        """Fill the bank with one (C, D) centroid per class (normalised here), as CFContra loads its precomputed
        centroids into ``HybridMemory.features``: each non-zero row becomes the class's first entry (its centroid in
        centroid mode, slot 0 of its queue otherwise); zero rows (classes never seen) leave the class unfilled."""
        if centroids.shape != (self.num_classes, self.dim):
            raise ValueError(f"MemoryBank.start_from: centroids {tuple(centroids.shape)}: expected "
                             f"({self.num_classes}, {self.dim})")
        seen = centroids.abs().sum(dim=1) > 0  # (C,)
        self.bank.zero_()
        self.bank[:, 0] = F.normalize(centroids.detach().float(), dim=1).to(self.bank)
        self.fill.copy_(seen.long())
        self.ptr.copy_(seen.long() % self.size_per_class)

    @torch.no_grad()
    def update(self, feats: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255) -> None:
        """Add one batch: feats (N, D) (normalised here, detached), labels (N,) in [0, C) or ``ignore_index``."""
        check_pixel_batch("MemoryBank.update", feats, labels, self.dim)
        valid = labels != ignore_index  # (N,)
        f = F.normalize(feats.detach().float()[valid], dim=1).to(self.bank.device)  # (n, D)
        y = labels[valid].to(self.bank.device)  # (n,)
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ValueError(f"MemoryBank.update: labels must lie in [0, {self.num_classes}) or equal "
                             f"{ignore_index}, got values in [{int(y.min())}, {int(y.max())}]")
        if self.size_per_class == 1:
            self._update_centroids(f, y)
        else:
            self._enqueue(gather_rows(f), gather_rows(y))

    def _update_centroids(self, f: torch.Tensor, y: torch.Tensor) -> None:
        sums = torch.zeros(self.num_classes, self.dim, dtype=torch.float64, device=f.device)
        sums = sum_over_ranks(sums.index_add(0, y, f.double()))  # (C, D)
        counts = sum_over_ranks(torch.bincount(y, minlength=self.num_classes))  # (C,)
        present = counts > 0  # (C,)
        batch_mean = sums / counts.clamp_min(1)[:, None]  # (C, D)
        old = self.bank[:, 0].double()  # (C, D)
        started = (self.fill > 0)[:, None]  # (C, 1)
        new = torch.where(started, self.momentum * old + (1 - self.momentum) * batch_mean, batch_mean)
        new = F.normalize(new, dim=1)
        self.bank[:, 0] = torch.where(present[:, None], new, old).to(self.bank.dtype)
        self.fill[present] = 1

    def _enqueue(self, f: torch.Tensor, y: torch.Tensor) -> None:
        k = self.size_per_class
        for c in torch.unique(y).tolist():
            rows = f[y == c]  # (n_c, D)
            n = rows.shape[0]
            # Of n pushes into a ring of k slots only the last k survive, at the slots sequential pushes would use.
            offsets = torch.arange(max(0, n - k), n, device=f.device)  # (min(n, k),)
            slots = (self.ptr[c] + offsets) % k
            self.bank[c, slots] = rows[offsets].to(self.bank.dtype)
            self.ptr[c] = (self.ptr[c] + n) % k
            self.fill[c] = torch.clamp(self.fill[c] + n, max=k)


def ambiguous_mask(feats: torch.Tensor, bank: torch.Tensor, margin: float) -> torch.Tensor:
    """Pixels too close to a class boundary in the bank's space (CFContra ignores these target pixels).

    With class scores ``s_c = mean_k f̂·m̂_ck`` over class c's filled entries (for a centroid bank, the cosine
    similarity to the centroid) and cosine distances ``d_c = 1 − s_c``, a pixel is ambiguous when its two nearest
    classes are closer than the margin: ``d_(2) − d_(1) < margin``. With fewer than two filled classes nothing can
    be compared and no pixel is ambiguous.

    Args:
        feats: (N, D) features (normalised inside); bank: (C, K, D) with all-zero unfilled rows.

    Returns:
        (N,) bool.
    """
    if feats.dim() != 2 or bank.dim() != 3 or bank.shape[2] != feats.shape[1]:
        raise ValueError(f"ambiguous_mask: expected feats (N, D) and bank (C, K, D), got {tuple(feats.shape)} and "
                         f"{tuple(bank.shape)}")
    means, filled = bank_class_means(bank)  # (C, D), (C,)
    filled = filled.to(feats.device)
    if int(filled.sum()) < 2:
        return torch.zeros(feats.shape[0], dtype=torch.bool, device=feats.device)
    scores = F.normalize(feats.detach().float(), dim=1) @ means.to(feats.device).T  # (N, C)
    scores = scores.masked_fill(~filled[None, :], float("-inf"))
    top2 = scores.topk(2, dim=1).values  # (N, 2)
    return (top2[:, 0] - top2[:, 1]) < margin
