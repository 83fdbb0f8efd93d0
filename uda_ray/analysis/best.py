"""Pick the best trials from the trials table and rebuild their exact configs from the ``config/*`` columns.

Trials are ranked by their value of the metric at their last evaluation, ``last/<metric>`` (for the experiment's
metric that is the ``score``: ``uda_ray.results.schema``), the number the checkpoint kept beside it gives."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from uda_ray import config as config_mod
from uda_ray.results.schema import CONFIG_PREFIX, FINISHED, LAST_PREFIX


def metric_column(trials: pd.DataFrame, metric: str, prefix: str = LAST_PREFIX) -> str:
    """``last/<metric>`` (or ``best/<metric>`` with that prefix), checked to exist in ``trials``."""
    col = f"{prefix}{metric}"
    if col not in trials.columns:
        have = sorted(c[len(prefix):] for c in trials.columns if c.startswith(prefix))
        raise KeyError(f"metric '{metric}': no column '{col}' in the trials table (metrics recorded: {have})")
    return col


def check_mode(mode: str) -> None:
    if mode not in ("max", "min"):
        raise ValueError(f"mode {mode!r}: expected 'max' or 'min'")


def finished(trials: pd.DataFrame, col: str) -> pd.DataFrame:
    """Rows that may be ranked: status TERMINATED (not PRUNED, ERROR, DIVERGED, RUNNING) with a finite ``col``."""
    values = pd.to_numeric(trials[col], errors="raise").astype("float64")
    keep = (trials["status"] == FINISHED).to_numpy(dtype=bool) & np.isfinite(values.to_numpy())
    return trials.loc[keep]


def best_trials(trials: pd.DataFrame, metric: str, mode: str, k: int) -> pd.DataFrame:
    """The ``k`` finished trials with the best ``last/<metric>`` (``mode`` max or min), best first, with a 1-based
    ``rank`` column; ties are broken by ``trial_id`` so the order is reproducible."""
    check_mode(mode)
    if k < 1:
        raise ValueError(f"k = {k}: expected at least 1 trial")
    col = metric_column(trials, metric)
    ok = finished(trials, col).sort_values("trial_id", kind="stable")
    ok = ok.sort_values(col, ascending=(mode == "min"), kind="stable").head(k).reset_index(drop=True)
    ok.insert(0, "rank", np.arange(1, len(ok) + 1))
    return ok


def _is_null(value: Any) -> bool:
    if isinstance(value, (list, tuple, np.ndarray)):
        return False
    return value is None or value is pd.NA or value is pd.NaT or (isinstance(value, float) and math.isnan(value))


def _plain(key: str, value: Any) -> Any:
    """A parquet/pandas cell as the plain Python value ``from_dict`` expects for ``key``'s annotation."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return tuple(_plain(key, v) for v in value)
    if isinstance(value, np.generic):
        value = value.item()
    try:
        tp = config_mod.field_type(key)
    except config_mod.ConfigError:
        return value  # an unknown key: from_dict names it
    # an int column with nulls in some files reads back as float (3.0); the annotation says which it was
    if (tp is int or getattr(tp, "__origin__", None) is tuple) and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _nested(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def config_from_row(row: pd.Series | Mapping[str, Any]) -> config_mod.Config:
    """The exact ``Config`` a trial ran, rebuilt from its ``config/<dotted key>`` cells and validated by
    ``uda_ray.config.from_dict``. A null cell (a key the writing version did not have) takes the default."""
    items = row.items()
    flat = {name[len(CONFIG_PREFIX):]: value for name, value in items
            if name.startswith(CONFIG_PREFIX) and not _is_null(value)}
    if not flat:
        raise KeyError(f"trial {row.get('trial_id', '?')}: the row has no '{CONFIG_PREFIX}*' columns")
    plain = {k: _plain(k, v) for k, v in flat.items()}
    return config_mod.from_dict(_nested(plain), source=f"trials row '{row.get('trial_id', '?')}'")
