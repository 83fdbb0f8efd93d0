"""``uda-ray tune``: a search from a YAML space — Optuna define-by-run + ASHA on Ray Tune, trials to parquet."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from uda_ray.results.store import join, write_bytes
from uda_ray.train.worker import Scaling
from uda_ray.tune.callback import TrialInfo, error_of
from uda_ray.tune.driver import (
    Experiment,
    ExperimentSpec,
    best_row,
    choose_experiment,
    init_ray,
    run_experiment,
    storage_root,
)
from uda_ray.tune.searcher import UdaOptunaSearch
from uda_ray.tune.space import (
    SearchSpec,
    build_sampler,
    define_by_run,
    load_space,
    trial_config,
    trial_overrides,
)
from uda_ray.tune.spec_yaml import base_config, objectives, own_overrides

STUDY_FILE = "optuna.db"


@dataclass(frozen=True)
class SearchOutcome:
    experiment: Experiment
    best: dict[str, Any] | None  # the trials-table row of the best finished trial by the first metric
    study_storage: str
    metrics: tuple[str, ...] = ("val/miou",)  # the search's metric(s)


def scaling_of(spec: Any) -> Scaling:
    r = spec.resources
    return Scaling(num_workers=r.workers, use_gpu=r.gpus_per_worker > 0, cpus_per_worker=r.cpus_per_worker,
                   gpus_per_worker=r.gpus_per_worker)


def study_storage(exp: Experiment) -> str:
    """Optuna storage URL: SQLite in the experiment folder (a local folder beside it for URI storage)."""
    local = exp.local_dir or Path("results") / exp.name
    local.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(local / STUDY_FILE).resolve()}"


def run_search(space_path: str | Path, *, address: str | None = None, storage: str | None = None,
               name: str | None = None, resume: bool = False, num_samples: int | None = None) -> SearchOutcome:
    spec: SearchSpec = load_space(space_path)  # validated before Ray starts
    if num_samples is not None:
        if num_samples < 1:
            raise ValueError(f"--num-samples {num_samples}: expected at least 1")
        spec = dataclasses.replace(spec, num_samples=num_samples)
    base = base_config(spec)
    exp = choose_experiment(storage_root(storage), spec.experiment, name=name, resume=resume)
    if not resume:
        write_bytes(Path(space_path).read_bytes(), join(exp.uri, "search_space.yaml"))
    study_url = study_storage(exp)
    init_ray(address)

    metric, mode = spec.metric, spec.mode
    searcher = UdaOptunaSearch(space=define_by_run(spec), metric=metric, mode=mode, sampler=build_sampler(spec),
                               study_name=exp.name, storage=optuna.storages.RDBStorage(study_url),
                               total_iterations=base.run.iterations, error_of=error_of)
    s = spec.scheduler
    scheduler = FIFOScheduler()
    if s.type == "asha":
        scheduler = ASHAScheduler(time_attr="iteration", metric=metric, mode=mode, max_t=s.max_t,
                                  grace_period=s.grace_period, reduction_factor=s.reduction_factor)

    def trial_info(tune_config: dict[str, Any]) -> TrialInfo:
        return TrialInfo(config=trial_config(spec, tune_config),
                         overrides=own_overrides(spec, trial_overrides(spec, tune_config)))

    run_experiment(ExperimentSpec(
        experiment=exp, kind="search", metric=metric, mode=mode,
        config_of=lambda c: trial_config(spec, c), trial_info=trial_info, scaling=scaling_of(spec),
        num_samples=spec.num_samples, max_concurrent=spec.max_concurrent, max_failures=spec.max_failures,
        search_alg=searcher, scheduler=scheduler), resume=resume)
    objs = objectives(metric, mode)
    return SearchOutcome(exp, best_row(exp, *objs[0]), study_url, tuple(m for m, _ in objs))
