"""``uda-ray retrain``: retrain the best trials of a finished experiment with their full schedule over several seeds.

From the source experiment's trials table alone (no YAML): the ``top`` TERMINATED trials by their score
(``uda_ray.analysis.best.best_trials``; pruned, failed, diverged and running trials are never picked), each trial's
exact config rebuilt from its ``config/*`` columns (``config_from_row``), with ``run.seed`` set to every requested
seed and ``run.iterations`` to the trial's own schedule (or ``iterations``). The runs are a Tune grid, one trial per
(source trial, seed), written as an experiment inside the source one::

    <source>/retrain/trials/*.parquet     kind "retrain", with source_trial_id and seed
    <source>/retrain/metrics/*.parquet
    <source>/retrain/<Tune trial folders>  the final checkpoint of every run
    <source>/retrain/retrain.json         what was asked for (checked again by --resume)
    <source>/retrain/summary.csv          per source trial: its score and the iteration it was taken at, the
                                          retrain's iterations, mean and sample std (ddof 1) over the finished
                                          seeds (fractions, as in parquet; ``uda_ray.analysis.summary.seed_summary``)

A second retrain of the same experiment goes to ``retrain-2``, then ``retrain-3``, ...

Like with like: a source trial's score and each retrained run's are the same quantity (the metric at the run's
last evaluation, ``uda_ray.results.schema``), and a retrained run's last evaluation is its final one, made by the
final checkpoint it hands back. With ``iterations`` other than the source trial's own schedule they are no longer
the same quantity: the printed summary says both iteration counts and labels the comparison as one across different
lengths (``comparable`` is False in ``summary.csv``). Under ``eval.holdout`` the source trials were chosen on the
selection half (``val/*``) and the summary also reports the held-out half (``holdout/*``), the number to publish.
``uda-ray analyze <source>`` shows every retrain of the experiment in its report.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import ray
from ray import tune
from ray.tune.schedulers import FIFOScheduler

from uda_ray.analysis.best import best_trials, config_from_row
from uda_ray.analysis.summary import RETRAIN_REQUEST, holdout_metric, seed_summary
from uda_ray.config import Config, apply_overrides
from uda_ray.preflight import preflight
from uda_ray.results.schema import is_percent_metric, metric_value_text
from uda_ray.results.store import exists, join, load_trials, read_bytes, write_bytes
from uda_ray.stages.chain import Chain
from uda_ray.stages.check import preflight_chain
from uda_ray.train.worker import Scaling
from uda_ray.tune.callback import TrialInfo
from uda_ray.tune.driver import (
    TUNE_STATE,
    Experiment,
    ExperimentError,
    ExperimentSpec,
    init_ray,
    run_experiment,
    status_counts,
    storage_root,
)

RETRAIN = "retrain"
REQUEST_FILE = RETRAIN_REQUEST
SUMMARY_FILE = "summary.csv"


@dataclass(frozen=True)
class RetrainRun:
    """One planned run: a source trial's config with one seed (and the schedule) set; for a trial that ran a chain of
    stages, that chain with the seed set (``config`` is its final stage's)."""

    source_trial_id: str
    seed: int
    config: Config
    overrides: dict[str, Any]
    chain: Chain | None = None


@dataclass(frozen=True)
class RetrainOutcome:
    """``chosen``: the picked source rows (``best_trials``: ``rank`` first). ``runs``: one row per retrain trial
    (``trial_id, source_trial_id, seed, status, last/<metric>, checkpoint``). ``summary``: one row per source
    trial and reported metric, as written to ``summary.csv``."""

    source: str
    experiment: Experiment
    metric: str
    mode: str
    chosen: pd.DataFrame
    runs: pd.DataFrame
    summary: pd.DataFrame
    interrupted: bool = False


def source_uri(results_path: str, storage: str | None = None) -> str:
    """The source experiment: ``results_path`` (a folder or URI), or with ``storage`` the experiment name
    ``results_path`` under that results root."""
    if storage is not None:
        if "/" in results_path or "\\" in results_path:
            raise ValueError(f"retrain {results_path!r} with storage {storage!r}: with a storage root, name the "
                             "experiment folder inside it (no path separators), or give the full path without it")
        return join(storage_root(storage), results_path)
    if "://" in results_path:
        return results_path.rstrip("/")
    return str(Path(results_path).expanduser().resolve())


def _check_request(top: int, seeds: Sequence[int], iterations: int | None, workers: int | None) -> None:
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"--top {top!r}: expected an integer >= 1")
    if not seeds:
        raise ValueError("--seeds: expected at least one seed")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ValueError(f"--seeds: {s!r} is not an integer >= 0")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {list(seeds)}: seeds repeat; each seed is one run")
    if iterations is not None and (isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1):
        raise ValueError(f"--iterations {iterations!r}: expected an integer >= 1")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        raise ValueError(f"--workers {workers!r}: expected an integer >= 0 (0: train inside the Tune trial)")


def plan_retrain(trials: pd.DataFrame, *, top: int, seeds: Sequence[int], iterations: int | None, metric: str,
                 mode: str, source: str = "<trials>", reuse_stages: bool = False
                 ) -> tuple[pd.DataFrame, list[RetrainRun]]:
    """The chosen source rows and the runs (source trial × seed, best source first) — no Ray involved.

    A trial that ran a chain of stages (its ``chain`` column) is retrained as that chain: by default the seed is set
    in every stage (each seed gets its own warm-up, statistics, labels, …: the variance of the whole recipe); with
    ``reuse_stages`` only in the final stage, whose earlier stages are then the source trial's own, reused from the
    cache (the variance of the last stage alone). ``iterations`` is the final stage's schedule."""
    _check_request(top, seeds, iterations, None)
    if trials.empty:
        raise ValueError(f"{source}: the trials table is empty; nothing to retrain")
    if f"last/{metric}" not in trials:
        have = sorted(c[len("last/"):] for c in trials.columns if c.startswith("last/"))
        raise ValueError(f"{source}: --metric {metric}: no column 'last/{metric}' in the trials table "
                         f"(metrics recorded: {have})")
    chosen = best_trials(trials, metric, mode, top)
    if chosen.empty:
        counts = ", ".join(f"{n} {s}" for s, n in trials["status"].value_counts().items())
        raise ValueError(f"{source}: no TERMINATED trial with a finite {metric} to retrain (trials: {counts})")
    chains = {str(r["trial_id"]): Chain.from_json(r["chain"]) for _, r in chosen.iterrows()
              if isinstance(r.get("chain"), str) and r["chain"]}
    if reuse_stages and not chains:
        raise ValueError(f"{source}: --reuse-stages: the chosen trials ran no chain of stages (only a chain has "
                         "earlier stages to reuse)")
    runs = []
    for _, row in chosen.iterrows():
        tid = str(row["trial_id"])
        chain = chains.get(tid)
        cfg = chain.final_config if chain is not None else config_from_row(row)
        n = iterations if iterations is not None else cfg.run.iterations
        recorded = row.get("overrides")
        base = json.loads(recorded) if isinstance(recorded, str) and recorded else {}
        for s in seeds:
            changes = {"run.seed": s, "run.iterations": n}
            where = f"{source} trial {tid} seed {s}"
            if chain is None:
                runs.append(RetrainRun(tid, s, apply_overrides(cfg, changes, source=where), {**base, **changes}))
                continue
            seeded = (chain if reuse_stages else chain.with_seed(s)).with_overrides(changes, source=where)
            runs.append(RetrainRun(tid, s, seeded.final_config, {**base, **changes}, seeded))
    return chosen, runs


def _retrain_folders(source: str) -> tuple[list[str], str]:
    """The existing ``retrain``, ``retrain-2``, ... folders of ``source`` in order, and the next free name."""
    existing, k, name = [], 1, RETRAIN
    while exists(join(source, name)):
        existing.append(name)
        k += 1
        name = f"{RETRAIN}-{k}"
    return existing, name


def choose_retrain(source: str, *, resume: bool) -> Experiment:
    """``<source>/retrain`` (or the next free ``retrain-<k>``); with ``resume`` the newest one with Tune state."""
    existing, free = _retrain_folders(source)
    if not resume:
        return Experiment(source, free)
    for name in reversed(existing):
        if exists(join(source, name, TUNE_STATE)):
            return Experiment(source, name)
    raise ExperimentError(f"--resume: no retrain folder with Tune state ({TUNE_STATE}) under {source} "
                          f"(found {existing or 'none'})")


def _request(source: str, metric: str, mode: str, runs: list[RetrainRun]) -> dict[str, Any]:
    return {"source": source, "metric": metric, "mode": mode,
            "runs": [[r.source_trial_id, r.seed, r.config.run.iterations] for r in runs]}


def _check_resume_request(exp: Experiment, request: dict[str, Any]) -> None:
    uri = join(exp.uri, REQUEST_FILE)
    if not exists(uri):
        raise ExperimentError(f"--resume: {uri} is missing: {exp.uri} is not a retrain experiment")
    stored = json.loads(read_bytes(uri))
    if stored["runs"] != request["runs"] or stored["metric"] != request["metric"]:
        raise ExperimentError(f"--resume: the runs asked for now ({request['runs']}, {request['metric']}) differ "
                              f"from those of {uri} ({stored['runs']}, {stored['metric']}); pass the same --top, "
                              "--seeds, --iterations and --metric, or start a new retrain without --resume")


def retrain_scaling(workers: int | None) -> Scaling:
    """``workers`` None or 0: train inside the Tune trial; >= 1: Ray Train DDP workers. Each worker (or the
    in-process trial) takes one GPU when the cluster has any. Call after Ray is initialised."""
    use_gpu = ray.cluster_resources().get("GPU", 0.0) > 0
    return Scaling(num_workers=workers or 0, use_gpu=use_gpu, cpus_per_worker=1.0,
                   gpus_per_worker=1.0 if use_gpu else 0.0)


def run_retrain(results_path: str, *, top: int = 1, seeds: Sequence[int] = (0, 1, 2), iterations: int | None = None,
                address: str | None = None, workers: int | None = None, storage: str | None = None,
                metric: str = "val/miou", mode: str = "max", resume: bool = False,
                reuse_stages: bool = False) -> RetrainOutcome:
    """Retrain the best ``top`` trials of ``results_path`` for every seed (see the module docstring; chains of
    stages and ``reuse_stages``: ``plan_retrain``)."""
    seeds = list(seeds)
    _check_request(top, seeds, iterations, workers)
    source = source_uri(results_path, storage)
    chosen, runs = plan_retrain(load_trials(source), top=top, seeds=seeds, iterations=iterations, metric=metric,
                                mode=mode, source=source, reuse_stages=reuse_stages)  # validated before Ray starts
    exp = choose_retrain(source, resume=resume)
    stage_storage = source.rsplit("/", 1)[0]  # the search's results root: its stages/ holds the cache
    preflight([r.config for r in runs if r.chain is None], storage=source, storage_option="the source experiment")
    preflight_chain(*{r.chain.to_json(): r.chain for r in runs if r.chain is not None}.values())
    request = {**_request(source, metric, mode, runs), "reuse_stages": reuse_stages}
    if resume:
        _check_resume_request(exp, request)
    else:
        write_bytes(json.dumps(request, indent=1).encode(), join(exp.uri, REQUEST_FILE))
    init_ray(address)
    by_key = {(r.source_trial_id, r.seed): r for r in runs}

    def run_of(tune_config: dict[str, Any]) -> RetrainRun:
        t = tune_config.get("trial")
        if not isinstance(t, dict) or (t.get("source_trial_id"), t.get("seed")) not in by_key:
            raise ValueError(f"retrain trial config {tune_config!r}: expected {{'trial': {{'source_trial_id', "
                             f"'seed'}}}} naming one of the planned runs {sorted(by_key)}")
        return by_key[(t["source_trial_id"], t["seed"])]

    def trial_info(tune_config: dict[str, Any]) -> TrialInfo:
        r = run_of(tune_config)
        return TrialInfo.of_run(r.chain or r.config, stage_storage, overrides=r.overrides, seed=r.seed,
                                source_trial_id=r.source_trial_id)

    entries = [{"source_trial_id": r.source_trial_id, "seed": r.seed} for r in runs]
    run = run_experiment(ExperimentSpec(
        experiment=exp, kind="retrain", metric=metric, mode=mode, config_of=lambda c: run_of(c).config,
        trial_info=trial_info, scaling=retrain_scaling(workers), num_samples=1, max_concurrent=len(runs),
        param_space={"trial": tune.grid_search(entries)}, scheduler=FIFOScheduler(),
        chain_of=(lambda c: run_of(c).chain) if any(r.chain for r in runs) else None, stage_storage=stage_storage),
        resume=resume)

    rows = load_trials(exp.uri) if status_counts(exp.uri) else pd.DataFrame(columns=["trial_id", "status"])
    cols = ("trial_id", "source_trial_id", "seed", "status", "iterations", f"last/{metric}",
            f"last/{holdout_metric(metric)}", "checkpoint")
    table = rows[[c for c in cols if c in rows]].copy()
    if not table.empty:
        table = table.sort_values(["source_trial_id", "seed"], kind="stable").reset_index(drop=True)
    summary = seed_summary(rows, chosen, metric, seeds, {r.source_trial_id: r.config.run.iterations for r in runs})
    write_bytes(summary.to_csv(index=False).encode(), join(exp.uri, SUMMARY_FILE))
    return RetrainOutcome(source, exp, metric, mode, chosen, table, summary, run.interrupted)


def format_retrain(outcome: RetrainOutcome) -> str:
    """The text ``uda-ray retrain`` prints: where everything is, per source trial its score and the mean ± std of
    the retrained runs, each with the iteration it was taken at (a comparison across different schedule lengths is
    labelled as such), and the checkpoints."""
    uri = outcome.experiment.uri
    lines = [f"retrain of {outcome.source} (chosen by {outcome.metric}, {outcome.mode})",
             f"trials:      {uri}/trials/*.parquet", f"metrics:     {uri}/metrics/*.parquet",
             f"summary:     {join(uri, SUMMARY_FILE)} (fractions, as in parquet)",
             "every number is a run's metric at its last evaluation: for the source trials their score, for the "
             "retrained runs their final evaluation, made by the final checkpoint listed below", ""]
    for s in outcome.summary.itertuples(index=False):
        text = functools.partial(metric_value_text, s.metric)
        unit = "%" if is_percent_metric(s.metric) else ""
        split = " (held-out report half)" if s.metric.startswith("holdout/") else ""
        spread = f"{text(s.mean)} ± {text(s.std)}{unit}" if s.n > 1 else (f"{text(s.mean)}{unit}" if s.n else "-")
        at = f" at {s.source_iteration} iterations" if not pd.isna(s.source_iteration) else ""
        lines.append(f"#{s.rank} {s.source_trial_id} {s.metric}{split}: source {text(s.source_value)}{unit}{at} → "
                     f"retrained {spread} at {s.iterations} iterations over {s.n} seed(s) [{s.seeds}]"
                     + (f", {s.n_unfinished} unfinished" if s.n_unfinished else ""))
        if not s.comparable:
            lines.append(f"   different lengths: the source's score{at} and runs of {s.iterations} iterations are "
                         "not a like-with-like comparison (retrain without --iterations to replicate the score)")
    lines.append("")
    for r in outcome.runs.itertuples(index=False):
        ckpt = getattr(r, "checkpoint", None)
        lines.append(f"  {r.trial_id} (from {r.source_trial_id}, seed {r.seed}): {r.status}, "
                     f"checkpoint {ckpt if isinstance(ckpt, str) and ckpt else '-'}")
    return "\n".join(lines)
