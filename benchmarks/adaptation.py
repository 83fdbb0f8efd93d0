"""Does adaptation work on the built-in synthetic pair? Source-only vs the student–teacher base (and each method).

    python benchmarks/adaptation.py                      # source-only vs base, 3 seeds each
    python benchmarks/adaptation.py --methods            # + one row per method (contrastive, MIC) on the base
    python benchmarks/adaptation.py --only base+mic --seeds 0 --iterations 20   # one row, named (any setting)
    python benchmarks/adaptation.py --seeds 0 --iterations 200   # a quick look
    python benchmarks/adaptation.py --controls --only base base+cfcontra/pass base+sdca/pass
    python benchmarks/adaptation.py --recipe --only base base+rcs base+bn_batch   # DAFormer's recipe parts

Every setting trains the same config (search_spaces/base/synthetic.yaml) for the same iterations with the same
seeds; only the adaptation terms differ. Source mIoU is measured on the first 60 source training images (in-domain
accuracy), target mIoU on the target val split. Runs go two at a time (one thread each) on a process pool.
``--only`` names the rows to run, from every table below whether or not its flag is given.
Prints mean ± std per setting, the domain shift (source-only: source − target mIoU) and each setting's gain over
source-only on the target, with the bars of the foundation issue: shift ≥ 10 points, base gain ≥ 5 points.

``--controls`` adds rows that keep a method's extra student pass over the plain target batch but weight its loss
1e-9: in train mode that pass also moves the BatchNorm running statistics towards the target, so comparing
``base+m/pass`` with ``base`` and ``base+m`` splits a method's gain into the pass and the loss itself.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "search_spaces" / "base" / "synthetic.yaml"

SETTINGS: dict[str, dict] = {
    "source-only": {"loss.mix_weight": 0.0},
    "base": {},
}
METHODS: dict[str, dict] = {  # METHODS.md §6 default weights, on top of the base
    "base+cluda": {"loss.cluda.weight": 1.0, "loss.cluda.fm_size": 17},
    "base+cfcontra": {"loss.cfcontra.weight": 0.001, "loss.entropy.weight": 0.001},
    "base+sdca": {"loss.sdca.weight_feat": 1.0, "loss.sdca.weight_out": 1.0},
    "base+target_mix": {"mix.target_to_source.enabled": True, "mix.target_to_source.weight": 0.1,
                        "loss.cross_view.pixel_weight": 0.01, "loss.cross_view.proto_weight": 0.01},
    # MIC (METHODS.md §12) at λ = 1 and mask ratio 0.7. Its blocks are 32 px at DAFormer's 512×1024 inputs, 1/16 of
    # the image height (64 px at HRDA's full resolution: the same share); the synthetic images are 96×192, so the
    # same share is 6 px, taken as 8: an 8×16 grid of blocks on the 64×128 crop. 16 px would leave 4×8 blocks, of
    # which ~10 are kept, so most images would lose whole objects and the masked view would carry little context.
    "base+mic": {"loss.mic.weight": 1.0, "loss.mic.mask_ratio": 0.7, "loss.mic.block_size": 8},
}

RECIPE: dict[str, dict] = {  # parts of DAFormer's recipe (METHODS.md §9) on top of the base
    # RCS at the synthetic pair's scale: DAFormer's 3000 pixels are 0.33 % of a 1280×720 GTA5 image; 60 of 96×192
    "base+rcs": {"data.rcs.enabled": True, "data.rcs.min_pixels": 60, "data.rcs.min_crop_ratio": 0.5},
    "base+bn_batch": {"teacher.bn_mode": "batch"},  # the teacher's BatchNorm normalises with the target batch
}
RARE = ("train", "bus", "truck", "motorcycle", "rider")  # rare by design in the synthetic pair

CONTROLS: dict[str, dict] = {  # the method's target pass without (in effect) its loss
    "base+cfcontra/pass": {"loss.cfcontra.weight": 1e-9, "loss.entropy.weight": 1e-9},
    "base+sdca/pass": {"loss.sdca.weight_feat": 1e-9, "loss.sdca.weight_out": 1e-9},
}


def run_one(job: tuple[str, dict, int, int | None, list[str]]) -> tuple[str, int, float, float, float, str, dict]:
    """Train one (setting, seed); return target and source mIoU, wall time, status and the target per-class IoU."""
    name, overrides, seed, iterations, common = job
    import torch

    from uda_ray.config import apply_overrides, load_config
    from uda_ray.data.loaders import build_val_loader
    from uda_ray.data.readers import build_dataset
    from uda_ray.data.transforms import EvalTransform
    from uda_ray.train.checkpoint import load_checkpoint
    from uda_ray.train.evaluate import evaluate
    from uda_ray.train.loop import NUM_CLASSES, build_model, data_roots, fit
    from uda_ray.train.run import latest_checkpoint

    torch.set_num_threads(1)
    extra = {**overrides, "run.seed": seed, "run.threads": 1}
    if iterations is not None:
        extra.update({"run.iterations": iterations, "run.eval_every": iterations, "run.checkpoint_every": iterations})
    cfg = apply_overrides(apply_overrides(load_config(BASE), common), extra)
    with tempfile.TemporaryDirectory() as work:
        t0 = time.perf_counter()
        result = fit(cfg, work_dir=work)
        wall = time.perf_counter() - t0
        model = build_model(cfg)
        model.load_state_dict(load_checkpoint(latest_checkpoint(work))["student"])
    src_root, _ = data_roots(cfg)
    src = build_dataset("gta5", src_root, "train", EvalTransform(cfg.data.val_resize), cache_in_memory=True)
    src_miou = evaluate(model, build_val_loader(src, max_images=60), num_classes=NUM_CLASSES,
                        class_ids=range(NUM_CLASSES), device=torch.device("cpu"))["val/miou"]
    per_class = {k.removeprefix("val/iou/"): v for k, v in result.metrics.items() if k.startswith("val/iou/")}
    return name, seed, result.metrics.get("val/miou", float("nan")), src_miou, wall, result.status, per_class


def _fmt(values: list[float]) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:5.1f} ± {100 * std:4.1f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--iterations", type=int, help="override run.iterations of the base config")
    p.add_argument("--methods", action="store_true", help="add one row per method (contrastive terms, MIC)")
    p.add_argument("--controls", action="store_true", help="add the pass-only control rows (see above)")
    p.add_argument("--recipe", action="store_true", help="add the rows base+rcs and base+bn_batch, and the "
                   "per-class IoU of the rare classes")
    p.add_argument("--only", nargs="+", help="run only these settings (from every table, flag or not)")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="overrides for every setting")
    args = p.parse_args(argv)

    settings = dict(SETTINGS, **(METHODS if args.methods else {}), **(RECIPE if args.recipe else {}),
                    **(CONTROLS if args.controls else {}))
    if args.only:
        known = dict(SETTINGS, **METHODS, **RECIPE, **CONTROLS)
        unknown = [k for k in args.only if k not in known]
        if unknown:
            p.error(f"--only: unknown setting(s) {', '.join(unknown)}; expected some of {', '.join(known)}")
        settings = {k: known[k] for k in known if k in args.only}
    jobs = [(name, o, s, args.iterations, args.set) for s in args.seeds for name, o in settings.items()]
    from uda_ray.config import load_config
    from uda_ray.train.loop import data_roots

    data_roots(load_config(BASE, args.set))  # generate the synthetic pair once, before the workers race for it
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(args.processes) as pool:
        rows = list(pool.imap_unordered(run_one, jobs))
    total = time.perf_counter() - t0

    by: dict[str, list[tuple]] = {}
    for r in rows:
        by.setdefault(r[0], []).append(r)
    print(f"\nsynthetic pair, {BASE.name}, iterations {args.iterations or load_config(BASE).run.iterations}, "
          f"seeds {args.seeds}, {total / 60:.1f} min on {args.processes} processes"
          + (f", overrides {' '.join(args.set)}" if args.set else ""))
    print(f"{'setting':<19} {'target mIoU':>13} {'source mIoU':>13} {'gain vs src-only':>17} {'s/run':>7}  status")
    ref = statistics.fmean(r[2] for r in by["source-only"]) if "source-only" in by else None
    for name in settings:
        rs = by.get(name, [])
        if not rs:
            continue
        tgt = [r[2] for r in rs]
        gain = "" if ref is None else f"{100 * (statistics.fmean(tgt) - ref):+17.1f}"
        statuses = ",".join(sorted({r[5] for r in rs}))
        print(f"{name:<19} {_fmt(tgt):>13} {_fmt([r[3] for r in rs]):>13} {gain:>17} "
              f"{statistics.fmean(r[4] for r in rs):7.0f}  {statuses}")
    if args.recipe:
        print("\ntarget IoU of the rare classes (mean ± std over seeds) and their mean")
        print(f"{'setting':<19} " + " ".join(f"{c:>12}" for c in RARE) + f" {'rare mean':>12}")
        for name in settings:
            rs = by.get(name, [])
            if not rs:
                continue
            cells = [_fmt([r[6].get(c, float("nan")) for r in rs]) for c in RARE]
            rare = [statistics.fmean(r[6].get(c, float("nan")) for c in RARE) for r in rs]
            print(f"{name:<19} " + " ".join(f"{c:>12}" for c in cells) + f" {_fmt(rare):>12}")
    ok = True
    if "source-only" in by:
        so = by["source-only"]
        shift = 100 * (statistics.fmean(r[3] for r in so) - statistics.fmean(r[2] for r in so))
        print(f"\ndomain shift (source-only: source − target mIoU): {shift:.1f} points (bar ≥ 10): "
              f"{'PASS' if shift >= 10 else 'FAIL'}")
        ok &= shift >= 10
        if "base" in by:
            gain = 100 * (statistics.fmean(r[2] for r in by["base"]) - ref)
            print(f"adaptation gain (base − source-only, target mIoU): {gain:.1f} points (bar ≥ 5): "
                  f"{'PASS' if gain >= 5 else 'FAIL'}")
            ok &= gain >= 5
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
