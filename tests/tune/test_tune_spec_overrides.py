"""Command-line overrides anywhere on the line, of the run config and of a spec's own keys (``num_samples=4``,
``scheduler.max_t=100``, ``'seeds=[0]'``), checked like the file; errors name the override (no Ray runtime)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import ROOT
from uda_ray.cli import main, parse_args
from uda_ray.tune.ablation import load_ablation
from uda_ray.tune.space import SpaceError, load_space
from uda_ray.tune.spec_yaml import apply_spec_overrides, split_overrides

DEMO = ROOT / "search_spaces" / "demo.yaml"
COMPONENTS = ROOT / "search_spaces" / "ablations" / "components.yaml"


@pytest.mark.parametrize("argv, overrides", [
    (["tune", "s.yaml", "--address", "auto", "run.iterations=100"], ["run.iterations=100"]),
    (["tune", "s.yaml", "a.b=1", "--name", "x", "num_samples=4", "--resume", "c=[1, 2]"],
     ["a.b=1", "num_samples=4", "c=[1, 2]"]),
    (["train", "c.yaml", "--name", "my-run", "loss.cluda.weight=1.0"], ["loss.cluda.weight=1.0"]),
    (["ablate", "a.yaml", "--storage", "r", "seeds=[0]"], ["seeds=[0]"]),
    (["train", "chain.yaml", "--no-progress", "stages.*.run.threads=1"], ["stages.*.run.threads=1"]),
    (["evaluate", "ckpt", "--split", "train", "data.target_root=/d"], ["data.target_root=/d"]),
])
def test_overrides_after_options_are_overrides(argv: list[str], overrides: list[str]) -> None:
    assert parse_args(argv).overrides == overrides


@pytest.mark.parametrize("argv", [
    ["tune", "s.yaml", "--adress", "auto"],  # a misspelt option is still an error
    ["tune", "s.yaml", "--name", "x", "not-an-override"],
    ["analyze", "results/x", "--top", "3", "run.iterations=4"],  # analyze takes no overrides
])
def test_anything_else_is_still_an_error(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_space_keys_are_overridden_before_the_space_is_checked() -> None:
    spec = load_space(DEMO, ["run.iterations=100", "scheduler.max_t=100", "scheduler.grace_period=50",
                             "num_samples=4", "max_concurrent=1", "resources.workers=0", "sampler.seed=7"])
    assert (spec.num_samples, spec.max_concurrent, spec.resources.workers, spec.seed) == (4, 1, 0, 7)
    assert (spec.scheduler.max_t, spec.scheduler.grace_period) == (100, 50)
    assert spec.base_overrides["run.iterations"] == 100  # config keys still go to the base config
    assert "num_samples" not in spec.base_overrides


def test_shrinking_the_run_alone_meets_the_schedulers_check() -> None:
    """The issue's case: run.iterations=100 alone is refused by the scheduler's check, which names both keys."""
    with pytest.raises(SpaceError, match=r"scheduler\.max_t = 300 exceeds .*run\.iterations = 100"):
        load_space(DEMO, ["run.iterations=100"])


@pytest.mark.parametrize("override, message", [
    ("scheduler.max_t=0", r"scheduler\.max_t = 0: expected an integer >= 1"),
    ("num_samples=many", r"num_samples = 'many': expected an integer"),
    ("resources.gpus=1", r"resources: unknown key 'gpus' \(closest: 'gpus_per_worker'\)"),
    ("params.loss.cluda.weight=1.0", r"'params' is part of what the spec searches"),
    ("base.config=x.yaml", r"'base' is part of what the spec searches"),
    ("num_sampels=4", r"unknown key 'num_sampels'"),  # neither a space key nor a config key
])
def test_bad_override_exits_2_naming_it(override: str, message: str, tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    assert main(["tune", str(DEMO), "--storage", str(tmp_path), override]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and override.split("=")[0] in err
    assert not list(tmp_path.iterdir())  # refused before anything was written
    assert re.search(message, err), err
    if override.split(".")[0] in ("scheduler", "num_samples", "resources"):
        assert f"command-line override(s) {override}" in err  # the value came from the command line


def test_override_into_a_non_mapping_names_it(tmp_path: Path) -> None:
    with pytest.raises(SpaceError, match=r"override 'scheduler.max_t=4': 'scheduler' is 'none' in the file"):
        apply_spec_overrides({"scheduler": "none"}, ["scheduler.max_t=4"], {"scheduler"}, tmp_path / "s.yaml")


def test_split_overrides() -> None:
    assert split_overrides(["num_samples=2", "run.seed=1", "scheduler.max_t=3"], {"num_samples", "scheduler"}) == (
        ["num_samples=2", "scheduler.max_t=3"], ["run.seed=1"])


def test_ablation_seeds_and_settings_from_the_command_line() -> None:
    spec = load_ablation(COMPONENTS, ["seeds=[0]", "max_concurrent=1", "run.iterations=10"])
    assert spec.seeds == (0,) and spec.max_concurrent == 1 and spec.base_overrides["run.iterations"] == 10
    with pytest.raises(SpaceError, match="'components' is part of what the spec searches or compares"):
        load_ablation(COMPONENTS, ["components.cluda.loss.cluda.weight=2.0"])
