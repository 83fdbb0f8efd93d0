"""An in-process trial reports through Ray's own ``ray.tune.report`` without a ``RayDeprecationWarning``: its
checkpoints are ``ray.tune.Checkpoint`` (Ray 2.5x warns on ``ray.train.Checkpoint`` in a Tune function trainable).
No Ray runtime: Ray's session lookup is replaced by a recording session."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import ray.train._internal.session as train_session
import ray.tune
import ray.tune.trainable.trainable_fn_utils as tune_fn_utils
from ray.util.annotations import RayDeprecationWarning

from tests.conftest import SYNTHETIC, tiny_overrides
from uda_ray.config import load_config
from uda_ray.train import worker


class _Session:
    """What ``ray.tune.report``/``get_checkpoint`` ask of a Tune session."""

    loaded_checkpoint = None
    world_rank = None

    def __init__(self) -> None:
        self.reports: list[tuple[dict[str, Any], Any]] = []

    def report(self, metrics: dict[str, Any], checkpoint: Any = None) -> None:
        self.reports.append((dict(metrics), checkpoint))


def test_in_process_trial_reports_tune_checkpoints_without_deprecation_warning(
        synthetic_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    session = _Session()
    monkeypatch.setattr(train_session, "get_session", lambda: session)
    monkeypatch.setattr(tune_fn_utils, "get_session", lambda: session)
    cfg = load_config(SYNTHETIC, tiny_overrides(synthetic_cache, **{"run.iterations": 2, "run.eval_every": 2,
                                                                    "run.checkpoint_every": 2,
                                                                    "run.save_images": False}))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RayDeprecationWarning)
        worker.run_in_process(cfg)
    checkpoints = [c for _, c in session.reports if c is not None]
    assert [m["iteration"] for m, _ in session.reports][-1] == 2
    assert checkpoints and all(isinstance(c, ray.tune.Checkpoint) for c in checkpoints)


def test_the_wrong_checkpoint_class_would_warn(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The check above can fail: Ray's report does warn on a Train checkpoint in a Tune function."""
    session = _Session()
    monkeypatch.setattr(train_session, "get_session", lambda: session)
    monkeypatch.setattr(tune_fn_utils, "get_session", lambda: session)
    with pytest.warns(RayDeprecationWarning, match="ray.tune"):
        ray.tune.report({"iteration": 1}, checkpoint=ray.train.Checkpoint.from_directory(str(tmp_path)))
