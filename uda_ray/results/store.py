"""Atomic parquet writers and pandas readers of the trials and metrics tables, for local folders and URIs alike.

Every path goes through ``pyarrow.fs.FileSystem.from_uri`` (a plain path is made absolute first), so
``/data/results``, ``file:///data/results`` and ``s3://bucket/uda-ray`` share one code path. A file is written to a
hidden temporary name in its final folder (``.<name>.tmp-<uuid>``) and moved onto its final name: on a local or
POSIX file system the move is a rename, so a reader sees the old file or the new one, never a partial one, and
rewriting a trial replaces its file (one row, no duplicates). Object stores (S3, GCS) publish an object only when
its upload completes, so the same holds there although their move is a copy. Readers skip names that start with
``.`` or ``_`` (pyarrow's dataset discovery does the same by default), so a temporary file left by a crash is never
read.

The best/last rule of the trials table: ``best/<m>`` is the run's state at its best report, the report where the
experiment's metric (``metric``, by ``mode``) was best (ties: the earliest); for every metric ``m`` it holds the most
recent value of ``m`` reported at or before that report, so ``best/val/iou/road`` belongs to the same evaluation as
``best/val/miou``. A trial that never reported a finite value of the experiment's metric has NaN in every ``best/*``.
``last/<m>`` is the most recent value of ``m`` over all reports (a NaN that was reported stays NaN: a diverged
loss is visible). A report "has" a metric when its key is present with a value that is not None. ``score`` is
``last/<metric>`` of the experiment's metric and ``score_iteration`` the iteration of the report that holds it (the
definition and why: ``uda_ray.results.schema``).
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from uda_ray import config as config_mod
from uda_ray.results import provenance
from uda_ray.results.schema import (
    BEST_PREFIX,
    CONFIG_PREFIX,
    ITERATION,
    KINDS,
    LAST_PREFIX,
    METRICS_COLUMNS,
    STATUSES,
    TRIAL_COLUMNS,
    VERSIONS_PREFIX,
    is_metric_name,
    is_number,
    metrics_schema,
    ordered_trial_columns,
    trials_schema,
)

# Per-trial files are tiny and read whole: statistics and dictionaries only add per-column decoding work
# (about 2x the read time of a 130-column one-row file).
SMALL_FILE_OPTIONS: dict[str, Any] = {"write_statistics": False, "use_dictionary": False}
TRIALS_DIR = "trials"
METRICS_DIR = "metrics"
IMAGES_DIR = "images"
_READ_THREADS = min(8, os.cpu_count() or 1)
_READ_BATCH = 500


# ----------------------------------------------------------------------------------------------------- paths
def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """``(file system, path inside it)`` for a local path (relative paths are made absolute) or a URI."""
    if "://" not in uri:
        uri = os.path.abspath(os.path.expanduser(uri))
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise ValueError(f"storage path {uri!r}: not a local path or a URI that pyarrow.fs understands ({e})") from e


def join(uri: str, *parts: str) -> str:
    """``uri/part/...`` with ``/`` separators (valid for local paths and URIs)."""
    return "/".join([uri.rstrip("/"), *parts])


def _check_name(what: str, name: str) -> None:
    if not name or "/" in name or "\\" in name or name.startswith((".", "_")):
        raise ValueError(f"{what} {name!r}: expected a non-empty name without path separators that does not start "
                         "with '.' or '_' (readers skip such files as temporary)")


def experiment_uri(root: str, experiment: str) -> str:
    _check_name("experiment name", experiment)
    return join(root, experiment)


def trial_uri(root: str, experiment: str, trial_id: str) -> str:
    """``<root>/<experiment>/trials/<trial_id>.parquet``."""
    _check_name("trial id", trial_id)
    return join(experiment_uri(root, experiment), TRIALS_DIR, f"{trial_id}.parquet")


def metrics_uri(root: str, experiment: str, trial_id: str) -> str:
    """``<root>/<experiment>/metrics/<trial_id>.parquet``."""
    _check_name("trial id", trial_id)
    return join(experiment_uri(root, experiment), METRICS_DIR, f"{trial_id}.parquet")


def trial_images_uri(experiment_uri: str, trial_id: str) -> str:
    """``<experiment>/trial_<id>/images``: a trial's prediction grids, beside its Tune folder (``trial_<id>``)."""
    _check_name("trial id", trial_id)
    return join(experiment_uri, f"trial_{trial_id}", IMAGES_DIR)


def list_files(uri: str, suffix: str = "") -> list[str]:
    """Sorted URIs of the visible files directly in folder ``uri`` that end with ``suffix`` ([] if no folder)."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    names = sorted(f.base_name for f in infos if f.type == pafs.FileType.File and f.base_name.endswith(suffix)
                   and not f.base_name.startswith((".", "_")))
    return [join(uri, n) for n in names]


# ----------------------------------------------------------------------------------------------------- writers
def _write_atomic(uri: str, write: Callable[[pafs.FileSystem, str], None]) -> None:
    fs, path = resolve(uri)
    parent, _, name = path.rpartition("/")
    if not name:
        raise ValueError(f"{uri!r}: expected a file path, got a folder")
    fs.create_dir(parent, recursive=True)
    tmp = f"{parent}/.{name}.tmp-{uuid.uuid4().hex}"
    try:
        write(fs, tmp)
        fs.move(tmp, path)
    except BaseException:
        if fs.get_file_info(tmp).type != pafs.FileType.NotFound:
            fs.delete_file(tmp)
        raise


def write_parquet(table_or_df: pa.Table | pd.DataFrame, uri: str, **options: Any) -> None:
    """Write a table to ``uri`` atomically (temporary hidden file in the same folder, then a move); ``options`` go
    to ``pyarrow.parquet.write_table``."""
    table = table_or_df
    if isinstance(table_or_df, pd.DataFrame):
        table = pa.Table.from_pandas(table_or_df, preserve_index=False)
    if not isinstance(table, pa.Table):
        raise TypeError(f"write_parquet({uri!r}): expected a pyarrow Table or a pandas DataFrame, "
                        f"got {type(table_or_df).__name__}")
    _write_atomic(uri, lambda fs, tmp: pq.write_table(table, tmp, filesystem=fs, **options))


def write_bytes(data: bytes, uri: str) -> None:
    """Write ``data`` to ``uri`` atomically (report files: markdown, CSV, PNG)."""

    def write(fs: pafs.FileSystem, tmp: str) -> None:
        with fs.open_output_stream(tmp) as f:
            f.write(data)

    _write_atomic(uri, write)


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise FileNotFoundError(f"{uri}: no such file")
    with fs.open_input_stream(path) as f:
        return f.read()


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


# ----------------------------------------------------------------------------------------------------- rows
def _report_metrics(report: Mapping[str, Any], index: int) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key, value in report.items():
        if not is_metric_name(key):
            continue
        if value is not None and not is_number(value):
            raise TypeError(f"report {index}: metric '{key}' = {value!r}: expected a number or None")
        out[key] = None if value is None else float(value)
    return out


def _report_iteration(report: Mapping[str, Any], index: int) -> int:
    value = report.get(ITERATION)
    if not is_number(value) or float(value) != int(value):
        raise ValueError(f"report {index}: key '{ITERATION}' = {value!r}: every report needs its integer iteration")
    return int(value)


def best_report_index(reports: Sequence[Mapping[str, Any]], metric: str, mode: str) -> int | None:
    """Index of the report with the best finite ``metric`` (``mode`` max or min; ties: the earliest), or None."""
    if mode not in ("max", "min"):
        raise ValueError(f"mode {mode!r}: expected 'max' or 'min'")
    best_i, best_v = None, math.nan
    for i, r in enumerate(reports):
        v = r.get(metric)
        if v is None or not is_number(v) or not math.isfinite(float(v)):
            continue
        if best_i is None or (float(v) > best_v if mode == "max" else float(v) < best_v):
            best_i, best_v = i, float(v)
    return best_i


def summarize_reports(reports: Sequence[Mapping[str, Any]], metric: str, mode: str) -> dict[str, float]:
    """``{best/<m>: ..., last/<m>: ...}`` for every metric in ``reports`` (rule in the module docstring)."""
    parsed = [_report_metrics(r, i) for i, r in enumerate(reports)]
    names = sorted({k for p in parsed for k in p})
    best_i = best_report_index(reports, metric, mode)
    out: dict[str, float] = {}
    for name in names:
        seen = [(i, p[name]) for i, p in enumerate(parsed) if p.get(name) is not None]
        out[f"{LAST_PREFIX}{name}"] = seen[-1][1] if seen else math.nan
        upto = [v for i, v in seen if best_i is not None and i <= best_i]
        out[f"{BEST_PREFIX}{name}"] = upto[-1] if upto else math.nan
    return dict(sorted(out.items()))


def score_of(reports: Sequence[Mapping[str, Any]], metric: str) -> tuple[float, int | None]:
    """``(score, iteration)``: the experiment's ``metric`` at the last report that has it (NaN, None without one)."""
    for i in range(len(reports) - 1, -1, -1):
        value = reports[i].get(metric)
        if value is not None:
            if not is_number(value):
                raise TypeError(f"report {i}: metric '{metric}' = {value!r}: expected a number or None")
            return float(value), _report_iteration(reports[i], i)
    return math.nan, None


def _utc(value: datetime | float | None, what: str) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)
    if is_number(value):
        return datetime.fromtimestamp(float(value), tz=timezone.utc)
    raise TypeError(f"{what} = {value!r}: expected a datetime or seconds since the epoch")


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def trial_row(*, experiment: str, trial_id: str, kind: str, status: str,
              config: config_mod.Config | Mapping[str, Any], overrides: Mapping[str, Any],
              reports: Sequence[Mapping[str, Any]], metric: str, mode: str, error: str | None = None,
              started_at: datetime | float | None = None, ended_at: datetime | float | None = None,
              wall_s: float | None = None, cell: str | None = None, seed: int | None = None,
              source_trial_id: str | None = None, git_rev: str | None = None,
              versions: Mapping[str, str] | None = None, checkpoint: str | None = None) -> dict[str, Any]:
    """One trials-table row as a ``{column: value}`` dict (pass a list of them to ``trials_table``).

    ``config`` is the resolved ``Config`` (or its ``flatten``ed dict); ``overrides`` the trial's dotted overrides
    (stored as JSON); ``reports`` the flat metric dicts reported so far, each with its ``iteration``;
    ``checkpoint`` the checkpoint written at the scored evaluation, if known. ``wall_s`` defaults to
    ``ended_at - started_at``; ``git_rev`` and ``versions`` default to this process's provenance. ``error`` is the
    message of a failed trial; an empty one is stored as null, as for every trial that did not fail.
    """
    _check_name("trial id", trial_id)
    if kind not in KINDS:
        raise ValueError(f"trial {trial_id}: kind {kind!r}: expected one of {KINDS}")
    if status not in STATUSES:
        raise ValueError(f"trial {trial_id}: status {status!r}: expected one of {STATUSES}")
    if kind == "ablation" and (cell is None or seed is None):
        raise ValueError(f"trial {trial_id}: an ablation trial needs its cell and seed (got {cell!r}, {seed!r})")
    if kind == "retrain" and (source_trial_id is None or seed is None):
        raise ValueError(f"trial {trial_id}: a retrain trial needs source_trial_id and seed "
                         f"(got {source_trial_id!r}, {seed!r})")
    flat = config_mod.flatten(config) if isinstance(config, config_mod.Config) else dict(config)
    start, end = _utc(started_at, "started_at"), _utc(ended_at, "ended_at")
    if wall_s is None:
        wall_s = (end - start).total_seconds() if start is not None and end is not None else math.nan
    iterations = max((_report_iteration(r, i) for i, r in enumerate(reports)), default=0)
    row: dict[str, Any] = {
        "experiment": experiment, "trial_id": trial_id, "kind": kind, "status": status, "error": error or None,
        "cell": cell, "seed": seed, "source_trial_id": source_trial_id, "iterations": iterations,
        "wall_s": float(wall_s), "started_at": start, "ended_at": end,
        "overrides": json.dumps(_jsonable(dict(overrides)), sort_keys=True),
    }
    row["score"], row["score_iteration"] = score_of(reports, metric)
    row["checkpoint"] = checkpoint
    row.update(summarize_reports(reports, metric, mode))
    row.update({f"{CONFIG_PREFIX}{k}": (list(v) if isinstance(v, tuple) else v) for k, v in flat.items()})
    row["git_rev"] = git_rev if git_rev is not None else provenance.process_git_revision()
    vers = versions if versions is not None else provenance.package_versions()
    row.update({f"{VERSIONS_PREFIX}{k}": v for k, v in vers.items()})
    return row


def trials_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """A typed trials table (schema from ``schema.trials_schema``: config columns typed by the config tree)."""
    rows = list(rows)
    return pa.Table.from_pylist(rows, schema=trials_schema(rows))


def metrics_table(experiment: str, trial_id: str, reports: Sequence[Mapping[str, Any]]) -> pa.Table:
    """One row per report: ``experiment, trial_id, iteration`` and one float64 column per metric (null if absent)."""
    parsed = [_report_metrics(r, i) for i, r in enumerate(reports)]
    schema = metrics_schema(k for p in parsed for k in p)
    columns: dict[str, list[Any]] = {
        "experiment": [experiment] * len(reports), "trial_id": [trial_id] * len(reports),
        ITERATION: [_report_iteration(r, i) for i, r in enumerate(reports)],
    }
    for name in schema.names[len(METRICS_COLUMNS):]:
        columns[name] = [p.get(name) for p in parsed]
    return pa.Table.from_pydict(columns, schema=schema)


def write_trial(root: str, row: Mapping[str, Any]) -> str:
    """Write one ``trial_row`` to ``<root>/<experiment>/trials/<trial_id>.parquet``; returns that URI."""
    uri = trial_uri(root, row["experiment"], row["trial_id"])
    write_parquet(trials_table([row]), uri, **SMALL_FILE_OPTIONS)
    return uri


def write_metrics(root: str, experiment: str, trial_id: str, reports: Sequence[Mapping[str, Any]]) -> str:
    """Write a trial's reports to ``<root>/<experiment>/metrics/<trial_id>.parquet``; returns that URI."""
    uri = metrics_uri(root, experiment, trial_id)
    write_parquet(metrics_table(experiment, trial_id, reports), uri, **SMALL_FILE_OPTIONS)
    return uri


# ----------------------------------------------------------------------------------------------------- readers
# Reading costs about 10 us per column per file in pyarrow's parquet reader, so 10,000 trial files of ~130 columns
# take 10-20 s of CPU however they are read. ``load_*`` therefore keep a consolidated copy of each folder in
# ``<experiment>/_cache/<folder>.parquet`` (the ``_`` prefix keeps it out of every reader's way) together with each
# source file's name, size and modification time; a later load re-reads only the files that are new or changed,
# drops rows of removed files, and rewrites the cache when anything differed.
# A search's results callback brings the cache up to date as trials end (at most every 10 minutes) and when the
# experiment ends, so only a folder copied without ``_cache`` (or with changed modification times) reads cold.
CACHE_DIR = "_cache"
_FILE, _SIZE, _MTIME = "_file", "_size", "_mtime_ns"
_BUILT_AT = b"uda_ray.cache.built_at_ns"
_CACHE_MARGIN_NS = 2_000_000_000  # > the coarsest mtime resolution of the stores we support (S3: 1 s)


def _list_parquet(uri: str) -> tuple[pafs.FileSystem, dict[str, tuple[int, int]]]:
    """``{file path: (size, mtime_ns)}`` of the visible ``.parquet`` files of a folder (mtime -1 where the store
    reports none: such entries are never trusted from the cache)."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{uri}: no such folder (expected <storage>/<experiment>/{path.rpartition('/')[2]} "
                                "with one parquet file per trial)")
    files = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    return fs, {f.path: (f.size, -1 if f.mtime_ns is None else f.mtime_ns) for f in sorted(files, key=lambda f: f.path)
                if f.type == pafs.FileType.File and f.base_name.endswith(".parquet")
                and not f.base_name.startswith((".", "_"))}


def _read_one(fs: pafs.FileSystem, path: str, size: int, mtime_ns: int) -> pa.Table:
    with fs.open_input_file(path) as f:
        t = pq.ParquetFile(f).read(use_threads=False)
    n = t.num_rows
    return (t.append_column(_FILE, pa.array([path.rpartition("/")[2]] * n, pa.string()))
            .append_column(_SIZE, pa.array([size] * n, pa.int64()))
            .append_column(_MTIME, pa.array([mtime_ns] * n, pa.int64())))


def _read_cache(uri: str, listing: dict[str, tuple[int, int]]) -> tuple[pa.Table | None, set[str], bool]:
    """The cached rows still valid for ``listing``, the names of the files they cover, and whether any cached row
    was dropped (its file changed or disappeared); ``(None, set(), True)`` when there is no cache yet."""
    if not exists(uri):
        return None, set(), True
    fs, path = resolve(uri)
    with fs.open_input_file(path) as f:
        cached = pq.ParquetFile(f).read()
    built_at = int((cached.schema.metadata or {}).get(_BUILT_AT, b"0"))
    current = {p.rpartition("/")[2]: v for p, v in listing.items()}
    keys = cached.select([_FILE, _SIZE, _MTIME]).group_by([_FILE, _SIZE, _MTIME]).aggregate([]).to_pylist()
    # an entry is trusted only if it was older than the margin when cached: a rewrite in the same mtime tick as the
    # cached version would otherwise go unseen on stores with coarse timestamps
    valid = {k[_FILE] for k in keys
             if current.get(k[_FILE]) == (k[_SIZE], k[_MTIME]) and 0 <= k[_MTIME] < built_at - _CACHE_MARGIN_NS}
    if len(valid) == len(keys):
        return cached, valid, False
    return cached.filter(pc.is_in(cached.column(_FILE), value_set=pa.array(sorted(valid), pa.string()))), valid, True


def _read_folder(uri: str, empty: pa.Schema, cache_uri: str | None) -> pa.Table:
    """All parquet files of a folder as one table, rows ordered by file name; a column missing in a file is null
    there (permissive type promotion: int64 meeting float64 becomes float64)."""
    listed_at = time.time_ns()
    fs, listing = _list_parquet(uri)
    cached, covered, dropped = _read_cache(cache_uri, listing) if cache_uri is not None else (None, set(), False)
    todo = [(p, *v) for p, v in listing.items() if p.rpartition("/")[2] not in covered]
    fresh = []
    with ThreadPoolExecutor(max_workers=_READ_THREADS) as pool:
        for start in range(0, len(todo), _READ_BATCH):
            # thousands of one-row tables hold a few hundred bytes of allocator overhead per column buffer:
            # merging each batch at once keeps the peak memory near the size of the data
            batch = list(pool.map(lambda a: _read_one(fs, *a), todo[start:start + _READ_BATCH]))
            fresh.append(pa.concat_tables(batch, promote_options="permissive").combine_chunks())
    parts = ([cached] if cached is not None and cached.num_rows else []) + fresh
    if not parts:
        return empty.empty_table()
    table = pa.concat_tables(parts, promote_options="permissive")
    if len(parts) > 1 and parts[0] is cached:
        table = table.take(pc.sort_indices(table, [(_FILE, "ascending")]))  # stable: a file's rows keep their order
    table = table.combine_chunks()
    if cache_uri is not None and (fresh or dropped):
        _write_cache(table, cache_uri, listed_at)
    return table


def _write_cache(table: pa.Table, uri: str, built_at_ns: int) -> None:
    meta = dict(table.schema.metadata or {})
    meta[_BUILT_AT] = str(built_at_ns).encode()
    try:
        write_parquet(table.replace_schema_metadata(meta), uri)
    except OSError as e:
        warnings.warn(f"could not write the read cache {uri} ({e}); results were read from the trial files and are "
                      "complete, but the next load will read them all again", stacklevel=3)


def _load(path: str, folder: str, empty: pa.Schema, cache: bool) -> pa.Table:
    cache_uri = join(path, CACHE_DIR, f"{folder}.parquet") if cache else None
    table = _read_folder(join(path, folder), empty, cache_uri)
    return table.drop_columns([c for c in (_FILE, _SIZE, _MTIME) if c in table.column_names])


def load_trials(path: str, *, cache: bool = True) -> pd.DataFrame:
    """The trials table of an experiment folder (local path or URI): one row per trial file, union of columns
    (a column missing in some files is null there). ``cache``: keep and use ``<path>/_cache/trials.parquet``."""
    table = _load(path, TRIALS_DIR, pa.schema(list(TRIAL_COLUMNS.items())), cache)
    # nullable pandas dtypes keep int and bool columns typed where some files lack them (numpy would make them float)
    nullable = {pa.int64(): pd.Int64Dtype(), pa.bool_(): pd.BooleanDtype()}
    return table.select(ordered_trial_columns(table.column_names)).to_pandas(types_mapper=nullable.get)


def load_metrics(path: str, *, cache: bool = True) -> pd.DataFrame:
    """The metrics table of an experiment folder: one row per report of every trial, union of metric columns.
    ``cache``: keep and use ``<path>/_cache/metrics.parquet``."""
    table = _load(path, METRICS_DIR, metrics_schema(()), cache)
    order = metrics_schema(n for n in table.column_names if n not in METRICS_COLUMNS).names
    return table.select(order).to_pandas()
