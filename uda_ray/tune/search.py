"""``uda-ray tune``: a search from a YAML space — Optuna define-by-run + ASHA on Ray Tune, trials to parquet."""

from __future__ import annotations

import dataclasses
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from ray.tune.schedulers import FIFOScheduler

from uda_ray.config import Config
from uda_ray.preflight import preflight
from uda_ray.stages.chain import Chain, final_config
from uda_ray.stages.check import preflight_chain
from uda_ray.train.worker import Scaling
from uda_ray.tune.callback import TrialInfo, error_of
from uda_ray.tune.driver import (
    Experiment,
    ExperimentSpec,
    best_row,
    choose_experiment,
    init_ray,
    launch_base,
    launch_overrides,
    launch_spec,
    run_experiment,
    status_counts,
    storage_root,
)
from uda_ray.tune.scheduler import ResumableASHA
from uda_ray.tune.searcher import UdaOptunaSearch
from uda_ray.tune.space import (
    SearchSpec,
    build_sampler,
    define_by_run,
    load_space,
    trial_config,
    trial_overrides,
    trial_run,
)
from uda_ray.tune.spec_yaml import naming_spec_overrides, objectives, own_overrides

STUDY_FILE = "optuna.log"  # the search's Optuna study: Optuna's journal file (JournalFileBackend)
SQLITE_STUDY_FILE = "optuna.db"  # the study of a search launched before uda-ray kept it in a journal (SQLite)
SPACE_COPY = "search_space.yaml"  # the space a search was launched with (read by uda_ray.analysis.importance)


@dataclass(frozen=True)
class SearchOutcome:
    experiment: Experiment
    best: dict[str, Any] | None  # the trials-table row of the best finished trial by the first metric's score
    study_storage: str
    metrics: tuple[str, ...] = ("val/miou",)  # the search's metric(s)
    interrupted: bool = False  # stopped by SIGINT before the search ended: `--resume` continues it
    statuses: dict[str, int] = dataclasses.field(default_factory=dict)  # trials by status
    plan: str = ""  # with ``check``: what the search would run (nothing ran)


def scaling_of(spec: Any) -> Scaling:
    r = spec.resources
    return Scaling(num_workers=r.workers, use_gpu=r.gpus_per_worker > 0, cpus_per_worker=r.cpus_per_worker,
                   gpus_per_worker=r.gpus_per_worker)


def study_storage(exp: Experiment) -> str:
    """Where the search's Optuna study is: the journal file ``optuna.log`` in the experiment folder (for URI
    storage, a local folder of that name beside it), or the URL of its SQLite file for a search launched with its
    study in SQLite (a resumed one keeps it). ``optuna-dashboard`` opens either; ``load_study`` reads either."""
    local = exp.local_dir or Path("results") / exp.name
    local.mkdir(parents=True, exist_ok=True)
    return _location(_study_file(local))


def _study_file(folder: Path) -> Path:
    """The study file of an experiment folder: the SQLite file a search launched before the journal left there, or
    else the journal."""
    sqlite = folder / SQLITE_STUDY_FILE
    return sqlite if sqlite.is_file() else folder / STUDY_FILE


def _location(study_file: Path) -> str:
    """``open_study_storage``'s location of a study file: an SQLite URL, or the journal's path."""
    return f"sqlite:///{study_file.resolve()}" if study_file.suffix == ".db" else str(study_file.resolve())


class _StudyConnection(sqlite3.Connection):
    """A connection to a study's SQLite file that commits without waiting for the disk (``synchronous=OFF``): Optuna
    commits several times per trial, and a commit that waits for the disk takes ~10 ms."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.execute("PRAGMA synchronous=OFF")


def open_study_storage(location: str) -> optuna.storages.BaseStorage:
    """The Optuna storage at ``study_storage``'s ``location``.

    A journal appends one line per change and keeps the study in memory, reading only the lines it has not read
    yet: 5 to 7 ms of the driver's time per trial where SQLite through SQLAlchemy took 30 to 40 ms, and no schema
    to create when a search starts (SQLite: 0.1 s, 0.8 s with its first import); ``benchmarks/search_scale.py``
    prints both side by side."""
    if location.startswith("sqlite:///"):
        return optuna.storages.RDBStorage(location, engine_kwargs={"connect_args": {"factory": _StudyConnection}})
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(location))


def load_study(where: str | Path) -> optuna.Study:
    """The Optuna study of a search: ``where`` is the local experiment folder it is in (``results/<experiment>``,
    also for a search whose tables went to a bucket: the study stays with the driver), its study file, or the
    location the search printed (a journal file's path or an SQLite URL)."""
    location = str(where)
    if not location.startswith("sqlite:///"):
        path = Path(location)
        if path.is_dir():
            folder, path = path, _study_file(path)
            if not path.is_file():
                raise FileNotFoundError(f"{folder}: no Optuna study ({STUDY_FILE} or {SQLITE_STUDY_FILE}); the study "
                                        f"of a search is in the local folder of its experiment")
        elif not path.is_file():
            raise FileNotFoundError(f"{path}: no such experiment folder or study file")
        location = _location(path)
    storage = open_study_storage(location)
    names = optuna.get_all_study_names(storage)
    if len(names) != 1:
        raise ValueError(f"{location}: {len(names)} Optuna studies ({', '.join(names) or 'none'}); a search's "
                         f"study file holds its one study")
    return optuna.load_study(study_name=names[0], storage=storage)


def fail_lost_trials(study_url: str, study_name: str, trial_ids: list[str]) -> None:
    """Mark the Optuna trials of lost trials (``uda_ray.tune.driver.set_aside_lost_trials``) FAIL with the reason,
    so the study does not keep them RUNNING forever."""
    study = optuna.load_study(study_name=study_name, storage=open_study_storage(study_url))
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if t.user_attrs.get("trial_id") in trial_ids:
            study._storage.set_trial_user_attr(t._trial_id, "fail_reason", "lost: started after the last saved "
                                               "state of a driver that was killed; sampled again on resume")
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)


def describe_search(spec: SearchSpec, base: Config, exp: Experiment) -> str:
    """What a search would run, in one paragraph (``uda-ray tune --check``)."""
    r, s = spec.resources, spec.scheduler
    where = f"{r.workers} Train worker(s) per trial" if r.workers else "in-process trials"
    stop = (f"ASHA stopping trials at iterations {s.grace_period}..{s.max_t} (reduction factor {s.reduction_factor:g})"
            if s.type == "asha" else "no early stopping")
    return (f"{spec.path}: valid. {spec.num_samples} trial(s) of {base.run.iterations} iterations, "
            f"{spec.max_concurrent} at a time ({where}, {r.cpus_per_worker:g} CPU and {r.gpus_per_worker:g} GPU "
            f"each), {spec.sampler} sampler, {stop}; the data, files and storage they need are in place. It would "
            f"write {exp.uri}.")


def run_search(space_path: str | Path, *, address: str | None = None, storage: str | None = None,
               name: str | None = None, resume: bool = False, num_samples: int | None = None,
               overrides: list[str] | None = None, check: bool = False) -> SearchOutcome:
    """Run (or with ``resume`` continue) the search of ``space_path``; ``overrides`` (``key=value``) change its base
    config, as ``uda-ray train`` does, or the space's own settings (``num_samples=4``, ``scheduler.max_t=100``;
    ``uda_ray.tune.spec_yaml.read_header``). A resumed search keeps the overrides it was launched with. With
    ``check`` everything is validated (the space, every trial's config, the data, files and storage it needs) and
    the plan returned, and nothing is written or started."""
    # validated before Ray starts
    spec: SearchSpec = naming_spec_overrides(lambda: load_space(space_path, overrides), overrides)
    exp = choose_experiment(storage_root(storage), spec.experiment, name=name, resume=resume)
    launched = list(overrides or []) if check else launch_overrides(exp, overrides, resume)
    if launched != list(overrides or []):
        spec = naming_spec_overrides(lambda: load_space(space_path, launched), launched)
    if num_samples is not None:
        if num_samples < 1:
            raise ValueError(f"--num-samples {num_samples}: expected at least 1")
        spec = dataclasses.replace(spec, num_samples=num_samples)
    base = spec.base
    if isinstance(base, Chain):
        preflight_chain(base, storage=exp.root)
    else:
        preflight([base], storage=exp.root)
    if check:
        return SearchOutcome(exp, None, "", plan=describe_search(spec, final_config(base), exp))
    launch_spec(exp, Path(space_path), SPACE_COPY, resume, "search space")
    launch_base(exp, base, spec.base_config, resume)
    study_url = study_storage(exp)
    init_ray(address)

    metric, mode = spec.metric, spec.mode
    searcher = UdaOptunaSearch(space=define_by_run(spec), metric=metric, mode=mode, sampler=build_sampler(spec),
                               study_name=exp.name, storage=open_study_storage(study_url),
                               total_iterations=final_config(base).run.iterations, experiment=exp.name,
                               error_of=error_of)
    s = spec.scheduler
    scheduler = FIFOScheduler()
    if s.type == "asha":
        scheduler = ResumableASHA(experiment_uri=exp.uri, metric=metric, mode=mode, max_t=s.max_t,
                                  grace_period=s.grace_period, reduction_factor=s.reduction_factor)

    def trial_info(tune_config: dict[str, Any]) -> TrialInfo:
        return TrialInfo.of_run(trial_run(spec, tune_config), exp.root,
                                overrides=own_overrides(spec, trial_overrides(spec, tune_config)))

    run = run_experiment(ExperimentSpec(
        experiment=exp, kind="search", metric=metric, mode=mode,
        config_of=lambda c: trial_config(spec, c), trial_info=trial_info, scaling=scaling_of(spec),
        num_samples=spec.num_samples, max_concurrent=spec.max_concurrent, max_failures=spec.max_failures,
        search_alg=searcher, scheduler=scheduler, on_lost=lambda ids: fail_lost_trials(study_url, exp.name, ids),
        loggers=spec.loggers, chain_of=(lambda c: trial_run(spec, c)) if isinstance(base, Chain) else None),
        resume=resume)
    objs = objectives(metric, mode)
    return SearchOutcome(exp, best_row(exp, *objs[0]), study_url, tuple(m for m, _ in objs),
                         interrupted=run.interrupted, statuses=status_counts(exp.uri))
