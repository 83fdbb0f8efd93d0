"""Plain tables over the trials table: status counts, top-k with overrides, optimisation history, retrain means;
the conversion of fractions to percent for people, and the markdown rendering used by the report.

Every value of a metric here is the trial's value at its last evaluation (``last/<metric>``; for the search metric
that is the ``score``, see ``uda_ray.results.schema``). Tables are built in the parquet's units (fractions);
``in_percent`` makes the copy that is printed, plotted and written for people.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from uda_ray.analysis.best import best_trials, check_mode, finished, metric_column
from uda_ray.results.schema import BEST_PREFIX, FINISHED, LAST_PREFIX, STATUSES, is_percent_metric

PRUNED = "PRUNED"
PERCENT_SUFFIX = " (%)"


def status_counts(trials: pd.DataFrame) -> pd.DataFrame:
    """``status, count`` for every known status (zeros included) and any other status found, then ``total``."""
    counts = trials["status"].value_counts()
    names = list(STATUSES) + sorted(set(counts.index) - set(STATUSES))
    out = pd.DataFrame({"status": names, "count": [int(counts.get(s, 0)) for s in names]})
    return pd.concat([out, pd.DataFrame({"status": ["total"], "count": [len(trials)]})], ignore_index=True)


def holdout_metric(metric: str) -> str:
    """The report-half counterpart of a selection metric (``val/miou`` → ``holdout/miou``; ``uda_ray.data.holdout``)."""
    return "holdout/" + metric.split("/", 1)[1] if metric.startswith("val/") else ""


def top_table(trials: pd.DataFrame, metric: str, mode: str, k: int) -> pd.DataFrame:
    """The best ``k`` finished trials: rank, trial_id, ``last/<metric>`` (the score), the held-out report half's
    value when the search had one, the iteration it was scored at, iterations, wall time, cell/seed where set, the
    checkpoint behind the score and the trial's overrides (JSON)."""
    top = best_trials(trials, metric, mode, k)
    cols = ["rank", "trial_id", metric_column(trials, metric)]
    held = f"{LAST_PREFIX}{holdout_metric(metric)}"
    cols += [held] if held in top.columns and top[held].notna().any() else []
    cols += [c for c in ("score_iteration",) if c in top.columns]
    cols += ["iterations", "wall_s"]
    cols += [c for c in ("cell", "seed", "source_trial_id") if c in top.columns and top[c].notna().any()]
    cols += [c for c in ("checkpoint",) if c in top.columns]
    cols += ["overrides"]
    return top[cols].reset_index(drop=True)


def history(trials: pd.DataFrame, metric: str, mode: str) -> pd.DataFrame:
    """Finished and pruned trials in the order they ended (``ended_at``, then ``trial_id``): ``n`` (1-based),
    trial_id, status, ended_at, iteration (where its value was taken: the end, or the rung ASHA stopped it at),
    value (``last/<metric>``) and ``best_so_far`` (running max or min over the *finished* trials so far, NaN before
    the first: a pruned trial's value at an early rung is not comparable with a finished trial's)."""
    check_mode(mode)
    col = metric_column(trials, metric)
    values = pd.to_numeric(trials[col], errors="raise").astype("float64")
    keep = trials["status"].isin(["TERMINATED", PRUNED]).to_numpy(bool) & np.isfinite(values.to_numpy())
    ok = trials.loc[keep].sort_values(["ended_at", "trial_id"], kind="stable", na_position="last")
    v = ok[col].to_numpy(dtype="float64")
    done = (ok["status"] == "TERMINATED").to_numpy(bool)
    masked = np.where(done, v, -np.inf if mode == "max" else np.inf)
    running = np.maximum.accumulate(masked) if mode == "max" else np.minimum.accumulate(masked)
    running = np.where(np.isfinite(running), running, np.nan)
    at = ok["score_iteration"] if "score_iteration" in ok.columns else ok["iterations"]
    return pd.DataFrame({"n": np.arange(1, len(ok) + 1), "trial_id": ok["trial_id"].to_numpy(),
                         "status": ok["status"].to_numpy(), "ended_at": ok["ended_at"].to_numpy(),
                         "iteration": pd.array(at.to_numpy(), dtype="Int64"), "value": v,
                         "best_so_far": running})


RETRAIN_REQUEST = "retrain.json"  # what a retrain was asked for: {"runs": [[source trial, seed, iterations], ...]}


def seed_summary(rows: pd.DataFrame, chosen: pd.DataFrame, metric: str, seeds: Sequence[int],
                 lengths: Mapping[str, int]) -> pd.DataFrame:
    """Per source trial and reported metric (``metric``, and its held-out half when the runs have one): the
    source's own value (its score: the metric at its last evaluation, ``source_iteration``), the retrain's
    schedule (``iterations``, from ``lengths`` by source trial id) and the mean / sample std (ddof 1) of the runs
    that finished, each at its final evaluation (std is NaN with fewer than 2 finished seeds). ``comparable`` is
    False when the source was scored at another iteration than the retrained runs' final one: a 300-iteration
    score against 100-iteration runs compares two schedules, not a number with its replication. Values are
    fractions, as in parquet (``summary.csv``); ``in_percent`` makes the copy for people."""
    reported = [metric] + [m for m in (holdout_metric(metric),) if m and f"{LAST_PREFIX}{m}" in rows]
    out = []
    for m in reported:
        col = f"{LAST_PREFIX}{m}"
        for _, src in chosen.iterrows():
            tid = src["trial_id"]
            mine = rows[rows["source_trial_id"] == tid] if not rows.empty else rows
            if col in mine:
                values = pd.to_numeric(mine[col], errors="raise").astype("float64")
                mine = mine[(mine["status"] == FINISHED).to_numpy(bool) & np.isfinite(values.to_numpy())]
                values = mine[col].astype("float64")
                done = sorted(int(s) for s in mine["seed"])
            else:
                values, done = pd.Series([], dtype="float64"), []
            source_value = float(src[col]) if col in src and pd.notna(src[col]) else math.nan
            at = src.get("score_iteration")
            if at is None or pd.isna(at):
                at = src.get("iterations")
            source_at = None if at is None or pd.isna(at) else int(at)
            length = int(lengths[tid])
            out.append({"rank": int(src["rank"]), "source_trial_id": tid, "metric": m,
                        "source_value": source_value, "source_iteration": source_at, "iterations": length,
                        "comparable": source_at == length, "seeds": " ".join(map(str, done)), "n": len(done),
                        "n_unfinished": len(seeds) - len(done),
                        "mean": float(values.mean()) if len(done) else math.nan,
                        "std": float(values.std(ddof=1)) if len(done) > 1 else math.nan})
    columns = ["rank", "source_trial_id", "metric", "source_value", "source_iteration", "iterations", "comparable",
               "seeds", "n", "n_unfinished", "mean", "std"]
    table = pd.DataFrame(out, columns=columns)
    return table.astype({"source_iteration": "Int64", "iterations": "Int64"})


def retrain_summary(trials: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per ``source_trial_id`` of finished retrain rows: seeds, mean, std (ddof 1) of ``last/<metric>``."""
    col = metric_column(trials, metric)
    ok = finished(trials[trials["kind"] == "retrain"], col)
    g = ok.groupby("source_trial_id")[col]
    out = pd.DataFrame({"n_seeds": g.size(), "mean": g.mean(), "std": g.std(ddof=1)}).reset_index()
    return out.sort_values("source_trial_id", kind="stable").reset_index(drop=True)


# ------------------------------------------------------------------------------------------------- for people
def metric_columns(df: pd.DataFrame) -> list[str]:
    """Columns of ``df`` that hold a fraction metric by name (``last/val/miou``, ``best/holdout/miou``, …)."""
    return [c for c in df.columns if isinstance(c, str) and c.startswith((LAST_PREFIX, BEST_PREFIX))
            and is_percent_metric(c)]


def in_percent(df: pd.DataFrame, columns: Iterable[str]) -> pd.DataFrame:
    """A copy with ``columns`` (fractions) × 100, each renamed ``<name> (%)``; other columns untouched."""
    cols = [c for c in columns if c in df.columns]
    out = df.copy()
    for c in cols:
        out[c] = pd.to_numeric(out[c], errors="raise").astype("float64") * 100.0
    return out.rename(columns={c: f"{c}{PERCENT_SUFFIX}" for c in cols})


def _cell(value: object, percent: bool) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return f"{value:.2f}" if percent else f"{value:.4g}"
    if value is None or value is pd.NA or value is pd.NaT:
        return ""
    return str(value).replace("|", "\\|").replace("\n", " ")


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub markdown table: percent columns (named ``… (%)``) with 2 decimals, other floats with 4 significant
    digits, empty cells for missing values."""
    percent = [str(c).endswith(PERCENT_SUFFIX) for c in df.columns]
    header = "| " + " | ".join(str(c) for c in df.columns) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    rows = ["| " + " | ".join(_cell(v, p) for v, p in zip(row, percent)) + " |"
            for row in df.itertuples(index=False, name=None)]
    return "\n".join([header, rule, *rows])
