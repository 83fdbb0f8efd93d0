"""A Ray Train run's controller polls its workers every ``TRAIN_POLL_S`` seconds unless the user exported
``$RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``: checked in what Ray hands on to the controller when the trainer starts, for a
trial's run (``run_trainer``) and for a chain's train stage (``stage_trainer``). No Ray runtime: the trainer records
instead of starting."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from ray.train.v2._internal.constants import get_env_vars_to_propagate

from tests.conftest import SYNTHETIC, tiny_overrides
from uda_ray.config import load_config
from uda_ray.stages.kinds.train import stage_trainer
from uda_ray.train import worker
from uda_ray.train.worker import TRAIN_POLL_ENV, TRAIN_POLL_S, Scaling


class _Recording:
    """Stands in for ``TorchTrainer``: ``fit`` records the variables Ray would pass to the run's controller."""

    handed_on: list[dict[str, str]] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def fit(self) -> None:
        _Recording.handed_on.append(get_env_vars_to_propagate())


@pytest.mark.parametrize("exported", [None, "3"])
def test_the_controller_gets_the_poll_interval_unless_the_user_set_one(
        exported: str | None, tmp_path: Path, synthetic_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TRAIN_POLL_ENV, "restored after the test")
    if exported is None:
        monkeypatch.delenv(TRAIN_POLL_ENV)
    else:
        monkeypatch.setenv(TRAIN_POLL_ENV, exported)
    monkeypatch.setattr(worker, "TorchTrainer", _Recording)
    monkeypatch.setattr(_Recording, "handed_on", [])
    cfg = load_config(SYNTHETIC, tiny_overrides(synthetic_cache))
    worker.run_trainer(cfg, Scaling(num_workers=1), name="run", storage_path=str(tmp_path / "train"))
    (tmp_path / "stage").mkdir()
    stage_trainer(Scaling(num_workers=1), str(tmp_path))(cfg, tmp_path / "stage")
    expected = exported or TRAIN_POLL_S
    assert [seen.get(TRAIN_POLL_ENV) for seen in _Recording.handed_on] == [expected, expected]
