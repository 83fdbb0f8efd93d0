"""Run a Tune experiment whose trials are UDA runs: the shared machinery of ``tune``, ``ablate`` and ``retrain``.

Every trial is a Tune function trainable that acts as the Ray Train driver: it turns its Tune config into a run
config and either trains in-process (0 workers) or launches a ``TorchTrainer`` whose reports reach Tune through
``TuneReportCallback`` (see ``uda_ray.train.worker``). The ``ResultsCallback`` writes the parquet tables.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from uda_ray.config import Config
from uda_ray.results.store import experiment_uri, join, load_trials, resolve
from uda_ray.train.worker import Scaling, run_in_process, run_trainer
from uda_ray.tune.callback import ResultsCallback, TrialInfo
from uda_ray.tune.spec_yaml import objectives

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


def init_ray(address: str | None) -> None:
    """Connect to ``address`` (a running cluster, or "auto"), or start a local Ray (the embedded default)."""
    # Results without the search metric (train-loss reports between evaluations) are expected
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    # A stopped trial whose process does not exit within this many seconds is killed, which takes its Train
    # controller and worker group with it (Tune's default waits 600 s, holding the workers' resources meanwhile)
    os.environ.setdefault("TUNE_FORCE_TRIAL_CLEANUP_S", "30")
    # Short runs checkpoint every few seconds, and with CheckpointConfig(num_to_keep) each checkpoint forces a
    # (small, local) experiment-state snapshot; Tune warns about that on every one. Paper-scale runs checkpoint
    # minutes apart and never reach the warning's threshold.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if ray.is_initialized():
        return
    ray.init(address=address, log_to_driver=True,
             runtime_env={"env_vars": {"TUNE_DISABLE_STRICT_METRIC_CHECKING": "1"}})


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


def make_trainable(config_of: Callable[[dict[str, Any]], Config], scaling: Scaling,
                   train_storage: str) -> Callable[[dict[str, Any]], None]:
    """The Tune function trainable: one UDA run per trial."""

    def trainable(tune_config: dict[str, Any]) -> None:
        cfg = config_of(tune_config)
        if scaling.num_workers == 0:
            run_in_process(cfg)
            return
        trial_id = tune.get_context().get_trial_id()
        # named after the trial, so a retried trial finds its own Train run and resumes from its checkpoint
        run_trainer(cfg, scaling, name=f"train-{trial_id}", storage_path=train_storage,
                    callbacks=[TuneReportCallback()])

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


def _trial_dirname(trial: tune.experiment.Trial) -> str:
    """Short trial folders (Tune's default encodes every override into the name)."""
    return f"trial_{trial.trial_id}"


def run_experiment(spec: ExperimentSpec, *, resume: bool = False) -> tune.ResultGrid:
    exp = spec.experiment
    objs = objectives(spec.metric, spec.mode)
    first_metric, first_mode = objs[0]
    trainable = tune.with_resources(
        make_trainable(spec.config_of, spec.scaling, join(exp.uri, "train")),
        trial_resources(spec.scaling))
    # what Tune's per-trial result boxes show (Ray reads this attribute of a function trainable); without it they
    # list every reported metric, 19 per-class IoUs included
    trainable._progress_metrics = list(dict.fromkeys([*(m for m, _ in objs), "val/miou", "train/loss", "iteration"]))
    if resume:
        tuner = tune.Tuner.restore(exp.uri, trainable=trainable, resume_unfinished=True, resume_errored=False,
                                   param_space=spec.param_space)
        return tuner.fit()
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
        run_config=tune.RunConfig(name=exp.name, storage_path=exp.root, callbacks=[callback],
                                  failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
    )
    return tuner.fit()


def best_row(experiment: Experiment, metric: str, mode: str) -> dict[str, Any] | None:
    """The finished trial with the best ``best/<metric>``, as a dict, from the parquet rows."""
    df = load_trials(experiment.uri)
    col = f"best/{metric}"
    if df.empty or col not in df:
        return None
    done = df[(df["status"] == "TERMINATED") & df[col].notna()]
    if done.empty:
        return None
    idx = done[col].idxmax() if mode == "max" else done[col].idxmin()
    return done.loc[idx].to_dict()
