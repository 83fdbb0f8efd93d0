"""Chains of stages: the YAML format, its errors (each naming the stage and the key), dotted overrides and keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT
from uda_ray.stages import Chain, ChainError, load_chain
from uda_ray.stages.cache import stage_keys
from uda_ray.stages.chain import placeholders

TOY = ROOT / "search_spaces" / "chains" / "toy_synthetic.yaml"
BASE = str(ROOT / "search_spaces" / "base" / "synthetic.yaml")
SELF = {"loss.self_training.weight": 1.0}


def _write(tmp_path: Path, stages: dict, **top: object) -> Path:
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump({**top, "stages": stages}, sort_keys=False))
    return path


def _train(**extra: object) -> dict:
    return {"kind": "train", "config": BASE, **extra}


def test_the_shipped_toy_chain_loads_in_run_order_with_its_inputs_as_placeholders() -> None:
    chain = load_chain(TOY)
    assert chain.names == ["source", "adapt", "labels", "self_train"] and chain.final.name == "self_train"
    final = chain.final_config
    assert final.model.init_from == "stage://adapt/last.pt" and final.data.target_pseudo_labels == "stage://labels"
    assert chain.stage("adapt").config.model.init_from == "stage://source/best.pt"
    assert all(s.config.run.seed == 0 for s in chain.stages if s.kind == "train")
    # a model-reading stage runs on its model stage's config
    assert chain.run_config("labels") == chain.stage("adapt").config
    assert chain.ancestors("self_train") == ["source", "adapt", "labels"]


def test_stages_run_after_their_inputs_whatever_the_yaml_order(tmp_path: Path) -> None:
    path = _write(tmp_path, {"final": _train(init="warm"), "warm": _train()})
    assert load_chain(path).names == ["warm", "final"]


@pytest.mark.parametrize(("stages", "message"), [
    ({"a": _train(init="nowhere")}, "stage 'a' key 'init' names stage 'nowhere', which does not exist"),
    ({"a": _train(init="b"), "b": _train(init="a"), "c": _train(init="a")}, "cycle: a → b → a"),
    ({"a": _train(init="a")}, "names the stage itself"),
    ({"a": {"kind": "pseudo_labels"}, "b": _train(target_labels="a")}, "needs 'model: {stage: NAME}'"),
    ({"a": _train(), "b": {"kind": "pseudo_labels", "model": "a"},
      "c": _train(target_labels="a", overrides={"loss.self_training.weight": 1.0})},
     "key 'target_labels' names stage 'a' of kind train: expected a stage of kind pseudo_labels"),
    ({"a": _train(), "b": _train()}, "ends in one train stage"),
    ({"a": {"kind": "nope"}}, "kind = 'nope'"),
    ({"a": {"kind": "train"}}, "needs 'config: <run config path>'"),
    ({"a": _train(), "b": _train(init={"stage": "a", "checkpoint": "peak"})}, "checkpoint = 'peak'"),
    ({"a": _train(), "b": {"kind": "pseudo_labels", "model": "a", "options": {"cap": 2.0}}, "c": _train(
        target_labels="b", overrides=SELF)}, "key 'options.cap' = 2.0"),
    ({"a": _train(), "b": {"kind": "pseudo_labels", "model": "a", "options": {"thr": 0.5}},
      "c": _train(target_labels="b", overrides=SELF)}, "unknown option(s) ['thr']"),
    ({"a": _train(overrides={"model.backbone": "resnet18"}), "b": _train(init="a")},
     "stage 'b' key 'init' starts from stage 'a', whose model is another network (model.backbone: 'resnet18'"),
    ({"a": _train(), "b": _train(init="a", overrides={"model.init_from": "x.pt"})}, "name the input stage instead"),
    ({"a": _train(overrides={"loss.cluda.wieght": 1.0})}, "stage 'a'"),
    ({"a": {"kind": "checkpoint", "path": "m.pt"}, "b": {"kind": "class_stats", "model": "a"},
      "c": _train(class_stats="b")}, "a checkpoint without a config"),
])
def test_a_chain_that_cannot_run_is_refused_naming_the_stage_and_key(tmp_path: Path, stages: dict,
                                                                     message: str) -> None:
    with pytest.raises(ChainError) as info:
        load_chain(_write(tmp_path, stages))
    assert message in str(info.value), str(info.value)


def test_dotted_overrides_address_a_stage_every_stage_the_final_one_or_the_seed() -> None:
    chain = load_chain(TOY, ["stages.adapt.loss.cluda.weight=0.5", "stages.labels.cap=0.8", "run.iterations=7",
                             "stages.*.data.batch_size=3", "seed=4"])
    assert chain.stage("adapt").config.loss.cluda.weight == 0.5
    assert chain.stage("labels").options["cap"] == 0.8
    assert chain.final_config.run.iterations == 7 and chain.stage("adapt").config.run.iterations == 200
    assert all(s.config.data.batch_size == 3 and s.config.run.seed == 4 for s in chain.stages if s.config)
    with pytest.raises(ChainError, match="names no stage 'nope'"):
        load_chain(TOY, ["stages.nope.run.iterations=3"])
    with pytest.raises(ChainError, match="stages.adapt.loss.cluda.wieght"):
        load_chain(TOY, ["stages.adapt.loss.cluda.wieght=3"])
    with pytest.raises(ChainError, match="'options.cap'|stages.labels.cap"):
        load_chain(TOY).with_overrides({"stages.labels.cap": 1.5})


def test_a_true_or_false_option_takes_only_true_or_false() -> None:
    path = TOY.parent / "cfcontra_deeplabv2_gta2cs.yaml"
    assert load_chain(path).stage("centroids").options["train_mode"] is True
    assert load_chain(path, ["stages.centroids.train_mode=false"]).stage("centroids").options["train_mode"] is False
    for value in ("yes", 1):
        with pytest.raises(ChainError, match=f"'stages.centroids.train_mode' = {value!r}: expected true or false"):
            load_chain(path).with_overrides({"stages.centroids.train_mode": value})


def test_keys_change_from_the_changed_stage_on_and_survive_a_json_round_trip() -> None:
    chain = load_chain(TOY)
    keys = stage_keys(chain)
    assert set(keys) == {"source", "adapt", "labels"}
    adapt = stage_keys(chain.with_overrides({"stages.adapt.loss.cluda.weight": 0.3}))
    assert adapt["source"] == keys["source"] and adapt["adapt"] != keys["adapt"] and adapt["labels"] != keys["labels"]
    # the final stage's own keys change no cached stage; neither do log intervals or thread counts
    assert stage_keys(chain.with_overrides({"loss.self_training.weight": 2.0})) == keys
    assert stage_keys(chain.with_overrides({"stages.*.run.log_every": 3, "stages.*.run.threads": 2})) == keys
    assert stage_keys(chain.with_overrides({"seed": 1}))["source"] != keys["source"]
    again = Chain.from_json(chain.to_json())
    assert again == chain and stage_keys(again) == keys
    assert json.loads(chain.to_json())["stages"][0]["name"] == "source"


def test_a_checkpoint_stage_is_keyed_by_its_content(tmp_path: Path) -> None:
    (tmp_path / "m.pt").write_bytes(b"weights-1")
    stages = {"warm": {"kind": "checkpoint", "path": "m.pt", "weights": "ema_model"}, "run": _train(init="warm")}
    chain = load_chain(_write(tmp_path, stages))
    assert chain.stage("warm").path == str(tmp_path / "m.pt")
    assert chain.final_config.model.init_weights == "model"  # the ref's; the file's own choice is applied at run
    first = stage_keys(chain)["warm"]
    (tmp_path / "m.pt").write_bytes(b"weights-2")
    assert stage_keys(load_chain(_write(tmp_path, stages)))["warm"] != first


def test_placeholders_name_the_input_stage_and_file() -> None:
    chain = load_chain(TOY)
    assert placeholders(chain.final.inputs) == {"model.init_from": "stage://adapt/last.pt",
                                                "model.init_weights": "model",
                                                "data.target_pseudo_labels": "stage://labels"}
