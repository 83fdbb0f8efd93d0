"""RCS statistics carry a fingerprint of the labels they describe: read while it matches, computed again when the
labels change (the run says why), DAFormer's fingerprint-less files still read and checked by name."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.data.test_data_rcs import S, daformer_samples, daformer_stats, make_source
from uda_ray.data import rcs
from uda_ray.data.rcs import FINGERPRINT_FILE, SAMPLES_FILE, STATS_FILE, build_rcs, label_fingerprint
from uda_ray.data.readers import build_dataset
from uda_ray.data.transforms import EvalTransform

pytestmark = pytest.mark.filterwarnings("ignore:RCS. no source image:UserWarning")


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


def _build(root: Path):
    ds = build_dataset("gta5", root, "train", EvalTransform((S, S)))
    return build_rcs(ds, root, temperature=0.5, min_pixels=20, min_crop_ratio=0.5, progress=False), ds


def _relabel(root: Path, index: int, value: int) -> None:
    """Rewrite one label with other content (a block of label id ``value``), later than it was written."""
    path = root / "labels" / f"{index:05d}.png"
    ids = np.asarray(Image.open(path)).copy()
    ids[:10, :10] = value
    before = path.stat().st_mtime
    Image.fromarray(ids).save(path)
    os.utime(path, (before + 5, before + 5))  # a rewrite at least a second later, as any real one


def test_fingerprint_written_matched_and_recomputed_when_labels_change(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    make_source(tmp_path)
    first, ds = _build(tmp_path)
    record = json.loads((tmp_path / FINGERPRINT_FILE).read_text())
    assert record["fingerprint"] == label_fingerprint([lab for _, lab in ds.pairs]) and record["labels"] == 6
    assert "written to" in capsys.readouterr().out
    again, _ = _build(tmp_path)
    assert again == first and "read from" in (out := capsys.readouterr().out) and "fingerprint matches" in out
    _relabel(tmp_path, 0, 26)  # car (train id 13) in image 0
    changed, ds = _build(tmp_path)
    out = capsys.readouterr().out
    assert "computed from 6 labels and written to" in out and "the labels changed since" in out
    stats = json.loads((tmp_path / STATS_FILE).read_text())
    assert stats[0]["13"] >= 100  # the new label's counts
    assert json.loads((tmp_path / FINGERPRINT_FILE).read_text())["fingerprint"] == label_fingerprint(
        [lab for _, lab in ds.pairs])
    assert 0 in dict(zip(changed.classes, changed.eligible))[13]  # image 0 is now eligible for car


def test_daformer_files_have_no_fingerprint_and_are_read(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    labels = make_source(tmp_path)
    stats = daformer_stats(labels)
    (tmp_path / STATS_FILE).write_text(json.dumps(stats))
    (tmp_path / SAMPLES_FILE).write_text(json.dumps(daformer_samples(stats)))
    _relabel(tmp_path, 0, 26)  # no fingerprint to notice it: DAFormer's files are the user's to keep
    _build(tmp_path)
    assert "DAFormer's files carry no fingerprint: checked against the dataset's labels by name" in \
        capsys.readouterr().out
    assert json.loads((tmp_path / STATS_FILE).read_text()) == stats and not (tmp_path / FINGERPRINT_FILE).exists()


def test_stale_root_statistics_on_an_unwritable_root_go_to_the_cache(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    make_source(tmp_path / "src")
    _build(tmp_path / "src")
    stale = (tmp_path / "src" / STATS_FILE).read_text()
    _relabel(tmp_path / "src", 1, 24)  # person (train id 11)
    monkeypatch.setattr(rcs, "_writable", lambda folder: False)
    capsys.readouterr()
    fresh, _ = _build(tmp_path / "src")
    assert "written to" in (out := capsys.readouterr().out) and "not writable" in out and "labels changed" in out
    assert (tmp_path / "src" / STATS_FILE).read_text() == stale  # left where it was, passed over
    again, _ = _build(tmp_path / "src")  # the cache's matching statistics are found past the stale root ones
    assert again == fresh and "fingerprint matches" in capsys.readouterr().out
