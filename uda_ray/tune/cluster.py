"""Joining a Ray cluster: which one was joined, and what to set when it refuses us.

``--address`` (or ``$RAY_ADDRESS``, which Ray reads when no address is given) names a running cluster; ``auto`` is
whichever one Ray finds on this machine, which on a machine with two Rays may not be the one meant. So the driver
says which cluster it joined (address, alive nodes, CPUs, GPUs) before the search starts.

Token authentication (Ray 2.5x): a cluster started with ``RAY_AUTH_MODE=token`` (which ``ray start --head`` turns
on by default once a token exists in ``~/.ray/auth_token``) refuses a driver without the cluster's token. Ray
reports that as ``ray.exceptions.AuthenticationError`` (its text, or the GCS status under it, says
``InvalidAuthToken`` / ``UNAUTHENTICATED``) after a long retry and a long traceback; ``ClusterAuthError`` says in one
line what to set instead.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

AUTH_MARKERS = ("InvalidAuthToken", "UNAUTHENTICATED", "Authentication token is missing or incorrect",
                "no authentication token was found", "authentication token is invalid")


class ClusterAuthError(ValueError):
    """The cluster refused this driver's (missing or wrong) authentication token; the message says what to set."""


def joining_address(address: str | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The cluster a driver joins: ``address``, else ``$RAY_ADDRESS`` (Ray's own fallback), else None (start a local
    Ray). A driver that joins a cluster must not record it as a local session it may end later."""
    return address or environ.get("RAY_ADDRESS") or None


def is_auth_failure(error: BaseException) -> bool:
    """Whether ``error`` (or an error it was raised from) is Ray's refusal of the authentication token."""
    from ray.exceptions import AuthenticationError

    seen: set[int] = set()
    todo: list[BaseException] = [error]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, AuthenticationError):
            return True
        text = getattr(e, "message", None) or (e.args[0] if e.args and isinstance(e.args[0], str) else "")
        if any(m in text for m in AUTH_MARKERS):
            return True
        todo.extend(x for x in (e.__cause__, e.__context__) if x is not None)
    return False


def auth_message(address: str, environ: Mapping[str, str] = os.environ) -> str:
    """One line: the cluster refused the token, what this process has, and what to set."""
    mode = environ.get("RAY_AUTH_MODE", "")
    has = ("RAY_AUTH_TOKEN" if environ.get("RAY_AUTH_TOKEN") else
           f"RAY_AUTH_TOKEN_PATH={environ['RAY_AUTH_TOKEN_PATH']}" if environ.get("RAY_AUTH_TOKEN_PATH") else
           "no RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH")
    return (f"the Ray cluster at {address} refused this driver's authentication token (Ray token authentication; "
            f"here RAY_AUTH_MODE is {mode or 'unset'}, {has}): set RAY_AUTH_MODE=token and the cluster's token, "
            "either RAY_AUTH_TOKEN=<token> or RAY_AUTH_TOKEN_PATH=<file> (the head node keeps it in "
            "~/.ray/auth_token; `ray get-auth-token` there prints it), then run the command again")


def describe_cluster(address: str, nodes: list[dict[str, Any]], resources: Mapping[str, float], *,
                     joined: bool) -> str:
    """``joined the Ray cluster at 10.0.0.5:6379: 3 nodes, 96 CPUs, 8 GPUs`` (or ``started a local Ray at …``)."""
    alive = sum(1 for n in nodes if n.get("Alive", n.get("alive", False)))

    def count(name: str) -> str:
        value = float(resources.get(name, 0.0))
        return f"{value:g} {name}{'' if value == 1 else 's'}"

    what = f"joined the Ray cluster at {address}" if joined else f"started a local Ray at {address}"
    return f"{what}: {alive} node{'' if alive == 1 else 's'}, {count('CPU')}, {count('GPU')}"
