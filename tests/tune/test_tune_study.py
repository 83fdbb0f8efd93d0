"""Where a search keeps its Optuna study: a journal file for a new search, the SQLite file of an older one (which a
resumed search keeps), and ``load_study`` reading either from the experiment folder, the file or the printed
location."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from uda_ray.tune.driver import Experiment
from uda_ray.tune.search import (
    SQLITE_STUDY_FILE,
    STUDY_FILE,
    fail_lost_trials,
    load_study,
    open_study_storage,
    study_storage,
)


def _fill(location: str, name: str) -> list[float]:
    """A study of three trials at ``location``: two told, one still running (trial ids t0, t1, t2)."""
    study = optuna.create_study(study_name=name, storage=open_study_storage(location), direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    values = []
    for i in range(3):
        trial = study.ask()
        x = trial.suggest_float("x", 0.0, 1.0)
        trial.set_user_attr("trial_id", f"t{i}")
        trial.report(x / 2, 1)
        if i < 2:
            study.tell(trial, x)
            values.append(x)
    return values


def test_a_new_search_keeps_its_study_in_a_journal(tmp_path: Path):
    exp = Experiment(str(tmp_path / "results"), "s1")
    location = study_storage(exp)
    assert location == str((tmp_path / "results" / "s1" / STUDY_FILE).resolve())
    values = _fill(location, "s1")
    for where in (tmp_path / "results" / "s1", location, Path(location)):
        study = load_study(where)
        assert study.study_name == "s1"
        assert [t.value for t in study.trials[:2]] == values
        assert study.trials[2].state == optuna.trial.TrialState.RUNNING
        assert [t.intermediate_values for t in study.trials] == [{1: v / 2} for v in
                                                                  [*values, study.trials[2].params["x"]]]


def test_a_search_with_its_study_in_sqlite_keeps_it(tmp_path: Path):
    folder = tmp_path / "results" / "old"
    folder.mkdir(parents=True)
    url = f"sqlite:///{(folder / SQLITE_STUDY_FILE).resolve()}"
    values = _fill(url, "old")
    exp = Experiment(str(tmp_path / "results"), "old")
    assert study_storage(exp) == url  # a resumed search goes on in the SQLite file
    assert not (folder / STUDY_FILE).exists()
    for where in (folder, url, folder / SQLITE_STUDY_FILE):
        assert [t.value for t in load_study(where).trials[:2]] == values


def test_lost_trials_are_failed_with_the_reason(tmp_path: Path):
    location = study_storage(Experiment(str(tmp_path), "lost"))
    _fill(location, "lost")
    fail_lost_trials(location, "lost", ["t2", "t9"])
    trials = load_study(location).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "FAIL"]
    assert "lost" in trials[2].user_attrs["fail_reason"]


def test_load_study_names_what_is_missing(tmp_path: Path):
    missing = rf"{tmp_path}: no Optuna study \({STUDY_FILE} or {SQLITE_STUDY_FILE}\)"
    with pytest.raises(FileNotFoundError, match=missing):
        load_study(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope: no such experiment folder or study file"):
        load_study(tmp_path / "nope")


def test_load_study_wants_the_one_study_of_a_search(tmp_path: Path, caplog):
    location = str(tmp_path / STUDY_FILE)
    _fill(location, "s1")
    assert load_study(location).study_name == "s1" and "omitted" not in caplog.text
    _fill(location, "s2")
    with pytest.raises(ValueError, match=r"optuna.log: 2 Optuna studies \(s1, s2\)"):
        load_study(tmp_path)
