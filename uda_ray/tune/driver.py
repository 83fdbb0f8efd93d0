"""Run a Tune experiment whose trials are UDA runs: the shared machinery of ``tune``, ``ablate`` and ``retrain``.

Every trial is a Tune function trainable that acts as the Ray Train driver: it turns its Tune config into a run
config and either trains in-process (0 workers) or launches a ``TorchTrainer`` whose reports reach Tune through
``TuneReportCallback`` (see ``uda_ray.train.worker``). The ``ResultsCallback`` writes the parquet tables.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from uda_ray.config import Config, to_dict
from uda_ray.results.store import (
    METRICS_DIR,
    TRIALS_DIR,
    exists,
    experiment_uri,
    join,
    load_trials,
    read_bytes,
    resolve,
    table_folder,
    trial_images_uri,
    write_bytes,
)
from uda_ray.stages.chain import Chain, Run, StageFailed
from uda_ray.stages.kinds.train import stage_trainer
from uda_ray.stages.run import ChainRun
from uda_ray.train.worker import Scaling, is_non_retryable, run_in_process, run_trainer
from uda_ray.tune.callback import NON_RETRYABLE_KEY, ResultsCallback, TrialInfo
from uda_ray.tune.cluster import ClusterAuthError, auth_message, describe_cluster, is_auth_failure, joining_address
from uda_ray.tune.local_ray import end_leftovers, record_session
from uda_ray.tune.local_ray import start as start_local_ray
from uda_ray.tune.spec_yaml import objectives
from uda_ray.tune.stage_coordinator import coordinate_with, start_coordinator

DEFAULT_ROOT = "results"
TUNE_STATE = "tuner.pkl"


class ExperimentError(ValueError):
    """A name, path or resume request that cannot be honoured; the message says which and why."""


@dataclass(frozen=True)
class Experiment:
    """Where an experiment lives: ``<root>/<name>`` (a local folder or a pyarrow.fs URI)."""

    root: str
    name: str

    @property
    def uri(self) -> str:
        return experiment_uri(self.root, self.name)

    @property
    def local_dir(self) -> Path | None:
        return Path(self.uri) if "://" not in self.uri else None


def storage_root(storage: str | None) -> str:
    """Absolute local folder or URI under which experiments are written (default ``./results``)."""
    root = storage or DEFAULT_ROOT
    return root.rstrip("/") if "://" in root else str(Path(root).expanduser().resolve())


def _has_tune_state(root: str, name: str) -> bool:
    fs, path = resolve(join(root, name, TUNE_STATE))
    return fs.get_file_info(path).type.name == "File"


def _existing_names(root: str) -> list[str]:
    fs, path = resolve(root)
    if fs.get_file_info(path).type.name != "Directory":
        return []
    from pyarrow.fs import FileSelector

    return [f.base_name for f in fs.get_file_info(FileSelector(path)) if f.type.name == "Directory"]


def choose_experiment(root: str, base_name: str, *, name: str | None, resume: bool) -> Experiment:
    """A fresh unique ``<base_name>-<time>`` (or ``name``); with ``resume`` the named or newest matching one."""
    existing = _existing_names(root)
    if resume:
        if name is None:
            pattern = rf"{re.escape(base_name)}-\d{{8}}-\d{{6}}(-\d+)?"
            candidates = sorted(n for n in existing if re.fullmatch(pattern, n) and _has_tune_state(root, n))
            if not candidates:
                raise ExperimentError(f"--resume: no interrupted '{base_name}-<time>' experiment under {root}; "
                                      "name one with --name")
            name = candidates[-1]
        if not _has_tune_state(root, name):
            raise ExperimentError(f"--resume: {join(root, name)} holds no Tune experiment state ({TUNE_STATE})")
        return Experiment(root, name)
    if name is not None:
        if name in existing:
            raise ExperimentError(f"experiment {join(root, name)} already exists: pass --resume to continue it, "
                                  "or choose another --name")
        return Experiment(root, name)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate, k = f"{base_name}-{stamp}", 1
    while candidate in existing:
        k += 1
        candidate = f"{base_name}-{stamp}-{k}"
    return Experiment(root, candidate)


OVERRIDES_FILE = "overrides.json"


def launch_overrides(exp: Experiment, overrides: list[str] | None, resume: bool) -> list[str]:
    """The command-line overrides an experiment runs with: recorded in ``<experiment>/overrides.json`` at launch;
    a resume reuses them (giving none) or must repeat them exactly."""
    given = list(overrides or [])
    uri = join(exp.uri, OVERRIDES_FILE)
    if not resume:
        write_bytes(json.dumps(given).encode(), uri)
        return given
    stored = json.loads(read_bytes(uri)) if exists(uri) else []
    if given and given != stored:
        raise ExperimentError(f"--resume: overrides {given} differ from those {exp.uri} was launched with "
                              f"({stored}); resume without overrides, or with exactly those")
    return stored


def launch_spec(exp: Experiment, spec_path: Path, copy_name: str, resume: bool, what: str) -> None:
    """The spec file an experiment runs (``what``: "search space", "ablation spec"): copied to
    ``<experiment>/<copy_name>`` at launch; a resume must be given the same file (its trials, ASHA's rungs and the
    analysis's distributions all come from the launch's)."""
    stored = join(exp.uri, copy_name)
    if not resume:
        write_bytes(spec_path.read_bytes(), stored)
        return
    if not exists(stored):
        raise ExperimentError(f"--resume: {stored} is missing: {exp.uri} was not launched from a {what}")
    if read_bytes(stored) != spec_path.read_bytes():
        raise ExperimentError(f"--resume: {spec_path} differs from the {what} {exp.uri} was launched with ({stored}); "
                              "a resumed experiment runs the same one: restore the file, or launch a new experiment")


BASE_FILE = "base_run.json"


def _base_record(base: Run) -> dict[str, Any]:
    """A base run as plain JSON data: a run config's every key, or a chain's stages (by name) with theirs; not where
    the chain file lies (a checkout moved between launch and resume runs the same chain)."""
    if not isinstance(base, Chain):
        return to_dict(base)
    record = json.loads(base.to_json())
    record.pop("source")
    record["stages"] = {s["name"]: s for s in record["stages"]}
    return record


def _leaves(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_leaves(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def launch_base(exp: Experiment, base: Run, source: Path, resume: bool) -> None:
    """The base run every trial of an experiment starts from: recorded in ``<experiment>/base_run.json`` at launch; a
    resume must start from the same one. A base file edited since the launch (or a file it names) would make the
    resumed trials those of another search beside the finished ones, so the resume is refused, naming what
    changed. An experiment launched before the record existed resumes unchecked."""
    record = json.loads(json.dumps(_base_record(base), default=str))
    uri = join(exp.uri, BASE_FILE)
    if not resume:
        write_bytes(json.dumps(record, sort_keys=True).encode(), uri)
        return
    if not exists(uri):
        return
    stored = json.loads(read_bytes(uri))
    if stored == record:
        return
    before, now = _leaves(stored), _leaves(record)
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    shown = "; ".join(f"{k}: {before.get(k)!r} at launch, {now.get(k)!r} now" for k in changed[:5])
    more = f" (and {len(changed) - 5} more)" if len(changed) > 5 else ""
    raise ExperimentError(f"--resume: {source} now gives another base run than {exp.uri} was launched with "
                          f"({uri}): {shown}{more}. Restore the file as it was to resume, or launch a new experiment")


def init_ray(address: str | None) -> None:
    """Connect to ``address`` (a running cluster, or "auto"; ``$RAY_ADDRESS`` when None and set), or start a local Ray
    (the embedded default); before a local Ray starts, the leftovers of earlier local sessions whose driver was
    killed are ended (``uda_ray.tune.local_ray``). Says which cluster it joined or started (address, nodes, CPUs,
    GPUs); a cluster that refuses the authentication token raises ``ClusterAuthError`` saying what to set
    (``uda_ray.tune.cluster``)."""
    # Results without the search metric (train-loss reports between evaluations) are expected
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    # A stopped trial whose process does not exit within this many seconds is killed, which takes its Train
    # controller and worker group with it (Tune's default waits 600 s, holding the workers' resources meanwhile)
    os.environ.setdefault("TUNE_FORCE_TRIAL_CLEANUP_S", "30")
    # Short runs checkpoint every few seconds, and with CheckpointConfig(num_to_keep) each checkpoint forces a
    # (small, local) experiment-state snapshot; Tune warns about that on every one. Paper-scale runs checkpoint
    # minutes apart and never reach the warning's threshold.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Tune's newer console output prints its configuration box and a `tensorboard --logdir` pointing into Ray's
    # session folder even with verbose=0; the older output is silent at 0 (the event files are in the experiment)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if ray.is_initialized():
        return
    joining = joining_address(address)  # --address, else $RAY_ADDRESS: a cluster that is not ours to record
    if joining is None:
        for line in end_leftovers():
            print(f"[uda-ray] {line}", flush=True)
    runtime_env = {"env_vars": {"TUNE_DISABLE_STRICT_METRIC_CHECKING": "1"}}
    try:
        if joining is not None:
            ray.init(address=address, log_to_driver=True, runtime_env=runtime_env)
        else:
            # a local Ray of its own (Ray itself would join the newest cluster that `ray start` began on this
            # machine, which uda-ray would then call, record and one day end as its own local Ray), whose
            # processes find its state API beside any other Ray of the machine (uda_ray.tune.local_ray)
            start_local_ray(log_to_driver=True, runtime_env=runtime_env)
    except Exception as e:
        if joining is not None and is_auth_failure(e):
            raise ClusterAuthError(auth_message(joining)) from None
        raise
    if joining is None:
        record_session(ray._private.worker.global_worker.node.get_session_dir_path())
    print("[uda-ray] " + describe_cluster(ray.get_runtime_context().gcs_address, ray.nodes(), ray.cluster_resources(),
                                          joined=joining is not None), flush=True)


class _Interruption(logging.Filter):
    """Notices Tune's "interrupted" warning (SIGINT) and drops its advice to call ``Tuner.restore``: the command to
    continue is ``uda-ray … --resume``, which the CLI prints."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "interrupted" in text and "Tuner.restore" in text:
            self.seen = True
            return False
        return True


@contextlib.contextmanager
def _watch_interruption() -> Iterator[_Interruption]:
    watcher = _Interruption()
    logger = logging.getLogger("ray.tune.tune")
    logger.addFilter(watcher)
    try:
        yield watcher
    finally:
        logger.removeFilter(watcher)


def trial_resources(scaling: Scaling) -> dict[str, float]:
    """What a trial (the Train driver) reserves. In-process: one worker's share. With Train workers: the driver
    needs almost nothing; on a cluster with a ``train_driver`` resource (cluster.yaml) it is pinned to that node."""
    if scaling.num_workers == 0:
        res = {"CPU": scaling.cpus_per_worker}
        if scaling.gpus_per_worker:
            res["GPU"] = scaling.gpus_per_worker
        return res
    # The driver only waits on its Train run: no CPU (a fraction would keep a worker that asks for a whole node's
    # CPUs from ever being placed), and a token of memory because Tune refuses an all-zero bundle.
    res = {"CPU": 0.0, "memory": 2**20}
    if "train_driver" in ray.cluster_resources():
        res["train_driver"] = 1.0
    return res


def make_trainable(config_of: Callable[[dict[str, Any]], Config], scaling: Scaling, experiment: Experiment,
                   chain_of: Callable[[dict[str, Any]], Chain | None] | None = None, stage_storage: str | None = None
                   ) -> Callable[[dict[str, Any]], None]:
    """The Tune function trainable: one UDA run per trial. Its prediction grids go to
    ``<experiment>/trial_<id>/images/``, beside the trial's Tune folder. A trial whose run is a chain of stages
    (``chain_of``) first gets every stage its final stage needs from the cache under ``<storage>/stages``, computing
    the missing ones (once across the search's concurrent trials: ``uda_ray.tune.stage_coordinator``), then trains
    the final stage as its reported run. ``stage_storage``: the results root whose ``stages/`` holds the cache
    (default: the experiment's root)."""
    experiment_uri = experiment.uri
    stage_root = stage_storage or experiment.root

    def trainable(tune_config: dict[str, Any]) -> None:
        try:
            trial_id = tune.get_context().get_trial_id()
            chain = chain_of(tune_config) if chain_of is not None else None
            if chain is not None:
                runner = ChainRun(chain, stage_root, who=f"{experiment.name}/{trial_id}",
                                  coordinate=coordinate_with(experiment.name),
                                  train_fn=stage_trainer(scaling, stage_root) if scaling.num_workers else None)
                cfg = runner.prepare().config
            else:
                cfg = config_of(tune_config)
            images = trial_images_uri(experiment_uri, trial_id)
            if scaling.num_workers == 0:
                run_in_process(cfg, images_uri=images)
                return
            # named after the trial, so a retried trial finds its own Train run and resumes from its checkpoint
            run_trainer(cfg, scaling, name=f"train-{trial_id}", storage_path=join(experiment_uri, "train"),
                        callbacks=[TuneReportCallback()], images_uri=images)
        except Exception as e:
            if is_non_retryable(e, also=(StageFailed,)):  # the results callback then takes its retries away
                tune.report({NON_RETRYABLE_KEY: 1.0})
            raise

    return trainable


@dataclass
class ExperimentSpec:
    """Everything ``run_experiment`` needs; built by the search, ablation and retrain front ends."""

    experiment: Experiment
    kind: str
    metric: str | list[str]
    mode: str | list[str]
    config_of: Callable[[dict[str, Any]], Config]
    trial_info: Callable[[dict[str, Any]], TrialInfo]
    scaling: Scaling
    num_samples: int = 1
    max_concurrent: int = 1
    max_failures: int = 0
    param_space: dict[str, Any] | None = None
    search_alg: Any = None
    scheduler: Any = None
    on_lost: Callable[[list[str]], None] | None = None  # told the ids of trials a killed driver lost (on resume)
    chain_of: Callable[[dict[str, Any]], Chain | None] | None = None  # a trial's chain of stages, when it runs one
    stage_storage: str | None = None  # the results root of the stage cache; None = the experiment's root
    loggers: tuple[str, ...] = ()  # extra trial loggers: "mlflow"


def logger_callbacks(loggers: tuple[str, ...], exp: Experiment) -> list[Any]:
    """Tune callbacks for the ``loggers`` of a search space. MLflow logs to ``$MLFLOW_TRACKING_URI``, or by default
    to ``sqlite:///<experiment>/mlflow.db`` for a local experiment (MLflow 3 refuses its old file store), one MLflow
    run per trial in the MLflow experiment named after the uda-ray experiment."""
    out: list[Any] = []
    if "mlflow" in loggers:
        try:
            import mlflow  # noqa: F401 - the callback imports it lazily; fail here, before any trial runs
            from ray.air.integrations.mlflow import MLflowLoggerCallback
        except ImportError as e:
            raise ExperimentError(f"loggers: [mlflow] needs MLflow: pip install 'uda-ray[mlflow]' ({e})") from e
        uri = os.environ.get("MLFLOW_TRACKING_URI", "")
        if not uri:
            fs, path = resolve(exp.uri)
            if fs.type_name != "local":
                raise ExperimentError(f"loggers: [mlflow] with remote storage {exp.uri}: set MLFLOW_TRACKING_URI to "
                                      "your MLflow server")
            uri = f"sqlite:///{Path(path).resolve() / 'mlflow.db'}"
        out.append(MLflowLoggerCallback(tracking_uri=uri, experiment_name=exp.name, save_artifact=False))
    return out


def _trial_dirname(trial: tune.experiment.Trial) -> str:
    """Short trial folders (Tune's default encodes every override into the name); a trial's prediction grids go
    beside Tune's files, to ``trial_<id>/images`` (``uda_ray.results.store.trial_images_uri``)."""
    return f"trial_{trial.trial_id}"


LOST_DIR = "lost"


def set_aside_lost_trials(exp: Experiment) -> list[str]:
    """Trials whose rows exist but whom Tune's saved state does not know: they started after the last experiment
    checkpoint of a driver that was killed, and Tune will not resume them (the search samples a trial in their
    place). Their unfinished rows are moved to ``<experiment>/lost/{trials,metrics}/`` so that the tables hold each
    trial once; returns their ids."""
    from ray.tune import ExperimentAnalysis

    if not exists(join(exp.uri, TRIALS_DIR)):
        return []
    known = {t.trial_id for t in ExperimentAnalysis(exp.uri).trials}
    rows = load_trials(exp.uri)
    lost = sorted(rows.loc[~rows["trial_id"].isin(known) & (rows["status"] == "RUNNING"), "trial_id"])
    if lost:
        for folder in (TRIALS_DIR, METRICS_DIR):
            table_folder(exp.uri, folder).move_out(lost, join(exp.uri, LOST_DIR, folder))
        print(f"[uda-ray] {len(lost)} trial(s) ({', '.join(lost)}) started after the killed driver's last saved "
              f"state; Tune cannot resume them and samples new trials in their place: their rows were moved to "
              f"{join(exp.uri, LOST_DIR)}", flush=True)
    return lost


@dataclass(frozen=True)
class ExperimentRun:
    """What ``run_experiment`` returns: Tune's results and whether the run was interrupted (SIGINT) before it
    finished, in which case ``uda-ray … --resume`` continues it."""

    results: tune.ResultGrid
    interrupted: bool


def run_experiment(spec: ExperimentSpec, *, resume: bool = False) -> ExperimentRun:
    exp = spec.experiment
    objs = objectives(spec.metric, spec.mode)
    first_metric, first_mode = objs[0]
    trainable = tune.with_resources(
        make_trainable(spec.config_of, spec.scaling, exp, spec.chain_of, spec.stage_storage),
        trial_resources(spec.scaling))
    # held until the experiment ends: an actor lives as long as a handle to it
    coordinator = start_coordinator(exp.name) if spec.chain_of is not None else None  # noqa: F841
    # what Tune's per-trial result boxes show (Ray reads this attribute of a function trainable); without it they
    # list every reported metric, 19 per-class IoUs included
    trainable._progress_metrics = list(dict.fromkeys([*(m for m, _ in objs), "val/miou", "train/loss", "iteration"]))
    if resume:
        lost = set_aside_lost_trials(exp)
        if lost and spec.on_lost is not None:
            spec.on_lost(lost)
        tuner = tune.Tuner.restore(exp.uri, trainable=trainable, resume_unfinished=True, resume_errored=False,
                                   param_space=spec.param_space)
        with _watch_interruption() as watcher:
            results = tuner.fit()
        return ExperimentRun(results, watcher.seen)
    callback = ResultsCallback(root=exp.root, experiment=exp.name, kind=spec.kind, metric=first_metric,
                               mode=first_mode, trial_info=spec.trial_info)
    tuner = tune.Tuner(
        trainable,
        param_space=spec.param_space or {},
        tune_config=tune.TuneConfig(search_alg=spec.search_alg, scheduler=spec.scheduler,
                                    num_samples=spec.num_samples, max_concurrent_trials=spec.max_concurrent,
                                    trial_dirname_creator=_trial_dirname,
                                    # in-process trials reuse a finished trial's process: no interpreter start
                                    # and no torch/timm import per trial (every run seeds and sizes itself in
                                    # fit). Not with Train workers: a stopped trial's process must exit so that
                                    # its Train controller, worker group and their resources go with it.
                                    reuse_actors=spec.scaling.num_workers == 0),
        run_config=tune.RunConfig(name=exp.name, storage_path=exp.root,
                                  callbacks=[callback, *logger_callbacks(spec.loggers, exp)],
                                  failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                                  # the newest checkpoint is the one behind the score: every evaluation writes
                                  # one, and a score is the last evaluation (uda_ray.results.schema). With 1,
                                  # Tune also snapshots the whole experiment state at every checkpoint (every
                                  # trial's state, ~30 kB each: a cost per checkpoint that grows with the number
                                  # of trials), and that is what a resumed search needs: with 2 the snapshots are
                                  # periodic, and a trial that finished after the last one is run again from an
                                  # older checkpoint on resume (tests/tune/test_tune_search_ray.py, kill -9)
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                  # no live table of Tune's: it shows fractions and calls a pruned trial
                                  # TERMINATED; the ResultsCallback prints uda-ray's status lines instead
                                  verbose=0),
    )
    with _watch_interruption() as watcher:
        results = tuner.fit()
    return ExperimentRun(results, watcher.seen)


def status_counts(uri: str) -> dict[str, int]:
    """``{status: number of trials}`` from an experiment's trials table ({} before any trial wrote a row)."""
    if not exists(join(uri, TRIALS_DIR)):
        return {}
    df = load_trials(uri)
    return {str(k): int(v) for k, v in df["status"].value_counts().items()} if not df.empty else {}


def best_row(experiment: Experiment, metric: str, mode: str) -> dict[str, Any] | None:
    """The finished trial with the best score (``last/<metric>``: ``uda_ray.results.schema``), as a dict, from the
    parquet rows; ties go to the smaller trial id, as in every ranking of ``uda_ray.analysis``."""
    # here, not at the top: trial processes import this module with the trainable, and uda_ray.analysis
    # (scipy, matplotlib) would add seconds to each one's start
    from uda_ray.analysis.best import best_trials

    df = load_trials(experiment.uri)
    if df.empty or f"last/{metric}" not in df:
        return None
    top = best_trials(df, metric, mode, 1)
    return None if top.empty else top.iloc[0].to_dict()
