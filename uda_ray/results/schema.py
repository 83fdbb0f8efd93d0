"""Column names and arrow types of the two parquet tables (the contract in ARCHITECTURE.md).

Trials table, one row per trial, under ``<root>/<experiment>/trials/`` (a running trial's row in
``trials/_live/<trial_id>.parquet``, folded into ``part-NNNNN.parquet`` files: ``uda_ray.results.store``):
``experiment, trial_id, kind, status, error, cell, seed, source_trial_id, iterations, wall_s, started_at, ended_at,
overrides, score, score_iteration, checkpoint, chain, best/<metric>..., last/<metric>..., config/<dotted key>...,
stage/<name>/key, stage/<name>/uri..., git_rev, versions/<package>...``. ``chain`` (JSON) and ``stage/*`` are set
for a trial whose run is a chain of stages (``uda_ray.stages``): the chain, resolved, and the cache key and output of
every stage before the final one (the trial's own run), so a result can be traced to its warm-up model.
``cell``/``seed`` are set for ablations, ``source_trial_id``/``seed`` for retrains and null otherwise, so every
trial row of every kind has them and plain ``pd.read_parquet`` on the folder sees one schema; ``error`` is the
failure's message for ERROR and DIVERGED trials and null for every other. The files carry pandas metadata
(``pandas_metadata``) so that plain ``pd.read_parquet`` reads int64 and bool columns as pandas' nullable ``Int64``
and ``boolean``, as ``uda_ray.results.load_trials`` does (``seed`` of a search trial is ``<NA>``, not a float NaN).

Metrics table, under ``<root>/<experiment>/metrics/`` in the same layout, one row per report:
``experiment, trial_id, iteration, <metric>...`` with one float64 column per metric (NaN where a report lacks it).

The score. A trial's value of a metric ``m`` is ``m`` at its last evaluation, ``last/<m>``: the end of training for a
finished trial, the evaluation at which ASHA stopped a pruned one. Its **score** is that value of the experiment's
metric (column ``score``; ``score_iteration`` is the iteration of that evaluation and ``checkpoint`` the checkpoint
written at it, the model that gives the number). Every ranking (best trial, top table, retrain's choice, ablation
statistics), the value told to Optuna and every printed number use it. ``best/<m>`` keeps the run's state at its peak
evaluation for reference only: choosing by the peak of a noisy curve on the data it is chosen on is optimistic, and
no checkpoint is kept for it.

Units. Parquet keeps fractions (``val/miou`` = 0.1719: the ``score``, ``last/*``, ``best/*`` and metrics columns),
and so does everything a program reads (the values told to Optuna, Tune's results); everything written for people
(console lines, report tables, plots, CSV files of the report, retrain's summary) shows the metrics of
``PERCENT_PREFIXES`` in percent with two decimals (17.19), in columns and headers that say ``(%)``.

Every column is typed by its name alone: fixed columns by ``TRIAL_COLUMNS``, ``config/<key>`` by the annotation of
that key in ``uda_ray.config`` (so a null is still typed), metrics float64, versions string. Only config keys the
current ``Config`` does not know (written by another version) are typed from their values.
"""

from __future__ import annotations

import functools
import json
import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from uda_ray import config as config_mod

KINDS = ("search", "ablation", "retrain", "train")
STATUSES = ("TERMINATED", "PRUNED", "ERROR", "DIVERGED", "RUNNING")
FINISHED = "TERMINATED"  # the only status whose rows are ranked and used for statistics
BASELINE_CELL = "baseline"

CONFIG_PREFIX = "config/"
BEST_PREFIX = "best/"
LAST_PREFIX = "last/"
VERSIONS_PREFIX = "versions/"
STAGE_PREFIX = "stage/"
ITERATION = "iteration"

TIMESTAMP = pa.timestamp("us", tz="UTC")

TRIAL_COLUMNS: dict[str, pa.DataType] = {
    "experiment": pa.string(),
    "trial_id": pa.string(),
    "kind": pa.string(),
    "status": pa.string(),
    "error": pa.string(),
    "cell": pa.string(),
    "seed": pa.int64(),
    "source_trial_id": pa.string(),
    "iterations": pa.int64(),
    "wall_s": pa.float64(),
    "started_at": TIMESTAMP,
    "ended_at": TIMESTAMP,
    "overrides": pa.string(),
    "score": pa.float64(),
    "score_iteration": pa.int64(),
    "checkpoint": pa.string(),
    "chain": pa.string(),
    "git_rev": pa.string(),
}
METRICS_COLUMNS: dict[str, pa.DataType] = {
    "experiment": pa.string(),
    "trial_id": pa.string(),
    ITERATION: pa.int64(),
}
VERSION_PACKAGES = ("torch", "torchvision", "timm", "ray", "optuna", "pandas", "pyarrow", "numpy", "uda_ray", "python")


def is_metric_name(name: str) -> bool:
    """Metric names are ``/``-namespaced (``val/miou``); Tune's own bookkeeping keys have no slash."""
    return "/" in name


def is_number(value: Any) -> bool:
    """A real number that is not a bool (bools are a subclass of int in Python and numpy)."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _annotation_type(tp: Any, key: str) -> pa.DataType:
    if tp is bool:
        return pa.bool_()
    if tp is int:
        return pa.int64()
    if tp is float:
        return pa.float64()
    if tp is str:
        return pa.string()
    if getattr(tp, "__origin__", None) is tuple:  # tuple[int, int], tuple[float, ...]: a list of the element type
        return pa.list_(_annotation_type(tp.__args__[0], key))
    raise TypeError(f"config key '{key}': annotation {tp} has no parquet type (expected bool, int, float, str or "
                    "a tuple of one of them)")


@functools.cache
def config_type(key: str) -> pa.DataType | None:
    """Arrow type of ``config/<key>`` from the config tree's annotation; None for a key the tree does not know."""
    try:
        tp = config_mod.field_type(key)
    except config_mod.ConfigError:
        return None
    return _annotation_type(tp, key)


def _inferred_type(name: str, values: Iterable[Any]) -> pa.DataType:
    present = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not present:
        return pa.string()  # every value null: a string column keeps the column without a null type
    try:
        return pa.array(present).type
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise TypeError(f"column '{name}': values of mixed types {sorted({type(v).__name__ for v in present})}; "
                        f"a column must hold one type ({e})") from e


def trial_column_type(name: str, values: Iterable[Any] = ()) -> pa.DataType:
    """Arrow type of a trials-table column; ``values`` are only looked at for config keys unknown to this version."""
    if name in TRIAL_COLUMNS:
        return TRIAL_COLUMNS[name]
    if name.startswith((BEST_PREFIX, LAST_PREFIX)):
        return pa.float64()
    if name.startswith((VERSIONS_PREFIX, STAGE_PREFIX)):
        return pa.string()
    if name.startswith(CONFIG_PREFIX):
        key = name[len(CONFIG_PREFIX):]
        known = config_type(key)
        return known if known is not None else _inferred_type(name, values)
    raise KeyError(f"trials table: unknown column '{name}' (expected one of {sorted(TRIAL_COLUMNS)} or a name "
                   f"starting with {CONFIG_PREFIX!r}, {BEST_PREFIX!r}, {LAST_PREFIX!r}, {VERSIONS_PREFIX!r})")


_FIXED_RANK = {name: rank for rank, name in enumerate(TRIAL_COLUMNS)}


def _column_order(name: str) -> tuple[int, str]:
    if name in TRIAL_COLUMNS and name != "git_rev":
        return (0, f"{_FIXED_RANK[name]:03d}")
    for rank, prefix in enumerate((BEST_PREFIX, LAST_PREFIX, CONFIG_PREFIX, STAGE_PREFIX), start=1):
        if name.startswith(prefix):
            return (rank, name)
    if name == "git_rev":
        return (5, "")
    return (6, name)


def ordered_trial_columns(names: Iterable[str]) -> list[str]:
    """Column names in contract order: fixed columns, best/*, last/*, config/*, stage/*, git_rev, versions/*."""
    return sorted(dict.fromkeys(names), key=_column_order)


NULLABLE_PANDAS = {pa.int64(): ("int64", "Int64"), pa.bool_(): ("bool", "boolean")}


def pandas_metadata(fields: Iterable[pa.Field]) -> dict[bytes, bytes]:
    """Schema metadata that makes plain ``pd.read_parquet`` read the int64 and bool columns as pandas' nullable
    ``Int64`` and ``boolean`` (as ``load_trials`` does), instead of float64/object wherever a value is null: ``seed``
    of a search trial, ``score_iteration`` before the first evaluation. Only those columns are described; pyarrow
    takes every other column by its arrow type."""
    columns = [{"name": f.name, "field_name": f.name, "pandas_type": NULLABLE_PANDAS[f.type][0],
                "numpy_type": NULLABLE_PANDAS[f.type][1], "metadata": None}
               for f in fields if f.type in NULLABLE_PANDAS]
    meta = {"index_columns": [], "column_indexes": [], "columns": columns,
            "creator": {"library": "uda_ray", "version": "1"}}
    return {b"pandas": json.dumps(meta).encode()}


def trials_schema(rows: list[Mapping[str, Any]]) -> pa.Schema:
    """The schema of a trials table holding ``rows`` (the union of their columns, in contract order), with the
    ``pandas_metadata`` that keeps nullable integer and boolean columns typed in plain pandas."""
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row))
    ordered = ordered_trial_columns(names)
    fields = [pa.field(n, trial_column_type(n, (r.get(n) for r in rows))) for n in ordered]
    return pa.schema(fields, metadata=pandas_metadata(fields))


def metrics_schema(metric_names: Iterable[str]) -> pa.Schema:
    """``experiment, trial_id, iteration`` then one float64 column per metric, sorted by name."""
    fields = [pa.field(n, t) for n, t in METRICS_COLUMNS.items()]
    fields += [pa.field(n, pa.float64()) for n in sorted(set(metric_names)) if n not in METRICS_COLUMNS]
    return pa.schema(fields)


PERCENT_PREFIXES = ("val/", "holdout/", "pseudo/")  # fractions in [0, 1]: mIoU, IoU, kept-pixel share


def is_percent_metric(name: str) -> bool:
    """Whether a metric (or a ``best/``/``last/`` column of one, or ``score`` of one) is a fraction shown in percent."""
    for prefix in (BEST_PREFIX, LAST_PREFIX):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name.startswith(PERCENT_PREFIXES)


def metric_value_text(name: str, value: float) -> str:
    """A metric's value for people: fractions (``PERCENT_PREFIXES``) in percent with 2 decimals, others 4 digits."""
    return f"{100 * value:.2f}" if is_percent_metric(name) else f"{value:.4g}"


def metric_text(name: str, value: float) -> str:
    """``val/miou 17.19%`` (a fraction, in percent with its unit) or ``train/loss 0.3412``: a metric for people."""
    return f"{name} {metric_value_text(name, value)}{'%' if is_percent_metric(name) else ''}"
