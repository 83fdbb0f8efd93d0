"""A ``train`` stage: one run of its config, resumable, whose last and best models later stages start from.

Output: ``last.pt`` (the model at the end), ``best.pt`` (the model at the evaluation with the highest ``val/miou``:
SDCA's ``model_best.pth`` is chosen this way, which is a selection on the val split), ``metrics.parquet`` (one row
per report) and ``config.yaml``. A model file holds ``iteration``, ``student``, ``teacher``, ``config`` and the
metrics of its evaluation: ``uda-ray evaluate`` reads it like a training checkpoint, and ``model.init_from`` loads it.

The run trains in the stage's work folder and resumes from its newest checkpoint there, so a stage killed half way
continues exactly where it stopped; its best model so far is kept beside (``best.pt`` + ``best.json``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from uda_ray.config import Config, save_config
from uda_ray.stages.chain import StageFailed
from uda_ray.stages.kinds import StageJob
from uda_ray.train.checkpoint import load_checkpoint
from uda_ray.train.loop import DistInfo, FitResult, fit
from uda_ray.train.run import MetricsFile, checkpoint_iteration, latest_checkpoint

if TYPE_CHECKING:
    from uda_ray.train.worker import Scaling

BEST_METRIC = "val/miou"
MODEL_KEYS = ("iteration", "student", "teacher", "config")
TRAINING_STATE = ("optimizer", "scheduler", "rng")  # what a model file leaves out of a training checkpoint


def save_model(checkpoint_dir: Path, dest: Path, metrics: dict[str, float] | None = None) -> None:
    """Write the model of a training checkpoint (no optimiser, schedule or RNG state) to ``dest`` atomically."""
    state = load_checkpoint(checkpoint_dir)
    model = {k: v for k, v in state.items() if k not in TRAINING_STATE}
    model["metrics"] = dict(metrics or {})
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    torch.save(model, tmp)
    os.replace(tmp, dest)


def _best_so_far(work_dir: Path) -> tuple[float, int]:
    path = work_dir / "best.json"
    if not path.is_file():
        return -math.inf, -1
    d = json.loads(path.read_text())
    return float(d["value"]), int(d["iteration"])


def train_in(cfg: Config, work_dir: Path, *, progress: bool = False, log=print, name: str = "",
             device: torch.device | None = None) -> FitResult:
    """Train ``cfg`` in ``work_dir``, resuming from its newest checkpoint, keeping ``best.pt`` and
    ``metrics.parquet`` there (rank 0 writes; every rank trains). Usable on Ray Train workers."""
    rank = DistInfo.current().rank
    ckpt = latest_checkpoint(work_dir)
    best, best_it = _best_so_far(work_dir)
    table = MetricsFile(work_dir / "metrics.parquet", name or work_dir.name, resume_from=ckpt if rank == 0 else None)
    if ckpt is not None:
        done = checkpoint_iteration(ckpt)
        # killed between the checkpoint of a best evaluation and the copy of it: that checkpoint is the newest
        for r in table.rows:
            if r.get(BEST_METRIC, -math.inf) > best and int(r["iteration"]) == done:
                save_model(ckpt, work_dir / "best.pt", r)
                best, best_it = r[BEST_METRIC], done
                (work_dir / "best.json").write_text(json.dumps({"value": best, "iteration": best_it}))

    def report(metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        nonlocal best, best_it
        if rank != 0:
            return
        table.append(metrics)
        value = metrics.get(BEST_METRIC)
        if value is None:
            return
        it = int(metrics["iteration"])
        if checkpoint_dir is not None and math.isfinite(value) and value > best:
            save_model(checkpoint_dir, work_dir / "best.pt", metrics)
            best, best_it = value, it
            (work_dir / "best.json").write_text(json.dumps({"value": best, "iteration": best_it}))
        log(f"[stage {name}] iteration {it}: {BEST_METRIC} {100 * value:.2f} (best {100 * best:.2f} at {best_it})")

    if rank == 0:
        save_config(cfg, work_dir / "config.yaml")
    if ckpt is not None:
        log(f"[stage {name}] resuming from {ckpt}")
    return fit(cfg, work_dir=work_dir, report=report, resume_from=ckpt, progress=progress, device=device)


def run(job: StageJob) -> dict[str, Any]:
    train = job.train_fn or (lambda cfg, work: train_in(cfg, work, progress=job.progress, log=job.log,
                                                        name=job.name))
    before = latest_checkpoint(job.work_dir)  # a computation that was killed half way continues from here
    result = train(job.config, job.work_dir)
    if result.status != "completed":
        raise StageFailed(f"stage '{job.name}' did not finish: {result.status} at iteration {result.iteration}"
                          + (f": {result.error}" if result.error else ""))
    last = latest_checkpoint(job.work_dir)
    if last is None:
        raise StageFailed(f"stage '{job.name}': no checkpoint in {job.work_dir} after training")
    save_model(last, job.out_dir / "last.pt", result.metrics)
    best, best_it = _best_so_far(job.work_dir)
    if (job.work_dir / "best.pt").is_file():
        os.replace(job.work_dir / "best.pt", job.out_dir / "best.pt")
    else:  # no finite val/miou was ever reported: the last model stands in
        save_model(last, job.out_dir / "best.pt", result.metrics)
    os.replace(job.work_dir / "metrics.parquet", job.out_dir / "metrics.parquet")
    save_config(job.config, job.out_dir / "config.yaml")
    return {"iterations": result.iteration, "resumed_from": checkpoint_iteration(before) if before else 0,
            "last": {k: v for k, v in result.metrics.items()
                                                     if k.startswith(("val/", "holdout/", "iteration"))},
            "best": {"metric": BEST_METRIC, "value": best if math.isfinite(best) else None, "iteration": best_it}}


def stage_fn_per_worker(loop_config: dict[str, Any]) -> None:
    """Body of every Ray Train worker of a chain's train stage: ``train_in`` in the stage's work folder (resuming from
    its newest checkpoint there; rank 0 writes). Nothing is reported to Train: the stage's result is read from the
    work folder (``_finished_in``)."""
    import ray.train.torch

    from uda_ray.config import from_dict
    from uda_ray.train.worker import raise_if_diverged

    cfg = from_dict(loop_config["config"], source="ray train loop config (stage)")
    raise_if_diverged(train_in(cfg, Path(loop_config["work_dir"]), name=loop_config["name"],
                               device=ray.train.torch.get_device()))


def stage_trainer(scaling: Scaling, storage_path: str) -> Callable[[Config, Path], FitResult]:
    """The ``train_fn`` of a chain's train stages in a trial with Ray Train workers: the stage trains on as many
    workers as the trial's final stage (the work folder must be on a file system every worker sees: the machine's
    own for one node, a shared one for several)."""
    import ray.train

    from uda_ray.config import to_dict
    from uda_ray.results.store import join
    from uda_ray.train.worker import torch_trainer

    def train(cfg: Config, work_dir: Path) -> FitResult:
        trainer = torch_trainer(
            stage_fn_per_worker, {"config": to_dict(cfg), "work_dir": str(work_dir), "name": work_dir.name}, scaling,
            ray.train.RunConfig(name=f"stage-{work_dir.name}", storage_path=join(storage_path, "stages", ".train")))
        trainer.fit()  # raises when a worker failed (a diverged loss included)
        return _finished_in(work_dir)

    return train


def _finished_in(work_dir: Path) -> FitResult:
    """The result of a run that finished in ``work_dir``, read from what its rank 0 left there (Train's own result
    keeps no metrics of reports without a checkpoint): the newest checkpoint's iteration and the last report."""
    last = latest_checkpoint(work_dir)
    iteration = checkpoint_iteration(last) if last is not None else 0
    metrics: dict[str, float] = {}
    path = work_dir / "metrics.parquet"
    if path.is_file():
        rows = pd.read_parquet(path)
        rows = rows[rows["iteration"] <= iteration]
        if not rows.empty:
            metrics = {k: float(v) for k, v in rows.iloc[-1].items() if ("/" in k or k == "iteration") and v == v}
    return FitResult("completed", iteration, metrics)
