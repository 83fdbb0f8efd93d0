"""SDCA's running per-class feature mean and diagonal variance (METHODS.md §5)."""

from __future__ import annotations

import torch
from torch import nn

from uda_ray.adaptation.checks import check_pixel_batch
from uda_ray.adaptation.distributed import sum_over_ranks


class ClassStatistics(nn.Module):
    """Count-weighted running estimate of μ_k and σ²_k, kept in buffers (saved in ``state_dict`` / checkpoints).

    For each class k in a batch with n_b pixels, batch mean μ_b and (population) variance σ²_b, and n_seen pixels so
    far: ``w = n_b / (n_b + n_seen)``, ``μ ← (1 − w)μ + w μ_b``, ``σ² ← (1 − w)σ² + w σ²_b + w(1 − w)(μ − μ_b)²``
    (μ on the right is the old mean), ``n_seen ← n_seen + n_b``. This is the exact pooled mean and variance, so after
    any sequence of updates the buffers hold the statistics of all features seen. Batch moments are computed in
    float64. Under torch.distributed the per-class counts, sums and sums of squares are summed over ranks first, so
    every rank holds the same statistics as one process updating on the concatenated batch.
    Reference: Li et al., SDCA.
    """

    mean: torch.Tensor
    var: torch.Tensor
    count: torch.Tensor

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        if num_classes < 1 or dim < 1:
            raise ValueError(f"ClassStatistics: num_classes={num_classes}, dim={dim}: both must be >= 1")
        self.num_classes, self.dim = num_classes, dim
        self.register_buffer("mean", torch.zeros(num_classes, dim))
        self.register_buffer("var", torch.zeros(num_classes, dim))
        self.register_buffer("count", torch.zeros(num_classes, dtype=torch.long))

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, dim={self.dim}"

    @torch.no_grad()
    def update(self, feats: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255) -> None:
        """Add one batch: feats (N, D) (detached), labels (N,) in [0, C) or ``ignore_index``."""
        check_pixel_batch("ClassStatistics.update", feats, labels, self.dim)
        valid = labels != ignore_index  # (N,)
        f = feats.detach()[valid].to(device=self.mean.device, dtype=torch.float64)  # (n, D)
        y = labels[valid].to(self.mean.device)  # (n,)
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ValueError(f"ClassStatistics.update: labels must lie in [0, {self.num_classes}) or equal "
                             f"{ignore_index}, got values in [{int(y.min())}, {int(y.max())}]")
        zeros = torch.zeros(self.num_classes, self.dim, dtype=torch.float64, device=f.device)
        n_b = sum_over_ranks(torch.bincount(y, minlength=self.num_classes)).double()  # (C,)
        sums = sum_over_ranks(zeros.index_add(0, y, f))  # (C, D)
        squares = sum_over_ranks(zeros.index_add(0, y, f * f))  # (C, D)
        present = (n_b > 0)[:, None]  # (C, 1)
        n = n_b.clamp_min(1)[:, None]  # (C, 1)
        mu_b = sums / n
        var_b = (squares / n - mu_b * mu_b).clamp_min(0)
        w = (n_b / (n_b + self.count.double()).clamp_min(1))[:, None]  # (C, 1)
        mu, var = self.mean.double(), self.var.double()
        new_mu = (1 - w) * mu + w * mu_b
        new_var = (1 - w) * var + w * var_b + w * (1 - w) * (mu - mu_b) ** 2
        self.mean.copy_(torch.where(present, new_mu, mu))
        self.var.copy_(torch.where(present, new_var, var))
        self.count += n_b.long()
