"""The stage cache: atomic publishing (a reader never trusts a half-written entry), first publisher wins, URIs
(``file://``, the tests' stand-in for s3) and local paths alike, usage and run records, listing and removal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from uda_ray.stages.cache import MANIFEST, StageCache, stages_root


def _staged(cache: StageCache, name: str, key: str, payload: bytes) -> Path:
    folder = cache.staging_dir(name, key)
    (folder / "sub").mkdir()
    (folder / "sub" / "out.bin").write_bytes(payload)
    return folder


@pytest.mark.parametrize("scheme", ["", "file://"])
def test_publish_lookup_local_copy_and_remove(tmp_path: Path, scheme: str) -> None:
    cache = StageCache(stages_root(f"{scheme}{tmp_path}"))
    assert cache.lookup("warm", "k1") is None and cache.entries() == []
    uri = cache.publish("warm", "k1", _staged(cache, "warm", "k1", b"abc"), {"name": "warm", "kind": "train",
                                                                            "key": "k1", "created": 1.0})
    assert cache.lookup("warm", "k1") == uri == cache.entry_uri("warm", "k1")
    local = cache.local_copy(uri)
    assert (local / "sub" / "out.bin").read_bytes() == b"abc" and local == tmp_path / "stages" / "warm-k1"
    cache.note_use(uri, "exp/trial1")
    cache.note_use(uri, "exp/trial1")  # the same user twice is one use
    cache.note_use(uri, "train/run-a")
    [entry] = cache.entries()
    assert entry["key"] == "k1" and entry["used_by"] == ["exp/trial1", "train/run-a"] and entry["size"] > 3
    assert not any(p.name.startswith(".") for p in (tmp_path / "stages").iterdir() if p.name != ".tmp"), \
        "published without leaving anything but hidden work folders"
    assert cache.remove("nope") == [] and cache.remove("k1") == [uri]
    assert cache.lookup("warm", "k1") is None


def test_the_first_publisher_wins_and_replace_swaps_in_a_new_output(tmp_path: Path) -> None:
    cache = StageCache(stages_root(str(tmp_path)))
    first = _staged(cache, "warm", "k", b"first")
    second = _staged(cache, "warm", "k", b"second")
    uri = cache.publish("warm", "k", first, {"key": "k"})
    assert cache.publish("warm", "k", second, {"key": "k"}) == uri
    assert (Path(uri) / "sub" / "out.bin").read_bytes() == b"first" and not second.exists()
    cache.publish("warm", "k", _staged(cache, "warm", "k", b"third"), {"key": "k"}, replace=True)
    assert (Path(uri) / "sub" / "out.bin").read_bytes() == b"third"


def test_an_entry_without_its_manifest_is_never_trusted(tmp_path: Path) -> None:
    cache = StageCache(stages_root(str(tmp_path)))
    half = Path(cache.entry_uri("warm", "k"))
    (half / "sub").mkdir(parents=True)
    (half / "sub" / "out.bin").write_bytes(b"half")  # a copy that stopped before its manifest (object stores)
    assert cache.lookup("warm", "k") is None and cache.entries() == []


def test_a_process_killed_while_publishing_leaves_no_entry(tmp_path: Path) -> None:
    """A process killed (SIGKILL) with its output written but before the rename: nothing is published."""
    code = (
        "import os, signal, sys\n"
        "from uda_ray.stages.cache import StageCache\n"
        f"cache = StageCache({str(tmp_path / 'stages')!r})\n"
        "folder = cache.staging_dir('warm', 'k')\n"
        "(folder / 'big.bin').write_bytes(b'x' * 1000)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], check=False)
    assert proc.returncode == -9
    cache = StageCache(str(tmp_path / "stages"))
    assert cache.lookup("warm", "k") is None and cache.entries() == []
    assert any((tmp_path / "stages" / ".tmp").iterdir())  # the leftover stays hidden


def test_run_records_count_computations(tmp_path: Path) -> None:
    cache = StageCache(stages_root(f"file://{tmp_path}"))
    cache.record_run("warm", "k", "r1", who="exp/t1", status="running")
    cache.record_run("warm", "k", "r1", status="done", finished=2.0)
    cache.record_run("warm", "k", "r2", who="exp/t2", status="failed")
    runs = cache.runs("warm", "k")
    assert [(r["run"], r["status"]) for r in runs] == [("r1", "done"), ("r2", "failed")]
    assert runs[0]["who"] == "exp/t1" and runs[0]["pid"] == os.getpid()


def test_a_work_folder_in_use_by_a_live_process_is_not_shared(tmp_path: Path) -> None:
    cache = StageCache(stages_root(str(tmp_path)))
    mine = cache.work_dir("warm", "k")
    assert cache.work_dir("warm", "k") == mine  # the same process takes its folder back
    owner = json.loads((mine / "owner.json").read_text())
    (mine / "owner.json").write_text(json.dumps({**owner, "pid": 1}))  # pid 1 is alive: someone else's
    other = cache.work_dir("warm", "k")
    assert other != mine and other.parent == mine.parent
    (mine / "owner.json").write_text(json.dumps({**owner, "pid": 2**22 + 12345}))  # a dead process's folder
    assert cache.work_dir("warm", "k") == mine


def test_manifests_are_json_with_the_key(tmp_path: Path) -> None:
    cache = StageCache(stages_root(str(tmp_path)))
    uri = cache.publish("warm", "k", _staged(cache, "warm", "k", b""), {"key": "k", "nested": {"a": [1, 2]}})
    assert json.loads((Path(uri) / MANIFEST).read_text())["nested"] == {"a": [1, 2]}
    assert cache.manifest(uri)["key"] == "k"


class _ObjectStore(StageCache):
    """The cache as on an object store (no atomic rename: files first, the manifest last; outputs downloaded before
    use), run on a local folder."""

    @property
    def local(self) -> bool:
        return False


def test_the_object_store_path_publishes_the_manifest_last_and_downloads_once(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cache = _ObjectStore(stages_root(f"file://{tmp_path / 'bucket'}"))
    staging = _staged(cache, "warm", "k", b"payload")
    assert not str(staging).startswith(str(tmp_path / "bucket"))  # written locally first
    uri = cache.publish("warm", "k", staging, {"key": "k"})
    assert cache.lookup("warm", "k") == uri and not staging.exists()
    local = cache.local_copy(uri)
    assert str(local).startswith(str(tmp_path / "home")) and (local / "sub" / "out.bin").read_bytes() == b"payload"
    assert cache.local_copy(uri) == local  # downloaded once
    # a second publisher of the same key keeps the first output
    assert cache.publish("warm", "k", _staged(cache, "warm", "k", b"other"), {"key": "k"}) == uri
    assert (tmp_path / "bucket" / "stages" / "warm-k" / "sub" / "out.bin").read_bytes() == b"payload"
