"""Rare Class Sampling: probabilities against a written-out computation (and DAFormer's float32 torch formula), the
sampler's stream (frequencies, eligibility, resume, ranks), DAFormer's json files (read, written, matched, cached)."""

import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from uda_ray.data import rcs
from uda_ray.data.loaders import build_train_loader
from uda_ray.data.rcs import (
    SAMPLES_FILE,
    STATS_FILE,
    RareClassSampler,
    RareClassSpec,
    build_rcs,
    class_pixel_counts,
    class_probabilities,
    compute_class_stats,
    rcs_spec_from_stats,
)
from uda_ray.data.readers import DatasetError, SegmentationDataset, build_dataset, read_label_ids
from uda_ray.data.transforms import EvalTransform, TrainTransform

S = 20  # image side
# per image: {cityscapes label id: (top, left, size)} blocks painted over road (7); trainIds road 0, car 13,
# person 11, bicycle 18
BLOCKS = [{}, {26: (0, 0, 10)}, {24: (0, 0, 5), 26: (10, 10, 10)}, {33: (0, 0, 2)}, {26: (0, 0, 20)},
          {24: (12, 12, 8)}]
TRAIN = {7: 0, 26: 13, 24: 11, 33: 18}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # never write into the real ~/.cache


def make_source(root: Path) -> list[np.ndarray]:
    """A GTA5-layout source with known class blocks; returns the (S, S) train-id labels."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    out = []
    for i, blocks in enumerate(BLOCKS):
        ids = np.full((S, S), 7, np.uint8)
        for lid, (top, left, n) in blocks.items():
            ids[top:top + n, left:left + n] = lid
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (S, S, 3), dtype=np.uint8)).save(
            root / "images" / f"{i:05d}.png")
        Image.fromarray(ids).save(root / "labels" / f"{i:05d}.png")
        out.append(np.vectorize(TRAIN.get)(ids).astype(np.uint8))
    return out


def daformer_stats(labels: list[np.ndarray], prefix: str = "data/gta/labels/") -> list[dict]:
    """What DAFormer's tools/convert_datasets/gta.py writes: ids ascending, then the _labelTrainIds.png path."""
    out = []
    for i, lab in enumerate(labels):
        entry = {str(c): int((lab == c).sum()) for c in range(19) if (lab == c).sum() > 0}
        entry["file"] = f"{prefix}{i:05d}_labelTrainIds.png"
        out.append(entry)
    return out


def daformer_samples(stats: list[dict]) -> dict:
    out: dict = {}
    for e in stats:
        for c, n in e.items():
            if c != "file":
                out.setdefault(c, []).append([e["file"], n])
    return out


pytestmark = pytest.mark.filterwarnings("ignore:RCS. no source image has more than 20 pixels of class 18")


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


# ------------------------------------------------------------------------------------------------ probabilities
STATS = [  # hand-written: class 2, 13 and 5 tie at 30 pixels in total; 'file' anywhere in an entry
    {"0": 500, "2": 30, "file": "a/00000_labelTrainIds.png"},
    {"13": 30, "file": "a/00001_labelTrainIds.png", "0": 100, "5": 7},
    {"5": 23, "11": 3, "file": "a/00002_labelTrainIds.png"},
]


def reference_probabilities(stats, temperature):
    """Straightforward: totals in first-appearance order, then classes by count (ties in that order), softmax."""
    totals: dict[int, int] = {}
    for entry in stats:
        for key, n in entry.items():
            if key != "file":
                totals[int(key)] = totals.get(int(key), 0) + n
    classes = [c for count in sorted(set(totals.values())) for c in totals if totals[c] == count]
    total = sum(totals.values())
    logits = np.array([(1 - totals[c] / total) / temperature for c in classes])
    e = np.exp(logits - logits.max())
    return classes, e / e.sum()


@pytest.mark.parametrize("temperature", [0.01, 0.1, 1.0])
def test_probabilities_match_a_reference_and_daformers_formula(temperature):
    classes, p = class_probabilities([dict(e) for e in STATS], temperature)
    ref_classes, ref_p = reference_probabilities(STATS, temperature)
    assert classes == ref_classes == [11, 2, 13, 5, 0]  # ties (30) in order of first appearance
    np.testing.assert_allclose(p, ref_p, rtol=1e-12)
    # DAFormer's get_rcs_class_probs: integer totals as a torch tensor, so float32, and torch.softmax
    totals = torch.tensor([3, 30, 30, 30, 600])
    daformer = torch.softmax((1 - totals / totals.sum()) / temperature, dim=-1)
    assert daformer.dtype == torch.float32
    np.testing.assert_allclose(p, daformer.numpy(), rtol=1e-5, atol=1e-7)
    assert p.dtype == np.float64 and abs(p.sum() - 1) < 1e-12


def test_probabilities_bad_input():
    with pytest.raises(ValueError, match="temperature"):
        class_probabilities(STATS, 0.0)
    with pytest.raises(DatasetError, match="no labelled pixel"):
        class_probabilities([{"file": "x.png"}], 0.01)


def test_class_pixel_counts():
    label = np.array([[0, 0, 255], [18, 3, 3]], np.uint8)
    assert class_pixel_counts(label) == {0: 2, 3: 2, 18: 1}
    assert class_pixel_counts(np.full((2, 2), 255, np.uint8)) == {}


# ------------------------------------------------------------------------------------------------------ sampler
SPEC = RareClassSpec(classes=(11, 2, 13), probabilities=(0.6, 0.3, 0.1), eligible=((0, 3, 5), (1,), (2, 4)),
                     min_pixels=3000, min_crop_ratio=0.5)


def test_sampler_frequencies_follow_p_and_only_eligible_images():
    draws = take(RareClassSampler(SPEC, seed=0), 20000)
    classes = np.array([c for _, _, c in draws])
    for c, p in zip(SPEC.classes, SPEC.probabilities):
        assert abs((classes == c).mean() - p) < 0.02  # ~6 standard deviations at n = 20000
    for c, eligible in zip(SPEC.classes, SPEC.eligible):
        picked = [i for i, _, cc in draws if cc == c]
        assert set(picked) == set(eligible)  # only eligible images, and each of them
        counts = np.bincount(picked, minlength=6)[list(eligible)]
        assert counts.min() > 0.8 * counts.mean()  # uniform among the eligible ones
    assert len({s for _, s, _ in draws}) == len(draws)  # one augmentation seed per sample


def test_sampler_is_a_function_of_seed_and_position():
    a = take(RareClassSampler(SPEC, seed=1), 50)
    assert a == take(RareClassSampler(SPEC, seed=1), 50)
    assert a != take(RareClassSampler(SPEC, seed=2), 50)
    assert a[17] == RareClassSampler(SPEC, seed=1).draw(17)


@pytest.mark.parametrize("start", [0, 1, 5, 13, 40])
def test_sampler_start_continues_the_exact_stream(start):
    full = take(RareClassSampler(SPEC, seed=4, rank=1, world_size=2, batch_size=2), start + 20)
    assert take(RareClassSampler(SPEC, seed=4, rank=1, world_size=2, batch_size=2, start=start), 20) == full[start:]


@pytest.mark.parametrize(("b", "world"), [(2, 2), (3, 2), (1, 3)])
def test_sampler_ranks_partition_the_single_worker_stream(b, world):
    steps = 6
    single = take(RareClassSampler(SPEC, seed=3, batch_size=b * world), steps * b * world)
    ranks = [take(RareClassSampler(SPEC, seed=3, rank=r, world_size=world, batch_size=b), steps * b)
             for r in range(world)]
    for t in range(steps):
        assert single[t * b * world:(t + 1) * b * world] == [x for r in ranks for x in r[t * b:(t + 1) * b]]


def test_spec_and_sampler_bad_arguments():
    with pytest.raises(ValueError, match="same positive number"):
        RareClassSpec(classes=(1,), probabilities=(0.5, 0.5), eligible=((0,),), min_pixels=1, min_crop_ratio=0.5)
    with pytest.raises(ValueError, match="non-empty eligible"):
        RareClassSpec(classes=(1, 2), probabilities=(0.5, 0.5), eligible=((0,), ()), min_pixels=1, min_crop_ratio=0.5)
    with pytest.raises(ValueError, match="rank 2"):
        RareClassSampler(SPEC, seed=0, rank=2, world_size=2)
    assert SPEC.min_crop_pixels == 1500.0
    assert RareClassSpec(**{**SPEC.__dict__, "min_crop_ratio": 0.0}).min_crop_pixels is None


# ------------------------------------------------------------------------------------------------ json files
def test_computed_statistics_are_daformers_files_and_written_to_the_root(tmp_path, capsys):
    labels = make_source(tmp_path)
    ds = build_dataset("gta5", tmp_path, "train", EvalTransform((S, S)))
    spec = build_rcs(ds, tmp_path, temperature=0.5, min_pixels=20, min_crop_ratio=0.5, workers=2, progress=False)
    assert "written to " + str(tmp_path) in capsys.readouterr().out
    written = json.loads((tmp_path / STATS_FILE).read_text())
    want = daformer_stats(labels)
    for w, entry in zip(want, written):
        w["file"] = str(tmp_path / "labels" / Path(entry["file"]).name)  # our "file": the label file read
    assert written == want and list(written[2]) == ["0", "11", "13", "file"]  # ids ascending, "file" last
    assert json.loads((tmp_path / SAMPLES_FILE).read_text()) == daformer_samples(want)
    classes, p = reference_probabilities(want, 0.5)
    bicycle = classes.index(18)  # 4 pixels in one image: no image has more than 20, so it is left out
    assert spec.classes == tuple(c for c in classes if c != 18)
    np.testing.assert_allclose(spec.probabilities, np.delete(p, bicycle) / np.delete(p, bicycle).sum())
    eligible = dict(zip(spec.classes, spec.eligible))
    assert eligible == {11: (2, 5), 13: (1, 2, 4), 0: (0, 1, 2, 3, 5)}
    again = build_rcs(ds, tmp_path, temperature=0.5, min_pixels=20, min_crop_ratio=0.5, progress=False)
    assert again == spec and "read from " + str(tmp_path / STATS_FILE) in capsys.readouterr().out


def test_a_class_without_eligible_images_is_dropped_with_a_warning(tmp_path):
    labels = make_source(tmp_path)
    stats = daformer_stats(labels)
    with pytest.warns(UserWarning, match=r"class 18 \(bicycle\).*left out"):
        spec = rcs_spec_from_stats(stats, None, [Path(f"{i:05d}.png") for i in range(6)], temperature=0.5,
                                   min_pixels=20, min_crop_ratio=0.5)
    assert 18 not in spec.classes and abs(sum(spec.probabilities) - 1) < 1e-12
    with pytest.raises(DatasetError, match="no class has an image with more than 400"), pytest.warns(UserWarning):
        rcs_spec_from_stats(stats, None, [Path(f"{i:05d}.png") for i in range(6)], temperature=0.5,
                            min_pixels=400, min_crop_ratio=0.5)


def test_daformer_files_in_the_root_are_read_and_matched_by_base_name(tmp_path):
    labels = make_source(tmp_path)
    stats = daformer_stats(labels)
    stats[0]["13"] = 5000  # differs from the labels: proves the file is what is used
    samples = daformer_samples(stats)
    samples["13"] = [x for x in samples["13"] if not x[0].endswith("00004_labelTrainIds.png")]
    (tmp_path / STATS_FILE).write_text(json.dumps(stats, indent=2))
    (tmp_path / SAMPLES_FILE).write_text(json.dumps(samples, indent=2))
    ds = build_dataset("gta5", tmp_path, "train", EvalTransform((S, S)))  # 'ids' labels: labels/00000.png
    spec = build_rcs(ds, tmp_path, temperature=0.5, min_pixels=20, min_crop_ratio=0.5, progress=False)
    classes, p = reference_probabilities(stats, 0.5)
    assert spec.classes == tuple(c for c in classes if c != 18)
    eligible = dict(zip(spec.classes, spec.eligible))
    assert eligible[13] == (0, 1, 2)  # samples_with_class.json decides eligibility, as in DAFormer
    assert not (tmp_path / "xdg").exists()
    fresh = compute_class_stats([lab for _, lab in ds.pairs], ds.decode_label, workers=2, progress=False)
    recomputed = daformer_stats(labels)  # recomputation gives DAFormer's counts
    assert [{k: v for k, v in e.items() if k != "file"} for e in fresh] == \
        [{k: v for k, v in e.items() if k != "file"} for e in recomputed]


def test_statistics_that_do_not_match_the_dataset_are_an_error(tmp_path):
    labels = make_source(tmp_path)
    ds = build_dataset("gta5", tmp_path, "train", EvalTransform((S, S)))
    stats = daformer_stats(labels)
    extra = [*stats, {"0": 4, "file": "data/gta/labels/99999_labelTrainIds.png"}]
    (tmp_path / STATS_FILE).write_text(json.dumps(extra))
    with pytest.raises(DatasetError, match=rf"{STATS_FILE} does not match the dataset \(6 labels\): it lists 1 files "
                                           r"the dataset lacks \['99999'\]"):
        build_rcs(ds, tmp_path, progress=False)
    (tmp_path / STATS_FILE).write_text(json.dumps(stats[1:]))
    with pytest.raises(DatasetError, match=r"lacks 1 dataset labels \['00000'\]"):
        build_rcs(ds, tmp_path, progress=False)
    (tmp_path / STATS_FILE).write_text(json.dumps([{"0": "many", "file": "x"}]))
    with pytest.raises(DatasetError, match=rf"{STATS_FILE}: entry 0 .*expected"):
        build_rcs(ds, tmp_path, progress=False)


def _check_cache(tmp_path, ds, capsys):
    spec = build_rcs(ds, tmp_path / "src", min_pixels=20, progress=False)
    out = capsys.readouterr().out
    assert not (tmp_path / "src" / STATS_FILE).exists()
    cached = list((tmp_path / "xdg" / "uda-ray" / "rcs").glob(f"*/{STATS_FILE}"))
    assert len(cached) == 1 and str(cached[0].parent) in out and "not writable" in out
    assert build_rcs(ds, tmp_path / "src", min_pixels=20, progress=False) == spec  # read back from the cache
    assert f"read from {cached[0]}" in capsys.readouterr().out


def test_read_only_root_caches_elsewhere(tmp_path, capsys):
    make_source(tmp_path / "src")
    ds = build_dataset("gta5", tmp_path / "src", "train", EvalTransform((S, S)))
    (tmp_path / "src").chmod(0o555)
    try:
        if os.access(tmp_path / "src", os.W_OK):
            pytest.skip("running as root: chmod does not make the folder read-only")
        _check_cache(tmp_path, ds, capsys)
    finally:
        (tmp_path / "src").chmod(0o755)


def test_unwritable_root_caches_elsewhere(tmp_path, capsys, monkeypatch):
    make_source(tmp_path / "src")
    ds = build_dataset("gta5", tmp_path / "src", "train", EvalTransform((S, S)))
    monkeypatch.setattr(rcs, "_writable", lambda folder: False)  # what os.access says of a read-only folder
    _check_cache(tmp_path, ds, capsys)


def test_no_statistics_and_unreadable_labels_name_the_root(tmp_path):
    make_source(tmp_path)
    pairs = [(img, img.parent.parent / "labels" / f"missing{i}.png")
             for i, img in enumerate(sorted((tmp_path / "images").glob("*.png")))]
    ds = SegmentationDataset(pairs, read_label_ids, EvalTransform((S, S)))
    with pytest.raises(DatasetError, match=rf"RCS: {tmp_path} holds no {STATS_FILE} and its labels cannot be read"):
        build_rcs(ds, tmp_path, progress=False)


# ------------------------------------------------------------------------------------------ loader and dataset
def test_rcs_loader_crops_hold_the_class_and_ranks_equal_one_big_batch(tmp_path):
    make_source(tmp_path)
    tf = TrainTransform((S, S), (8, 8), flip=True, cat_max_ratio=0.75, rcs_min_crop_pixels=10.0)
    ds = build_dataset("gta5", tmp_path, "train", tf, cache_in_memory=True)
    spec = build_rcs(ds, tmp_path, temperature=1.0, min_pixels=20, min_crop_ratio=0.5, progress=False)
    one = build_train_loader(ds, batch_size=4, seed=9, rcs=spec)
    r0 = build_train_loader(ds, batch_size=2, seed=9, rank=0, world_size=2, rcs=spec)
    r1 = build_train_loader(ds, batch_size=2, seed=9, rank=1, world_size=2, rcs=spec)
    keys = take(RareClassSampler(spec, seed=9, batch_size=4), 40)
    held = held_without = 0
    for t in range(10):
        big, a, b = next(one), next(r0), next(r1)
        assert torch.equal(big["image"], torch.cat([a["image"], b["image"]]))
        assert torch.equal(big["label"], torch.cat([a["label"], b["label"]]))
        for j, (index, _, c) in enumerate(keys[4 * t:4 * t + 4]):
            assert int(big["index"][j]) == index
            ok = int((big["label"][j] == c).sum()) > 10
            # the same seed without the requirement: the first draw, which RCS keeps when it passes
            ok_without = int((ds[keys[4 * t + j][:2]]["label"] == c).sum()) > 10
            assert ok or not ok_without
            held, held_without = held + ok, held_without + ok_without
    assert held >= 30 and held > held_without  # some crops of the 5x5 'person' block cannot hold 11 pixels
    resumed = build_train_loader(ds, batch_size=4, seed=9, rcs=spec, start=8 * 4)
    fresh = build_train_loader(ds, batch_size=4, seed=9, rcs=spec)
    for _ in range(8):
        next(fresh)
    assert torch.equal(next(resumed)["label"], next(fresh)["label"])


def test_rcs_loader_refuses_a_transform_without_the_crop_requirement(tmp_path):
    make_source(tmp_path)
    ds = build_dataset("gta5", tmp_path, "train", TrainTransform((S, S), (8, 8), flip=True))
    spec = build_rcs(ds, tmp_path, min_pixels=20, min_crop_ratio=0.5, progress=False)
    with pytest.raises(ValueError, match=r"rcs_min_crop_pixels = None.*min_crop_ratio = 10\.0"):
        build_train_loader(ds, batch_size=2, seed=0, rcs=spec)
    small = SegmentationDataset(ds.pairs[:2], ds.decode_label, ds.transform)
    with pytest.raises(ValueError, match="another dataset"):
        build_train_loader(small, batch_size=2, seed=0, rcs=spec)


def test_dataset_passes_the_class_to_the_transform(tmp_path):
    make_source(tmp_path)
    seen = []

    def transform(image, label, rng, rcs_class=None):
        seen.append(rcs_class)
        return torch.zeros(3, 1, 1), torch.zeros(1, 1, dtype=torch.long)

    ds = build_dataset("gta5", tmp_path, "train", transform)
    ds[(1, 5, 13)], ds[(1, 5)], ds[1]
    assert seen == [13, None, None]
    with pytest.raises(KeyError, match="expected index"):
        ds[(1, 2, 3, 4)]
