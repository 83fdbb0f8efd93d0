"""PNG plots of the analysis tables, drawn headless with matplotlib's object API (``Figure`` + Agg, no pyplot, no
display) and written through the results store, so local folders and URIs work alike."""

from __future__ import annotations

import io
import re

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter
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


MAX_LOG_TICKS = 6


def log_ticks(ax: Axes) -> list[float]:
    """Readable ticks for a log x axis over its current limits: matplotlib's default labels the minor ticks of a
    range under about a decade (2×10⁻¹, 3×10⁻¹, 4×10⁻¹, …), which overlap on a small figure. Instead: the 1-2-5
    values inside the range (only the powers of ten, or every other one, when that gives more than
    ``MAX_LOG_TICKS``; three rounded geometric steps when it gives fewer than two), labelled plainly (``0.05``,
    ``1e-05``; slanted when long), minor ticks unlabelled. Returns the ticks set."""
    lo, hi = sorted(ax.get_xlim())
    decades = range(int(np.floor(np.log10(lo))), int(np.ceil(np.log10(hi))) + 1)
    fine = [m * 10.0**e for e in decades for m in (1, 2, 5) if lo <= m * 10.0**e <= hi]
    ticks = fine if len(fine) <= MAX_LOG_TICKS else [10.0**e for e in decades if lo <= 10.0**e <= hi]
    while len(ticks) > MAX_LOG_TICKS:  # many decades: every other one
        ticks = ticks[::2]
    if len(ticks) < 2:  # a narrow range: three inner geometric steps, with as many digits as tell them apart
        steps = np.geomspace(lo, hi, 5)[1:-1]
        digits = next((d for d in range(2, 8) if len({f"{v:.{d}g}" for v in steps}) == len(steps)), 8)
        ticks = sorted({float(f"{v:.{digits}g}") for v in steps})
    labels = [f"{t:g}" for t in ticks]
    long = max(len(t) for t in labels) > 5
    ax.set_xticks(ticks, labels, rotation=30 if long else 0, ha="right" if long else "center")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlim(lo, hi)
    return ticks


def plot_history(hist: pd.DataFrame, label: str, out_dir: str) -> str:
    """Each finished trial's score by the order trials ended, pruned trials at the rung they reached (hollow), and
    the running best of the finished trials; ``history.png``. ``hist`` holds values in the units of ``label``."""
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    done = (hist["status"] == "TERMINATED").to_numpy(bool)
    x, y = hist["n"].to_numpy(), hist["value"].to_numpy(np.float64)
    pick = _sample(len(hist))
    sel = np.zeros(len(hist), bool)
    sel[pick] = True
    ax.scatter(x[sel & done], y[sel & done], s=10, alpha=0.7, label="finished trial", rasterized=True)
    ax.scatter(x[sel & ~done], y[sel & ~done], s=14, facecolors="none", edgecolors="C1", alpha=0.8,
               label="pruned trial (value at its rung)", rasterized=True)
    ax.step(x, hist["best_so_far"], where="post", color="C3", label="best finished so far")
    ax.set_xlabel("trial (by end time)")
    ax.set_ylabel(label)
    ax.set_title(f"optimisation history: {int(done.sum())} finished, {int((~done).sum())} pruned trials")
    ax.legend(loc="best", fontsize="small")
    return _save(fig, store.join(out_dir, "history.png"))


def plot_marginal(values: pd.Series, target: pd.Series, status: pd.Series, param: str,
                  dist: BaseDistribution | None, label: str, out_dir: str) -> str:
    """``label`` against one parameter's value for the trials that hold it, pruned trials hollow at the rung they
    reached; ``marginal_<param>.png``."""
    fig = Figure(figsize=(5, 4))
    ax = fig.add_subplot()
    keep = values.notna().to_numpy()
    x, y = values[keep], target[keep].to_numpy(np.float64)
    done = (status[keep] == "TERMINATED").to_numpy(bool)
    pick = np.zeros(len(x), bool)
    pick[_sample(len(x))] = True
    if isinstance(dist, CategoricalDistribution) or dist is None and not pd.api.types.is_numeric_dtype(x):
        labels = [str(v) for v in x]
        cats = sorted(set(labels))
        pos = np.array([cats.index(v) for v in labels], dtype=np.float64)
        xs = pos + np.random.default_rng(0).uniform(-0.15, 0.15, size=pos.size)
        ax.set_xticks(range(len(cats)), cats, rotation=30, ha="right")
    else:
        xs = x.to_numpy(np.float64)
        if getattr(dist, "log", False):
            ax.set_xscale("log")
    ax.scatter(xs[pick & done], y[pick & done], s=10, alpha=0.7, label="finished", rasterized=True)
    if (~done).any():
        ax.scatter(xs[pick & ~done], y[pick & ~done], s=14, facecolors="none", edgecolors="C1", alpha=0.8,
                   label="pruned (at its rung)", rasterized=True)
        ax.legend(loc="best", fontsize="small")
    if ax.get_xscale() == "log":
        log_ticks(ax)
    ax.set_xlabel(param)
    ax.set_ylabel(label)
    ax.set_title(f"{param}: {int(done.sum())} finished + {int((~done).sum())} pruned trials", fontsize="medium")
    return _save(fig, store.join(out_dir, f"marginal_{safe_name(param)}.png"))


def plot_importance(importance: pd.DataFrame, evaluators: list[str], n_trials: int, out_dir: str) -> str:
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
    ax.set_title(f"parameter importance from {n_trials} finished trials")
    ax.legend(loc="best")
    return _save(fig, store.join(out_dir, "importance.png"))


def plot_ablation(table: pd.DataFrame, label: str, out_dir: str) -> str:
    """Each cell's mean paired difference from the baseline with its bootstrap interval (grey and dashed where it
    rests on too few pairs to be reliable), n pairs in each row's name; ``ablation.png``. ``table`` holds
    ``mean_diff``, ``ci_low``, ``ci_high`` in the units of ``label``, ``n_pairs`` and ``ci_reliable``."""
    fig = Figure(figsize=(7, 0.5 * len(table) + 1.5))
    ax = fig.add_subplot()
    y = np.arange(len(table))
    mean = table["mean_diff"].to_numpy(np.float64)
    err = np.vstack([mean - table["ci_low"].to_numpy(np.float64), table["ci_high"].to_numpy(np.float64) - mean])
    reliable = table["ci_reliable"].to_numpy(bool)
    for ok, style in ((True, dict(color="C0")), (False, dict(color="grey", ls="--"))):
        m = reliable == ok
        if m.any():
            bars = ax.errorbar(mean[m], y[m], xerr=err[:, m], fmt="o", capsize=4, color=style["color"])
            if not ok:
                for line in bars[2]:
                    line.set_linestyle("--")
    ax.axvline(0.0, color="grey", lw=1)
    ax.set_yticks(y, [f"{c} (n={n})" for c, n in zip(table["cell"], table["n_pairs"])])
    ax.invert_yaxis()
    ax.set_xlabel(f"{label}: cell - baseline (mean over paired seeds, 95% bootstrap interval)")
    if not reliable.all():
        ax.set_title("grey dashed: fewer than 5 pairs, the interval is unreliable", fontsize="small")
    return _save(fig, store.join(out_dir, "ablation.png"))


def plot_learning_curves(curves: pd.DataFrame, label: str, out_dir: str, name: str) -> str:
    """Per cell: mean over seeds against iteration with a min-max band, the number of seeds in the legend;
    ``curves_<name>.png``. ``curves`` holds ``mean``, ``min``, ``max`` in the units of ``label``."""
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    for i, (cell, c) in enumerate(curves.groupby("cell", sort=True)):
        ax.plot(c["iteration"], c["mean"], color=f"C{i % 10}", label=f"{cell} (n={int(c['n'].max())})")
        ax.fill_between(c["iteration"], c["min"], c["max"], color=f"C{i % 10}", alpha=0.2, lw=0)
    ax.set_xlabel("iteration")
    ax.set_ylabel(label)
    ax.set_title("learning curves: mean over seeds, band = min-max")
    ax.legend(loc="best", fontsize="small")
    return _save(fig, store.join(out_dir, f"curves_{safe_name(name)}.png"))


def plot_trial_curves(curves: pd.DataFrame, label: str, out_dir: str, name: str) -> str:
    """One line per trial (``trial_id, iteration, value``) in the order given; ``trials_<name>.png``."""
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    ids = list(dict.fromkeys(curves["trial_id"]))
    for i, tid in enumerate(ids):
        c = curves[curves["trial_id"] == tid]
        ax.plot(c["iteration"], c["value"], marker="o", ms=3, color=f"C{i % 10}", label=str(tid))
    ax.set_xlabel("iteration")
    ax.set_ylabel(label)
    ax.set_title(f"learning curves of the {len(ids)} best trials")
    ax.legend(loc="best", fontsize="small")
    return _save(fig, store.join(out_dir, f"trials_{safe_name(name)}.png"))
