"""One UDA iteration of the student–teacher base (DACS / DAFormer, METHODS.md §1) plus the registered terms.

    source CE  +  ClassMix CE weighted by the teacher's confidence  +  Σ terms
    → backward → clip → optimiser and schedule step → EMA teacher update

The losses are backpropagated in groups, each as soon as no loss still to come reads a pass it reads
(``_Backward``; a term declares the passes it reads, ``Term.reads``): the source CE with the terms that read only
the source pass (computed right after it), then the mixed pass with its terms, then the other terms, so that on one
device only the graphs of the passes still needed are alive, as in DAFormer's own loop; the gradients are those of
one backward of the sum. Everything the iteration measured comes back as one flat metrics dict.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from uda_ray.adaptation import classmix_masks, mix
from uda_ray.data.photometric import jitter_then_blur
from uda_ray.models import ema_update, unwrap
from uda_ray.train.context import MIX, SRC, TGT, StepContext, make_pseudo_fn
from uda_ray.train.terms import Term


@dataclass(frozen=True)
class StepSettings:
    """The flat knobs of one iteration (built from the config once, by the loop)."""

    num_classes: int
    source_weight: float = 1.0
    mix_weight: float = 1.0
    pseudo_threshold: float = 0.968
    weighting: str = "scalar"
    ignore_top: int = 0
    ignore_bottom: int = 0
    class_ratio: float = 0.5
    mix_prob: float = 1.0
    jitter_strength: float = 0.2
    jitter_prob: float = 0.8
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.15, 1.15)
    ema_alpha: float = 0.999
    grad_clip: float = 0.0
    autocast_dtype: torch.dtype | None = None  # None = full precision
    aux_bn_update: bool = True  # auxiliary student passes update BatchNorm running statistics
    teacher_bn_batch: bool = False  # the teacher's BatchNorm normalises with the target batch's statistics
    mix_entropy_crop_after: int = 0  # HRDA: after this iteration the mixed pass's detail window follows the entropy
    target_labels: bool = False  # the target batch's labels are offline pseudo-labels (data.target_pseudo_labels)


class DivergedError(RuntimeError):
    """The loss became NaN or infinite; the run stops with status ``diverged``."""

    def __init__(self, iteration: int, metrics: dict[str, float]) -> None:
        bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
        super().__init__(f"Diverged at iteration {iteration}: non-finite {', '.join(bad)}")
        self.iteration, self.metrics = iteration, metrics


def _autocast_factory(device: torch.device,
                      dtype: torch.dtype | None) -> Callable[[], contextlib.AbstractContextManager]:
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def _any_rank(flag: bool, device: torch.device) -> bool:
    """True if ``flag`` holds on any rank, so that all ranks stop together instead of deadlocking."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def batches_read(settings: StepSettings, terms: Sequence[Term]) -> tuple[bool, bool]:
    """Whether an iteration reads the source batch and the target batch. A term that reads only the source pass
    (``context.SRC``) uses no target image, one that reads only the target pass (``TGT``) no source image; the
    mixed pass and every other term read both. A source-only warm-up thus draws no target batch and self-training
    on offline target labels no source batch: the loader of the other domain is never asked for one, and so
    never starts its workers (``uda_ray.data.loaders``)."""
    s = settings
    source = s.source_weight > 0 or s.mix_weight > 0 or any(t.reads != {TGT} for t in terms)
    target = s.mix_weight > 0 or s.target_labels or any(t.reads != {SRC} for t in terms)
    return source or not target, target


def step(student: nn.Module, teacher: nn.Module, optimizer: torch.optim.Optimizer,
         scheduler: torch.optim.lr_scheduler.LRScheduler, src: dict[str, Tensor] | None,
         tgt: dict[str, Tensor] | None,
         iteration: int, *, settings: StepSettings, terms: Sequence[Term], generator: torch.Generator,
         ) -> dict[str, float]:
    """Run one iteration in place (student, teacher, optimiser, schedule, term state) and return its metrics.

    ``src`` and ``tgt`` hold ``image`` (B, 3, H, W) in [0, 1] on the student's device; ``src`` also ``label``
    (B, H, W); ``tgt`` may hold ``valid`` (B, H, W) bool, the pixels whose pseudo-labels may count
    (``data.target_pseudo_margins``). Either may be None where ``batches_read`` says the iteration does not read
    it. ``generator`` (CPU) drives ClassMix and the photometric augmentation, so a seed fixes them.
    Raises ``DivergedError`` before any weight changes if a loss is not finite (the losses are backpropagated
    before the check, which only fills ``.grad``).
    """
    s = settings
    student.train()
    x_src, y_src = (src["image"], src["label"]) if src is not None else (None, None)
    x_tgt = tgt["image"] if tgt is not None else None
    autocast = _autocast_factory((x_src if x_src is not None else x_tgt).device, s.autocast_dtype)
    optimizer.zero_grad(set_to_none=True)

    # the source pass, unless nothing reads it (self-training on offline target labels alone: loss.source_weight 0
    # and no term of the source), so that it neither costs a pass nor moves BatchNorm's statistics
    out_src = None
    if s.source_weight > 0 or any(SRC in t.reads for t in terms):
        with autocast():
            out_src = student(x_src)
    model = unwrap(student)
    ctx = StepContext(student=student, teacher=teacher, x_src=x_src, y_src=y_src, x_tgt=x_tgt, out_src=out_src,
                      tgt_valid=tgt.get("valid") if tgt is not None else None,
                      y_tgt=tgt["label"] if s.target_labels and tgt is not None else None,
                      pseudo_fn=make_pseudo_fn(threshold=s.pseudo_threshold, weighting=s.weighting,
                                               ignore_top=s.ignore_top, ignore_bottom=s.ignore_bottom),
                      generator=generator, autocast=autocast, num_classes=s.num_classes,
                      aux_bn_update=s.aux_bn_update, teacher_bn_batch=s.teacher_bn_batch)

    # (name, passes read, losses) in the order they are computed; the model's own supervised loss is CE (+
    # DeepLabV2's auxiliary CE, or HRDA's fused and detail CE)
    source_only = [t for t in terms if t.reads == {SRC}]
    stages: list[tuple[str, frozenset[str], Callable[[], dict[str, Tensor]]]] = [
        *([("src", frozenset({SRC}), lambda: {f"src{part}": s.source_weight * loss
                                              for part, loss in model.seg_loss(out_src, y_src).items()})]
          if out_src is not None else []),
        *((t.name, t.reads, functools.partial(t, ctx)) for t in source_only)]
    if s.mix_weight > 0:
        stages.append(("mix", frozenset({MIX}), lambda: {f"mix{part}": s.mix_weight * loss
                                                         for part, loss in _classmix_loss(ctx, s, iteration).items()}))
    stages += [(t.name, t.reads, functools.partial(t, ctx)) for t in terms if t not in source_only]
    backward = _Backward([reads for _, reads, _ in stages],
                         sequential=not isinstance(student, nn.parallel.DistributedDataParallel))
    computed: dict[str, dict[str, Tensor]] = {}
    for name, _, compute in stages:
        computed[name] = compute()
        backward.add(computed[name])
    # reported in the order of the sum: source, mix, terms
    losses = {k: v for name in ["src", "mix", *(t.name for t in terms)] for k, v in computed.get(name, {}).items()}

    total = sum(v.detach() for v in losses.values())
    names = ["train/loss"] + [f"train/loss_{name}" for name in losses]
    values = [total] + list(losses.values())
    if ctx.has_pseudo:
        names.append("pseudo/keep_frac")
        values.append((ctx.pseudo.confidence >= s.pseudo_threshold).float().mean())
    stacked = torch.stack([v.detach().float() for v in values])  # (M,): one device→host copy for all
    metrics = dict(zip(names, stacked.tolist()))
    if _any_rank(not all(math.isfinite(v) for v in metrics.values()), stacked.device):
        raise DivergedError(iteration, metrics)

    if s.grad_clip > 0:
        metrics["train/grad_norm"] = float(torch.nn.utils.clip_grad_norm_(student.parameters(), s.grad_clip))
    metrics["train/lr"] = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    ema_update(teacher, unwrap(student), iteration, s.ema_alpha)
    return metrics


class _Backward:
    """Backpropagates an iteration's losses in groups. Given the passes each stage's losses read (in the order the
    stages are computed), a computed loss waits while a pass it reads is still to be read by a stage to come, or by
    a waiting loss that shares a pass with it; the others are summed and backpropagated at once, which frees their
    passes' graphs (a term's own passes, read by no other loss, go with its losses). Under DDP (``sequential``
    False) everything waits for one backward at the end: DDP reduces the gradients in the backward that follows its
    forward passes and expects every parameter those passes used to get a gradient there."""

    def __init__(self, reads: list[frozenset[str]], *, sequential: bool) -> None:
        self._to_come = list(reads)
        self._waiting: list[tuple[frozenset[str], Tensor]] = []
        self._sequential = sequential

    def add(self, losses: dict[str, Tensor]) -> None:
        """The losses of the next stage (every stage is added, in order; the last one flushes everything)."""
        reads = self._to_come.pop(0)
        if losses:
            self._waiting.append((reads, sum(losses.values())))
        if not self._sequential and self._to_come:
            return
        blocked: set[str] = set().union(*self._to_come)
        grew = True
        while grew:  # a waiting loss keeps every pass it reads alive: those block the losses that read them too
            grew = False
            for r, _ in self._waiting:
                if r & blocked and not r <= blocked:
                    blocked |= r
                    grew = True
        ready = [loss for r, loss in self._waiting if not r & blocked]
        self._waiting = [(r, loss) for r, loss in self._waiting if r & blocked]
        total = sum(ready)
        if isinstance(total, Tensor) and total.requires_grad:
            total.backward()


def _classmix_loss(ctx: StepContext, s: StepSettings, iteration: int) -> dict[str, Tensor]:
    """ClassMix source→target: paste half the source classes onto the target; the model's supervised loss weighted
    by the teacher's confidence, as named parts (``Segmenter.seg_loss``)."""
    p = ctx.pseudo
    # random draws come from the CPU generator and the pixels stay on the device: same seed, same images anywhere
    mask = classmix_masks(ctx.y_src, ratio=s.class_ratio, prob=s.mix_prob, generator=ctx.generator)  # (B, H, W)
    x = mix(mask, ctx.x_src, ctx.x_tgt)  # (B, 3, H, W)
    y = mix(mask, ctx.y_src, p.labels)  # (B, H, W)
    w = mix(mask, torch.ones_like(p.weights), p.weights)  # (B, H, W)
    x = jitter_then_blur(x, strength=s.jitter_strength, jitter_prob=s.jitter_prob, blur_prob=s.blur_prob,
                         blur_sigma=s.blur_sigma, generator=ctx.generator)
    # the mixed pass's detail window (HRDA; other models ignore it): CLUDA's entropy-guided one after its iteration
    entropy = s.mix_entropy_crop_after > 0 and iteration > s.mix_entropy_crop_after
    with ctx.autocast():
        out = ctx.student(x, detail="entropy" if entropy else "random")
    ctx.extra.update(mix_out=out, mix_labels=y, mix_weights=w)
    return unwrap(ctx.student).seg_loss(out, y, w)
