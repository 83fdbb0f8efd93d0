"""Seeded infinite sampler: determinism, rank sharding equals one big batch, resume from ``start``; val sharding."""

import itertools

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from uda_ray.data.loaders import InfiniteSampler, build_train_loader, build_val_loader, val_indices


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


class Echo(Dataset):
    """Returns its key, plus an 'augmentation' drawn from the sample seed, like SegmentationDataset does."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, key):
        index, seed = key
        aug = float(np.random.default_rng(seed).random())
        return {"image": torch.full((3, 2, 2), aug), "label": torch.full((2, 2), index), "index": index}


def test_deterministic_and_seed_dependent():
    a = take(InfiniteSampler(10, seed=1), 25)
    assert a == take(InfiniteSampler(10, seed=1), 25)
    assert a != take(InfiniteSampler(10, seed=2), 25)


def test_each_epoch_is_a_permutation_with_fresh_order():
    s = take(InfiniteSampler(7, seed=0), 21)
    epochs = [[i for i, _ in s[k * 7:(k + 1) * 7]] for k in range(3)]
    assert all(sorted(e) == list(range(7)) for e in epochs)
    assert epochs[0] != epochs[1]
    assert len({seed for _, seed in s}) == 21  # every position gets its own augmentation seed
    assert [i for i, _ in take(InfiniteSampler(7, seed=0, shuffle=False), 7)] == list(range(7))


@pytest.mark.parametrize(("size", "b", "world"), [(10, 2, 2), (9, 3, 2), (7, 1, 3), (5, 4, 2)])
def test_ranks_partition_the_single_worker_stream(size, b, world):
    steps = 7
    single = take(InfiniteSampler(size, seed=3, batch_size=b * world), steps * b * world)
    ranks = [take(InfiniteSampler(size, seed=3, rank=r, world_size=world, batch_size=b), steps * b)
             for r in range(world)]
    for t in range(steps):  # step t of one worker with batch world*b = rank batches concatenated in rank order
        cat = [x for r in range(world) for x in ranks[r][t * b:(t + 1) * b]]
        assert single[t * b * world:(t + 1) * b * world] == cat


def test_union_of_ranks_covers_one_epoch():
    r0 = take(InfiniteSampler(12, seed=5, rank=0, world_size=2, batch_size=3), 6)
    r1 = take(InfiniteSampler(12, seed=5, rank=1, world_size=2, batch_size=3), 6)
    assert sorted(i for i, _ in r0 + r1) == list(range(12))
    assert {i for i, _ in r0}.isdisjoint({i for i, _ in r1})


@pytest.mark.parametrize("start", [0, 1, 5, 13, 40])
def test_start_equals_the_tail_of_the_stream(start):
    full = take(InfiniteSampler(9, seed=4, rank=1, world_size=2, batch_size=2), start + 20)
    assert take(InfiniteSampler(9, seed=4, rank=1, world_size=2, batch_size=2, start=start), 20) == full[start:]


def test_bad_arguments():
    with pytest.raises(ValueError, match="rank 2"):
        InfiniteSampler(4, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="size 0"):
        InfiniteSampler(0, seed=0)


def test_train_loader_two_workers_times_b_equals_one_worker_times_2b():
    ds = Echo(11)
    one = build_train_loader(ds, batch_size=4, seed=9)
    r0 = build_train_loader(ds, batch_size=2, seed=9, rank=0, world_size=2)
    r1 = build_train_loader(ds, batch_size=2, seed=9, rank=1, world_size=2)
    for _ in range(6):
        big, a, b = next(one), next(r0), next(r1)
        assert big["image"].shape == (4, 3, 2, 2) and big["label"].shape == (4, 2, 2)
        assert torch.equal(big["image"], torch.cat([a["image"], b["image"]]))
        assert torch.equal(big["index"], torch.cat([a["index"], b["index"]]))


def test_train_loader_resume_and_worker_count_do_not_change_batches():
    ds = Echo(6)
    ref = build_train_loader(ds, batch_size=2, seed=1)
    batches = [next(ref) for _ in range(5)]
    resumed = build_train_loader(ds, batch_size=2, seed=1, start=3 * 2)
    for want in batches[3:]:
        assert torch.equal(next(resumed)["image"], want["image"])
    torch.set_num_threads(1)
    with_workers = build_train_loader(ds, batch_size=2, seed=1, num_workers=2)
    for want in batches:
        got = next(with_workers)
        assert torch.equal(got["image"], want["image"]) and torch.equal(got["index"], want["index"])
    del with_workers


def test_val_sharding_counts_each_image_once():
    for n, world, cap in ((10, 3, 0), (7, 2, 5), (2, 4, 0)):
        shards = [val_indices(n, rank=r, world_size=world, max_images=cap) for r in range(world)]
        flat = sorted(i for s in shards for i in s)
        assert flat == list(range(min(n, cap) if cap else n))
    loader = build_val_loader(IntKeys(5), rank=1, world_size=2, max_images=4)
    assert loader.batch_size == 1
    assert [int(b["index"]) for b in loader] == [1, 3]


class IntKeys(Echo):
    """The val loader reads plain int keys (no augmentation seed)."""

    def __getitem__(self, key):
        assert isinstance(key, int)
        return super().__getitem__((key, 0))


def test_train_loader_starts_its_workers_at_the_first_batch():
    """A stream the run never reads (the target's in a source-only stage) starts no worker processes."""
    import psutil

    me = psutil.Process()
    before = {p.pid for p in me.children()}
    torch.set_num_threads(1)
    it = build_train_loader(Echo(6), batch_size=2, seed=1, num_workers=1)
    assert {p.pid for p in me.children()} == before
    assert next(it)["image"].shape == (2, 3, 2, 2)
    assert {p.pid for p in me.children()} - before  # its worker now runs
    del it


def test_train_loader_draws_its_seed_as_iterating_a_dataloader_does():
    """Building the stream advances torch's global generator as ``iter(DataLoader)`` does, and gives its workers the
    same base seed, though they start later: a run's dropout draws and a resumed run's restored state are unchanged."""
    ds = Echo(6)
    torch.manual_seed(5)
    build_train_loader(ds, batch_size=2, seed=1)
    after_build = torch.get_rng_state()
    torch.manual_seed(5)
    it = iter(DataLoader(ds, batch_size=2, sampler=InfiniteSampler(len(ds), seed=1, batch_size=2), drop_last=True))
    assert torch.equal(after_build, torch.get_rng_state())
    torch.manual_seed(5)
    lazy = build_train_loader(ds, batch_size=2, seed=1)
    next(lazy)
    assert lazy._it._base_seed == it._base_seed
