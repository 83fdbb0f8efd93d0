"""Compaction of the trials and metrics folders: every reader (plain pandas on the folder, ``load_trials``,
``load_metrics``) sees each trial once and whole between any two file operations of a compaction, and after a
reader listed a folder while a compaction ran."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from uda_ray import config as config_mod
from uda_ray.results import store

CFG = config_mod.Config()


class _Watched(pafs.FileSystemHandler):
    """The local file system, calling ``after`` once every move, deletion or folder creation is done."""

    def __init__(self, after: Callable[[str], None]) -> None:
        self.fs, self.after, self.ops = pafs.LocalFileSystem(), after, []

    def _done(self, what: str) -> None:
        self.ops.append(what)
        self.after(what)

    def move(self, src: str, dest: str) -> None:
        self.fs.move(src, dest)
        self._done(f"move {Path(src).name} -> {Path(dest).relative_to(Path(dest).parents[1])}")

    def delete_file(self, path: str) -> None:
        self.fs.delete_file(path)
        self._done(f"delete {Path(path).relative_to(Path(path).parents[2])}")

    def create_dir(self, path: str, recursive: bool) -> None:
        self.fs.create_dir(path, recursive=recursive)

    def get_type_name(self) -> str:
        return "watched-local"

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return self.fs.get_file_info(selector)

    def open_input_stream(self, path: str) -> pa.NativeFile:
        return self.fs.open_input_stream(path)

    def open_input_file(self, path: str) -> pa.NativeFile:
        return self.fs.open_input_file(path)

    def open_output_stream(self, path: str, metadata: dict) -> pa.NativeFile:
        return self.fs.open_output_stream(path, metadata=metadata)

    def normalize_path(self, path: str) -> str:
        return self.fs.normalize_path(path)

    def __eq__(self, other: object) -> bool:
        return self is other

    def __ne__(self, other: object) -> bool:
        return self is not other

    def delete_dir(self, path: str) -> None:
        raise AssertionError("the store never deletes a folder")

    delete_dir_contents = delete_root_dir_contents = copy_file = open_append_stream = delete_dir


def _row(tid: str, version: int, metric_names: tuple[str, ...] = ("train/loss",)) -> dict:
    return store.trial_row(experiment="exp", trial_id=tid, kind="search", status="RUNNING", config=CFG,
                           overrides={}, reports=_reports(version, metric_names), metric="val/miou", mode="max",
                           error=f"v{version}", git_rev="x", versions={})


def _reports(version: int, metric_names: tuple[str, ...] = ("train/loss",)) -> list[dict]:
    """Version k of a trial has k reports (iterations 1..k), so a mixture of two versions is recognisable."""
    return [{"iteration": i, **{m: float(10 * version + i) for m in metric_names}} for i in range(1, version + 1)]


class _Experiment:
    """A writer (live files and compactions, as a search writes) and the versions it wrote of each trial."""

    def __init__(self, root: Path) -> None:
        self.root, self.uri = root, str(root / "exp")
        self.trials = store.table_folder(self.uri, store.TRIALS_DIR)
        self.metrics = store.table_folder(self.uri, store.METRICS_DIR)
        self.newest: dict[str, int] = {}
        self.compacting = False

    def write(self, tid: str, version: int, metric_names: tuple[str, ...] = ("train/loss",)) -> None:
        self.trials.write(tid, store.trials_table([_row(tid, version, metric_names)]))
        self.metrics.write(tid, store.metrics_table("exp", tid, _reports(version, metric_names)))
        self.newest[tid] = version

    def compact(self) -> None:
        self.compacting = True
        try:
            self.trials.compact()
            self.metrics.compact()
        finally:
            self.compacting = False

    def check(self, _what: str = "") -> None:
        """Plain pandas: each trial at most once, whole (a version's row, a version's reports). ``load_*``: every
        trial written, once, at its newest version."""
        exp = Path(self.uri)
        for reader, complete in ((lambda t: pd.read_parquet(exp / t), False),
                                 (lambda t: getattr(store, f"load_{t}")(self.uri), True)):
            trials = reader("trials")
            ids = trials["trial_id"].tolist() if "trial_id" in trials else []
            assert len(ids) == len(set(ids)), (_what, ids)
            versions = {tid: int(err[1:]) for tid, err in zip(ids, trials["error"] if ids else [])}
            assert set(versions) <= set(self.newest), (_what, versions)
            if complete:
                assert versions == self.newest, (_what, versions)
            metrics = reader("metrics")
            seen = dict(iter(metrics.groupby("trial_id"))) if "trial_id" in metrics else {}
            assert set(seen) <= set(self.newest) and (not complete or set(seen) == set(self.newest)), _what
            for tid, rows in seen.items():
                k = len(rows)  # a whole version k: iterations 1..k, values 10k+1..10k+k
                assert rows["iteration"].tolist() == list(range(1, k + 1)), (_what, tid)
                assert rows["train/loss"].tolist() == [10.0 * k + i for i in range(1, k + 1)], (_what, tid)
                assert not complete or k == self.newest[tid], (_what, tid, k)


@pytest.fixture
def watched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[_Experiment, _Watched]:
    """An experiment whose store calls go through a watched file system that runs every reader after each
    operation of a compaction; small parts (2 trial rows, 3 metric rows) so that compactions start new parts."""
    handler = _Watched(lambda what: exp.check(what) if exp.compacting else None)
    watched_fs = pafs.PyFileSystem(handler)
    real = store.resolve
    monkeypatch.setattr(store, "resolve", lambda uri: (watched_fs, real(uri)[1]))
    monkeypatch.setitem(store.PART_ROWS, store.TRIALS_DIR, 2)
    monkeypatch.setitem(store.PART_ROWS, store.METRICS_DIR, 3)
    exp = _Experiment(tmp_path)
    return exp, handler


def test_readers_see_each_trial_once_and_whole_at_every_step_of_compactions(watched) -> None:
    exp, handler = watched
    for tid in ("a", "b", "c"):
        exp.write(tid, 1)
    handler.ops.clear()
    exp.compact()
    # a and b fill part 0 (2 rows), c starts part 1; each part published before its live files went
    assert all(op.startswith(("move .", "delete trials/_live/", "delete metrics/_live/")) for op in handler.ops)
    assert len([op for op in handler.ops if op.startswith("delete")]) == 6
    published = [op for op in handler.ops if "part-" in op]
    assert [op.rpartition("-> ")[2] for op in published[:2]] == ["trials/part-00000.parquet",
                                                                 "trials/part-00001.parquet"]
    assert handler.ops.index(published[1]) < min(i for i, op in enumerate(handler.ops) if op.startswith("delete"))
    assert sorted(p.name for p in (Path(exp.uri) / "trials").glob("*.parquet")) == ["part-00000.parquet",
                                                                                   "part-00001.parquet"]
    # b runs on (a newer version, more reports), d is new; both compacted: b stays in part 0, d joins part 1
    handler.ops.clear()
    exp.write("b", 3)
    exp.write("d", 2)
    exp.compact()
    assert any(op.endswith("trials/part-00000.parquet") for op in handler.ops)
    assert not any(op.endswith("part-00002.parquet") for op in handler.ops if "trials/" in op)
    exp.check("end")
    part0 = pd.read_parquet(Path(exp.uri) / "trials" / "part-00000.parquet")
    assert sorted(part0["trial_id"]) == ["a", "b"] and part0.set_index("trial_id").loc["b", "error"] == "v3"


def test_a_trial_rewritten_after_compaction_wins_until_folded_into_its_own_part(tmp_path: Path) -> None:
    exp = _Experiment(tmp_path)
    exp.write("a", 1)
    exp.write("b", 1)
    exp.compact()
    exp.write("a", 2)  # a resumed trial, or a late row
    exp.check()  # load_*: the newest (live) version once; plain pandas: the compacted one once
    plain = pd.read_parquet(Path(exp.uri) / "trials").set_index("trial_id")
    assert plain.loc["a", "error"] == "v1"
    assert str(plain["seed"].dtype) == "Int64" and str(plain["config/data.flip"].dtype) == "boolean"  # pandas metadata
    assert store.load_trials(exp.uri).set_index("trial_id").loc["a", "error"] == "v2"
    exp.compact()
    exp.check()
    plain = pd.read_parquet(Path(exp.uri) / "metrics")
    assert plain.groupby("trial_id").size().to_dict() == {"a": 2, "b": 1}
    assert sorted(p.name for p in (Path(exp.uri) / "metrics").iterdir()) == ["_live", "part-00000.parquet"]


def test_a_live_file_rewritten_during_a_compaction_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exp = _Experiment(tmp_path)
    exp.write("a", 1)
    real = store.TableFolder._publish

    def publish_then_a_late_row(self: store.TableFolder, changed: dict) -> None:
        real(self, changed)
        if self is exp.trials:
            exp.write("a", 2)  # between the part's publication and the deletion of the live files

    monkeypatch.setattr(store.TableFolder, "_publish", publish_then_a_late_row)
    exp.trials.compact()
    assert (Path(exp.uri) / "trials" / "_live" / "a.parquet").exists()  # the newer row was not deleted
    assert store.load_trials(exp.uri)["error"].tolist() == ["v2"]
    monkeypatch.setattr(store.TableFolder, "_publish", real)
    exp.compact()
    assert pd.read_parquet(Path(exp.uri) / "trials")["error"].tolist() == ["v2"]
    assert not list((Path(exp.uri) / "trials" / "_live").iterdir())


@pytest.mark.parametrize("when", ["after listing live files", "after reading live files"])
def test_a_reader_that_listed_before_a_compaction_sees_each_trial_once(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       when: str) -> None:
    """A compaction by another process runs inside a reader: between its listing of the live files and their
    reads (they vanish), or between those reads and its listing of the parts (they appear in new parts)."""
    monkeypatch.setitem(store.PART_ROWS, store.TRIALS_DIR, 1)
    exp = _Experiment(tmp_path)
    exp.write("a", 1)
    exp.compact()
    exp.write("b", 2)
    exp.write("c", 1)
    writer = _Experiment(tmp_path)  # the compacting process
    ran = []
    if when == "after listing live files":
        real = store._read_if_present

        def read(fs: pafs.FileSystem, path: str) -> pa.Table | None:
            if not ran:
                ran.append(True)
                writer.compact()
            return real(fs, path)

        monkeypatch.setattr(store, "_read_if_present", read)
    else:
        real_live = store.TableFolder._read_live

        def read_live(self: store.TableFolder) -> tuple:
            out = real_live(self)
            if self is not writer.trials and self is not writer.metrics:
                writer.compact()
                ran.append(True)
            return out

        monkeypatch.setattr(store.TableFolder, "_read_live", read_live)
    trials = store.load_trials(exp.uri)
    assert ran and trials["trial_id"].tolist() == ["a", "b", "c"] and trials["error"].tolist() == ["v1", "v2", "v1"]
    assert not list((Path(exp.uri) / "trials" / "_live").iterdir())  # the compaction did fold them


def test_plain_pandas_sees_every_column_of_every_part(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(store.PART_ROWS, store.METRICS_DIR, 1)
    exp = _Experiment(tmp_path)
    exp.write("a", 1)
    exp.compact()
    exp.write("b", 2, metric_names=("train/loss", "val/miou"))  # a new metric, in a new part
    exp.compact()
    metrics = Path(exp.uri) / "metrics"
    assert sorted(p.name for p in metrics.glob("*.parquet")) == ["part-00000.parquet", "part-00001.parquet"]
    plain = pd.read_parquet(metrics)
    assert list(plain.columns) == ["experiment", "trial_id", "iteration", "train/loss", "val/miou"]
    assert plain["val/miou"].tolist()[1:] == [21.0, 22.0] and pd.isna(plain["val/miou"].iloc[0])
    pd.testing.assert_frame_equal(plain, store.load_metrics(exp.uri))


def test_file_uri_writes_compacts_and_reads_like_a_path(tmp_path: Path) -> None:
    via_uri = store.table_folder(f"file://{tmp_path}/u/exp", store.TRIALS_DIR)
    via_path = store.table_folder(str(tmp_path / "p" / "exp"), store.TRIALS_DIR)
    for folder in (via_uri, via_path):
        for i, tid in enumerate(("a", "b")):
            folder.write(tid, store.trials_table([_row(tid, i + 1)]))
        folder.compact()
        folder.write("a", store.trials_table([_row("a", 5)]))
    assert sorted(p.name for p in (tmp_path / "u" / "exp" / "trials").glob("*.parquet")) == ["part-00000.parquet"]
    by_uri, by_path = store.load_trials(f"file://{tmp_path}/u/exp"), store.load_trials(str(tmp_path / "p" / "exp"))
    pd.testing.assert_frame_equal(by_uri, by_path)
    assert by_uri["error"].tolist() == ["v5", "v2"]
    assert store.compact(f"file://{tmp_path}/u/exp") == {"trials": ["a"], "metrics": []}
    assert pd.read_parquet(tmp_path / "u" / "exp" / "trials")["error"].tolist() == ["v5", "v2"]


def test_move_out_sets_trials_aside_from_parts_and_live_files(tmp_path: Path) -> None:
    exp = _Experiment(tmp_path)
    for tid in ("a", "b", "c"):
        exp.write(tid, 1)
    exp.compact()
    exp.write("b", 2)
    aside = tmp_path / "exp" / "lost"
    for folder, name in ((exp.trials, "trials"), (exp.metrics, "metrics")):
        assert folder.move_out(["b", "c", "zzz"], str(aside / name)) == ["b", "c"]
    del exp.newest["b"], exp.newest["c"]
    exp.check()
    assert pd.read_parquet(aside / "trials").sort_values("trial_id")["error"].tolist() == ["v2", "v1"]
    assert pd.read_parquet(aside / "metrics").groupby("trial_id").size().to_dict() == {"b": 2, "c": 1}


def test_a_trial_in_two_parts_is_an_error(tmp_path: Path) -> None:
    exp = _Experiment(tmp_path)
    exp.write("a", 1)
    exp.compact()
    part = Path(exp.uri) / "trials" / "part-00000.parquet"
    part.with_name("part-00001.parquet").write_bytes(part.read_bytes())  # e.g. a copied file
    with pytest.raises(ValueError, match="trial 'a' has rows in part-00000.parquet and in part-00001.parquet"):
        store.load_trials(exp.uri)
