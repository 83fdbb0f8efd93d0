"""A label-format mismatch says which data.label_format reads the files that are there (the datasets' own label ids
under label_format: train_ids, DAFormer's *_labelTrainIds.png under label_format: ids)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from tests.data.test_data_readers import make_cityscapes, make_gta5, make_synthia, make_train_ids
from uda_ray.data.readers import DatasetError, cityscapes_pairs, gta5_pairs, synthia_pairs

PAIRS = {"gta5": gta5_pairs, "synthia": synthia_pairs, "cityscapes": lambda r, f: cityscapes_pairs(r, "train", f)}


@pytest.fixture(autouse=True)
def _listings_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


@pytest.mark.parametrize("name", ["gta5", "synthia", "cityscapes"])
def test_ids_there_train_ids_asked(tmp_path: Path, name: str) -> None:
    {"gta5": make_gta5, "synthia": make_synthia, "cityscapes": lambda r: make_cityscapes(r, "train")}[name](tmp_path)
    with pytest.raises(DatasetError, match=r"image has no label \(expected .*_labelTrainIds\.png, "
                                           r"data\.label_format=train_ids\).*is there: these are label ids, which "
                                           r"data\.label_format=ids reads \(or auto\)"):
        PAIRS[name](tmp_path, "train_ids")


@pytest.mark.parametrize("name", ["gta5", "synthia", "cityscapes"])
def test_train_ids_there_ids_asked(tmp_path: Path, name: str) -> None:
    make_train_ids(name, tmp_path)
    with pytest.raises(DatasetError, match=r"data\.label_format=ids\).*_labelTrainIds\.png is there: these are "
                                           r"train ids, which data\.label_format=train_ids reads"):
        PAIRS[name](tmp_path, "ids")


def test_no_labels_at_all_gives_no_hint(tmp_path: Path) -> None:
    make_gta5(tmp_path)
    for p in (tmp_path / "labels").iterdir():
        p.unlink()
    with pytest.raises(DatasetError, match="lack a label$"):
        gta5_pairs(tmp_path, "ids")
