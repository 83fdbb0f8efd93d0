"""``uda-ray ablate`` and ``uda-ray retrain`` end to end on a real local Ray with tiny runs (4 iterations each)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from uda_ray.config import apply_overrides, load_config
from uda_ray.results.store import load_trials, trial_row, write_trial
from uda_ray.train.run_eval import evaluate_checkpoint
from uda_ray.tune import ablate, retrain
from uda_ray.tune.ablate import SPEC_COPY, run_ablation
from uda_ray.tune.driver import ExperimentError
from uda_ray.tune.retrain import choose_retrain, plan_retrain, run_retrain
from uda_ray.tune.space import SpaceError

pytestmark = pytest.mark.ray

BASE = Path(__file__).resolve().parents[2] / "search_spaces" / "base" / "synthetic.yaml"
METRIC = "last/val/miou"


def tiny(cache: Path) -> dict[str, Any]:
    return {
        "data.synthetic.cache_dir": str(cache), "data.synthetic.num_source": 6, "data.synthetic.num_target": 6,
        "data.synthetic.num_val": 3, "data.synthetic.height": 32, "data.synthetic.width": 64,
        "data.source_resize": [32, 64], "data.target_resize": [32, 64], "data.val_resize": [32, 64],
        "data.crop": [32, 32], "data.batch_size": 2, "model.backbone": "test_resnet", "model.embed_dim": 8,
        "optim.warmup_iters": 2, "teacher.pseudo_threshold": 0.5, "run.iterations": 4, "run.eval_every": 2,
        "run.checkpoint_every": 2, "run.log_every": 1, "run.threads": 1,
    }


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("synthetic")


def write_spec(tmp_path: Path, cache: Path, **changes: Any) -> Path:
    spec = {
        "experiment": "tiny",
        "base": {"config": str(BASE), "overrides": tiny(cache)},
        "baseline": {"loss.cluda.weight": 0.0},
        "components": {"cluda": {"loss.cluda.weight": 1.0, "loss.cluda.fm_size": 9},
                       "ent": {"loss.entropy.weight": 0.01}},
        "design": "one-at-a-time",
        "seeds": [0, 1],
        "metric": "val/miou",
        "mode": "max",
        "max_concurrent": 3,  # half a CPU each: one wave per seed, so the per-trial process start-up overlaps
        "resources": {"workers": 0, "gpus_per_worker": 0, "cpus_per_worker": 0.5},
        **changes,
    }
    path = tmp_path / "tiny.yaml"
    path.write_text("# uda-ray ablate tiny.yaml\n" + yaml.safe_dump(spec, sort_keys=False))
    return path


def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any attempt to start Ray from the front ends fail the test."""

    def refuse(address: str | None) -> None:
        raise AssertionError("Ray was started although the request was invalid")

    monkeypatch.setattr(ablate, "init_ray", refuse)
    monkeypatch.setattr(retrain, "init_ray", refuse)


def configs(row: pd.Series) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, (list, tuple, np.ndarray)) else v) for k, v in row.items()
            if k.startswith("config/")}


# ------------------------------------------------------------------------------------------------ errors, no Ray
@pytest.mark.parametrize("changes, message", [
    ({"components": {"cluda": {"loss.cluda.weight": 0.0}}}, "changes nothing"),
    ({"components": {"cluda": {"loss.cluda.wieght": 1.0}}}, "wieght"),
    ({"seeds": [0, 0]}, "repeat"),
])
def test_bad_spec_fails_before_ray(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch,
                                   changes: dict[str, Any], message: str) -> None:
    no_ray(monkeypatch)
    with pytest.raises(SpaceError, match=message):
        run_ablation(write_spec(tmp_path, cache, **changes), storage=str(tmp_path / "results"))
    assert not (tmp_path / "results").exists()


def source_experiment(root: Path, cache: Path) -> tuple[Path, dict[str, Any]]:
    """A finished search as parquet rows: two TERMINATED trials (a the best), one PRUNED and one ERROR trial with
    better metrics that must never be picked."""
    base = load_config(BASE, tiny(cache))
    cfgs = {"a": apply_overrides(base, {"optim.lr": 2e-3, "loss.entropy.weight": 0.01, "run.seed": 7}),
            "b": apply_overrides(base, {"optim.lr": 5e-4}),
            "p": apply_overrides(base, {"optim.lr": 1e-2}),
            "e": apply_overrides(base, {"optim.lr": 3e-2})}
    rows = {"a": ("TERMINATED", [0.1, 0.3], 4), "b": ("TERMINATED", [0.2, 0.25], 4),
            "p": ("PRUNED", [0.9], 2), "e": ("ERROR", [0.5, 0.95], 4)}
    for tid, (status, values, last) in rows.items():
        reports = [{"iteration": 2 * (i + 1), "val/miou": v, "train/loss": 1.0} for i, v in enumerate(values)]
        assert reports[-1]["iteration"] == last
        overrides = {"optim.lr": cfgs[tid].optim.lr}
        write_trial(str(root), trial_row(experiment="src", trial_id=tid, kind="search", status=status,
                                         config=cfgs[tid], overrides=overrides, reports=reports, metric="val/miou",
                                         mode="max", started_at=0.0, ended_at=1.0))
    return root / "src", cfgs


def test_plan_skips_unfinished_and_sets_seed_and_schedule(tmp_path: Path, cache: Path) -> None:
    src, cfgs = source_experiment(tmp_path, cache)
    trials = load_trials(str(src))
    chosen, runs = plan_retrain(trials, top=5, seeds=[3, 4], iterations=None, metric="val/miou", mode="max")
    assert chosen["trial_id"].tolist() == ["a", "b"]  # p (PRUNED, 0.9) and e (ERROR, 0.95) are skipped
    assert [(r.source_trial_id, r.seed) for r in runs] == [("a", 3), ("a", 4), ("b", 3), ("b", 4)]
    for r in runs:
        expected = apply_overrides(cfgs[r.source_trial_id], {"run.seed": r.seed})
        assert r.config == expected and r.config.run.iterations == 4
        assert r.overrides["run.seed"] == r.seed and r.overrides["optim.lr"] == expected.optim.lr
    _, runs = plan_retrain(trials, top=1, seeds=[0], iterations=2, metric="val/miou", mode="min")
    assert [(r.source_trial_id, r.config.run.iterations) for r in runs] == [("b", 2)]


def test_retrain_request_errors_before_ray(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    no_ray(monkeypatch)
    src, _ = source_experiment(tmp_path, cache)
    with pytest.raises(ValueError, match="repeat"):
        run_retrain(str(src), seeds=[1, 1])
    with pytest.raises(ValueError, match="no column 'last/val/loss'"):
        run_retrain(str(src), metric="val/loss")
    with pytest.raises(FileNotFoundError, match="trials"):
        run_retrain(str(tmp_path / "nowhere"))
    with pytest.raises(ExperimentError, match="no retrain folder"):
        run_retrain(str(src), resume=True)
    assert not (src / "retrain").exists()


# ------------------------------------------------------------------------------------------------ real Ray
def test_ablation_grid_is_paired(tmp_path: Path, cache: Path, ray_local: None,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    spec_path = write_spec(tmp_path, cache)
    out = run_ablation(spec_path, storage=str(tmp_path / "results"))
    exp = Path(out.experiment.uri)
    assert exp.parent == tmp_path / "results" and exp.name.startswith("tiny-")
    assert (exp / SPEC_COPY).read_bytes() == spec_path.read_bytes()
    df = load_trials(str(exp))
    assert len(df) == 6 and set(df["kind"]) == {"ablation"} and set(df["status"]) == {"TERMINATED"}
    assert {(c, s) for c, s in zip(df["cell"], df["seed"])} == {(c, s) for c in ("baseline", "+cluda", "+ent")
                                                                 for s in (0, 1)}
    assert all(sorted(g) == [0, 1] for _, g in df.groupby("cell")["seed"])
    assert (df["config/run.seed"] == df["seed"]).all() and (df["iterations"] == 4).all()
    by_cell = df.set_index(["cell", "seed"])
    for s in (0, 1):
        assert by_cell.loc[("baseline", s), "config/loss.cluda.weight"] == 0.0
        assert by_cell.loc[("+cluda", s), "config/loss.cluda.weight"] == 1.0
        assert by_cell.loc[("+cluda", s), "config/loss.cluda.fm_size"] == 9
        assert by_cell.loc[("+ent", s), "config/loss.entropy.weight"] == 0.01
        assert by_cell.loc[("+ent", s), "config/loss.cluda.weight"] == 0.0
        assert json.loads(by_cell.loc[("+ent", s), "overrides"])["run.seed"] == s
    # the summary is the cells × seeds table of the parquet rows
    assert out.summary.index.tolist() == ["baseline", "+cluda", "+ent"] and out.summary.columns.tolist() == [0, 1]
    for (cell, seed), value in by_cell[METRIC].items():
        assert out.summary.loc[cell, seed] == value
    text = ablate.format_ablation(out)
    row = next(ln for ln in text.splitlines() if ln.startswith("+cluda "))
    assert row.split()[1:] == [f"{100 * out.summary.loc['+cluda', s]:.2f}" for s in (0, 1)] + [
        f"{100 * out.summary.loc['+cluda'].mean():.2f}"]  # val/ metrics in percent, as everywhere

    # resuming with a changed spec is refused before Ray is touched
    no_ray(monkeypatch)
    changed = write_spec(tmp_path, cache, seeds=[0, 2])
    with pytest.raises(ExperimentError, match="differs"):
        run_ablation(changed, storage=str(tmp_path / "results"), name=exp.name, resume=True)


def test_retrain_reproduces_the_best_config(tmp_path: Path, cache: Path, ray_local: None) -> None:
    src, _ = source_experiment(tmp_path, cache)
    out = run_retrain(str(src), top=1, seeds=(0, 1))
    assert Path(out.experiment.uri) == src / "retrain"
    source = load_trials(str(src)).set_index("trial_id").loc["a"]
    rows = load_trials(str(src / "retrain"))
    assert len(rows) == 2 and set(rows["kind"]) == {"retrain"} and set(rows["status"]) == {"TERMINATED"}
    assert set(rows["source_trial_id"]) == {"a"} and sorted(rows["seed"]) == [0, 1]
    for _, row in rows.iterrows():
        got, want = configs(row), configs(source)
        assert got.pop("config/run.seed") == row["seed"] and want.pop("config/run.seed") == 7
        assert got == want  # everything else, run.iterations (the full schedule: 4) included
        assert row["iterations"] == 4
    assert out.runs["checkpoint"].map(lambda p: Path(p).is_dir()).all()
    # like with like: each run's reported number is its final evaluation, which its final checkpoint gives again
    for _, run in out.runs.iterrows():
        again = evaluate_checkpoint(run["checkpoint"])
        assert again.iteration == 4 and again.model == "student"
        assert again.metrics["val/miou"] == run[METRIC]

    summary = pd.read_csv(src / "retrain" / "summary.csv")
    values = rows[METRIC].to_numpy()
    assert summary["source_trial_id"].tolist() == ["a"] and summary["n"].tolist() == [2]
    assert math.isclose(summary["mean"][0], values.mean(), rel_tol=1e-9)
    assert math.isclose(summary["std"][0], values.std(ddof=1), rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(summary["source_value"][0], 0.3)
    text = retrain.format_retrain(out)
    assert "summary.csv" in text
    assert (f"#1 a val/miou: source 30.00% at 4 iterations → retrained {100 * values.mean():.2f} ± "
            f"{100 * values.std(ddof=1):.2f}% at 4 iterations over 2") in text
    assert "different lengths" not in text and summary["comparable"].tolist() == [True]
    # a second retrain goes beside the first; --resume finds the first
    assert choose_retrain(str(src), resume=False).name == "retrain-2"
    assert choose_retrain(str(src), resume=True).name == "retrain"
