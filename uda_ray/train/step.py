"""One UDA iteration of the student–teacher base (DACS / DAFormer, METHODS.md §1) plus the registered terms.

    source CE  +  ClassMix CE weighted by the teacher's confidence  +  Σ terms
    → backward → clip → optimiser and schedule step → EMA teacher update

Everything the iteration measured comes back as one flat metrics dict.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from uda_ray.adaptation import classmix_masks, mix
from uda_ray.data.photometric import jitter_then_blur
from uda_ray.models import ema_update, unwrap
from uda_ray.train.context import StepContext, make_pseudo_fn
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


def step(student: nn.Module, teacher: nn.Module, optimizer: torch.optim.Optimizer,
         scheduler: torch.optim.lr_scheduler.LRScheduler, src: dict[str, Tensor], tgt: dict[str, Tensor],
         iteration: int, *, settings: StepSettings, terms: Sequence[Term], generator: torch.Generator,
         ) -> dict[str, float]:
    """Run one iteration in place (student, teacher, optimiser, schedule, term state) and return its metrics.

    ``src`` and ``tgt`` hold ``image`` (B, 3, H, W) in [0, 1] on the student's device; ``src`` also ``label``
    (B, H, W); ``tgt`` may hold ``valid`` (B, H, W) bool, the pixels whose pseudo-labels may count
    (``data.target_pseudo_margins``). ``generator`` (CPU) drives ClassMix and the photometric augmentation, so a
    seed fixes them.
    Raises ``DivergedError`` before any weight changes if a loss is not finite.
    """
    s = settings
    student.train()
    x_src, y_src, x_tgt = src["image"], src["label"], tgt["image"]
    autocast = _autocast_factory(x_src.device, s.autocast_dtype)
    optimizer.zero_grad(set_to_none=True)

    with autocast():
        out_src = student(x_src)
    model = unwrap(student)
    # the model's own supervised loss: CE (+ DeepLabV2's auxiliary CE, or HRDA's fused and detail CE)
    losses: dict[str, Tensor] = {f"src{part}": s.source_weight * loss
                                 for part, loss in model.seg_loss(out_src, y_src).items()}
    ctx = StepContext(student=student, teacher=teacher, x_src=x_src, y_src=y_src, x_tgt=x_tgt, out_src=out_src,
                      tgt_valid=tgt.get("valid"), y_tgt=tgt["label"] if s.target_labels else None,
                      pseudo_fn=make_pseudo_fn(threshold=s.pseudo_threshold, weighting=s.weighting,
                                               ignore_top=s.ignore_top, ignore_bottom=s.ignore_bottom),
                      generator=generator, autocast=autocast, num_classes=s.num_classes,
                      aux_bn_update=s.aux_bn_update, teacher_bn_batch=s.teacher_bn_batch)

    if s.mix_weight > 0:
        losses.update({f"mix{part}": s.mix_weight * loss
                       for part, loss in _classmix_loss(ctx, s, iteration).items()})
    for term in terms:
        losses.update(term(ctx))

    total = sum(losses.values())
    names = ["train/loss"] + [f"train/loss_{name}" for name in losses]
    values = [total] + list(losses.values())
    if ctx.has_pseudo:
        names.append("pseudo/keep_frac")
        values.append((ctx.pseudo.confidence >= s.pseudo_threshold).float().mean())
    stacked = torch.stack([v.detach().float() for v in values])  # (M,): one device→host copy for all
    metrics = dict(zip(names, stacked.tolist()))
    if _any_rank(not all(math.isfinite(v) for v in metrics.values()), stacked.device):
        raise DivergedError(iteration, metrics)

    total.backward()
    if s.grad_clip > 0:
        metrics["train/grad_norm"] = float(torch.nn.utils.clip_grad_norm_(student.parameters(), s.grad_clip))
    metrics["train/lr"] = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    ema_update(teacher, unwrap(student), iteration, s.ema_alpha)
    return metrics


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
