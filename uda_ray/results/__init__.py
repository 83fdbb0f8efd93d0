"""Parquet results: one trials row and one metrics file per trial, written atomically, read back with pandas."""

from uda_ray.results.provenance import git_revision, package_versions
from uda_ray.results.store import (
    load_metrics,
    load_trials,
    metrics_table,
    metrics_uri,
    trial_row,
    trial_uri,
    trials_table,
    write_metrics,
    write_parquet,
    write_trial,
)

__all__ = [
    "git_revision", "load_metrics", "load_trials", "metrics_table", "metrics_uri", "package_versions", "trial_row",
    "trial_uri", "trials_table", "write_metrics", "write_parquet", "write_trial",
]
