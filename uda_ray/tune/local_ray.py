"""The local Ray that uda-ray starts when no cluster address is given, and what a killed driver leaves behind.

A driver that is killed with SIGKILL cannot shut its local Ray down: its GCS dies with it, so ``ray status`` sees
nothing, but agents and workers of that session (``DashboardAgent``, ``RuntimeEnvAgent``, idle workers) can live
on, holding memory and ports. So every local session uda-ray starts is recorded in
``~/.cache/uda-ray/local-ray/<host>-<driver pid>.json`` (the host name, the driver's pid and start time, the
session's folder, e.g. ``/tmp/ray/session_…``) and the record is removed when the driver exits normally. Before the
next local Ray starts, ``end_leftovers`` looks at every record of *this host* whose driver is gone, ends the
processes of that session (those whose command line names the session, or that hold a file open inside its
folder): SIGTERM, then SIGKILL after a grace period, and reports what it ended. Records are keyed by host because a
home folder shared over NFS holds the records of several machines: a pid on one machine says nothing about a
process on another, so records of other hosts (and records without a host, written by uda-ray before it kept one)
are never judged. Sessions of drivers that are still alive, and Ray sessions uda-ray did not start, are never
touched.

``start`` starts the local Ray itself, so that its processes find it when another Ray runs on the machine (a
``ray start`` cluster, a second uda-ray search): Ray's state API, when it is given no address, picks the newest
``ray start`` cluster (or fails, when several run and none was begun by ``ray start``). Ray Train's
placement-group cleaner asks it whether a Train run's controller is alive: the wrong cluster answers no (the cleaner
quits at once), and the failure ends the cleaner's thread. Either way the placement group of a trial that Tune
stops stays, holding its CPUs and GPUs for good, and the next trial waits for them forever
(``tests/train/test_train_worker_ray.py``).
So the local Ray's dashboard (the state API's server) gets a port chosen here, and every process of the job is
told its address (``RAY_API_SERVER_ADDRESS``, which the state API reads before anything else).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import socket
from pathlib import Path
from typing import Any

import psutil

RECORDS = Path("~/.cache/uda-ray/local-ray")
GRACE_S = 5.0
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"  # read by Ray's state API before $RAY_ADDRESS (ray.dashboard.utils)


def _records_dir() -> Path:
    return Path(os.environ.get("UDA_RAY_LOCAL_RAY_RECORDS", str(RECORDS))).expanduser()


def host_name() -> str:
    """This machine's name as records carry it (``socket.gethostname()``)."""
    return socket.gethostname()


def record_session(session_dir: str) -> Path:
    """Note that this process started the local Ray session in ``session_dir`` (removed again at normal exit)."""
    folder = _records_dir()
    folder.mkdir(parents=True, exist_ok=True)
    pid, host = os.getpid(), host_name()
    # the host in the file name too: two machines sharing the folder may run drivers with the same pid
    path = folder / f"{re.sub(r'[^A-Za-z0-9._-]', '_', host)}-{pid}.json"
    path.write_text(json.dumps({"host": host, "driver_pid": pid, "session_dir": session_dir,
                                "driver_create_time": psutil.Process(pid).create_time()}))
    atexit.register(lambda: path.unlink(missing_ok=True))
    return path


def _driver_alive(record: dict) -> bool:
    try:
        proc = psutil.Process(int(record["driver_pid"]))
    except (psutil.NoSuchProcess, ValueError, KeyError):
        return False
    # the pid may have been reused by an unrelated process since
    return abs(proc.create_time() - float(record.get("driver_create_time", proc.create_time()))) < 1.0


def session_processes(session_dir: str) -> list[psutil.Process]:
    """Processes of a Ray session: its name on their command line, or a file open inside its folder."""
    session = Path(session_dir)
    name, me = session.name, os.getpid()
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.pid == me:
            continue
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
            if name in cmdline or any(Path(f.path).is_relative_to(session) for f in proc.open_files()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _describe(proc: psutil.Process) -> str:
    try:
        cmd = proc.cmdline()
        title = " ".join(cmd[:1] + [a for a in cmd[1:] if not a.startswith("-")][:1]) if cmd else proc.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        title = "?"
    return f"{proc.pid} ({os.path.basename(title)[:60]})"


def end_leftovers() -> list[str]:
    """End the processes of this host's local sessions whose uda-ray driver is gone; one line per session that had
    any. Records of other hosts are left alone."""
    folder = _records_dir()
    if not folder.is_dir():
        return []
    said, host = [], host_name()
    for path in sorted(folder.glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # unreadable, e.g. being written on another host: not ours to judge
        if not isinstance(record, dict) or record.get("host") != host or _driver_alive(record):
            continue
        procs = session_processes(record.get("session_dir", ""))
        names = [_describe(p) for p in procs]
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                p.terminate()
        gone, alive = psutil.wait_procs(procs, timeout=GRACE_S)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                p.kill()
        if alive:
            psutil.wait_procs(alive, timeout=GRACE_S)
        path.unlink(missing_ok=True)
        if procs:
            said.append(f"ended {len(procs)} leftover process(es) of the local Ray session "
                        f"{record.get('session_dir')} whose uda-ray driver (pid {record.get('driver_pid')}) is gone: "
                        + ", ".join(names[:8]) + (" …" if len(names) > 8 else ""))
    return said


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start(*, runtime_env: dict[str, Any] | None = None, **options: Any) -> str | None:
    """``ray.init(address="local", …)`` with the dashboard on a free port (or ``dashboard_port``) whose address every
    process of the job has in ``$RAY_API_SERVER_ADDRESS`` (added to ``runtime_env``'s ``env_vars``; the other
    ``options`` go to ``ray.init`` as they are). Returns that address, or None with ``include_dashboard=False``."""
    import ray

    if options.get("include_dashboard") is False:
        ray.init(address="local", runtime_env=runtime_env, **options)
        return None
    host = options.setdefault("dashboard_host", "127.0.0.1")
    asked = options.pop("dashboard_port", None)
    # another process can take a free port before the dashboard binds it: Ray then starts without its dashboard
    for _ in range(1 if asked else 3):
        port = asked or _free_port(host)
        url = f"http://{host}:{port}"
        env = dict(runtime_env or {})
        env["env_vars"] = {**env.get("env_vars", {}), API_SERVER_ENV: url}
        ray.init(address="local", runtime_env=env, dashboard_port=port, **options)
        served = ray._private.worker.global_worker.node.address_info.get("webui_url")
        if served and str(served).rsplit(":", 1)[-1] == str(port):
            return url
        ray.shutdown()
    raise RuntimeError(f"the local Ray's dashboard did not start on port {port} (Ray says {served!r}: the port is "
                       "taken, or Ray lacks its dashboard, `pip install 'ray[default]'`); without it the workers of a "
                       "stopped Train trial are never released. Free the port, or pass --address to join a running "
                       "cluster")
