"""The global sample stream shared by the train samplers (``loaders.InfiniteSampler``, ``rcs.RareClassSampler``).

A sampler defines what sits at each global stream position ``g`` = 0, 1, 2, ... as a function of (seed, g) (or of
(seed, epoch)) only. Ranks take the global stream in blocks of ``batch_size``, round robin: rank r's stream position
``s`` is global position ``(s div b) * world_size * b + r * b + (s mod b)``, so at step t the ranks together read
exactly the batch one worker with batch ``world_size * b`` reads, in rank order, and ``start`` (a rank's stream
position, i.e. iterations done × batch_size) resumes any rank exactly.
"""

from __future__ import annotations


def check_stream_args(what: str, *, seed: int, rank: int, world_size: int, start: int, batch_size: int) -> None:
    if seed < 0 or start < 0 or batch_size < 1:
        raise ValueError(f"{what}: seed {seed}, start {start}, batch_size {batch_size}: expected seed >= 0, "
                         "start >= 0, batch_size >= 1")
    check_rank(rank, world_size)


def check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} / world_size {world_size}: expected world_size >= 1 and 0 <= rank < world_size")


def global_position(s: int, *, rank: int, world_size: int, batch_size: int) -> int:
    """Global stream position of rank ``rank``'s stream position ``s``."""
    b = batch_size
    return (s // b) * world_size * b + rank * b + s % b
