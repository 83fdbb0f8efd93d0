"""Ablation spec YAML → validated ``AblationSpec`` → cells × paired seeds, a plain grid (no Optuna, no Ray here).

File format (``search_spaces/ablations/*.yaml``; the first line is a comment holding the command)::

    # uda-ray ablate search_spaces/ablations/components.yaml
    experiment: components                # a folder-safe name; the driver makes it unique
    base:
      config: ../base/synthetic.yaml      # a run config or a chain of stages, relative to this YAML file
      overrides: {run.iterations: 300}    # optional
    baseline: {loss.cluda.weight: 0.0}    # dotted overrides every cell starts from (may be {})
    components:                           # name (a simple identifier) → the dotted overrides that switch it on
      cluda: {loss.cluda.weight: 1.0}
      sdca: {loss.sdca.weight_feat: 1.0, loss.sdca.weight_out: 1.0}
    design: one-at-a-time                 # or full-factorial
    include_all: true                     # one-at-a-time only: add the cell with every component (optional)
    seeds: [0, 1, 2]                      # every cell runs every seed (paired: run.seed fixes data order,
                                          # augmentation and initialisation)
    metric: val/miou
    mode: max
    max_concurrent: 2                     # optional, default 1
    max_failures: 0                       # optional, default 0
    resources: {workers: 0, gpus_per_worker: 0, cpus_per_worker: 1}   # optional, these are the defaults

Cells: ``baseline`` (no component), then for one-at-a-time ``+name`` per component and ``all`` (with
``include_all``); for full-factorial every subset of the components in spec order, named ``+a+b``. A cell's
overrides are the baseline's with its components' on top; two components of one cell that set a key to different
values are an error naming both. Validation (``SpaceError`` naming the file and key): unknown keys, config keys
that do not exist or values the config rejects (every cell is checked), a component that changes nothing, empty
components, an unknown design, duplicate seeds, a seed set by hand (``run.seed``, a chain's ``seed`` or
``stages.<name>.run.seed``: the seeds own it).

A chain base (``uda_ray.stages``): the overrides are the chain's (``stages.<name>.<key>`` for one stage, a plain key
for the final stage), and a seed is the chain's ``seed``, set in every train stage, so each run repeats the whole
recipe (warm-up, statistics, labels, …) with its seed, as ``uda-ray retrain`` does by default. A stage that a cell
does not change is the same stage for every cell of a seed: computed once, from the stage cache, and shared.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uda_ray.stages.chain import Chain, Run, apply_run_overrides
from uda_ray.tune.spec_yaml import (
    IDENTIFIER,
    Resources,
    SpaceError,
    check_overrides,
    parse_counts,
    parse_resources,
    read_header,
)

DESIGNS = ("one-at-a-time", "full-factorial")
RESERVED = ("baseline", "all")
_TOP_KEYS = {"experiment", "base", "baseline", "components", "design", "include_all", "seeds", "metric", "mode",
             "max_concurrent", "max_failures", "resources"}
_REQUIRED = ("experiment", "base", "components", "design", "seeds", "metric", "mode")


@dataclass(frozen=True)
class Cell:
    """One ablation cell: its name, the components it switches on, and baseline ∪ components' overrides."""

    name: str
    components: tuple[str, ...]
    overrides: dict[str, Any]


@dataclass(frozen=True)
class AblationSpec:
    """A validated ablation YAML; ``components`` keeps the YAML order."""

    path: Path
    experiment: str
    base_config: Path
    base_overrides: dict[str, Any]
    base: Run  # the base run config or chain as loaded, base overrides applied: every cell's start
    baseline: dict[str, Any]
    components: dict[str, dict[str, Any]]
    design: str
    seeds: tuple[int, ...]
    metric: str
    mode: str
    include_all: bool = False
    max_concurrent: int = 1
    max_failures: int = 0
    resources: Resources = field(default_factory=Resources)


def _cell(spec_path: Path, baseline: dict[str, Any], components: dict[str, dict[str, Any]], chosen: tuple[str, ...],
          name: str) -> Cell:
    overrides = dict(baseline)
    owner: dict[str, str] = {}
    for c in chosen:
        for key, value in components[c].items():
            if key in owner and overrides[key] != value:
                raise SpaceError(f"{spec_path}: cell '{name}': components '{owner[key]}' and '{c}' set '{key}' to "
                                 f"{overrides[key]!r} and {value!r}")
            owner[key] = c
            overrides[key] = value
    return Cell(name, chosen, overrides)


def _cells(path: Path, baseline: dict[str, Any], components: dict[str, dict[str, Any]], design: str,
           include_all: bool) -> list[Cell]:
    names = tuple(components)
    if design == "one-at-a-time":
        chosen = [(), *((n,) for n in names)] + ([names] if include_all else [])
    else:
        chosen = [sub for k in range(len(names) + 1) for sub in itertools.combinations(names, k)]
    out = []
    for sub in chosen:
        if not sub:
            label = "baseline"
        elif design == "one-at-a-time" and len(sub) > 1:
            label = "all"
        else:
            label = "".join(f"+{n}" for n in sub)
        out.append(_cell(path, baseline, components, sub, label))
    return out


def expand(spec: AblationSpec) -> list[Cell]:
    """The cells of the design (see the module docstring), baseline first."""
    return _cells(spec.path, spec.baseline, spec.components, spec.design, spec.include_all)


def grid(spec: AblationSpec) -> list[dict[str, Any]]:
    """Cells × seeds as Tune trial configs ``{"cell", "seed", "overrides"}``, seed-major so that pairs finish early.

    ``overrides`` is the trainer's full dotted override dict: base overrides, then the cell's, then the seed
    (``run.seed``; a chain's ``seed``). Every cell gets exactly the spec's seeds (paired comparisons).
    """
    cells = expand(spec)
    seed_key = "seed" if isinstance(spec.base, Chain) else "run.seed"
    return [{"cell": c.name, "seed": s, "overrides": {**spec.base_overrides, **c.overrides, seed_key: s}}
            for s in spec.seeds for c in cells]


def _overrides(value: Any, path: Path, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SpaceError(f"{path}: {where} = {value!r}: expected a mapping of dotted config keys to values")
    for key in value:
        if key in ("run.seed", "seed") or (key.startswith("stages.") and key.endswith(".run.seed")):
            raise SpaceError(f"{path}: {where} sets '{key}': seeds come from the spec's 'seeds' list")
    return dict(value)


def load_ablation(path: str | Path, overrides: list[str] | None = None) -> AblationSpec:
    """Read and validate an ablation YAML (see the module docstring); raises ``SpaceError``."""
    path = Path(path)
    h = read_header(path, _TOP_KEYS, _REQUIRED, overrides)
    data, experiment, cfg, metric, mode = h.data, h.experiment, h.cfg, h.metric, h.mode
    base_path, base_overrides = h.base_path, h.base_overrides
    if isinstance(metric, list):
        raise SpaceError(f"{path}: metric {metric}: an ablation compares cells on one metric")
    max_concurrent, max_failures = parse_counts(data, path)
    resources = parse_resources(data.get("resources"), path)

    design = data["design"]
    if design not in DESIGNS:
        raise SpaceError(f"{path}: design = {design!r}: expected one of {', '.join(DESIGNS)}")
    include_all = data.get("include_all", False)
    if not isinstance(include_all, bool):
        raise SpaceError(f"{path}: include_all = {include_all!r}: expected true or false")
    if include_all and design != "one-at-a-time":
        raise SpaceError(f"{path}: include_all applies to design one-at-a-time only (full-factorial has every subset)")

    seeds = data["seeds"]
    if not isinstance(seeds, list) or not seeds:
        raise SpaceError(f"{path}: seeds = {seeds!r}: expected a non-empty list of integers")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise SpaceError(f"{path}: seeds: {s!r} is not an integer >= 0")
    if len(set(seeds)) != len(seeds):
        dup = sorted({s for s in seeds if seeds.count(s) > 1})
        raise SpaceError(f"{path}: seeds {seeds} repeat {dup}: pairs need distinct seeds")

    baseline = _overrides(data.get("baseline") or {}, path, "baseline")
    base_cell = check_overrides(cfg, baseline, path, "baseline")
    components = data["components"]
    if not isinstance(components, dict) or not components:
        raise SpaceError(f"{path}: components = {components!r}: expected a non-empty mapping of names to overrides")
    for name, overrides in components.items():
        where = f"components.{name}"
        if not isinstance(name, str) or not IDENTIFIER.match(name) or name in RESERVED:
            raise SpaceError(f"{path}: component name {name!r}: expected a simple identifier other than "
                             f"{' and '.join(RESERVED)}")
        overrides = _overrides(overrides, path, where)
        if not overrides:
            raise SpaceError(f"{path}: {where} is empty: a component must change something")
        if check_overrides(base_cell, overrides, path, where) == base_cell:
            raise SpaceError(f"{path}: {where} = {overrides} changes nothing relative to the baseline")
        components[name] = overrides
    if include_all and len(components) < 2:
        raise SpaceError(f"{path}: include_all needs at least 2 components (with one, 'all' repeats its cell)")
    for cell in _cells(path, baseline, components, design, include_all):
        check_overrides(cfg, cell.overrides, path, f"cell '{cell.name}'")
    return AblationSpec(path=path, experiment=experiment, base_config=base_path, base_overrides=base_overrides,
                        base=cfg, baseline=baseline, components=dict(components), design=design, seeds=tuple(seeds),
                        metric=metric, mode=mode, include_all=include_all, max_concurrent=max_concurrent,
                        max_failures=max_failures, resources=resources)


def cell_config(spec: AblationSpec, entry: dict[str, Any]) -> Run:
    """The full run config (or chain) of one ``grid`` entry: the spec's base with the entry's overrides applied."""
    return apply_run_overrides(spec.base, entry["overrides"], source=f"{spec.path} ({entry['cell']})")
