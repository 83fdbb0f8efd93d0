"""The dtype losses compute in."""

from __future__ import annotations

import torch


def upcast(x: torch.Tensor) -> torch.Tensor:
    """At least float32: half and bfloat16 inputs are promoted, float64 stays float64 (precise reference tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
