"""Every shipped YAML under search_spaces/ loads and validates without training, dispatched by its header command."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from uda_ray.stages import load_run
from uda_ray.tune.ablation import cell_config, expand, grid, load_ablation
from uda_ray.tune.space import build_sampler, define_by_run, load_space, trial_config
from uda_ray.tune.spec_yaml import base_config

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
optuna.logging.set_verbosity(optuna.logging.WARNING)

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "search_spaces").glob("**/*.yaml"))
PAPER_SPACES = ("cluda", "cfcontra", "sdca", "target_mix", "all_methods")
HRDA_SPACES = {"cluda_hrda": "cluda_hrda_gta2cs.yaml", "mic": "mic_hrda_gta2cs.yaml"}  # space → its base config
HRDA_BASES = ("hrda_gta2cs", "hrda_synthia2cs", "cluda_hrda_gta2cs", "mic_hrda_gta2cs", "mic_hrda_synthia2cs")


def _command(path: Path) -> str:
    """The subcommand named by the header line ``# uda-ray <command> search_spaces/<this file>``."""
    first = path.read_text().splitlines()[0]
    rel = path.relative_to(ROOT).as_posix()
    parts = first.split()
    assert parts[:2] == ["#", "uda-ray"] and parts[3:] == [rel], f"{rel}: header {first!r} is not '# uda-ray CMD {rel}'"
    return parts[2]


def test_the_shipped_files_are_there() -> None:
    names = {p.relative_to(ROOT / "search_spaces").as_posix() for p in SHIPPED}
    expected = {"base/daformer_gta2cs.yaml", "base/daformer_synthia2cs.yaml", "ablations/components.yaml",
                "ablations/chain_stages.yaml",
                *(f"{n}.yaml" for n in PAPER_SPACES), *(f"{n}.yaml" for n in HRDA_SPACES),
                *(f"base/{n}.yaml" for n in HRDA_BASES)}
    assert expected <= names


@pytest.mark.parametrize("path", SHIPPED, ids=[p.relative_to(ROOT).as_posix() for p in SHIPPED])
def test_shipped_yaml_validates(path: Path) -> None:
    command = _command(path)
    if command == "train":
        load_run(path)  # a run config or a chain of stages
    elif command == "tune":
        spec = load_space(path)
        study = optuna.create_study(sampler=build_sampler(spec), directions=["maximize"] * (
            len(spec.metric) if spec.multi_objective else 1))
        fn = define_by_run(spec)
        for _ in range(3):  # a few trials resolve to valid run configs, without training
            trial = study.ask()
            trial_config(spec, {**trial.params, **fn(trial)})
    elif command == "ablate":
        spec = load_ablation(path)
        for entry in grid(spec):
            cell_config(spec, entry)
    else:
        pytest.fail(f"{path}: unknown command {command!r} in the header")


@pytest.mark.parametrize("name", PAPER_SPACES)
def test_paper_scale_spaces(name: str) -> None:
    spec = load_space(ROOT / "search_spaces" / f"{name}.yaml")
    assert spec.base_config == (ROOT / "search_spaces" / "base" / "daformer_gta2cs.yaml").resolve()
    assert (spec.resources.workers, spec.resources.gpus_per_worker, spec.resources.cpus_per_worker) == (1, 1.0, 8.0)
    assert 32 <= spec.num_samples <= 64
    assert spec.scheduler.type == "asha" and spec.scheduler.max_t == base_config(spec).run.iterations


@pytest.mark.parametrize("name", HRDA_SPACES)
def test_hrda_paper_scale_spaces(name: str) -> None:
    spec = load_space(ROOT / "search_spaces" / f"{name}.yaml")
    assert spec.base_config == (ROOT / "search_spaces" / "base" / HRDA_SPACES[name]).resolve()
    assert (spec.resources.workers, spec.resources.gpus_per_worker, spec.resources.cpus_per_worker) == (1, 1.0, 8.0)
    s = spec.scheduler
    assert (s.type, s.grace_period, s.max_t, s.reduction_factor) == ("asha", 4000, 40000, 2)
    assert s.max_t == base_config(spec).run.iterations and base_config(spec).model.hrda.enabled


def test_all_methods_is_a_method_choice_with_conditional_params() -> None:
    spec = load_space(ROOT / "search_spaces" / "all_methods.yaml")
    method = next(s for s in spec.switches if s.name == "method")
    assert set(method.choices) >= {"cluda", "cfcontra", "sdca", "target_mix"}
    conditional = {p.name: dict(p.when) for p in spec.params if p.when}
    for key, value in (("loss.cluda.weight", "cluda"), ("loss.cfcontra.weight", "cfcontra"),
                       ("loss.sdca.weight_feat", "sdca"), ("loss.cross_view.pixel_weight", "target_mix")):
        assert conditional[key] == {"method": (value,)}


def test_components_ablation() -> None:
    spec = load_ablation(ROOT / "search_spaces" / "ablations" / "components.yaml")
    assert [c.name for c in expand(spec)] == ["baseline", "+cluda", "+cfcontra", "+sdca", "+target_mix", "all"]
    assert spec.seeds == (0, 1, 2) and len(grid(spec)) == 18
    base = cell_config(spec, grid(spec)[0])
    assert base.loss.cluda.weight == 0.0 and not base.mix.target_to_source.enabled
    assert base.data.source == "synthetic" and base.run.device in ("auto", "cpu")
