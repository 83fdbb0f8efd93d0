"""Peak memory of one UDA iteration: the step's sequential backward against one backward of the sum.

    python benchmarks/step_memory.py                          # CPU: DAFormer, HRDA, CLUDA on HRDA at 1/4 size, MiT-B0
    python benchmarks/step_memory.py --full-scale             # CUDA: the papers' sizes, MiT-B5, bf16
    python benchmarks/step_memory.py --full-scale --precision fp32 --recipes daformer hrda

Each recipe is built as ``benchmarks/paper_scale.py`` builds it (its YAML under search_spaces/base/, random weights,
random batches already on the device, no data loading, ``--scale`` shrinking every size). One warm-up iteration
allocates the optimiser's state; then one iteration is measured twice from the same state: with the step as it is
(each group of losses backpropagated as soon as no loss still to come reads its passes: ``uda_ray.train.step``) and
with every loss waiting for one backward of the sum (the step before it backpropagated in groups).

The iteration's peak is the highest amount of memory allocated during the iteration above what was allocated when
it began (weights, optimiser state, teacher): on CUDA ``torch.cuda.max_memory_allocated()`` minus
``memory_allocated()`` before it (the absolute peak is printed too, with the papers' figures at full scale); on CPU
the running sum of the allocations and frees that torch's profiler records from the CPU allocator
(``profile_memory=True``), not the process's resident set, which the allocator keeps after a free. Printed per recipe:
both peaks and their ratio (sequential / one backward; below 1 is memory saved). At 1/8 size the gradients, the
size of the weights, are as large as a pass's activations and hide the difference; 1/4 (the default) shows it.
CLUDA on HRDA reads the source and the mixed pass in one term, so both graphs stay alive until its backward.
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import paper_scale  # noqa: E402 - the recipes, their sizes and random batches

from uda_ray.config import apply_overrides  # noqa: E402
from uda_ray.models import make_teacher  # noqa: E402
from uda_ray.train import step as step_module  # noqa: E402
from uda_ray.train.loop import build_model, build_optimizer, build_scheduler, resolve_device, step_settings  # noqa: E402
from uda_ray.train.terms import build_terms  # noqa: E402

RECIPES = ("daformer", "hrda", "cluda_hrda")
_SEQUENTIAL = step_module._Backward


class _OneBackward(step_module._Backward):
    """Every loss waits for one backward of the sum at the end, as under DDP: the step before it backpropagated in
    groups (the source-only terms computed earlier change no value)."""

    def __init__(self, reads: list[frozenset[str]], *, sequential: bool) -> None:
        super().__init__(reads, sequential=False)


def _cpu_peak(run) -> int:
    """Peak bytes allocated through torch's CPU allocator during ``run()``, above the amount at its start."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    cpu = torch.autograd.DeviceType.CPU
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == cpu)
    now = peak = 0
    for _, nbytes in events:
        now += nbytes
        peak = max(peak, now)
    return peak


def _cuda_peak(run, device: torch.device) -> tuple[int, int]:
    """(peak above the start, absolute peak) in bytes of ``run()`` on a CUDA device."""
    torch.cuda.synchronize(device)
    start = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    run()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return peak - start, peak


def measure(cfg, device: torch.device) -> dict[str, tuple[int, int | None]]:
    """{"sequential" | "one backward": (iteration peak, absolute peak or None)} from the same state."""
    torch.manual_seed(cfg.run.seed)
    student = build_model(cfg, load_pretrained=False)
    terms = nn.ModuleList(build_terms(cfg, student)).to(device)
    student = student.to(device)
    student.generator = torch.Generator().manual_seed(cfg.run.seed)
    teacher = make_teacher(student)
    optimizer = build_optimizer(cfg, student)
    scheduler = build_scheduler(cfg, optimizer)
    settings = step_settings(cfg, device)
    generator = torch.Generator().manual_seed(cfg.run.seed + 1)
    src, tgt = paper_scale.random_batches(cfg, device)
    step_module.step(student, teacher, optimizer, scheduler, src, tgt, 0, settings=settings, terms=terms,
                     generator=generator)  # warm-up: the optimiser's state, the allocator's caches
    state = copy.deepcopy({"student": student.state_dict(), "teacher": teacher.state_dict(),
                           "terms": terms.state_dict(), "optimizer": optimizer.state_dict(),
                           "scheduler": scheduler.state_dict(), "generator": generator.get_state(),
                           "boxes": student.generator.get_state()})
    out = {}
    for mode, backward in (("sequential", _SEQUENTIAL), ("one backward", _OneBackward)):
        for module, key in ((student, "student"), (teacher, "teacher"), (terms, "terms"), (optimizer, "optimizer"),
                            (scheduler, "scheduler")):
            module.load_state_dict(copy.deepcopy(state[key]))
        generator.set_state(state["generator"])
        student.generator.set_state(state["boxes"])
        optimizer.zero_grad(set_to_none=True)
        gc.collect()

        def run() -> None:
            step_module.step(student, teacher, optimizer, scheduler, src, tgt, 1, settings=settings, terms=terms,
                             generator=generator)

        step_module._Backward = backward
        try:
            out[mode] = _cuda_peak(run, device) if device.type == "cuda" else (_cpu_peak(run), None)
        finally:
            step_module._Backward = _SEQUENTIAL
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    p.add_argument("--full-scale", action="store_true", help="the papers' sizes and MiT-B5 (a GPU)")
    p.add_argument("--scale", type=float, default=0.25, help="size factor without --full-scale (default 0.25)")
    p.add_argument("--backbone", default="mit_b0", help="backbone without --full-scale (default mit_b0)")
    p.add_argument("--precision", choices=("bf16", "fp32"), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU (default 1)")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    scale, backbone = (1.0, None) if args.full_scale else (args.scale, args.backbone)
    if args.full_scale and device.type != "cuda":
        p.error("--full-scale needs a CUDA device (the papers' sizes take hours per iteration on a CPU)")
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {args.threads} thread(s)"
    print(f"device {name}, torch {torch.__version__}, precision {precision}, scale {scale}, "
          f"backbone {backbone or 'as the recipe (MiT-B5)'}; one iteration after one warm-up, random data")
    unit = 2 ** 30 if args.full_scale else 2 ** 20
    unit_name = "GiB" if args.full_scale else "MiB"
    print(f"{'recipe':<11} {'crop':>9} {f'sequential {unit_name}':>16} {f'one backward {unit_name}':>18} "
          f"{'ratio':>6}" + ("   absolute peak GiB (seq / one)   published" if device.type == "cuda" else ""))
    for recipe in args.recipes:
        base, source = paper_scale.recipe_config(recipe)
        cfg = apply_overrides(base, paper_scale.run_overrides(base, scale=scale, backbone=backbone,
                                                              precision=precision, device=device.type),
                              source=f"{source} (step_memory overrides)")
        peaks = measure(cfg, device)
        (seq, seq_abs), (one, one_abs) = peaks["sequential"], peaks["one backward"]
        crop = "×".join(map(str, cfg.data.crop))
        line = f"{recipe:<11} {crop:>9} {seq / unit:16.1f} {one / unit:18.1f} {seq / one:6.2f}"
        if seq_abs is not None:
            line += f"   {seq_abs / 2 ** 30:14.1f} / {one_abs / 2 ** 30:.1f}   {paper_scale.RECIPES[recipe].published}"
        print(line, flush=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
