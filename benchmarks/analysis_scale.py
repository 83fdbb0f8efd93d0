"""Scale of the results store and ``analyze``: a generated search of 10,000 trials x 200 metric rows.

    python benchmarks/analysis_scale.py [--trials 10000] [--reports 200] [--workers 2] [--keep DIR]

The experiment is written through the store API as a search leaves it: ``trial_row``, each trial's live files
(``TableFolder.write``, by ``--workers`` processes) compacted into the tables' parts (``TableFolder.compact``, in
the parent while the workers write); generation time is excluded. Each measurement then runs in a fresh Python
process (nothing of the tables in its memory) so that its peak memory (``ru_maxrss``) is its own:
- ``pd.read_parquet`` on the trials and metrics folders (plain pandas: the parts);
- ``load_trials`` + ``load_metrics`` (the parts and the live files, none here);
- the same while a search runs: 1% of the trials rewrote their live files since the last compaction;
- ``analyze``: status, top-10, history, importance (fANOVA on a 200-trial sample, PED-ANOVA on all), plots
  (includes ``load_trials``; a search's analysis reads no metrics).
Printed: seconds, peak RSS, and ratios against the aims (reading the tables < 2 s, analyze < 30 s on 2 cores).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import multiprocessing as mp
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import yaml

EXPERIMENT = "scale_search"
SPACE = {"params": {
    "loss.cluda.weight": {"loguniform": [0.01, 10.0]},
    "loss.cluda.temperature": {"loguniform": [0.05, 1.0]},
    "teacher.pseudo_threshold": {"uniform": [0.8, 0.99]},
    "mix.class_ratio": {"uniform": [0.2, 0.8]},
    "loss.cfcontra.bank_size": {"int": [1, 64], "log": True},
    "optim.name": {"choice": ["adamw", "sgd"]},
}}
CLASSES = ("road", "car", "person")
AIM_LOAD_S, AIM_ANALYZE_S = 2.0, 30.0


def _trial(i: int, n_reports: int) -> tuple[dict, dict, list[dict]]:
    rng = np.random.default_rng(i)
    p = {"loss.cluda.weight": float(10 ** rng.uniform(-2, 1)), "loss.cluda.temperature": float(
        10 ** rng.uniform(math.log10(0.05), 0)), "teacher.pseudo_threshold": float(rng.uniform(0.8, 0.99)),
         "mix.class_ratio": float(rng.uniform(0.2, 0.8)), "loss.cfcontra.bank_size": int(rng.integers(1, 65)),
         "optim.name": str(rng.choice(["adamw", "sgd"]))}
    final = 0.3 + 0.1 * (math.log10(p["loss.cluda.weight"]) + 2) - 0.05 * p["loss.cluda.temperature"]
    final += float(rng.normal(0, 0.01))
    reports = []
    for r in range(1, n_reports + 1):
        rep = {"iteration": r * 50, "train/loss": 2.0 / math.sqrt(r), "train/loss_cluda": 0.5 / r,
               "train/loss_mix": 1.0 / math.sqrt(r), "pseudo/keep_frac": min(1.0, 0.3 + r / n_reports),
               "time/iter_s": float(0.2 + 0.01 * rng.random())}
        if r % 10 == 0:
            rep["val/miou"] = final * r / n_reports
            rep.update({f"val/iou/{c}": final * r / n_reports + k * 0.05 for k, c in enumerate(CLASSES)})
        reports.append(rep)
    return p, {"final": final}, reports


def _write_range(args: tuple[str, int, int, int]) -> int:
    from uda_ray import config as config_mod
    from uda_ray.results import store

    root, start, stop, n_reports = args
    uri = store.experiment_uri(root, EXPERIMENT)
    trials, metrics = store.table_folder(uri, store.TRIALS_DIR), store.table_folder(uri, store.METRICS_DIR)
    base = config_mod.flatten(config_mod.Config())
    for i in range(start, stop):
        p, _, reports = _trial(i, n_reports)
        roll = i % 100
        status = "PRUNED" if roll < 25 else "ERROR" if roll < 28 else "DIVERGED" if roll < 30 else "TERMINATED"
        if status != "TERMINATED":
            reports = reports[: max(1, n_reports // 4)]
        flat = {**base, **p}
        row = store.trial_row(experiment=EXPERIMENT, trial_id=f"trial_{i:05d}", kind="search", status=status,
                              error="RuntimeError: generated" if status == "ERROR" else "", config=flat,
                              overrides=p, reports=reports, metric="val/miou", mode="max",
                              started_at=1.7e9 + 60 * i, ended_at=1.7e9 + 60 * i + 3600)
        trials.write(row["trial_id"], store.trials_table([row]))
        metrics.write(row["trial_id"], store.metrics_table(EXPERIMENT, row["trial_id"], reports))
    return stop - start


def generate(root: str, n_trials: int, n_reports: int, workers: int) -> float:
    from uda_ray.results import store

    t0 = time.perf_counter()
    chunks = [(root, s, min(n_trials, s + 250), n_reports) for s in range(0, n_trials, 250)]
    done = 0
    with mp.get_context("spawn").Pool(workers) as pool:
        for n in pool.imap_unordered(_write_range, chunks):  # the parent compacts as a search's driver does
            done += n
            store.compact(os.path.join(root, EXPERIMENT))
    store.compact(os.path.join(root, EXPERIMENT))
    assert done == n_trials
    Path(root, EXPERIMENT, "search_space.yaml").write_text(yaml.safe_dump(SPACE))
    return time.perf_counter() - t0


def _measure(what: str, path: str) -> dict:
    """Runs inside a fresh process: imports first (not timed), then the measured call."""
    import pandas as pd

    from uda_ray.analysis import analyze
    from uda_ray.results import load_metrics, load_trials

    rss_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    readers = {"load": (load_trials, load_metrics),
               "plain": (lambda p: pd.read_parquet(os.path.join(p, "trials")),
                         lambda p: pd.read_parquet(os.path.join(p, "metrics")))}
    t0 = time.perf_counter()
    if what in readers:
        read_trials, read_metrics = readers[what]
        trials = read_trials(path)
        t1 = time.perf_counter()
        metrics = read_metrics(path)
        out = {"trials_rows": len(trials), "trials_cols": trials.shape[1], "metrics_rows": len(metrics),
               "load_trials_s": t1 - t0, "load_metrics_s": time.perf_counter() - t1}
    else:
        with contextlib.redirect_stdout(io.StringIO()):
            tables = analyze(path)
        out = {"tables": {k: len(v) for k, v in tables.items()}}
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["rss_after_imports_mb"] = rss_imports
    return out


def _run(what: str, path: str) -> dict:
    res = subprocess.run([sys.executable, __file__, "--measure", what, "--path", path], capture_output=True,
                         text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def _touch_some(path: str, fraction: float) -> int:
    """Rewrite the live files of ``fraction`` of the trials (as an ongoing search does between compactions)."""
    from uda_ray.results import store

    ids = pq.read_table(Path(path, "trials"), columns=["trial_id"]).column("trial_id").to_pylist()
    picked = sorted(ids)[:: max(1, int(1 / fraction))]
    for name in (store.TRIALS_DIR, store.METRICS_DIR):
        folder = store.table_folder(path, name)
        for tid in picked:
            folder.write(tid, folder.rows_of(tid))
    return len(picked)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=10_000)
    ap.add_argument("--reports", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--keep", default="", help="generate into (or reuse) this folder instead of a temporary one")
    ap.add_argument("--measure", choices=("plain", "load", "analyze"), help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(_measure(args.measure, args.path)))
        return
    with contextlib.ExitStack() as stack:
        root = args.keep or stack.enter_context(tempfile.TemporaryDirectory(prefix="uda_scale_"))
        path = os.path.join(root, EXPERIMENT)
        if not Path(path, "trials").is_dir():
            gen_s = generate(root, args.trials, args.reports, args.workers)
            print(f"generated {args.trials} trials x {args.reports} reports in {gen_s:.1f} s "
                  f"({args.workers} processes; not part of the measurements)")
        files = {t: len(list(Path(path, t).glob("*.parquet"))) for t in ("trials", "metrics")}
        print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start; "
              f"{files['trials']} trials parts, {files['metrics']} metrics parts")
        results = {"pd.read_parquet (plain pandas)": _run("plain", path), "load_trials + load_metrics":
                   _run("load", path)}
        n = _touch_some(path, 0.01)
        results[f"load_* with {n} live trials (running)"] = _run("load", path)
        results["analyze"] = _run("analyze", path)
        print(f"{'measurement':38s} {'seconds':>8s} {'aim':>6s} {'ratio':>6s} {'peak RSS MB':>12s}  detail")
        for name, r in results.items():
            aim = AIM_ANALYZE_S if name == "analyze" else AIM_LOAD_S
            detail = (f"trials {r['load_trials_s']:.2f} s ({r['trials_rows']} x {r['trials_cols']}), metrics "
                      f"{r['load_metrics_s']:.2f} s ({r['metrics_rows']} rows)" if "load_trials_s" in r
                      else f"tables {r['tables']}")
            print(f"{name:38s} {r['seconds']:8.2f} {aim:6.0f} {r['seconds'] / aim:6.2f} {r['peak_rss_mb']:12.0f}  "
                  f"{detail}")
        print(f"(peak RSS includes {results['analyze']['rss_after_imports_mb']:.0f} MB of imports; "
              f"load average {os.getloadavg()[0]:.1f} at the end)")


if __name__ == "__main__":
    main()
