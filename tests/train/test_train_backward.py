"""The step's sequential backward: on every recipe (base, each registered term, the toy paper recipes) its gradients,
losses, updated weights and buffers equal those of one backward of the sum (today's iteration, written out below as
the reference); the source pass is backpropagated before the mixed pass is built; a non-finite loss leaves every
weight, the optimiser state and the teacher as they were."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from tests.train.test_train_recipes import PAPER_TOYS, RECIPES, recipe_config
from tests.train.test_train_step import TERM_ON, _cfg
from uda_ray.config import Config
from uda_ray.models import make_teacher, unwrap
from uda_ray.train import step as step_module
from uda_ray.train.context import StepContext, make_pseudo_fn
from uda_ray.train.loop import build_model, build_optimizer, build_scheduler, step_settings
from uda_ray.train.step import DivergedError, StepSettings, _classmix_loss, step
from uda_ray.train.terms import TERMS, build_terms

CPU = torch.device("cpu")


def _single_backward(student, teacher, src, tgt, iteration: int, s: StepSettings, terms, generator) -> dict:
    """The iteration as it was before the sequential backward, up to its one backward: every loss in order (source,
    mix, terms), summed, backpropagated once. Returns the losses' values."""
    student.train()
    autocast = step_module._autocast_factory(CPU, s.autocast_dtype)
    with autocast():
        out_src = student(src["image"])
    model = unwrap(student)
    losses = {f"src{part}": s.source_weight * loss for part, loss in model.seg_loss(out_src, src["label"]).items()}
    ctx = StepContext(student=student, teacher=teacher, x_src=src["image"], y_src=src["label"], x_tgt=tgt["image"],
                      out_src=out_src, tgt_valid=tgt.get("valid"), y_tgt=tgt.get("label"),
                      pseudo_fn=make_pseudo_fn(threshold=s.pseudo_threshold, weighting=s.weighting,
                                               ignore_top=s.ignore_top, ignore_bottom=s.ignore_bottom),
                      generator=generator, autocast=autocast, num_classes=s.num_classes,
                      aux_bn_update=s.aux_bn_update, teacher_bn_batch=s.teacher_bn_batch)
    if s.mix_weight > 0:
        losses.update({f"mix{p}": s.mix_weight * v for p, v in _classmix_loss(ctx, s, iteration).items()})
    for term in terms:
        losses.update(term(ctx))
    sum(losses.values()).backward()
    if s.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(student.parameters(), s.grad_clip)
    return {f"train/loss_{k}": float(v.detach()) for k, v in losses.items()}


def _batches(cfg: Config, seed: int) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    (h, w), (th, tw) = cfg.data.crop, cfg.data.target_crop if cfg.data.target_crop[0] else cfg.data.crop
    classes = 19 if cfg.data.protocol == 19 else 16
    src = {"image": torch.rand(2, 3, h, w, generator=g), "label": torch.randint(0, classes, (2, h, w), generator=g)}
    src["label"][:, :2] = 255
    tgt = {"image": torch.rand(2, 3, th, tw, generator=g)}
    if cfg.data.target_pseudo_labels:
        tgt["label"] = torch.randint(0, classes, (2, th, tw), generator=g)
    return src, tgt


class _Run:
    """Student, teacher, terms, optimiser and generators of one run; ``copy`` gives an identical second run."""

    def __init__(self, cfg: Config) -> None:
        torch.manual_seed(0)
        self.cfg, self.student = cfg, build_model(cfg)
        self.teacher = make_teacher(self.student)
        self.terms = torch.nn.ModuleList(build_terms(cfg, self.student))
        self._optimiser()

    def _optimiser(self) -> None:
        self.opt = build_optimizer(self.cfg, self.student)
        self.sched = build_scheduler(self.cfg, self.opt)
        self.gen = torch.Generator().manual_seed(1)
        self.student.generator = self.gen  # HRDA's detail boxes, as the loop does

    def copy(self) -> _Run:
        other = copy.copy(self)
        other.student, other.teacher, other.terms = (copy.deepcopy(m) for m in (self.student, self.teacher,
                                                                                 self.terms))
        other._optimiser()
        return other

    def sync(self, other: _Run) -> None:
        for mine, theirs in ((self.student, other.student), (self.teacher, other.teacher), (self.terms, other.terms),
                             (self.opt, other.opt), (self.sched, other.sched)):
            mine.load_state_dict(copy.deepcopy(theirs.state_dict()))

    def step(self, src: dict, tgt: dict, iteration: int) -> dict:
        torch.manual_seed(2)  # dropout and drop-path
        return step(self.student, self.teacher, self.opt, self.sched, src, tgt, iteration,
                    settings=step_settings(self.cfg, CPU), terms=self.terms, generator=self.gen)

    def reference(self, src: dict, tgt: dict, iteration: int) -> dict:
        torch.manual_seed(2)
        self.opt.zero_grad(set_to_none=True)
        return _single_backward(self.student, self.teacher, src, tgt, iteration, step_settings(self.cfg, CPU),
                                self.terms, self.gen)


def _configs() -> dict[str, object]:
    """Name -> config (or a builder of one from a cache folder): base, each registered term, the toy recipes."""
    out: dict[str, object] = {"base": _cfg()}
    out.update({f"term:{name}": _cfg(TERM_ON[name][0]) if name in TERM_ON else None for name in TERMS})
    out.update({f"recipe:{name}": name for name in [*RECIPES, *PAPER_TOYS]})
    return out


CONFIGS = _configs()


def _config(key: str, tmp_path: Path) -> Config:
    value = CONFIGS[key]
    assert value is not None, f"{key}: tests/train/test_train_step.py's TERM_ON has no toy settings for this term"
    return recipe_config(tmp_path, value) if isinstance(value, str) else value


@pytest.mark.usefixtures("shallow_resnets")  # DeepLabV2 recipes on shallow ResNet-101s
@pytest.mark.parametrize("key", list(CONFIGS))
def test_sequential_backward_equals_one_backward_of_the_sum(key: str, tmp_path: Path):
    cfg = _config(key, tmp_path)
    ours = _Run(cfg)
    ref = ours.copy()
    src, tgt = _batches(cfg, seed=0)
    banks = copy.deepcopy(ours.terms.state_dict())
    for iteration in (0, 1):
        expected = ref.reference(src, tgt, iteration)
        metrics = ours.step(src, tgt, iteration)
        for name, value in expected.items():
            assert metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-7), (key, name)
        grads = {n: p.grad for n, p in ours.student.named_parameters() if p.grad is not None}
        assert grads.keys() == {n for n, p in ref.student.named_parameters() if p.grad is not None}
        for n, p in ref.student.named_parameters():
            if p.grad is not None:  # float tolerance: the groups' gradients are summed in another order
                scale = float(p.grad.abs().max())
                torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-5 * scale + 1e-12,
                                           msg=lambda m, n=n: f"{key}: grad of {n}: {m}")
        # the same passes in the same order: the same BatchNorm statistics, memory banks and random draws
        weights = {n for n, _ in ours.student.named_parameters()}
        for a, b in ((ours.student, ref.student), (ours.terms, ref.terms)):
            for (n, x), y in zip(a.state_dict().items(), b.state_dict().values()):
                if n not in weights:
                    torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7, msg=lambda m, n=n: f"{key}: {n}: {m}")
        assert torch.equal(ours.gen.get_state(), ref.gen.get_state())
        # a second iteration where a term keeps state that the first one changed (memory banks, class statistics),
        # from the step's states in both (an optimiser step amplifies the rounding of gradients that are ~0: Adam
        # moves every weight by about lr whatever the gradient's size)
        if _same(banks, ours.terms.state_dict()):
            break
        ref.sync(ours)
        src, tgt = _batches(cfg, seed=1)


@pytest.mark.usefixtures("shallow_resnets")  # DeepLabV2 recipes on shallow ResNet-101s
@pytest.mark.parametrize("recipe, backwards", [("daformer", 2), ("mic_hrda", 3), ("cluda_hrda", 1),
                                               ("cfcontra_dlv2", 1), ("target_mix_dlv2", 4)])
def test_each_group_is_backpropagated_once_nothing_to_come_reads_its_passes(
        recipe: str, backwards: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """DAFormer: source CE + FD, then the mixed pass (the source pass's graph is gone before the mixed pass is
    built, as in DAFormer's loop); MIC adds its masked pass; CLUDA reads the source and the mixed pass together and
    CFContra (no mix) the source and the target pass: one backward each; the target-information method: the
    source pass, the mixed pass, the target pass (cross-view terms), its target-to-source mix, one at a time."""
    cfg = recipe_config(tmp_path, recipe)
    calls: list[str] = []
    real_backward, real_mix = torch.Tensor.backward, step_module._classmix_loss
    monkeypatch.setattr(torch.Tensor, "backward", lambda self, *a, **k: calls.append("backward") or
                        real_backward(self, *a, **k))
    monkeypatch.setattr(step_module, "_classmix_loss", lambda *a: calls.append("mixed pass") or real_mix(*a))
    run = _Run(cfg)
    run.step(*_batches(cfg, seed=0), 0)
    assert calls.count("backward") == backwards
    if recipe in ("daformer", "mic_hrda"):
        assert calls[:2] == ["backward", "mixed pass"]


def test_one_backward_under_ddp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A DDP-wrapped student gets one backward of the sum (DDP reduces gradients in the backward after its
    forward passes): the schedule of ``_Backward`` with ``sequential=False``."""
    loss = {"a": torch.ones((), requires_grad=True) * 2}
    calls: list[int] = []
    real = torch.Tensor.backward
    monkeypatch.setattr(torch.Tensor, "backward", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    b = step_module._Backward([frozenset({"src"}), frozenset({"mix"}), frozenset()], sequential=False)
    b.add(loss)
    b.add({"m": torch.ones((), requires_grad=True) * 3})
    assert calls == []
    b.add({})
    assert calls == [1]
    s = step_module._Backward([frozenset({"src"}), frozenset({"mix"}), frozenset()], sequential=True)
    s.add({"a": torch.ones((), requires_grad=True) * 2})
    assert calls == [1, 1]


def test_a_non_finite_loss_leaves_weights_optimiser_and_teacher_untouched(tmp_path: Path):
    """The source group is backpropagated before the mixed pass meets the NaN: only ``.grad`` changed."""
    cfg = recipe_config(tmp_path, "daformer")
    run = _Run(cfg)
    src, tgt = _batches(cfg, seed=0)
    run.step(src, tgt, 0)  # the optimiser has moments, the teacher has moved
    states = {name: copy.deepcopy(m.state_dict()) for name, m in (("student", run.student), ("teacher", run.teacher),
                                                                  ("terms", run.terms))}
    opt_state, sched_state = copy.deepcopy(run.opt.state_dict()), copy.deepcopy(run.sched.state_dict())
    src, tgt = _batches(cfg, seed=1)
    tgt["image"][0, :, :4, :4] = float("nan")
    with pytest.raises(DivergedError, match="non-finite .*train/loss_mix"):
        run.step(src, tgt, 1)
    assert any(p.grad is not None for p in run.student.parameters())  # it did backpropagate the source group
    for name, m in (("student", run.student), ("teacher", run.teacher), ("terms", run.terms)):
        for (k, v), w in zip(m.state_dict().items(), states[name].values()):
            assert torch.equal(v, w) or k.endswith(("running_mean", "running_var", "num_batches_tracked")), (name, k)
    # only the forward passes' BatchNorm statistics moved (as in any forward); the weights did not
    for k, v in run.student.named_parameters():
        assert torch.equal(v, states["student"][k]), k
    assert _same(run.opt.state_dict(), opt_state) and run.sched.state_dict() == sched_state


def _same(a: object, b: object) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b
