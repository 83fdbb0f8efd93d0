"""Searches over chains on a real local Ray: a stage the trials share is computed once (also when two trials need it at
the same time, and across the cells of an ablation), a failing stage fails the trials that need it and no other, a
train stage runs on Ray Train workers when the trial has them, and a driver killed with kill -9 during a stage
resumes with the stage computed once, its leftover Ray processes ended and no duplicated rows."""

from __future__ import annotations

import contextlib
import json
import signal
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.stages.test_stages_run import write_chain
from tests.tune.test_tune_search_ray import _cli, _wait_for
from uda_ray.analysis import analyze
from uda_ray.results.store import load_metrics, load_trials
from uda_ray.stages.cache import StageCache, stage_keys, stages_root
from uda_ray.tune.ablate import run_ablation
from uda_ray.tune.retrain import plan_retrain, run_retrain
from uda_ray.tune.search import run_search

pytestmark = pytest.mark.ray



def chain_space(tmp_path: Path, cache: Path, *, params: dict, num_samples: int = 4, source: dict | None = None,
                seed: int = 0) -> Path:
    chain = write_chain(tmp_path / "chain.yaml", cache, {
        "source": {"kind": "train", "overrides": {"loss.mix_weight": 0.0, **(source or {})}},
        "adapt": {"kind": "train", "init": {"stage": "source", "checkpoint": "best"}}})
    space = {"experiment": "c", "base": {"config": str(chain)}, "metric": "val/miou", "mode": "max",
             "sampler": {"type": "random", "seed": seed}, "num_samples": num_samples, "max_concurrent": 2,
             "scheduler": {"type": "none"}, "resources": {"workers": 0, "cpus_per_worker": 1}, "params": params}
    path = tmp_path / "space.yaml"
    path.write_text(f"# uda-ray tune {path}\n" + yaml.safe_dump(space, sort_keys=False))
    return path


def test_a_search_shares_its_stages_and_a_failing_stage_fails_only_its_trials(ray_local, tmp_path: Path,
                                                                             synthetic_cache: Path) -> None:
    """6 trials, 2 at a time (the random sampler's seed 49 draws a good source-only learning rate four times, then a
    bad one twice): the four good trials share one source-only stage, computed once although the first two needed
    it at the same time; the bad one diverges once and fails both trials that need it, named in their error; then
    analyze and retrain read the chain's trials."""
    space = chain_space(tmp_path, synthetic_cache, num_samples=6, seed=49,
                        params={"stages.source.optim.lr": {"choice": [1.0e-3, 1.0e+12]},
                                "teacher.pseudo_threshold": {"uniform": [0.3, 0.9]}})
    out = run_search(space, storage=str(tmp_path / "results"))
    trials = load_trials(out.experiment.uri).sort_values("started_at").reset_index(drop=True)
    bad = trials["overrides"].str.contains("1000000000000")
    assert bad.tolist() == [False, False, False, False, True, True], trials[["overrides", "status"]]
    good = trials[~bad]
    assert set(good["status"]) == {"TERMINATED"} and set(trials.loc[bad, "status"]) == {"ERROR"}
    assert trials.loc[bad, "error"].str.contains("stage 'source'").all(), trials.loc[bad, "error"].tolist()
    cache = StageCache(stages_root(str(tmp_path / "results")))
    [entry] = cache.entries()  # the good source-only stage; the failed one published nothing
    assert entry["name"] == "source"
    assert [r["status"] for r in cache.runs("source", entry["key"])] == ["done"]
    assert [r["status"] for r in cache.runs("source", trials.loc[bad, "stage/source/key"].iloc[0])] == ["failed"]
    assert entry["used_by"] == sorted(f"{out.experiment.name}/{t}" for t in good["trial_id"])
    assert set(good["stage/source/key"]) == {entry["key"]} and set(good["stage/source/uri"]) == {entry["uri"]}
    assert set(trials["config/model.init_from"]) == {"stage://source/best.pt"}
    assert [s["name"] for s in json.loads(trials["chain"].iloc[0])["stages"]] == ["source", "adapt"]

    # analyze reads a chain's experiment like any other
    tables = analyze(out.experiment.uri, out_dir=str(tmp_path / "report"))
    assert len(tables["top"]) == 4
    # retrain: by default each seed retrains the whole chain; --reuse-stages keeps the source trial's stages
    _, default_runs = plan_retrain(trials, top=1, seeds=[5], iterations=None, metric="val/miou", mode="max")
    assert stage_keys(default_runs[0].chain)["source"] != entry["key"]
    again = run_retrain(out.experiment.uri, top=1, seeds=[5], reuse_stages=True)
    assert again.runs["status"].tolist() == ["TERMINATED"]
    retrained = load_trials(again.experiment.uri)
    assert retrained["stage/source/key"].tolist() == [entry["key"]] and retrained["config/run.seed"].tolist() == [5]
    assert [r["status"] for r in cache.runs("source", entry["key"])] == ["done"]  # reused, not computed again
    assert len(cache.entries()[0]["used_by"]) == 5


def test_an_ablation_over_a_chain_runs_each_cell_with_its_seed_and_shares_the_stages_cells_do_not_change(
        ray_local, tmp_path: Path, synthetic_cache: Path) -> None:
    """2 cells × 1 seed of a source-only → adaptation chain whose one component changes the adaptation stage: both
    trials run with the seed in every stage and share one source-only stage, computed once."""
    chain = write_chain(tmp_path / "chain.yaml", synthetic_cache, {
        "source": {"kind": "train", "overrides": {"loss.mix_weight": 0.0}},
        "adapt": {"kind": "train", "init": {"stage": "source", "checkpoint": "best"}}})
    spec = {"experiment": "a", "base": {"config": str(chain)}, "baseline": {"loss.cluda.weight": 0.0},
            "components": {"cluda": {"loss.cluda.weight": 1.0, "loss.cluda.fm_size": 9}}, "design": "one-at-a-time",
            "seeds": [3], "metric": "val/miou", "mode": "max", "max_concurrent": 2,
            "resources": {"workers": 0, "cpus_per_worker": 1}}
    path = tmp_path / "abl.yaml"
    path.write_text(f"# uda-ray ablate {path}\n" + yaml.safe_dump(spec, sort_keys=False))
    out = run_ablation(path, storage=str(tmp_path / "results"))
    trials = load_trials(out.experiment.uri).set_index("cell")
    assert sorted(trials.index) == ["+cluda", "baseline"] and set(trials["status"]) == {"TERMINATED"}
    assert set(trials["seed"]) == {3} and set(trials["config/run.seed"]) == {3}
    assert trials.loc["+cluda", "config/loss.cluda.weight"] == 1.0
    assert trials.loc["baseline", "config/loss.cluda.weight"] == 0.0
    for text in trials["chain"]:
        assert {s["name"]: s["config"]["run"]["seed"] for s in json.loads(text)["stages"]} == {"source": 3, "adapt": 3}
    cache = StageCache(stages_root(str(tmp_path / "results")))
    [entry] = cache.entries()
    assert set(trials["stage/source/key"]) == {entry["key"]}
    assert [r["status"] for r in cache.runs("source", entry["key"])] == ["done"]
    assert out.summary.loc[["baseline", "+cluda"], 3].notna().all()
    tables = analyze(out.experiment.uri, out_dir=str(tmp_path / "report"))  # an ablation's report, as any other
    assert set(tables["ablation"]["cell"]) >= {"+cluda"}, tables["ablation"]


def test_kill9_during_a_stage_then_resume(tmp_path: Path, synthetic_cache: Path) -> None:
    """kill -9 of the driver while the second of two source-only stages is computing (the random sampler's seed 2
    draws 16 source-only iterations for the first two trials, which share one stage and finish, then 48 for the
    next two; the killed session's processes are frozen, so that its computation cannot finish before the resumed
    driver ends it):
    the resumed search ends the killed Ray session's leftover processes, keeps the finished trials finished, runs
    the others to the end with no duplicated reports, computes stage b once to the end, continuing from the killed
    computation's checkpoint, and does not compute stage a again."""
    import psutil

    from uda_ray.tune.local_ray import session_processes

    space = chain_space(tmp_path, synthetic_cache, seed=2,
                        params={"stages.source.run.iterations": {"choice": [16, 48]},
                                "teacher.pseudo_threshold": {"uniform": [0.3, 0.9]}},
                        source={"run.eval_every": 8, "run.checkpoint_every": 2})
    results, records = tmp_path / "results", tmp_path / "records"
    proc = _cli("tune", str(space), "--storage", str(results), "--name", "k", cwd=tmp_path, records=records)
    _wait_for(results / "k" / "trials", "TERMINATED", 2)
    cache = StageCache(stages_root(str(results)))
    [first] = cache.entries()
    work, deadline = results / "stages" / ".work", time.time() + 180
    while time.time() < deadline and not list(work.glob("source-*/checkpoints/iter_*/checkpoint.pt")):
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    session = json.loads(next(records.glob("*.json")).read_text())["session_dir"]
    proc.send_signal(signal.SIGKILL)  # the driver dies in the middle of the second stage; its Ray stays behind
    proc.communicate(timeout=60)
    assert [e["key"] for e in cache.entries()] == [first["key"]]  # nothing half-written is trusted
    before = load_trials(str(results / "k"))
    finished_before = sorted(before.loc[before["status"] == "TERMINATED", "trial_id"])
    assert len(finished_before) == 2
    leftovers = session_processes(session)
    assert leftovers, "a killed driver is expected to leave processes of its Ray session behind"
    for p in leftovers:  # frozen, so that the leftover computation cannot finish stage b before the resume ends it
        with contextlib.suppress(psutil.NoSuchProcess):
            p.suspend()

    resumed = _cli("tune", str(space), "--storage", str(results), "--name", "k", "--resume", cwd=tmp_path,
                   records=records)
    out, _ = resumed.communicate(timeout=400)
    assert resumed.returncode == 0, out[-3000:]
    assert f"leftover process(es) of the local Ray session {session}" in out
    assert not [p for p in leftovers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    trials = load_trials(str(results / "k"))
    assert len(trials) == 4 and trials["trial_id"].is_unique and set(trials["status"]) == {"TERMINATED"}
    for trial_id, m in load_metrics(str(results / "k")).groupby("trial_id"):
        assert m["iteration"].tolist() == [1, 2, 3, 4], trial_id  # no duplicated or missing reports
    again = trials.set_index("trial_id").loc[finished_before, "ended_at"]  # finished trials were not re-run
    assert (again == before.set_index("trial_id").loc[finished_before, "ended_at"]).all()
    assert not list(records.glob("*.json"))  # the resumed driver exited normally and removed its record
    second = [e for e in cache.entries() if e["key"] != first["key"]]
    assert len(second) == 1 and len(cache.entries()) == 2
    assert [r["status"] for r in cache.runs("source", first["key"])] == ["done"]  # not computed again
    runs = cache.runs("source", second[0]["key"])
    assert [r["status"] for r in runs if r["status"] == "done"] == ["done"]  # computed to the end once
    assert second[0]["result"]["resumed_from"] > 0, (runs, second[0])  # continued from the killed checkpoint
    assert set(trials["stage/source/key"]) == {first["key"], second[0]["key"]}


def test_a_train_stage_runs_on_ray_train_workers(ray_local, tmp_path: Path, synthetic_cache: Path) -> None:
    """A trial with Train workers trains its chain's stages on as many workers (``stage_trainer``): the stage is
    published with its last and best models and its reports, and the final stage starts from it."""
    from uda_ray.stages import load_chain
    from uda_ray.stages.kinds.train import stage_trainer
    from uda_ray.stages.run import ChainRun
    from uda_ray.train.checkpoint import load_checkpoint
    from uda_ray.train.worker import Scaling

    chain = load_chain(write_chain(tmp_path / "chain.yaml", synthetic_cache, {
        "source": {"kind": "train", "overrides": {"loss.mix_weight": 0.0}},
        "adapt": {"kind": "train", "init": {"stage": "source", "checkpoint": "last"}}}))
    storage = str(tmp_path / "results")
    runner = ChainRun(chain, storage, who="t/ddp",
                      train_fn=stage_trainer(Scaling(num_workers=2, cpus_per_worker=1), storage))
    prepared = runner.prepare()
    [entry] = StageCache(stages_root(storage)).entries()
    assert entry["name"] == "source" and entry["result"]["iterations"] == 4
    out = Path(entry["uri"])
    assert load_checkpoint(out / "last.pt")["iteration"] == 4 and (out / "best.pt").is_file()
    reports = pd.read_parquet(out / "metrics.parquet")
    assert reports["iteration"].tolist() == [1, 2, 3, 4] and reports["val/miou"].notna().sum() == 2
    assert entry["result"]["last"]["val/miou"] == pytest.approx(reports["val/miou"].iloc[-1])
    assert prepared.config.model.init_from == f"{entry['uri']}/last.pt"
