"""``uda-ray ablate``: an ablation spec's cells × paired seeds as a Tune grid (no Optuna, FIFO), trials to parquet.

The spec (``uda_ray.tune.ablation``) is read and validated, and every cell's run config built, before Ray starts.
The Tune ``param_space`` is ``{"trial": grid_search(grid(spec))}``: one trial per ``{"cell", "seed", "overrides"}``
entry, so every cell runs exactly the spec's seeds and ``run.seed`` of trial (cell, s) is s (pairing; with a chain
base, every train stage's). The parquet rows carry ``cell`` and ``seed`` (and a chain's ``chain`` and
``stage/<name>/…`` columns, as a search's); ``<experiment>/ablation.yaml`` is a copy of the spec as it was launched.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from ray import tune
from ray.tune.schedulers import FIFOScheduler

from uda_ray.preflight import preflight
from uda_ray.results.schema import FINISHED, is_percent_metric, metric_value_text
from uda_ray.results.store import load_trials
from uda_ray.stages.chain import Chain, Run, final_config
from uda_ray.stages.check import preflight_chain
from uda_ray.tune.ablation import AblationSpec, cell_config, expand, grid, load_ablation
from uda_ray.tune.callback import TrialInfo
from uda_ray.tune.driver import (
    Experiment,
    ExperimentSpec,
    choose_experiment,
    init_ray,
    launch_base,
    launch_overrides,
    launch_spec,
    run_experiment,
    storage_root,
)
from uda_ray.tune.search import scaling_of
from uda_ray.tune.spec_yaml import naming_spec_overrides, own_overrides

SPEC_COPY = "ablation.yaml"


@dataclass(frozen=True)
class AblationOutcome:
    """Where the ablation was written, its spec, and ``summary``: rows = cells (spec order), columns = seeds,
    values = each finished trial's score, ``last/<metric>`` (NaN where the trial did not finish)."""

    experiment: Experiment
    spec: AblationSpec
    summary: pd.DataFrame
    statuses: dict[str, int]
    interrupted: bool = False
    plan: str = ""  # with ``check``: what the ablation would run (nothing ran)


def _entry(tune_config: dict[str, Any]) -> dict[str, Any]:
    entry = tune_config.get("trial")
    if not isinstance(entry, dict) or not {"cell", "seed", "overrides"} <= set(entry):
        raise ValueError(f"ablation trial config {tune_config!r}: expected {{'trial': {{'cell', 'seed', "
                         "'overrides'}}}} as produced by uda_ray.tune.ablation.grid")
    return entry


def ablation_summary(trials: pd.DataFrame, spec: AblationSpec) -> pd.DataFrame:
    """Cells × seeds table of ``last/<metric>`` from the trials rows; a trial that is not TERMINATED gives NaN.

    Rows follow the spec's cell order and columns its seeds, whether or not a trial has written its row yet.
    """
    col = f"last/{spec.metric}"
    cells = [c.name for c in expand(spec)]
    table = pd.DataFrame(float("nan"), index=pd.Index(cells, name="cell"),
                         columns=pd.Index(list(spec.seeds), name="seed"))
    if trials.empty or col not in trials:
        return table  # no trial has written a row, or none has reported the metric yet
    done = trials[trials["status"] == FINISHED]
    for row in done[["cell", "seed", col]].itertuples(index=False):
        cell, seed, value = row
        if cell not in table.index or int(seed) not in table.columns:
            raise ValueError(f"trial row with cell {cell!r}, seed {seed!r} is not in the spec's grid "
                             f"(cells {cells}, seeds {list(spec.seeds)})")
        table.loc[cell, int(seed)] = float(value)
    return table


def run_ablation(spec_path: str | Path, *, address: str | None = None, storage: str | None = None,
                 name: str | None = None, resume: bool = False, overrides: list[str] | None = None,
                 check: bool = False) -> AblationOutcome:
    """Run (or with ``resume`` continue) the ablation of ``spec_path``; returns where it went and its summary.
    ``overrides`` (``key=value``) change the base config of every cell, or the spec's own settings (``'seeds=[0]'``,
    ``max_concurrent=1``; ``uda_ray.tune.spec_yaml.read_header``); a resume keeps the launch's. With ``check``
    every cell's config, data, files and storage are validated and the plan returned; nothing is written or
    started."""
    spec_path = Path(spec_path)
    spec = naming_spec_overrides(lambda: load_ablation(spec_path, overrides), overrides)  # before Ray starts
    exp = choose_experiment(storage_root(storage), spec.experiment, name=name, resume=resume)
    launched = list(overrides or []) if check else launch_overrides(exp, overrides, resume)
    if launched != list(overrides or []):
        spec = naming_spec_overrides(lambda: load_ablation(spec_path, launched), launched)
    entries = grid(spec)
    # every run config is built (and validated) here, so trials never read the YAML files on cluster nodes
    runs: dict[tuple[str, int], Run] = {(e["cell"], e["seed"]): cell_config(spec, e) for e in entries}
    chains = [r for r in runs.values() if isinstance(r, Chain)]  # all of them with a chain base, else none
    if chains:
        preflight_chain(*chains, storage=exp.root)
    else:
        preflight(runs.values(), storage=exp.root)
    if check:
        cells = expand(spec)
        iterations = sorted({final_config(r).run.iterations for r in runs.values()})
        plan = (f"{spec_path}: valid. {len(cells)} cell(s) ({', '.join(c.name for c in cells)}) x "
                f"{len(spec.seeds)} seed(s) = {len(entries)} run(s) of {'/'.join(map(str, iterations))} iterations, "
                f"{spec.max_concurrent} at a time; the data, files and storage they need are in place. It would write "
                f"{exp.uri}.")
        return AblationOutcome(exp, spec, ablation_summary(pd.DataFrame(), spec), {}, plan=plan)
    launch_spec(exp, spec_path, SPEC_COPY, resume, "ablation spec")
    launch_base(exp, spec.base, spec.base_config, resume)
    init_ray(address)

    def run_of(tune_config: dict[str, Any]) -> Run:
        e = _entry(tune_config)
        return runs[(e["cell"], e["seed"])]

    def trial_info(tune_config: dict[str, Any]) -> TrialInfo:
        e = _entry(tune_config)
        return TrialInfo.of_run(run_of(tune_config), exp.root, overrides=own_overrides(spec, e["overrides"]),
                                cell=e["cell"], seed=e["seed"])

    run = run_experiment(ExperimentSpec(
        experiment=exp, kind="ablation", metric=spec.metric, mode=spec.mode,
        config_of=lambda c: final_config(run_of(c)), trial_info=trial_info, scaling=scaling_of(spec), num_samples=1,
        max_concurrent=spec.max_concurrent, max_failures=spec.max_failures,
        param_space={"trial": tune.grid_search(entries)}, scheduler=FIFOScheduler(),
        chain_of=run_of if chains else None), resume=resume)
    trials = load_trials(exp.uri)
    statuses = {str(k): int(v) for k, v in trials["status"].value_counts().items()} if not trials.empty else {}
    return AblationOutcome(exp, spec, ablation_summary(trials, spec), statuses, run.interrupted)


def format_ablation(outcome: AblationOutcome) -> str:
    """The text ``uda-ray ablate`` prints: where the tables are, and the cells × seeds table with each cell's mean."""
    spec, uri = outcome.spec, outcome.experiment.uri
    table = outcome.summary.copy()
    table.columns = [f"seed {s}" for s in table.columns]
    table["mean"] = outcome.summary.mean(axis=1, skipna=False)
    lines = [f"trials:  {uri}/trials/*.parquet", f"metrics: {uri}/metrics/*.parquet", f"spec:    {uri}/{SPEC_COPY}",
             "", f"{spec.metric} ({spec.mode}) of each run at its last evaluation, per cell and seed"
             + (" (%)" if is_percent_metric(spec.metric) else "") + ":",
             table.to_string(float_format=lambda v: metric_value_text(spec.metric, v), na_rep="-")]
    total = len(spec.seeds) * len(outcome.summary)
    finished = outcome.statuses.get(FINISHED, 0)
    if finished != total:
        others = ", ".join(f"{n} {s}" for s, n in sorted(outcome.statuses.items()) if s != FINISHED)
        lines.append(f"{finished} of {total} trials finished" + (f" ({others})" if others else ""))
    lines.append(f"statistics: uda-ray analyze {uri}")
    return "\n".join(lines)
