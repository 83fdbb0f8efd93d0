"""Retrain's summary says both iteration counts and labels a comparison across different lengths (no Ray runtime:
the retrained runs are parquet-like rows written by the test)."""

from __future__ import annotations

import math

import pandas as pd

from uda_ray.analysis.summary import seed_summary
from uda_ray.tune.driver import Experiment
from uda_ray.tune.retrain import RetrainOutcome, format_retrain

SOURCE = pd.DataFrame({"rank": [1], "trial_id": ["s1"], "last/val/miou": [0.1636], "score_iteration": [300],
                       "iterations": [300]})


def _runs(iterations: int) -> pd.DataFrame:
    return pd.DataFrame({"trial_id": ["r0", "r1", "r2"], "source_trial_id": ["s1"] * 3, "seed": [0, 1, 2],
                         "status": ["TERMINATED", "TERMINATED", "ERROR"], "iterations": [iterations] * 3,
                         "last/val/miou": [0.12, 0.13, math.nan]})


def _outcome(iterations: int) -> tuple[pd.DataFrame, str]:
    summary = seed_summary(_runs(iterations), SOURCE, "val/miou", [0, 1, 2], {"s1": iterations})
    out = RetrainOutcome(source="results/demo", experiment=Experiment("results/demo", "retrain"), metric="val/miou",
                         mode="max", chosen=SOURCE, runs=_runs(iterations), summary=summary)
    return summary, format_retrain(out)


def test_same_length_is_a_replication() -> None:
    summary, text = _outcome(300)
    row = summary.iloc[0]
    assert (row["source_iteration"], row["iterations"], bool(row["comparable"])) == (300, 300, True)
    assert (row["n"], row["n_unfinished"], row["seeds"]) == (2, 1, "0 1")
    assert math.isclose(row["mean"], 0.125) and math.isclose(row["std"], pd.Series([0.12, 0.13]).std(ddof=1))
    assert ("#1 s1 val/miou: source 16.36% at 300 iterations → retrained 12.50 ± 0.71% at 300 iterations over 2 "
            "seed(s) [0 1], 1 unfinished") in text
    assert "different lengths" not in text


def test_different_lengths_are_said_and_labelled() -> None:
    summary, text = _outcome(100)
    assert bool(summary.iloc[0]["comparable"]) is False
    assert "source 16.36% at 300 iterations → retrained 12.50 ± 0.71% at 100 iterations" in text
    assert "different lengths: the source's score at 300 iterations and runs of 100 iterations are not a " \
           "like-with-like comparison" in text
