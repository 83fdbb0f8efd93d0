"""Driver-side Tune callback that writes every trial to the parquet tables as its results arrive.

    <root>/<experiment>/trials/_live/<trial_id>.parquet    one row: status, error, config/*, best/*, last/*, provenance
    <root>/<experiment>/metrics/_live/<trial_id>.parquet   one row per report

Each write replaces the trial's live file atomically (``uda_ray.results.store``), so a crashed or stopped trial
leaves the other trials' files untouched and a resumed search overwrites instead of duplicating. At most every
``COMPACT_EVERY_S`` while results arrive (less often when compactions would take more than ``COMPACT_SHARE`` of the
driver's time), and when the experiment ends, the live files are compacted into the tables' parts (what plain pandas
reads); the callback is the one process that compacts its experiment. Rows are keyed by the trainer's
``iteration``: when a retried or resumed trial reports an iteration again, the rows from that iteration on are
replaced, and rows already on storage from an earlier driver process are picked up first.

A trial's row is written when it starts, ends or errs and whenever a result brings a checkpoint; its reports, and
its row as it runs, go to its live files with the next compaction (the driver answers every report of a function
trainable before the trial goes on, so writing them one by one would hold every trial up). What a killed driver
has not written yet comes after the trial's last checkpoint, which is where a resumed search runs it from again.

The trial row also records the checkpoint written at the scored evaluation (Tune's checkpoint of an in-process
trial, the Train run's checkpoint path of a trial with Train workers) and ``wall_s``, the time the trial has run
over every driver process of a resumed search (written with every compaction while it runs).

A trial that raises an error no retry can fix (``uda_ray.train.worker.NON_RETRYABLE``: config, data and checkpoint
errors; a chain's ``StageFailed``) reports ``NON_RETRYABLE_KEY`` just before it raises; the callback then sets the
trial's ``max_failures`` to 0, so Tune records the error instead of starting the same failure again.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.experiment import Trial
from ray.tune.result import SHOULD_CHECKPOINT

from uda_ray.config import Config, flatten
from uda_ray.results.provenance import git_revision, package_versions
from uda_ray.results.schema import STATUSES, is_metric_name, metric_text
from uda_ray.results.store import (
    METRICS_DIR,
    TRIALS_DIR,
    TableFolder,
    experiment_uri,
    metrics_table,
    score_of,
    table_folder,
    trial_row,
    trials_table,
)
from uda_ray.stages.chain import Chain, Run
from uda_ray.stages.run import stage_columns

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
    chain: str | None = None  # the trial's chain of stages (JSON), when its run is one
    stages: dict[str, str] | None = None  # stage/<name>/key and stage/<name>/uri of the stages it uses

    @classmethod
    def of_run(cls, run: Run, stage_root: str, **fields: Any) -> TrialInfo:
        """The info of a trial that runs ``run``: its config, or a chain's final config with the chain and the
        columns of its stages (cached under ``stage_root``); ``fields`` are the others."""
        if isinstance(run, Chain):
            return cls(config=run.final_config, chain=run.to_json(), stages=stage_columns(run, stage_root), **fields)
        return cls(config=run, **fields)


NON_RETRYABLE_KEY = "uda_ray_non_retryable"  # no "/": never a metric
CHECKPOINT_PATH_KEY = "checkpoint_path"  # set by Ray Train's TuneReportCallback on reports with a checkpoint
# plain pandas sees a running search this late at most, while compactions are quick: each one rewrites only the
# parts that hold the trials that wrote since the last one (bounded by store.PART_ROWS), but on a busy driver of a
# large search one takes long enough (0.5 s seen on 2 cores at 500 trials) that it is also spaced to take at most
# COMPACT_SHARE of the driver's time: every result waits while it runs
COMPACT_EVERY_S = 10.0
COMPACT_SHARE = 0.02


SETTLED_STATUSES = ("TERMINATED", "PRUNED")


@dataclass
class _TrialState:
    info: TrialInfo
    started_at: float  # when the trial first started, over every driver process
    segment_start: float  # when this driver process first saw it
    prior_s: float = 0.0  # seconds it ran under earlier driver processes
    reports: list[dict[str, float]] = field(default_factory=list)
    checkpoints: dict[int, str] = field(default_factory=dict)  # iteration -> checkpoint path
    reports_behind: bool = False  # reports not yet in the metrics live file
    row_behind: bool = False  # the running row not yet in the trials live file
    # (ended_at, wall_s) of a trial whose stored row had already ended when a resumed search restored it: Tune may
    # restore such a trial from its last checkpoint (its experiment state was saved before the trial ended) and
    # complete it again at once; its row then keeps the original end time and running time
    settled: tuple[float, float] | None = None

    def wall_s(self, now: float) -> float:
        return self.prior_s + now - self.segment_start


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
    """Writes the parquet tables; with ``progress`` it also prints uda-ray's status lines, which take the place of
    Tune's live table (the driver runs Tune with ``verbose=0``): one line per started trial, per evaluation and
    per ended trial, with the search metric in the units people read (``metric_text``: mIoU in percent) and the
    best finished value so far, and after every ended trial the count of trials by uda-ray's status (a trial that
    ASHA stopped is PRUNED, where Tune's table said TERMINATED)."""

    def __init__(self, *, root: str, experiment: str, kind: str, metric: str, mode: str,
                 trial_info: Callable[[dict[str, Any]], TrialInfo], progress: bool = True,
                 compact_every_s: float = COMPACT_EVERY_S) -> None:
        self.root, self.experiment, self.kind = root, experiment, kind
        self.metric, self.mode = metric, mode
        self.trial_info = trial_info
        self.progress = progress
        self.compact_every_s = compact_every_s
        self._compacted_at = time.monotonic()
        self._compact_took = 0.0  # seconds the last compaction took
        self._folders: tuple[TableFolder, TableFolder] | None = None  # (trials, metrics), made when first needed
        self._trials: dict[str, _TrialState] = {}
        self._status: dict[str, str] = {}  # uda-ray's status of every trial that ended (kept over a resume)
        # (score, trial id) of the best finished trial so far: the score is the last evaluation, as in the tables
        self._best: tuple[float, str] | None = None
        self._git_rev: str | None = None
        self._versions: dict[str, str] | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks with the experiment state; per-trial buffers are rebuilt from storage
        state = dict(self.__dict__)
        state["_trials"] = {}
        state["_folders"] = None  # what a folder knows of its parts is read again by the resumed driver
        state["_compacted_at"] = float("-inf")  # monotonic clocks do not carry over to a resumed driver
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # a state pickled by an older version lacks what was added since
        self.__dict__.update({"_status": {}, "_folders": None, "_compacted_at": float("-inf"), "_compact_took": 0.0,
                              "compact_every_s": COMPACT_EVERY_S, **state})

    # ------------------------------------------------------------------------------------------ Tune hooks
    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        LIVE_TRIALS[trial.trial_id] = trial
        state = self._state(trial)
        self._write_row(trial.trial_id, state, "RUNNING")
        self._status.pop(trial.trial_id, None)
        self._say(f"{trial.trial_id} started: {json.dumps(state.info.overrides, sort_keys=True, default=str)}",
                  best=False)

    def on_trial_recover(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        LIVE_TRIALS[trial.trial_id] = trial

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any) -> None:
        if result.get(NON_RETRYABLE_KEY):
            trial.max_failures = 0  # read by Trial.should_recover when the error that follows is processed
            return
        state = self._state(trial)
        report = {k: float(v) for k, v in result.items()
                  if is_metric_name(k) and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if "iteration" not in result:
            return
        report["iteration"] = float(result["iteration"])
        it = report["iteration"]
        state.settled = None  # it runs again: a new end time
        state.reports = [r for r in state.reports if r["iteration"] < it] + [report]
        state.reports_behind = state.row_behind = True
        # what came before a checkpoint, which a resumed search runs the trial from, is on storage before Tune
        # records the checkpoint: a Train run's checkpoint comes with the result (the row records it), Tune's own
        # is saved from this result (on_checkpoint then writes the row with it)
        if result.get(CHECKPOINT_PATH_KEY):
            state.checkpoints[int(it)] = str(result[CHECKPOINT_PATH_KEY])
            self._write_running(trial.trial_id, state)
        elif result.get(SHOULD_CHECKPOINT):
            self._write_reports(trial.trial_id, state)
        value = report.get(self.metric)
        if value is not None and math.isfinite(value):
            self._say(f"{trial.trial_id} iteration {int(it)}: {metric_text(self.metric, value)}")
        self._compact()

    def on_checkpoint(self, iteration: int, trials: list[Trial], trial: Trial, checkpoint: Any, **info: Any) -> None:
        """Tune's checkpoint of an in-process trial, saved from the result just processed."""
        last = getattr(trial, "last_result", None) or {}
        if "iteration" not in last:
            return
        state = self._state(trial)
        it = int(last["iteration"])
        state.checkpoints[it] = checkpoint.path
        if score_of(state.reports, self.metric)[1] == it:  # the row records the scored evaluation's checkpoint
            state.row_behind = True
            self._write_running(trial.trial_id, state)

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        state = self._state(trial)
        last = state.reports[-1]["iteration"] if state.reports else 0
        status = "TERMINATED" if last >= state.info.config.run.iterations else "PRUNED"
        score = score_of(state.reports, self.metric)[0]
        if status == "TERMINATED" and score is not None and math.isfinite(score) and (
                self._best is None or (score > self._best[0] if self.mode == "max" else score < self._best[0])):
            self._best = (score, trial.trial_id)
        self._write_reports(trial.trial_id, state)
        self._write_row(trial.trial_id, state, status, ended=True)
        self._ended(trial.trial_id, status)
        self._say(f"{trial.trial_id} {status} at iteration {int(last)}")
        self._say_counts(trials)
        self._compact()

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        state = self._state(trial)
        message = error_text(trial)
        # a trial whose own run diverged; a stage it needed that diverged is an error of the trial (StageFailed)
        status = "DIVERGED" if "Diverged" in message and "StageFailed" not in message else "ERROR"
        self._write_reports(trial.trial_id, state)
        self._write_row(trial.trial_id, state, status, error=message, ended=True)
        self._ended(trial.trial_id, status)
        self._say(f"{trial.trial_id} {status}: {message}")
        self._say_counts(trials)
        self._compact()

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        self._compact(force=True)

    # ------------------------------------------------------------------------------------------- helpers
    def _tables(self) -> tuple[TableFolder, TableFolder]:
        if self._folders is None:
            uri = experiment_uri(self.root, self.experiment)
            self._folders = (table_folder(uri, TRIALS_DIR), table_folder(uri, METRICS_DIR))
        return self._folders

    def _compact(self, force: bool = False) -> None:
        start = time.monotonic()
        # compact_every_s 0: at every call (tests)
        wait = self.compact_every_s and max(self.compact_every_s, self._compact_took / COMPACT_SHARE)
        if not force and start - self._compacted_at < wait:
            return
        for trial_id, state in self._trials.items():
            self._write_running(trial_id, state)
        try:
            for folder in self._tables():
                folder.compact()
        except (OSError, ValueError) as e:  # the live files still hold every row: the next compaction tries again
            log.warning("could not compact the tables of %s: %s", experiment_uri(self.root, self.experiment), e)
        self._compacted_at = time.monotonic()
        self._compact_took = self._compacted_at - start

    def _say(self, what: str, *, best: bool = True) -> None:
        if not self.progress:
            return
        so_far = ""
        if best and self._best is not None:
            so_far = f"  (best finished so far {metric_text(self.metric, self._best[0])}, trial {self._best[1]})"
        print(f"[uda-ray] {what}{so_far}", flush=True)

    def _say_counts(self, trials: list[Trial]) -> None:
        """``trials: 3 TERMINATED, 2 PRUNED, 2 RUNNING, 1 PENDING``: uda-ray's status of the trials that ended, Tune's
        of the others (``trials`` is Tune's list of every trial of the experiment)."""
        status = {t.trial_id: self._status.get(t.trial_id, str(getattr(t, "status", "RUNNING"))) for t in trials}
        status.update({tid: s for tid, s in self._status.items() if tid not in status})
        counts = collections.Counter(status.values())
        order = [*STATUSES, "PENDING", "PAUSED"]
        names = sorted(counts, key=lambda s: (order.index(s) if s in order else len(order), s))
        self._say("trials: " + ", ".join(f"{counts[s]} {s}" for s in names), best=False)

    def _ended(self, trial_id: str, status: str) -> None:
        """A trial whose last rows are written: its status is kept, its state (every report) is not; a driver of
        10,000 trials would otherwise hold them all. Should Tune run it again, ``_state`` reads it back from
        storage, as a resumed driver does."""
        self._status[trial_id] = status
        self._trials.pop(trial_id, None)

    def _state(self, trial: Trial) -> _TrialState:
        if trial.trial_id not in self._trials:
            now = time.time()
            state = _TrialState(self.trial_info(trial.config), started_at=now, segment_start=now)
            stored = self._stored_row(trial.trial_id)
            if stored is not None:  # a resumed search: the trial ran under an earlier driver process
                state.reports = self._stored_reports(trial.trial_id)
                if isinstance(stored.get("started_at"), datetime):
                    state.started_at = stored["started_at"].timestamp()
                wall = stored.get("wall_s")
                state.prior_s = float(wall) if isinstance(wall, float) and math.isfinite(wall) else 0.0
                if stored.get("checkpoint") and stored.get("score_iteration") is not None:
                    state.checkpoints[int(stored["score_iteration"])] = stored["checkpoint"]
                if stored.get("status") in SETTLED_STATUSES and isinstance(stored.get("ended_at"), datetime):
                    state.settled = (stored["ended_at"].timestamp(), state.prior_s)
            self._trials[trial.trial_id] = state
        return self._trials[trial.trial_id]

    def _stored_row(self, trial_id: str) -> dict[str, Any] | None:
        table = self._tables()[0].rows_of(trial_id)
        if table is None:
            return None
        rows = table.select(["started_at", "ended_at", "wall_s", "status", "checkpoint", "score_iteration"]).to_pylist()
        return rows[0] if rows else None

    def _stored_reports(self, trial_id: str) -> list[dict[str, float]]:
        table = self._tables()[1].rows_of(trial_id)
        if table is None:
            return []
        df = table.to_pandas()
        cols = [c for c in df.columns if c == "iteration" or is_metric_name(c)]
        return [{k: float(v) for k, v in r.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}
                for r in df[cols].to_dict("records")]

    def _write_running(self, trial_id: str, state: _TrialState) -> None:
        """What the live files of a running trial lack: its new reports, its row."""
        self._write_reports(trial_id, state)
        if state.row_behind:
            self._write_row(trial_id, state, "RUNNING")

    def _write_reports(self, trial_id: str, state: _TrialState) -> None:
        if state.reports_behind:
            self._tables()[1].write(trial_id, metrics_table(self.experiment, trial_id, state.reports))
            state.reports_behind = False

    def _write_row(self, trial_id: str, state: _TrialState, status: str, *, error: str = "",
                   ended: bool = False) -> None:
        if self._git_rev is None:
            self._git_rev, self._versions = git_revision(), package_versions()
        info = state.info
        now = time.time()
        _, scored_at = score_of(state.reports, self.metric)
        ended_at, wall = (now if ended else None), state.wall_s(now)
        if ended and state.settled is not None:
            ended_at, wall = state.settled
        row = trial_row(experiment=self.experiment, trial_id=trial_id, kind=self.kind, status=status,
                        config=flatten(info.config), overrides=info.overrides, reports=state.reports,
                        metric=self.metric, mode=self.mode, error=error, started_at=state.started_at,
                        ended_at=ended_at, wall_s=wall, cell=info.cell,
                        seed=info.seed, source_trial_id=info.source_trial_id, git_rev=self._git_rev,
                        versions=self._versions, checkpoint=state.checkpoints.get(scored_at),
                        chain=info.chain, stages=info.stages)
        self._tables()[0].write(trial_id, trials_table([row]))
        state.row_behind = False
