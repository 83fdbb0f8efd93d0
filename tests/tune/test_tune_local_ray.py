"""Records of local Ray sessions are keyed by host: a record written on another machine (a home folder shared over
NFS) is never judged here, while this host's records of dead drivers have their sessions' processes ended. No Ray:
a "session" is a folder name and a sleeping process that carries it on its command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from uda_ray.tune import local_ray

API = local_ray.API_SERVER_ENV


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


class _FakeRay:
    """``ray.init`` whose dashboard comes up on the asked port only from the ``up_from``-th start on."""

    def __init__(self, up_from: int) -> None:
        self.starts: list[dict] = []
        self.up_from = up_from
        self.ended = 0

    def init(self, **kw: object) -> None:
        self.starts.append(kw)

    def shutdown(self) -> None:
        self.ended += 1

    @property
    def webui_url(self) -> str | None:
        return f"127.0.0.1:{self.starts[-1]['dashboard_port']}" if len(self.starts) >= self.up_from else None


@pytest.fixture()
def fake_ray(monkeypatch: pytest.MonkeyPatch):
    import ray

    def make(up_from: int) -> _FakeRay:
        fake = _FakeRay(up_from)

        class Node:
            address_info = property(lambda self: {"webui_url": fake.webui_url})

        monkeypatch.setattr(ray, "init", fake.init)
        monkeypatch.setattr(ray, "shutdown", fake.shutdown)
        monkeypatch.setattr(ray._private.worker.global_worker, "node", Node(), raising=False)
        return fake
    return make


def test_start_tells_the_job_where_its_state_api_is(fake_ray) -> None:
    fake = fake_ray(up_from=1)
    url = local_ray.start(num_cpus=2, runtime_env={"env_vars": {"A": "1"}, "working_dir": "x"})
    (kw,) = fake.starts
    assert url == f"http://127.0.0.1:{kw['dashboard_port']}" and kw["address"] == "local" and kw["num_cpus"] == 2
    assert kw["runtime_env"] == {"env_vars": {"A": "1", "RAY_API_SERVER_ADDRESS": url}, "working_dir": "x"}


def test_start_takes_another_port_when_the_dashboard_did_not_bind(fake_ray) -> None:
    """Another process took the free port before the dashboard bound it: Ray started without one."""
    fake = fake_ray(up_from=2)
    url = local_ray.start(num_cpus=1)
    assert len(fake.starts) == 2 and fake.ended == 1
    assert url == fake.starts[1]["runtime_env"]["env_vars"]["RAY_API_SERVER_ADDRESS"]


def test_start_on_a_taken_port_that_was_asked_for_says_so(fake_ray) -> None:
    fake = fake_ray(up_from=99)
    with pytest.raises(RuntimeError, match="did not start on port 8265 .*--address"):
        local_ray.start(dashboard_port=8265)
    assert len(fake.starts) == 1 and fake.ended == 1


def test_start_without_a_dashboard_changes_nothing(fake_ray) -> None:
    fake = fake_ray(up_from=99)
    assert local_ray.start(include_dashboard=False, runtime_env={"env_vars": {"A": "1"}}) is None
    assert fake.starts == [{"address": "local", "include_dashboard": False, "runtime_env": {"env_vars": {"A": "1"}}}]


@pytest.mark.ray
def test_the_local_rays_tasks_and_actors_find_its_state_api(ray_local: None) -> None:
    """The shared Ray of the tests starts as a search's does: its tasks and actors (a Tune trial, a Train worker)
    find the state API of their own Ray and have the job's variables; the driver's environment is as it was."""
    import ray

    url = "http://" + ray._private.worker.global_worker.node.address_info["webui_url"]

    def seen() -> tuple[str | None, str | None]:
        return os.environ.get(API), os.environ.get("OMP_NUM_THREADS")

    @ray.remote(num_cpus=1)
    class Actor:
        def seen(self) -> tuple[str | None, str | None]:
            return seen()

    actor = Actor.remote()
    try:
        assert ray.get(ray.remote(num_cpus=1)(seen).remote()) == (url, "1")
        assert ray.get(actor.seen.remote()) == (url, "1")
    finally:
        ray.kill(actor)
    assert API not in os.environ
