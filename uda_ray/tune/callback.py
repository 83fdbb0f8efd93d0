"""Driver-side Tune callback that writes every trial to the parquet tables as its results arrive.

    <root>/<experiment>/trials/<trial_id>.parquet    one row: status, error, config/*, best/*, last/*, provenance
    <root>/<experiment>/metrics/<trial_id>.parquet   one row per report

Each write replaces the trial's file atomically (``uda_ray.results.store``), so a crashed or stopped trial leaves
the other trials' files untouched and a resumed search overwrites instead of duplicating. Rows are keyed by the
trainer's ``iteration``: when a retried or resumed trial reports an iteration again, the rows from that iteration
on are replaced, and rows already on storage from an earlier driver process are picked up first.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from ray.tune import Callback
from ray.tune.experiment import Trial

from uda_ray.config import Config, flatten
from uda_ray.results.provenance import git_revision, package_versions
from uda_ray.results.schema import is_metric_name, metric_text
from uda_ray.results.store import (
    exists,
    join,
    load_metrics,
    load_trials,
    metrics_uri,
    resolve,
    trial_row,
    write_metrics,
    write_trial,
)

log = logging.getLogger(__name__)

# Trials seen by this driver process, by id, so the searcher can read a failed trial's error text.
LIVE_TRIALS: dict[str, Trial] = {}


@dataclass(frozen=True)
class TrialInfo:
    """What the callback needs to know about a trial from its Tune config."""

    config: Config
    overrides: dict[str, Any]
    cell: str | None = None
    seed: int | None = None
    source_trial_id: str | None = None


@dataclass
class _TrialState:
    info: TrialInfo
    started_at: float
    reports: list[dict[str, float]] = field(default_factory=list)
    loaded: bool = False


def error_text(trial: Trial) -> str:
    """The last line of a trial's error that names the exception (``TrialDiverged: Diverged at …``)."""
    # the local copy is written at once; the storage copy (trial.get_error) only after the next sync
    local = trial.error_file
    if local and Path(local).is_file():
        text = Path(local).read_text(errors="replace")
    else:
        err = trial.get_error()
        text = str(err) if err is not None else ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    named = [ln for ln in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Diverged|Interrupt|Exit)\b.*:", ln)]
    return (named or lines or [""])[-1][:2000]


def error_of(trial_id: str) -> str:
    trial = LIVE_TRIALS.get(trial_id)
    return error_text(trial) if trial is not None else ""


class ResultsCallback(Callback):
    """Writes the parquet tables; with ``progress`` it also prints one line per evaluation and per finished trial
    with the search metric and the best value so far (Tune's own table shows the first few reported metrics,
    which need not include the search metric)."""

    def __init__(self, *, root: str, experiment: str, kind: str, metric: str, mode: str,
                 trial_info: Callable[[dict[str, Any]], TrialInfo], progress: bool = True,
                 cache_every_s: float = 600.0) -> None:
        self.root, self.experiment, self.kind = root, experiment, kind
        self.metric, self.mode = metric, mode
        self.trial_info = trial_info
        self.progress = progress
        # the read cache of uda_ray.results is brought up to date when a trial ends, at most this often (it reads
        # and rewrites the consolidated tables: about a second at 10,000 trials, spent in Tune's event loop), and
        # at the end: an analysis of a running, stopped or crashed search then reads few trial files
        self.cache_every_s = cache_every_s
        self._cached_at = time.monotonic()
        self._trials: dict[str, _TrialState] = {}
        self._best: tuple[float, str] | None = None  # (value, trial id) of the best search-metric report so far
        self._git_rev: str | None = None
        self._versions: dict[str, str] | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks with the experiment state; per-trial buffers are rebuilt from storage
        state = dict(self.__dict__)
        state["_trials"] = {}
        state["_cached_at"] = float("-inf")  # monotonic clocks do not carry over to a resumed driver
        return state

    # ------------------------------------------------------------------------------------------ Tune hooks
    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        LIVE_TRIALS[trial.trial_id] = trial
        state = self._state(trial)
        self._write_row(trial.trial_id, state, "RUNNING")

    def on_trial_recover(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        LIVE_TRIALS[trial.trial_id] = trial

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any) -> None:
        state = self._state(trial)
        report = {k: float(v) for k, v in result.items()
                  if is_metric_name(k) and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if "iteration" not in result:
            return
        report["iteration"] = float(result["iteration"])
        it = report["iteration"]
        if not state.loaded:
            state.reports = self._stored_reports(trial.trial_id)
            state.loaded = True
        state.reports = [r for r in state.reports if r["iteration"] < it] + [report]
        write_metrics(self.root, self.experiment, trial.trial_id, state.reports)
        if any(k.startswith("val/") for k in report):
            self._write_row(trial.trial_id, state, "RUNNING")
        value = report.get(self.metric)
        if value is not None and math.isfinite(value):
            if self._best is None or (value > self._best[0] if self.mode == "max" else value < self._best[0]):
                self._best = (value, trial.trial_id)
            self._say(f"{trial.trial_id} iteration {int(it)}: {metric_text(self.metric, value)}")

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        state = self._state(trial)
        last = state.reports[-1]["iteration"] if state.reports else 0
        status = "TERMINATED" if last >= state.info.config.run.iterations else "PRUNED"
        self._write_row(trial.trial_id, state, status, ended=True)
        self._say(f"{trial.trial_id} {status} at iteration {int(last)}")
        self._refresh_cache()

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        state = self._state(trial)
        message = error_text(trial)
        status = "DIVERGED" if "Diverged" in message else "ERROR"
        self._write_row(trial.trial_id, state, status, error=message, ended=True)
        self._say(f"{trial.trial_id} {status}: {message}")
        self._refresh_cache()

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        self._refresh_cache(force=True)

    # ------------------------------------------------------------------------------------------- helpers
    def _refresh_cache(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._cached_at < self.cache_every_s:
            return
        uri = join(self.root, self.experiment)
        try:
            load_trials(uri)
            load_metrics(uri)
        except (OSError, ValueError) as e:  # the cache is an optimisation: never fail the search over it
            log.warning("could not refresh the read cache of %s: %s", uri, e)
        self._cached_at = time.monotonic()

    def _say(self, what: str) -> None:
        if not self.progress:
            return
        best = ""
        if self._best is not None:
            best = f"  (best so far {metric_text(self.metric, self._best[0])}, trial {self._best[1]})"
        print(f"[uda-ray] {what}{best}", flush=True)

    def _state(self, trial: Trial) -> _TrialState:
        if trial.trial_id not in self._trials:
            self._trials[trial.trial_id] = _TrialState(self.trial_info(trial.config), time.time())
        return self._trials[trial.trial_id]

    def _stored_reports(self, trial_id: str) -> list[dict[str, float]]:
        uri = metrics_uri(self.root, self.experiment, trial_id)
        if not exists(uri):
            return []
        fs, path = resolve(uri)
        df = pq.read_table(path, filesystem=fs).to_pandas()
        cols = [c for c in df.columns if c == "iteration" or is_metric_name(c)]
        return [{k: float(v) for k, v in r.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}
                for r in df[cols].to_dict("records")]

    def _write_row(self, trial_id: str, state: _TrialState, status: str, *, error: str = "",
                   ended: bool = False) -> None:
        if self._git_rev is None:
            self._git_rev, self._versions = git_revision(), package_versions()
        info = state.info
        now = time.time()
        row = trial_row(experiment=self.experiment, trial_id=trial_id, kind=self.kind, status=status,
                        config=flatten(info.config), overrides=info.overrides, reports=state.reports,
                        metric=self.metric, mode=self.mode, error=error, started_at=state.started_at,
                        ended_at=now if ended else None, wall_s=now - state.started_at, cell=info.cell,
                        seed=info.seed, source_trial_id=info.source_trial_id, git_rev=self._git_rev,
                        versions=self._versions)
        write_trial(self.root, row)
