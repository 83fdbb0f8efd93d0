"""The stage kinds: each a function ``run(job) -> dict`` that writes one stage's output into ``job.out_dir`` and
returns what the manifest records about it (the chain format and what each kind reads: ``uda_ray.stages.chain``).

    train          uda_ray.stages.kinds.train          last.pt, best.pt, metrics.parquet, config.yaml
    class_stats    uda_ray.stages.kinds.class_stats    class_stats.pt (SDCA's feature and output statistics)
    centroids      uda_ray.stages.kinds.centroids      centroids.pt (CFContra's source and target centroids)
    pseudo_labels  uda_ray.stages.kinds.pseudo_labels  labels/<image>.png (train ids, 255 = ignore), labels.json

A ``checkpoint`` stage has no run: its file is its output.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uda_ray.config import Config

MODULES = {"train": "train", "class_stats": "class_stats", "centroids": "centroids", "pseudo_labels": "pseudo_labels"}


@dataclass
class StageJob:
    """One stage to compute. ``config``: the config it runs with, its inputs' paths set; ``model_file``/``weights``:
    the model a model-reading stage runs; ``work_dir``: kept across a killed run (train stages resume from it)."""

    name: str
    kind: str
    config: Config
    out_dir: Path
    work_dir: Path
    options: dict[str, Any] = field(default_factory=dict)
    model_file: Path | None = None
    weights: str = "model"
    progress: bool = False
    log: Callable[[str], None] = print
    # trains ``config`` in a folder (resuming from its newest checkpoint) and returns a FitResult: the in-process
    # ``uda_ray.stages.kinds.train.train_in`` by default, Ray Train workers when a search trial has them
    train_fn: Callable[[Config, Path], Any] | None = None


def run_stage(job: StageJob) -> dict[str, Any]:
    """Compute one stage into ``job.out_dir``."""
    module = importlib.import_module(f"uda_ray.stages.kinds.{MODULES[job.kind]}")
    return module.run(job)
