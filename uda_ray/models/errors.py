"""Errors of the model layer that callers tell apart (a trial that fails with one is not retried)."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A pretrained or training checkpoint that cannot be read or does not fit the network; the message names the
    file and the keys at fault."""
