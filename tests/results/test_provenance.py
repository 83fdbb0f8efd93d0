"""git revision (clean, dirty, not a checkout, no git) and package versions."""

from __future__ import annotations

import platform
import re
import subprocess
from pathlib import Path

import pytest

from uda_ray.results import provenance
from uda_ray.results.schema import VERSION_PACKAGES

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false"]


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    """A throwaway git repository with one commit (never the project's own checkout)."""
    subprocess.run([*GIT, "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "a.txt").write_text("one\n")
    subprocess.run([*GIT, "add", "a.txt"], cwd=tmp_path, check=True)
    subprocess.run([*GIT, "commit", "-q", "-m", "c1"], cwd=tmp_path, check=True)
    return tmp_path


def _head(path: Path) -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_clean_checkout_gives_head(repo: Path) -> None:
    assert provenance.git_revision(repo) == _head(repo)
    (repo / "untracked.txt").write_text("x")  # untracked files do not make the tree dirty
    assert provenance.git_revision(repo / "a.txt") == _head(repo)


def test_modified_tracked_file_gives_dirty(repo: Path) -> None:
    (repo / "a.txt").write_text("two\n")
    assert provenance.git_revision(repo) == _head(repo) + "+dirty"


def test_not_a_checkout_gives_unknown_with_reason(tmp_path: Path) -> None:
    rev = provenance.git_revision(tmp_path)
    assert rev.startswith("unknown (git rev-parse in ") and str(tmp_path) in rev
    assert provenance.git_revision(tmp_path / "missing" / "deeper").startswith("unknown (folder ")


def test_no_git_executable_gives_unknown(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")
    assert provenance.git_revision(repo) == "unknown (git executable not found)"


def test_package_revision_is_a_hash_or_unknown() -> None:
    rev = provenance.git_revision()
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", rev) or rev.startswith("unknown (")


def test_package_versions() -> None:
    v = provenance.package_versions()
    assert list(v) == list(VERSION_PACKAGES)
    assert v["python"] == platform.python_version()
    import pyarrow

    assert v["pyarrow"] == pyarrow.__version__ and v["uda_ray"] != "not installed"
