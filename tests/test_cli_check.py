"""`--check` validates everything a command would run and exits without writing or starting anything; a missing
data root, pretrained file or a bad trial config is reported as it would be by the command itself (no Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray

from tests.conftest import ROOT
from uda_ray.cli import main
from uda_ray.tune import ablate, search

SPACES = ROOT / "search_spaces"


@pytest.fixture()
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(address: str | None) -> None:
        raise AssertionError("--check started Ray")

    monkeypatch.setattr(search, "init_ray", refuse)
    monkeypatch.setattr(ablate, "init_ray", refuse)


def test_tune_check_prints_the_plan_and_writes_nothing(no_ray: None, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    assert main(["tune", str(SPACES / "demo.yaml"), "--storage", str(tmp_path / "r"), "--check",
                 "num_samples=3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("uda-ray tune --check: ") and "valid. 3 trial(s) of 300 iterations, 2 at a time" in out
    assert "ASHA stopping trials at iterations 100..300" in out and "It would write" in out
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())
    assert not ray.is_initialized()


def test_ablate_check(no_ray: None, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["ablate", str(SPACES / "ablations" / "components.yaml"), "--storage", str(tmp_path), "--check",
                 "seeds=[0]"]) == 0
    out = capsys.readouterr().out
    assert "6 cell(s) (baseline, +cluda, +cfcontra, +sdca, +target_mix, all) x 1 seed(s) = 6 run(s) of 300" in out
    assert not any(tmp_path.iterdir())


def test_train_check(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", str(SPACES / "base" / "synthetic.yaml"), "--output-dir", str(tmp_path), "--name", "x",
                 "--check"]) == 0
    assert "is valid (800 iterations)" in capsys.readouterr().out and not (tmp_path / "x").exists()


def test_check_reports_missing_data_as_the_command_would(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["train", str(SPACES / "base" / "daformer_gta2cs.yaml"), "--check", "--output-dir", str(tmp_path),
                 f"data.source_root={tmp_path / 'gta'}", f"data.target_root={tmp_path / 'cityscapes'}"])
    err = capsys.readouterr().err
    assert code == 2 and "data.source_root" in err and "data.target_root" in err and "model.pretrained_path" in err
