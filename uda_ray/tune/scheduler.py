"""ASHA that survives ``--resume``: its rungs are rebuilt from the parquet metrics of the experiment.

Tune restores a search from the Tuner it pickled at launch, whose scheduler is still empty: after an interrupted
search is resumed, plain ASHA has forgotten every value its rungs recorded, so a trial it would have stopped at a
rung runs on. ASHA's state is a function of the results it was given: a rung at milestone m records, for each
trial, the metric of the first result with ``iteration >= m`` that carries the metric (one rung per result, the
highest milestone not yet recorded), whatever the other trials did. The parquet metrics table holds exactly the
results Tune received (the results callback writes each one), so replaying every trial's stored results through
the bracket, in iteration order, rebuilds the rungs as they were. That happens once, when the restored scheduler
meets its first trial; on a fresh search there is nothing to replay.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import pandas as pd
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler

from uda_ray.results.store import METRICS_DIR, exists, join, load_metrics

log = logging.getLogger(__name__)


class _Replayed:
    """What ``_Bracket.on_result`` reads of a trial: its id."""

    def __init__(self, trial_id: str) -> None:
        self.trial_id = trial_id


class ResumableASHA(ASHAScheduler):
    """``ASHAScheduler`` (one bracket, ``time_attr="iteration"``) that replays ``<experiment>/metrics`` on restore."""

    def __init__(self, *, experiment_uri: str, **kwargs: Any) -> None:
        super().__init__(time_attr="iteration", brackets=1, **kwargs)
        self._experiment_uri = experiment_uri
        self._replayed = False

    def replay(self, metrics: pd.DataFrame) -> int:
        """Feed every stored evaluation to the bracket (per trial, by iteration); returns the number fed."""
        if metrics.empty or self._metric not in metrics.columns:
            return 0
        bracket = self._brackets[0]
        fed = 0
        for trial_id, rows in metrics.sort_values(["trial_id", "iteration"], kind="stable").groupby("trial_id"):
            trial = _Replayed(str(trial_id))
            for it, value in zip(rows["iteration"].tolist(), rows[self._metric].tolist()):
                if value is None or not math.isfinite(float(value)):
                    continue
                bracket.on_result(trial, int(it), self._metric_op * float(value))
                fed += 1
        return fed

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        if not self._replayed:
            self._replayed = True
            if exists(join(self._experiment_uri, METRICS_DIR)):
                fed = self.replay(load_metrics(self._experiment_uri))
                log.info("ASHA rungs rebuilt from %d stored evaluations of %s", fed, self._experiment_uri)
        super().on_trial_add(tune_controller, trial)
