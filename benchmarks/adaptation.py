"""Does adaptation work on the built-in synthetic pair? Source-only vs the student–teacher base (and each method).

    python benchmarks/adaptation.py                      # source-only vs base, 3 seeds each
    python benchmarks/adaptation.py --methods            # + one row per method (contrastive, MIC) on the base
    python benchmarks/adaptation.py --only base+mic --seeds 0 --iterations 20   # one row, named (any setting)
    python benchmarks/adaptation.py --seeds 0 --iterations 200   # a quick look
    python benchmarks/adaptation.py --controls --only base base+cfcontra/pass base+sdca/pass
    python benchmarks/adaptation.py --recipe --only base base+rcs base+bn_batch   # DAFormer's recipe parts
    python benchmarks/adaptation.py --chains             # the seeds' chains against their single-stage versions
    python benchmarks/adaptation.py --chains --only ehtdi/scratch ehtdi/from-source --seeds 0 --iterations 20

Every setting trains the same config (search_spaces/base/synthetic.yaml) for the same iterations with the same
seeds; only the adaptation terms differ. Source mIoU is measured on the first 60 source training images (in-domain
accuracy), target mIoU on the target val split. Runs go two at a time (one thread each) on a process pool.
``--only`` names the rows to run, from every table below whether or not its flag is given.
Prints mean ± std per setting, the domain shift (source-only: source − target mIoU) and each setting's gain over
source-only on the target, with the bars of the foundation issue: shift ≥ 10 points, base gain ≥ 5 points.

``--controls`` adds rows that keep a method's extra student pass over the plain target batch but weight its loss
1e-9: in train mode that pass also moves the BatchNorm running statistics towards the target, so comparing
``base+m/pass`` with ``base`` and ``base+m`` splits a method's gain into the pass and the loss itself.

``--chains`` adds the seeds' chains of stages (search_spaces/chains/*_deeplabv2_gta2cs.yaml, issue 19) against their
single-stage versions: EHTDI's stage from scratch vs started from a source-only stage's best model, CFContra's stage
with empty memory banks vs banks started from the centroids of a MinEnt stage's best model, SDCA's contrastive stage
(after its source-only stage and class statistics) without vs with its offline pseudo-labels and self-training stage.
Each stage is the paper's stage structure and method terms on the synthetic base's network, data and optimiser (the
tiny test_resnet, not DeepLabV2-ResNet-101; AdamW, not SGD): the rows compare the stage structure, not the papers'
numbers. EHTDI's stages keep the base's ClassMix (standing for PixMatch's consistency CE) and evaluate the 0.999 EMA
copy; SDCA's and CFContra's switch it off, as their papers have none. Every train stage of a chain runs the base's
iterations (or ``--iterations``), so a chain trains longer in all than its single-stage version; ``its`` says how
long. A row reports its stage's last evaluation.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from uda_ray.config import Config

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

# The seeds' stages on the synthetic base (--chains): each paper's terms, on and off as its stages have them
EHTDI = {"mix.target_to_source.enabled": True, "mix.target_to_source.weight": 0.1,  # the base's ClassMix stands
         "loss.cross_view.pixel_weight": 0.01, "loss.cross_view.proto_weight": 0.01,  # for PixMatch's consistency
         "eval.model": "ema", "eval.ema_alpha": 0.999}
MINENT = {"loss.mix_weight": 0.0, "loss.entropy.weight": 0.001}
CFCONTRA = {**MINENT, "loss.cfcontra.weight": 0.001, "teacher.kind": "nearest_centroid",
            "loss.cfcontra.proj_dim": 96}  # the banks hold the deepest features' width (2048 on ResNet-101)
SDCA_SOURCE = {"loss.mix_weight": 0.0, "loss.lovasz.weight": 0.75}
SDCA = {**SDCA_SOURCE, "loss.sdca.weight_feat": 1.0, "loss.sdca.weight_out": 1.0, "teacher.alpha": 0.0}
SELF_TRAINING = {"loss.mix_weight": 0.0, "loss.source_weight": 0.0, "loss.self_training.weight": 1.0}
BEST = {"checkpoint": "best"}
CHAIN_SPECS: dict[str, dict[str, dict]] = {  # chain name -> its stages (every train stage on BASE)
    "ehtdi_scratch": {"ehtdi": {"kind": "train", "overrides": EHTDI}},
    "ehtdi_chain": {"source": {"kind": "train", "overrides": {"loss.mix_weight": 0.0}},
                    "ehtdi": {"kind": "train", "init": {"stage": "source", **BEST}, "overrides": EHTDI}},
    "cfcontra_empty": {"cfcontra": {"kind": "train", "overrides": CFCONTRA}},
    "cfcontra_chain": {"minent": {"kind": "train", "overrides": MINENT},
                       "centroids": {"kind": "centroids", "model": {"stage": "minent", **BEST},
                                     "options": {"source_batches": 301, "target_batches": 1601, "margin": 0.05}},
                       "cfcontra": {"kind": "train", "centroids": "centroids", "overrides": CFCONTRA}},
    "sdca_chain": {"source": {"kind": "train", "overrides": SDCA_SOURCE},
                   "stats": {"kind": "class_stats", "model": {"stage": "source", **BEST}},
                   "sdca": {"kind": "train", "init": {"stage": "source", **BEST}, "class_stats": "stats",
                            "overrides": SDCA},
                   "labels": {"kind": "pseudo_labels", "model": {"stage": "sdca", **BEST}, "options": {"cap": 0.9}},
                   "self_train": {"kind": "train", "target_labels": "labels", "overrides": SELF_TRAINING}},
}
# row -> (chain, the stage it reports, the row it is compared with)
CHAINS: dict[str, tuple[str, str, str | None]] = {
    "ehtdi/scratch": ("ehtdi_scratch", "ehtdi", None),  # the EHTDI stage alone
    "ehtdi/from-source": ("ehtdi_chain", "ehtdi", "ehtdi/scratch"),  # source-only → EHTDI from its best
    "cfcontra/empty-banks": ("cfcontra_empty", "cfcontra", None),  # the CFContra stage alone
    "cfcontra/centroid-banks": ("cfcontra_chain", "cfcontra", "cfcontra/empty-banks"),  # MinEnt → centroids → CFContra
    "sdca/no-self-training": ("sdca_chain", "sdca", None),  # source-only → class statistics → SDCA
    "sdca/self-training": ("sdca_chain", "self_train", "sdca/no-self-training"),  # … → pseudo-labels → self-training
}


def _source_miou(cfg: Config, state: dict) -> float:
    """mIoU of a model (``cfg``'s network with ``state``) on the first 60 source training images."""
    import torch

    from uda_ray.data.loaders import build_val_loader
    from uda_ray.data.readers import build_dataset
    from uda_ray.data.transforms import EvalTransform
    from uda_ray.train.evaluate import evaluate
    from uda_ray.train.loop import NUM_CLASSES, build_model, data_roots

    model = build_model(cfg)
    model.load_state_dict(state)
    src_root, _ = data_roots(cfg)
    src = build_dataset("gta5", src_root, "train", EvalTransform(cfg.data.val_resize), cache_in_memory=True)
    return evaluate(model, build_val_loader(src, max_images=60), num_classes=NUM_CLASSES,
                    class_ids=range(NUM_CLASSES), device=torch.device("cpu"))["val/miou"]


def run_chain(job: tuple[str, int, int | None, list[str]]) -> list[tuple[str, int, float, float, float, str, dict]]:
    """Run one chain (CHAIN_SPECS) for one seed in a private folder; one result per row of CHAINS that reads it:
    the reported stage's last target mIoU, its source mIoU, the seconds of that stage and its inputs, the status."""
    name, seed, iterations, common = job
    import pandas as pd
    import torch
    import yaml

    from uda_ray.config import parse_override
    from uda_ray.stages import load_chain
    from uda_ray.stages.run import ChainRun
    from uda_ray.train.checkpoint import load_checkpoint
    from uda_ray.train.loop import fit
    from uda_ray.train.run import latest_checkpoint

    torch.set_num_threads(1)
    stages = {n: {**s, "config": str(BASE)} if s["kind"] == "train" else s for n, s in CHAIN_SPECS[name].items()}
    per_stage = {"run.threads": 1, **dict(parse_override(o) for o in common)}
    if iterations is not None:
        per_stage.update({"run.iterations": iterations, "run.eval_every": iterations,
                          "run.checkpoint_every": iterations})
    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"chain": name, "seed": seed, "stages": stages}, sort_keys=False))
        chain = load_chain(path, {f"stages.*.{k}": v for k, v in per_stage.items()})
        runner = ChainRun(chain, str(Path(work) / "results"), who=f"bench/{seed}", log=lambda _: None)
        t0 = time.perf_counter()
        prepared = runner.prepare()
        result = fit(prepared.config, work_dir=Path(work) / "final")
        final_s = time.perf_counter() - t0 - sum(runner.cache.manifest(prepared.uris[s])["seconds"]
                                                 for s in chain.ancestors(chain.final.name)
                                                 if chain.stage(s).kind != "checkpoint")
        rows = []
        for row, (chain_name, stage, _) in CHAINS.items():
            if chain_name != name:
                continue
            needed = [*chain.ancestors(stage), stage]
            seconds = sum(final_s if s == chain.final.name else runner.cache.manifest(prepared.uris[s])["seconds"]
                          for s in needed)
            if stage == chain.final.name:
                metrics, status = result.metrics, result.status
                state = load_checkpoint(latest_checkpoint(Path(work) / "final"))
                cfg = prepared.config
            else:
                folder = Path(prepared.uris[stage])
                table = pd.read_parquet(folder / "metrics.parquet")
                metrics = table[table["val/miou"].notna()].iloc[-1].to_dict()
                status = "completed"  # a train stage is published only when its run completed
                state = torch.load(folder / "last.pt", weights_only=True)
                cfg = runner.stage_config(stage, prepared.uris)
            evaluated = state.get("eval_ema") or state["student"]  # eval.model ema: the EMA copy was evaluated
            per_class = {k.removeprefix("val/iou/"): v for k, v in metrics.items() if k.startswith("val/iou/")}
            rows.append((row, seed, float(metrics.get("val/miou", float("nan"))), _source_miou(cfg, evaluated),
                         seconds, status, per_class))
    return rows


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


CHAIN_JOB = "<chain>"


def run_job(job: tuple) -> list[tuple[str, int, float, float, float, str, dict]]:
    """A pool job: one chain (``(CHAIN_JOB, chain, seed, iterations, overrides)``) or one setting."""
    return run_chain(job[1:]) if job[0] == CHAIN_JOB else [run_one(job)]


def _needed(spec: dict[str, dict], stage: str) -> set[str]:
    """``stage`` and every stage of ``spec`` it reads, directly or not."""
    needed, todo = set(), [stage]
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            refs = (spec[name].get(role) for role in ("init", "model", "class_stats", "centroids", "target_labels"))
            todo += [r if isinstance(r, str) else r["stage"] for r in refs if r is not None]
    return needed


def _print_chains(rows: dict[str, tuple[str, str, str | None]], by: dict[str, list[tuple]], iterations: int) -> None:
    print(f"\nthe seeds' chains and their single-stage versions (the synthetic base's network and optimiser, not "
          f"DeepLabV2-ResNet-101: the stage structure compared, not the papers; {iterations} iterations per train "
          "stage; its = the iterations of every train stage the row needs)")
    print(f"{'row':<27} {'its':>6} {'target mIoU':>13} {'source mIoU':>13} {'vs single stage':>16} {'s/run':>7}"
          "  status")
    for name, (chain, stage, versus) in rows.items():
        rs = by.get(name, [])
        if not rs:
            continue
        spec = CHAIN_SPECS[chain]
        its = iterations * sum(spec[s]["kind"] == "train" for s in _needed(spec, stage))
        tgt = [r[2] for r in rs]
        gain = ""
        if versus in by:
            gain = f"{100 * (statistics.fmean(tgt) - statistics.fmean(r[2] for r in by[versus])):+16.1f}"
        statuses = ",".join(sorted({r[5] for r in rs}))
        print(f"{name:<27} {its:>6} {_fmt(tgt):>13} {_fmt([r[3] for r in rs]):>13} {gain:>16} "
              f"{statistics.fmean(r[4] for r in rs):7.0f}  {statuses}")


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
    p.add_argument("--chains", action="store_true", help="add the seeds' chains and their single-stage versions "
                   "(see above)")
    p.add_argument("--only", nargs="+", help="run only these settings (from every table, flag or not)")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="overrides for every setting")
    args = p.parse_args(argv)

    settings = dict(SETTINGS, **(METHODS if args.methods else {}), **(RECIPE if args.recipe else {}),
                    **(CONTROLS if args.controls else {}))
    chain_rows = dict(CHAINS) if args.chains else {}
    if args.only:
        known = dict(SETTINGS, **METHODS, **RECIPE, **CONTROLS)
        unknown = [k for k in args.only if k not in known and k not in CHAINS]
        if unknown:
            p.error(f"--only: unknown setting(s) {', '.join(unknown)}; expected some of "
                    f"{', '.join([*known, *CHAINS])}")
        settings = {k: known[k] for k in known if k in args.only}
        chain_rows = {k: v for k, v in CHAINS.items() if k in args.only}
    jobs: list[tuple] = [(name, o, s, args.iterations, args.set) for s in args.seeds for name, o in settings.items()]
    chains = sorted({c for c, _, _ in chain_rows.values()}, key=list(CHAIN_SPECS).index)
    jobs += [(CHAIN_JOB, c, s, args.iterations, args.set) for s in args.seeds for c in chains]
    from uda_ray.config import load_config
    from uda_ray.train.loop import data_roots

    data_roots(load_config(BASE, args.set))  # generate the synthetic pair once, before the workers race for it
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(args.processes) as pool:
        rows = [r for rs in pool.imap_unordered(run_job, jobs) for r in rs]
    total = time.perf_counter() - t0

    by: dict[str, list[tuple]] = {}
    for r in rows:
        by.setdefault(r[0], []).append(r)
    print(f"\nsynthetic pair, {BASE.name}, iterations {args.iterations or load_config(BASE).run.iterations}, "
          f"seeds {args.seeds}, {total / 60:.1f} min on {args.processes} processes"
          + (f", overrides {' '.join(args.set)}" if args.set else ""))
    if settings:
        print(f"{'setting':<19} {'target mIoU':>13} {'source mIoU':>13} {'gain vs src-only':>17} {'s/run':>7}  "
              "status")
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
    if chain_rows:
        _print_chains(chain_rows, by, args.iterations or load_config(BASE).run.iterations)
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
