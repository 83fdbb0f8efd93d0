"""``OptunaSearch`` that tells Optuna what really happened to each trial.

Ray's ``OptunaSearch`` records a trial that ASHA stopped early as COMPLETE with its truncated score and
expects the metric in every result. Here: intermediate values are reported at the trainer's own ``iteration``
and only from results that carry the metric (evaluation reports); a trial that ended before ``total_iterations``
without error is PRUNED; a crashed or diverged trial is FAIL with its reason in the user attribute
``fail_reason``; the search goes on in every case.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

log = logging.getLogger(__name__)


class UdaOptunaSearch(OptunaSearch):
    def __init__(self, *args: Any, total_iterations: int, error_of: Callable[[str], str] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._total_iterations = total_iterations
        self._error_of = error_of

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if isinstance(self.metric, list) or trial_id in self._completed_trials:
            return
        value = result.get(self.metric)
        if value is None or "iteration" not in result or not math.isfinite(float(value)):
            return
        self._ot_trials[trial_id].report(float(value), int(result["iteration"]))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        ot_trial = self._ot_trials[trial_id]
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        values = [None if not result or result.get(m) is None else float(result[m]) for m in metrics]
        finite = all(v is not None and math.isfinite(v) for v in values)
        reached = bool(result) and int(result.get("iteration", 0)) >= self._total_iterations
        if error or (reached and not finite):
            reason = self._error_of(trial_id) if self._error_of else ""
            ot_trial.set_user_attr("fail_reason", reason or "trial failed without an error message")
            state, told = TrialState.FAIL, None
        elif not reached:
            state, told = TrialState.PRUNED, None
        else:
            state, told = TrialState.COMPLETE, values if isinstance(self.metric, list) else values[0]
        self._ot_study.tell(ot_trial, told, state=state)
        self._completed_trials.add(trial_id)
