"""ResultsCallback without Ray: rows and reports written as results arrive, progress lines, and the live files
compacted into the parts as results arrive (throttled) and at the end of the experiment."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from ray import cloudpickle

from tests.conftest import SYNTHETIC, tiny_overrides
from uda_ray.config import load_config
from uda_ray.results.store import TableFolder, load_metrics, load_trials
from uda_ray.tune.callback import COMPACT_SHARE, ResultsCallback, TrialInfo


def _callback(root: Path, cache: Path, **options) -> ResultsCallback:
    cfg = load_config(SYNTHETIC, tiny_overrides(cache))  # run.iterations 6
    return ResultsCallback(root=str(root), experiment="exp", kind="search", metric="val/miou", mode="max",
                           trial_info=lambda c: TrialInfo(config=cfg, overrides={"optim.lr": c["lr"]}), **options)


def _run_trial(cb: ResultsCallback, trial_id: str, mious: list[float], last_iteration: int) -> None:
    trial = SimpleNamespace(trial_id=trial_id, config={"lr": 0.01}, error_file=None)
    cb.on_trial_start(0, [], trial)
    for i, miou in enumerate(mious, start=1):
        cb.on_trial_result(0, [], trial, {"iteration": 3 * i, "train/loss": 1.0 / i, "val/miou": miou})
    if last_iteration > 3 * len(mious):
        cb.on_trial_result(0, [], trial, {"iteration": last_iteration, "train/loss": 0.1})
    cb.on_trial_complete(0, [], trial)


def test_rows_progress_and_compaction(tmp_path: Path, capsys: pytest.CaptureFixture):
    root = tmp_path / "results"
    cb = _callback(root, tmp_path / "cache", compact_every_s=3600.0)
    _run_trial(cb, "a", [0.1, 0.2], 6)
    _run_trial(cb, "b", [0.3], 3)
    out = [ln for ln in capsys.readouterr().out.splitlines()]
    # the best so far is the best finished trial's score (its last evaluation), the number the search ends with: a
    # pruned trial's early value does not count
    assert out == [
        '[uda-ray] a started: {"optim.lr": 0.01}',
        "[uda-ray] a iteration 3: val/miou 10.00%",
        "[uda-ray] a iteration 6: val/miou 20.00%",
        "[uda-ray] a TERMINATED at iteration 6  (best finished so far val/miou 20.00%, trial a)",
        "[uda-ray] trials: 1 TERMINATED",
        '[uda-ray] b started: {"optim.lr": 0.01}',
        "[uda-ray] b iteration 3: val/miou 30.00%  (best finished so far val/miou 20.00%, trial a)",
        "[uda-ray] b PRUNED at iteration 3  (best finished so far val/miou 20.00%, trial a)",
        "[uda-ray] trials: 1 TERMINATED, 1 PRUNED",
    ]
    # throttled: only live files while the search runs (load_trials reads them); the end of the experiment compacts
    exp = root / "exp"
    assert not list(exp.glob("*/*.parquet")) and len(list(exp.glob("*/_live/*.parquet"))) == 4
    trials = load_trials(str(exp)).set_index("trial_id")
    assert trials.loc["a", "status"] == "TERMINATED" and trials.loc["b", "status"] == "PRUNED"
    cb.on_experiment_end([])
    assert sorted(str(p.relative_to(exp)) for p in exp.glob("*/*.parquet")) == ["metrics/part-00000.parquet",
                                                                                "trials/part-00000.parquet"]
    assert not list(exp.glob("*/_live/*.parquet"))
    plain = pd.read_parquet(exp / "trials").set_index("trial_id")
    assert plain.loc["a", "status"] == "TERMINATED" and plain.loc["b", "status"] == "PRUNED"
    assert plain.loc["a", "best/val/miou"] == pytest.approx(0.2)
    assert len(pd.read_parquet(exp / "metrics")) == len(load_metrics(str(exp))) == 3


def test_compacted_as_results_arrive_and_after_a_resume(tmp_path: Path):
    root = tmp_path / "results"
    cb = _callback(root, tmp_path / "cache", compact_every_s=0.0, progress=False)
    _run_trial(cb, "a", [0.1, 0.2], 6)
    part = root / "exp" / "trials" / "part-00000.parquet"
    assert pd.read_parquet(part)["status"].tolist() == ["TERMINATED"]
    # Tune pickles callbacks with the experiment state; a restored one reads the stored parts again
    restored = cloudpickle.loads(cloudpickle.dumps(_callback(root, tmp_path / "cache", progress=False,
                                                             compact_every_s=0.0)))
    restored._compacted_at = float("-inf")
    trial = SimpleNamespace(trial_id="a", config={"lr": 0.01}, error_file=None)
    restored.on_trial_result(0, [], trial, {"iteration": 6, "train/loss": 0.5, "val/miou": 0.25})  # a's retry
    _run_trial(restored, "b", [0.3], 6)
    plain = pd.read_parquet(root / "exp" / "trials").set_index("trial_id")
    assert plain.index.tolist() == ["a", "b"] and plain.loc["a", "last/val/miou"] == pytest.approx(0.25)
    metrics = pd.read_parquet(root / "exp" / "metrics")
    assert metrics.groupby("trial_id")["iteration"].apply(list).to_dict() == {"a": [3, 6], "b": [3, 6]}
    assert len(load_trials(str(root / "exp"))) == 2


def test_status_counts_say_pruned_where_tune_says_terminated(tmp_path: Path, capsys: pytest.CaptureFixture):
    """uda-ray's status lines replace Tune's live table: a trial ASHA stopped is counted PRUNED (Tune's own status
    for it is TERMINATED); trials that have not ended keep Tune's status."""
    cb = _callback(tmp_path / "results", tmp_path / "cache", compact_every_s=3600.0)
    _run_trial(cb, "a", [0.1, 0.2], 6)
    _run_trial(cb, "b", [0.3], 3)
    capsys.readouterr()
    tune_view = [SimpleNamespace(trial_id=t, status=s) for t, s in
                 (("a", "TERMINATED"), ("b", "TERMINATED"), ("c", "RUNNING"), ("d", "PENDING"), ("e", "PENDING"))]
    cb._say_counts(tune_view)
    assert capsys.readouterr().out == "[uda-ray] trials: 1 TERMINATED, 1 PRUNED, 1 RUNNING, 2 PENDING\n"


def test_tune_runs_without_its_live_table(tmp_path: Path, synthetic_cache: Path, monkeypatch: pytest.MonkeyPatch):
    """The driver asks Tune for no output of its own (verbose=0): the callback's lines are the status."""
    from uda_ray.train.worker import Scaling
    from uda_ray.tune import driver

    seen = {}

    class Tuner:
        def __init__(self, trainable, *, param_space, tune_config, run_config):
            seen["run_config"] = run_config

        def fit(self):
            return None

    monkeypatch.setattr(driver.tune, "Tuner", Tuner)
    cfg = load_config(SYNTHETIC, tiny_overrides(synthetic_cache))
    spec = driver.ExperimentSpec(experiment=driver.Experiment(str(tmp_path), "e"), kind="search", metric="val/miou",
                                 mode="max", config_of=lambda c: cfg,
                                 trial_info=lambda c: TrialInfo(config=cfg, overrides={}), scaling=Scaling())
    driver.run_experiment(spec)
    assert seen["run_config"].verbose == 0
    assert isinstance(seen["run_config"].callbacks[0], ResultsCallback)


def test_reports_reach_storage_by_the_next_checkpoint_or_compaction(tmp_path: Path):
    """A running trial's reports wait for the next compaction (the driver answers each report before the trial goes
    on), except that everything up to a checkpoint is on storage before Tune records it: a resumed search runs the
    trial again from there, so a killed driver loses only reports that come back."""
    root = tmp_path / "results"
    cb = _callback(root, tmp_path / "cache", compact_every_s=3600.0, progress=False)
    exp = str(root / "exp")
    trial = SimpleNamespace(trial_id="a", config={"lr": 0.01}, error_file=None, last_result={})
    cb.on_trial_start(0, [], trial)
    assert load_trials(exp)["status"].tolist() == ["RUNNING"]
    cb.on_trial_result(0, [], trial, {"iteration": 1, "train/loss": 1.0})
    cb.on_trial_result(0, [], trial, {"iteration": 2, "train/loss": 0.9})
    assert not (root / "exp" / "metrics").exists() and load_metrics(exp).empty
    # Tune saves its checkpoint from this result, then tells on_checkpoint
    result = {"iteration": 3, "train/loss": 0.8, "val/miou": 0.3, "should_checkpoint": True}
    cb.on_trial_result(0, [], trial, result)
    assert load_metrics(exp)["iteration"].tolist() == [1, 2, 3]
    trial.last_result = result
    cb.on_checkpoint(0, [], trial, SimpleNamespace(path="/ckpt/3"))
    row = load_trials(exp).iloc[0]
    assert row["checkpoint"] == "/ckpt/3" and row["best/val/miou"] == pytest.approx(0.3)
    # a Train run's checkpoint comes with its result: reports and row at once
    cb.on_trial_result(0, [], trial, {"iteration": 4, "train/loss": 0.7})
    cb.on_trial_result(0, [], trial, {"iteration": 5, "train/loss": 0.6, "val/miou": 0.4, "checkpoint_path": "/t/5"})
    row = load_trials(exp).iloc[0]
    assert load_metrics(exp)["iteration"].tolist() == [1, 2, 3, 4, 5] and row["checkpoint"] == "/t/5"
    # without a checkpoint, the next compaction writes them
    cb.on_trial_result(0, [], trial, {"iteration": 6, "train/loss": 0.5})
    assert load_metrics(exp)["iteration"].max() == 5 and load_trials(exp).iloc[0]["last/train/loss"] == 0.6
    cb.compact_every_s = 0.0
    cb.on_trial_result(0, [], trial, {"iteration": 7, "train/loss": 0.4})
    assert load_metrics(exp)["iteration"].max() == 7 and load_trials(exp).iloc[0]["last/train/loss"] == 0.4


def test_a_slow_compaction_spaces_the_next_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Every result waits while the driver compacts: after a compaction that took long the next one waits longer,
    so that compactions take at most COMPACT_SHARE of the driver's time."""
    root = tmp_path / "results"
    cb = _callback(root, tmp_path / "cache", compact_every_s=0.001, progress=False)
    quick = TableFolder.compact

    def slow(self: TableFolder) -> list[str]:
        time.sleep(0.05)
        return quick(self)

    monkeypatch.setattr(TableFolder, "compact", slow)

    def in_parts() -> list[str]:
        return sorted(set(pd.read_parquet(root / "exp" / "trials")["trial_id"]))

    time.sleep(0.01)
    _run_trial(cb, "a", [0.1], 3)  # its first result compacts: 0.1 s for the two tables
    assert in_parts() == ["a"]
    time.sleep(0.01)  # past compact_every_s, far short of 0.1 s / COMPACT_SHARE
    _run_trial(cb, "b", [0.2], 3)
    assert in_parts() == ["a"] and sorted(load_trials(str(root / "exp"))["trial_id"]) == ["a", "b"]
    assert 0.1 / COMPACT_SHARE > 1.0
    cb.on_experiment_end([])
    assert in_parts() == ["a", "b"]


def test_an_ended_trial_is_held_as_its_status_only(tmp_path: Path, capsys: pytest.CaptureFixture):
    """Every report of every trial stays on storage, not in the driver: a search of 10,000 trials of 200 reports
    would otherwise hold them all. The status lines still count every trial."""
    root = tmp_path / "results"
    cb = _callback(root, tmp_path / "cache", compact_every_s=3600.0)
    _run_trial(cb, "a", [0.1, 0.2], 6)
    _run_trial(cb, "b", [0.3], 3)
    trial = SimpleNamespace(trial_id="c", config={"lr": 0.01}, error_file=None)
    cb.on_trial_start(0, [], trial)
    assert list(cb._trials) == ["c"]
    cb.on_trial_result(0, [], trial, {"iteration": 3, "train/loss": 0.5, "val/miou": 0.4})
    cb.on_trial_complete(0, [SimpleNamespace(trial_id=t, status="TERMINATED") for t in "abc"], trial)
    assert not cb._trials
    assert capsys.readouterr().out.splitlines()[-1] == "[uda-ray] trials: 1 TERMINATED, 2 PRUNED"
    trials = load_trials(str(root / "exp")).set_index("trial_id")
    assert trials["status"].to_dict() == {"a": "TERMINATED", "b": "PRUNED", "c": "PRUNED"}
    assert load_metrics(str(root / "exp")).groupby("trial_id").size().to_dict() == {"a": 2, "b": 1, "c": 1}
