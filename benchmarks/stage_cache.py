"""What does sharing a warm-up stage save a search over the stage after it?

    python benchmarks/stage_cache.py                     # 4 trials, 2 at a time, on the synthetic pair
    python benchmarks/stage_cache.py --trials 8 --source-iterations 400

The same search (a chain: a source-only stage, then the student–teacher base started from its best model; the
search samples the second stage's pseudo-label threshold and ClassMix ratio) runs twice on one local Ray: with the
chain's stage cache (the source-only stage is computed once and every trial starts from it) and with
``cache: false`` (every trial computes its own source-only stage). Printed: the number of source-only stage runs,
the total trainer time (the trials' ``wall_s`` summed: what the cluster pays) and the search's wall time, each
with the ratio of the run without sharing to the run with it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC = ROOT / "search_spaces" / "base" / "synthetic.yaml"


def write_chain(folder: Path, *, cache: bool, source_iterations: int, adapt_iterations: int) -> Path:
    common = {"run.threads": 1, "run.save_images": False, "run.log_every": 20, "data.synthetic.num_val": 30}
    chain = {
        "chain": "bench", "seed": 0, "cache": cache,
        "stages": {
            "source": {"kind": "train", "config": str(SYNTHETIC),
                       "overrides": {**common, "loss.mix_weight": 0.0, "run.iterations": source_iterations,
                                     "run.eval_every": source_iterations // 2,
                                     "run.checkpoint_every": source_iterations // 2}},
            "adapt": {"kind": "train", "config": str(SYNTHETIC), "init": {"stage": "source", "checkpoint": "best"},
                      "overrides": {**common, "run.iterations": adapt_iterations, "run.eval_every": adapt_iterations,
                                    "run.checkpoint_every": adapt_iterations, "optim.warmup_iters": 0}},
        },
    }
    path = folder / f"chain_{'shared' if cache else 'private'}.yaml"
    path.write_text(yaml.safe_dump(chain, sort_keys=False))
    return path


def write_space(folder: Path, chain: Path, *, trials: int, concurrent: int) -> Path:
    space = {"experiment": chain.stem, "base": {"config": str(chain)}, "metric": "val/miou", "mode": "max",
             "sampler": {"type": "random", "seed": 0}, "num_samples": trials, "max_concurrent": concurrent,
             "scheduler": {"type": "none"}, "resources": {"workers": 0, "cpus_per_worker": 1},
             "params": {"teacher.pseudo_threshold": {"uniform": [0.8, 0.97]},
                        "mix.class_ratio": {"uniform": [0.3, 0.7]}}}
    path = folder / f"space_{chain.stem}.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def measure(space: Path, storage: Path) -> dict[str, float]:
    from uda_ray.results.store import load_trials
    from uda_ray.stages.cache import RUNS, stages_root
    from uda_ray.tune.search import run_search

    t0 = time.perf_counter()
    out = run_search(space, storage=str(storage))
    wall = time.perf_counter() - t0
    trials = load_trials(out.experiment.uri)
    root = Path(stages_root(str(storage)))  # shared runs under stages/.runs, private ones under stages/.private/*/
    records = [json.loads(p.read_text()) for p in root.rglob(f"{RUNS}/source-*/*.json")]
    return {"stage_runs": sum(r["status"] == "done" for r in records), "trainer_s": float(trials["wall_s"].sum()),
            "search_s": wall, "finished": int((trials["status"] == "TERMINATED").sum()), "trials": len(trials)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--concurrent", type=int, default=2)
    p.add_argument("--source-iterations", type=int, default=200)
    p.add_argument("--adapt-iterations", type=int, default=60)
    args = p.parse_args()

    import ray

    ray.init(address="local", num_cpus=args.concurrent, include_dashboard=False, log_to_driver=False)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="uda-ray-stage-bench-") as tmp:
        folder = Path(tmp)
        for cache in (True, False):
            chain = write_chain(folder, cache=cache, source_iterations=args.source_iterations,
                                adapt_iterations=args.adapt_iterations)
            space = write_space(folder, chain, trials=args.trials, concurrent=args.concurrent)
            rows[cache] = measure(space, folder / f"results_{'shared' if cache else 'private'}")
    ray.shutdown()
    shared, private = rows[True], rows[False]
    print(f"\n{args.trials} trials, {args.concurrent} at a time; source-only stage {args.source_iterations} "
          f"iterations, adaptation stage {args.adapt_iterations} (synthetic pair, CPU)")
    print(f"{'':28}{'shared stage':>14}{'no sharing':>14}{'ratio':>8}")
    print(f"{'source-only stage runs':28}{shared['stage_runs']:>14}{private['stage_runs']:>14}"
          f"{private['stage_runs'] / max(shared['stage_runs'], 1):>8.2f}")
    for key, label in (("trainer_s", "trainer time (sum wall_s)"), ("search_s", "search wall time")):
        print(f"{label:28}{shared[key]:>13.1f}s{private[key]:>13.1f}s{private[key] / shared[key]:>8.2f}")
    print(f"{'finished trials':28}{shared['finished']:>14}{private['finished']:>14}")


if __name__ == "__main__":
    main()
