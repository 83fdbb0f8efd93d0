"""eval.holdout's cut: by group (city) into two halves as even as whole groups allow, the same for a seed; by image
when every val image is in one group (the built-in synthetic pair), saying so; and a run on the synthetic pair
reports both halves."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import SYNTHETIC, tiny_overrides
from uda_ray.config import load_config
from uda_ray.data.holdout import holdout_basis, holdout_split
from uda_ray.train.loop import fit


def test_cut_by_city_keeps_cities_whole() -> None:
    groups = ["a"] * 5 + ["b"] * 3 + ["c"] * 4
    selection, report = holdout_split(groups, seed=0)
    assert sorted(selection + report) == list(range(12)) and not set(selection) & set(report)
    assert all(len({groups[i] for i in half} & {groups[i] for i in other}) == 0
               for half, other in ((selection, report), (report, selection)))
    assert holdout_split(groups, seed=0) == (selection, report)  # the same cut for every trial
    assert holdout_basis(groups) == "group"


def test_one_group_is_cut_by_image(capsys: pytest.CaptureFixture) -> None:
    groups = ["synthcity"] * 9
    selection, report = holdout_split(groups, seed=3)
    assert (len(selection), len(report)) == (5, 4) and sorted(selection + report) == list(range(9))
    assert holdout_split(groups, seed=3) == (selection, report)
    assert holdout_split(groups, seed=4) != (selection, report)  # seeded
    assert "all in one group ('synthcity')" in capsys.readouterr().out
    assert holdout_basis(groups) == "image"
    with pytest.raises(ValueError, match="need at least 2"):
        holdout_split(["synthcity"], seed=0)


def test_holdout_runs_on_the_synthetic_pair(synthetic_cache: Path, tmp_path: Path) -> None:
    cfg = load_config(SYNTHETIC, tiny_overrides(synthetic_cache, **{"eval.holdout": True, "run.iterations": 2,
                                                                    "run.eval_every": 2, "run.save_images": False}))
    reports: list[dict] = []
    fit(cfg, work_dir=tmp_path, report=lambda m, c: reports.append(dict(m)))
    final = [r for r in reports if "val/miou" in r][-1]
    assert "holdout/miou" in final and 0.0 <= final["holdout/miou"] <= 1.0


def test_report_says_how_the_split_was_cut() -> None:
    import pandas as pd

    from uda_ray.analysis.report import split_note

    synthetic = pd.DataFrame({"config/eval.holdout": [True], "config/data.target": ["synthetic"]})
    assert "cut by image" in split_note(synthetic).text
    cityscapes = pd.DataFrame({"config/eval.holdout": [True], "config/data.target": ["cityscapes"]})
    assert "cut by city" in split_note(cityscapes).text
