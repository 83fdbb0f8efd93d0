"""The EMA teacher of student–teacher self-training (DACS, Tranheden et al. WACV 2021; DAFormer; METHODS.md §1).

    θ_T ← α_t θ_T + (1 − α_t) θ_S,        α_t = min(1 − 1/(t+1), α)

At t = 0 the teacher becomes a copy of the student; the ramp keeps an early teacher from averaging over the random
initial weights. The teacher is built by the same builder as the student (a deep copy), receives no gradients and
is kept in eval mode: pseudo-labels come from deterministic predictions (no dropout) normalised with its running
statistics. The training loop must not call ``.train()`` on it.

Buffers: floating-point buffers (BatchNorm running mean/var) follow the same EMA as the parameters; integer buffers
(``num_batches_tracked``) are copied. The teacher's weights are an average over the student's recent history, so its
normalisation statistics are averaged over the same history; copying the student's latest statistics would pair
averaged weights with statistics measured under the newest weights. (DAFormer averages only parameters and leaves
the teacher's BatchNorm in train mode, where batch statistics are used instead.)
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The wrapped module of a DistributedDataParallel-like wrapper (anything with ``.module``), else the model."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


def ema_alpha(iteration: int, alpha: float) -> float:
    """α_t = min(1 − 1/(t+1), α): 0 at t = 0, 0.5 at t = 1, then rising to the cap α."""
    if iteration < 0:
        raise ValueError(f"ema_alpha: iteration = {iteration}: expected >= 0")
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"ema_alpha: alpha = {alpha}: expected 0 <= alpha < 1")
    return min(1.0 - 1.0 / (iteration + 1), alpha)


def make_teacher(student: nn.Module) -> nn.Module:
    """A deep copy of the (unwrapped) student with ``requires_grad=False``, no ``.grad`` and in eval mode.

    Buffers (BatchNorm running statistics) are copied with the weights.
    """
    teacher = copy.deepcopy(unwrap(student))
    for p in teacher.parameters():
        p.requires_grad_(False)
        p.grad = None
    return teacher.eval()


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, iteration: int, alpha: float) -> float:
    """θ_T ← α_t θ_T + (1 − α_t) θ_S over all parameters and floating buffers (integer buffers copied); returns α_t.

    ``student`` may be wrapped (DDP: ``.module`` is used). One fused ``_foreach`` kernel per dtype/device group, since
    this runs every iteration over the whole network (~85 M parameters at paper scale).
    """
    a = ema_alpha(iteration, alpha)
    teacher, student = unwrap(teacher), unwrap(student)
    t_params, s_params = _matched(teacher.named_parameters(), student.named_parameters(), "parameter")
    t_bufs, s_bufs = _matched(teacher.named_buffers(), student.named_buffers(), "buffer")
    t_float = [t for t in t_bufs if t.is_floating_point()]
    s_float = [s for t, s in zip(t_bufs, s_bufs) if t.is_floating_point()]
    t_int = [t for t in t_bufs if not t.is_floating_point()]
    s_int = [s for t, s in zip(t_bufs, s_bufs) if not t.is_floating_point()]
    # lerp(T, S, w) = T + w (S − T) = (1 − w) T + w S with w = 1 − α_t
    if t_params:
        torch._foreach_lerp_(t_params, s_params, 1.0 - a)
    if t_float:
        torch._foreach_lerp_(t_float, s_float, 1.0 - a)
    if t_int:
        torch._foreach_copy_(t_int, s_int)
    return a


def _matched(teacher_items: Iterable[tuple[str, torch.Tensor]], student_items: Iterable[tuple[str, torch.Tensor]],
             kind: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Teacher and student tensors in the same order; their names and shapes must agree."""
    t_items, s_items = list(teacher_items), list(student_items)
    if len(t_items) != len(s_items):
        raise ValueError(f"ema_update: teacher has {len(t_items)} {kind}s, student {len(s_items)}: "
                         "the teacher must be built by the same builder as the student")
    for (tn, t), (sn, s) in zip(t_items, s_items):
        if tn != sn or t.shape != s.shape:
            raise ValueError(f"ema_update: teacher {kind} {tn!r} {tuple(t.shape)} does not match student {kind} "
                             f"{sn!r} {tuple(s.shape)}")
    return [t for _, t in t_items], [s for _, s in s_items]
