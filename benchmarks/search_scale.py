"""The platform's cost per trial as a search grows: searches of 20, 100 and 500 tiny trials on a local Ray.

    python benchmarks/search_scale.py                          # sizes 20 100 500, 2 trials at a time
    python benchmarks/search_scale.py --sizes 20 --concurrent 2
    python benchmarks/search_scale.py --sizes 20 100 500 --iterations 4 --concurrent 4 --cpus 4

Each search runs the same tiny trials (synthetic pair, 32×64 images, a 0.4M-parameter model, ``--iterations``
iterations, one evaluation at the end) through ``run_search`` on one local Ray started beforehand (so Ray's own
start-up is not counted), ``--concurrent`` trials at a time, each in-process (``resources.workers: 0``) with one
CPU and one thread. ``--fit-runs`` of the same trial first run back to back in this process with ``fit`` alone: the
trial's own cost, ``t_fit``.

Per search, from the trials table: the fixed cost is the time before the first trial started plus the time after
the last one ended (everything ``run_search`` does once: space, study, Tune's set-up, the first trial's process,
the final compaction, the final tables); the span is from the first start to the last end. With ``c`` trials at a
time a trial holds a slot for its ``fit`` and the platform's work around it, so the overhead per trial is
``c · span / N − t_fit`` (slot-seconds; with one at a time, span / N − t_fit). Aims: at most 1 s per trial, flat in
N (the ratio of the largest to the smallest overhead per trial near 1), and a small fixed cost.

What the fixed cost is made of: before a trial starts, its process (a fresh interpreter that Ray starts) imports
the trainable's module. The benchmark times that import in a fresh process beside the import every trial process
needs whatever the platform (torch with the ``torch._dynamo`` that a torch optimizer's first step loads, and Ray
Tune's function trainable): the difference is uda-ray's share.

What the overhead per trial is made of: the driver's seconds per trial in Tune's experiment snapshots (with
``CheckpointConfig(num_to_keep)`` Tune writes every trial's state at every checkpoint: a cost per checkpoint that
grows with the number of trials), in Optuna (TPE fits its estimators to every finished trial at each suggestion)
and in uda-ray's results callback (parquet rows, compaction, progress lines), timed by wrapping those methods.

uda-ray's share of that growth, without Ray: the same numbers of trials (``--sizes``) driven through uda-ray's results
callback alone, in this process, as Tune calls it (a start, ``--iterations`` reports of as many metrics as a tiny
trial reports, the last with the evaluation, a checkpoint, the end; ``--callback-fit-s`` of sleep per trial for its
training, which spaces the compactions as a search's trials do), with no trial processes competing for the CPUs:
milliseconds per trial at each N, and the ratio between the largest and the smallest.

The Optuna study's storage, side by side: ``--study-trials`` trials of the searcher's calls (ask, two suggestions,
two user attributes, an intermediate value, tell; two trials at a time, TPE as the search samples) against the
journal file a search keeps its study in and against the SQLite file it kept it in before, alternating, twice; and
the time to create each study.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import yaml
from _tiny import SYNTHETIC, tiny_run

AIM_PER_TRIAL_S = 1.0


def tiny(cache: Path, iterations: int) -> dict:
    return tiny_run(cache, iterations, {"data.crop": [32, 32], "data.batch_size": 2, "model.backbone": "test_resnet",
                                        "model.embed_dim": 8, "run.log_every": 1, "run.save_images": False})


def write_space(path: Path, cache: Path, *, trials: int, iterations: int, concurrent: int) -> Path:
    space = {
        "experiment": "scale", "base": {"config": str(SYNTHETIC), "overrides": tiny(cache, iterations)},
        "metric": "val/miou", "mode": "max", "sampler": {"type": "tpe", "seed": 0}, "num_samples": trials,
        "max_concurrent": concurrent, "resources": {"workers": 0, "cpus_per_worker": 1},
        "params": {"teacher.pseudo_threshold": {"uniform": [0.5, 0.95]}, "optim.lr": {"loguniform": [1e-4, 1e-2]}},
    }
    path.write_text(yaml.safe_dump(space))
    return path


def fit_alone(space_path: Path, work: Path, runs: int) -> float:
    """Median seconds of one trial's ``fit`` in this process (the first run, which imports, excluded)."""
    from uda_ray.train.loop import fit
    from uda_ray.tune.space import load_space, trial_config

    spec = load_space(space_path)
    cfg = trial_config(spec, {"teacher.pseudo_threshold": 0.7, "optim.lr": 1e-3})
    times = []
    for i in range(runs + 1):
        t0 = time.perf_counter()
        fit(cfg, work_dir=work / f"fit{i}")
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


# what every trial process imports, whatever the platform: torch, the torch._dynamo that a torch optimizer's first
# step loads, and Ray Tune's function trainable (the class of every trial actor)
FLOOR_IMPORT = ("import torch, ray.tune.trainable.function_trainable; p = torch.nn.Parameter(torch.zeros(1)); "
                "p.grad = torch.zeros(1); torch.optim.AdamW([p]).step()")
# what a trial process of a search imports: the floor and the module of uda-ray's trainable, with what it needs
TRIAL_IMPORT = FLOOR_IMPORT + "; import uda_ray.tune.driver, uda_ray.tune.search"


def study_calls_s(location: str, trials: int) -> tuple[float, float]:
    """Seconds to create a study at ``location`` and per trial of the searcher's calls on it."""
    import optuna

    from uda_ray.tune.search import open_study_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    t0 = time.perf_counter()
    study = optuna.create_study(study_name="s", storage=open_study_storage(location), direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=0, multivariate=True, constant_liar=True))
    t1 = time.perf_counter()
    for i in range(0, trials, 2):
        pair = []
        for j in (i, i + 1):
            trial = study.ask()
            trial.suggest_float("teacher.pseudo_threshold", 0.5, 0.95)
            trial.suggest_float("optim.lr", 1e-4, 1e-2, log=True)
            trial.set_user_attr("trial_id", f"t{j}")
            trial.set_user_attr("experiment", "s")
            pair.append(trial)
        for trial in pair:
            trial.report(trial.params["teacher.pseudo_threshold"], 4)
            study.tell(trial, trial.params["teacher.pseudo_threshold"])
    return t1 - t0, (time.perf_counter() - t1) / trials


def study_storages(tmp: Path, trials: int, rounds: int = 2) -> dict[str, list[tuple[float, float]]]:
    """``study_calls_s`` on the journal and on SQLite, alternating, ``rounds`` times each."""
    from uda_ray.tune.search import SQLITE_STUDY_FILE, STUDY_FILE

    out: dict[str, list[tuple[float, float]]] = {"journal": [], "sqlite": []}
    for r in range(rounds):
        out["journal"].append(study_calls_s(str(tmp / f"{r}{STUDY_FILE}"), trials))
        out["sqlite"].append(study_calls_s(f"sqlite:///{tmp / f'{r}{SQLITE_STUDY_FILE}'}", trials))
    return out


# the numeric metrics of a tiny trial's reports besides "iteration" (train losses and timings, the evaluation's)
REPORT_METRICS = 34


def callback_alone_ms(n: int, cache: Path, work: Path, iterations: int, fit_s: float) -> float:
    """Milliseconds per trial that ``ResultsCallback`` takes for ``n`` trials driven as Tune drives it, in this
    process (the end of the experiment, its last compaction, included)."""
    import contextlib
    import io
    from types import SimpleNamespace

    from uda_ray.config import apply_overrides, load_config
    from uda_ray.tune.callback import ResultsCallback, TrialInfo

    cfg = apply_overrides(load_config(SYNTHETIC), tiny(cache, iterations))
    cb = ResultsCallback(root=str(work), experiment="alone", kind="search", metric="val/miou", mode="max",
                         trial_info=lambda c: TrialInfo(config=cfg, overrides={"optim.lr": c["lr"]}))
    keys = [f"train/m{i}" for i in range(REPORT_METRICS - 1)]
    spent = 0.0

    def call(hook, *args) -> None:
        nonlocal spent
        t0 = time.perf_counter()
        hook(*args)
        spent += time.perf_counter() - t0

    with contextlib.redirect_stdout(io.StringIO()):  # the progress lines are timed, not shown
        for k in range(n):
            trial = SimpleNamespace(trial_id=f"t{k:05d}", config={"lr": 1e-3}, error_file=None, last_result={})
            call(cb.on_trial_start, 0, [], trial)
            for it in range(1, iterations + 1):
                result = {"iteration": it, **{key: 1.0 / it for key in keys}}
                if it == iterations:
                    result["val/miou"] = (k % 17) / 100
                trial.last_result = result
                call(cb.on_trial_result, 0, [], trial, result)
                time.sleep(fit_s / iterations)
            call(cb.on_checkpoint, 0, [], trial, SimpleNamespace(path=str(work / f"ckpt{k}")))
            call(cb.on_trial_complete, 0, [], trial)
        call(cb.on_experiment_end, [])
    return 1000 * spent / n


def fresh_import_s(code: str, runs: int) -> float:
    """Median seconds of a fresh interpreter running ``code`` (its start-up included)."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# the driver's per-trial work, by who does it: (owner, method name)
DRIVER_PARTS = {
    "Tune's snapshots": [("ray.tune.execution.tune_controller:TuneController", "save_to_dir")],
    "Optuna": [("uda_ray.tune.searcher:UdaOptunaSearch", m) for m in ("suggest", "on_trial_result",
                                                                       "on_trial_complete")],
    "uda-ray's callback": [("uda_ray.tune.callback:ResultsCallback", m)
                           for m in ("on_trial_start", "on_trial_result", "on_checkpoint", "on_trial_complete",
                                     "on_trial_error", "on_experiment_end")],
}


@contextlib.contextmanager
def driver_timers() -> Iterator[dict[str, float]]:
    """Seconds the driver spends in each of ``DRIVER_PARTS`` while the block runs (methods wrapped, then restored)."""
    import importlib

    spent: dict[str, float] = defaultdict(float)
    restore = []
    for part, targets in DRIVER_PARTS.items():
        for owner, name in targets:
            module, _, cls_name = owner.partition(":")
            cls = getattr(importlib.import_module(module), cls_name)
            original = cls.__dict__[name]

            def timed(*args, _f=original, _part=part, **kwargs):
                t0 = time.perf_counter()
                try:
                    return _f(*args, **kwargs)
                finally:
                    spent[_part] += time.perf_counter() - t0

            setattr(cls, name, timed)
            restore.append((cls, name, original))
    try:
        yield spent
    finally:
        for cls, name, original in restore:
            setattr(cls, name, original)


def search(space_path: Path, storage: Path) -> dict:
    """Run one search; its wall time, the fixed part and the span of its trials (from the trials table), and the
    driver's seconds in each of ``DRIVER_PARTS``."""
    import uda_ray.analysis  # noqa: F401 - imported by the driver when it ranks the trials; not a per-search cost
    from uda_ray.results import load_trials
    from uda_ray.tune.search import run_search

    with driver_timers() as spent:
        t0 = time.time()
        out = run_search(space_path, storage=str(storage))
        t1 = time.time()
    trials = load_trials(out.experiment.uri)
    first = trials["started_at"].min().timestamp()
    last = trials["ended_at"].max().timestamp()
    return {"n": len(trials), "wall": t1 - t0, "before": first - t0, "after": t1 - last, "span": last - first,
            "statuses": trials["status"].value_counts().to_dict(), "driver": dict(spent)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[20, 100, 500], help="numbers of trials")
    p.add_argument("--iterations", type=int, default=4)
    p.add_argument("--concurrent", type=int, default=2, help="trials at a time")
    p.add_argument("--cpus", type=int, default=0, help="CPUs of the local Ray (default: --concurrent)")
    p.add_argument("--fit-runs", type=int, default=3)
    p.add_argument("--import-runs", type=int, default=3, help="fresh processes timed per import")
    p.add_argument("--study-trials", type=int, default=200, help="trials of the study storages' side by side")
    p.add_argument("--callback-fit-s", type=float, default=0.05,
                   help="seconds of training per trial when the callback is driven alone")
    args = p.parse_args(argv)
    if min(args.sizes) < 1 or args.concurrent < 1:
        p.error(f"--sizes {args.sizes} / --concurrent {args.concurrent}: expected positive numbers")

    import ray

    from uda_ray.config import apply_overrides, load_config
    from uda_ray.train.loop import data_roots
    from uda_ray.tune import local_ray

    with tempfile.TemporaryDirectory(prefix="uda_search_scale_") as tmp:
        tmp = Path(tmp)
        cache = tmp / "cache"
        data_roots(apply_overrides(load_config(SYNTHETIC), tiny(cache, args.iterations)))
        probe = write_space(tmp / "probe.yaml", cache, trials=1, iterations=args.iterations, concurrent=1)
        t_fit = fit_alone(probe, tmp / "alone", args.fit_runs)
        t_floor = fresh_import_s(FLOOR_IMPORT, args.import_runs)
        t_trial = fresh_import_s(TRIAL_IMPORT, args.import_runs)
        storages = study_storages(tmp, args.study_trials)
        alone = {n: callback_alone_ms(n, cache, tmp / f"alone{n}", args.iterations, args.callback_fit_s)
                 for n in args.sizes}
        t0 = time.perf_counter()
        local_ray.start(num_cpus=args.cpus or args.concurrent, log_to_driver=False)  # as a search starts one
        t_ray = time.perf_counter() - t0
        rows = []
        for n in args.sizes:
            space = write_space(tmp / f"s{n}.yaml", cache, trials=n, iterations=args.iterations,
                                concurrent=args.concurrent)
            r = search(space, tmp / "results")
            r["overhead"] = args.concurrent * r["span"] / n - t_fit
            rows.append(r)
            print(f"  N={n}: {r['wall']:.1f} s, statuses {r['statuses']}", flush=True)
        ray.shutdown()

    c = args.concurrent
    print(f"\ntiny trials of {args.iterations} iterations, {c} at a time; fit alone {t_fit:.2f} s per trial; "
          f"local Ray start-up (once, not counted) {t_ray:.1f} s")
    print(f"{'N':>5} {'wall s':>8} {'fixed s':>8} {'(before':>8} {'after)':>7} {'span s':>8} "
          f"{'overhead/trial s':>17} {'aim':>5}")
    for r in rows:
        fixed = r["before"] + r["after"]
        ok = "PASS" if r["overhead"] <= AIM_PER_TRIAL_S else "FAIL"
        print(f"{r['n']:5d} {r['wall']:8.1f} {fixed:8.1f} {r['before']:8.1f} {r['after']:7.1f} {r['span']:8.1f} "
              f"{r['overhead']:17.2f} {ok:>5}")
    if len(rows) > 1:
        per = [max(r["overhead"], 1e-3) for r in rows]
        print(f"overhead per trial, largest / smallest over N = {', '.join(str(r['n']) for r in rows)}: "
              f"{max(per) / min(per):.2f} (flat: near 1)")
    print(f"\nthe fixed cost's share that is a trial process's imports: a fresh process importing what a trial "
          f"process imports {t_trial:.1f} s, of which torch (with torch._dynamo) and Ray Tune's function trainable "
          f"{t_floor:.1f} s and uda-ray's trainable module (uda-ray, torchvision) {t_trial - t_floor:.1f} s "
          f"(median of {args.import_runs}, one process alone; {c} start at once)")
    print("the driver's seconds per trial, by who spends them:")
    parts = list(DRIVER_PARTS)
    print(f"{'N':>5} " + " ".join(f"{p:>20}" for p in parts))
    for r in rows:
        print(f"{r['n']:5d} " + " ".join(f"{r['driver'].get(p, 0.0) / r['n']:20.3f}" for p in parts))
    if len(rows) > 1:
        for p in parts:
            first, last = (rows[0]["driver"].get(p, 0.0) / rows[0]["n"], rows[-1]["driver"].get(p, 0.0) / rows[-1]["n"])
            print(f"  {p}: {last - first:+.3f} s per trial from N = {rows[0]['n']} to {rows[-1]['n']}")
    print(f"uda-ray's callback driven alone (no Ray, no trial processes; {args.callback_fit_s:g} s of training per "
          f"trial): " + ", ".join(f"{alone[n]:.1f} ms" for n in args.sizes) + " per trial at N = "
          + ", ".join(str(n) for n in args.sizes)
          + (f"; largest / smallest {max(alone.values()) / min(alone.values()):.2f}" if len(alone) > 1 else ""))
    print(f"\nthe Optuna study's storage, side by side ({args.study_trials} trials of the searcher's calls, rounds "
          f"alternating):")
    for kind, runs in storages.items():
        print(f"  {kind:8s} create {', '.join(f'{c:.3f}' for c, _ in runs)} s; per trial "
              f"{', '.join(f'{1000 * t:.1f}' for _, t in runs)} ms")
    j, q = (statistics.median(t for _, t in storages[k]) for k in ("journal", "sqlite"))
    print(f"  journal / sqlite per trial: {j / q:.2f}")


if __name__ == "__main__":
    main()
