"""The synthetic domain pair: deterministic, cached atomically, read by the real readers, every class present."""

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from uda_ray.data import synthetic
from uda_ray.data.labels import CITYSCAPES_ID_TO_TRAIN
from uda_ray.data.readers import build_dataset
from uda_ray.data.synthetic import (
    SOURCE_APPEARANCE,
    TARGET_APPEARANCE,
    blend_appearance,
    ensure_synthetic,
    make_pair,
)
from uda_ray.data.transforms import EvalTransform

SMALL = dict(seed=0, num_source=4, num_target=3, num_val=2, height=32, width=64)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    cache = tmp_path_factory.mktemp("synth")
    start = time.perf_counter()
    src, tgt = ensure_synthetic(cache, seed=1, num_source=40, num_target=40, num_val=10, height=96, width=192)
    return src, tgt, time.perf_counter() - start


def test_layouts_are_the_real_ones(pair):
    src, tgt, _ = pair
    assert len(list((src / "images").glob("*.png"))) == 40 and (src / "labels" / "00039.png").is_file()
    city = tgt / "leftImg8bit" / "val" / synthetic.CITY
    assert len(list(city.glob("*_leftImg8bit.png"))) == 10
    assert len(list((tgt / "gtFine" / "train" / synthetic.CITY).glob("*_gtFine_labelIds.png"))) == 40


def test_labels_are_cityscapes_ids_with_void_ids(pair):
    src, tgt, _ = pair
    src_ids = np.unique(np.concatenate([np.asarray(Image.open(p)).ravel() for p in (src / "labels").glob("*.png")]))
    tgt_ids = np.unique(np.concatenate([np.asarray(Image.open(p)).ravel()
                                        for p in (tgt / "gtFine" / "train").rglob("*.png")]))
    for ids in (src_ids, tgt_ids):
        assert set(ids.tolist()) <= set(CITYSCAPES_ID_TO_TRAIN) | {0, 1, 9}
        assert 7 in ids and 26 in ids  # label ids (road, car), not train ids
    assert 1 in tgt_ids  # ego vehicle at the bottom of target frames, as in Cityscapes
    assert 0 in src_ids  # unlabeled specks, as GTA5 has


def test_real_readers_read_it_and_every_class_appears(pair):
    src, tgt, _ = pair
    seen = {}
    for name, root, split in (("gta5", src, "train"), ("cityscapes", tgt, "train"), ("cityscapes", tgt, "val")):
        ds = build_dataset(name, root, split, EvalTransform((96, 192)))
        counts = np.zeros(256, np.int64)
        for i in range(len(ds)):
            item = ds[i]
            assert item["image"].shape == (3, 96, 192) and item["label"].shape == (96, 192)
            counts += np.bincount(item["label"].numpy().ravel(), minlength=256)
        seen[(name, split)] = counts
    for key in (("gta5", "train"), ("cityscapes", "train")):
        missing = [c for c in range(19) if seen[key][c] == 0]
        assert not missing, f"{key}: classes {missing} never appear"
    road_share = seen[("gta5", "train")][0] / seen[("gta5", "train")][:19].sum()
    assert 0.2 < road_share < 0.6  # street statistics: road is the largest class, not everything


def test_generation_is_fast(pair):
    assert pair[2] < 30.0, f"90 images took {pair[2]:.1f} s"  # ~2-5 s on one free core; loose for shared CI


def test_deterministic_by_seed(tmp_path):
    a_src, a_tgt = ensure_synthetic(tmp_path / "a", **SMALL)
    b_src, b_tgt = ensure_synthetic(tmp_path / "b", **SMALL)
    assert _files(a_src) == _files(b_src) and _files(a_tgt) == _files(b_tgt)
    c_src, c_tgt = ensure_synthetic(tmp_path / "c", **{**SMALL, "seed": 1})
    assert _files(c_src) != _files(a_src) and _files(c_tgt) != _files(a_tgt)


def test_cached_not_regenerated_and_keyed_by_parameters(tmp_path, monkeypatch):
    src, tgt = ensure_synthetic(tmp_path, **SMALL)
    stamp = (src / "images" / "00000.png").stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("regenerated although cached")

    monkeypatch.setattr(synthetic, "_write_all", fail)
    assert ensure_synthetic(tmp_path, **SMALL) == (src, tgt)
    assert (src / "images" / "00000.png").stat().st_mtime_ns == stamp
    with pytest.raises(AssertionError, match="regenerated"):
        ensure_synthetic(tmp_path, **{**SMALL, "shift_strength": 0.5})  # another parameter set: another folder


def test_losing_the_rename_race_uses_the_winner(tmp_path, monkeypatch):
    real = synthetic._write_all
    winner = {}

    def racing(out, params, strength):
        real(out, params, strength)
        final = out.parent / out.name.split(".tmp-")[0].lstrip(".")
        real(final, params, strength)  # another process finishes first
        winner["stamp"] = (final / "params.json").stat().st_mtime_ns

    monkeypatch.setattr(synthetic, "_write_all", racing)
    src, _ = ensure_synthetic(tmp_path, **SMALL)
    assert (src.parent / "params.json").stat().st_mtime_ns == winner["stamp"]
    assert [p.name for p in tmp_path.iterdir()] == [src.parent.name]  # the loser's temporary folder is gone


def test_domains_differ_in_appearance_not_layout():
    img_s, lab_s = make_pair(0, 0, 3, 96, 192)
    cv = synthetic.make_scene(0, 0, 3, 96, 192)
    img_t = synthetic.render(cv, TARGET_APPEARANCE, np.random.default_rng(0))
    assert np.array_equal(cv.label_map(), lab_s)
    assert np.abs(img_s.astype(float) - img_t.astype(float)).mean() > 15
    same = synthetic.render(cv, blend_appearance(SOURCE_APPEARANCE, TARGET_APPEARANCE, 0.0), np.random.default_rng(0))
    src_again = synthetic.render(cv, SOURCE_APPEARANCE, np.random.default_rng(0))
    assert np.array_equal(same, src_again)  # shift_strength 0 is the source look


def test_bad_parameters():
    with pytest.raises(ValueError, match="num_val"):
        ensure_synthetic("/nonexistent", **{**SMALL, "num_val": 0})
