"""PNG plots of the analysis tables, drawn headless with matplotlib's object API (``Figure`` + Agg, no pyplot, no
display) and written through the results store, so local folders and URIs work alike."""

from __future__ import annotations

import io
import re

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from optuna.distributions import BaseDistribution, CategoricalDistribution

from uda_ray.results import store

DPI = 100
MAX_POINTS = 20_000  # scatter plots draw at most this many points (a seeded sample); the tables keep all rows


def _save(fig: Figure, uri: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    store.write_bytes(buf.getvalue(), uri)
    return uri


def safe_name(name: str) -> str:
    """A file-name fragment for a metric or parameter name (``loss.cluda.weight`` → ``loss.cluda.weight``,
    ``val/miou`` → ``val_miou``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _sample(n: int, seed: int = 0) -> np.ndarray:
    if n <= MAX_POINTS:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=MAX_POINTS, replace=False))


def plot_history(hist: pd.DataFrame, metric: str, out_dir: str) -> str:
    """Each finished trial's value by the order it ended, and the running best; ``history.png``."""
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    pick = _sample(len(hist))
    ax.scatter(hist["n"].to_numpy()[pick], hist["value"].to_numpy()[pick], s=8, alpha=0.5, label="trial",
               rasterized=True)
    ax.step(hist["n"], hist["best_so_far"], where="post", color="C3", label="best so far")
    ax.set_xlabel("finished trial (by end time)")
    ax.set_ylabel(metric)
    ax.set_title(f"optimisation history ({len(hist)} finished trials)")
    ax.legend(loc="best")
    return _save(fig, store.join(out_dir, "history.png"))


def plot_marginal(values: pd.Series, target: pd.Series, param: str, dist: BaseDistribution | None, metric: str,
                  out_dir: str) -> str:
    """``metric`` against one parameter's value (trials that hold it); ``marginal_<param>.png``."""
    fig = Figure(figsize=(5, 4))
    ax = fig.add_subplot()
    keep = values.notna().to_numpy()
    x, y = values[keep], target[keep].to_numpy(np.float64)
    pick = _sample(len(x))
    if isinstance(dist, CategoricalDistribution) or dist is None and not pd.api.types.is_numeric_dtype(x):
        labels = [str(v) for v in x]
        cats = sorted(set(labels))
        pos = np.array([cats.index(v) for v in labels], dtype=np.float64)
        jitter = np.random.default_rng(0).uniform(-0.15, 0.15, size=pos.size)
        ax.scatter((pos + jitter)[pick], y[pick], s=8, alpha=0.5, rasterized=True)
        ax.set_xticks(range(len(cats)), cats, rotation=30, ha="right")
    else:
        ax.scatter(x.to_numpy(np.float64)[pick], y[pick], s=8, alpha=0.5, rasterized=True)
        if getattr(dist, "log", False):
            ax.set_xscale("log")
    ax.set_xlabel(param)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs {param} ({int(keep.sum())} trials)")
    return _save(fig, store.join(out_dir, f"marginal_{safe_name(param)}.png"))


def plot_importance(importance: pd.DataFrame, evaluators: list[str], out_dir: str) -> str:
    """Horizontal bars of each evaluator's normalised importance per parameter; ``importance.png``."""
    fig = Figure(figsize=(7, 0.4 * len(importance) + 1.5))
    ax = fig.add_subplot()
    y = np.arange(len(importance))
    h = 0.8 / max(1, len(evaluators))
    for i, name in enumerate(evaluators):
        ax.barh(y + i * h, importance[name].fillna(0.0), height=h, label=name)
    ax.set_yticks(y + h * (len(evaluators) - 1) / 2, importance["param"])
    ax.invert_yaxis()
    ax.set_xlabel("normalised importance")
    ax.legend(loc="best")
    return _save(fig, store.join(out_dir, "importance.png"))


def plot_ablation(table: pd.DataFrame, metric: str, out_dir: str) -> str:
    """Each cell's mean paired difference from the baseline with its bootstrap interval; ``ablation.png``."""
    fig = Figure(figsize=(7, 0.5 * len(table) + 1.5))
    ax = fig.add_subplot()
    y = np.arange(len(table))
    mean = table["mean_diff"].to_numpy(np.float64)
    err = np.vstack([mean - table["ci_low"].to_numpy(np.float64), table["ci_high"].to_numpy(np.float64) - mean])
    ax.errorbar(mean, y, xerr=err, fmt="o", capsize=4)
    ax.axvline(0.0, color="grey", lw=1)
    ax.set_yticks(y, table["cell"])
    ax.invert_yaxis()
    ax.set_xlabel(f"{metric}: cell - baseline (mean over paired seeds, 95% bootstrap interval)")
    return _save(fig, store.join(out_dir, "ablation.png"))


def plot_learning_curves(curves: pd.DataFrame, metric: str, out_dir: str) -> str:
    """Per cell: mean over seeds against iteration with a min-max band; ``curves_<metric>.png``."""
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    for i, (cell, c) in enumerate(curves.groupby("cell", sort=True)):
        ax.plot(c["iteration"], c["mean"], color=f"C{i % 10}", label=str(cell))
        ax.fill_between(c["iteration"], c["min"], c["max"], color=f"C{i % 10}", alpha=0.2, lw=0)
    ax.set_xlabel("iteration")
    ax.set_ylabel(metric)
    ax.set_title("learning curves: mean over seeds, band = min-max")
    ax.legend(loc="best", fontsize="small")
    return _save(fig, store.join(out_dir, f"curves_{safe_name(metric)}.png"))
