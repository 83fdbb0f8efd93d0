"""Search-space YAML: validation errors, define-by-run sampling, trial overrides, samplers (no Ray runtime)."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import yaml

from tests.conftest import ROOT, edited
from uda_ray.config import apply_overrides, load_config
from uda_ray.stages.chain import load_run
from uda_ray.tune.driver import BASE_FILE, TUNE_STATE, Experiment, ExperimentError, launch_base, launch_spec
from uda_ray.tune.search import SPACE_COPY, run_search
from uda_ray.tune.space import (
    SpaceError,
    build_sampler,
    define_by_run,
    load_space,
    param_distributions,
    trial_config,
    trial_overrides,
)
from uda_ray.tune.spec_yaml import base_config

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
optuna.logging.set_verbosity(optuna.logging.WARNING)

SPACE: dict[str, Any] = {
    "experiment": "unit",
    "base": {"config": "run.yaml", "overrides": {"run.eval_every": 10}},
    "metric": "val/miou",
    "mode": "max",
    "sampler": {"type": "random", "seed": 3},
    "num_samples": 4,
    "max_concurrent": 2,
    "max_failures": 1,
    "scheduler": {"type": "asha", "grace_period": 20, "max_t": 100, "reduction_factor": 2},
    "resources": {"workers": 0, "gpus_per_worker": 0, "cpus_per_worker": 1},
    "switches": {
        "method": {"choice": ["base", "cluda", "target_mix"],
                   "apply": {"target_mix": {"mix.target_to_source.enabled": True,
                                            "loss.cross_view.pixel_weight": 0.01}}},
    },
    "params": {
        "teacher.alpha": 0.995,
        "mix.class_ratio": {"uniform": [0.3, 0.7], "step": 0.1},
        "loss.cluda.weight": {"loguniform": [1.0e-4, 1.0], "when": {"method": "cluda"}},
        "loss.cluda.fm_size": {"int": [8, 64], "log": True, "when": {"method": "cluda"}},
        "loss.cluda.chunk_size": {"fixed": 256, "when": {"method": "cluda"}},
        "teacher.weighting": {"choice": ["scalar", "pixel"]},
        "teacher.ignore_top": {"int": [0, 12], "step": 4, "when": {"method": ["cluda", "target_mix"]}},
        "teacher.ignore_bottom": {"int": [0, 3], "when": {"teacher.ignore_top": [4, 8]}},
        "mix.target_to_source.t_max": {"uniform": [0.9, 0.97], "when": {"method": "target_mix",
                                                                         "teacher.weighting": "pixel"}},
    },
}


def write(tmp_path: Path, space: dict[str, Any], name: str = "space.yaml") -> Path:
    (tmp_path / "run.yaml").write_text("run:\n  iterations: 100\ndata:\n  crop: [32, 32]\n")
    path = tmp_path / name
    path.write_text("# uda-ray tune " + name + "\n" + yaml.safe_dump(space, sort_keys=False))
    return path


@pytest.fixture
def spec(tmp_path: Path):
    return load_space(write(tmp_path, SPACE))


def test_load_space_fields(spec) -> None:
    assert spec.experiment == "unit" and spec.sampler == "random" and spec.seed == 3
    assert spec.base_overrides == {"run.eval_every": 10}
    assert base_config(spec).run.eval_every == 10 and base_config(spec).run.iterations == 100
    assert (spec.scheduler.type, spec.scheduler.grace_period, spec.scheduler.max_t) == ("asha", 20, 100)
    assert (spec.max_concurrent, spec.max_failures, spec.resources.cpus_per_worker) == (2, 1, 1.0)
    assert [p.name for p in spec.params] == list(SPACE["params"])  # YAML order kept
    assert spec.conditional and not spec.multi_objective
    dists = param_distributions(spec)
    constants = ("teacher.alpha", "loss.cluda.chunk_size")
    assert set(dists) == {"method"} | {k for k in SPACE["params"] if k not in constants}
    assert dists["loss.cluda.fm_size"] == optuna.distributions.IntDistribution(8, 64, log=True)
    assert dists["mix.class_ratio"] == optuna.distributions.FloatDistribution(0.3, 0.7, step=0.1)


def _check_trial(spec, trial: optuna.trial.BaseTrial, constants: dict[str, Any]) -> None:
    p = trial.params
    method = p["method"]
    cluda = method == "cluda"
    assert ("loss.cluda.weight" in p) == cluda and ("loss.cluda.fm_size" in p) == cluda
    assert ("teacher.ignore_top" in p) == (method in ("cluda", "target_mix"))
    assert ("teacher.ignore_bottom" in p) == (p.get("teacher.ignore_top") in (4, 8))
    assert ("mix.target_to_source.t_max" in p) == (method == "target_mix" and p["teacher.weighting"] == "pixel")
    expected = {"teacher.alpha": 0.995}
    if cluda:
        expected["loss.cluda.chunk_size"] = 256
    if method == "target_mix":
        expected.update({"mix.target_to_source.enabled": True, "loss.cross_view.pixel_weight": 0.01})
    assert constants == expected
    assert trial.user_attrs["constants"] == expected
    dists = param_distributions(spec)
    for name, value in p.items():
        assert trial.distributions[name] == dists[name]
        d = dists[name]
        if isinstance(d, optuna.distributions.CategoricalDistribution):
            assert value in d.choices
        else:
            assert d.low <= value <= d.high
            if d.step is not None:
                k = (value - d.low) / d.step
                assert math.isclose(k, round(k), abs_tol=1e-9)
    overrides = trial_overrides(spec, {**p, **constants})
    assert overrides == {"run.eval_every": 10, **{k: v for k, v in p.items() if k != "method"}, **expected}
    cfg = apply_overrides(load_config(spec.base_config), overrides)
    assert cfg == trial_config(spec, {**p, **constants})
    assert cfg.loss.cluda.weight == (p["loss.cluda.weight"] if cluda else 0.0)
    assert cfg.mix.target_to_source.enabled == (method == "target_mix")


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_define_by_run_conditions_constants_ranges(tmp_path: Path, sampler: str) -> None:
    space = copy.deepcopy(SPACE)
    space["sampler"] = {"type": sampler, "seed": 0} | ({"n_startup_trials": 5} if sampler == "tpe" else {})
    spec = load_space(write(tmp_path, space))
    study = optuna.create_study(sampler=build_sampler(spec), direction="maximize")
    fn = define_by_run(spec)
    seen_methods, seen_bottom = set(), 0
    for _ in range(40):
        trial = study.ask()
        constants = fn(trial)
        _check_trial(spec, trial, constants)
        seen_methods.add(trial.params["method"])
        seen_bottom += "teacher.ignore_bottom" in trial.params
        study.tell(trial, trial.params["mix.class_ratio"])
    assert seen_methods == {"base", "cluda", "target_mix"} and seen_bottom > 0


def test_ray_optuna_search_round_trip(spec) -> None:
    """Ray's OptunaSearch (define-by-run) merges suggested values and our constants; trial_overrides reads it back."""
    from ray.tune.search.optuna import OptunaSearch

    searcher = OptunaSearch(space=define_by_run(spec), metric=spec.metric, mode=spec.mode,
                            sampler=build_sampler(spec))
    for i in range(6):
        tune_config = searcher.suggest(f"trial_{i}")
        ot_trial = searcher._ot_trials[f"trial_{i}"]
        assert tune_config == {**ot_trial.params, **ot_trial.user_attrs["constants"]}
        _check_trial(spec, ot_trial, ot_trial.user_attrs["constants"])


def test_trial_overrides_errors_and_numpy(spec) -> None:
    ok = trial_overrides(spec, {"method": "cluda", "loss.cluda.fm_size": np.int64(16), "loss.cluda.weight":
                                np.float64(0.5)})
    assert type(ok["loss.cluda.fm_size"]) is int and ok["loss.cluda.fm_size"] == 16
    apply_overrides(base_config(spec), ok)
    with pytest.raises(SpaceError, match="neither a switch nor a config key"):
        trial_overrides(spec, {"method": "cluda", "lr": 0.1})
    with pytest.raises(SpaceError, match="contradicts"):
        trial_overrides(spec, {"method": "target_mix", "mix.target_to_source.enabled": False})
    with pytest.raises(SpaceError, match="not one of"):
        trial_overrides(spec, {"method": "sdca"})


def test_trials_start_from_the_base_as_read_when_the_space_was_loaded(tmp_path: Path) -> None:
    """A base file edited while a search runs does not change its later trials (nor do trials on other nodes need
    the file): every trial's config is the loaded base with its overrides."""
    spec = load_space(write(tmp_path, SPACE))
    (tmp_path / "run.yaml").write_text("run:\n  iterations: 300\ndata:\n  crop: [64, 64]\n")
    cfg = trial_config(spec, {"method": "base", "mix.class_ratio": 0.5, "teacher.weighting": "scalar"})
    assert cfg.run.iterations == 100 and cfg.data.crop == (32, 32) and cfg.run.eval_every == 10
    assert cfg.mix.class_ratio == 0.5
    (tmp_path / "run.yaml").unlink()
    later = trial_config(spec, {"method": "base", "mix.class_ratio": 0.3, "teacher.weighting": "pixel"})
    assert later.mix.class_ratio == 0.3 and later.run.iterations == 100


def test_a_resume_whose_base_changed_since_the_launch_is_refused_naming_the_key(tmp_path: Path) -> None:
    space = write(tmp_path, SPACE)
    spec = load_space(space)
    exp = Experiment(str(tmp_path / "results"), "unit-x")
    Path(exp.uri).mkdir(parents=True)
    (Path(exp.uri) / TUNE_STATE).write_bytes(b"")  # what makes it a resumable experiment
    launch_spec(exp, space, SPACE_COPY, False, "search space")  # what a launch records
    launch_base(exp, spec.base, spec.base_config, resume=False)
    launch_base(exp, load_space(space).base, spec.base_config, resume=True)  # the same base: resumes
    launch_spec(exp, space, SPACE_COPY, True, "search space")
    (tmp_path / "run.yaml").write_text("run:\n  iterations: 300\ndata:\n  crop: [32, 32]\n")
    # refused before Ray starts (none is running here)
    with pytest.raises(ExperimentError, match=r"run.yaml now gives another base run than .*unit-x was launched with "
                                              r"\(.*base_run.json\): run.iterations: 100 at launch, 300 now"):
        run_search(space, storage=str(tmp_path / "results"), name="unit-x", resume=True)
    (Path(exp.uri) / BASE_FILE).unlink()  # launched by a version that did not record it: not checked
    launch_base(exp, load_space(space).base, spec.base_config, resume=True)
    space.write_text(space.read_text().replace("num_samples: 4", "num_samples: 5"))
    with pytest.raises(ExperimentError, match=r"space.yaml differs from the search space .*unit-x was launched with "
                                              r"\(.*search_space.yaml\)"):
        run_search(space, storage=str(tmp_path / "results"), name="unit-x", resume=True)


def test_a_chain_base_is_recorded_by_stage(tmp_path: Path) -> None:
    chain = load_run(ROOT / "search_spaces" / "chains" / "toy_synthetic.yaml")
    exp = Experiment(str(tmp_path), "chain")
    launch_base(exp, chain, Path("toy_synthetic.yaml"), resume=False)
    launch_base(exp, dataclasses.replace(chain, source="/elsewhere/toy_synthetic.yaml"), Path("toy_synthetic.yaml"),
                resume=True)  # the same chain from a moved checkout
    changed = chain.with_overrides({"stages.adapt.loss.cluda.weight": 0.5})
    with pytest.raises(ExperimentError, match=r"stages.adapt.config.loss.cluda.weight: .* at launch, 0.5 now"):
        launch_base(exp, changed, Path("toy_synthetic.yaml"), resume=True)


def _first_params(spec, n: int) -> list[dict[str, Any]]:
    study = optuna.create_study(sampler=build_sampler(spec), directions=["maximize"] * (
        len(spec.metric) if spec.multi_objective else 1))
    fn = define_by_run(spec)
    out = []
    for _ in range(n):
        trial = study.ask()
        fn(trial)
        out.append(dict(trial.params))
        x = trial.params["mix.class_ratio"]
        study.tell(trial, [x, -x] if spec.multi_objective else x)
    return out


@pytest.mark.parametrize("sampler", ["tpe", "cmaes", "gp", "random", "nsga2"])
def test_each_sampler_builds_and_is_seeded(tmp_path: Path, sampler: str) -> None:
    if sampler == "cmaes":
        pytest.importorskip("cmaes")
    space = {**SPACE, "switches": {}, "sampler": {"type": sampler, "seed": 7}, "params": {
        "mix.class_ratio": {"uniform": [0.3, 0.7]}, "teacher.pseudo_threshold": {"uniform": [0.8, 0.99]},
        "loss.cluda.fm_size": {"int": [32, 65]}}}
    if sampler in ("tpe", "gp", "cmaes"):
        space["sampler"]["n_startup_trials"] = 2  # the model-based proposals start within the 4 trials
    if sampler == "nsga2":
        space.update(metric=["val/miou", "time/iter_s"], mode=["max", "min"], scheduler={"type": "none"})
        space["sampler"]["population_size"] = 2
    spec = load_space(write(tmp_path, space))
    expected = {"tpe": optuna.samplers.TPESampler, "cmaes": optuna.samplers.CmaEsSampler,
                "gp": optuna.samplers.GPSampler, "random": optuna.samplers.RandomSampler,
                "nsga2": optuna.samplers.NSGAIISampler}[sampler]
    assert isinstance(build_sampler(spec), expected)
    first, second = _first_params(spec, 4), _first_params(spec, 4)
    assert first == second
    other = load_space(write(tmp_path, {**space, "sampler": {**space["sampler"], "seed": 8}}, "other.yaml"))
    assert _first_params(other, 1) != first[:1]


def test_tpe_options(tmp_path: Path, spec) -> None:
    sampler = build_sampler(load_space(write(tmp_path, {**SPACE, "sampler": {"type": "tpe", "seed": 1}})))
    assert sampler._multivariate and sampler._group and sampler._constant_liar


# ------------------------------------------------------------------------------------------ bad YAML → errors
def _with(**changes: Any) -> dict[str, Any]:
    return edited(SPACE, **changes)


def _params(**extra: Any) -> dict[str, Any]:
    return {"params": {**SPACE["params"], **{k.replace("__", "."): v for k, v in extra.items()}}}


BAD = [
    ({**SPACE, "samplr": {"type": "tpe"}}, "unknown key 'samplr' (closest: 'sampler')"),
    (_with(num_samples=None), "missing required key 'num_samples'"),
    ({**SPACE, **_params(loss__cluda__wieght={"uniform": [0.1, 1.0]})}, "closest valid key: 'loss.cluda.weight'"),
    ({**SPACE, **_params(loss__cluda__weight={"uniform": [0.5, 0.1]})}, "low must be below high"),
    ({**SPACE, **_params(loss__cluda__weight={"uniform": [0.5, 0.5]})}, "low must be below high"),
    ({**SPACE, **_params(loss__cluda__weight={"loguniform": [0.0, 1.0]})}, "a log range needs low > 0"),
    ({**SPACE, **_params(loss__cfcontra__bank_size={"int": [0, 64], "log": True})}, "a log range needs low > 0"),
    ({**SPACE, **_params(loss__cluda__fm_size={"int": [1.5, 8]})}, "expected integer bounds"),
    ({**SPACE, **_params(loss__cluda__fm_size={"uniform": [8.0, 64.0]})}, "use int: [low, high]"),
    ({**SPACE, **_params(loss__cluda__temperature={"uniform": [0.0, 1.0]})},
     "params.loss.cluda.temperature (low 0.0)"),
    ({**SPACE, **_params(loss__cluda__temperature={"uniform": [0.0, 1.0]})}, "expected > 0.0"),
    ({**SPACE, **_params(teacher__pseudo_threshold={"uniform": [0.8, 1.2]})}, "(high 1.2)"),
    ({**SPACE, **_params(teacher__weighting={"choice": ["scalar", "pixels"]})}, "(choice 'pixels')"),
    ({**SPACE, **_params(teacher__weighting={"choice": ["scalar", "scalar"]})}, "lists 'scalar' twice"),
    ({**SPACE, **_params(teacher__weighting={"choice": ["scalar"]})}, "at least 2 values"),
    ({**SPACE, **_params(teacher__alpha=1.0)}, "params.teacher.alpha (value 1.0)"),
    ({**SPACE, **_params(mix__blur_sigma_min=2.0)}, "exceeds 'mix.blur_sigma_max'"),
    ({**SPACE, **_params(loss__sdca__tau={"uniform": [10.0, 20.0], "log": True})}, "use loguniform for floats"),
    ({**SPACE, **_params(loss__sdca__tau={"uniform": [10.0, 20.0], "stepp": 1.0})}, "unknown key 'stepp'"),
    ({**SPACE, **_params(loss__sdca__tau={"uniform": [10.0, 20.0], "step": 3.0})}, "into whole steps"),
    ({**SPACE, **_params(loss__sdca__tau={"uniform": [10.0, 20.0], "choice": [1.0, 2.0]})}, "exactly one of"),
    ({**SPACE, **_params(loss__sdca__tau={"loguniform": [10.0, 20.0], "when": {"methd": "cluda"}})},
     "unknown 'methd' (closest: 'method')"),
    ({**SPACE, **_params(loss__sdca__tau={"loguniform": [10.0, 20.0], "when": {"loss.sdca.delta": 0.9}},
                         loss__sdca__delta={"choice": [0.8, 0.9]})}, "not sampled before it"),
    ({**SPACE, **_params(loss__sdca__tau={"loguniform": [10.0, 20.0], "when": {"loss.sdca.tau": 15.0}})},
     "not sampled before it"),
    ({**SPACE, **_params(loss__sdca__tau={"loguniform": [10.0, 20.0], "when": {"method": "mocha"}})},
     "'method' can never take the value 'mocha'"),
    ({**SPACE, **_params(loss__sdca__tau={"loguniform": [10.0, 20.0], "when": {"teacher.alpha": 0.9}})},
     "'teacher.alpha' can never take the value 0.9"),
    ({**SPACE, **_params(loss__sdca__tau={"loguniform": [10.0, 20.0], "when": {"teacher.ignore_top": 5}})},
     "'teacher.ignore_top' can never take the value 5"),
    ({**SPACE, **_params(loss__sdca__tau={"loguniform": [10.0, 20.0], "when": {"mix.class_ratio": 0.5}})},
     "a continuous param"),
    ({**SPACE, **_params(loss__sdca__tau={"loguniform": [10.0, 20.0], "when": {}})}, "non-empty mapping"),
    ({**SPACE, **_params(mix__target_to_source__enabled={"fixed": False, "when": {"method": "target_mix"}})},
     "also implied by switch 'method'"),
    ({**SPACE, **_params(mix__target_to_source__enabled=False)}, "also implied by switch 'method'"),
    (_with(switches__method__apply__sdca={"loss.sdca.tau": 10.0}), "apply names 'sdca', which is not one of"),
    (_with(switches__method__apply__cluda={"loss.cluda.temperature": -1.0}),
     "switches.method.apply.cluda: "),
    (_with(switches__method__apply__cluda={"loss.cluda.temprature": 1.0}), "closest valid key"),
    (_with(switches={"loss.method": {"choice": ["a", "b"]}}), "expected a simple identifier"),
    (_with(switches__other={"choice": ["a", "b"], "apply": {"a": {"mix.target_to_source.enabled": True}}}),
     "implied by both switches 'method' and 'other'"),
    ({**SPACE, "params": {"teacher.alpha": 0.99}, "switches": {}}, "nothing to search"),
    (_with(metric="miou"), "does not look like a uda-ray metric"),
    (_with(metric="loss/total"), "does not look like a uda-ray metric"),
    (_with(mode="maximize"), "expected max or min"),
    (_with(metric=["val/miou", "time/iter_s"]), "must both be single values or lists of the same length"),
    (_with(metric=["val/miou", "time/iter_s"], mode=["max"]), "same length"),
    (_with(metric=["val/miou", "val/miou"], mode=["max", "max"]), "names a metric twice"),
    (_with(metric=["val/miou", "time/iter_s"], mode=["max", "min"]), "asha needs a single metric"),
    (_with(metric=["val/miou", "time/iter_s"], mode=["max", "min"], scheduler={"type": "none"},
           sampler={"type": "cmaes", "seed": 0}), "cmaes cannot optimise several objectives"),
    (_with(scheduler__max_t=500), "exceeds the base run's run.iterations = 100"),
    (_with(scheduler__grace_period=200), "exceeds scheduler.max_t"),
    (_with(scheduler__reduction_factor=1), "expected > 1"),
    (_with(scheduler={"type": "hyperband"}), "scheduler ="),
    (_with(scheduler={"type": "none", "max_t": 10}), "unknown key 'max_t'"),
    (_with(sampler={"type": "bayes", "seed": 0}), "sampler = "),
    (_with(sampler={"type": "random", "seed": 0, "n_startup_trials": 3}), "unknown key 'n_startup_trials'"),
    (_with(sampler={"type": "tpe", "seed": -1}), "sampler.seed = -1"),
    (_with(num_samples=0), "num_samples = 0"),
    (_with(max_concurrent=1.5), "max_concurrent = 1.5: expected an integer"),
    (_with(resources__cpus_per_worker=0), "resources.cpus_per_worker = 0: expected > 0"),
    (_with(resources__gpu=1), "unknown key 'gpu'"),
    (_with(experiment="my exp/1"), "folder-safe name"),
    (_with(base__config="missing.yaml"), "config file not found"),
    (_with(base__overrides={"run.iterations": 0}), "base: "),
    (_with(base__overrides={"run.iterations": 50}), "exceeds the base run's run.iterations = 50"),
]


@pytest.mark.parametrize(("space", "message"), BAD, ids=[m[:40] for _, m in BAD])
def test_bad_space_names_file_and_key(tmp_path: Path, space: dict[str, Any], message: str) -> None:
    path = write(tmp_path, space)
    with pytest.raises(SpaceError) as err:
        load_space(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)


RAW = [
    ("params:\n  teacher.alpha: 0.99\n  teacher.alpha: 0.995\n", "duplicate key 'teacher.alpha'"),
    ("params:\n  loss.cluda.weight: {loguniform: [1e-4, 1.0]}\n", "write 1.0e-4"),
    ("params: [loss.cluda.weight]\n", "switches and params must be mappings"),
]


@pytest.mark.parametrize(("params_text", "message"), RAW)
def test_bad_raw_yaml(tmp_path: Path, params_text: str, message: str) -> None:
    head = {k: v for k, v in SPACE.items() if k not in ("params", "switches")}
    path = write(tmp_path, head)
    path.write_text(path.read_text() + params_text)
    with pytest.raises(SpaceError) as err:
        load_space(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_cmaes_without_package_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cmaes" else real(name, *a))
    with pytest.raises(SpaceError, match="pip install cmaes"):
        load_space(write(tmp_path, _with(sampler={"type": "cmaes", "seed": 0})))


def test_objectives_pairs_metrics_with_modes():
    from uda_ray.tune.spec_yaml import objectives

    assert objectives("val/miou", "max") == [("val/miou", "max")]
    assert objectives(["val/miou", "time/iter_s"], ["max", "min"]) == [("val/miou", "max"), ("time/iter_s", "min")]
