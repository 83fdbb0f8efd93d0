"""Chains of stages: runs whose outputs later runs start from, each output cached once and shared.

A chain is data (a YAML file of named stages, ``chain.py``), not control flow in the trainer: a source-only warm-up,
the statistics or centroids of that model, the adaptation stage started from it, offline pseudo-labels, a
self-training run on them. Every stage's output is stored once under the storage root, keyed by a hash of what
determines it (``cache.py``), and reused by every run, search or retrain that needs it. The stage kinds
(``kinds/``) are small functions of a config, their inputs and an output folder; ``run.py`` executes a chain in
order. Ray stays at the edges: searches deduplicate stages that concurrent trials share in ``uda_ray.tune``.
"""

from uda_ray.stages.chain import (
    Chain,
    ChainError,
    Ref,
    Run,
    Stage,
    StageFailed,
    apply_run_overrides,
    final_config,
    is_chain_file,
    load_chain,
    load_run,
    run_key_type,
)

__all__ = ["Chain", "ChainError", "Ref", "Run", "Stage", "StageFailed", "apply_run_overrides", "final_config",
           "is_chain_file", "load_chain", "load_run", "run_key_type"]
