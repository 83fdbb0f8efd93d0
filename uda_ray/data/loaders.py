"""Seeded, shardable loaders: an infinite train stream (shuffled epochs, of the dataset or of SDCA's class-balanced
list: ``class_balanced.py``; or Rare Class Sampling: ``rcs.py``) and a sharded, unpadded val loader.

The train stream (``stream.py`` holds the rank layout both samplers share). Epoch e is a permutation ``perm_e`` of the
dataset drawn from (seed, e), with one sample seed per position drawn from (seed, e) as well; the global stream is
``perm_0, perm_1, ...`` end to end, global position ``g`` being position ``g mod N`` of epoch ``g div N``. Ranks take
the global stream in blocks of ``batch_size``, round robin: rank r's stream position s is global position

    g(s) = (s div b) * world_size * b + r * b + (s mod b).

So at every step t the world_size ranks, each with batch b, together read the global positions
[t * world_size * b, (t + 1) * world_size * b) — exactly the batch of a single worker with batch world_size * b,
in rank order, with the same sample seeds (hence the same augmentation). Two workers × b therefore see the same
images as one worker × 2b: ``batch_1x2b(t) == cat(batch_rank0(t), batch_rank1(t))``. Each rank's stream has the
same length per step; no sample is duplicated or dropped across ranks. ``start`` jumps to stream position
``start`` in O(N) work (one epoch's permutation), which is how a resumed run continues exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from uda_ray.data.class_balanced import ClassBalancedSpec
from uda_ray.data.rcs import RareClassSampler, RareClassSpec
from uda_ray.data.stream import check_rank, check_stream_args, global_position


class InfiniteSampler(Sampler):
    """Yields ``(index, sample_seed)`` forever for one rank (see the module docstring for the order).

    ``pool(seed, epoch)``: the (size,) dataset indices that epoch ``epoch`` permutes, instead of 0..size-1 (a list
    drawn with repeats, e.g. SDCA's class-balanced list: ``class_balanced.py``).
    """

    def __init__(self, size: int, *, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 start: int = 0, batch_size: int = 1,
                 pool: Callable[[int, int], np.ndarray] | None = None) -> None:
        if size < 1:
            raise ValueError(f"InfiniteSampler: dataset size {size}: expected at least 1 item")
        check_stream_args("InfiniteSampler", seed=seed, rank=rank, world_size=world_size, start=start,
                          batch_size=batch_size)
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
        self.shuffle, self.start, self.batch_size, self.pool = shuffle, start, batch_size, pool

    def global_position(self, s: int) -> int:
        """Global stream position of this rank's stream position ``s``."""
        return global_position(s, rank=self.rank, world_size=self.world_size, batch_size=self.batch_size)

    def epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(N,) dataset indices and (N,) int64 sample seeds of epoch ``epoch``, functions of (seed, epoch) only."""
        order = (np.random.default_rng([self.seed, epoch, 0]).permutation(self.size) if self.shuffle
                 else np.arange(self.size))
        if self.pool is not None:
            pool = np.asarray(self.pool(self.seed, epoch))
            if pool.shape != (self.size,):
                raise ValueError(f"InfiniteSampler: pool of epoch {epoch} has shape {pool.shape}, expected "
                                 f"({self.size},)")
            order = pool[order]
        seeds = np.random.default_rng([self.seed, epoch, 1]).integers(0, 2**62, size=self.size, dtype=np.int64)
        return order, seeds

    def __iter__(self) -> Iterator[tuple[int, int]]:
        s, epoch, order, seeds = self.start, -1, np.empty(0, np.int64), np.empty(0, np.int64)
        while True:
            e, p = divmod(self.global_position(s), self.size)
            if e != epoch:
                epoch, (order, seeds) = e, self.epoch_plan(e)
            yield int(order[p]), int(seeds[p])
            s += 1


def build_train_loader(dataset: Dataset, *, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                       num_workers: int = 0, start: int = 0, rcs: RareClassSpec | None = None,
                       class_balanced: ClassBalancedSpec | None = None) -> Iterator[dict[str, Any]]:
    """Infinite iterator of collated batches ``{"image": (B, 3, h, w), "label": (B, h, w), "index": (B,)}``.

    ``start`` is the number of samples this rank has already consumed (iterations done × batch_size). With ``rcs``
    the images are drawn by Rare Class Sampling (``uda_ray.data.rcs``) instead of shuffled epochs; the dataset's
    transform must then carry the same crop requirement (``TrainTransform(rcs_min_crop_pixels=rcs.min_crop_pixels)``).
    With ``class_balanced`` the shuffled epochs are passes over SDCA's class-balanced list (``class_balanced.py``).
    """
    sampler: Sampler
    if rcs is not None and class_balanced is not None:
        raise ValueError("build_train_loader: rcs and class_balanced are two samplers: give one")
    if class_balanced is not None:
        class_balanced.check_dataset(dataset)
        sampler = InfiniteSampler(class_balanced.length, seed=seed, rank=rank, world_size=world_size, start=start,
                                  batch_size=batch_size, pool=class_balanced.pool)
    elif rcs is None:
        sampler = InfiniteSampler(len(dataset), seed=seed, rank=rank, world_size=world_size, start=start,
                                  batch_size=batch_size)
    else:
        rcs.check_dataset(dataset)
        sampler = RareClassSampler(rcs, seed=seed, rank=rank, world_size=world_size, start=start,
                                   batch_size=batch_size)
    # the workers start at the first batch (_OnFirstNext), but their seeds' base is drawn here from torch's global
    # generator, as iter(DataLoader) draws it: from a generator in the global one's state, which the draw then
    # advances, so a run's later random draws (dropout, a resumed run's restored state) are what they were
    base = torch.Generator()
    base.set_state(torch.get_rng_state())
    torch.empty((), dtype=torch.int64).random_()
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=True,
                        persistent_workers=num_workers > 0, generator=base)
    return _OnFirstNext(loader)


class _OnFirstNext(Iterator[dict[str, Any]]):
    """``iter(loader)`` at the first ``next``: a loader's worker processes start, and begin to read ahead, when it is
    first iterated, so the stream a run never reads (the target's in a source-only stage, the source's when a stage
    trains on target labels alone) starts none and reads nothing."""

    def __init__(self, loader: DataLoader) -> None:
        self._loader = loader
        self._it: Iterator[dict[str, Any]] | None = None

    def __next__(self) -> dict[str, Any]:
        if self._it is None:
            self._it = iter(self._loader)
        return next(self._it)


def val_indices(size: int, *, rank: int = 0, world_size: int = 1, max_images: int = 0) -> list[int]:
    """Rank ``rank``'s share ``r::world_size`` of the first ``max_images`` (0 = all) indices, without padding."""
    check_rank(rank, world_size)
    n = size if max_images <= 0 else min(size, max_images)
    return list(range(n))[rank::world_size]


def build_val_loader(dataset: Dataset, *, rank: int = 0, world_size: int = 1, max_images: int = 0,
                     num_workers: int = 0) -> DataLoader:
    """Batch-size-1 sequential loader over this rank's images; across ranks every image is read exactly once."""
    indices = val_indices(len(dataset), rank=rank, world_size=world_size, max_images=max_images)
    return DataLoader(dataset, batch_size=1, sampler=indices, num_workers=num_workers, shuffle=False)
