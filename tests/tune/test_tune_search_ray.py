"""`uda-ray tune` on a real local Ray: parquet rows ↔ reports ↔ Optuna study, ASHA pruning, failures, resume.
A driver killed with kill -9 and resumed is tested on a search over a chain (tests/stages/test_stages_search_ray.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml

from tests.conftest import SYNTHETIC, tiny_overrides
from uda_ray.results.store import load_metrics, load_trials
from uda_ray.train.run_eval import evaluate_checkpoint
from uda_ray.tune.search import load_study, run_search

pytestmark = pytest.mark.ray



def write_space(path: Path, cache: Path, *, params: dict, num_samples: int, scheduler: dict | None = None,
                max_concurrent: int = 1, metric: str = "val/miou", mode: str = "max", sampler: str = "random",
                overrides: dict | None = None, experiment: str = "t") -> Path:
    space = {
        "experiment": experiment,
        "base": {"config": str(SYNTHETIC), "overrides": tiny_overrides(cache, **(overrides or {}))},
        "metric": metric, "mode": mode, "sampler": {"type": sampler, "seed": 0},
        "num_samples": num_samples, "max_concurrent": max_concurrent,
        "scheduler": scheduler or {"type": "none"},
        "resources": {"workers": 0, "cpus_per_worker": 1},
        "params": params,
    }
    path.write_text(f"# uda-ray tune {path}\n" + yaml.safe_dump(space, sort_keys=False))
    return path


def test_three_trials_rows_reports_and_study(ray_local, tmp_path: Path, synthetic_cache: Path,
                                             capsys: pytest.CaptureFixture):
    space = write_space(tmp_path / "s.yaml", synthetic_cache, num_samples=3, max_concurrent=2,
                        params={"teacher.pseudo_threshold": {"uniform": [0.3, 0.9]},
                                "optim.lr": {"loguniform": [1.0e-4, 1.0e-2]}})
    out = run_search(space, storage=str(tmp_path / "results"))
    printed = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[uda-ray] ")]
    trials, metrics = load_trials(out.experiment.uri), load_metrics(out.experiment.uri)
    assert len(trials) == 3 and set(trials["status"]) == {"TERMINATED"}
    assert pd.read_parquet(Path(out.experiment.uri) / "trials").shape[0] == 3  # plain pandas reads it too
    # one metrics row per report: log_every 1 over 6 iterations
    assert metrics.groupby("trial_id")["iteration"].apply(list).tolist() == [[1, 2, 3, 4, 5, 6]] * 3
    assert (trials["iterations"] == 6).all()
    for _, row in trials.iterrows():
        sampled = json.loads(row["overrides"])
        assert row["config/teacher.pseudo_threshold"] == pytest.approx(sampled["teacher.pseudo_threshold"])
        m = metrics[metrics["trial_id"] == row["trial_id"]]
        assert row["best/val/miou"] == pytest.approx(m["val/miou"].max())  # the peak, kept for reference
        assert row["score"] == row["last/val/miou"] == m["val/miou"].dropna().iloc[-1]  # the last evaluation
        assert row["score_iteration"] == 6
        assert row["last/train/loss"] == pytest.approx(m["train/loss"].iloc[-1])
        assert row["git_rev"] and row["versions/torch"]
    # the study and the table agree trial by trial: joined on trial_id, same state, same value, same best
    study = load_study(out.study_storage)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3
    by_id = {t.user_attrs["trial_id"]: t for t in study.trials}
    assert all(t.user_attrs["experiment"] == out.experiment.name for t in study.trials)
    for _, row in trials.iterrows():
        assert by_id[row["trial_id"]].value == row["score"]
        assert by_id[row["trial_id"]].intermediate_values == {3: m_at(metrics, row["trial_id"], 3),
                                                              6: row["score"]}
    assert (Path(out.experiment.uri) / "search_space.yaml").read_text() == space.read_text()
    assert out.best is not None and out.best["score"] == trials["score"].max()
    assert study.best_trial.user_attrs["trial_id"] == out.best["trial_id"]
    # the checkpoint behind the score gives the score again
    again = evaluate_checkpoint(out.best["checkpoint"])
    assert again.iteration == 6 and again.metrics["val/miou"] == out.best["score"]
    # the prediction grids of every evaluation, beside the trial's Tune folder
    grids = sorted(p.name for p in (Path(out.experiment.uri) / f"trial_{out.best['trial_id']}" / "images").iterdir())
    assert grids == ["iter_0000003.png", "iter_0000006.png"]
    # uda-ray's status lines (Tune's own table is off): one line per started trial, per evaluation (iterations 3
    # and 6) and per finished trial, the last naming the best trial, then the count of trials by status
    for trial_id in trials["trial_id"]:
        mine = [ln.split("  (")[0] for ln in printed if ln.startswith(f"[uda-ray] {trial_id} ")]
        assert mine[0].startswith(f"[uda-ray] {trial_id} started: {{")
        assert [ln.split(":")[0] for ln in mine[1:3]] == [f"[uda-ray] {trial_id} iteration {i}" for i in (3, 6)]
        assert mine[3] == f"[uda-ray] {trial_id} TERMINATED at iteration 6"
    ended = [ln for ln in printed if " TERMINATED at iteration " in ln]
    assert ended[-1].endswith(f"(best finished so far val/miou {100 * trials['score'].max():.2f}%, "
                              f"trial {out.best['trial_id']})")
    assert printed[-1] == "[uda-ray] trials: 3 TERMINATED"


def test_curves_go_to_tensorboard_and_mlflow(ray_local, tmp_path: Path, synthetic_cache: Path,
                                             monkeypatch: pytest.MonkeyPatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    space = write_space(tmp_path / "s.yaml", synthetic_cache, num_samples=2, max_concurrent=2,
                        params={"teacher.pseudo_threshold": {"uniform": [0.3, 0.9]}})
    data = yaml.safe_load(space.read_text())
    data["loggers"] = ["mlflow"]
    space.write_text(f"# uda-ray tune {space}\n" + yaml.safe_dump(data, sort_keys=False))
    out = run_search(space, storage=str(tmp_path / "results"))
    exp = Path(out.experiment.uri)
    # TensorBoard: Tune's logger writes every trial's results beside it (tensorboard --logdir <experiment>)
    assert len({p.parent for p in exp.rglob("events.out.tfevents.*")}) == 2
    # MLflow: one run per trial in the experiment named after the search, with the evaluations as metric history
    client = mlflow.tracking.MlflowClient(f"sqlite:///{exp / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(out.experiment.name).experiment_id])
    assert len(runs) == 2
    trials = load_trials(out.experiment.uri)
    logged = sorted(h.value for r in runs for h in client.get_metric_history(r.info.run_id, "val/miou")
                    if h.step == 6)
    assert logged == pytest.approx(sorted(trials["score"]), rel=1e-6)


def m_at(metrics: pd.DataFrame, trial_id: str, iteration: int) -> float:
    return float(metrics[(metrics["trial_id"] == trial_id) & (metrics["iteration"] == iteration)]["val/miou"].iloc[0])


ASHA_SPACE = dict(num_samples=6, metric="train/loss", mode="min",
                  scheduler={"type": "asha", "grace_period": 3, "max_t": 9, "reduction_factor": 2},
                  params={"loss.source_weight": {"choice": [0.1, 50.0]}},
                  overrides={"run.iterations": 9, "run.eval_every": 3, "run.checkpoint_every": 3,
                             "run.log_every": 3})


def _decisions(uri: str) -> list[tuple[float, str, int]]:
    """(sampled source weight, status, iterations) of each trial in the order they started."""
    t = load_trials(uri).sort_values("started_at")
    return list(zip(t["config/loss.source_weight"], t["status"], t["iterations"]))


@pytest.fixture(scope="module")
def asha_search(ray_local, tmp_path_factory: pytest.TempPathFactory, synthetic_cache: Path):
    """The uninterrupted ASHA search of ASHA_SPACE: its space file and outcome, read by the tests below."""
    folder = tmp_path_factory.mktemp("asha")
    space = write_space(folder / "s.yaml", synthetic_cache, **ASHA_SPACE)
    return space, run_search(space, storage=str(folder / "whole"))


def test_asha_prunes_and_later_trials_still_run(asha_search):
    # train/loss scales with loss.source_weight, so trials with weight 50 are far worse than those with 0.1:
    # ASHA must stop them at its first rung, and the trials after them must still start
    _, out = asha_search
    trials = load_trials(out.experiment.uri).sort_values("started_at")
    assert len(trials) == 6
    pruned = trials[trials["status"] == "PRUNED"]
    assert len(pruned) >= 1 and (pruned["iterations"] < 9).all()
    assert (pruned["config/loss.source_weight"] == 50.0).all()
    assert (trials["started_at"] > pruned["started_at"].min()).any()  # trials started after a pruned one
    study = load_study(out.study_storage)
    states = [t.state.name for t in study.trials]
    assert states.count("PRUNED") == len(pruned) and states.count("COMPLETE") == 6 - len(pruned)
    # a pruned trial told Optuna the evaluation it was stopped on: its last intermediate value is its score
    by_id = {t.user_attrs["trial_id"]: t for t in study.trials}
    for _, row in trials.iterrows():
        t = by_id[row["trial_id"]]
        assert t.value == pytest.approx(row["score"], rel=1e-12)
        if row["status"] == "PRUNED":
            assert t.state.name == "PRUNED" and t.last_step == row["score_iteration"] == row["iterations"]
            assert t.intermediate_values[t.last_step] == pytest.approx(row["score"], rel=1e-12)


def test_failed_and_diverged_trials_are_recorded_and_search_goes_on(ray_local, tmp_path: Path,
                                                                   synthetic_cache: Path):
    bad = tmp_path / "not_a_checkpoint.pth"
    bad.write_bytes(b"not a state dict")
    space = write_space(tmp_path / "s.yaml", synthetic_cache, num_samples=4, sampler="tpe", max_concurrent=2,
                        overrides={"optim.name": "sgd", "optim.momentum": 0.0, "optim.warmup_iters": 0},
                        params={"model.pretrained_path": {"choice": ["", str(bad)]},
                                "optim.lr": {"choice": [1.0e-3, 1.0e12]}})
    data = yaml.safe_load(space.read_text())
    data["max_failures"] = 2  # a checkpoint error is not retried all the same
    space.write_text(yaml.safe_dump(data))
    out = run_search(space, storage=str(tmp_path / "results"))
    trials = load_trials(out.experiment.uri)
    assert len(trials) == 4
    for _, row in trials.iterrows():
        if row["config/model.pretrained_path"]:
            assert row["status"] == "ERROR" and "not_a_checkpoint.pth" in row["error"], row["error"]
        elif row["config/optim.lr"] > 1:
            assert row["status"] == "DIVERGED" and "Diverged at iteration" in row["error"]
        else:
            assert row["status"] == "TERMINATED" and pd.isna(row["error"])  # null, not ""
    from ray.tune import ExperimentAnalysis

    attempts = {t.trial_id: t.run_metadata.num_failures for t in ExperimentAnalysis(out.experiment.uri).trials}
    for _, row in trials[trials["status"] == "ERROR"].iterrows():
        assert attempts[row["trial_id"]] == 1, "a checkpoint error was retried"
    assert (trials["status"] == "ERROR").any() and (trials["status"] == "TERMINATED").any()
    study = load_study(out.study_storage)
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(failed) == (trials["status"] != "TERMINATED").sum()
    assert all(t.user_attrs["fail_reason"] for t in failed)


def _cli(*args: str, cwd: Path, records: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", UDA_RAY_LOCAL_RAY_RECORDS=str(records))
    return subprocess.Popen([sys.executable, "-m", "uda_ray.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(trials_dir: Path, status: str, count: int, timeout: float = 240) -> None:
    """Until ``count`` trials of the experiment holding ``trials_dir`` have ``status``, read as a user reads a running
    search (``load_trials``: the compacted parts and the trials' live files, each through one open handle)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if trials_dir.exists():
            trials = load_trials(str(trials_dir.parent))
            if not trials.empty and int((trials["status"] == status).sum()) >= count:
                return
        time.sleep(0.3)
    raise AssertionError(f"{count} {status} trials did not appear in {trials_dir} within {timeout} s")


def test_sigint_then_resume_is_the_same_search(asha_search, tmp_path: Path):
    """One trial at a time (a fixed arrival order): a search interrupted by SIGINT and resumed with
    `uda-ray tune --resume` samples and stops exactly the trials an uninterrupted one does: ASHA's rungs survive."""
    space, whole = asha_search
    expected = _decisions(whole.experiment.uri)
    assert any(s == "PRUNED" for _, s, _ in expected) and any(s == "TERMINATED" for _, s, _ in expected)

    results, records = tmp_path / "results", tmp_path / "records"
    proc = _cli("tune", str(space), "--storage", str(results), "--name", "r", cwd=tmp_path, records=records)
    _wait_for(results / "r" / "trials", "PRUNED", 1)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-3000:]
    assert f"uda-ray tune {space} --storage {results} --name r --resume" in out
    assert "Tuner.restore" not in out  # Ray's own advice is replaced by the command that works
    before = load_trials(str(results / "r")).set_index("trial_id")
    assert len(before) < 6

    resumed = _cli("tune", str(space), "--storage", str(results), "--name", "r", "--resume", cwd=tmp_path,
                   records=records)
    out, _ = resumed.communicate(timeout=400)
    assert resumed.returncode == 0, out[-3000:]
    assert _decisions(str(results / "r")) == expected
    assert "Checkpoint successfully created" not in out  # Ray's line per checkpoint stays off the console
    assert "Configuration for experiment" not in out and "tensorboard --logdir /tmp/ray" not in out  # nor Tune's box
    after = load_trials(str(results / "r")).set_index("trial_id")
    assert after.index.is_unique and len(after) == 6
    # wall_s counts every segment a trial ran: a trial that was running at the interrupt has more time now
    for tid in before.index[before["status"] == "RUNNING"]:
        assert after.loc[tid, "wall_s"] > before.loc[tid, "wall_s"]
    assert (after["wall_s"] > 0).all()


def test_bad_space_fails_before_ray_starts(tmp_path: Path):
    import ray

    bad = tmp_path / "bad.yaml"
    bad.write_text(f"experiment: x\nbase: {{config: {SYNTHETIC}}}\nmetric: val/miou\nmode: max\nnum_samples: 2\n"
                   "params:\n  loss.cluda.temperature: {uniform: [0.0, 1.0]}\n")
    was = ray.is_initialized()
    with pytest.raises(ValueError, match=r"bad\.yaml.*loss\.cluda\.temperature"):
        run_search(bad, storage=str(tmp_path / "results"))
    assert ray.is_initialized() == was


def test_crashed_trial_is_retried_from_its_checkpoint(ray_local, tmp_path: Path, synthetic_cache: Path):
    """Kill the trial's process after its checkpoint at iteration 6; with max_failures 1 Tune restarts it, and the
    restarted run reports from iteration 7 on (it resumed), while the parquet rows hold each iteration once."""
    import threading

    space = write_space(tmp_path / "s.yaml", synthetic_cache, num_samples=1,
                        params={"teacher.pseudo_threshold": {"uniform": [0.3, 0.9]}},
                        overrides={"run.iterations": 40, "run.eval_every": 6, "run.checkpoint_every": 6})
    data = yaml.safe_load(space.read_text())
    data["max_failures"] = 1
    space.write_text(yaml.safe_dump(data))
    results = tmp_path / "results"
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(out=run_search(space, storage=str(results),
                                                                           name="crash")))
    thread.start()
    killed, deadline = False, time.time() + 180
    while time.time() < deadline and not killed:
        metrics = load_metrics(str(results / "crash")) if (results / "crash" / "metrics").exists() else None
        if metrics is not None and not metrics.empty and metrics["iteration"].max() >= 8:
            # the trial's own process: Tune records its pid in every result
            for result_file in (results / "crash").glob("trial_*/result.json"):
                lines = result_file.read_text().splitlines()
                if lines:
                    os.kill(int(json.loads(lines[-1])["pid"]), signal.SIGKILL)
                    killed = True
        time.sleep(0.2)
    thread.join(timeout=300)
    assert killed and "out" in outcome
    trials = load_trials(outcome["out"].experiment.uri)
    assert trials["status"].tolist() == ["TERMINATED"] and trials["iterations"].tolist() == [40]
    metrics = load_metrics(outcome["out"].experiment.uri)
    assert metrics["iteration"].tolist() == list(range(1, 41))
    from ray.tune import ExperimentAnalysis

    last = ExperimentAnalysis(outcome["out"].experiment.uri).trials[0].last_result
    since_restore = last["iterations_since_restore"]  # reports since the retry started
    assert 0 < since_restore < 40 and (40 - since_restore) % 6 == 0  # it resumed from a checkpoint
