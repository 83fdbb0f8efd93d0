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


def check_checkpoint_stages(chain: Chain, checked: set[tuple] | None = None) -> None:
    """Each checkpoint stage's file exists and loads into the network of every stage that reads it; a (file, network)
    already in ``checked`` (another chain's, the same recipe with another seed or cell) is not loaded again."""
    from uda_ray.models.released import load_released
    from uda_ray.train.loop import build_model

    checked = set() if checked is None else checked
    for s in chain.stages:
        if s.kind != "checkpoint":
            continue
        if "://" not in s.path and not Path(s.path).is_file():
            raise PreflightError(f"{chain.source}: stage '{s.name}' key 'path' = {s.path!r}: no such file")
        for reader, cfg in _readers(chain, s.name):
            key = (s.path, s.weights, cfg.model, cfg.loss)  # what build_model reads
            if key in checked:
                continue
            checked.add(key)
            model = build_model(cfg, load_pretrained=False)
            try:
                load_released(model, s.path, weights=s.weights)
            except (CheckpointError, OSError, RuntimeError, ValueError) as e:
                raise ChainError(f"{chain.source}: stage '{s.name}' key 'path' = {s.path!r} does not load into the "
                                 f"network of stage '{reader}': {e}") from None


def preflight_chain(*chains: Chain, storage: str | None = None, storage_option: str = "--storage") -> None:
    """``preflight`` for every stage's config of ``chains`` at once (a data root that many chains share, the cells
    and seeds of an ablation, is checked once), then the checkpoint stages' files."""
    preflight([cfg for chain in chains for cfg in chain_configs(chain)], storage=storage,
              storage_option=storage_option)
    checked: set[tuple] = set()
    for chain in chains:
        check_checkpoint_stages(chain, checked)
