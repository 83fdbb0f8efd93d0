"""Running chains in one process (``uda-ray train CHAIN.yaml``): a 3-stage chain end to end, stage reuse across runs,
``--rerun-stage``, a killed stage resuming exactly, a ``file://`` storage, and the errors found before training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from tests.conftest import SYNTHETIC, tiny_overrides
from uda_ray.cli import main
from uda_ray.stages import StageFailed, load_chain
from uda_ray.stages.cache import StageCache, stages_root
from uda_ray.stages.run import ChainRun

SHORT = {"run.iterations": 4, "run.eval_every": 2, "run.checkpoint_every": 2}


def write_chain(path: Path, cache: Path, stages: dict[str, dict[str, Any]]) -> Path:
    """A chain on the tiny synthetic pair: every stage with a config gets the tiny overrides first."""
    out = {}
    for name, spec in stages.items():
        spec = dict(spec)
        if spec["kind"] == "train":
            spec = {"config": str(SYNTHETIC), **spec,
                    "overrides": {**tiny_overrides(cache, **SHORT), **spec.get("overrides", {})}}
        out[name] = spec
    path.write_text(yaml.safe_dump({"chain": "toy", "seed": 0, "stages": out}, sort_keys=False))
    return path


def three_stages(path: Path, cache: Path) -> Path:
    return write_chain(path, cache, {
        "source": {"kind": "train", "overrides": {"loss.mix_weight": 0.0}},
        "adapt": {"kind": "train", "init": {"stage": "source", "checkpoint": "best"}},
        "labels": {"kind": "pseudo_labels", "model": "adapt", "options": {"cap": 0.9}},
        "self_train": {"kind": "train", "init": "adapt", "target_labels": "labels",
                       "overrides": {"loss.mix_weight": 0.0, "loss.self_training.weight": 1.0}},
    })


def _done(cache: StageCache, name: str, key: str) -> int:
    return sum(r["status"] == "done" for r in cache.runs(name, key))


def test_a_three_stage_chain_trains_end_to_end_and_later_runs_reuse_its_stages(
        tmp_path: Path, synthetic_cache: Path, capsys: pytest.CaptureFixture) -> None:
    chain_file = three_stages(tmp_path / "chain.yaml", synthetic_cache)
    results = tmp_path / "results"
    assert main(["train", str(chain_file), "--output-dir", str(results), "--name", "r1", "--no-progress"]) == 0
    cache = StageCache(stages_root(str(results.resolve())))
    entries = {e["name"]: e for e in cache.entries()}
    assert sorted(entries) == ["adapt", "labels", "source"]
    keys = {n: e["key"] for n, e in entries.items()}
    # the adaptation stage started from the source-only stage's best model, the final one from the adapted model
    assert entries["adapt"]["inputs"]["init"] == {"stage": "source", "checkpoint": "best", "weights": "model",
                                                   "key": keys["source"], "uri": entries["source"]["uri"]}
    final = yaml.safe_load((results / "r1" / "config.yaml").read_text())
    assert final["model"]["init_from"] == f"{entries['adapt']['uri']}/last.pt"
    assert final["data"]["target_pseudo_labels"] == entries["labels"]["uri"]
    # offline labels: one train-id PNG per target train image, at the image's size, and the final run trained on them
    pngs = sorted(Path(entries["labels"]["uri"], "labels").rglob("*.png"))
    assert len(pngs) == 6 and {Image.open(p).size for p in pngs} == {(64, 32)}
    assert len(entries["labels"]["result"]["thresholds"]) == 19
    metrics = pd.read_parquet(results / "r1" / "metrics.parquet")
    assert metrics["train/loss_self_training"].notna().all()
    recorded = json.loads((results / "r1" / "stages.json").read_text())["stages"]
    assert recorded == {f"stage/{n}/{f}": (keys[n] if f == "key" else entries[n]["uri"])
                        for n in ("source", "adapt", "labels") for f in ("key", "uri")}

    # a run that changes only the final stage reuses every stage
    assert main(["train", str(chain_file), "loss.self_training.weight=0.5", "--output-dir", str(results),
                 "--name", "r2", "--no-progress"]) == 0
    assert {n: _done(cache, n, k) for n, k in keys.items()} == {"source": 1, "adapt": 1, "labels": 1}
    assert all(e["used_by"] == ["train/r1", "train/r2"] for e in cache.entries())
    # --rerun-stage computes one stage again (and replaces its output); the others are reused
    assert main(["train", str(chain_file), "--rerun-stage", "labels", "--output-dir", str(results), "--name", "r3",
                 "--no-progress"]) == 0
    assert {n: _done(cache, n, k) for n, k in keys.items()} == {"source": 1, "adapt": 1, "labels": 2}

    # uda-ray stages lists them with their users, and --remove deletes one
    capsys.readouterr()
    assert main(["stages", str(results)]) == 0
    listing = capsys.readouterr().out
    assert all(keys[n] in listing for n in keys) and "used by: train/r1, train/r2, train/r3" in listing
    assert main(["stages", str(results), "--remove", keys["labels"]]) == 0
    assert sorted(e["name"] for e in cache.entries()) == ["adapt", "source"]
    assert main(["stages", str(results), "--remove", keys["labels"]]) == 2


def _same(metrics: dict[str, float]) -> dict[str, str]:
    """Metrics as comparable text: NaN equals NaN, timings left out."""
    return {k: repr(v) for k, v in metrics.items() if not k.startswith("time/")}


class _Killed(BaseException):  # a kill: nothing on the way out catches or wraps it
    pass


def test_a_killed_stage_resumes_exactly_where_it_stopped(tmp_path: Path, synthetic_cache: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    chain = load_chain(write_chain(tmp_path / "chain.yaml", synthetic_cache, {
        "source": {"kind": "train", "overrides": {"loss.mix_weight": 0.0, "model.dropout": 0.1}},
        "adapt": {"kind": "train", "init": "source"}}))
    whole = ChainRun(chain, str(tmp_path / "whole"), who="whole", log=lambda _: None).prepare()

    from uda_ray.stages.kinds import train as train_kind

    real_fit = train_kind.fit

    def fit_killed_after_iteration_2(cfg, **kw):
        report = kw["report"]

        def dying(metrics, checkpoint_dir):
            report(metrics, checkpoint_dir)
            if metrics["iteration"] == 2 and checkpoint_dir is not None:
                raise _Killed("killed after the checkpoint of iteration 2")

        return real_fit(cfg, **{**kw, "report": dying})

    monkeypatch.setattr(train_kind, "fit", fit_killed_after_iteration_2)
    with pytest.raises(_Killed):
        ChainRun(chain, str(tmp_path / "killed"), who="first", log=lambda _: None).prepare()
    monkeypatch.setattr(train_kind, "fit", real_fit)
    again = ChainRun(chain, str(tmp_path / "killed"), who="second", log=lambda _: None)
    resumed = again.prepare()
    key = again.keys["source"]
    assert [r["status"] for r in again.cache.runs("source", key)] == ["failed", "done"]
    assert again.cache.manifest(resumed.uris["source"])["result"]["resumed_from"] == 2
    for file in ("last.pt", "best.pt"):
        a = torch.load(Path(whole.uris["source"]) / file, weights_only=True)
        b = torch.load(Path(resumed.uris["source"]) / file, weights_only=True)
        assert a["iteration"] == b["iteration"] and _same(a["metrics"]) == _same(b["metrics"])
        for part in ("student", "teacher"):
            assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), (file, part)
    rows = [pd.read_parquet(Path(p.uris["source"]) / "metrics.parquet").drop(columns=["time/iter_s"])
            for p in (whole, resumed)]
    pd.testing.assert_frame_equal(rows[0], rows[1])


def test_a_uri_storage_holds_the_cache(tmp_path: Path, synthetic_cache: Path) -> None:
    chain = load_chain(write_chain(tmp_path / "chain.yaml", synthetic_cache, {
        "source": {"kind": "train", "overrides": {"loss.mix_weight": 0.0}},
        "adapt": {"kind": "train", "init": "source"}}))
    storage = f"file://{tmp_path / 'bucket'}"
    prepared = ChainRun(chain, storage, who="exp/t1", log=lambda _: None).prepare()
    assert prepared.uris["source"].startswith(f"{storage}/stages/source-")
    assert prepared.config.model.init_from == f"{tmp_path / 'bucket'}/stages/source-{prepared.keys['source']}/last.pt"
    [entry] = StageCache(stages_root(storage)).entries()
    assert entry["used_by"] == ["exp/t1"]
    again = ChainRun(chain, storage, who="exp/t2", log=lambda _: None)
    assert again.prepare().uris == prepared.uris and _done(again.cache, "source", again.keys["source"]) == 1


def test_chain_errors_are_reported_before_training(tmp_path: Path, synthetic_cache: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    good = write_chain(tmp_path / "good.yaml", synthetic_cache, {
        "source": {"kind": "train", "overrides": {"loss.mix_weight": 0.0}},
        "adapt": {"kind": "train", "init": "source"}})
    results = str(tmp_path / "results")
    assert main(["train", str(good), "--rerun-stage", "nope", "--output-dir", results, "--no-progress"]) == 2
    assert "--rerun-stage nope: no such cached stage" in capsys.readouterr().err
    missing = write_chain(tmp_path / "missing.yaml", synthetic_cache, {
        "warm": {"kind": "checkpoint", "path": "nowhere.pt"}, "adapt": {"kind": "train", "init": "warm"}})
    assert main(["train", str(missing), "--output-dir", results, "--no-progress"]) == 2
    assert "stage 'warm' key 'path'" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    junk = write_chain(tmp_path / "junk.yaml", synthetic_cache, {
        "warm": {"kind": "checkpoint", "path": "junk.pt"}, "adapt": {"kind": "train", "init": "warm"}})
    assert main(["train", str(junk), "--output-dir", results, "--no-progress"]) == 2
    assert "does not load into the network of stage 'adapt'" in capsys.readouterr().err
    assert not (tmp_path / "results" / "stages").exists()  # nothing ran


def test_the_checks_of_many_chains_read_a_shared_root_and_file_once(tmp_path: Path, synthetic_cache: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """An ablation's or a retrain's chains (one recipe, several seeds) share their data and checkpoint files: the
    data is checked once, and each checkpoint stage's file is loaded once into each network that reads it."""
    import uda_ray.models.released
    import uda_ray.preflight
    from uda_ray.stages.check import preflight_chain

    (tmp_path / "warm.pt").write_bytes(b"read by the stub below")
    chain = load_chain(write_chain(tmp_path / "chain.yaml", synthetic_cache, {
        "warm": {"kind": "checkpoint", "path": "warm.pt"}, "adapt": {"kind": "train", "init": "warm"}}))
    scanned, loaded = [], []
    real_scan = uda_ray.preflight.data_problems
    monkeypatch.setattr(uda_ray.preflight, "data_problems", lambda cfg: scanned.append(cfg) or real_scan(cfg))
    monkeypatch.setattr(uda_ray.models.released, "load_released", lambda model, path, **kw: loaded.append(path))
    preflight_chain(*(chain.with_seed(s) for s in (0, 1, 2)), storage=str(tmp_path / "results"))
    assert len(scanned) == 1 and len(loaded) == 1


def test_a_stage_that_raises_is_named_in_the_error(tmp_path: Path, synthetic_cache: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    chain = load_chain(write_chain(tmp_path / "chain.yaml", synthetic_cache, {
        "source": {"kind": "train", "overrides": {"loss.mix_weight": 0.0}},
        "labels": {"kind": "pseudo_labels", "model": "source"},
        "self_train": {"kind": "train", "target_labels": "labels",
                       "overrides": {"loss.mix_weight": 0.0, "loss.self_training.weight": 1.0}}}))
    from uda_ray.stages.kinds import pseudo_labels

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pseudo_labels, "offline_pseudo_labels", broken)
    runner = ChainRun(chain, str(tmp_path / "results"), who="t", log=lambda _: None)
    named = r"stage 'labels' \(pseudo_labels, key [0-9a-f]+\) failed: OSError: disk full"
    with pytest.raises(StageFailed, match=named):
        runner.prepare()
    assert [r["status"] for r in runner.cache.runs("labels", runner.keys["labels"])] == ["failed"]
    assert runner.cache.lookup("labels", runner.keys["labels"]) is None
