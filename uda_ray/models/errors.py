"""Checkpoint files of the model layer: reading one as a state dict, and the error callers tell apart (a trial that
fails with it is not retried)."""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A pretrained or training checkpoint that cannot be read or does not fit the network; the message names the
    file and the keys at fault."""


def listing(items: Sequence[str], limit: int = 10, *, counted: bool = False) -> str:
    """The first ``limit`` items joined by commas with a count of the rest (``counted``: led by ``n: ``), for error
    messages that name keys."""
    shown = ", ".join(items[:limit]) + (f", … ({len(items) - limit} more)" if len(items) > limit else "")
    return f"{len(items)}: {shown}" if counted else shown


def shape_mismatches(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], prefix: str = ""
                     ) -> list[str]:
    """``'<prefix><key>' (file shape) vs expected (model shape)`` for every key of both whose shapes differ."""
    return [f"{prefix + k!r} {tuple(v.shape)} vs expected {tuple(expected[k].shape)}" for k, v in tensors.items()
            if k in expected and v.shape != expected[k].shape]


def read_state_dict(path: str, what: str) -> dict[str, torch.Tensor]:
    """A flat ``{key: tensor}`` from ``path`` (also accepted: that mapping under a lone 'state_dict' or 'model' key),
    read with ``weights_only=True``; ``what`` names the file in errors (e.g. "SegFormer checkpoint")."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"{what} {path!r}: no such file")
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise CheckpointError(f"{what} {path!r}: cannot be read as a state dict with torch.load(weights_only=True): "
                              f"{e}") from e
    if isinstance(obj, dict) and len(obj) == 1 and next(iter(obj)) in ("state_dict", "model"):
        obj = next(iter(obj.values()))
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError(f"{what} {path!r}: expected a mapping of parameter names to tensors (optionally under "
                              f"a single 'state_dict' or 'model' key), got {type(obj).__name__}")
    return obj
