"""The loop end to end on a tiny synthetic pair: reports, evaluation, checkpoints, exact resume, divergence."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import tiny_overrides
from uda_ray.config import Config, apply_overrides
from uda_ray.train.loop import fit, lr_factor
from uda_ray.train.run import latest_checkpoint, train_local


def tiny_config(cache: Path, **extra) -> Config:
    return apply_overrides(Config(), tiny_overrides(cache, **extra))


def _strip_time(rows: list[dict]) -> list[dict]:
    """Reports without wall-clock timings, NaN written as a string so that equal reports compare equal."""
    return [{k: "nan" if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()
             if not k.startswith("time/")} for r in rows]


def test_fit_reports_evaluates_and_checkpoints(tmp_path: Path):
    cfg = tiny_config(tmp_path / "cache")
    reports: list[tuple[dict, Path | None]] = []
    result = fit(cfg, work_dir=tmp_path / "run", report=lambda m, c: reports.append((m, c)))
    assert result.status == "completed" and result.iteration == 6
    assert [int(m["iteration"]) for m, _ in reports] == [1, 2, 3, 4, 5, 6]
    evals = [m for m, _ in reports if "val/miou" in m]
    assert [int(m["iteration"]) for m in evals] == [3, 6]
    assert all(0.0 <= m["val/miou"] <= 1.0 for m in evals) and "val/iou/road" in evals[0]
    ckpts = [c for _, c in reports if c is not None]
    assert [c.name for c in ckpts] == ["iter_0000003", "iter_0000006"]
    assert latest_checkpoint(tmp_path / "run").name == "iter_0000006"
    assert not (tmp_path / "run/checkpoints/iter_0000003").exists()  # only the newest is kept


@pytest.mark.parametrize("terms", [{}, {"loss.cfcontra.weight": 0.1, "loss.cfcontra.proj_dim": 8,
                                        "loss.sdca.weight_feat": 1.0}])
def test_resume_continues_exactly(tmp_path: Path, terms: dict):
    cfg = tiny_config(tmp_path / "cache", **terms)
    full: list[dict] = []
    # the uninterrupted run's reports, and its checkpoint at iteration 3, resumed afterwards in a fresh fit
    ckpt3 = tmp_path / "ckpt3"

    def keep_3(m: dict, c: Path | None) -> None:
        full.append(m)
        if int(m["iteration"]) == 3:
            shutil.copytree(c, ckpt3)

    fit(cfg, work_dir=tmp_path / "a", report=keep_3)
    rerun: list[dict] = []
    fit(cfg, work_dir=tmp_path / "c", report=lambda m, c: rerun.append(m), resume_from=ckpt3)
    assert [int(m["iteration"]) for m in rerun] == [4, 5, 6]
    assert _strip_time(rerun) == _strip_time(full[3:])


def test_a_source_only_run_draws_no_target_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Without mixing and target terms the loop never asks the target loader for a batch, and its reports equal
    those of a run that draws every target batch and reads none (both loaders are still built, so the global
    generator's draws are unchanged)."""
    import dataclasses

    from uda_ray.train import loop

    cfg = tiny_config(tmp_path / "cache", **{"loss.mix_weight": 0.0, "loss.lovasz.weight": 0.75})
    reference: list[dict] = []
    with monkeypatch.context() as patch:
        patch.setattr(loop, "batches_read", lambda settings, terms: (True, True))  # draw both, as before
        fit(cfg, work_dir=tmp_path / "a", report=lambda m, c: reference.append(m))

    def refuse():
        raise AssertionError("the target loader was asked for a batch")
        yield  # a generator: the error comes on the first draw

    build_data = loop.build_data
    monkeypatch.setattr(loop, "build_data", lambda *a, **k: dataclasses.replace(build_data(*a, **k), target=refuse()))
    drawn: list[dict] = []
    fit(cfg, work_dir=tmp_path / "b", report=lambda m, c: drawn.append(m))
    assert _strip_time(drawn) == _strip_time(reference) and len(drawn) == 6


def test_train_local_resume_writes_one_row_per_iteration(tmp_path: Path):
    cfg = tiny_config(tmp_path / "cache")
    run = tmp_path / "runs" / "r"
    train_local(apply_overrides(cfg, {"run.iterations": 6}), run, progress=False)
    df = pd.read_parquet(run / "metrics.parquet")
    assert df["iteration"].tolist() == [1, 2, 3, 4, 5, 6]
    assert (run / "config.yaml").exists() and (run / "provenance.json").exists()
    # simulate an interruption after iteration 3: drop the last checkpoint, then resume
    shutil.rmtree(run / "checkpoints" / "iter_0000006")
    fit(cfg, work_dir=run / "tmp3", report=lambda m, c: shutil.copytree(c, run / "checkpoints" / c.name)
        if c is not None and c.name == "iter_0000003" else None)
    result = train_local(cfg, run, resume=True, progress=False)
    assert result.status == "completed"
    df = pd.read_parquet(run / "metrics.parquet")
    assert df["iteration"].tolist() == [1, 2, 3, 4, 5, 6]  # resumed rows replace, never duplicate


def test_resume_without_checkpoint_is_an_error(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train_local(tiny_config(tmp_path / "cache"), tmp_path / "empty", resume=True, progress=False)


def test_divergence_stops_with_status_and_iteration(tmp_path: Path):
    cfg = tiny_config(tmp_path / "cache", **{"optim.lr": 1e12, "optim.warmup_iters": 0, "optim.name": "sgd",
                                               "optim.momentum": 0.0, "run.iterations": 20})
    reports: list[dict] = []
    result = fit(cfg, work_dir=tmp_path / "run", report=lambda m, c: reports.append(m))
    assert result.status == "diverged"
    assert result.iteration < 20 and f"Diverged at iteration {result.iteration}" in result.error
    assert reports[-1]["iteration"] == result.iteration
    assert any(math.isnan(v) for v in reports[-1].values())


def test_lr_schedule_warmup_and_poly():
    kw = dict(total=100, warmup=10, warmup_ratio=1e-6, power=1.0)
    assert lr_factor(0, **kw) == pytest.approx(1e-6)
    assert lr_factor(5, **kw) == pytest.approx((1 - 0.05) * (1 - 0.5 * (1 - 1e-6)))
    assert lr_factor(10, **kw) == pytest.approx(0.9)
    assert lr_factor(100, **kw) == 0.0
