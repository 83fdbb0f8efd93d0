"""Paired statistics of an ablation: each cell against the baseline over the same seeds, and learning curves.

For a cell c and the seeds s = 1..n that finished in both c and the baseline b, the paired differences are
``d_s = y_c,s - y_b,s`` with ``y = last/<metric>``, each run's value at its last evaluation (the seed fixes data
order, augmentation and initialisation, so the pairs share their noise). Reported per cell, each with ``n_pairs``:
- ``mean_diff`` = mean_s d_s (raw units of the metric; positive = higher than the baseline);
- ``ci_low, ci_high``: percentile bootstrap interval of the mean: B resamples of the n pairs with replacement,
  index matrix ``numpy.random.default_rng(seed).integers(0, n, (B, n))`` (the same seed for every cell), the
  (1 - confidence)/2 and (1 + confidence)/2 quantiles (numpy's linear rule) of the B resampled means;
- ``p_value``: two-sided paired t-test (``scipy.stats.ttest_rel``); NaN with a note when n < 2;
- ``p_holm``: Holm's step-down adjustment over the cells that have a p-value: with the m p-values sorted
  ascending, ``p_holm_(i) = min(1, max_{j <= i} (m - j + 1) p_(j))``;
- ``p_improve``: fraction of the n pairs where the cell is strictly better than the baseline (by ``mode``);
- ``p_improve_boot``: fraction of the B bootstrap means that are strictly better (> 0 for max, < 0 for min),
  the bootstrap probability that the cell improves on the baseline on average. A resampled mean within
  ``1e-12 * max|d|`` of 0 is a tie (not an improvement): a mean that is 0 in exact arithmetic must not count
  by the sign of its rounding error.

Small samples: a percentile bootstrap of the mean of fewer than ``MIN_PAIRS_BOOTSTRAP`` pairs can only take a
handful of distinct values (3 pairs: 10 resampled means) and is too narrow, so ``ci_reliable`` is False there and
the report leads with the paired t-test (which accounts for n through its degrees of freedom) instead.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from uda_ray.analysis.best import check_mode, finished, metric_column
from uda_ray.results.schema import BASELINE_CELL, FINISHED, ITERATION

N_BOOT = 10_000
MIN_PAIRS_BOOTSTRAP = 5
_TIE = 1e-12
ABLATION_COLUMNS = ("cell", "n_pairs", "baseline_mean", "cell_mean", "mean_diff", "ci_low", "ci_high",
                    "ci_reliable", "p_value", "p_holm", "p_improve", "p_improve_boot", "note")


def holm(p_values: np.ndarray | list[float]) -> np.ndarray:
    """Holm-adjusted p-values in the input order; NaN entries stay NaN and do not count in m."""
    p = np.asarray(p_values, dtype=np.float64)
    out = np.full_like(p, np.nan)
    idx = np.flatnonzero(~np.isnan(p))
    if idx.size == 0:
        return out
    order = idx[np.argsort(p[idx], kind="stable")]
    m = order.size
    scaled = (m - np.arange(m)) * p[order]  # (m - j + 1) p_(j) for j = 1..m
    out[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return out


def bootstrap_means(d: np.ndarray, *, n_boot: int, seed: int) -> np.ndarray:
    """``n_boot`` means of ``d`` resampled with replacement (index matrix drawn as in the module docstring)."""
    idx = np.random.default_rng(seed).integers(0, d.size, size=(n_boot, d.size))  # (B, n)
    return d[idx].mean(axis=1)  # (B,)


def _pairs(trials: pd.DataFrame, col: str) -> pd.DataFrame:
    """``cell x seed`` table of finished values; a duplicated (cell, seed) is an error."""
    ok = finished(trials[trials["cell"].notna()], col)
    dup = ok.duplicated(["cell", "seed"], keep=False)
    if dup.any():
        rows = ok.loc[dup, ["cell", "seed", "trial_id"]].to_dict("records")
        raise ValueError(f"ablation: more than one finished trial for the same (cell, seed): {rows}; "
                         "remove the stale trial files so that each pair is unique")
    return ok.pivot(index="seed", columns="cell", values=col)


def paired_differences(trials: pd.DataFrame, metric: str, mode: str, *, baseline: str = BASELINE_CELL,
                       n_boot: int = N_BOOT, confidence: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """One row per non-baseline cell with the statistics of the module docstring (columns ``ABLATION_COLUMNS``)."""
    check_mode(mode)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence = {confidence}: expected a value in (0, 1)")
    col = metric_column(trials, metric)
    table = _pairs(trials, col)
    if baseline not in table.columns:
        raise KeyError(f"ablation: no finished trial of the baseline cell '{baseline}' "
                       f"(cells found: {sorted(trials['cell'].dropna().unique())})")
    sign = 1.0 if mode == "max" else -1.0
    q = [(1.0 - confidence) / 2.0, (1.0 + confidence) / 2.0]
    rows = []
    for cell in sorted(c for c in trials["cell"].dropna().unique() if c != baseline):
        both = table[[baseline, cell]].dropna() if cell in table.columns else table[[baseline]].iloc[:0]
        n = len(both)
        y_b = both[baseline].to_numpy(np.float64)
        y_c = both[cell].to_numpy(np.float64) if n else np.empty(0)
        d = y_c - y_b  # (n,)
        row = {"cell": cell, "n_pairs": n, "ci_reliable": n >= MIN_PAIRS_BOOTSTRAP, "note": ""}
        if n == 0:
            row.update(baseline_mean=np.nan, cell_mean=np.nan, mean_diff=np.nan, ci_low=np.nan, ci_high=np.nan,
                       p_value=np.nan, p_improve=np.nan, p_improve_boot=np.nan,
                       note="no seed finished in both this cell and the baseline")
            rows.append(row)
            continue
        boot = bootstrap_means(d, n_boot=n_boot, seed=seed)
        lo, hi = np.quantile(boot, q)
        row.update(baseline_mean=float(y_b.mean()), cell_mean=float(y_c.mean()), mean_diff=float(d.mean()),
                   ci_low=float(lo), ci_high=float(hi), p_improve=float(np.mean(sign * d > 0)),
                   p_improve_boot=float(np.mean(sign * boot > _TIE * np.abs(d).max())))
        if n >= 2:
            row["p_value"] = float(stats.ttest_rel(y_c, y_b).pvalue)
        else:
            row["p_value"] = np.nan
            row["note"] = "1 seed pair: no t-test (needs at least 2); the interval is a single point"
        if 1 < n < MIN_PAIRS_BOOTSTRAP:
            row["note"] = (f"{n} seed pairs: the bootstrap interval is unreliable (fewer than "
                           f"{MIN_PAIRS_BOOTSTRAP}); read the paired t-test")
        rows.append(row)
    out = pd.DataFrame(rows, columns=[c for c in ABLATION_COLUMNS if c != "p_holm"])
    out.insert(ABLATION_COLUMNS.index("p_holm"), "p_holm", holm(out["p_value"].to_numpy(np.float64)))
    return out


def learning_curves(trials: pd.DataFrame, metrics: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per cell and iteration over the finished seeds: ``cell, iteration, mean, std (ddof 1), min, max, n`` of
    ``metric`` (reports without it are skipped)."""
    if metric not in metrics.columns:
        have = [c for c in metrics.columns if "/" in c]
        raise KeyError(f"metric '{metric}': not a column of the metrics table (metrics recorded: {have})")
    runs = trials.loc[(trials["status"] == FINISHED) & trials["cell"].notna(), ["trial_id", "cell", "seed"]]
    joined = metrics[["trial_id", ITERATION, metric]].merge(runs, on="trial_id", how="inner")
    joined = joined[np.isfinite(joined[metric].to_numpy(np.float64))]
    g = joined.groupby(["cell", ITERATION], sort=True)[metric]
    out = g.agg(["mean", "std", "min", "max", "size"]).rename(columns={"size": "n"}).reset_index()
    return out
