"""What does the UDA step add around the network's own work? ``step`` vs a bare loop doing the same passes.

    python benchmarks/step_overhead.py                       # synthetic config, CPU (or CUDA when present)
    python benchmarks/step_overhead.py --backbone resnet18 --crop 256 --batch 2 --iters 20

Both loops run on the same model, optimiser and batches, interleaved iteration by iteration (A, B, A, B, …) so that
machine noise hits both alike. The bare loop does exactly the network work of one base iteration: student forward
on the source, teacher forward on the target (no grad), student forward on a pre-mixed image, the two CE losses,
one backward, the optimiser step and the EMA update. ``step`` adds what the platform does on top: pseudo-labels,
ClassMix masks, photometric augmentation of the mixed image, the term registry, metric extraction with its single
device→host copy, the divergence check and the schedule. Prints median times and their ratio (aim ≤ 1.15×).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from uda_ray.config import apply_overrides, load_config
from uda_ray.losses import cross_entropy
from uda_ray.models import ema_update, make_teacher
from uda_ray.train.context import upsample
from uda_ray.train.loop import build_model, build_optimizer, build_scheduler, resolve_device, step_settings
from uda_ray.train.step import step

BASE = Path(__file__).resolve().parents[1] / "search_spaces" / "base" / "synthetic.yaml"


def bare_iteration(student, teacher, optimizer, src, tgt, x_mix, iteration: int, alpha: float) -> None:
    optimizer.zero_grad(set_to_none=True)
    y = src["label"]
    loss = cross_entropy(upsample(student(src["image"]).logits, y.shape[-2:]), y)
    with torch.no_grad():
        pseudo = upsample(teacher(tgt["image"]).logits, y.shape[-2:]).argmax(1)
    loss = loss + cross_entropy(upsample(student(x_mix).logits, y.shape[-2:]), pseudo)
    loss.backward()
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
    args = p.parse_args(argv)

    overrides: dict = {"optim.warmup_iters": 0}
    if args.backbone:
        overrides["model.backbone"] = args.backbone
    if args.crop:
        overrides.update({"data.crop": [args.crop, args.crop], "data.source_resize": [args.crop, args.crop],
                          "data.target_resize": [args.crop, args.crop], "data.val_resize": [args.crop, args.crop]})
    if args.batch:
        overrides["data.batch_size"] = args.batch
    cfg = apply_overrides(load_config(BASE), overrides)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(cfg.run.device)
    torch.manual_seed(0)
    student = build_model(cfg).to(device)
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

    times: dict[str, list[float]] = {"bare": [], "step": []}
    for it in range(args.warmup + args.iters):
        for name in ("bare", "step"):
            _sync(device)
            t0 = time.perf_counter()
            if name == "bare":
                bare_iteration(student, teacher, optimizer, src, tgt, x_mix, it, settings.ema_alpha)
            else:
                step(student, teacher, optimizer, scheduler, src, tgt, it, settings=settings, terms=[],
                     generator=generator)
            _sync(device)
            if it >= args.warmup:
                times[name].append(time.perf_counter() - t0)

    bare, full = statistics.median(times["bare"]), statistics.median(times["step"])
    print(f"{cfg.model.backbone}, batch {b}+{b}, crop {h}×{w}, {device.type}, threads {torch.get_num_threads()}, "
          f"{args.iters} iterations each (interleaved)")
    print(f"bare loop (same forward/backward passes): {1000 * bare:8.1f} ms/iter (median)")
    print(f"uda-ray step:                             {1000 * full:8.1f} ms/iter (median)")
    print(f"ratio step / bare: {full / bare:.3f}  (aim ≤ 1.15: {'PASS' if full / bare <= 1.15 else 'FAIL'})")


if __name__ == "__main__":
    main()
