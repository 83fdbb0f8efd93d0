"""UdaOptunaSearch without Ray: what it tells the study for finished, pruned and resumed trials, and that the state
Tune saves with every experiment snapshot keeps only the trials still running."""

from __future__ import annotations

from pathlib import Path

import optuna

from uda_ray.tune.search import load_study, open_study_storage
from uda_ray.tune.searcher import UdaOptunaSearch


def _space(trial: optuna.Trial) -> dict:
    trial.suggest_float("x", 0.0, 1.0)
    return {}


def _searcher(location: str) -> UdaOptunaSearch:
    return UdaOptunaSearch(space=_space, metric="val/miou", mode="max", sampler=optuna.samplers.RandomSampler(seed=0),
                           study_name="s", storage=open_study_storage(location), total_iterations=6, experiment="e")


def test_finished_trials_are_told_and_left_out_of_the_saved_state(tmp_path: Path):
    location = str(tmp_path / "optuna.log")
    searcher = _searcher(location)
    params = {t: searcher.suggest(t) for t in ("t0", "t1", "t2")}
    searcher.on_trial_result("t0", {"iteration": 3, "val/miou": 0.2, "train/loss": 1.0})
    searcher.on_trial_result("t0", {"iteration": 4, "train/loss": 0.9})  # no evaluation: nothing to tell
    searcher.on_trial_complete("t0", {"iteration": 6, "val/miou": 0.3})
    searcher.on_trial_complete("t1", {"iteration": 3, "val/miou": 0.1})  # stopped early
    searcher.on_trial_complete("t0", {"iteration": 6, "val/miou": 0.9})  # told once only
    searcher.on_trial_result("t0", {"iteration": 6, "val/miou": 0.9})
    searcher.save(str(tmp_path / "searcher.pkl"))
    # a resumed search: a new searcher restored from the saved state finishes the running trial
    restored = _searcher(location)
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert set(restored._ot_trials) == {"t2"} and set(restored._reported) <= {"t2"}
    restored.on_trial_result("t2", {"iteration": 3, "val/miou": 0.4})
    restored.on_trial_complete("t2", {"iteration": 6, "val/miou": 0.5})
    assert not restored._ot_trials
    trials = load_study(location).trials
    assert [t.user_attrs["trial_id"] for t in trials] == ["t0", "t1", "t2"]
    assert [t.params["x"] for t in trials] == [params[t]["x"] for t in ("t0", "t1", "t2")]
    assert [t.state.name for t in trials] == ["COMPLETE", "PRUNED", "COMPLETE"]
    assert [t.value for t in trials] == [0.3, 0.1, 0.5]
    assert [t.intermediate_values for t in trials] == [{3: 0.2, 6: 0.3}, {3: 0.1}, {3: 0.4, 6: 0.5}]
