"""Peak memory and time of CLUDA's pixel contrast, direct N×N form vs anchor-chunked form (forward + backward).

    python benchmarks/contrast_memory.py [--device cpu|cuda] [--chunks 512 1024 2048] [--threads 1]

Shape: N = 2 × 65 × 65 = 8450 pixels (batch 2 on the 65×65 grid of METHODS.md §2), D = 256, 19 classes, 5 % ignore
pixels, per-pixel weights (the ClassMix case), τ = 1.

How memory is measured (each figure is the peak *extra* memory of one forward + backward over the inputs):
- CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus the memory allocated
  before the call: exactly what the caching allocator handed out to tensors.
- CPU: Python's tracemalloc does not see torch's allocations, so each mode runs once in a *fresh subprocess* and
  reports ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (the kernel's high-water mark of the resident set) after the
  call minus the same figure taken just before it, once the inputs exist and torch is loaded. A fresh process per mode
  keeps one mode's high-water mark (or freed-but-retained heap) from hiding the other's. Timing runs come after the
  memory probe in the same subprocess.

Bar (issue 3 §4): chunked peak memory ≤ 1/4 of direct, chunked time ≤ 2× direct. Judged at ``--bar-chunk``
(default 1024); other chunk sizes are printed for information.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

N_IMAGES, GRID, DIM, CLASSES = 2, 65, 256, 19


def _inputs(device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n = N_IMAGES * GRID * GRID
    feats = torch.randn(n, DIM, generator=g).to(device).requires_grad_(True)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.05] = 255
    weights = torch.rand(n, generator=g).to(device)
    return feats, labels.to(device), weights


def _run_once(feats: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, chunk: int) -> float:
    from uda_ray.losses import pixel_contrast

    feats.grad = None
    loss = pixel_contrast(feats, labels, weights, temperature=1.0, chunk_size=chunk or None)
    loss.backward()
    return float(loss)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(device: str, chunk: int, repeats: int) -> dict[str, float]:
    """Peak extra memory (MiB) of one forward + backward, then the median time of ``repeats`` more."""
    feats, labels, weights = _inputs(device)
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loss = _run_once(feats, labels, weights, chunk)
        _sync(device)
        peak_mib = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        loss = _run_once(feats, labels, weights, chunk)
        peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    grad_norm = float(feats.grad.norm())
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        _run_once(feats, labels, weights, chunk)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return {"peak_mib": peak_mib, "time_s": statistics.median(times), "loss": loss, "grad_norm": grad_norm}


def _in_subprocess(device: str, chunk: int, repeats: int, threads: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", str(chunk), "--device", device, "--repeats", str(repeats),
           "--threads", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark child {' '.join(cmd)} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--chunks", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--bar-chunk", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child is not None:
        print(json.dumps(measure(args.device, args.child, args.repeats)))
        return
    chunks = sorted(set(args.chunks) | {args.bar_chunk})
    n = N_IMAGES * GRID * GRID
    print(f"pixel_contrast forward+backward, N = {n}, D = {DIM}, device = {args.device}, "
          f"threads = {torch.get_num_threads()}, torch {torch.__version__}")
    results = {0: _in_subprocess(args.device, 0, args.repeats, args.threads)}
    for c in chunks:
        results[c] = _in_subprocess(args.device, c, args.repeats, args.threads)
    direct = results[0]
    header = ("mode", "peak MiB", "time s", "mem ratio", "time ratio", "loss", "|grad|")
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, (14, 10, 8, 10, 11, 12, 12))))
    for c, r in results.items():
        name = "direct" if c == 0 else f"chunk {c}"
        print(f"{name:>14} {r['peak_mib']:>10.1f} {r['time_s']:>8.3f} {r['peak_mib'] / direct['peak_mib']:>10.3f} "
              f"{r['time_s'] / direct['time_s']:>11.3f} {r['loss']:>12.7f} {r['grad_norm']:>12.7e}")
    bar = results[args.bar_chunk]
    mem_ratio, time_ratio = bar["peak_mib"] / direct["peak_mib"], bar["time_s"] / direct["time_s"]
    ok = mem_ratio <= 0.25 and time_ratio <= 2.0
    print(f"bar at chunk {args.bar_chunk}: memory {mem_ratio:.3f} (≤ 0.25), time {time_ratio:.3f} (≤ 2.0): "
          f"{'PASS' if ok else 'FAIL'}")


if __name__ == "__main__":
    main()
