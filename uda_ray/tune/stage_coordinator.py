"""One computation per missing stage across the concurrent trials of a search, on any node of the cluster.

The search's driver starts a named ``StageCoordinator`` actor (``start_coordinator``); a trial that needs a stage
the cache lacks asks it first (``coordinate``). The first asker computes the stage, sending a heartbeat while it
works; the others wait and then read the published output. If the computing trial's process dies (its heartbeat
stops for ``LEASE_S``), the next waiter takes the computation over; a computation that fails fails every trial that
waits for it, with the stage's error. The actor lives as long as the driver: a resumed search starts a new one,
and the cache on storage (complete outputs only) says what is already done.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import ray

from uda_ray.stages.chain import StageFailed

LEASE_S = 60.0  # a computing trial whose heartbeat is older than this is taken to be gone
BEAT_S = 10.0
POLL_S = 1.0


@ray.remote(num_cpus=0)
class StageCoordinator:
    """Who computes which stage key: ``{key: {"owner", "beat", "status", "uri", "error"}}``."""

    def __init__(self) -> None:
        self.state: dict[str, dict[str, Any]] = {}

    def claim(self, key: str, token: str) -> dict[str, Any]:
        """``{"role": "run"}`` for the caller that is to compute ``key`` now; ``{"role": "wait"}`` while another
        computes it; ``{"role": "done", "uri"}`` or ``{"role": "failed", "error"}`` once it has ended."""
        now = time.time()
        st = self.state.get(key)
        if st is None or (st["status"] == "running" and now - st["beat"] > LEASE_S):
            self.state[key] = {"owner": token, "beat": now, "status": "running", "taken_over": st is not None}
            return {"role": "run"}
        if st["status"] == "running":
            return {"role": "run"} if st["owner"] == token else {"role": "wait"}
        return {"role": st["status"], "uri": st.get("uri"), "error": st.get("error")}

    def beat(self, key: str, token: str) -> None:
        st = self.state.get(key)
        if st is not None and st["owner"] == token:
            st["beat"] = time.time()

    def finish(self, key: str, token: str, uri: str) -> None:
        self.state[key] = {"owner": token, "beat": time.time(), "status": "done", "uri": uri}

    def fail(self, key: str, token: str, error: str) -> None:
        self.state[key] = {"owner": token, "beat": time.time(), "status": "failed", "error": error}


def coordinator_name(experiment: str) -> str:
    return f"uda-ray-stages-{experiment}"


def start_coordinator(experiment: str) -> Any:
    """The search's coordinator (created by the driver before the trials start; its lifetime is the driver's)."""
    return StageCoordinator.options(name=coordinator_name(experiment), get_if_exists=True).remote()


def coordinate_with(experiment: str) -> Callable[[str, str, Callable[[], str]], str]:
    """The ``coordinate`` hook of ``uda_ray.stages.run.ChainRun`` for a trial of ``experiment``."""

    def coordinate(name: str, key: str, compute: Callable[[], str]) -> str:
        actor = ray.get_actor(coordinator_name(experiment))
        token = uuid.uuid4().hex
        said = False
        while True:
            answer = ray.get(actor.claim.remote(f"{name}-{key}", token))
            role = answer["role"]
            if role == "done":
                return answer["uri"]
            if role == "failed":
                raise StageFailed(f"stage '{name}' (key {key}) failed in another trial: {answer['error']}")
            if role == "run":
                return _run_owned(actor, f"{name}-{key}", token, compute)
            if not said:
                print(f"[stage {name}] another trial is computing it (key {key}); waiting", flush=True)
                said = True
            time.sleep(POLL_S)

    return coordinate


def _run_owned(actor: Any, key: str, token: str, compute: Callable[[], str]) -> str:
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(BEAT_S):
            actor.beat.remote(key, token)

    thread = threading.Thread(target=beat, daemon=True, name=f"uda-ray-stage-beat-{key}")
    thread.start()
    try:
        uri = compute()
    except Exception as e:  # an interrupted computation is not a failure: its lease runs out and a waiter takes over
        ray.get(actor.fail.remote(key, token, f"{type(e).__name__}: {e}"[:2000]))
        raise
    finally:
        stop.set()
    ray.get(actor.finish.remote(key, token, uri))
    return uri
