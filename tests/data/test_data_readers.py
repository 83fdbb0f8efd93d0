"""Readers on files written in the published GTA5, Cityscapes and SYNTHIA layouts and in DAFormer's train-id format,
the build-time size check, and every bad-input error."""

import re
import tempfile
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from uda_ray.data.readers import (
    SHOW,
    DatasetError,
    SegmentationDataset,
    build_dataset,
    cityscapes_pairs,
    gta5_pairs,
    label_format_of,
    read_label_ids,
    read_synthia_label_ids,
    synthia_pairs,
)
from uda_ray.data.transforms import EvalTransform, TrainTransform

H, W = 6, 8


@pytest.fixture(autouse=True)
def _listings_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the bad-file listings the errors name go here


def _image(seed: int, h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(array: np.ndarray, path: Path, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "P":  # GTA5 ships palette PNGs whose indices are the label ids
        im = Image.frombytes("P", (array.shape[1], array.shape[0]), array.tobytes())
        im.putpalette(np.random.default_rng(0).integers(0, 256, 768).tolist())
    else:
        im = Image.fromarray(array)
    im.save(path)


def _ids(seed: int, values: list[int]) -> np.ndarray:
    return np.random.default_rng(seed).choice(values, (H, W)).astype(np.uint8)


def make_gta5(root: Path, n: int = 3) -> list[np.ndarray]:
    labels = []
    for i in range(n):
        _save(_image(i), root / "images" / f"{i:05d}.png")
        ids = _ids(i, [7, 8, 26, 33, 0, 1])
        _save(ids, root / "labels" / f"{i:05d}.png", mode="P")
        labels.append(ids)
    return labels


def make_cityscapes(root: Path, split: str, cities=("aachen", "bremen")) -> list[np.ndarray]:
    labels = []
    for j, city in enumerate(cities):
        name = f"{city}_000000_0000{j}9"
        _save(_image(j), root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png")
        ids = _ids(j, [7, 11, 23, 24, 3, 255])
        _save(ids, root / "gtFine" / split / city / f"{name}_gtFine_labelIds.png")
        labels.append(ids)
    return labels


def write_synthia_label(path: Path, r: np.ndarray, g: np.ndarray, b: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.stack([b, g, r], axis=-1).astype(np.uint16))  # OpenCV writes BGR


def make_synthia(root: Path, n: int = 2) -> list[np.ndarray]:
    ids = []
    rng = np.random.default_rng(5)
    for i in range(n):
        _save(_image(i), root / "RGB" / f"{i:07d}.png")
        r = rng.choice([3, 4, 2, 1, 8, 11, 0], (H, W)).astype(np.uint16)
        g = rng.integers(256, 65536, (H, W)).astype(np.uint16)  # instance ids etc.: must not leak into the class
        b = np.full((H, W), 40000, np.uint16)
        write_synthia_label(root / "GT" / "LABELS" / f"{i:07d}.png", r, g, b)
        ids.append(r)
    return ids


def _reference(ids: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    out = np.full(ids.shape, 255, np.int64)
    for r in range(ids.shape[0]):
        for c in range(ids.shape[1]):
            out[r, c] = mapping.get(int(ids[r, c]), 255)
    return out


CS = {7: 0, 8: 1, 11: 2, 23: 10, 24: 11, 26: 13, 33: 18}
SY = {3: 0, 4: 1, 2: 2, 1: 10, 8: 13, 11: 18}


def test_gta5_layout(tmp_path):
    labels = make_gta5(tmp_path)
    pairs = gta5_pairs(tmp_path)
    assert [p[0].name for p in pairs] == ["00000.png", "00001.png", "00002.png"]
    ds = build_dataset("gta5", tmp_path, "train", EvalTransform((H, W)))
    for i in range(3):
        item = ds[i]
        assert item["image"].shape == (3, H, W) and item["image"].dtype.is_floating_point
        assert 0 <= float(item["image"].min()) and float(item["image"].max()) <= 1
        np.testing.assert_array_equal((item["image"] * 255).round().byte().numpy(), _image(i).transpose(2, 0, 1))
        np.testing.assert_array_equal(item["label"].numpy(), _reference(labels[i], CS))
        assert item["index"] == i


def test_cityscapes_layout_both_splits(tmp_path):
    labels = make_cityscapes(tmp_path, "val")
    make_cityscapes(tmp_path, "train", cities=("zurich",))
    pairs = cityscapes_pairs(tmp_path, "val")
    assert [p[1].name for p in pairs] == ["aachen_000000_000009_gtFine_labelIds.png",
                                          "bremen_000000_000019_gtFine_labelIds.png"]
    ds = build_dataset("cityscapes", tmp_path, "val", EvalTransform((H, W)))
    assert len(ds) == 2 and len(build_dataset("cityscapes", tmp_path, "train", EvalTransform((H, W)))) == 1
    for i in range(2):
        np.testing.assert_array_equal(ds[i]["label"].numpy(), _reference(labels[i], CS))


def test_synthia_16_bit_labels_use_the_r_channel(tmp_path):
    ids = make_synthia(tmp_path)
    raw = read_synthia_label_ids(synthia_pairs(tmp_path)[0][1])
    assert raw.dtype == np.uint16
    np.testing.assert_array_equal(raw, ids[0])
    ds = build_dataset("synthia", tmp_path, "train", EvalTransform((H, W)))
    for i in range(2):
        np.testing.assert_array_equal(ds[i]["label"].numpy(), _reference(ids[i], SY))


def test_synthia_ids_above_255_are_not_truncated(tmp_path):
    _save(_image(0), tmp_path / "RGB" / "0000000.png")
    r = np.full((H, W), 3, np.uint16)
    r[0, 0] = 256 + 3  # would read as road if the high byte were lost
    write_synthia_label(tmp_path / "GT" / "LABELS" / "0000000.png", r, r * 7, r * 11)
    ds = build_dataset("synthia", tmp_path, "train", EvalTransform((H, W)))
    with pytest.warns(UserWarning, match=r"0000000\.png.*259"):
        label = ds[0]["label"].numpy()
    assert label[0, 0] == 255 and (label.ravel()[1:] == 0).all()


def test_unknown_ids_warn_once_per_dataset(tmp_path):
    for i in range(3):
        _save(_image(i), tmp_path / "images" / f"{i:05d}.png")
        _save(np.full((H, W), 50 + i, np.uint8), tmp_path / "labels" / f"{i:05d}.png")
    ds = build_dataset("gta5", tmp_path, "train", EvalTransform((H, W)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(3):
            assert (ds[i]["label"] == 255).all()
    msgs = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(msgs) == 1 and "00000.png" in msgs[0] and "[50]" in msgs[0]


def test_cache_in_memory_gives_identical_items(tmp_path):
    make_gta5(tmp_path)
    tf = TrainTransform((H, W), (4, 4), True)
    cached = build_dataset("gta5", tmp_path, "train", tf, cache_in_memory=True)
    plain = build_dataset("gta5", tmp_path, "train", tf)
    first = cached[(1, 7)]
    (tmp_path / "images" / "00001.png").unlink()  # from now on only the memory copy exists
    again = cached[(1, 7)]
    assert (again["image"] == first["image"]).all() and (again["label"] == first["label"]).all()
    with pytest.raises(DatasetError, match="00001.png"):
        plain[(1, 7)]


# ---------------------------------------------------------------------------------------------- bad input
def test_missing_root(tmp_path):
    for name in ("gta5", "cityscapes", "synthia"):
        with pytest.raises(DatasetError, match=str(tmp_path / "nope")):
            build_dataset(name, tmp_path / "nope", "train", EvalTransform((H, W)))


def test_empty_split(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetError, match=r"images.*empty split"):
        gta5_pairs(tmp_path)
    (tmp_path / "leftImg8bit" / "val" / "aachen").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"leftImg8bit/val.*empty split"):
        cityscapes_pairs(tmp_path, "val")
    with pytest.raises(DatasetError, match=r"leftImg8bit/test.*not found"):
        cityscapes_pairs(tmp_path, "test")


def test_image_without_label(tmp_path):
    make_gta5(tmp_path)
    (tmp_path / "labels" / "00001.png").unlink()
    with pytest.raises(DatasetError, match=r"images/00001\.png: image has no label .*labels/00001\.png"):
        gta5_pairs(tmp_path)
    make_synthia(tmp_path / "sy")
    (tmp_path / "sy" / "GT" / "LABELS" / "0000000.png").unlink()
    with pytest.raises(DatasetError, match=r"RGB/0000000\.png: image has no label"):
        synthia_pairs(tmp_path / "sy")


def test_label_size_differs_from_image(tmp_path):
    make_cityscapes(tmp_path, "train")
    bad = tmp_path / "gtFine" / "train" / "bremen" / "bremen_000000_000019_gtFine_labelIds.png"
    _save(np.full((H + 1, W), 7, np.uint8), bad)
    with pytest.raises(DatasetError, match=r"1 of 2 labels differ in size[\s\S]*bremen_000000_000019_gtFine_labelIds"
                                           r"\.png: label 8x7 \(WxH\), image .*bremen.*leftImg8bit\.png 8x6"):
        build_dataset("cityscapes", tmp_path, "train", EvalTransform((H, W)))
    pairs = cityscapes_pairs(tmp_path, "train")  # built without the header check, the read still fails
    ds = SegmentationDataset(pairs, lambda p: np.zeros(Image.open(p).size[::-1], np.uint8), EvalTransform((H, W)))
    ds[0]
    with pytest.raises(DatasetError, match=r"bremen_000000_000019_gtFine_labelIds\.png: label size 8x7"):
        ds[1]


def test_every_size_mismatch_is_named_and_listed_in_a_file(tmp_path):
    n_bad = SHOW + 3
    for i in range(n_bad + 2):
        _save(_image(i), tmp_path / "images" / f"{i:05d}.png")
        _save(np.full((H if i < 2 else H - 1, W), 7, np.uint8), tmp_path / "labels" / f"{i:05d}.png")
    with pytest.raises(DatasetError) as err:
        build_dataset("gta5", tmp_path, "train", EvalTransform((H, W)), check_workers=3)
    msg = str(err.value)
    assert f"{n_bad} of {n_bad + 2} labels differ in size" in msg
    named = re.findall(r"labels/(\d{5})\.png: label", msg)
    assert named == [f"{i:05d}" for i in range(2, 2 + SHOW)]  # the first SHOW, in dataset order
    listing = Path(re.search(r"full list in (\S+?)\)", msg).group(1))
    lines = listing.read_text().splitlines()
    assert [re.search(r"labels/(\d{5})", x).group(1) for x in lines] == [f"{i:05d}" for i in range(2, n_bad + 2)]
    assert listing.parent == tmp_path


def test_resize_labels_resizes_to_the_image_and_warns_once(tmp_path):
    make_gta5(tmp_path, n=3)
    small = np.random.default_rng(1).choice(np.array([7, 26], np.uint8), (H // 2, W // 2))
    _save(small, tmp_path / "labels" / "00001.png")
    _save(small, tmp_path / "labels" / "00002.png")
    with pytest.warns(UserWarning, match="2 of 3 labels differ in size") as caught:
        ds = build_dataset("gta5", tmp_path, "train", EvalTransform((H, W)), resize_labels=True)
    assert len([w for w in caught if "differ in size" in str(w.message)]) == 1
    want = _reference(cv2.resize(small, (W, H), interpolation=cv2.INTER_NEAREST), CS)
    np.testing.assert_array_equal(ds[1]["label"].numpy(), want)
    assert ds[0]["label"].shape == (H, W)


def test_unreadable_files(tmp_path):
    make_gta5(tmp_path)
    (tmp_path / "images" / "00000.png").write_bytes(b"not a png")
    (tmp_path / "labels" / "00001.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DatasetError, match=r"2 image/label files are unreadable[\s\S]*images/00000\.png: unreadable"
                                           r"[\s\S]*labels/00001\.png: unreadable"):
        build_dataset("gta5", tmp_path, "train", EvalTransform((H, W)))
    ds = SegmentationDataset(gta5_pairs(tmp_path), read_label_ids, EvalTransform((H, W)))  # no build-time check
    with pytest.raises(DatasetError, match=r"images/00000\.png: unreadable image"):
        ds[0]
    with pytest.raises(DatasetError, match=r"labels/00001\.png: unreadable label"):
        ds[1]
    make_synthia(tmp_path / "sy")
    (tmp_path / "sy" / "GT" / "LABELS" / "0000001.png").write_bytes(b"garbage")
    sy = SegmentationDataset(synthia_pairs(tmp_path / "sy"), read_synthia_label_ids, EvalTransform((H, W)))
    with pytest.raises(DatasetError, match=r"LABELS/0000001\.png: unreadable label"):
        sy[1]
    with pytest.raises(DatasetError, match=r"LABELS/0000001\.png: unreadable"):
        build_dataset("synthia", tmp_path / "sy", "train", EvalTransform((H, W)))


def test_colour_label_is_rejected(tmp_path):
    make_gta5(tmp_path, n=1)
    _save(_image(9), tmp_path / "labels" / "00000.png")
    with pytest.raises(DatasetError, match=r"labels/00000\.png: label image has mode 'RGB'"):
        build_dataset("gta5", tmp_path, "train", EvalTransform((H, W)))[0]


def test_unknown_dataset_and_split(tmp_path):
    with pytest.raises(DatasetError, match=r"'kitti'.*cityscapes.*gta5.*synthia"):
        build_dataset("kitti", tmp_path, "train", EvalTransform((H, W)))
    make_gta5(tmp_path)
    with pytest.raises(DatasetError, match="one split 'train'"):
        build_dataset("gta5", tmp_path, "val", EvalTransform((H, W)))
    with pytest.raises(DatasetError, match="no"):
        SegmentationDataset([], lambda p: np.zeros((1, 1), np.uint8), EvalTransform((H, W)))


# ------------------------------------------------------------------------------- DAFormer's train-id labels
def _train_ids(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).choice(np.array([0, 1, 10, 13, 18, 255], np.uint8), (H, W))


def make_train_ids(name: str, root: Path, keep_ids: bool = False) -> list[np.ndarray]:
    """Each dataset in its layout with DAFormer's converted ``*_labelTrainIds.png`` labels (and, ``keep_ids``, the
    original label files next to them, as the converters leave them)."""
    labels = {"gta5": make_gta5, "synthia": make_synthia}.get(name, lambda r: make_cityscapes(r, "train"))(root)
    originals = sorted(p for p in root.rglob("*.png") if "images" not in p.parts and "RGB" not in p.parts
                       and "leftImg8bit" not in p.parts)
    out = []
    for i, (orig, _) in enumerate(zip(originals, labels)):
        stem = orig.name[: -len("_labelIds.png")] if orig.name.endswith("_labelIds.png") else orig.stem
        train = _train_ids(i)
        _save(train, orig.with_name(stem + "_labelTrainIds.png"))
        if not keep_ids:
            orig.unlink()
        out.append(train)
    return out


@pytest.mark.parametrize("name", ["gta5", "cityscapes", "synthia"])
@pytest.mark.parametrize("label_format", ["train_ids", "auto"])
def test_train_id_labels_are_read_as_they_are(tmp_path, name, label_format):
    want = make_train_ids(name, tmp_path)
    ds = build_dataset(name, tmp_path, "train", EvalTransform((H, W)), label_format=label_format)
    suffix = {"cityscapes": "_gtFine_labelTrainIds.png"}.get(name, "_labelTrainIds.png")
    assert all(lab.name.endswith(suffix) for _, lab in ds.pairs) and label_format_of(ds.pairs) == "train_ids"
    for i in range(len(ds)):
        np.testing.assert_array_equal(ds[i]["label"].numpy(), want[i])


def test_train_id_paths_are_daformers(tmp_path):
    make_train_ids("gta5", tmp_path / "gta")
    make_train_ids("cityscapes", tmp_path / "cs")
    make_train_ids("synthia", tmp_path / "sy")
    assert str(gta5_pairs(tmp_path / "gta", "train_ids")[0][1]).endswith("gta/labels/00000_labelTrainIds.png")
    assert str(cityscapes_pairs(tmp_path / "cs", "train", "train_ids")[0][1]).endswith(
        "cs/gtFine/train/aachen/aachen_000000_000009_gtFine_labelTrainIds.png")
    assert str(synthia_pairs(tmp_path / "sy", "train_ids")[0][1]).endswith("sy/GT/LABELS/0000000_labelTrainIds.png")


@pytest.mark.parametrize("name", ["gta5", "cityscapes", "synthia"])
def test_auto_detects_ids_and_refuses_both_kinds(tmp_path, name):
    make_train_ids(name, tmp_path / "both", keep_ids=True)
    folder = {"gta5": "labels", "synthia": "GT/LABELS"}.get(name, "gtFine/train")
    with pytest.raises(DatasetError, match=rf"both/{folder}: label_format 'auto' found both"):
        build_dataset(name, tmp_path / "both", "train", EvalTransform((H, W)), label_format="auto")
    for fmt in ("ids", "train_ids"):  # an explicit format picks its files
        ds = build_dataset(name, tmp_path / "both", "train", EvalTransform((H, W)), label_format=fmt)
        assert label_format_of(ds.pairs) == fmt
    {"gta5": make_gta5, "synthia": make_synthia}.get(name, lambda r: make_cityscapes(r, "train"))(tmp_path / "ids")
    ds = build_dataset(name, tmp_path / "ids", "train", EvalTransform((H, W)), label_format="auto")
    assert label_format_of(ds.pairs) == "ids"


def test_format_errors_name_the_path(tmp_path):
    make_gta5(tmp_path)
    with pytest.raises(DatasetError, match=r"images/00000\.png: image has no label \(expected .*labels/"
                                           r"00000_labelTrainIds\.png, data\.label_format=train_ids\)"):
        build_dataset("gta5", tmp_path, "train", EvalTransform((H, W)), label_format="train_ids")
    with pytest.raises(DatasetError, match=r"label_format 'trainids' is unknown"):
        build_dataset("gta5", tmp_path, "train", EvalTransform((H, W)), label_format="trainids")
    (tmp_path / "cs" / "leftImg8bit" / "train" / "x").mkdir(parents=True)
    (tmp_path / "cs" / "gtFine" / "train").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"gtFine/train: label_format 'auto' found no label files"):
        cityscapes_pairs(tmp_path / "cs", "train", "auto")


def test_train_id_values_and_mode_are_checked(tmp_path):
    make_train_ids("gta5", tmp_path)
    bad = _train_ids(0)
    bad[0, :3] = [19, 33, 19]
    _save(bad, tmp_path / "labels" / "00000_labelTrainIds.png")
    _save(np.zeros((H, W), np.uint16) + 300, tmp_path / "labels" / "00001_labelTrainIds.png")
    ds = build_dataset("gta5", tmp_path, "train", EvalTransform((H, W)), label_format="train_ids")
    with pytest.raises(DatasetError, match=r"00000_labelTrainIds\.png: train-id label holds values \[19, 33\]"):
        ds[0]
    with pytest.raises(DatasetError, match=r"00001_labelTrainIds\.png: train-id label has mode 'I;16'"):
        ds[1]
