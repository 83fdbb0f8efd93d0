"""Training checkpoints: everything a resumed run needs to continue exactly as an uninterrupted one.

Student, teacher, optimiser, schedule, the terms' state (memory banks, class statistics), the RNG states that
training draws on (torch's global CPU and CUDA generators for dropout, and the step's mixing generator) and the
iteration. Data order needs no state: the samplers derive it from the seed and the iteration.
Written to a temporary file and renamed, so a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from uda_ray.models import unwrap

FILENAME = "checkpoint.pt"


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(directory: str | Path, *, iteration: int, student: nn.Module, teacher: nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any, terms: nn.ModuleList,
                    generator: torch.Generator, config: dict[str, Any], eval_ema: nn.Module | None = None) -> Path:
    """Write ``<directory>/checkpoint.pt`` atomically and return its path; ``eval_ema`` (``eval.model: ema``'s EMA
    copy of the student) is saved as ``eval_ema`` when given."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        "iteration": iteration,
        "student": unwrap(student).state_dict(),
        "teacher": teacher.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "terms": terms.state_dict(),
        "rng": rng_state(generator),
        "config": config,
    }
    if eval_ema is not None:
        state["eval_ema"] = eval_ema.state_dict()
    path = directory / FILENAME
    tmp = directory / f".{FILENAME}.tmp-{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint file, or the ``checkpoint.pt`` inside a checkpoint folder."""
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint here (expected a {FILENAME} file or a folder holding one)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError) as e:
        raise RuntimeError(f"{path}: cannot read checkpoint: {e}") from e
