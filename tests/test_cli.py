"""The CLI as a user runs it: train → evaluate reproduces the run's mIoU; bad input exits with a named error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import SYNTHETIC, tiny_overrides
from uda_ray.cli import main


def _args(overrides: dict) -> list[str]:
    out = []
    for k, v in overrides.items():
        v = f"[{', '.join(map(str, v))}]" if isinstance(v, list) else v
        out.append(f"{k}={v}")
    return out


def test_train_then_evaluate(tmp_path: Path, synthetic_cache: Path, capsys: pytest.CaptureFixture):
    args = _args(tiny_overrides(synthetic_cache))
    code = main(["train", str(SYNTHETIC), *args, "--name", "cli", "--output-dir", str(tmp_path), "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    assert "status: completed at iteration 6" in out
    run = tmp_path / "cli"
    metrics = pd.read_parquet(run / "metrics.parquet")
    final = metrics["val/miou"].dropna().iloc[-1]
    assert main(["evaluate", str(run / "checkpoints" / "iter_0000006")]) == 0
    head, *rows = capsys.readouterr().out.splitlines()
    assert head == "evaluated: student of iteration 6 on the target val split: 3 images; IoU in percent"
    lines = dict(line.split() for line in rows)
    assert float(lines["val/miou"]) == pytest.approx(100 * final, abs=0.006)
    # the prediction grid of every evaluation, beside the checkpoints
    assert sorted(p.name for p in (run / "images").iterdir()) == ["iter_0000003.png", "iter_0000006.png"]
    # the coloured prediction of every val image
    out_dir = tmp_path / "predictions"
    assert main(["evaluate", str(run / "checkpoints" / "iter_0000006"), "--save-images", str(out_dir)]) == 0
    assert "coloured predictions of the 3 images" in capsys.readouterr().out
    files = sorted(out_dir.glob("*.png"))
    assert len(files) == 3
    from PIL import Image

    from uda_ray.train.images import colorize

    palette = {tuple(c) for c in colorize(np.arange(19, dtype=np.uint8)[None])[0]}
    image = np.asarray(Image.open(files[0]).convert("RGB"))
    assert image.shape[:2] == (32, 64) and {tuple(c) for c in image.reshape(-1, 3)} <= palette


def test_hrda_train_then_evaluate_gives_the_same_score(tmp_path: Path, synthetic_cache: Path,
                                                      capsys: pytest.CaptureFixture):
    """An HRDA run (slide evaluation, each window through the context and detail passes) evaluated again from its
    checkpoint by `uda-ray evaluate` reports the run's mIoU; its prediction grids are drawn by the HRDA model."""
    from tests.train.test_train_recipes import HRDA_TOY

    args = _args(tiny_overrides(synthetic_cache, **HRDA_TOY))
    code = main(["train", str(SYNTHETIC), *args, "--name", "hrda", "--output-dir", str(tmp_path), "--no-progress"])
    assert code == 0
    run = tmp_path / "hrda"
    final = pd.read_parquet(run / "metrics.parquet")["val/miou"].dropna().iloc[-1]
    capsys.readouterr()
    assert main(["evaluate", str(run / "checkpoints" / "iter_0000004")]) == 0
    lines = dict(line.split() for line in capsys.readouterr().out.splitlines()[1:])
    assert float(lines["val/miou"]) == pytest.approx(100 * final, abs=0.006)
    assert sorted(p.name for p in (run / "images").iterdir()) == ["iter_0000002.png", "iter_0000004.png"]


@pytest.mark.parametrize("argv, message", [
    (["train", str(SYNTHETIC), "loss.cluda.temprature=1"], "closest valid key: 'loss.cluda.temperature'"),
    (["train", "nope.yaml"], "nope.yaml: config file not found"),
    (["evaluate", "/no/such/checkpoint"], "no checkpoint here"),
    (["tune", str(SYNTHETIC)], "synthetic.yaml"),  # a run config is not a search space
])
def test_bad_input_exits_2_with_named_error(argv: list[str], message: str, capsys: pytest.CaptureFixture):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_outcome_names_the_search_metric_and_the_miou(capsys: pytest.CaptureFixture):
    from uda_ray.cli import _print_outcome

    best = {"trial_id": "abc", "last/train/loss": 0.123456, "last/val/miou": 0.1714, "score_iteration": 300,
            "checkpoint": "results/x/trial_abc/checkpoint_000002", "overrides": '{"optim.lr": 0.01}'}
    _print_outcome("results/x", best, ("train/loss",))
    out = capsys.readouterr().out
    assert "best trial abc: train/loss 0.1235, val/miou 17.14% (at its last evaluation, iteration 300)\n" in out
    assert '  overrides:  {"optim.lr": 0.01}' in out and "uda-ray retrain results/x" in out
    assert "  checkpoint: results/x/trial_abc/checkpoint_000002  (uda-ray evaluate it" in out
