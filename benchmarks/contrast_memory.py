"""Peak memory and time of CLUDA's contrast losses, direct N×N form vs anchor-chunked form (forward + backward).

    python benchmarks/contrast_memory.py [--device cpu|cuda] [--chunks 512 1024 2048] [--threads 1]
                                         [--losses pixel multires]

Shape: N = 2 × 65 × 65 = 8450 pixels (batch 2 on the 65×65 grid of METHODS.md §2), D = 256, 19 classes, 5 % ignore
pixels, per-pixel weights (the ClassMix case), τ = 1. Two losses, each direct and at every chunk size:
- ``pixel``: ``pixel_contrast`` (single resolution, §2; chunked = hand-written backward);
- ``multires``: ``multires_pixel_contrast`` (§11: LR–LR and LR–HR terms, learned weights ``att``; the detail crop is
  a 33 × 33 square of each 65 × 65 grid — a 512² crop of the 1024² context — and the HR map a zero canvas outside
  it; chunked = one ``torch.utils.checkpoint`` per anchor block). Gradients w.r.t. lr, hr and att.

How memory is measured (each figure is the peak *extra* memory of one forward + backward over the inputs):
- CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus the memory allocated
  before the call: exactly what the caching allocator handed out to tensors ("peak MiB" and "tensor MiB" agree).
- CPU, "peak MiB": Python's tracemalloc does not see torch's allocations, so each mode runs once in a *fresh
  subprocess* and reports ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (the kernel's high-water mark of the resident
  set) after the call minus the same figure taken just before it, once the inputs exist, torch is loaded and a
  warm-up forward + backward of the same mode on a 2 × 8 × 8 grid has run (so that the kernels' code pages and
  one-time library buffers, ≈ 100 MiB of resident set, are not counted). A fresh process per mode keeps one mode's
  high-water mark (or freed-but-retained heap) from hiding the other's. The figure includes memory the C allocator
  keeps after torch freed it (heap fragmentation), so it overstates what the algorithm holds, most for many
  mid-sized blocks.
- CPU, "tensor MiB": a second forward + backward under a ``TorchDispatchMode`` that adds up the bytes of every
  tensor storage an op creates and subtracts them when the storage is freed: the peak of live tensor memory, the CPU
  counterpart of the CUDA figure.
Timing runs come after the memory probes in the same subprocess (median of ``--repeats``). Each child also saves its
loss and gradients, and the table prints the absolute difference of the loss and the largest absolute difference of
any gradient element against the direct form.

Bar (issue 3 §4): chunked peak memory ≤ 1/4 of direct, chunked time ≤ 2× direct. Judged at ``--bar-chunk``
(default 1024) on "peak MiB" for ``pixel`` as before, and on "tensor MiB" for ``multires``; other chunk sizes are
printed for information.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

N_IMAGES, GRID, DIM, CLASSES = 2, 65, 256, 19
DETAIL = 33  # the detail crop's side on the contrast grid: 512 of 1024 context pixels → 65 · 0.5 rounded up
LOSSES = ("pixel", "multires")


def _inputs(device: str, grid: int = GRID) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n = N_IMAGES * grid * grid
    feats = torch.randn(n, DIM, generator=g).to(device).requires_grad_(True)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.05] = 255
    weights = torch.rand(n, generator=g).to(device)
    return {"feats": feats, "labels": labels.to(device), "weights": weights}


def _multires_inputs(device: str, grid: int = GRID) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n = N_IMAGES * grid * grid
    detail = (DETAIL * grid + GRID - 1) // GRID
    crop = torch.zeros(grid, grid, dtype=torch.bool)
    top = (grid - detail) // 2
    crop[top:top + detail, top:top + detail] = True
    inside = crop.flatten().repeat(N_IMAGES)  # (N,), batch-major like every other input
    lr = torch.randn(n, DIM, generator=g)
    hr = torch.randn(n, DIM, generator=g) * inside[:, None]  # zero canvas outside the detail crop
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.05] = 255
    att, weights = torch.rand(n, generator=g), torch.rand(n, generator=g)
    return {"lr": lr.to(device).requires_grad_(True), "hr": hr.to(device).requires_grad_(True),
            "att": att.to(device).requires_grad_(True), "labels": labels.to(device), "inside": inside.to(device),
            "weights": weights.to(device)}


def _leaves(x: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return [t for t in x.values() if t.requires_grad]


def _run_once(loss_name: str, x: dict[str, torch.Tensor], chunk: int) -> float:
    from uda_ray.losses import multires_pixel_contrast, pixel_contrast

    for t in _leaves(x):
        t.grad = None
    if loss_name == "pixel":
        loss = pixel_contrast(x["feats"], x["labels"], x["weights"], temperature=1.0, chunk_size=chunk or None)
    else:
        loss = multires_pixel_contrast(x["lr"], x["hr"], x["labels"], att=x["att"], inside=x["inside"],
                                       weights=x["weights"], temperature=1.0, chunk_size=chunk or None)
    loss.backward()
    return float(loss.detach())


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of live tensor storages created by ops run under this mode (views and in-place ops add nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if storage.nbytes() and key not in self.live:
                    self.live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)


def measure(loss_name: str, device: str, chunk: int, repeats: int, grads_path: str) -> dict[str, float]:
    """Peak extra memory (MiB) of one forward + backward, then the median time of ``repeats`` more."""
    make = _inputs if loss_name == "pixel" else _multires_inputs
    # warm-up on a tiny grid: loads the kernels' code pages and initialises libraries outside the measured window
    _run_once(loss_name, make(device, grid=8), min(chunk, 16))
    x = make(device)
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loss = _run_once(loss_name, x, chunk)
        _sync(device)
        peak_mib = tensor_mib = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        loss = _run_once(loss_name, x, chunk)
        peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        with LiveTensorBytes() as probe:
            _run_once(loss_name, x, chunk)
        tensor_mib = probe.peak / 2**20
    grads = [t.grad.detach().cpu() for t in _leaves(x)]
    torch.save({"loss": loss, "grads": grads}, grads_path)
    grad_norm = float(torch.cat([g.flatten() for g in grads]).norm())
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        _run_once(loss_name, x, chunk)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return {"peak_mib": peak_mib, "tensor_mib": tensor_mib, "time_s": statistics.median(times), "loss": loss,
            "grad_norm": grad_norm}


def _in_subprocess(loss_name: str, device: str, chunk: int, repeats: int, threads: int,
                   grads_path: Path) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", str(chunk), "--child-loss", loss_name, "--child-grads",
           str(grads_path), "--device", device, "--repeats", str(repeats), "--threads", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark child {' '.join(cmd)} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _differences(direct: Path, other: Path) -> tuple[float, float]:
    """|loss − loss_direct| and the largest |gradient element − direct's|."""
    a, b = torch.load(direct), torch.load(other)
    grad_diff = max(float((ga - gb).abs().max()) for ga, gb in zip(a["grads"], b["grads"]))
    return abs(a["loss"] - b["loss"]), grad_diff


def run_loss(loss_name: str, args: argparse.Namespace, chunks: list[int], tmp: Path) -> None:
    n = N_IMAGES * GRID * GRID
    what = ("pixel_contrast" if loss_name == "pixel"
            else f"multires_pixel_contrast (LR–LR + LR–HR, detail crop {DETAIL}×{DETAIL} per image)")
    print(f"{what} forward+backward, N = {n}, D = {DIM}, device = {args.device}, threads = {args.threads}, "
          f"torch {torch.__version__}")
    results, paths = {}, {}
    for c in [0, *chunks]:
        paths[c] = tmp / f"{loss_name}_{c}.pt"
        results[c] = _in_subprocess(loss_name, args.device, c, args.repeats, args.threads, paths[c])
    direct = results[0]
    header = ("mode", "peak MiB", "tensor MiB", "time s", "mem ratio", "tensor ratio", "time ratio", "loss", "|grad|",
              "|Δloss|", "max|Δgrad|")
    widths = (14, 10, 11, 8, 10, 13, 11, 12, 12, 10, 11)
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, widths)))
    for c, r in results.items():
        name = "direct" if c == 0 else f"chunk {c}"
        d_loss, d_grad = _differences(paths[0], paths[c])
        print(f"{name:>14} {r['peak_mib']:>10.1f} {r['tensor_mib']:>11.1f} {r['time_s']:>8.3f} "
              f"{r['peak_mib'] / direct['peak_mib']:>10.3f} {r['tensor_mib'] / direct['tensor_mib']:>13.3f} "
              f"{r['time_s'] / direct['time_s']:>11.3f} {r['loss']:>12.7f} {r['grad_norm']:>12.7e} "
              f"{d_loss:>10.2e} {d_grad:>11.2e}")
    bar = results[args.bar_chunk]
    key = "peak_mib" if loss_name == "pixel" else "tensor_mib"
    mem_ratio, time_ratio = bar[key] / direct[key], bar["time_s"] / direct["time_s"]
    ok = mem_ratio <= 0.25 and time_ratio <= 2.0
    print(f"bar at chunk {args.bar_chunk}: memory ({'peak' if key == 'peak_mib' else 'tensor'} MiB) "
          f"{mem_ratio:.3f} (≤ 0.25), time {time_ratio:.3f} (≤ 2.0): {'PASS' if ok else 'FAIL'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--chunks", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--bar-chunk", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    parser.add_argument("--losses", choices=LOSSES, nargs="+", default=list(LOSSES))
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-loss", choices=LOSSES, default="pixel", help=argparse.SUPPRESS)
    parser.add_argument("--child-grads", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child is not None:
        print(json.dumps(measure(args.child_loss, args.device, args.child, args.repeats, args.child_grads)))
        return
    chunks = sorted(set(args.chunks) | {args.bar_chunk})
    with tempfile.TemporaryDirectory() as tmp:
        for i, loss_name in enumerate(args.losses):
            if i:
                print()
            run_loss(loss_name, args, chunks, Path(tmp))


if __name__ == "__main__":
    main()
