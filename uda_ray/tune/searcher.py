"""``OptunaSearch`` that tells Optuna what really happened to each trial, with the trials table's numbers.

Ray's ``OptunaSearch`` records a trial that ASHA stopped early as COMPLETE with its truncated score, expects the
metric in every result, and never sees the result a trial was stopped on (Tune hands the stopping result to
``on_trial_complete`` only). Here:
- every evaluation (a result that carries the metric) is an intermediate value at the trainer's own ``iteration``,
  the stopping one included, so a pruned trial's last intermediate value is its score (``uda_ray.results.schema``:
  the metric at the last evaluation), which Optuna also stores as that trial's value;
- a trial that ended before ``total_iterations`` without error is PRUNED; one that reached it is COMPLETE with the
  metric of its last result (its score); a crashed or diverged trial is FAIL with its reason in the user attribute
  ``fail_reason``; the search goes on in every case;
- each Optuna trial carries the user attributes ``trial_id`` and ``experiment``, to join the study with the parquet
  tables;
- a finished trial is kept as its id only: Tune saves the searcher with every snapshot of the experiment.

After a driver is killed, the study on disk can be ahead of the searcher state Tune saved (a trial told COMPLETE
after the last experiment checkpoint); a restored searcher leaves the trials the study already finished as they are
(a re-run from its checkpoint reports the same values again).
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
    def __init__(self, *args: Any, total_iterations: int, experiment: str = "",
                 error_of: Callable[[str], str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._total_iterations = total_iterations
        self._experiment = experiment
        self._error_of = error_of
        self._reported: dict[str, set[int]] = {}  # trial id -> iterations already told to Optuna
        self._finished_in_study: set[int] = set()  # Optuna trial numbers finished before a restore

    def suggest(self, trial_id: str) -> dict | None:
        params = super().suggest(trial_id)
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None and "trial_id" not in ot_trial.user_attrs:
            ot_trial.set_user_attr("trial_id", trial_id)
            ot_trial.set_user_attr("experiment", self._experiment)
        return params

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        done = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
        self._finished_in_study = {t.number for t in self._ot_study.get_trials(deepcopy=False, states=done)}

    def _settled(self, trial_id: str) -> bool:
        """Whether the study already holds this trial's outcome (told before a driver was killed)."""
        return self._ot_trials[trial_id].number in getattr(self, "_finished_in_study", ())

    def _report(self, trial_id: str, result: dict | None) -> None:
        """Record ``result``'s metric as an intermediate value at its iteration (evaluation results only)."""
        if not result or isinstance(self.metric, list) or self._settled(trial_id):
            return
        value = result.get(self.metric)
        if value is None or "iteration" not in result or not math.isfinite(float(value)):
            return
        step = int(result["iteration"])
        seen = self._reported.setdefault(trial_id, set())
        if step not in seen:  # a resumed trial reports the iterations after its checkpoint again
            self._ot_trials[trial_id].report(float(value), step)
            seen.add(step)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._completed_trials:
            return
        self._report(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        if self._settled(trial_id):
            self._forget(trial_id)
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
            self._report(trial_id, result)  # the evaluation ASHA stopped it on
            state, told = TrialState.PRUNED, None
        else:
            self._report(trial_id, result)
            state, told = TrialState.COMPLETE, values if isinstance(self.metric, list) else values[0]
        self._ot_study.tell(ot_trial, told, state=state)
        self._forget(trial_id)

    def _forget(self, trial_id: str) -> None:
        """A finished trial: only its id is kept. Tune saves the searcher with every snapshot of the experiment (at
        every checkpoint), so what it holds of finished trials would make each snapshot grow with the search."""
        self._completed_trials.add(trial_id)
        self._ot_trials.pop(trial_id, None)
        self._reported.pop(trial_id, None)
