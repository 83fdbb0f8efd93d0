"""Records of local Ray sessions are keyed by host: a record written on another machine (a home folder shared over
NFS) is never judged here, while this host's records of dead drivers have their sessions' processes ended. No Ray:
a "session" is a folder name and a sleeping process that carries it on its command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from uda_ray.tune import local_ray


@pytest.fixture()
def records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "records"
    monkeypatch.setenv("UDA_RAY_LOCAL_RAY_RECORDS", str(folder))
    return folder


def _dead_pid() -> tuple[int, float]:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    created = psutil.Process(proc.pid).create_time()
    proc.wait()
    return proc.pid, created


def _session_process(session: Path) -> subprocess.Popen:
    # the session's name on the command line is what session_processes looks for
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(session)])


def test_record_carries_the_host(records: Path, tmp_path: Path) -> None:
    path = local_ray.record_session(str(tmp_path / "session_x"))
    record = json.loads(path.read_text())
    assert record["host"] == local_ray.host_name() and path.name.endswith(f"-{record['driver_pid']}.json")
    assert local_ray.host_name().replace("/", "_") in path.name


def test_only_this_hosts_records_are_judged(records: Path, tmp_path: Path) -> None:
    records.mkdir()
    pid, created = _dead_pid()
    mine, theirs, legacy = tmp_path / "session_mine", tmp_path / "session_theirs", tmp_path / "session_legacy"
    procs = {s: _session_process(s) for s in (mine, theirs, legacy)}
    try:
        base = {"driver_pid": pid, "driver_create_time": created}
        (records / "here.json").write_text(json.dumps({**base, "host": local_ray.host_name(),
                                                       "session_dir": str(mine)}))
        (records / "there.json").write_text(json.dumps({**base, "host": "another-machine",
                                                        "session_dir": str(theirs)}))
        (records / "old.json").write_text(json.dumps({**base, "session_dir": str(legacy)}))  # no host: not judged
        said = local_ray.end_leftovers()
        assert len(said) == 1 and str(mine) in said[0] and f"pid {pid}" in said[0]
        assert procs[mine].wait(timeout=10) is not None
        assert procs[theirs].poll() is None and procs[legacy].poll() is None
        assert sorted(p.name for p in records.iterdir()) == ["old.json", "there.json"]
    finally:
        for p in procs.values():
            p.kill()
            p.wait()
