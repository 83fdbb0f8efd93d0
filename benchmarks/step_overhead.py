"""What does the UDA step add around the network's own work? ``step`` vs a bare loop doing the same passes.

    python benchmarks/step_overhead.py                       # synthetic config, CPU (or CUDA when present)
    python benchmarks/step_overhead.py --backbone resnet18 --crop 256 --batch 2 --iters 20
    python benchmarks/step_overhead.py --hrda [--mic]            # an HRDA iteration (METHODS.md §10), + MIC (§12)

Both loops run on the same model, optimiser and batches, interleaved iteration by iteration (A, B, A, B, …) so that
machine noise hits both alike. The bare loop does exactly the network work of one base iteration: student forward
on the source, teacher forward on the target (no grad), student forward on a pre-mixed image, the model's supervised
loss (``seg_loss``) on both, one backward, the optimiser step and the EMA update. ``step`` adds what the platform
does on top: pseudo-labels, ClassMix masks, photometric augmentation of the mixed image, the term registry, metric
extraction with its single device→host copy, the divergence check and the schedule. Prints median times and their
ratio (aim ≤ 1.15×).

``--hrda`` builds the model as an ``HRDASegmenter`` (``model.hrda.enabled``; detail crop = half the crop's shorter
side rounded down to a multiple of 8, window stride half of that, unless ``--detail-crop`` says otherwise). The
bare loop's passes are then HRDA's: the student's training forward (context pass at ×0.5 + detail pass on a random
box + scale attention) on the source and on the pre-mixed image, the teacher's inference forward (context + all
detail windows, batched) on the target, and HRDA's ``seg_loss`` (0.9 fused CE + 0.1 detail CE) on both.
``--mic`` adds MIC's term (``loss.mic.weight`` 1, block size 8 at the synthetic scale) to ``step`` and, to the bare
loop, one more student training forward on a pre-masked target image with its ``seg_loss`` against the teacher's
argmax; the masking and its colour augmentation are what ``step`` adds on top.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from uda_ray.config import apply_overrides, load_config
from uda_ray.models import ema_update, make_teacher
from uda_ray.train.context import upsample
from uda_ray.train.loop import build_model, build_optimizer, build_scheduler, resolve_device, step_settings
from uda_ray.train.step import step
from uda_ray.train.terms import build_terms

BASE = Path(__file__).resolve().parents[1] / "search_spaces" / "base" / "synthetic.yaml"


def bare_iteration(student, teacher, optimizer, src, tgt, x_mix, iteration: int, alpha: float,
                   x_masked: torch.Tensor | None = None) -> None:
    """The passes of one iteration and nothing else; ``x_masked`` (MIC) adds one student pass and its loss."""
    optimizer.zero_grad(set_to_none=True)
    y = src["label"]
    # seg_loss: CE of the logits upsampled to the labels (plain model), 0.9 fused + 0.1 detail CE (HRDA)
    parts = list(student.seg_loss(student(src["image"]), y).values())
    with torch.no_grad():
        pseudo = upsample(teacher(tgt["image"]).logits, y.shape[-2:]).argmax(1)  # (B, H, W)
    parts += student.seg_loss(student(x_mix), pseudo).values()
    if x_masked is not None:
        parts += student.seg_loss(student(x_masked), pseudo).values()
    sum(parts).backward()
    optimizer.step()
    ema_update(teacher, student, iteration, alpha)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", help="override model.backbone")
    p.add_argument("--crop", type=int, help="square crop size (resizes follow)")
    p.add_argument("--batch", type=int, help="images per domain")
    p.add_argument("--iters", type=int, default=30, help="timed iterations per loop")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--hrda", action="store_true", help="HRDA model (model.hrda.enabled) in both loops")
    p.add_argument("--detail-crop", type=int, help="--hrda: model.hrda.detail_crop (default: half the crop's "
                   "shorter side, a multiple of 8); the window stride is half of it")
    p.add_argument("--mic", action="store_true", help="add MIC's term (loss.mic.weight 1) and its student pass")
    args = p.parse_args(argv)

    overrides: dict = {"optim.warmup_iters": 0}
    if args.backbone:
        overrides["model.backbone"] = args.backbone
    if args.crop:
        overrides.update({"data.crop": [args.crop, args.crop], "data.source_resize": [args.crop, args.crop],
                          "data.target_resize": [args.crop, args.crop], "data.val_resize": [args.crop, args.crop]})
    if args.batch:
        overrides["data.batch_size"] = args.batch
    if args.hrda:
        crop = args.crop or min(load_config(BASE).data.crop)
        detail = args.detail_crop or max(crop // 2 // 8 * 8, 8)
        overrides.update({"model.hrda.enabled": True, "model.hrda.detail_crop": detail,
                          "model.hrda.detail_window_stride": max(detail // 2 // 8 * 8, 8)})
    if args.mic:
        # 8 px: the synthetic 96×192 images are ~1/5 of DAFormer's 512×1024, whose MIC blocks are 32 px
        overrides.update({"loss.mic.weight": 1.0, "loss.mic.block_size": 8})
    cfg = apply_overrides(load_config(BASE), overrides)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(cfg.run.device)
    torch.manual_seed(0)
    student = build_model(cfg)
    terms = build_terms(cfg, student)  # the MIC term under --mic, else none (the synthetic config has none on)
    student = student.to(device)
    student.generator = torch.Generator().manual_seed(2)  # HRDA's detail boxes (fit does the same)
    teacher = make_teacher(student)
    optimizer = build_optimizer(cfg, student)
    scheduler = build_scheduler(cfg, optimizer)
    settings = step_settings(cfg, device)
    generator = torch.Generator().manual_seed(0)

    b, (h, w) = cfg.data.batch_size, cfg.data.crop
    g = torch.Generator().manual_seed(1)
    src = {"image": torch.rand(b, 3, h, w, generator=g).to(device),
           "label": torch.randint(0, 19, (b, h, w), generator=g).to(device)}
    tgt = {"image": torch.rand(b, 3, h, w, generator=g).to(device)}
    x_mix = torch.rand(b, 3, h, w, generator=g).to(device)
    x_masked = torch.rand(b, 3, h, w, generator=g).to(device) if args.mic else None

    times: dict[str, list[float]] = {"bare": [], "step": []}
    for it in range(args.warmup + args.iters):
        for name in ("bare", "step"):
            _sync(device)
            t0 = time.perf_counter()
            if name == "bare":
                bare_iteration(student, teacher, optimizer, src, tgt, x_mix, it, settings.ema_alpha, x_masked)
            else:
                step(student, teacher, optimizer, scheduler, src, tgt, it, settings=settings, terms=terms,
                     generator=generator)
            _sync(device)
            if it >= args.warmup:
                times[name].append(time.perf_counter() - t0)

    bare, full = statistics.median(times["bare"]), statistics.median(times["step"])
    print(f"{cfg.model.backbone}, batch {b}+{b}, crop {h}×{w}, {device.type}, threads {torch.get_num_threads()}, "
          f"{args.iters} iterations each (interleaved)")
    hd = cfg.model.hrda
    if hd.enabled or args.mic:
        print("model: " + (f"HRDA (context ×{hd.context_scale}, detail crop {hd.detail_crop}, windows every "
                           f"{hd.detail_window_stride})" if hd.enabled else "plain")
              + (f", MIC (block {cfg.loss.mic.block_size}, mask ratio {cfg.loss.mic.mask_ratio})" if args.mic else ""))
    print(f"bare loop (same forward/backward passes): {1000 * bare:8.1f} ms/iter (median)")
    print(f"uda-ray step:                             {1000 * full:8.1f} ms/iter (median)")
    print(f"ratio step / bare: {full / bare:.3f}  (aim ≤ 1.15: {'PASS' if full / bare <= 1.15 else 'FAIL'})")


if __name__ == "__main__":
    main()
