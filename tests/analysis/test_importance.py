"""Parameter importance from parquet rows: the influential param ranks first; distributions from YAML or inferred."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import yaml
from analysis_fixtures import N_SEARCH, SEARCH_SPACE
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from uda_ray.analysis import importance
from uda_ray.results import store

pytest.importorskip("sklearn")  # Optuna's fANOVA fits a scikit-learn random forest


@pytest.fixture(scope="module")
def trials(search_dir: str) -> pd.DataFrame:
    return store.load_trials(search_dir)


def test_space_from_yaml(search_dir: str) -> None:
    space = importance.load_search_space(search_dir)
    assert space == {
        "loss.cluda.weight": FloatDistribution(0.01, 10.0, log=True),
        "teacher.pseudo_threshold": FloatDistribution(0.8, 0.99),
        "mix.class_ratio": FloatDistribution(0.2, 0.8),
        "optim.name": CategoricalDistribution(["adamw", "sgd"]),
        "optim.momentum": FloatDistribution(0.5, 0.99),
    }  # the fixed run.iterations is not a searched parameter
    assert importance.distributions_from_space({"params": {"a": {"int": [1, 64], "log": True},
                                                           "b": {"choice": [[64, 64], [96, 96]]}}}) == {
        "a": IntDistribution(1, 64, log=True), "b": CategoricalDistribution(["[64, 64]", "[96, 96]"])}
    with pytest.raises(ValueError, match="params.a"):
        importance.distributions_from_space({"params": {"a": {"uniform": [0, 1], "loguniform": [1, 2]}}})


def test_study_holds_the_finished_trials_with_their_values(trials: pd.DataFrame, search_dir: str) -> None:
    study = importance.study_from_trials(trials, "val/miou", "max", importance.load_search_space(search_dir))
    done = trials[trials["status"] == "TERMINATED"].set_index("trial_id")
    assert len(study.trials) == len(done) == N_SEARCH - 3
    for t in study.trials:
        row = done.loc[t.user_attrs["trial_id"]]
        assert t.value == row["last/val/miou"]
        assert t.params == {k: v for k, v in json.loads(row["overrides"]).items() if k in t.distributions}
        assert ("optim.momentum" in t.params) == (t.params["optim.name"] == "sgd")  # conditional: define-by-run
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE


def test_influential_param_ranks_first(trials: pd.DataFrame, search_dir: str) -> None:
    table = importance.param_importances(trials, "val/miou", "max", space=importance.load_search_space(search_dir))
    t = table.set_index("param")
    assert table["param"].iloc[0] == "loss.cluda.weight"
    for ev in ("fanova", "ped_anova"):
        assert t[ev].idxmax() == "loss.cluda.weight" and t.loc["loss.cluda.weight", ev] > 0.5
        assert t[ev].sum() == pytest.approx(1.0)
    # conditional param: PED-ANOVA scores it over the trials that hold it, fANOVA does not score it
    assert np.isnan(t.loc["optim.momentum", "fanova"]) and t.loc["optim.momentum", "ped_anova"] >= 0
    assert t.loc["optim.momentum", "n_trials"] < t.loc["loss.cluda.weight", "n_trials"] == N_SEARCH - 3


def test_inferred_space_without_yaml(trials: pd.DataFrame) -> None:
    dists = importance.infer_distributions(trials[trials["status"] == "TERMINATED"])
    assert set(dists) == {"loss.cluda.weight", "teacher.pseudo_threshold", "mix.class_ratio", "optim.name",
                          "optim.momentum"}
    w = dists["loss.cluda.weight"]
    assert isinstance(w, FloatDistribution) and w.log  # spans more than two decades
    assert isinstance(dists["mix.class_ratio"], FloatDistribution) and not dists["mix.class_ratio"].log
    assert dists["optim.name"] == CategoricalDistribution(["adamw", "sgd"])
    table = importance.param_importances(trials, "val/miou", "max", evaluators=("ped_anova",))
    assert table["param"].iloc[0] == "loss.cluda.weight"
    # without the YAML every finished trial holds every inferred param (the config has all keys)
    assert (table["n_trials"] == N_SEARCH - 3).all()


def test_changed_space_is_an_error(trials: pd.DataFrame, search_dir: str, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(search_dir, copy)
    space = json.loads(json.dumps(SEARCH_SPACE))
    space["params"]["mix.class_ratio"] = {"uniform": [0.3, 0.4]}
    (copy / "search_space.yaml").write_text(yaml.safe_dump(space))
    with pytest.raises(ValueError, match="param 'mix.class_ratio'.*outside"):
        importance.param_importances(trials, "val/miou", "max", space=importance.load_search_space(str(copy)))
    with pytest.raises(KeyError, match="evaluators"):
        importance.param_importances(trials, "val/miou", "max", evaluators=("shap",))


def test_identical_scores_give_nan_instead_of_an_error():
    import pandas as pd

    from uda_ray.analysis import param_importances

    trials = pd.DataFrame({"trial_id": ["a", "b", "c"], "status": ["TERMINATED"] * 3, "kind": ["search"] * 3,
                           "last/val/miou": [0.5, 0.5, 0.5], "config/optim.lr": [1e-3, 2e-3, 3e-3],
                           "overrides": ['{"optim.lr": 0.001}', '{"optim.lr": 0.002}', '{"optim.lr": 0.003}']})
    table = param_importances(trials, "val/miou", "max")
    assert table["param"].tolist() == ["optim.lr"] and table["fanova"].isna().all()
