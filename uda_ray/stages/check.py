"""Checks of a chain made before anything runs: every stage's data roots and pretrained files (``preflight``), and
every checkpoint stage's file, loaded into the network that will read it, so that a file that does not fit is
reported before Ray starts, naming the stage."""

from __future__ import annotations

from pathlib import Path

from uda_ray.config import Config
from uda_ray.models.errors import CheckpointError
from uda_ray.preflight import PreflightError, preflight
from uda_ray.stages.chain import Chain, ChainError


def chain_configs(chain: Chain) -> list[Config]:
    """The run config of every stage that has one (what ``preflight`` checks)."""
    return [c for c in (chain.run_config(n) for n in chain.names) if c is not None]


def _readers(chain: Chain, name: str) -> list[tuple[str, Config]]:
    """(stage, config) of the stages that load checkpoint stage ``name``'s file into their network."""
    out = []
    for s in chain.stages:
        for role, ref in s.inputs.items():
            if ref.stage == name and role in ("init", "model"):
                cfg = chain.run_config(s.name) if role == "init" else chain.stage(name).config
                if cfg is not None:
                    out.append((s.name, cfg))
    return out


def check_checkpoint_stages(chain: Chain) -> None:
    """Each checkpoint stage's file exists and loads into the network of every stage that reads it."""
    from uda_ray.models.released import load_released
    from uda_ray.train.loop import build_model

    for s in chain.stages:
        if s.kind != "checkpoint":
            continue
        if "://" not in s.path and not Path(s.path).is_file():
            raise PreflightError(f"{chain.source}: stage '{s.name}' key 'path' = {s.path!r}: no such file")
        for reader, cfg in _readers(chain, s.name):
            model = build_model(cfg, load_pretrained=False)
            try:
                load_released(model, s.path, weights=s.weights)
            except (CheckpointError, OSError, RuntimeError, ValueError) as e:
                raise ChainError(f"{chain.source}: stage '{s.name}' key 'path' = {s.path!r} does not load into the "
                                 f"network of stage '{reader}': {e}") from None


def preflight_chain(chain: Chain, *, storage: str | None = None, storage_option: str = "--storage") -> None:
    """``preflight`` for every stage's config, then the checkpoint stages' files."""
    preflight(chain_configs(chain), storage=storage, storage_option=storage_option)
    check_checkpoint_stages(chain)
