"""Module-scoped generated experiment folders (builders in analysis_fixtures.py)."""

from __future__ import annotations

import pytest
from analysis_fixtures import write_ablation, write_search


@pytest.fixture(scope="module")
def search_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_search(tmp_path_factory.mktemp("search"))


@pytest.fixture(scope="module")
def ablation_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_ablation(tmp_path_factory.mktemp("ablation"))
