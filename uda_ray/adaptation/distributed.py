"""Collectives that keep adaptation state identical on every rank (no-ops without torch.distributed).

Both helpers use ``all_gather`` and then combine the per-rank pieces in rank order on every rank, so the result is
bit-identical across ranks and equal to one process working on the rank-ordered concatenated batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """Σ_r t_r, summed in rank order (same shape as ``t``)."""
    if not is_distributed():
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.stack(parts).sum(dim=0)


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenation of every rank's rows in rank order; ranks may hold different numbers of rows.

    Each rank pads its rows to the largest count, all ranks gather the padded blocks and the counts, and the padding
    is cut away. t: (n_r, ...) → (Σ_r n_r, ...).
    """
    if not is_distributed():
        return t
    world = dist.get_world_size()
    count = torch.tensor([t.shape[0]], device=t.device, dtype=torch.long)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    padded = t.new_zeros((max(sizes), *t.shape[1:]))  # (n_max, ...)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])  # (Σ n_r, ...)
