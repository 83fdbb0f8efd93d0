"""What does running trials through `uda-ray tune` cost over plain Optuna in one process?

    python benchmarks/tune_overhead.py              # 6 tiny trials each way, then the start-up of a DDP trial
    python benchmarks/tune_overhead.py --trials 10 --iterations 20

The same N tiny trials (same search space, sampler and seed, one at a time) run (a) back to back in this process
with Optuna's ask/tell and ``fit`` and (b) through ``run_search`` on a local Ray (started beforehand, so Ray's own
start-up is reported separately). Per-trial overhead = (b − a) / N; the aim in local mode is ≤ 3 s per trial.
Then one trial with ``resources.workers: 1`` (a Ray Train worker group with its own process) against the same
trial with ``workers: 0`` gives the start-up cost of a Train run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import yaml
from _tiny import SYNTHETIC, tiny_run


def tiny(cache: Path, iterations: int) -> dict:
    return tiny_run(cache, iterations, {"data.crop": [32, 32], "data.batch_size": 2, "model.backbone": "test_resnet",
                                        "model.embed_dim": 8, "run.log_every": max(1, iterations // 4)})


def write_space(path: Path, cache: Path, *, trials: int, iterations: int, workers: int) -> Path:
    space = {
        "experiment": "overhead", "base": {"config": str(SYNTHETIC), "overrides": tiny(cache, iterations)},
        "metric": "val/miou", "mode": "max", "sampler": {"type": "tpe", "seed": 0}, "num_samples": trials,
        "max_concurrent": 1, "resources": {"workers": workers, "cpus_per_worker": 1},
        "params": {"teacher.pseudo_threshold": {"uniform": [0.5, 0.95]}, "optim.lr": {"loguniform": [1e-4, 1e-2]}},
    }
    path.write_text(yaml.safe_dump(space))
    return path


def optuna_alone(space_path: Path, work: Path) -> float:
    import optuna

    from uda_ray.train.loop import fit
    from uda_ray.tune.space import build_sampler, define_by_run, load_space, trial_config

    spec = load_space(space_path)
    study = optuna.create_study(direction="maximize", sampler=build_sampler(spec))
    space = define_by_run(spec)
    t0 = time.perf_counter()
    for i in range(spec.num_samples):
        trial = study.ask()
        constants = space(trial)
        cfg = trial_config(spec, {**trial.params, **constants})
        result = fit(cfg, work_dir=work / f"t{i}")
        study.tell(trial, result.metrics["val/miou"])
    return time.perf_counter() - t0


def through_tune(space_path: Path, storage: Path) -> float:
    from uda_ray.tune.search import run_search

    t0 = time.perf_counter()
    run_search(space_path, storage=str(storage))
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=6)
    p.add_argument("--iterations", type=int, default=10)
    args = p.parse_args(argv)

    import ray

    from uda_ray.tune import local_ray

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = tmp / "cache"
        from uda_ray.config import apply_overrides, load_config
        from uda_ray.train.loop import data_roots

        data_roots(apply_overrides(load_config(SYNTHETIC), tiny(cache, args.iterations)))
        space = write_space(tmp / "s.yaml", cache, trials=args.trials, iterations=args.iterations, workers=0)
        t_opt = optuna_alone(space, tmp / "alone")
        t0 = time.perf_counter()
        local_ray.start(num_cpus=2, log_to_driver=False)  # as a search starts one
        t_ray = time.perf_counter() - t0
        t_tune = through_tune(space, tmp / "results")
        one0 = write_space(tmp / "w0.yaml", cache, trials=1, iterations=args.iterations, workers=0)
        one1 = write_space(tmp / "w1.yaml", cache, trials=1, iterations=args.iterations, workers=1)
        t_w0 = through_tune(one0, tmp / "results")
        t_w1 = through_tune(one1, tmp / "results")
        ray.shutdown()

    n = args.trials
    per = (t_tune - t_opt) / n
    print(f"\n{n} tiny trials ({args.iterations} iterations each), one at a time")
    print(f"Optuna alone, one process:   {t_opt:7.1f} s   ({t_opt / n:5.2f} s/trial)")
    print(f"uda-ray tune on local Ray:   {t_tune:7.1f} s   ({t_tune / n:5.2f} s/trial)   ratio {t_tune / t_opt:.2f}×")
    print(f"per-trial overhead: {per:.2f} s (aim ≤ 3 s: {'PASS' if per <= 3 else 'FAIL'}); "
          f"local Ray start-up (once): {t_ray:.1f} s")
    print(f"one trial, workers 0 (in-process): {t_w0:6.1f} s;  workers 1 (Ray Train worker group): {t_w1:6.1f} s;  "
          f"Train start-up cost {t_w1 - t_w0:+.1f} s")


if __name__ == "__main__":
    main()
