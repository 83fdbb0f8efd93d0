"""The parquet store: atomic writes, typed schemas, URIs and plain paths alike, unified reads, best/last rule
(compaction: test_results_compaction.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from uda_ray import config as config_mod
from uda_ray.results import schema, store

CFG = config_mod.apply_overrides(config_mod.Config(), {"data.crop": [32, 48], "loss.cluda.weight": 0.5,
                                                       "data.flip": False, "run.iterations": 123})
REPORTS = [
    {"iteration": 10, "train/loss": 2.0, "time/iter_s": 0.5},
    {"iteration": 20, "train/loss": 1.5, "val/miou": 0.30, "val/iou/road": 0.7},
    {"iteration": 30, "train/loss": 1.2, "pseudo/keep_frac": 0.4},
    {"iteration": 40, "train/loss": 1.1, "val/miou": 0.25, "val/iou/road": 0.9},
    {"iteration": 50, "train/loss": float("nan"), "val/miou": None, "training_iteration": 5, "hostname": "x"},
]


def _row(trial_id: str = "t0", status: str = "TERMINATED", reports: list[dict] | None = None,
         experiment: str = "exp", **kw: object) -> dict:
    return store.trial_row(experiment=experiment, trial_id=trial_id, kind="search", status=status,
                           config=CFG, overrides={"loss.cluda.weight": 0.5, "data.crop": (32, 48)},
                           reports=REPORTS if reports is None else reports, metric="val/miou", mode="max",
                           started_at=1_700_000_000.0, ended_at=1_700_000_060.5, git_rev="abc",
                           versions={"torch": "9.9"}, **kw)


def test_best_is_the_state_at_the_best_report_and_last_the_latest_value() -> None:
    row = _row()
    # best val/miou at iteration 20 (report 1): every best/* is the latest value reported up to that report
    assert row["best/val/miou"] == 0.30 and row["best/val/iou/road"] == 0.7
    assert row["best/train/loss"] == 1.5 and row["best/time/iter_s"] == 0.5
    assert math.isnan(row["best/pseudo/keep_frac"])  # first reported after the best report
    # last: the most recent reported value; a reported NaN stays NaN, a None is "not reported"
    assert math.isnan(row["last/train/loss"]) and row["last/val/miou"] == 0.25 and row["last/val/iou/road"] == 0.9
    assert row["last/pseudo/keep_frac"] == 0.4
    assert row["iterations"] == 50 and row["wall_s"] == 60.5
    assert "best/training_iteration" not in row and "last/hostname" not in row  # no '/': Tune bookkeeping
    assert json.loads(row["overrides"]) == {"data.crop": [32, 48], "loss.cluda.weight": 0.5}
    min_row = store.trial_row(experiment="e", trial_id="m", kind="train", status="TERMINATED", config=CFG,
                              overrides={}, reports=REPORTS, metric="train/loss", mode="min", git_rev="x", versions={})
    assert min_row["best/train/loss"] == 1.1 and min_row["best/val/miou"] == 0.25  # NaN loss is never "best"


def test_no_finite_metric_gives_nan_best() -> None:
    row = _row(reports=[{"iteration": 1, "train/loss": 3.0}])
    assert math.isnan(row["best/train/loss"]) and row["last/train/loss"] == 3.0


@pytest.mark.parametrize("kw, match", [
    (dict(status="DONE"), "status"),
    (dict(trial_id=".hidden"), "trial id"),
    (dict(trial_id="a/b"), "trial id"),
    (dict(reports=[{"train/loss": 1.0}]), "iteration"),
    (dict(reports=[{"iteration": 1, "val/miou": "high"}]), "val/miou"),
])
def test_bad_rows_are_rejected(kw: dict, match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        _row(**kw)


def test_ablation_and_retrain_rows_need_their_keys() -> None:
    with pytest.raises(ValueError, match="cell and seed"):
        store.trial_row(experiment="e", trial_id="a", kind="ablation", status="RUNNING", config=CFG, overrides={},
                        reports=[], metric="val/miou", mode="max", cell="baseline")
    with pytest.raises(ValueError, match="source_trial_id"):
        store.trial_row(experiment="e", trial_id="r", kind="retrain", status="RUNNING", config=CFG, overrides={},
                        reports=[], metric="val/miou", mode="max", seed=1)


def test_trials_table_is_typed_from_the_config_tree() -> None:
    full = _row("t0")
    partial = {k: v for k, v in _row("t1").items() if k != "config/data.crop"}
    partial["config/loss.cluda.weight"] = None
    table = store.trials_table([full, partial])
    t = table.schema
    assert t.field("config/data.crop").type == pa.list_(pa.int64())
    assert t.field("config/data.flip").type == pa.bool_()
    assert t.field("config/run.iterations").type == pa.int64()
    assert t.field("config/loss.cluda.weight").type == pa.float64()
    assert t.field("config/model.backbone").type == pa.string()
    assert t.field("cell").type == pa.string() and t.field("seed").type == pa.int64()
    assert t.field("started_at").type == pa.timestamp("us", tz="UTC")
    assert all(f.type != pa.null() for f in t)
    assert table.column("config/data.crop").to_pylist() == [[32, 48], None]
    assert table.column("config/loss.cluda.weight").to_pylist() == [0.5, None]
    with pytest.raises(KeyError, match="unknown column"):
        store.trials_table([{**full, "whatever": 1}])
    with pytest.raises(TypeError, match="mixed types"):
        store.trials_table([{**full, "config/new.key": 1}, {**partial, "config/new.key": "a"}])


def test_every_write_goes_through_a_hidden_temporary_name_in_its_folder(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    real = pq.write_table

    def spy(table: pa.Table, where: str, **kw: object) -> None:
        seen.append(where)
        real(table, where, **kw)

    monkeypatch.setattr(pq, "write_table", spy)
    uri = store.write_trial(str(tmp_path), _row())
    trials = tmp_path / "exp" / "trials"
    live, part = (Path(w) for w in seen)  # the trial's live file, then the part a compaction folds it into
    assert live.parent == trials / "_live" and live.name.startswith(".t0.parquet.tmp-")
    assert part.parent == trials and part.name.startswith(".part-00000.parquet.tmp-")
    assert Path(uri) == trials / "part-00000.parquet"
    assert sorted(p.name for p in trials.iterdir()) == ["_live", "part-00000.parquet"]
    assert not list((trials / "_live").iterdir())  # folded, then deleted


def test_failed_write_leaves_old_file_and_no_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = store.write_trial(str(tmp_path), _row())
    before = Path(uri).read_bytes()

    def broken(table: pa.Table, where: str, **kw: object) -> None:
        Path(where).write_bytes(b"PAR1 partial")
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", broken)
    with pytest.raises(OSError, match="disk full"):
        store.write_trial(str(tmp_path), _row(status="ERROR"))
    assert Path(uri).read_bytes() == before
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "exp", "exp/trials", "exp/trials/_live", "exp/trials/part-00000.parquet"]


def test_rewriting_a_trial_overwrites_its_row(tmp_path: Path) -> None:
    store.write_trial(str(tmp_path), _row(status="RUNNING"))
    store.write_metrics(str(tmp_path), "exp", "t0", REPORTS[:2])
    assert store.load_trials(str(tmp_path / "exp"))["status"].tolist() == ["RUNNING"]
    store.write_trial(str(tmp_path), _row(status="TERMINATED"))
    store.write_metrics(str(tmp_path), "exp", "t0", REPORTS)
    trials = store.load_trials(str(tmp_path / "exp"))
    assert trials["status"].tolist() == ["TERMINATED"] and len(trials) == 1
    assert store.load_metrics(str(tmp_path / "exp"))["iteration"].tolist() == [10, 20, 30, 40, 50]


def test_readers_ignore_hidden_temporaries(tmp_path: Path) -> None:
    store.write_trial(str(tmp_path), _row("t0"))
    store.write_trial(str(tmp_path), _row("t1"))
    folder = tmp_path / "exp" / "trials"
    (folder / ".t2.parquet.tmp-0123abcd").write_bytes(b"PAR1 torn write from a crash")
    (folder / "_t3.parquet").write_bytes(b"not parquet")
    assert sorted(store.load_trials(str(tmp_path / "exp"))["trial_id"]) == ["t0", "t1"]
    assert sorted(pd.read_parquet(folder)["trial_id"]) == ["t0", "t1"]
    assert ds.dataset(folder, format="parquet").count_rows() == 2


def test_file_uri_and_plain_path_share_one_code_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    store.write_trial(f"file://{a}", _row())
    store.write_metrics(f"file://{a}", "exp", "t0", REPORTS)
    monkeypatch.chdir(tmp_path)
    store.write_trial("b", _row())  # relative plain path
    store.write_metrics("b", "exp", "t0", REPORTS)
    assert (a / "exp" / "trials" / "part-00000.parquet").exists()
    assert (b / "exp" / "metrics" / "part-00000.parquet").exists()
    for loader in (store.load_trials, store.load_metrics):
        pd.testing.assert_frame_equal(loader(f"file://{a}/exp"), loader(str(b / "exp")))
        pd.testing.assert_frame_equal(loader(str(a / "exp")), loader(f"file://{b}/exp"))
    with pytest.raises(ValueError, match="storage path"):
        store.write_trial("nosuchscheme://x/y", _row())


def test_loaded_columns_keep_their_types(tmp_path: Path) -> None:
    store.write_trial(str(tmp_path), _row())
    df = store.load_trials(str(tmp_path / "exp"))
    assert str(df["config/run.iterations"].dtype) == "Int64" and str(df["config/data.flip"].dtype) == "boolean"
    assert df["config/loss.cluda.weight"].dtype == np.float64
    assert str(df["started_at"].dtype) == "datetime64[us, UTC]"
    assert df.loc[0, "started_at"] == pd.Timestamp(1_700_000_000, unit="s", tz="UTC")
    for col in [c for c in df.columns if df[c].dtype == np.dtype("O")]:
        kinds = {type(v) for v in df[col] if v is not None}
        assert len(kinds) <= 1, (col, kinds)
    assert list(df.loc[0, "config/data.crop"]) == [32, 48]


def test_schemas_are_unified_across_trials(tmp_path: Path) -> None:
    root = str(tmp_path)
    store.write_trial(root, _row("t0", reports=[{"iteration": 1, "val/miou": 0.1, "train/loss": 1.0}]))
    newer = _row("t1", reports=[{"iteration": 1, "val/miou": 0.2, "val/iou/car": 0.5}])
    newer["config/new.key"] = "from a newer version"
    store.write_trial(root, newer)
    store.write_metrics(root, "exp", "t0", [{"iteration": 1, "val/miou": 0.1, "train/loss": 1.0}])
    store.write_metrics(root, "exp", "t1", [{"iteration": 1, "val/miou": 0.2}, {"iteration": 2, "val/iou/car": 0.5}])
    exp = tmp_path / "exp"
    plain = pd.read_parquet(exp / "trials").set_index("trial_id")
    for trials in (store.load_trials(str(exp)).set_index("trial_id"), plain):
        assert math.isnan(trials.loc["t1", "best/train/loss"]) and trials.loc["t0", "best/train/loss"] == 1.0
        assert math.isnan(trials.loc["t0", "best/val/iou/car"]) and trials.loc["t1", "best/val/iou/car"] == 0.5
        assert pd.isna(trials.loc["t0", "config/new.key"])
        assert trials.loc["t1", "config/new.key"] == "from a newer version"
    m = store.load_metrics(str(exp))
    assert list(m.columns) == ["experiment", "trial_id", "iteration", "train/loss", "val/iou/car", "val/miou"]
    expected = [[1.0, np.nan, 0.1], [np.nan, np.nan, 0.2], [np.nan, 0.5, np.nan]]
    np.testing.assert_array_equal(m[["train/loss", "val/iou/car", "val/miou"]].to_numpy(), expected)


def test_plain_read_parquet_matches_for_the_common_case(tmp_path: Path) -> None:
    for i in range(3):
        store.write_trial(str(tmp_path), _row(f"t{i}"))
        store.write_metrics(str(tmp_path), "exp", f"t{i}", REPORTS)
    exp = tmp_path / "exp"
    plain = pd.read_parquet(exp / "trials").sort_values("trial_id").reset_index(drop=True)
    ours = store.load_trials(str(exp))
    assert list(plain.columns) == list(ours.columns)
    pd.testing.assert_frame_equal(plain.drop(columns=["config/data.crop", "config/data.source_resize",
                                                      "config/data.target_resize", "config/data.val_resize",
                                                      "config/model.out_indices"]),
                                  ours.drop(columns=["config/data.crop", "config/data.source_resize",
                                                     "config/data.target_resize", "config/data.val_resize",
                                                     "config/model.out_indices"]), check_dtype=False)
    m_plain = pd.read_parquet(exp / "metrics").sort_values(["trial_id", "iteration"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(m_plain, store.load_metrics(str(exp)), check_dtype=False)


def test_missing_and_empty_folders(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="trials"):
        store.load_trials(str(tmp_path / "nope"))
    (tmp_path / "exp" / "trials").mkdir(parents=True)
    (tmp_path / "exp" / "metrics").mkdir(parents=True)
    assert store.load_trials(str(tmp_path / "exp")).empty
    assert list(store.load_metrics(str(tmp_path / "exp")).columns) == list(schema.METRICS_COLUMNS)
