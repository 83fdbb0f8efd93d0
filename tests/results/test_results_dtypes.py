"""Clean dtypes for plain pandas: ``seed`` (and every int or bool column) reads as a nullable ``Int64``/``boolean``
with ``pd.read_parquet`` as with ``load_trials``; ``error`` is null for a trial that did not fail; every fixed
column is in the README's list of columns."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from tests.conftest import ROOT
from uda_ray.config import Config
from uda_ray.results import schema, store


def _row(trial_id: str, **kw: object) -> dict:
    reports = [{"iteration": 2, "val/miou": 0.1636, "train/loss": 1.5}]
    base = dict(experiment="e", trial_id=trial_id, kind="search", status="TERMINATED", config=Config(),
                overrides={}, reports=reports, metric="val/miou", mode="max", git_rev="x", versions={"uda_ray": "0"})
    return store.trial_row(**{**base, **kw})


def test_plain_pandas_reads_nullable_seed_and_null_error(tmp_path: Path) -> None:
    folder = tmp_path / "trials"
    folder.mkdir()
    rows = {"a": _row("a", error=""), "b": _row("b", status="ERROR", error="RuntimeError: boom"),
            "c": _row("c", kind="ablation", cell="baseline", seed=3)}
    for name, row in rows.items():
        pq.write_table(store.trials_table([row]), folder / f"{name}.parquet")
    one = pd.read_parquet(folder / "a.parquet")
    assert str(one["seed"].dtype) == "Int64" and one["seed"].isna().all()
    assert str(one["score_iteration"].dtype) == "Int64" and str(one["config/run.iterations"].dtype) == "Int64"
    assert str(one["config/data.flip"].dtype) == "boolean"
    assert one["error"].isna().all()  # null, not ""
    assert one["score"].iloc[0] == 0.1636  # fractions in parquet
    every = pd.read_parquet(folder).sort_values("trial_id").reset_index(drop=True)
    assert str(every["seed"].dtype) == "Int64" and every["seed"].tolist()[2] == 3 and every["seed"].isna()[0]
    assert every["error"].isna().tolist() == [True, False, True]
    loaded = store.load_trials(str(tmp_path))
    for col in ("seed", "score_iteration", "iterations", "config/run.iterations", "config/data.flip", "error"):
        assert every[col].dtype == loaded[col].dtype, col


def test_pandas_metadata_describes_only_int_and_bool_columns() -> None:
    import json

    table = store.trials_table([_row("a")])
    meta = json.loads(table.schema.metadata[b"pandas"])
    described = {c["name"]: c["numpy_type"] for c in meta["columns"]}
    assert described["seed"] == "Int64" and described["config/data.flip"] == "boolean"
    assert "score" not in described and "error" not in described and "started_at" not in described


def test_readme_lists_every_trials_column() -> None:
    text = (ROOT / "README.md").read_text()
    start = text.index("Trials columns:")
    listing = text[start:text.index("\n\n", start)]
    named = set(re.findall(r"`([^`]+)`", listing))
    words = {w.strip() for n in named for w in n.split(",")}
    missing = [c for c in schema.TRIAL_COLUMNS if c not in words]
    assert not missing, f"README's trials-column list lacks {missing}"
    assert "fraction" in listing and "percent" in listing  # the one unit story, said where the columns are


def test_tuple_config_keys_keep_their_element_type() -> None:
    """A tuple of floats is a list of float64 (not int64, which would store 0.5 as 0), a tuple of ints of int64."""
    import pyarrow as pa

    from uda_ray.results.schema import _annotation_type

    assert _annotation_type(tuple[float, float], "k") == pa.list_(pa.float64())
    assert _annotation_type(tuple[int, ...], "k") == pa.list_(pa.int64())
