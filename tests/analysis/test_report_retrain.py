"""A retrained experiment's report shows each retrain: the source trial's score and the retrained mean ± std, with
both iteration counts, marking a comparison across different lengths (no Ray: the retrain folder is written by the
test as ``uda-ray retrain`` writes it)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from uda_ray import config as config_mod
from uda_ray.analysis import analyze
from uda_ray.analysis.report import retrain_folders
from uda_ray.results import store


def _retrain(path: Path, name: str, source: str, iterations: int, values: dict[int, float]) -> None:
    (path / name).mkdir()
    runs = [[source, seed, iterations] for seed in values]
    (path / name / "retrain.json").write_text(json.dumps({"source": str(path), "metric": "val/miou", "mode": "max",
                                                          "runs": runs}))
    for seed, value in values.items():
        cfg = config_mod.apply_overrides(config_mod.Config(), {"run.seed": seed, "run.iterations": iterations})
        reports = [{"iteration": iterations, "val/miou": value}]
        store.write_trial(str(path), store.trial_row(
            experiment=name, trial_id=f"{name.replace('-', '')}{seed}", kind="retrain", status="TERMINATED",
            config=cfg, overrides={}, reports=reports, metric="val/miou", mode="max", seed=seed,
            source_trial_id=source, git_rev="x", versions={"uda_ray": "0"}))


def _search(path: Path) -> None:
    """Three finished search trials (fewer than importance needs: the report stays quick), s1 the best."""
    for tid, value, lr in (("s0", 0.30, 1e-3), ("s1", 0.45, 2e-3), ("s2", 0.35, 3e-3)):
        cfg = config_mod.apply_overrides(config_mod.Config(), {"optim.lr": lr, "run.iterations": 200})
        reports = [{"iteration": 100, "val/miou": value / 2}, {"iteration": 200, "val/miou": value}]
        store.write_trial(str(path.parent), store.trial_row(
            experiment=path.name, trial_id=tid, kind="search", status="TERMINATED", config=cfg,
            overrides={"optim.lr": lr}, reports=reports, metric="val/miou", mode="max", started_at=0.0, ended_at=1.0,
            git_rev="x", versions={"uda_ray": "0"}))
        store.write_metrics(str(path.parent), path.name, tid, reports)


@pytest.fixture(scope="module")
def retrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("results") / "search"
    _search(path)
    _retrain(path, "retrain", "s1", 200, {0: 0.50, 1: 0.52})  # the source's own schedule: a replication
    _retrain(path, "retrain-2", "s1", 100, {0: 0.40, 1: 0.44, 2: 0.42})  # shorter runs
    return path


def test_every_retrain_is_in_the_report(retrained: Path, capsys: pytest.CaptureFixture) -> None:
    assert retrain_folders(str(retrained)) == ["retrain", "retrain-2"]
    tables = analyze(str(retrained))
    first, second = tables["retrain_summary"], tables["retrain-2_summary"]
    assert first.loc[0, "source_iteration"] == 200 and first.loc[0, "iterations"] == 200
    assert bool(first.loc[0, "comparable"]) and not bool(second.loc[0, "comparable"])
    assert second.loc[0, "iterations"] == 100 and second.loc[0, "n"] == 3
    assert math.isclose(first.loc[0, "mean (%)"], 51.0) and math.isclose(second.loc[0, "mean (%)"], 42.0)
    assert first.loc[0, "source_trial_id"] == "s1" and math.isclose(first.loc[0, "source_value (%)"], 45.0)
    report = (retrained / "report" / "report.md").read_text()
    assert "## Retrained configurations (retrain)" in report and "## Retrained configurations (retrain-2)" in report
    assert report.count("comparable = False") == 1
    assert (retrained / "report" / "retrain-2_summary.csv").is_file()
    assert "Retrained configurations (retrain-2)" in capsys.readouterr().out
