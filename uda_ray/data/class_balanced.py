"""SDCA's class-balanced source sampling (BIT-DA/SDCA ``core/datasets/gtav.py`` and ``synthia.py`` built with
``max_iters``; the class lists of ``datasets/generate_gtav_label_info.py``): a list of source images drawn so that
the classes are seen about equally often, which the loader then reads in a random order.

Classes of a file: a file has class c when at least one pixel of its label is c (the official script keeps every id
of ``np.unique(label)``, whatever its count). uda-ray takes them from the RCS class statistics (``uda_ray.data.rcs``:
per-label pixel counts at full resolution, read or computed once and cached with the labels' fingerprint): n ≥ 1.

The list, in sub-epochs of 3000 draws. Within a sub-epoch, with n_c the number of files drawn so far that have
class c (reset to 0 at each sub-epoch) and d_c = n_c / Σ_k n_k (d = 0 before the first draw), class c is drawn with
probability ∝ 1 / log(1.01 + d_c); the file is the next one of c's list. A list that is used up is shuffled in place
and read on from position len mod (len − 1), i.e. from its second entry: the official ``ind[c] % (len - 1)`` skips one
file per reshuffle (reproduced; a class with a single file, a ZeroDivisionError there, restarts at 0). Lists and
positions carry over between sub-epochs. SDCA draws ``int(max_iters / 3000) + 1`` sub-epochs with
``max_iters = SOLVER.MAX_ITER × SOLVER.BATCH_SIZE`` (``core/datasets/build.py``: 500000 in its SDCA stage, whose
source batch is half of BATCH_SIZE; 250000 source-only).

The order. SDCA's loader shuffles the list (``DataLoader(shuffle=True)`` or ``DistributedSampler``) and reads it once,
stopping at STOP_ITER before it is used up. uda-ray reads it through ``loaders.InfiniteSampler`` (``pool``): stream
position g is entry perm_e[g mod L] of pass e = g div L of length L, pass e's list drawn from numpy's
``default_rng([seed, e, 3])`` (a Generator of its own, never the global RNG), its permutation and sample seeds from
(seed, e) as every epoch of that sampler. The order is thus a pure function of (seed, position): a resumed run draws
the pass it resumes in again (about 10 µs per entry; SDCA's 501000 entries take a few seconds), and DDP ranks shard
the global stream as they do plain epochs.

Remaining differences from the official code: the classes are those that have at least one file, by ascending train
id (the official draws over all NUM_CLASSES and fails on a class without files; GTA5 and SYNTHIA have none such); a
class's first pass follows the dataset's order (sorted file names) where the official one follows ``os.listdir``; a
class is found by bisecting the cumulative weights at u · Σw where ``np.random.choice(p=w)`` bisects the normalised
cumulative weights at u: the same class for the same u but for ties in the last bit.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Protocol

import numpy as np

from uda_ray.data.rcs import STATS_FILE, counts_by_index, load_class_stats
from uda_ray.data.readers import DatasetError, SegmentationDataset

SUB_EPOCH = 3000  # SDCA's SUB_EPOCH_SIZE
SMOOTHING = 1 + 1e-2  # SDCA's w = 1 / log(1 + 1e-2 + dist)


class Draws(Protocol):
    """What the list needs of a random generator: ``np.random.Generator`` and the legacy ``RandomState`` (the
    official global RNG) both have it."""

    def random(self) -> float: ...

    def shuffle(self, x: list) -> None: ...


def pass_length(draws: int) -> int:
    """Entries of SDCA's list for ``max_iters = draws``: ``(int(draws / 3000) + 1) · 3000``."""
    if draws < 0:
        raise ValueError(f"class-balanced draws {draws}: expected >= 0")
    return (draws // SUB_EPOCH + 1) * SUB_EPOCH


def class_balanced_list(file_classes: Sequence[Sequence[int]], length: int, rng: Draws) -> np.ndarray:
    """(length,) int64 dataset indices drawn as SDCA's list (module docstring); ``file_classes[i]``: the classes
    file i has. Uses ``rng.random()`` once per entry (where the official ``np.random.choice`` draws its uniform) and
    ``rng.shuffle`` for each used-up list."""
    classes = sorted({int(c) for cl in file_classes for c in cl})
    if not classes:
        raise DatasetError("class-balanced sampling: no source label holds any class")
    column = {c: k for k, c in enumerate(classes)}
    present = [[column[int(c)] for c in cl] for cl in file_classes]
    files_of: list[list[int]] = [[] for _ in classes]
    for i, ks in enumerate(present):
        for k in ks:
            files_of[k].append(i)
    nxt = [0] * len(classes)
    fresh = [1.0 / math.log(SMOOTHING)] * len(classes)
    out = np.empty(length, dtype=np.int64)
    log, uniform = math.log, rng.random  # bound once: this loop runs ~10^5-10^6 times
    for begin in range(0, length, SUB_EPOCH):
        counts, total = [0] * len(classes), 0
        for t in range(begin, min(begin + SUB_EPOCH, length)):
            w = [1.0 / log(SMOOTHING + n / total) for n in counts] if total else fresh
            cdf = list(accumulate(w))
            k = bisect_right(cdf, uniform() * cdf[-1])
            files, j = files_of[k], nxt[k]
            if j >= len(files):
                rng.shuffle(files)
                j = j % (len(files) - 1) if len(files) > 1 else 0
            i = files[j]
            nxt[k] = j + 1
            out[t] = i
            for c in present[i]:
                counts[c] += 1
            total += len(present[i])
    return out


@dataclass(frozen=True)
class ClassBalancedSpec:
    """What the sampler needs: the classes each dataset item has (by index) and the list's length per pass."""

    file_classes: tuple[tuple[int, ...], ...]
    length: int

    def __post_init__(self) -> None:
        if self.length < 1 or not any(self.file_classes):
            raise ValueError(f"ClassBalancedSpec: length {self.length}, {len(self.file_classes)} files, "
                             f"{sum(1 for c in self.file_classes if c)} with a class: expected length >= 1 and "
                             "a file with a class")

    def pool(self, seed: int, epoch: int) -> np.ndarray:
        """(length,) dataset indices of pass ``epoch``, before the loader's shuffle."""
        return class_balanced_list(self.file_classes, self.length, np.random.default_rng([seed, epoch, 3]))

    def check_dataset(self, dataset: object) -> None:
        n = len(dataset)  # type: ignore[arg-type]
        if n != len(self.file_classes):
            raise ValueError(f"ClassBalancedSpec: built for {len(self.file_classes)} files but the dataset has {n} "
                             "items: the spec was built for another dataset")


def build_class_balanced(dataset: SegmentationDataset, root: str | Path, *, draws: int, workers: int = 4,
                         cache_dir: str | Path | None = None, progress: bool = True) -> ClassBalancedSpec:
    """The sampler's inputs for a source dataset whose files sit in ``root``: its class statistics read or computed
    (``rcs.load_class_stats``, shared with RCS), and the list length for ``max_iters = draws`` (``pass_length``)."""
    stats, _, folder = load_class_stats(dataset, root, workers=workers, cache_dir=cache_dir, progress=progress)
    counts = counts_by_index(stats, [lab for _, lab in dataset.pairs], stats_path=folder / STATS_FILE)
    return ClassBalancedSpec(tuple(tuple(sorted(c)) for c in counts), pass_length(draws))
