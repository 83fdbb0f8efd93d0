"""Parameter importance of a search, computed by Optuna's evaluators from the parquet rows alone.

The finished trials are turned back into Optuna trials (``optuna.trial.create_trial`` with each trial's params, their
distributions and its ``last/<metric>``, the score) and added to an in-memory study, so any ``optuna.importance``
evaluator runs on them: fANOVA (Hutter et al., ICML 2014: variance of the objective explained by each parameter in a
random forest fit) and PED-ANOVA (Watanabe et al., IJCAI 2023: how much the top-quantile trials' Parzen density of a
parameter differs from all trials').

Distributions come from ``<experiment>/search_space.yaml`` (the search's ``params``) when it exists: a trial's params
are then the keys of its ``overrides`` that the space samples (a conditional ``when:`` param a trial did not sample
is absent from it). Without the file they are inferred from the ``config/*`` columns that vary across finished
trials: numbers → ``FloatDistribution(min, max, log = min > 0 and max / min > 100)``, anything else → categorical.

Conditional params: PED-ANOVA scores every param over the trials that hold it; fANOVA only scores params held by
every trial, so conditional ones get NaN in its column (Optuna's documented behaviour).

How many trials: importance is computed from ``MIN_IMPORTANCE_TRIALS`` = 20 finished trials on. PED-ANOVA compares
the top 10 % of the trials (Optuna's default quantile) with all of them: below 20 that top set is a single trial,
whose parameter values are then "important" by construction. fANOVA fits a random forest to the trials: with fewer
points than about twice the usual 5–10 searched parameters it explains noise. Pruned trials never enter importance
(their value is taken at an early rung, not comparable with a finished trial's); they appear in the marginal plots
at the rung they reached, marked as pruned.
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import optuna
import pandas as pd
import yaml
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from uda_ray.analysis.best import check_mode, finished, metric_column
from uda_ray.results import store
from uda_ray.results.schema import CONFIG_PREFIX

SEARCH_SPACE_FILE = "search_space.yaml"
# keys that say where and how a trial ran, not what it trained: never inferred as searched parameters
NOT_PARAMS = ("run.name", "run.output_dir", "run.device", "run.threads", "data.loader_workers",
              "data.source_root", "data.target_root", "data.synthetic.cache_dir", "model.pretrained_path")
LOG_SPAN = 100.0  # an inferred positive numeric range wider than two decades is searched on a log scale
# fANOVA's forest costs grow faster than linearly with the trials (about 8 s for 200 trials, 110 s for 1000 on
# 2 busy cores), so it sees a seeded random sample of at most this many finished trials; PED-ANOVA sees all.
FANOVA_MAX_TRIALS = 200
MIN_IMPORTANCE_TRIALS = 20

EVALUATORS: dict[str, Callable[[int], optuna.importance.BaseImportanceEvaluator]] = {
    "fanova": lambda seed: optuna.importance.FanovaImportanceEvaluator(seed=seed),
    "ped_anova": lambda seed: optuna.importance.PedAnovaImportanceEvaluator(),
}
_SAMPLE_CAPS = {"fanova": FANOVA_MAX_TRIALS}
_KINDS = ("uniform", "loguniform", "int", "choice")


def _choice(value: Any) -> Any:
    """Optuna categorical choices must be None, bool, int, float or str: lists (tuple keys) become JSON."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return json.dumps([_choice(v) for v in value])
    if isinstance(value, np.generic):
        return value.item()
    return value


def _distribution(key: str, spec: Any, source: str) -> BaseDistribution | None:
    """One ``params`` entry of a search-space YAML; None for a fixed value (not searched)."""
    if not isinstance(spec, dict) or not any(k in spec for k in _KINDS):
        return None
    kinds = [k for k in _KINDS if k in spec]
    extra = set(spec) - set(_KINDS) - {"log", "when"}
    if len(kinds) != 1 or extra:
        raise ValueError(f"{source}: params.{key} = {spec!r}: expected exactly one of {_KINDS} "
                         f"(with 'log' for int and an optional 'when')")
    kind, arg = kinds[0], spec[kinds[0]]
    if kind == "choice":
        if not isinstance(arg, list) or not arg:
            raise ValueError(f"{source}: params.{key}.choice = {arg!r}: expected a non-empty list")
        return CategoricalDistribution([_choice(v) for v in arg])
    if not (isinstance(arg, list) and len(arg) == 2):
        raise ValueError(f"{source}: params.{key}.{kind} = {arg!r}: expected [low, high]")
    lo, hi = arg
    if kind == "int":
        return IntDistribution(int(lo), int(hi), log=bool(spec.get("log", False)))
    return FloatDistribution(float(lo), float(hi), log=(kind == "loguniform"))


def distributions_from_space(space: Mapping[str, Any], source: str = "<search space>") -> dict[str, BaseDistribution]:
    """``{dotted key: distribution}`` for the sampled entries of a search space's ``params``."""
    params = space.get("params")
    if not isinstance(params, dict):
        raise ValueError(f"{source}: expected a 'params' mapping of dotted config keys, got {params!r}")
    out = {k: _distribution(k, v, source) for k, v in params.items()}
    return {k: d for k, d in out.items() if d is not None}


def load_search_space(path: str) -> dict[str, BaseDistribution] | None:
    """Distributions of ``<path>/search_space.yaml``, or None when the experiment folder has no such file."""
    uri = store.join(path, SEARCH_SPACE_FILE)
    if not store.exists(uri):
        return None
    try:
        space = yaml.safe_load(store.read_bytes(uri))
    except yaml.YAMLError as e:
        raise ValueError(f"{uri}: invalid YAML: {e}") from e
    if not isinstance(space, dict):
        raise ValueError(f"{uri}: expected a mapping with a 'params' section")
    return distributions_from_space(space, source=uri)


def infer_distributions(trials: pd.DataFrame) -> dict[str, BaseDistribution]:
    """Distributions of the ``config/*`` columns that take more than one value among ``trials``."""
    out: dict[str, BaseDistribution] = {}
    for col in trials.columns:
        key = col[len(CONFIG_PREFIX):]
        if not col.startswith(CONFIG_PREFIX) or key in NOT_PARAMS:
            continue
        values = [_choice(v) for v in trials[col] if not _missing(v)]
        distinct = sorted(set(values), key=repr)
        if len(distinct) < 2:
            continue
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in distinct):
            lo, hi = float(min(distinct)), float(max(distinct))
            out[key] = FloatDistribution(lo, hi, log=lo > 0 and hi / lo > LOG_SPAN)
        else:
            out[key] = CategoricalDistribution(distinct)
    return out


def _missing(value: Any) -> bool:
    if isinstance(value, (list, tuple, np.ndarray)):
        return False
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def _value(key: str, raw: Any, dist: BaseDistribution, trial_id: str) -> Any:
    raw = _choice(raw)
    if isinstance(dist, CategoricalDistribution):
        value = raw
        ok = value in dist.choices
    else:
        value = int(raw) if isinstance(dist, IntDistribution) else float(raw)
        ok = dist.low <= value <= dist.high
    if not ok:
        raise ValueError(f"trial {trial_id}: param '{key}' = {raw!r} is outside its search-space distribution "
                         f"{dist} (was search_space.yaml changed after the search?)")
    return value


def trial_params(row: pd.Series, space: Mapping[str, BaseDistribution], from_overrides: bool) -> dict[str, Any]:
    """A trial's ``{param: value}``: from its overrides JSON (search space given) or its config columns."""
    if from_overrides:
        source = json.loads(row["overrides"])
        present = {k: source[k] for k in space if k in source}
    else:
        present = {k: row[f"{CONFIG_PREFIX}{k}"] for k in space if not _missing(row[f"{CONFIG_PREFIX}{k}"])}
    return {k: _value(k, v, space[k], row["trial_id"]) for k, v in present.items()}


def search_params(trials: pd.DataFrame, metric: str, mode: str,
                  space: Mapping[str, BaseDistribution] | None = None, *, with_pruned: bool = False
                  ) -> tuple[pd.DataFrame, dict[str, BaseDistribution]]:
    """The finished (and with ``with_pruned`` the pruned) trials' parameters: a frame with ``trial_id``, ``status``,
    ``value`` (``last/<metric>``: at the end, or at the rung a pruned trial reached) and one column per parameter
    (None where a trial does not hold it), and the distributions used (``space``, or inferred from those trials)."""
    check_mode(mode)
    col = metric_column(trials, metric)
    ok = finished(trials, col)
    if with_pruned:
        pruned = trials[trials["status"] == "PRUNED"]
        ok = pd.concat([ok, pruned[np.isfinite(pd.to_numeric(pruned[col]).astype("float64").to_numpy())]])
    dists = dict(space) if space is not None else infer_distributions(ok)
    rows = []
    for _, row in ok.iterrows():
        params = trial_params(row, dists, from_overrides=space is not None)
        rows.append({"trial_id": row["trial_id"], "status": row["status"], "value": float(row[col]), **params})
    frame = pd.DataFrame(rows, columns=["trial_id", "status", "value", *dists])
    return frame, dists


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(before)


def study_from_trials(trials: pd.DataFrame, metric: str, mode: str,
                      space: Mapping[str, BaseDistribution] | None = None) -> optuna.Study:
    """An in-memory study holding one COMPLETE trial per finished row (value ``last/<metric>``)."""
    frame, dists = search_params(trials, metric, mode, space)
    frozen = []
    for rec in frame.to_dict("records"):
        params = {k: rec[k] for k in dists if not _missing(rec[k])}
        frozen.append(optuna.trial.create_trial(params=params, distributions={k: dists[k] for k in params},
                                                value=rec["value"], user_attrs={"trial_id": rec["trial_id"]}))
    with _quiet_optuna():
        study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
        study.add_trials(frozen)
    return study


def _subsample(study: optuna.Study, cap: int, seed: int) -> optuna.Study:
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) <= cap:
        return study
    pick = np.sort(np.random.default_rng(seed).choice(len(complete), size=cap, replace=False))
    with _quiet_optuna():
        small = optuna.create_study(directions=study.directions)
        small.add_trials([complete[i] for i in pick])
    return small


def param_importances(trials: pd.DataFrame, metric: str, mode: str, *,
                      space: Mapping[str, BaseDistribution] | None = None,
                      evaluators: tuple[str, ...] = ("fanova", "ped_anova"), seed: int = 0) -> pd.DataFrame:
    """``param, <evaluator>..., n_trials, distribution``: normalised importances (each evaluator's column sums to
    1 over the params it scores; NaN where it does not score a param), sorted by the first evaluator."""
    unknown = [e for e in evaluators if e not in EVALUATORS]
    if unknown:
        raise KeyError(f"importance evaluators {unknown}: expected names from {sorted(EVALUATORS)}")
    study = study_from_trials(trials, metric, mode, space)
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    dists: dict[str, BaseDistribution] = {}
    counts: dict[str, int] = {}
    for t in complete:
        for k, d in t.distributions.items():
            dists[k] = d
            counts[k] = counts.get(k, 0) + 1
    table = pd.DataFrame({"param": sorted(dists)})
    values = [t.value for t in complete]
    if len(complete) < 2 or not dists or min(values) == max(values):
        # fewer than two trials, nothing searched, or every trial scored the same: no variance to attribute
        for name in evaluators:
            table[name] = np.nan
    else:
        for name in evaluators:
            sub = _subsample(study, _SAMPLE_CAPS[name], seed) if name in _SAMPLE_CAPS else study
            with _quiet_optuna():
                scores = optuna.importance.get_param_importances(sub, evaluator=EVALUATORS[name](seed))
            table[name] = [float(scores[p]) if p in scores else np.nan for p in table["param"]]
    table["n_trials"] = [counts[p] for p in table["param"]]
    table["distribution"] = [repr(dists[p]) for p in table["param"]]
    if evaluators:
        table = table.sort_values(list(evaluators), ascending=False, na_position="last", kind="stable")
    return table.reset_index(drop=True)
