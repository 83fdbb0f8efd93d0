"""SDCA's class-balanced source list: against a written-out loop of its gtav.py on the same random stream (legacy
RandomState as its global RNG, and numpy's Generator), its balance, the per-file classes from the RCS statistics,
and the sampler over it (a pure function of seed and position: resume, rank sharding)."""

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from uda_ray.data.class_balanced import (
    SUB_EPOCH,
    ClassBalancedSpec,
    build_class_balanced,
    class_balanced_list,
    pass_length,
)
from uda_ray.data.loaders import InfiniteSampler, build_train_loader
from uda_ray.data.rcs import RareClassSpec
from uda_ray.data.readers import DatasetError, build_dataset
from uda_ray.data.transforms import EvalTransform


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # never write into the real ~/.cache


def sdca_list(file_classes: list[list[int]], num_classes: int, max_iters: int, rng) -> list[int]:
    """SDCA's gtav.py/synthia.py with max_iters, written out, its global np.random replaced by ``rng``: per class the
    files that have it (label_to_file) and a read position; per sub-epoch of 3000 the classes' counts from 0, the
    class drawn with np.random.choice(p ∝ 1 / log(1 + 0.01 + share)), a used-up list shuffled and read on from
    position % (len − 1)."""
    label_to_file = {c: [i for i, cl in enumerate(file_classes) if c in cl] for c in range(num_classes)}
    position = dict.fromkeys(range(num_classes), 0)
    drawn = []
    for _ in range(int(max_iters / 3000) + 1):
        seen = np.zeros(num_classes)
        for _ in range(3000):
            share = seen / seen.sum() if seen.sum() != 0 else seen.copy()
            w = 1 / np.log(1 + 1e-2 + share)
            c = rng.choice(num_classes, p=w / w.sum())
            files = label_to_file[c]
            if position[c] > len(files) - 1:
                rng.shuffle(files)
                position[c] = position[c] % (len(files) - 1)
            drawn.append(files[position[c]])
            position[c] += 1
            seen[file_classes[drawn[-1]]] += 1
    return drawn


def random_file_classes(n: int, k: int, seed: int, rare: int = 3) -> list[list[int]]:
    """n files over k classes; the last class in only ``rare`` files (its list is used up and reshuffled often)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        cl = sorted(rng.choice(k - 1, size=int(rng.integers(1, k)), replace=False).tolist())
        out.append(cl + [k - 1] if i % (n // rare) == 1 else cl)
    return out


@pytest.mark.parametrize("generator", ["legacy", "generator"])
def test_list_equals_sdcas_loop_on_the_same_random_stream(generator):
    file_classes = random_file_classes(40, 5, seed=1)
    make = (lambda: np.random.RandomState(3)) if generator == "legacy" else (lambda: np.random.default_rng(3))
    want = sdca_list(file_classes, 5, 7000, make())
    got = class_balanced_list(file_classes, pass_length(7000), make())
    assert len(got) == len(want) == 9000 and got.dtype == np.int64
    assert got.tolist() == want
    assert sum(1 for i in want if 4 in file_classes[i]) > 3 * 3  # the rare class's list was reshuffled


def test_a_class_with_one_file_restarts_at_it():
    file_classes = [[0], [0, 1], [1], [0, 2], [1]]  # class 2: one file (SDCA: a ZeroDivisionError at its second use)
    got = class_balanced_list(file_classes, 3000, np.random.default_rng(0))
    assert (got == 3).sum() > 10 and set(got.tolist()) <= set(range(5))


def test_rare_classes_are_drawn_far_more_often_than_their_share_of_files():
    file_classes = [[0] + ([1] if i % 2 else []) + ([2] if i % 20 == 0 else []) for i in range(60)]
    got = class_balanced_list(file_classes, 6000, np.random.default_rng(5))
    with_rare = np.mean([2 in file_classes[i] for i in got])
    assert with_rare > 0.25 > 4 * 3 / 60  # 3 of 60 files hold class 2: 5 % under uniform sampling
    # within a sub-epoch the rare class is seen about as often as class 1, which half of the files hold (class 0 is
    # in every file: it comes with every draw)
    counts = np.zeros(3)
    for i in got[:SUB_EPOCH]:
        counts[file_classes[i]] += 1
    assert counts[0] == SUB_EPOCH and counts[2] / counts[1] > 0.8


def test_only_classes_with_files_are_drawn_and_files_without_classes_never():
    file_classes = [[], [3], [3, 7], [], [7]]  # classes 0..2, 4..6 have no file; files 0 and 3 have no class
    got = class_balanced_list(file_classes, 3000, np.random.default_rng(1))
    assert set(got.tolist()) == {1, 2, 4}
    with pytest.raises(DatasetError, match="no source label holds any class"):
        class_balanced_list([[], []], 10, np.random.default_rng(0))


def test_pass_length_is_sdcas_sub_epoch_count():
    assert [pass_length(n) for n in (0, 2999, 3000, 250000, 500000)] == [3000, 3000, 6000, 252000, 501000]
    with pytest.raises(ValueError, match="draws -1"):
        pass_length(-1)


# ------------------------------------------------------------------------------------------------- statistics
S = 12
# per image: {cityscapes label id: pixel mask}; road 7 → 0, car 26 → 13, person 24 → 11; 0 is ignore
LABELS = [{26: (slice(0, 1), slice(0, 1))}, {24: (slice(0, 6), slice(0, 6))}, {}, {0: (slice(0, S), slice(0, S))}]


def make_source(root: Path) -> None:
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i, blocks in enumerate(LABELS):
        ids = np.full((S, S), 7, np.uint8)
        for lid, where in blocks.items():
            ids[where] = lid
        Image.fromarray(np.zeros((S, S, 3), np.uint8)).save(root / "images" / f"{i:05d}.png")
        Image.fromarray(ids).save(root / "labels" / f"{i:05d}.png")


def test_a_single_pixel_makes_a_class_present_as_in_generate_gtav_label_info(tmp_path):
    make_source(tmp_path)
    ds = build_dataset("gta5", tmp_path, "train", EvalTransform((S, S)))
    spec = build_class_balanced(ds, tmp_path, draws=100, progress=False)
    # file 0: one car pixel; file 3: all ignore (no class: never drawn)
    assert spec.file_classes == ((0, 13), (0, 11), (0,), ())
    assert spec.length == 3000
    again = build_class_balanced(ds, tmp_path, draws=3000, progress=False)  # the cached statistics, read back
    assert again.file_classes == spec.file_classes and again.length == 6000
    assert 3 not in spec.pool(0, 0).tolist()


# ------------------------------------------------------------------------------------------------------ sampler
class Echo(Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, key):
        index, seed = key
        aug = float(np.random.default_rng(seed).random())
        return {"image": torch.full((3, 2, 2), aug), "label": torch.full((2, 2), index), "index": index}


SPEC = ClassBalancedSpec(tuple(tuple(c) for c in random_file_classes(30, 6, seed=2)), 3000)


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_each_pass_is_the_list_in_a_seeded_random_order():
    stream = take(InfiniteSampler(SPEC.length, seed=4, pool=SPEC.pool), 2 * SPEC.length)
    first, second = [i for i, _ in stream[:SPEC.length]], [i for i, _ in stream[SPEC.length:]]
    assert sorted(first) == sorted(SPEC.pool(4, 0).tolist())
    assert sorted(second) == sorted(SPEC.pool(4, 1).tolist())
    assert first != SPEC.pool(4, 0).tolist()  # shuffled, as SDCA's DataLoader(shuffle=True) reads it
    assert SPEC.pool(4, 0).tolist() == SPEC.pool(4, 0).tolist() != SPEC.pool(5, 0).tolist()
    assert len({s for _, s in stream}) == len(stream)  # a sample seed per position


@pytest.mark.parametrize("start", [0, 7, 2995, 3004])
def test_start_resumes_the_exact_stream(start):
    full = take(InfiniteSampler(SPEC.length, seed=1, rank=1, world_size=2, batch_size=2, pool=SPEC.pool), start + 8)
    tail = take(InfiniteSampler(SPEC.length, seed=1, rank=1, world_size=2, batch_size=2, start=start,
                                pool=SPEC.pool), 8)
    assert tail == full[start:]


def test_loader_ranks_equal_one_big_batch_and_resume():
    ds = Echo(len(SPEC.file_classes))
    one = build_train_loader(ds, batch_size=4, seed=9, class_balanced=SPEC)
    r0 = build_train_loader(ds, batch_size=2, seed=9, rank=0, world_size=2, class_balanced=SPEC)
    r1 = build_train_loader(ds, batch_size=2, seed=9, rank=1, world_size=2, class_balanced=SPEC)
    order = [i for i, _ in take(InfiniteSampler(SPEC.length, seed=9, pool=SPEC.pool), 24)]
    batches = []
    for t in range(6):
        big, a, b = next(one), next(r0), next(r1)
        assert torch.equal(big["image"], torch.cat([a["image"], b["image"]]))
        assert big["index"].tolist() == order[4 * t:4 * t + 4] == a["index"].tolist() + b["index"].tolist()
        batches.append(big)
    resumed = build_train_loader(ds, batch_size=4, seed=9, class_balanced=SPEC, start=4 * 4)
    assert torch.equal(next(resumed)["image"], batches[4]["image"])


def test_bad_specs_and_combinations_are_rejected():
    with pytest.raises(ValueError, match="another dataset"):
        build_train_loader(Echo(5), batch_size=2, seed=0, class_balanced=SPEC)
    rcs = RareClassSpec(classes=(0,), probabilities=(1.0,), eligible=((0,),), min_pixels=0, min_crop_ratio=0.0)
    with pytest.raises(ValueError, match="two samplers"):
        build_train_loader(Echo(30), batch_size=2, seed=0, rcs=rcs, class_balanced=SPEC)
    with pytest.raises(ValueError, match="length 0"):
        ClassBalancedSpec(((0,),), 0)
    with pytest.raises(ValueError, match="a file with a class"):
        ClassBalancedSpec(((), ()), 10)
    with pytest.raises(ValueError, match=r"pool of epoch 0 has shape \(3,\)"):
        take(InfiniteSampler(4, seed=0, pool=lambda seed, epoch: np.arange(3)), 1)
