"""Paired ablation statistics against hand computation and scipy, on the generated ablation fixture."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from analysis_fixtures import ABLATION_SEEDS, BASELINE, DIFFS
from scipy import stats

from uda_ray.analysis import ablation_stats
from uda_ray.results import store


def test_holm_by_hand() -> None:
    p = [0.01, np.nan, 0.04, 0.03, 0.5]
    # m = 4 p-values; sorted 0.01, 0.03, 0.04, 0.5 -> 4*0.01, 3*0.03, 2*0.04, 1*0.5, running max, capped at 1
    expected = [0.04, np.nan, 0.09, 0.09, 0.5]
    np.testing.assert_allclose(ablation_stats.holm(p), expected, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(ablation_stats.holm([0.4, 0.3]), [0.6, 0.6])
    np.testing.assert_array_equal(ablation_stats.holm([0.9, 0.6]), [1.0, 1.0])
    assert np.isnan(ablation_stats.holm([np.nan])).all()


def _reference_bootstrap_ci(d: np.ndarray, n_boot: int, seed: int) -> tuple[float, float, np.ndarray]:
    """Straightforward loop over resamples, drawing the same index rows."""
    idx = np.random.default_rng(seed).integers(0, len(d), size=(n_boot, len(d)))
    means = np.array([sum(d[j] for j in row) / len(d) for row in idx])
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975)), means


@pytest.fixture(scope="module")
def table(ablation_dir: str) -> pd.DataFrame:
    return ablation_stats.paired_differences(store.load_trials(ablation_dir), "val/miou", "max").set_index("cell")


def test_cells_and_pairs(table: pd.DataFrame) -> None:
    assert list(table.index) == ["all", "cluda", "sdca"]  # the baseline is not compared with itself
    assert (table["n_pairs"] == len(ABLATION_SEEDS)).all()  # the crashed extra baseline seed is not paired
    # 4 pairs < MIN_PAIRS_BOOTSTRAP: the intervals are marked unreliable and the note says to read the t-test
    assert len(ABLATION_SEEDS) < ablation_stats.MIN_PAIRS_BOOTSTRAP
    assert not table["ci_reliable"].any()
    assert table["note"].str.contains("4 seed pairs: the bootstrap interval is unreliable").all()


@pytest.mark.parametrize("cell", sorted(DIFFS))
def test_paired_numbers(table: pd.DataFrame, cell: str) -> None:
    base = np.array([BASELINE[s] for s in ABLATION_SEEDS])
    y = base + np.array(DIFFS[cell])
    d = y - base  # the same float arithmetic the fixture's values went through
    r = table.loc[cell]
    assert r["mean_diff"] == pytest.approx(np.mean(DIFFS[cell]), abs=1e-12)
    assert r["baseline_mean"] == pytest.approx(base.mean(), abs=1e-15)
    assert r["cell_mean"] == pytest.approx(y.mean(), abs=1e-15)
    assert r["p_value"] == pytest.approx(stats.ttest_rel(y, base).pvalue, rel=1e-12)
    lo, hi, means = _reference_bootstrap_ci(d, 10_000, 0)
    assert r["ci_low"] == pytest.approx(lo, abs=1e-12) and r["ci_high"] == pytest.approx(hi, abs=1e-12)
    assert r["p_improve"] == np.mean(np.array(DIFFS[cell]) > 0)
    assert r["p_improve_boot"] == np.mean(means > 1e-12 * np.abs(d).max())
    if cell == "sdca":  # differences (-0.01, 0.005, 0, -0.02): some resampled means are 0 up to rounding
        assert np.mean(np.abs(means) < 1e-15) > 0.01


def test_holm_across_cells(table: pd.DataFrame) -> None:
    p = table["p_value"]
    order = p.sort_values().index  # 3 cells: multipliers 3, 2, 1 with a running max
    adj = np.minimum(1.0, np.maximum.accumulate([3 * p[order[0]], 2 * p[order[1]], 1 * p[order[2]]]))
    for cell, a in zip(order, adj):
        assert table.loc[cell, "p_holm"] == pytest.approx(a, rel=1e-12)


@pytest.mark.filterwarnings("ignore:Precision loss occurred:RuntimeWarning")  # the constant differences of x
def test_known_interval_examples() -> None:
    trials = pd.DataFrame({
        "trial_id": [f"t{i}" for i in range(7)], "status": ["TERMINATED"] * 6 + ["ERROR"],
        "cell": ["baseline", "baseline", "x", "x", "one", "only_base_seed", "x"],
        "seed": [0, 1, 0, 1, 0, 5, 2], "last/loss": [1.0, 2.0, 0.5, 1.5, 0.75, 3.0, 0.0],
    })
    t = ablation_stats.paired_differences(trials, "loss", "min", n_boot=500).set_index("cell")
    # x: differences (-0.5, -0.5): constant, so every bootstrap mean is -0.5; lower loss is an improvement
    assert t.loc["x", "ci_low"] == t.loc["x", "ci_high"] == t.loc["x", "mean_diff"] == -0.5
    assert t.loc["x", "p_improve"] == 1.0 and t.loc["x", "p_improve_boot"] == 1.0
    # one pair: no t-test, a note, and Holm ignores it
    assert t.loc["one", "n_pairs"] == 1 and np.isnan(t.loc["one", "p_value"]) and "no t-test" in t.loc["one", "note"]
    assert t.loc["one", "mean_diff"] == -0.25 and np.isnan(t.loc["one", "p_holm"])
    # a cell with no seed shared with the baseline
    assert t.loc["only_base_seed", "n_pairs"] == 0 and "no seed" in t.loc["only_base_seed", "note"]


def test_duplicate_pairs_and_missing_baseline_are_errors() -> None:
    dup = pd.DataFrame({"trial_id": ["a", "b", "c"], "status": ["TERMINATED"] * 3, "cell": ["baseline", "x", "x"],
                        "seed": [0, 0, 0], "last/m": [1.0, 2.0, 3.0]})
    with pytest.raises(ValueError, match="same \\(cell, seed\\)"):
        ablation_stats.paired_differences(dup, "m", "max")
    with pytest.raises(KeyError, match="baseline"):
        ablation_stats.paired_differences(dup.iloc[1:2], "m", "max")


def test_learning_curves(ablation_dir: str) -> None:
    trials, metrics = store.load_trials(ablation_dir), store.load_metrics(ablation_dir)
    curves = ablation_stats.learning_curves(trials, metrics, "val/miou")
    assert sorted(curves["cell"].unique()) == ["all", "baseline", "cluda", "sdca"]
    last = curves[curves["iteration"] == 200].set_index("cell")
    finals = np.array([BASELINE[s] + DIFFS["cluda"][s] for s in ABLATION_SEEDS])
    assert last.loc["cluda", "mean"] == pytest.approx(finals.mean(), abs=1e-12)
    assert last.loc["cluda", "std"] == pytest.approx(finals.std(ddof=1), abs=1e-12)
    assert last.loc["cluda", "min"] == pytest.approx(finals.min()) and last.loc["cluda", "max"] == pytest.approx(
        finals.max())
    assert (curves["n"] == len(ABLATION_SEEDS)).all()  # the crashed baseline run has no curve
    with pytest.raises(KeyError, match="val/nope"):
        ablation_stats.learning_curves(trials, metrics, "val/nope")
