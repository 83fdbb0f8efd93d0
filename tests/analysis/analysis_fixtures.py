"""Builders of generated experiment folders with known answers, written through the real results store."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import yaml

from uda_ray import config as config_mod
from uda_ray.results import store

SEARCH_SPACE = {
    "experiment": "fixture_search",
    "metric": "val/miou",
    "mode": "max",
    "params": {
        "loss.cluda.weight": {"loguniform": [0.01, 10.0]},
        "teacher.pseudo_threshold": {"uniform": [0.8, 0.99]},
        "mix.class_ratio": {"uniform": [0.2, 0.8]},
        "optim.name": {"choice": ["adamw", "sgd"]},
        "optim.momentum": {"uniform": [0.5, 0.99], "when": {"optim.name": "sgd"}},
        "run.iterations": 200,
    },
}
N_SEARCH = 60
ABLATION_SEEDS = (0, 1, 2, 3)
BASELINE = {0: 0.50, 1: 0.47, 2: 0.52, 3: 0.49}
# known per-seed paired differences (cell - baseline)
DIFFS = {
    "cluda": (0.02, 0.03, 0.01, 0.04),
    "sdca": (-0.01, 0.005, 0.0, -0.02),
    "all": (0.05, 0.06, 0.04, 0.07),
}
ABLATION_OVERRIDES = {
    "baseline": {},
    "cluda": {"loss.cluda.weight": 1.0},
    "sdca": {"loss.sdca.weight_feat": 1.0},
    "all": {"loss.cluda.weight": 1.0, "loss.sdca.weight_feat": 1.0},
}


def search_value(p: dict) -> float:
    """The fixture's objective: driven by loss.cluda.weight (log scale); the other params barely matter."""
    return 0.3 + 0.1 * (math.log10(p["loss.cluda.weight"]) + 2.0) + 0.002 * p["mix.class_ratio"]


def _reports(final: float, n: int = 5, every: int = 40) -> list[dict]:
    """Reports whose val/miou rises to ``final`` at the last evaluation; train/loss falls; val only every report."""
    out = []
    for i in range(1, n + 1):
        out.append({"iteration": i * every, "train/loss": 1.0 / i, "time/iter_s": 0.1,
                    "val/miou": final * i / n, "val/iou/road": min(1.0, final * i / n + 0.1)})
    return out


def write_search(root: Path, *, with_space: bool = True) -> str:
    rng = np.random.default_rng(0)
    exp = SEARCH_SPACE["experiment"]
    for i in range(N_SEARCH):
        p = {"loss.cluda.weight": float(10 ** rng.uniform(-2, 1)),
             "teacher.pseudo_threshold": float(rng.uniform(0.8, 0.99)),
             "mix.class_ratio": float(rng.uniform(0.2, 0.8)),
             "optim.name": str(rng.choice(["adamw", "sgd"]))}
        if p["optim.name"] == "sgd":
            p["optim.momentum"] = float(rng.uniform(0.5, 0.99))
        overrides = {**p, "run.iterations": 200}
        cfg = config_mod.apply_overrides(config_mod.Config(), overrides)
        status = "TERMINATED"
        value = search_value(p)
        if i in (3, 17):
            status, value = "PRUNED", 0.99  # better than any finished trial: must never be ranked
        if i == 25:
            status = "ERROR"
        reports = _reports(value) if status != "ERROR" else _reports(value, n=1)
        row = store.trial_row(experiment=exp, trial_id=f"s{i:03d}", kind="search", status=status,
                              error="RuntimeError: boom" if status == "ERROR" else "", config=cfg,
                              overrides=overrides, reports=reports, metric="val/miou", mode="max",
                              started_at=1_700_000_000.0 + 10 * i, ended_at=1_700_000_005.0 + 10 * i)
        store.write_trial(str(root), row)
        store.write_metrics(str(root), exp, f"s{i:03d}", reports)
    path = root / exp
    if with_space:
        (path / "search_space.yaml").write_text(yaml.safe_dump(SEARCH_SPACE))
    return str(path)


def write_ablation(root: Path) -> str:
    exp = "fixture_ablation"
    k = 0
    for cell, over in ABLATION_OVERRIDES.items():
        for s in ABLATION_SEEDS:
            final = BASELINE[s] + (0.0 if cell == "baseline" else DIFFS[cell][s])
            overrides = {**over, "run.seed": s}
            cfg = config_mod.apply_overrides(config_mod.Config(), overrides)
            reports = _reports(final)
            row = store.trial_row(experiment=exp, trial_id=f"a{k:03d}", kind="ablation", status="TERMINATED",
                                  config=cfg, overrides=overrides, reports=reports, metric="val/miou", mode="max",
                                  cell=cell, seed=s, started_at=1_700_000_000.0 + k, ended_at=1_700_000_100.0 + k)
            store.write_trial(str(root), row)
            store.write_metrics(str(root), exp, f"a{k:03d}", reports)
            k += 1
    # a crashed baseline run of an extra seed: counted in the status table, never paired
    cfg = config_mod.apply_overrides(config_mod.Config(), {"run.seed": 9})
    row = store.trial_row(experiment=exp, trial_id=f"a{k:03d}", kind="ablation", status="ERROR", error="OOM",
                          config=cfg, overrides={"run.seed": 9}, reports=[], metric="val/miou", mode="max",
                          cell="baseline", seed=9)
    store.write_trial(str(root), row)
    return str(root / exp)
