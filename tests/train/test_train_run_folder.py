"""`uda-ray train` leaves no half-made folder that looks like a result: a run that stops before its first
checkpoint removes the folder it created; a later failure marks it ERROR in status.json, which analyze reports and
--resume continues (its metrics rows once each); a folder with checkpoints is never trained into again without
--resume. Preflight lists every missing input at once."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import ROOT, SYNTHETIC, tiny_overrides
from uda_ray.analysis.report import RUN_STATUS, NotAnExperiment, analyze
from uda_ray.cli import main
from uda_ray.config import load_config
from uda_ray.train import run as run_mod
from uda_ray.train.run import STATUS_FILE, RunFolderError, train_local


def _cfg(cache: Path):
    return load_config(SYNTHETIC, tiny_overrides(cache, **{"run.save_images": False}))


def test_status_file_names_agree() -> None:
    assert RUN_STATUS == STATUS_FILE


def test_failure_before_the_first_checkpoint_leaves_no_folder(synthetic_cache: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(cfg, **kw):
        raise RuntimeError("boom before any checkpoint")

    monkeypatch.setattr(run_mod, "fit", broken)
    with pytest.raises(RuntimeError, match="boom"):
        train_local(_cfg(synthetic_cache), tmp_path / "runs" / "r", progress=False)
    assert not (tmp_path / "runs" / "r").exists()


def test_later_failure_is_marked_then_resumed(synthetic_cache: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    real_fit = run_mod.fit

    def fails_at_4(cfg, *, report, **kw):
        def wrapped(metrics, checkpoint):
            report(metrics, checkpoint)
            if metrics["iteration"] >= 4:
                raise RuntimeError("boom at iteration 4")
        return real_fit(cfg, report=wrapped, **kw)

    run = tmp_path / "runs" / "r"
    monkeypatch.setattr(run_mod, "fit", fails_at_4)
    with pytest.raises(RuntimeError, match="boom"):
        train_local(_cfg(synthetic_cache), run, progress=False)
    status = json.loads((run / STATUS_FILE).read_text())
    assert status["status"] == "ERROR" and "RuntimeError: boom at iteration 4" in status["error"]
    assert status["checkpoint"].endswith("iter_0000003") and status["resume"].endswith("--name r --resume")
    with pytest.raises(NotAnExperiment, match=r"one `uda-ray train` run \(status ERROR; error: RuntimeError: boom"):
        analyze(str(run))
    with pytest.raises(RunFolderError, match="already holds a run .*iter_0000003.*--resume"):
        train_local(_cfg(synthetic_cache), run, progress=False)
    monkeypatch.setattr(run_mod, "fit", real_fit)
    assert list(pd.read_parquet(run / "metrics.parquet")["iteration"]) == [1, 2, 3, 4]
    result = train_local(_cfg(synthetic_cache), run, resume=True, progress=False)
    assert result.status == "completed"
    assert json.loads((run / STATUS_FILE).read_text())["status"] == "TERMINATED"
    # the report of iteration 4 came after the checkpoint it resumed from: made again, and once
    metrics = pd.read_parquet(run / "metrics.parquet")
    assert list(metrics["iteration"]) == [1, 2, 3, 4, 5, 6] and set(metrics["trial_id"]) == {"r"}


def test_preflight_lists_every_missing_input_at_once(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["train", str(ROOT / "search_spaces" / "base" / "daformer_gta2cs.yaml"), "--output-dir",
                 str(tmp_path), f"data.source_root={tmp_path / 'gta'}", f"data.target_root={tmp_path / 'cs'}",
                 f"model.pretrained_path={tmp_path / 'mit_b5.pth'}"])
    err = capsys.readouterr().err
    assert code == 2 and "3 problems" in err
    for key in ("data.source_root", "data.target_root", "model.pretrained_path"):
        assert f"  - {key} = '{tmp_path}" in err, err
    assert not list(tmp_path.iterdir())  # nothing was written


def test_resume_with_other_settings_is_refused(synthetic_cache: Path, tmp_path: Path) -> None:
    from uda_ray.config import apply_overrides

    run = tmp_path / "r"
    cfg = apply_overrides(_cfg(synthetic_cache), {"run.iterations": 3})
    train_local(cfg, run, progress=False)
    changed = r"other settings \(loss\.cluda\.weight: 0\.0 → 1\.0; loss\.cluda\.fm_size: \d+ → 9\)"
    with pytest.raises(RunFolderError, match=changed):
        train_local(apply_overrides(cfg, {"loss.cluda.weight": 1.0, "loss.cluda.fm_size": 9}), run, resume=True,
                    progress=False)
    longer = train_local(apply_overrides(cfg, {"run.iterations": 6}), run, resume=True, progress=False)
    assert longer.status == "completed" and longer.iteration == 6  # training longer is a resume
