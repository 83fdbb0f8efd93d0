"""Marginal plots on a log scale have readable ticks: at least two labels, none overlapping another, whatever the
range (matplotlib's default labels the minor ticks of a range under a decade, and they collide)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from optuna.distributions import FloatDistribution

from uda_ray.analysis import plots


def _labels_and_overlaps(fig: Figure) -> tuple[list[str], int]:
    ax = fig.axes[0]
    FigureCanvasAgg(fig)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    lo, hi = ax.get_xlim()
    shown = [t for t in ax.get_xticklabels(which="both")
             if t.get_visible() and t.get_text() and lo <= t.get_position()[0] <= hi]
    boxes = [t.get_window_extent(renderer) for t in shown]
    return [t.get_text() for t in shown], sum(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


@pytest.mark.parametrize("low, high", [(0.06, 0.6), (0.05, 1.0), (1e-3, 1.0), (1e-6, 10.0), (0.3, 0.31),
                                       (1.2e-5, 3.3e-5), (0.9999, 1.0001)])
def test_log_marginal_ticks_do_not_overlap(low: float, high: float, monkeypatch: pytest.MonkeyPatch) -> None:
    figures: list[Figure] = []
    monkeypatch.setattr(plots, "_save", lambda fig, uri: figures.append(fig) or uri)
    rng = np.random.default_rng(0)
    values = pd.Series(np.exp(rng.uniform(np.log(low), np.log(high), 12)))
    status = pd.Series(["TERMINATED"] * 8 + ["PRUNED"] * 4)
    plots.plot_marginal(values, pd.Series(rng.uniform(10, 20, 12)), status, "loss.cluda.temperature",
                        FloatDistribution(low, high, log=True), "val/miou (%)", "unused")
    labels, overlaps = _labels_and_overlaps(figures[0])
    assert len(labels) >= 2 and overlaps == 0, labels
    assert all(float(t) > 0 for t in labels)  # plain numbers, not 2×10⁻¹ mathtext


def test_default_matplotlib_ticks_would_overlap() -> None:
    """The check above can fail: matplotlib's own log ticks on 0.05–1.0 do collide at this size."""
    fig = Figure(figsize=(5, 4))
    ax = fig.add_subplot()
    x = np.exp(np.random.default_rng(0).uniform(np.log(0.05), np.log(1.0), 12))
    ax.scatter(x, np.ones_like(x))
    ax.set_xscale("log")
    assert _labels_and_overlaps(fig)[1] > 0
