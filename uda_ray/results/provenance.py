"""Where a result came from: the git revision of the code and the versions of the packages that ran it."""

from __future__ import annotations

import functools
import importlib.metadata
import platform
import subprocess
from pathlib import Path

from uda_ray.results.schema import VERSION_PACKAGES

_DISTRIBUTIONS = {"uda_ray": "uda-ray"}  # import name -> distribution name where they differ
_GIT_TIMEOUT_S = 10.0


def _git(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    # --no-optional-locks: `git status` must not refresh (write) the index of the checkout it inspects
    return subprocess.run(["git", "--no-optional-locks", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=_GIT_TIMEOUT_S, check=False)


def git_revision(path: str | Path | None = None) -> str:
    """``HEAD``'s commit hash of the checkout holding ``path`` (default: this package), ``+dirty`` appended when
    tracked files have uncommitted changes; ``"unknown (<reason>)"`` when it cannot be read (not a checkout, no git
    executable, git timed out). Never raises for those cases: a result without a revision is still a result."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    if not where.is_dir():
        where = where.parent
    if not where.is_dir():
        return f"unknown (folder {where} does not exist)"
    try:
        head = _git(["rev-parse", "--verify", "HEAD"], where)
        if head.returncode != 0:
            reason = head.stderr.strip().splitlines()[0] if head.stderr.strip() else f"exit {head.returncode}"
            return f"unknown (git rev-parse in {where}: {reason})"
        status = _git(["status", "--porcelain", "--untracked-files=no"], where)
    except FileNotFoundError:
        return "unknown (git executable not found)"
    except subprocess.TimeoutExpired:
        return f"unknown (git timed out after {_GIT_TIMEOUT_S:.0f} s in {where})"
    rev = head.stdout.strip()
    if status.returncode != 0:
        return f"{rev}+unknown-status"
    return f"{rev}+dirty" if status.stdout.strip() else rev


@functools.cache
def process_git_revision() -> str:
    """``git_revision()`` of this package, read once per process (the code a process runs does not change under
    it; trial rows are written many times per trial)."""
    return git_revision()


@functools.cache
def _versions() -> tuple[tuple[str, str], ...]:
    out: list[tuple[str, str]] = []
    for name in VERSION_PACKAGES:
        if name == "python":
            out.append((name, platform.python_version()))
            continue
        try:
            out.append((name, importlib.metadata.version(_DISTRIBUTIONS.get(name, name))))
        except importlib.metadata.PackageNotFoundError:
            out.append((name, "not installed"))
    return tuple(out)


def package_versions() -> dict[str, str]:
    """``{package: version}`` for the packages in ``VERSION_PACKAGES`` (read from installed metadata, nothing is
    imported); ``"not installed"`` for a missing one."""
    return dict(_versions())
