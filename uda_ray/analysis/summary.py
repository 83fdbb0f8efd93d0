"""Plain tables over the trials table: status counts, top-k with overrides, optimisation history, retrain means;
and the markdown rendering used by the report."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from uda_ray.analysis.best import best_trials, check_mode, finished, metric_column
from uda_ray.results.schema import LAST_PREFIX, STATUSES


def status_counts(trials: pd.DataFrame) -> pd.DataFrame:
    """``status, count`` for every known status (zeros included) and any other status found, then ``total``."""
    counts = trials["status"].value_counts()
    names = list(STATUSES) + sorted(set(counts.index) - set(STATUSES))
    out = pd.DataFrame({"status": names, "count": [int(counts.get(s, 0)) for s in names]})
    return pd.concat([out, pd.DataFrame({"status": ["total"], "count": [len(trials)]})], ignore_index=True)


def top_table(trials: pd.DataFrame, metric: str, mode: str, k: int) -> pd.DataFrame:
    """The best ``k`` finished trials: rank, trial_id, ``best/<metric>``, ``last/<metric>``, iterations, wall time,
    cell/seed where set, and the trial's overrides (JSON)."""
    top = best_trials(trials, metric, mode, k)
    cols = ["rank", "trial_id", metric_column(trials, metric)]
    last = f"{LAST_PREFIX}{metric}"
    cols += [last] if last in trials.columns else []
    cols += ["iterations", "wall_s"]
    cols += [c for c in ("cell", "seed", "source_trial_id") if c in top.columns and top[c].notna().any()]
    cols += ["overrides"]
    return top[cols].reset_index(drop=True)


def history(trials: pd.DataFrame, metric: str, mode: str) -> pd.DataFrame:
    """Finished trials in the order they ended (``ended_at``, then ``trial_id``): ``n`` (1-based), trial_id,
    ended_at, value (``best/<metric>``) and ``best_so_far`` (running max or min)."""
    check_mode(mode)
    col = metric_column(trials, metric)
    ok = finished(trials, col).sort_values(["ended_at", "trial_id"], kind="stable", na_position="last")
    values = ok[col].to_numpy(dtype="float64")
    running = np.maximum.accumulate(values) if mode == "max" else np.minimum.accumulate(values)
    return pd.DataFrame({"n": np.arange(1, len(ok) + 1), "trial_id": ok["trial_id"].to_numpy(),
                         "ended_at": ok["ended_at"].to_numpy(), "value": values, "best_so_far": running})


def retrain_summary(trials: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per ``source_trial_id`` of finished retrain rows: seeds, mean, std (ddof 1) of ``best/<metric>``."""
    col = metric_column(trials, metric)
    ok = finished(trials[trials["kind"] == "retrain"], col)
    g = ok.groupby("source_trial_id")[col]
    out = pd.DataFrame({"n_seeds": g.size(), "mean": g.mean(), "std": g.std(ddof=1)}).reset_index()
    return out.sort_values("source_trial_id", kind="stable").reset_index(drop=True)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    if value is None or value is pd.NA or value is pd.NaT:
        return ""
    return str(value).replace("|", "\\|").replace("\n", " ")


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub markdown table (floats with 4 significant digits, empty cells for missing values)."""
    header = "| " + " | ".join(str(c) for c in df.columns) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    rows = ["| " + " | ".join(_cell(v) for v in row) + " |" for row in df.itertuples(index=False, name=None)]
    return "\n".join([header, rule, *rows])
