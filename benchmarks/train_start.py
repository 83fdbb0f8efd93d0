"""What a short Ray Train run costs with Ray's controller poll interval (2 s) and with uda-ray's (0.5 s).

    python benchmarks/train_start.py                 # 2 rounds of a tiny 2-worker DDP run each way
    python benchmarks/train_start.py --rounds 3 --workers 1

The same tiny run (synthetic pair, 32×64 images, a test ConvNeXt, ``--iterations`` iterations and one evaluation)
goes through ``run_trainer`` on a local Ray (started beforehand) with ``$RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` at Ray's
default and unset (uda-ray's ``TRAIN_POLL_S``), alternating, ``--rounds`` times each. A Train controller notices that
its workers returned only when it polls them, so every run ends some seconds after its training did; what a
multi-worker trial of a search pays on top of its training.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from _tiny import SYNTHETIC, tiny_run

RAY_DEFAULT_POLL_S = "2.0"


def tiny(cache: Path, iterations: int, batch: int) -> dict:
    return tiny_run(cache, iterations, {"data.crop": [32, 64], "data.batch_size": batch,
                                        "model.backbone": "test_convnext", "model.decoder_norm": "group",
                                        "loss.mix_weight": 0.0, "run.log_every": 1, "run.save_images": False})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--iterations", type=int, default=3)
    args = p.parse_args(argv)
    if args.rounds < 1 or args.workers < 1:
        p.error(f"--rounds {args.rounds} / --workers {args.workers}: expected positive numbers")

    import ray

    from uda_ray.config import apply_overrides, load_config
    from uda_ray.train.loop import data_roots
    from uda_ray.train.worker import TRAIN_POLL_ENV, TRAIN_POLL_S, Scaling, run_trainer
    from uda_ray.tune import local_ray

    if TRAIN_POLL_ENV in os.environ:
        p.error(f"${TRAIN_POLL_ENV} is set ({os.environ[TRAIN_POLL_ENV]}): unset it to compare the two intervals")
    with tempfile.TemporaryDirectory(prefix="uda_train_start_") as tmp:
        tmp = Path(tmp)
        cfg = apply_overrides(load_config(SYNTHETIC), tiny(tmp / "cache", args.iterations, 2))
        data_roots(cfg)
        local_ray.start(num_cpus=max(2, args.workers), log_to_driver=False)  # as a search starts one
        times: dict[str, list[float]] = {RAY_DEFAULT_POLL_S: [], TRAIN_POLL_S: []}
        for r in range(args.rounds):
            for poll in (RAY_DEFAULT_POLL_S, TRAIN_POLL_S) if r % 2 == 0 else (TRAIN_POLL_S, RAY_DEFAULT_POLL_S):
                if poll == RAY_DEFAULT_POLL_S:
                    os.environ[TRAIN_POLL_ENV] = poll
                else:
                    os.environ.pop(TRAIN_POLL_ENV, None)  # run_trainer sets uda-ray's own
                t0 = time.perf_counter()
                result = run_trainer(cfg, Scaling(num_workers=args.workers), name=f"r{r}-{poll}",
                                     storage_path=str(tmp / "storage"))
                times[poll].append(time.perf_counter() - t0)
                os.environ.pop(TRAIN_POLL_ENV, None)
                if result.error is not None:
                    raise SystemExit(f"the run failed: {result.error}")
                print(f"  round {r + 1}, poll every {poll} s: {times[poll][-1]:.1f} s", flush=True)
        ray.shutdown()

    slow, fast = statistics.median(times[RAY_DEFAULT_POLL_S]), statistics.median(times[TRAIN_POLL_S])
    print(f"\none Ray Train run, {args.workers} worker(s), {args.iterations} iterations, median of {args.rounds}:")
    print(f"controller polls every {RAY_DEFAULT_POLL_S} s (Ray's default): {slow:6.1f} s")
    print(f"controller polls every {TRAIN_POLL_S} s (uda-ray's):        {fast:6.1f} s")
    print(f"saved per run: {slow - fast:.1f} s; ratio {slow / fast:.2f}×")


if __name__ == "__main__":
    main()
