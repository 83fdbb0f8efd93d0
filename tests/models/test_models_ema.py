"""EMA teacher: α schedule, hand-computed parameter/buffer blends, no gradients, DDP-style wrappers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from uda_ray.models import build_segmenter, ema_alpha, ema_update, make_teacher


class Wrapper(nn.Module):
    """Stands in for DistributedDataParallel: the real model sits under ``.module``."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))


def _train_student(student: nn.Module, steps: int = 2) -> None:
    """A couple of SGD steps in train mode: parameters and BN statistics (and num_batches_tracked) change."""
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        student.train()(torch.rand(2, 3, 8, 8)).pow(2).mean().backward()
        opt.step()


def test_alpha_schedule() -> None:
    assert ema_alpha(0, 0.999) == 0.0
    assert ema_alpha(1, 0.999) == 0.5
    assert ema_alpha(10, 0.999) == pytest.approx(1 - 1 / 11)
    assert ema_alpha(10, 0.9) == 0.9
    assert ema_alpha(10**6, 0.999) == 0.999
    assert ema_alpha(998, 0.999) == pytest.approx(998 / 999)  # still on the ramp just below the cap
    with pytest.raises(ValueError, match="alpha = 1.0"):
        ema_alpha(5, 1.0)
    with pytest.raises(ValueError, match="iteration = -1"):
        ema_alpha(-1, 0.99)


def test_make_teacher_copies_and_freezes() -> None:
    student = _net()
    _train_student(student)
    assert student[1].num_batches_tracked.item() == 2
    teacher = make_teacher(student)
    assert not teacher.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert all(p.requires_grad and p.grad is not None for p in student.parameters())
    for (k, t), (_, s) in zip(teacher.state_dict().items(), student.state_dict().items()):
        assert t.data_ptr() != s.data_ptr(), k
        torch.testing.assert_close(t, s, rtol=0, atol=0)
    assert student.training  # the student is left as it was


@pytest.mark.parametrize("iteration", [0, 1, 7, 100000])
def test_update_matches_hand_computed_blend(iteration: int) -> None:
    alpha = 0.99
    student = _net()
    teacher = make_teacher(student)
    _train_student(student)  # now student and teacher differ, including BN statistics
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    a = ema_update(teacher, student, iteration, alpha)
    a_ref = min(1 - 1 / (iteration + 1), alpha)
    assert a == pytest.approx(a_ref)
    s_state = student.state_dict()
    for k, t in teacher.state_dict().items():
        if k.endswith("num_batches_tracked"):
            assert t.item() == s_state[k].item() == 2
        else:
            expected = a_ref * before[k] + (1 - a_ref) * s_state[k]
            torch.testing.assert_close(t, expected, rtol=1e-6, atol=1e-7)
    if iteration == 0:
        for k, t in teacher.state_dict().items():
            torch.testing.assert_close(t, s_state[k])


def test_repeated_updates_follow_the_recursion() -> None:
    student = _net()
    teacher = make_teacher(student)
    ref = [p.detach().clone() for p in teacher.parameters()]
    for t in range(1, 6):
        _train_student(student, steps=1)
        ema_update(teacher, student, t, 0.7)
        a = min(1 - 1 / (t + 1), 0.7)
        ref = [a * r + (1 - a) * s.detach() for r, s in zip(ref, student.parameters())]
    for r, p in zip(ref, teacher.parameters()):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)


def test_teacher_gets_no_gradients() -> None:
    student = _net()
    teacher = make_teacher(student)
    _train_student(student)
    ema_update(teacher, student, 3, 0.999)
    out = teacher(torch.rand(1, 3, 8, 8))
    assert not out.requires_grad
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not teacher.training


def test_ddp_like_wrapper() -> None:
    student = _net()
    wrapped = Wrapper(student)
    teacher = make_teacher(wrapped)
    assert not hasattr(teacher, "module")
    assert teacher.state_dict().keys() == student.state_dict().keys()
    _train_student(wrapped)
    reference = make_teacher(student)
    reference.load_state_dict(teacher.state_dict())
    ema_update(teacher, wrapped, 4, 0.9)
    ema_update(reference, student, 4, 0.9)
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, reference.state_dict()[k], rtol=0, atol=0)


def test_mismatched_teacher_is_an_error() -> None:
    student = _net()
    other = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 1))
    with pytest.raises(ValueError, match=r"'3.weight'"):
        ema_update(make_teacher(other), student, 1, 0.9)
    with pytest.raises(ValueError, match="same builder"):
        ema_update(make_teacher(nn.Sequential(nn.Conv2d(3, 4, 3))), student, 1, 0.9)


def test_segmenter_teacher_at_step_zero_predicts_like_student() -> None:
    student = build_segmenter("resnet18", 3, embed_dim=8, proj_dim=4)
    teacher = make_teacher(build_segmenter("resnet18", 3, embed_dim=8, proj_dim=4))
    _ = student.train()(torch.rand(2, 3, 32, 32))  # move the student's BN statistics
    ema_update(teacher, student, 0, 0.999)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        s_out = student.eval()(x)
        t_out = teacher(x)
    torch.testing.assert_close(t_out.logits, s_out.logits)
    torch.testing.assert_close(t_out.proj, s_out.proj)
