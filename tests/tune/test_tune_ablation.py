"""Ablation specs: expansion into cells, paired seeds, conflicts, validation errors (no Ray, no Optuna)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import edited
from uda_ray.config import apply_overrides, load_config
from uda_ray.tune.ablation import cell_config, expand, grid, load_ablation
from uda_ray.tune.spec_yaml import SpaceError, base_config

SPEC: dict[str, Any] = {
    "experiment": "abl",
    "base": {"config": "run.yaml", "overrides": {"run.iterations": 30}},
    "baseline": {"loss.cluda.weight": 0.0, "mix.target_to_source.enabled": False},
    "components": {
        "cluda": {"loss.cluda.weight": 1.0, "loss.cluda.fm_size": 33},
        "sdca": {"loss.sdca.weight_feat": 1.0, "loss.sdca.weight_out": 1.0},
        "tmix": {"mix.target_to_source.enabled": True, "loss.cluda.fm_size": 33},
    },
    "design": "one-at-a-time",
    "include_all": True,
    "seeds": [0, 1, 2],
    "metric": "val/miou",
    "mode": "max",
    "max_concurrent": 2,
    "resources": {"workers": 0, "gpus_per_worker": 0, "cpus_per_worker": 1},
}


def write(tmp_path: Path, spec: dict[str, Any]) -> Path:
    (tmp_path / "run.yaml").write_text("run:\n  iterations: 100\n  eval_every: 10\n")
    path = tmp_path / "abl.yaml"
    path.write_text("# uda-ray ablate abl.yaml\n" + yaml.safe_dump(spec, sort_keys=False))
    return path


def with_(**changes: Any) -> dict[str, Any]:
    return edited(SPEC, **changes)


def test_one_at_a_time_with_all(tmp_path: Path) -> None:
    spec = load_ablation(write(tmp_path, SPEC))
    assert spec.design == "one-at-a-time" and spec.seeds == (0, 1, 2) and spec.max_concurrent == 2
    assert base_config(spec).run.iterations == 30
    cells = expand(spec)
    assert [c.name for c in cells] == ["baseline", "+cluda", "+sdca", "+tmix", "all"]
    assert [c.components for c in cells] == [(), ("cluda",), ("sdca",), ("tmix",), ("cluda", "sdca", "tmix")]
    assert cells[0].overrides == SPEC["baseline"]
    assert cells[1].overrides == {"loss.cluda.weight": 1.0, "mix.target_to_source.enabled": False,
                                  "loss.cluda.fm_size": 33}
    assert cells[4].overrides == {"loss.cluda.weight": 1.0, "mix.target_to_source.enabled": True,
                                  "loss.cluda.fm_size": 33, "loss.sdca.weight_feat": 1.0,
                                  "loss.sdca.weight_out": 1.0}


def test_one_at_a_time_without_all(tmp_path: Path) -> None:
    cells = expand(load_ablation(write(tmp_path, with_(include_all=None))))
    assert [c.name for c in cells] == ["baseline", "+cluda", "+sdca", "+tmix"]


def test_full_factorial_all_subsets(tmp_path: Path) -> None:
    cells = expand(load_ablation(write(tmp_path, with_(design="full-factorial", include_all=None))))
    names = ("cluda", "sdca", "tmix")
    subsets = [s for k in range(4) for s in itertools.combinations(names, k)]
    assert len(cells) == 2 ** 3 and [c.components for c in cells] == subsets
    assert [c.name for c in cells][:5] == ["baseline", "+cluda", "+sdca", "+tmix", "+cluda+sdca"]
    for c in cells:  # overrides = baseline, then each chosen component's (reference computed here)
        ref = dict(SPEC["baseline"])
        for n in c.components:
            ref.update(SPEC["components"][n])
        assert c.overrides == ref


def test_grid_pairs_every_cell_with_the_same_seeds(tmp_path: Path) -> None:
    spec = load_ablation(write(tmp_path, SPEC))
    g = grid(spec)
    cells = expand(spec)
    assert len(g) == len(cells) * 3
    assert [(e["seed"], e["cell"]) for e in g] == [(s, c.name) for s in (0, 1, 2) for c in cells]  # seed-major
    for c in cells:
        assert sorted(e["seed"] for e in g if e["cell"] == c.name) == [0, 1, 2]
    for e in g:
        cell = next(c for c in cells if c.name == e["cell"])
        assert e["overrides"] == {"run.iterations": 30, **cell.overrides, "run.seed": e["seed"]}
        cfg = cell_config(spec, e)
        assert cfg == apply_overrides(load_config(spec.base_config), e["overrides"])
        assert cfg.run.seed == e["seed"] and cfg.run.iterations == 30
    assert len({(e["cell"], e["seed"]) for e in g}) == len(g)


def test_equal_values_in_two_components_are_not_a_conflict(tmp_path: Path) -> None:
    spec = load_ablation(write(tmp_path, SPEC))  # cluda and tmix both set fm_size 33
    assert expand(spec)[-1].overrides["loss.cluda.fm_size"] == 33


BAD = [
    (with_(components__tmix={"mix.target_to_source.enabled": True, "loss.cluda.fm_size": 17}),
     "cell 'all': components 'cluda' and 'tmix' set 'loss.cluda.fm_size' to 33 and 17"),
    (with_(design="full-factorial", include_all=None, components__tmix={"loss.cluda.weight": 0.5}),
     "cell '+cluda+tmix': components 'cluda' and 'tmix' set 'loss.cluda.weight'"),
    (with_(seeds=[0, 1, 1]), "repeat [1]"),
    (with_(seeds=[]), "non-empty list"),
    (with_(seeds=[0, "1"]), "'1' is not an integer"),
    (with_(components={}), "expected a non-empty mapping"),
    (with_(components__sdca={}), "components.sdca is empty"),
    (with_(components__sdca={"loss.cluda.weight": 0.0}), "changes nothing relative to the baseline"),
    (with_(components__sdca={"loss.sdca.wieght_feat": 1.0}), "closest valid key: 'loss.sdca.weight_feat'"),
    (with_(components__sdca={"loss.sdca.tau": 0.0}), "components.sdca: "),
    (with_(components__sdca={"run.seed": 3}), "sets 'run.seed'"),
    (with_(baseline={"run.seed": 3}), "sets 'run.seed'"),
    (with_(baseline={"teacher.alpha": 1.0}), "baseline: "),
    (with_(design="latin-square"), "design = 'latin-square'"),
    (with_(design="full-factorial"), "include_all applies to design one-at-a-time only"),
    (with_(components={"all": {"loss.cluda.weight": 1.0}, "x": {"loss.sdca.tau": 50.0}}), "component name 'all'"),
    (with_(components={"+cluda": {"loss.cluda.weight": 1.0}}), "component name '+cluda'"),
    (with_(components={"my-comp": {"loss.cluda.weight": 1.0}}), "component name 'my-comp'"),
    (with_(components={"cluda": {"loss.cluda.weight": 1.0}}), "include_all needs at least 2 components"),
    (with_(metric=["val/miou", "time/iter_s"], mode=["max", "min"]), "one metric"),
    (with_(metric="miou"), "does not look like a uda-ray metric"),
    (with_(seed=[0]), "unknown key 'seed' (closest: 'seeds')"),
    (with_(experiment=None), "missing required key 'experiment'"),
    (with_(base__config="nope.yaml"), "config file not found"),
]


@pytest.mark.parametrize(("spec", "message"), BAD, ids=[m[:40] for _, m in BAD])
def test_bad_ablation_names_file_and_key(tmp_path: Path, spec: dict[str, Any], message: str) -> None:
    path = write(tmp_path, spec)
    with pytest.raises(SpaceError) as err:
        load_ablation(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)


def test_cells_start_from_the_base_as_read_and_a_resume_after_it_changed_is_refused(tmp_path: Path) -> None:
    from uda_ray.tune.ablate import SPEC_COPY, run_ablation
    from uda_ray.tune.driver import TUNE_STATE, Experiment, ExperimentError, launch_base, launch_spec

    path = write(tmp_path, SPEC)
    spec = load_ablation(path)
    (tmp_path / "run.yaml").write_text("run:\n  iterations: 100\n  eval_every: 20\n")
    assert cell_config(spec, grid(spec)[0]).run.eval_every == 10  # the base as the spec was loaded with
    exp = Experiment(str(tmp_path / "results"), "abl-x")
    Path(exp.uri).mkdir(parents=True)
    (Path(exp.uri) / TUNE_STATE).write_bytes(b"")
    launch_spec(exp, path, SPEC_COPY, False, "ablation spec")  # what the launch of `spec` recorded
    launch_base(exp, spec.base, spec.base_config, resume=False)
    with pytest.raises(ExperimentError, match=r"run.yaml now gives another base run .*run.eval_every: 10 at launch, "
                                              r"20 now"):
        run_ablation(path, storage=str(tmp_path / "results"), name="abl-x", resume=True)
    path.write_text(path.read_text().replace("max_concurrent: 2", "max_concurrent: 1"))
    with pytest.raises(ExperimentError, match=r"abl.yaml differs from the ablation spec .*abl-x was launched with"):
        run_ablation(path, storage=str(tmp_path / "results"), name="abl-x", resume=True)


def _chain_spec(tmp_path: Path, **changes: Any) -> Path:
    """An ablation over a 3-stage chain: its components change the adaptation stage or the final one only."""
    stage = {"kind": "train", "config": "run.yaml"}
    chain = {"chain": "toy", "seed": 7, "stages": {
        "source": {**stage, "overrides": {"loss.mix_weight": 0.0}},
        "adapt": {**stage, "init": "source"},
        "final": {**stage, "init": "adapt"}}}
    (tmp_path / "chain.yaml").write_text(yaml.safe_dump(chain, sort_keys=False))
    spec = edited(SPEC, base__config="chain.yaml", base__overrides={"stages.adapt.run.iterations": 30},
                  baseline={"loss.cluda.weight": 0.0},
                  components={"cluda": {"loss.cluda.weight": 1.0},
                              "adapt_sdca": {"stages.adapt.loss.sdca.weight_feat": 1.0}}, **changes)
    return write(tmp_path, spec)


def test_a_chain_base_seeds_every_stage_and_shares_the_stages_a_cell_does_not_change(tmp_path: Path) -> None:
    from uda_ray.stages.cache import stage_keys
    from uda_ray.stages.chain import Chain

    spec = load_ablation(_chain_spec(tmp_path, seeds=[0, 1]))
    assert base_config(spec).loss.cluda.weight == 0.0  # the final stage's config, baseline applied in each cell
    g = grid(spec)
    assert [(e["seed"], e["cell"]) for e in g] == [(s, c) for s in (0, 1) for c in ("baseline", "+cluda",
                                                                                    "+adapt_sdca", "all")]
    keys = {}
    for e in g:
        assert "run.seed" not in e["overrides"] and e["overrides"]["seed"] == e["seed"]
        chain = cell_config(spec, e)
        assert isinstance(chain, Chain) and chain.seed == e["seed"]
        assert [s.config.run.seed for s in chain.stages] == [e["seed"]] * 3  # the whole recipe repeats per seed
        assert chain.stage("adapt").config.run.iterations == 30
        assert chain.final_config.loss.cluda.weight == (1.0 if e["cell"] in ("+cluda", "all") else 0.0)
        assert chain.stage("adapt").config.loss.sdca.weight_feat == (1.0 if e["cell"] in ("+adapt_sdca", "all")
                                                                     else 0.0)
        keys[(e["cell"], e["seed"])] = stage_keys(chain)
    for s in (0, 1):
        # the source-only stage: one for every cell of a seed; the adaptation stage: one per value of its component
        assert len({keys[(c, s)]["source"] for c in ("baseline", "+cluda", "+adapt_sdca", "all")}) == 1
        assert keys[("baseline", s)]["adapt"] == keys[("+cluda", s)]["adapt"] != keys[("+adapt_sdca", s)]["adapt"]
    assert keys[("baseline", 0)]["source"] != keys[("baseline", 1)]["source"]


@pytest.mark.parametrize("key", ["seed", "stages.adapt.run.seed", "run.seed"])
def test_a_chain_base_refuses_a_seed_set_by_hand(tmp_path: Path, key: str) -> None:
    path = _chain_spec(tmp_path, components__cluda={"loss.cluda.weight": 1.0, key: 3})
    with pytest.raises(SpaceError, match=f"{path}: components.cluda sets '{key}': seeds come from"):
        load_ablation(path)
