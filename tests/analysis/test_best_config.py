"""best_trials ranks only finished trials; config_from_row rebuilds the exact Config after a parquet round trip."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from analysis_fixtures import search_value

from uda_ray import config as config_mod
from uda_ray.analysis.best import best_trials, config_from_row
from uda_ray.results import store

STATUSES = ["TERMINATED", "PRUNED", "ERROR", "DIVERGED", "RUNNING", "TERMINATED", "TERMINATED", "TERMINATED"]
VALUES = [0.5, 0.9, 0.95, 0.97, 0.99, 0.7, np.nan, 0.7]


def _table() -> pd.DataFrame:
    return pd.DataFrame({"trial_id": [f"t{i}" for i in (7, 1, 2, 3, 4, 5, 6, 0)], "status": STATUSES,
                         "last/val/miou": VALUES, "last/train/loss": [1.0 - v for v in VALUES]})


def test_best_trials_excludes_unfinished_and_breaks_ties_by_id() -> None:
    top = best_trials(_table(), "val/miou", "max", k=10)
    assert top["trial_id"].tolist() == ["t0", "t5", "t7"]  # 0.7 tie: t0 before t5; NaN and non-finished excluded
    assert top["rank"].tolist() == [1, 2, 3]
    low = best_trials(_table(), "train/loss", "min", k=1)
    assert low["trial_id"].tolist() == ["t0"] and low["last/train/loss"].iloc[0] == pytest.approx(0.3)


def test_best_trials_errors() -> None:
    with pytest.raises(KeyError, match="metrics recorded: \\['train/loss', 'val/miou'\\]"):
        best_trials(_table(), "val/acc", "max", 3)
    with pytest.raises(ValueError, match="mode"):
        best_trials(_table(), "val/miou", "up", 3)


def test_best_search_rows_match_the_fixture_objective(search_dir: str) -> None:
    trials = store.load_trials(search_dir)
    top = best_trials(trials, "val/miou", "max", k=5)
    assert not top["status"].ne("TERMINATED").any() and 0.99 not in top["last/val/miou"].tolist()
    for _, row in top.iterrows():  # the recorded value is the objective of the config the row rebuilds
        cfg = config_from_row(row)
        p = {"loss.cluda.weight": cfg.loss.cluda.weight, "mix.class_ratio": cfg.mix.class_ratio}
        assert row["last/val/miou"] == pytest.approx(search_value(p), abs=1e-12)
        assert cfg.run.iterations == 200


def _non_default() -> config_mod.Config:
    cfg = config_mod.apply_overrides(config_mod.Config(), {
        "data.crop": [48, 80], "data.flip": False, "model.backbone": "resnet34", "model.out_indices": [1, 2, 3],
        "optim.lr": 1.234e-4, "optim.name": "sgd", "run.iterations": 777, "loss.cluda.weight": 0.3,
        "loss.cluda.temperature": 0.07, "teacher.weighting": "pixel", "mix.target_to_source.enabled": True,
    })
    assert cfg != config_mod.Config()
    return cfg


def test_config_from_row_is_exact_after_a_parquet_round_trip(tmp_path: Path) -> None:
    cfg = _non_default()
    for i, c in enumerate([cfg, config_mod.Config()]):
        row = store.trial_row(experiment="e", trial_id=f"t{i}", kind="search", status="TERMINATED", config=c,
                              overrides={}, reports=[], metric="val/miou", mode="max")
        store.write_trial(str(tmp_path), row)
    loaded = store.load_trials(str(tmp_path / "e")).set_index("trial_id", drop=False)
    assert config_from_row(loaded.loc["t0"]) == cfg
    assert config_from_row(loaded.loc["t1"]) == config_mod.Config()
    plain = pd.read_parquet(tmp_path / "e" / "trials").set_index("trial_id", drop=False)
    assert config_from_row(plain.loc["t0"]) == cfg
    assert config_from_row(plain.loc["t0"].to_dict()) == cfg


def test_config_from_row_with_columns_an_older_version_lacked(tmp_path: Path) -> None:
    cfg = _non_default()
    old = store.trial_row(experiment="e", trial_id="old", kind="search", status="TERMINATED", config=cfg,
                          overrides={}, reports=[], metric="val/miou", mode="max")
    del old["config/run.iterations"], old["config/data.crop"]  # written by a version without these keys
    new = store.trial_row(experiment="e", trial_id="new", kind="search", status="TERMINATED", config=cfg,
                          overrides={}, reports=[], metric="val/miou", mode="max")
    store.write_trial(str(tmp_path), old)
    store.write_trial(str(tmp_path), new)
    loaded = store.load_trials(str(tmp_path / "e")).set_index("trial_id", drop=False)
    assert config_from_row(loaded.loc["new"]) == cfg
    defaults = config_mod.Config()
    expected = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, iterations=defaults.run.iterations),
                                   data=dataclasses.replace(cfg.data, crop=defaults.data.crop))
    assert config_from_row(loaded.loc["old"]) == expected  # a null cell takes the default
    # an int column that became float through nulls (numpy pandas without the files' pandas metadata) still
    # rebuilds an int
    table = pd.read_parquet(tmp_path / "e" / "trials").set_index("trial_id", drop=False)
    table["config/run.iterations"] = table["config/run.iterations"].astype("float64")
    row = table.loc["new"]
    assert isinstance(row["config/run.iterations"], float) and config_from_row(row) == cfg


def test_config_from_row_validates() -> None:
    with pytest.raises(config_mod.ConfigError, match="trials row 'x'.*loss.cluda.weight"):
        config_from_row({"trial_id": "x", "config/loss.cluda.weight": -1.0})
    with pytest.raises(config_mod.ConfigError, match="unknown key 'loss.nope'"):
        config_from_row({"trial_id": "x", "config/loss.nope": 1.0})
    with pytest.raises(KeyError, match="no 'config/\\*' columns"):
        config_from_row({"trial_id": "x"})
