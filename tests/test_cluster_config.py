"""The shipped cluster-launcher configs pass Ray's own validation (the steps `ray up` runs before touching a cloud:
``prepare_config`` fills defaults, ``validate_config`` checks the JSON schema and the node-type rules)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["cluster.yaml", "cluster/onprem.yaml"]


def _load(name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / name).read_text())


def _validated(raw: dict[str, Any]) -> dict[str, Any]:
    cfg = prepare_config(copy.deepcopy(raw))
    validate_config(cfg)
    return cfg


@pytest.mark.parametrize("name", CONFIGS)
def test_ray_accepts_shipped_config(name: str) -> None:
    cfg = _validated(_load(name))
    assert cfg["head_node_type"] in cfg["available_node_types"]
    for cmd in cfg["setup_commands"] + cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        assert isinstance(cmd, str)  # an unquoted ': ' in YAML would have made a mapping here


def test_aws_layout_keeps_drivers_off_spot_gpu_nodes() -> None:
    cfg = _validated(_load("cluster.yaml"))
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"]["train_driver"] >= 1 and head["resources"].get("GPU", 0) == 0
    assert "InstanceMarketOptions" not in head["node_config"]  # the head is on demand
    workers = {n: t for n, t in types.items() if n != cfg["head_node_type"]}
    assert workers
    for t in workers.values():
        assert t["resources"]["GPU"] >= 1 and "train_driver" not in t["resources"]
        assert t["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
        assert t["min_workers"] == 0 and t["max_workers"] >= 1
    assert any("uda_ray" in c or "uda-ray" in c for c in cfg["setup_commands"])


def test_onprem_head_advertises_train_driver() -> None:
    cfg = _validated(_load("cluster/onprem.yaml"))
    assert cfg["provider"]["type"] == "local"
    assert any('"train_driver":' in c for c in cfg["head_start_ray_commands"])
    assert not any("train_driver" in c for c in cfg["worker_start_ray_commands"])


@pytest.mark.parametrize("break_it, error", [
    (lambda c: c["available_node_types"]["gpu_worker_spot"].update(gpus=4), jsonschema.ValidationError),
    (lambda c: c.update(head_node_type="missing"), ValueError),
    (lambda c: c["available_node_types"]["gpu_worker_spot"].update(min_workers=9), ValueError),
    (lambda c: c.update(setup_commands=[{"pip install x": "y"}]), jsonschema.ValidationError),
])
def test_ray_rejects_broken_copy(break_it: Any, error: type[Exception]) -> None:
    raw = _load("cluster.yaml")
    break_it(raw)
    with pytest.raises(error):
        _validated(raw)
