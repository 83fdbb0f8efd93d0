"""Atomic parquet writers and pandas readers of the trials and metrics tables, for local folders and URIs alike.

Every path goes through ``pyarrow.fs.FileSystem.from_uri`` (a plain path is made absolute first), so
``/data/results``, ``file:///data/results`` and ``s3://bucket/uda-ray`` share one code path. A file is written to a
hidden temporary name in its final folder (``.<name>.tmp-<uuid>``) and moved onto its final name: on a local or
POSIX file system the move is a rename, so a reader sees the old file or the new one, never a partial one. Object
stores (S3, GCS) publish an object only when its upload completes, so the same holds there although their move is a
copy. Readers skip names that start with ``.`` or ``_`` (pyarrow's dataset discovery does the same by default), so a
temporary file left by a crash is never read.

Layout of each table's folder (``<experiment>/trials``, ``<experiment>/metrics``):

    part-00000.parquet, part-00001.parquet, ...   compacted rows: every trial in exactly one part, by trial id
    _live/<trial_id>.parquet                      a trial's newest rows, replaced atomically as its results arrive

A search writes each trial to its live file (a cheap, atomic write; ``uda_ray.tune.callback`` says when) and now and
then compacts (``TableFolder.compact``): the live files are folded into the parts, a trial always into the part that
already holds it, a new trial into the last part until it holds ``PART_ROWS`` rows. Thousands of trials are then a
few large files, which plain pandas and ``load_trials`` read cold in about a second. The live folder is hidden
(``_``), so ``pd.read_parquet(<experiment>/trials)`` reads the parts alone: every trial exactly once and whole at
every moment, because a part is only ever replaced as a whole and a trial never moves between parts; it sees a
running search as of its last compaction (a search compacts every ``uda_ray.tune.callback.COMPACT_EVERY_S`` while
results arrive, less often when compactions would take more than ``COMPACT_SHARE`` of its driver's time, and when it
ends). ``load_trials``/``load_metrics`` also read the live files, which win over the parts: they see every trial's
newest rows, once. A compaction publishes the parts before it deletes the live files it folded, and readers read the
live files before they list the parts, so a live file deleted under a reader is always found in a part. Pyarrow
reads a folder with the schema of its first file, so the first part carries every column of every part (null where
it has no value). Folders written before parts existed (one visible file per trial) read the same: every visible
file is a part.

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
import re
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

import numpy as np
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
    pandas_metadata,
    trials_schema,
)

# Live files are tiny and read whole: statistics and dictionaries only add per-column decoding work
# (about 2x the read time of a 130-column one-row file).
SMALL_FILE_OPTIONS: dict[str, Any] = {"write_statistics": False, "use_dictionary": False}
TRIALS_DIR = "trials"
METRICS_DIR = "metrics"
LIVE_DIR = "_live"
IMAGES_DIR = "images"
_READ_THREADS = min(8, os.cpu_count() or 1)


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
    """``<root>/<experiment>/trials/_live/<trial_id>.parquet``: a trial's live trials row (module docstring)."""
    return table_folder(experiment_uri(root, experiment), TRIALS_DIR).live_uri(trial_id)


def metrics_uri(root: str, experiment: str, trial_id: str) -> str:
    """``<root>/<experiment>/metrics/_live/<trial_id>.parquet``: a trial's live reports (module docstring)."""
    return table_folder(experiment_uri(root, experiment), METRICS_DIR).live_uri(trial_id)


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
              versions: Mapping[str, str] | None = None, checkpoint: str | None = None,
              chain: str | None = None, stages: Mapping[str, str] | None = None) -> dict[str, Any]:
    """One trials-table row as a ``{column: value}`` dict (pass a list of them to ``trials_table``).

    ``config`` is the resolved ``Config`` (or its ``flatten``ed dict); ``overrides`` the trial's dotted overrides
    (stored as JSON); ``reports`` the flat metric dicts reported so far, each with its ``iteration``;
    ``checkpoint`` the checkpoint written at the scored evaluation, if known; ``chain`` (JSON) and ``stages``
    (``stage/<name>/key`` and ``stage/<name>/uri``) for a run that is a chain's final stage. ``wall_s`` defaults to
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
    row["chain"] = chain
    row.update(stages or {})
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


# ----------------------------------------------------------------------------------------------------- layout
PART_PREFIX = "part-"
# a part takes no new trial once it holds this many rows: few files for a fast cold read, a bounded rewrite per
# compaction (about 0.02 s for 1,000 trial rows, 0.1 s for 100,000 metric rows)
PART_ROWS = {TRIALS_DIR: 1_000, METRICS_DIR: 100_000}
KEY = "trial_id"
_PART_NAME = re.compile(rf"{PART_PREFIX}(\d+)\.parquet")


def _metrics_order(names: Iterable[str]) -> list[str]:
    return metrics_schema(n for n in names if n not in METRICS_COLUMNS).names


def _trials_layout(schema: pa.Schema) -> pa.Schema:
    fields = [schema.field(n) for n in ordered_trial_columns(schema.names)]
    return pa.schema(fields, metadata=pandas_metadata(fields))


def _metrics_layout(schema: pa.Schema) -> pa.Schema:
    return pa.schema([schema.field(n) for n in _metrics_order(schema.names)])


# a table's schema for a set of columns: the contract's column order and the table's metadata
_LAYOUTS: dict[str, Callable[[pa.Schema], pa.Schema]] = {TRIALS_DIR: _trials_layout, METRICS_DIR: _metrics_layout}


def _read_file(fs: pafs.FileSystem, path: str, columns: list[str] | None = None) -> pa.Table:
    # one open handle: a path-based read opens the file twice and could meet an atomic replacement in between
    with fs.open_input_file(path) as f:
        return pq.ParquetFile(f).read(columns=columns, use_threads=False)


def _read_if_present(fs: pafs.FileSystem, path: str) -> pa.Table | None:
    """The file's table, or None if it vanished since it was listed (a compaction folded it into a part)."""
    try:
        return _read_file(fs, path)
    except OSError:
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return None
        raise


def _by_trial(pieces: Sequence[tuple[str, pa.Table]], where: str) -> pa.Table:
    """The pieces as one table ordered by trial id, each trial's rows in their order; a trial with rows in two
    pieces (or two runs of one piece) is an error: every trial has one source."""
    seen: dict[str, str] = {}
    blocks: list[tuple[str, int, int]] = []  # (trial id, first row in the concatenation, number of rows)
    offset = 0
    for name, table in pieces:
        runs = pc.run_end_encode(table.column(KEY).combine_chunks())
        ends = runs.run_ends.to_numpy()
        for tid, start, end in zip(runs.values.to_pylist(), np.concatenate([[0], ends[:-1]]), ends):
            if tid in seen:
                raise ValueError(f"{where}: trial {tid!r} has rows in {seen[tid]} and in {name}; a trial's rows "
                                 "belong to one file (were two searches compacting the same experiment?)")
            seen[tid] = name
            blocks.append((tid, offset + int(start), int(end - start)))
        offset += table.num_rows
    table = pa.concat_tables([t for _, t in pieces], promote_options="permissive")
    blocks.sort()
    order = np.concatenate([np.arange(s, s + n) for _, s, n in blocks]) if blocks else np.zeros(0, np.int64)
    if len(order) and np.any(np.diff(order) != 1):
        table = table.take(order)
    return table.combine_chunks()


def _live_name(trial_id: str) -> str:
    """A trial's live file, relative to its table's folder."""
    return f"{LIVE_DIR}/{trial_id}.parquet"


class TableFolder:
    """One table of an experiment (``<experiment>/trials`` or ``/metrics``) in the layout of the module docstring:
    parts, each trial in exactly one, and live files that win over them. Any number of processes may read a folder;
    one at a time may compact it (a search's driver, or a script writing an experiment that no search runs)."""

    def __init__(self, uri: str, part_rows: int, layout: Callable[[pa.Schema], pa.Schema]) -> None:
        self.uri, self.part_rows, self.layout = uri, part_rows, layout
        self.fs, self.path = resolve(uri)
        # part name -> (rows, schema; None for a part the running compaction starts); None until first needed
        self._parts: dict[str, tuple[int, pa.Schema | None]] | None = None
        self._home: dict[str, str] = {}  # trial id -> name of the part that holds its rows

    # -------------------------------------------------------------------------------------------- files
    def live_uri(self, trial_id: str) -> str:
        _check_name("trial id", trial_id)
        return join(self.uri, _live_name(trial_id))

    def _listing(self, sub: str = "") -> dict[str, pafs.FileInfo]:
        """The visible parquet files directly in the folder (or in ``sub``), by name in name order."""
        infos = self.fs.get_file_info(pafs.FileSelector(f"{self.path}/{sub}".rstrip("/"), allow_not_found=True))
        return {f.base_name: f for f in sorted(infos, key=lambda f: f.base_name)
                if f.type == pafs.FileType.File and f.base_name.endswith(".parquet")
                and not f.base_name.startswith((".", "_"))}

    def _read_live(self) -> tuple[dict[str, pafs.FileInfo], dict[str, pa.Table]]:
        """The live files as listed and ``{trial id: table}`` of those still there when read."""
        listed = self._listing(LIVE_DIR)
        paths = [f.path for f in listed.values()]
        with ThreadPoolExecutor(max_workers=_READ_THREADS) as pool:
            tables = list(pool.map(lambda p: _read_if_present(self.fs, p), paths))
        return listed, {name[:-len(".parquet")]: t for name, t in zip(listed, tables) if t is not None}

    def write(self, trial_id: str, table: pa.Table) -> str:
        """Replace a trial's live file (atomically); returns its URI."""
        uri = self.live_uri(trial_id)
        write_parquet(table, uri, **SMALL_FILE_OPTIONS)
        return uri

    # -------------------------------------------------------------------------------------------- reading
    def exists(self) -> bool:
        return self.fs.get_file_info(self.path).type == pafs.FileType.Directory

    def read(self) -> pa.Table | None:
        """Every trial's rows once, ordered by trial id: its live file where it has one, else its part's rows.
        None when the folder holds no file."""
        if not self.exists():
            raise FileNotFoundError(f"{self.uri}: no such folder (expected <storage>/<experiment>/"
                                    f"{self.path.rpartition('/')[2]} with the experiment's parquet files)")
        # live files first, parts second: a live file that a compaction deletes in between was published in a part
        # before it was deleted, so the parts listed afterwards hold its trial
        _, live = self._read_live()
        live_ids = pa.array(sorted(live), pa.string())
        pieces = []
        for name in self._listing():
            table = _read_file(self.fs, f"{self.path}/{name}")
            if len(live_ids):
                table = table.filter(pc.invert(pc.is_in(table.column(KEY), value_set=live_ids)))
            pieces.append((name, table))
        pieces += [(_live_name(tid), t) for tid, t in live.items()]
        return _by_trial(pieces, self.uri) if pieces else None

    def rows_of(self, trial_id: str) -> pa.Table | None:
        """A trial's newest rows (its live file's, else its part's), or None if the table has none of it."""
        _check_name("trial id", trial_id)
        table = _read_if_present(self.fs, f"{self.path}/{_live_name(trial_id)}")
        if table is not None:
            return table
        self._load_parts()
        name = self._home.get(trial_id)
        if name is None:
            return None
        table = _read_file(self.fs, f"{self.path}/{name}")
        return table.filter(pc.equal(table.column(KEY), trial_id))

    def part_uri(self, trial_id: str) -> str | None:
        """The URI of the part that holds a trial's rows (None before a compaction folded it in)."""
        self._load_parts()
        name = self._home.get(trial_id)
        return join(self.uri, name) if name is not None else None

    # -------------------------------------------------------------------------------------------- compaction
    def _load_parts(self) -> dict[str, tuple[int, pa.Schema | None]]:
        if self._parts is None:
            parts, home = {}, {}
            for name, info in self._listing().items():
                with self.fs.open_input_file(info.path) as f:
                    pf = pq.ParquetFile(f)
                    parts[name] = (pf.metadata.num_rows, pf.schema_arrow)
                    ids = pf.read(columns=[KEY]).column(KEY).unique().to_pylist()
                for tid in ids:
                    if tid in home:
                        raise ValueError(f"{self.uri}: trial {tid!r} has rows in {home[tid]} and in {name}; a trial's "
                                         "rows belong to one file")
                    home[tid] = name
            self._parts, self._home = parts, home
        return self._parts

    def _tail(self, adding: int) -> str:
        """The part that takes a new trial of ``adding`` rows: the last numbered one until it is full."""
        parts = self._load_parts()
        numbered = sorted((int(m.group(1)), n) for n in parts if (m := _PART_NAME.fullmatch(n)))
        if numbered and parts[numbered[-1][1]][0] < self.part_rows:
            name = numbered[-1][1]
        else:
            name = f"{PART_PREFIX}{numbered[-1][0] + 1 if numbered else 0:05d}.parquet"
        rows, schema = parts.get(name, (0, None))
        parts[name] = (rows + adding, schema)
        return name

    def _write_part(self, name: str, table: pa.Table, schema: pa.Schema | None = None) -> None:
        """Publish a part (one atomic replacement) in the table's layout, widened to ``schema`` if given."""
        schema = self.layout(schema if schema is not None else table.schema)
        have = set(table.column_names)  # built once: the property makes a new list at every use
        table = pa.Table.from_arrays([table.column(f.name).cast(f.type) if f.name in have
                                      else pa.nulls(table.num_rows, f.type) for f in schema], schema=schema)
        write_parquet(table, join(self.uri, name))
        self._parts[name] = (table.num_rows, table.schema)

    def _publish(self, changed: dict[str, pa.Table]) -> None:
        """Write the changed parts; the first part (in name order) is written with every column of every part,
        because plain pandas (pyarrow's dataset discovery) reads the whole folder with the first file's schema."""
        parts = self._parts
        schemas = [changed[n].schema if n in changed else s for n, (_, s) in parts.items()
                   if n in changed or s is not None]
        union = self.layout(pa.unify_schemas(schemas, promote_options="permissive"))
        first = min(parts)
        if first not in changed and not parts[first][1].equals(union):
            changed[first] = _read_file(self.fs, f"{self.path}/{first}")
        for name in sorted(changed):
            self._write_part(name, changed[name], union if name == first else None)

    def compact(self) -> list[str]:
        """Fold the live files into the parts; returns the ids of the trials folded.

        Each trial goes to the part that already holds it, a new trial to the last part until it is full. Every
        changed part is published by one atomic replacement before any live file is deleted, and a live file is
        deleted only if it did not change since it was read (a trial that wrote again meanwhile keeps its newer
        file, which wins over the part until the next compaction). A reader therefore sees each trial once, whole,
        at every moment: plain pandas in the parts, ``read`` in the live file or the part."""
        listed, live = self._read_live()
        if not live:
            return []
        try:
            self._fold(live)
        except BaseException:
            self._parts = None  # what is on storage is consistent; read it again next time
            raise
        now = self.fs.get_file_info([info.path for name, info in listed.items() if name[:-len(".parquet")] in live])
        for info in now:
            before = listed[info.base_name]
            if info.type == pafs.FileType.File and (info.size, info.mtime_ns) == (before.size, before.mtime_ns):
                self.fs.delete_file(info.path)
        return sorted(live)

    def _fold(self, live: dict[str, pa.Table]) -> None:
        self._load_parts()
        groups: dict[str, dict[str, pa.Table]] = {}
        for tid in sorted(live):
            name = self._home.get(tid) or self._tail(live[tid].num_rows)
            groups.setdefault(name, {})[tid] = live[tid]
        changed = {}
        for name, new in groups.items():
            pieces = [(_live_name(tid), t) for tid, t in new.items()]
            if self._parts[name][1] is not None:  # on storage already
                old = _read_file(self.fs, f"{self.path}/{name}")
                pieces.insert(0, (name, old.filter(pc.invert(pc.is_in(old.column(KEY),
                                                                         value_set=pa.array(list(new), pa.string()))))))
            changed[name] = _by_trial(pieces, self.uri)
        self._publish(changed)
        for name, new in groups.items():
            self._home.update(dict.fromkeys(new, name))

    def move_out(self, trial_ids: Iterable[str], to_uri: str) -> list[str]:
        """Move trials' rows out of the table, to ``<to_uri>/<trial_id>.parquet``: live files are folded in first,
        then each trial's rows are written there, then its part is published without them. Returns the ids moved
        (lost trials of a killed driver: ``uda_ray.tune.driver.set_aside_lost_trials``)."""
        self.compact()
        self._load_parts()
        ids = sorted(set(trial_ids) & set(self._home))
        by_part: dict[str, list[str]] = {}
        for tid in ids:
            by_part.setdefault(self._home[tid], []).append(tid)
        changed = {}
        for name, tids in by_part.items():
            table = _read_file(self.fs, f"{self.path}/{name}")
            for tid in tids:
                write_parquet(table.filter(pc.equal(table.column(KEY), tid)), join(to_uri, f"{tid}.parquet"))
            changed[name] = table.filter(pc.invert(pc.is_in(table.column(KEY), value_set=pa.array(tids, pa.string()))))
        if changed:
            self._publish(changed)
        for tid in ids:
            del self._home[tid]
        return ids


def table_folder(experiment_uri: str, table: str) -> TableFolder:
    """``<experiment>/trials`` or ``<experiment>/metrics`` (``table``: ``TRIALS_DIR`` or ``METRICS_DIR``)."""
    if table not in _LAYOUTS:
        raise ValueError(f"table {table!r}: expected {TRIALS_DIR!r} or {METRICS_DIR!r}")
    return TableFolder(join(experiment_uri, table), PART_ROWS[table], _LAYOUTS[table])


def write_trial(root: str, row: Mapping[str, Any]) -> str:
    """Write one ``trial_row`` to its live file and compact the trials folder, so that every reader sees it at once
    (a script's writer; a search writes live files as results arrive and compacts now and then). Returns the URI of
    the part that holds it. Not while a search writes the same experiment: one compacting process per folder."""
    folder = table_folder(experiment_uri(root, row["experiment"]), TRIALS_DIR)
    folder.write(row["trial_id"], trials_table([row]))
    folder.compact()
    return folder.part_uri(row["trial_id"])


def write_metrics(root: str, experiment: str, trial_id: str, reports: Sequence[Mapping[str, Any]]) -> str:
    """Write a trial's reports (all of them: they replace the stored ones) as ``write_trial`` writes its row."""
    folder = table_folder(experiment_uri(root, experiment), METRICS_DIR)
    folder.write(trial_id, metrics_table(experiment, trial_id, reports))
    folder.compact()
    return folder.part_uri(trial_id)


def compact(path: str) -> dict[str, list[str]]:
    """Fold an experiment's live files into its parts, both tables; returns the trial ids folded per table. A search
    compacts as it runs and when it ends; this is for an experiment whose driver was killed before that (never
    while a search writes it)."""
    return {table: table_folder(path, table).compact() for table in (TRIALS_DIR, METRICS_DIR)}


# ----------------------------------------------------------------------------------------------------- readers
def load_trials(path: str) -> pd.DataFrame:
    """The trials table of an experiment folder (local path or URI): one row per trial, its newest, ordered by trial
    id; the union of the columns (a column missing for some trials is null there)."""
    table = table_folder(path, TRIALS_DIR).read()
    if table is None:
        table = pa.schema(list(TRIAL_COLUMNS.items())).empty_table()
    # nullable pandas dtypes keep int and bool columns typed where some files lack them (numpy would make them float)
    nullable = {pa.int64(): pd.Int64Dtype(), pa.bool_(): pd.BooleanDtype()}
    return table.select(ordered_trial_columns(table.column_names)).to_pandas(types_mapper=nullable.get)


def load_metrics(path: str) -> pd.DataFrame:
    """The metrics table of an experiment folder: one row per report of every trial (by trial id, then in report
    order), the union of the metric columns; no rows for a search whose trials have not had their reports written
    yet (a running trial's go to storage with its first checkpoint or the search's next compaction)."""
    try:
        table = table_folder(path, METRICS_DIR).read()
    except FileNotFoundError:
        if not table_folder(path, TRIALS_DIR).exists():
            raise
        table = None
    if table is None:
        table = metrics_schema(()).empty_table()
    return table.select(_metrics_order(table.column_names)).to_pandas()
