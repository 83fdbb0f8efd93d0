"""Search-space YAML → a validated ``SearchSpec`` → an Optuna define-by-run function (no Ray import here).

File format (``search_spaces/*.yaml``; the first line is a comment holding the command that runs the file)::

    # uda-ray tune search_spaces/demo.yaml
    experiment: demo                      # a folder-safe name; the driver makes it unique
    base:
      config: base/synthetic.yaml         # a run config, relative to this YAML file
      overrides: {run.iterations: 120}    # optional: dotted keys with typed values
    metric: val/miou                      # or a list, e.g. [val/miou, time/iter_s] (multi-objective)
    mode: max                             # max | min, or a list as long as ``metric``
    sampler: {type: tpe, seed: 0}         # tpe | cmaes | gp | random | nsga2; optional, default {type: tpe, seed: 0}
                                          # tpe, gp, cmaes also take n_startup_trials; nsga2 takes population_size
    num_samples: 8                        # trials
    max_concurrent: 2                     # optional, default 1
    max_failures: 0                       # optional, default 0: Tune FailureConfig retries per trial
    loggers: [mlflow]                     # optional: also log every trial to MLflow (pip install "uda-ray[mlflow]";
                                          # $MLFLOW_TRACKING_URI, default sqlite:///<experiment>/mlflow.db)
    scheduler: {type: asha, grace_period: 40, max_t: 120, reduction_factor: 2}   # in iterations; or {type: none}
    resources: {workers: 0, gpus_per_worker: 0, cpus_per_worker: 1}
                                          # optional (these are the defaults); workers 0 = in-process, with one
                                          # worker's GPUs and CPUs
    switches:                             # optional: named categorical choices that are not config keys
      method:
        choice: [base, cluda, target_mix]
        apply:                            # the overrides each value implies; a value without an entry implies none
          target_mix: {mix.target_to_source.enabled: true}
        when: {...}                       # optional, may name earlier switches only
    params:                               # dotted config keys, sampled in this order after the switches
      loss.cluda.weight: {loguniform: [1.0e-4, 1.0], when: {method: cluda}}
      loss.cluda.temperature: {uniform: [0.03, 1.0], step: 0.01}     # step optional
      loss.cluda.fm_size: {int: [32, 65]}                             # log: true and step: k optional
      teacher.weighting: {choice: [scalar, pixel]}
      mix.target_to_source.t_max: {fixed: 0.95, when: {method: target_mix}}   # a conditional constant
      teacher.alpha: 0.999                                            # an unconditional constant

``when: {name: value}`` or ``when: {name: [v1, v2]}`` (any of) makes an entry conditional on an earlier switch or
param (several names: all must hold); it may name switches, ``choice``, ``int`` and constant entries, never a
continuous one. An entry whose condition fails is not sampled and its key keeps the base config's value.
Write floats with a dot (``1.0e-4``): YAML 1.1 reads ``1e-4`` as a string.

Everything is validated before Ray starts: unknown keys, config keys that do not exist (with the closest valid
key), empty or reversed ranges, log ranges reaching 0, non-integer ``int`` bounds, every bound, choice and constant
checked against the config's own range rules, conditions on unknown, later or continuous entries or on values the
entry can never take, a key that a switch value implies and that a ``params`` entry may set in the same trial (a
param may share a key with a switch only under ``when: {switch: [values that do not imply it]}``), metric names
outside ``train/ val/ pseudo/ time/``, multi-objective with ASHA or with CMA-ES, and an ASHA ``max_t`` beyond the
base run's iterations. Every error is a ``SpaceError`` naming the file and the key.

How it meets Ray (``ray.tune.search.optuna.OptunaSearch``, define-by-run, Ray 2.60): the function from
``define_by_run`` receives Ray's wrapper of an ``optuna.Trial``; every ``trial.suggest_*`` value is captured under its
name (the switch name or the dotted key), and the dict the function returns (the constants: active fixed entries and
the implications of the chosen switch values) is merged over them into the Tune trial config. ``trial_overrides``
turns that Tune config back into the trainer's dotted overrides: base overrides, then switch implications, then
sampled and constant values.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from uda_ray.config import Config, ConfigError, field_type
from uda_ray.stages.chain import Run, apply_run_overrides, final_config, run_key_type
from uda_ray.tune.spec_yaml import (
    IDENTIFIER,
    Resources,
    SpaceError,
    check_keys,
    check_overrides,
    closest,
    integer,
    number,
    parse_counts,
    parse_resources,
    plain,
    read_header,
    same_value,
)

SAMPLERS = ("tpe", "cmaes", "gp", "random", "nsga2")
SAMPLER_OPTIONS = {"tpe": ("n_startup_trials",), "cmaes": ("n_startup_trials",), "gp": ("n_startup_trials",),
                   "random": (), "nsga2": ("population_size",)}
SCHEDULERS = ("none", "asha")
KINDS = ("uniform", "loguniform", "int", "choice", "fixed")
CHAIN_KEY = re.compile(r"^(stages\.[^.]+\..+|seed)$")  # keys of a chain base (uda_ray.stages.chain)

_TOP_KEYS = {"experiment", "base", "metric", "mode", "sampler", "num_samples", "max_concurrent", "max_failures",
             "scheduler", "resources", "switches", "params", "loggers"}
LOGGERS = ("mlflow",)  # TensorBoard needs no entry: every trial's metrics always go to its Tune folder
_REQUIRED = ("experiment", "base", "metric", "mode", "num_samples", "params")


# --------------------------------------------------------------------------------------------------- the spec
@dataclass(frozen=True)
class Scheduler:
    """``type`` none | asha; the ASHA budget fields are in training iterations (None for ``none``)."""

    type: str = "none"
    grace_period: int | None = None
    max_t: int | None = None
    reduction_factor: float | None = None


Condition = tuple[tuple[str, tuple[Any, ...]], ...]  # ((name, allowed values), ...): all must hold


@dataclass(frozen=True)
class Param:
    """One ``params`` entry. ``kind`` is uniform | loguniform | int | choice | fixed."""

    name: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    step: float | int | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()
    value: Any = None
    when: Condition = ()


@dataclass(frozen=True)
class Switch:
    """A named categorical choice that is not a config key; each value may imply dotted overrides."""

    name: str
    choices: tuple[Any, ...]
    apply: tuple[tuple[Any, dict[str, Any]], ...] = ()
    when: Condition = ()

    def implied(self, value: Any) -> dict[str, Any]:
        """The overrides implied by one of the switch's values ({} for a value without an ``apply`` entry)."""
        for v, overrides in self.apply:
            if same_value(v, value):
                return dict(overrides)
        return {}


@dataclass(frozen=True)
class SearchSpec:
    """A validated search-space YAML. ``metric``/``mode`` are lists for multi-objective searches."""

    path: Path
    experiment: str
    base_config: Path
    base_overrides: dict[str, Any]
    # the base run config (or chain) as read when the space was loaded, base overrides applied: every trial of the
    # search starts from this one, not from the file as it may be when the trial starts
    base: Run
    metric: str | list[str]
    mode: str | list[str]
    sampler: str
    seed: int
    num_samples: int
    sampler_options: dict[str, int] = field(default_factory=dict)
    max_concurrent: int = 1
    max_failures: int = 0
    scheduler: Scheduler = field(default_factory=Scheduler)
    resources: Resources = field(default_factory=Resources)
    switches: tuple[Switch, ...] = ()
    params: tuple[Param, ...] = ()
    loggers: tuple[str, ...] = ()

    @property
    def multi_objective(self) -> bool:
        return isinstance(self.metric, list)

    @property
    def conditional(self) -> bool:
        """True when some entry has a ``when`` condition (the Optuna search space changes between trials)."""
        return any(e.when for e in (*self.switches, *self.params))


# ----------------------------------------------------------------------------------------------- conditions
def _holds(when: Condition, values: dict[str, Any]) -> bool:
    return all(name in values and any(same_value(values[name], v) for v in allowed) for name, allowed in when)


def _can_take(entry: Param | Switch, value: Any) -> bool | None:
    """Whether ``entry`` can take ``value``; None when the entry is continuous (no condition may name it)."""
    if isinstance(entry, Switch) or entry.kind == "choice":
        return any(same_value(c, value) for c in entry.choices)
    if entry.kind == "fixed":
        return same_value(entry.value, value)
    if entry.kind == "int":
        return (isinstance(value, int) and not isinstance(value, bool) and entry.low <= value <= entry.high
                and (value - entry.low) % (entry.step or 1) == 0)
    return None


def _parse_when(value: Any, earlier: dict[str, Param | Switch], later: set[str], path: Path, where: str) -> Condition:
    if not isinstance(value, dict) or not value:
        raise SpaceError(f"{path}: {where}.when = {value!r}: expected a non-empty mapping {{name: value or [values]}}")
    out = []
    for name, allowed in value.items():
        if name not in earlier:
            if name in later:
                raise SpaceError(f"{path}: {where}.when names '{name}', which is not sampled before it: a condition "
                                 "may only name an earlier switch or param (sampling follows the YAML order, "
                                 "switches first)")
            raise SpaceError(f"{path}: {where}.when names unknown '{name}'{closest(str(name), set(earlier))}")
        values = tuple(allowed) if isinstance(allowed, list) else (allowed,)
        if not values:
            raise SpaceError(f"{path}: {where}.when.{name} is an empty list")
        for v in values:
            ok = _can_take(earlier[name], v)
            if ok is None:
                raise SpaceError(f"{path}: {where}.when names '{name}', a continuous param: conditions may name "
                                 "switches and choice, int or constant params only")
            if not ok:
                raise SpaceError(f"{path}: {where}.when: '{name}' can never take the value {v!r}")
        out.append((name, values))
    return tuple(out)


# ------------------------------------------------------------------------------------------- params, switches
def _scalar_choices(values: Any, path: Path, where: str) -> tuple[Any, ...]:
    if not isinstance(values, list) or len(values) < 2:
        raise SpaceError(f"{path}: {where}.choice = {values!r}: expected a list of at least 2 values "
                         "(use a constant for one value)")
    for v in values:
        if v is not None and not isinstance(v, (bool, int, float, str)):
            raise SpaceError(f"{path}: {where}.choice value {v!r}: choices must be numbers, strings, booleans "
                             "or null (Optuna categorical)")
    for i, v in enumerate(values):
        if any(same_value(v, w) for w in values[:i]):
            raise SpaceError(f"{path}: {where}.choice lists {v!r} twice")
    return tuple(values)


def _parse_range(spec: dict[str, Any], kind: str, name: str, tp: Any, path: Path, where: str) -> Param:
    bounds = spec[kind]
    if not isinstance(bounds, list) or len(bounds) != 2:
        raise SpaceError(f"{path}: {where}.{kind} = {bounds!r}: expected [low, high]")
    low, high = (number(b, path, f"{where}.{kind}") for b in bounds)
    step = spec.get("step")
    log = spec.get("log", False)
    if kind == "int":
        if tp not in (int, float):
            raise SpaceError(f"{path}: {where}: int ranges need a numeric config field, '{name}' is {tp}")
        if not all(isinstance(b, int) for b in (low, high)):
            raise SpaceError(f"{path}: {where}.int = {bounds!r}: expected integer bounds")
        if not isinstance(log, bool):
            raise SpaceError(f"{path}: {where}.log = {log!r}: expected true or false")
        step = 1 if step is None else integer(step, path, f"{where}.step", 1)
        if log and step != 1:
            raise SpaceError(f"{path}: {where}: log int ranges cannot have a step (Optuna)")
    else:
        if tp is not float:
            hint = ": use int: [low, high]" if tp is int else ""
            raise SpaceError(f"{path}: {where}: {kind} needs a float config field, '{name}' is {tp}{hint}")
        if "log" in spec:
            raise SpaceError(f"{path}: {where}: 'log' belongs to int ranges; use loguniform for floats")
        log = kind == "loguniform"
        if step is not None:
            if log:
                raise SpaceError(f"{path}: {where}: loguniform ranges cannot have a step (Optuna)")
            step = number(step, path, f"{where}.step")
            n = (high - low) / step if step > 0 else -1.0
            if step <= 0 or n < 1 or abs(n - round(n)) > 1e-9 * max(1.0, n):
                raise SpaceError(f"{path}: {where}.step = {step}: expected > 0 and dividing high - low = "
                                 f"{high - low} into whole steps")
    if low >= high:
        raise SpaceError(f"{path}: {where}.{kind} = {bounds!r}: low must be below high")
    if log and low <= 0:
        raise SpaceError(f"{path}: {where}.{kind} = {bounds!r}: a log range needs low > 0")
    return Param(name, "int" if kind == "int" else ("loguniform" if log else "uniform"),
                 low=low if kind == "int" else float(low), high=high if kind == "int" else float(high),
                 step=step, log=bool(log))


def _parse_param(name: Any, spec: Any, earlier: dict[str, Param | Switch], later: set[str], cfg: Run,
                 path: Path) -> Param:
    where = f"params.{name}"
    if not isinstance(name, str):
        raise SpaceError(f"{path}: params key {name!r}: expected a dotted config key")
    try:
        tp = run_key_type(cfg, name)
    except ConfigError as e:
        raise SpaceError(f"{path}: {where}: {e}") from e
    if not isinstance(spec, dict):
        param = Param(name, "fixed", value=spec)
    else:
        kinds = [k for k in KINDS if k in spec]
        if len(kinds) != 1:
            raise SpaceError(f"{path}: {where} = {spec!r}: expected exactly one of {', '.join(KINDS)}")
        kind = kinds[0]
        extra = {"uniform": {"step", "log"}, "loguniform": {"step", "log"}, "int": {"log", "step"}, "choice": set(),
                 "fixed": set()}[kind]  # step/log on float ranges reach _parse_range for a pointed message
        check_keys(spec, {kind, "when"} | extra, path, f"{where}: ")
        if kind == "choice":
            param = Param(name, "choice", choices=_scalar_choices(spec["choice"], path, where))
        elif kind == "fixed":
            param = Param(name, "fixed", value=spec["fixed"])
        else:
            param = _parse_range(spec, kind, name, tp, path, where)
        if "when" in spec:
            when = _parse_when(spec["when"], earlier, later, path, where)
            param = dataclasses.replace(param, when=when)
    probes = {"fixed": [("value", param.value)], "choice": [("choice", c) for c in param.choices]}.get(
        param.kind, [("low", param.low), ("high", param.high)])
    for label, value in probes:
        check_overrides(cfg, {name: value}, path, f"{where} ({label} {value!r})")
    return param


def _parse_switch(name: Any, spec: Any, earlier: dict[str, Param | Switch], later: set[str], cfg: Run,
                  path: Path) -> Switch:
    where = f"switches.{name}"
    if not isinstance(name, str) or not IDENTIFIER.match(name):
        raise SpaceError(f"{path}: switch name {name!r}: expected a simple identifier (not a dotted config key)")
    if not isinstance(spec, dict):
        raise SpaceError(f"{path}: {where} = {spec!r}: expected {{choice: [...], apply: {{value: {{...}}}}}}")
    check_keys(spec, {"choice", "apply", "when"}, path, f"{where}: ")
    if "choice" not in spec:
        raise SpaceError(f"{path}: {where}: missing 'choice'")
    choices = _scalar_choices(spec["choice"], path, where)
    apply = spec.get("apply") or {}
    if not isinstance(apply, dict):
        raise SpaceError(f"{path}: {where}.apply = {apply!r}: expected a mapping of switch values to overrides")
    pairs = []
    for value, overrides in apply.items():
        if not any(same_value(value, c) for c in choices):
            raise SpaceError(f"{path}: {where}.apply names {value!r}, which is not one of its choices {list(choices)}")
        check_overrides(cfg, overrides, path, f"{where}.apply.{value}")
        pairs.append((value, dict(overrides)))
    when = _parse_when(spec["when"], earlier, later, path, where) if "when" in spec else ()
    return Switch(name, choices, tuple(pairs), when)


def _parse_scheduler(value: Any, cfg: Run, path: Path) -> Scheduler:
    if value is None:
        return Scheduler()
    if not isinstance(value, dict) or value.get("type") not in SCHEDULERS:
        raise SpaceError(f"{path}: scheduler = {value!r}: expected {{type: none}} or {{type: asha, grace_period, "
                         "max_t, reduction_factor}")
    if value["type"] == "none":
        check_keys(value, {"type"}, path, "scheduler (none): ")
        return Scheduler()
    check_keys(value, {"type", "grace_period", "max_t", "reduction_factor"}, path, "scheduler: ")
    for key in ("grace_period", "max_t"):
        if key not in value:
            raise SpaceError(f"{path}: scheduler.{key} is missing (in iterations)")
    grace = integer(value["grace_period"], path, "scheduler.grace_period", 1)
    max_t = integer(value["max_t"], path, "scheduler.max_t", 1)
    rf = number(value.get("reduction_factor", 2), path, "scheduler.reduction_factor")
    if rf <= 1:
        raise SpaceError(f"{path}: scheduler.reduction_factor = {rf}: expected > 1")
    if grace > max_t:
        raise SpaceError(f"{path}: scheduler.grace_period = {grace} exceeds scheduler.max_t = {max_t}")
    iterations = final_config(cfg).run.iterations
    if max_t > iterations:
        raise SpaceError(f"{path}: scheduler.max_t = {max_t} exceeds the base run's run.iterations = "
                         f"{iterations}: ASHA's budget must fit in the run (a chain's: its final stage's)")
    return Scheduler("asha", grace, max_t, float(rf))


def _parse_sampler(value: Any, path: Path) -> tuple[str, int, dict[str, int]]:
    if value is None:
        return "tpe", 0, {}
    if not isinstance(value, dict) or value.get("type") not in SAMPLERS:
        raise SpaceError(f"{path}: sampler = {value!r}: expected {{type: {' | '.join(SAMPLERS)}, seed: N}}")
    kind = value["type"]
    check_keys(value, {"type", "seed", *SAMPLER_OPTIONS[kind]}, path, f"sampler ({kind}): ")
    seed = integer(value.get("seed", 0), path, "sampler.seed", 0)
    options = {k: integer(value[k], path, f"sampler.{k}", 2 if k == "population_size" else 0)
               for k in SAMPLER_OPTIONS[kind] if k in value}
    if kind == "cmaes" and importlib.util.find_spec("cmaes") is None:
        raise SpaceError(f"{path}: sampler.type = cmaes needs the 'cmaes' package: pip install cmaes")
    return kind, seed, options


def _check_combinations(switches: tuple[Switch, ...], params: tuple[Param, ...], cfg: Run, path: Path) -> None:
    """Each combination of switch values with its implications and the constants it activates is a valid config."""
    for combo in itertools.product(*(s.choices for s in switches)):
        values: dict[str, Any] = {}
        overrides: dict[str, Any] = {}
        for s, value in zip(switches, combo):
            if _holds(s.when, values):
                values[s.name] = value
                overrides.update(s.implied(value))
        for p in params:
            if p.kind == "fixed" and all(n in values for n, _ in p.when) and _holds(p.when, values):
                overrides[p.name] = p.value
        label = ", ".join(f"{k}={v!r}" for k, v in values.items()) or "constants"
        check_overrides(cfg, overrides, path, f"params with {label}")


def load_space(path: str | Path, overrides: list[str] | None = None) -> SearchSpec:
    """Read and validate a search-space YAML (see the module docstring); raises ``SpaceError``."""
    path = Path(path)
    h = read_header(path, _TOP_KEYS, _REQUIRED, overrides)
    data, experiment, cfg, metric, mode = h.data, h.experiment, h.cfg, h.metric, h.mode
    base_path, base_overrides = h.base_path, h.base_overrides
    sampler, seed, options = _parse_sampler(data.get("sampler"), path)
    scheduler = _parse_scheduler(data.get("scheduler"), cfg, path)
    num_samples = integer(data["num_samples"], path, "num_samples", 1)
    max_concurrent, max_failures = parse_counts(data, path)
    resources = parse_resources(data.get("resources"), path)
    loggers = data.get("loggers") or []
    if not isinstance(loggers, list) or any(x not in LOGGERS for x in loggers):
        raise SpaceError(f"{path}: key 'loggers' = {loggers!r}: expected a list of some of {', '.join(LOGGERS)}")

    raw_switches = data.get("switches") or {}
    raw_params = data["params"] or {}
    if not isinstance(raw_switches, dict) or not isinstance(raw_params, dict):
        raise SpaceError(f"{path}: switches and params must be mappings")
    order = [str(n) for n in (*raw_switches, *raw_params)]
    earlier: dict[str, Param | Switch] = {}
    switches = []
    for i, (name, spec) in enumerate(raw_switches.items()):
        s = _parse_switch(name, spec, earlier, set(order[i:]), cfg, path)
        switches.append(s)
        earlier[s.name] = s
    params = []
    for i, (name, spec) in enumerate(raw_params.items()):
        p = _parse_param(name, spec, earlier, set(order[len(switches) + i:]), cfg, path)
        params.append(p)
        earlier[p.name] = p
    if not any(p.kind != "fixed" for p in params) and not switches:
        raise SpaceError(f"{path}: params holds no range or choice and there are no switches: nothing to search")
    implied_by = {}
    for s in switches:
        for _, overrides in s.apply:
            for key in overrides:
                if implied_by.setdefault(key, s.name) != s.name:
                    raise SpaceError(f"{path}: key '{key}' is implied by both switches '{implied_by[key]}' and "
                                     f"'{s.name}': set it in one place")
    by_name = {s.name: s for s in switches}
    for p in params:
        if p.name not in implied_by:
            continue
        s = by_name[implied_by[p.name]]
        setting = [v for v, overrides in s.apply if p.name in overrides]
        allowed = dict(p.when).get(s.name)
        if allowed is None or any(same_value(v, w) for v in allowed for w in setting):
            raise SpaceError(f"{path}: params.{p.name} is also implied by switch '{s.name}' (value(s) "
                             f"{setting}): make the param conditional on the switch's other values "
                             f"(when: {{{s.name}: [...]}}) or set the key in one place")
    _check_combinations(tuple(switches), tuple(params), cfg, path)

    if isinstance(metric, list):
        if scheduler.type == "asha":
            raise SpaceError(f"{path}: scheduler asha needs a single metric; a multi-objective search "
                             f"(metric {metric}) takes scheduler {{type: none}}")
        if sampler == "cmaes":
            raise SpaceError(f"{path}: sampler cmaes cannot optimise several objectives (metric {metric}): use "
                             "nsga2, tpe, gp or random")
    if scheduler.type == "asha" and any(p.name == "run.iterations" for p in params):
        raise SpaceError(f"{path}: params.run.iterations cannot be searched under asha, whose budget is the "
                         "run's iterations")
    return SearchSpec(path=path, experiment=experiment, base_config=base_path, base_overrides=base_overrides,
                      base=cfg, metric=metric, mode=mode, sampler=sampler, seed=seed, sampler_options=options,
                      num_samples=num_samples, max_concurrent=max_concurrent, max_failures=max_failures,
                      scheduler=scheduler, resources=resources, switches=tuple(switches), params=tuple(params),
                      loggers=tuple(dict.fromkeys(loggers)))


# --------------------------------------------------------------------------------------------- to Optuna/Tune
def param_distributions(spec: SearchSpec) -> dict[str, optuna.distributions.BaseDistribution]:
    """The Optuna distribution of every sampled entry (switches and non-constant params), as define_by_run uses."""
    out: dict[str, optuna.distributions.BaseDistribution] = {}
    for s in spec.switches:
        out[s.name] = optuna.distributions.CategoricalDistribution(s.choices)
    for p in spec.params:
        if p.kind == "choice":
            out[p.name] = optuna.distributions.CategoricalDistribution(p.choices)
        elif p.kind == "int":
            out[p.name] = optuna.distributions.IntDistribution(p.low, p.high, log=p.log, step=p.step)
        elif p.kind in ("uniform", "loguniform"):
            out[p.name] = optuna.distributions.FloatDistribution(p.low, p.high, log=p.log, step=p.step)
    return out


class DefineByRun:
    """The define-by-run function for ``OptunaSearch(space=...)`` or a plain ``study.ask()`` trial.

    Suggests the switches, then the params, in YAML order, skipping entries whose ``when`` fails. Returns the
    constants (active fixed params and the implications of the chosen switch values), which Ray merges over the
    suggested values into the Tune config; the same dict is stored as the Optuna user attribute ``constants``.
    A class rather than a closure: Ray pickles the searcher, and with it this function, into the experiment state.
    """

    def __init__(self, spec: SearchSpec) -> None:
        self.spec = spec

    def __call__(self, trial: optuna.Trial) -> dict[str, Any]:
        values: dict[str, Any] = {}
        constants: dict[str, Any] = {}
        for s in self.spec.switches:
            if _holds(s.when, values):
                values[s.name] = trial.suggest_categorical(s.name, s.choices)
                constants.update(s.implied(values[s.name]))
        for p in self.spec.params:
            if not _holds(p.when, values):
                continue
            if p.kind == "fixed":
                values[p.name] = constants[p.name] = p.value
            elif p.kind == "choice":
                values[p.name] = trial.suggest_categorical(p.name, p.choices)
            elif p.kind == "int":
                values[p.name] = trial.suggest_int(p.name, p.low, p.high, step=p.step, log=p.log)
            else:
                values[p.name] = trial.suggest_float(p.name, p.low, p.high, step=p.step, log=p.log)
        trial.set_user_attr("constants", constants)
        return constants


def define_by_run(spec: SearchSpec) -> DefineByRun:
    return DefineByRun(spec)


def trial_overrides(spec: SearchSpec, tune_config: dict[str, Any]) -> dict[str, Any]:
    """The trainer's dotted overrides for one trial: base overrides, switch implications, sampled and constants.

    ``tune_config`` is the Tune trial config that ``define_by_run`` produced (switch names and dotted keys); any
    other key is an error, as is a constant that disagrees with what its switch value implies.
    """
    switches = {s.name: s for s in spec.switches}
    out = dict(spec.base_overrides)
    implied: dict[str, Any] = {}
    for name, s in switches.items():
        if name in tune_config:
            value = plain(tune_config[name])
            if not any(same_value(value, c) for c in s.choices):
                raise SpaceError(f"{spec.path}: trial config switch '{name}' = {value!r} is not one of "
                                 f"{list(s.choices)}")
            implied.update(s.implied(value))
    out.update(implied)
    for key, value in tune_config.items():
        if key in switches:
            continue
        try:
            field_type(key)
        except ConfigError as e:
            if not CHAIN_KEY.match(key):  # a chain's stages.<name>.… keys are checked when they are applied
                raise SpaceError(f"{spec.path}: trial config key '{key}' is neither a switch nor a config key: "
                                 f"{e}") from e
        value = plain(value)
        if key in implied and not same_value(implied[key], value):
            raise SpaceError(f"{spec.path}: trial config '{key}' = {value!r} contradicts {implied[key]!r}, which "
                             "its switch value implies")
        out[key] = value
    return out


def trial_run(spec: SearchSpec, tune_config: dict[str, Any]) -> Run:
    """What one trial runs: the search's base run config or chain with ``trial_overrides`` applied."""
    return apply_run_overrides(spec.base, trial_overrides(spec, tune_config), source=f"{spec.path} (trial)")


def trial_config(spec: SearchSpec, tune_config: dict[str, Any]) -> Config:
    """The full run config of one trial (the base file with ``trial_overrides`` applied; for a chain, its final
    stage's config)."""
    return final_config(trial_run(spec, tune_config))


def build_sampler(spec: SearchSpec) -> optuna.samplers.BaseSampler:
    """The seeded Optuna sampler named by the spec.

    tpe: multivariate TPE with ``constant_liar`` (parallel trials see each other's pending points) and
    ``group=True`` when the space is conditional; gp: ``GPSampler`` (needs torch and scipy); cmaes: CMA-ES (needs the
    ``cmaes`` package; categorical and conditional entries fall back to seeded random sampling); random; nsga2.
    """
    options = dict(spec.sampler_options)
    if spec.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=spec.seed, multivariate=True, group=spec.conditional,
                                          constant_liar=True, **options)
    if spec.sampler == "gp":
        return optuna.samplers.GPSampler(seed=spec.seed, **options)
    if spec.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=spec.seed, **options)
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=spec.seed)
    if spec.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=spec.seed, **options)
    raise SpaceError(f"{spec.path}: sampler {spec.sampler!r}: expected one of {', '.join(SAMPLERS)}")
