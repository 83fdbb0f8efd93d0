"""Ray Train entry: run ``fit`` on Ray Train workers (DDP over gloo/NCCL) or in-process for 0 workers.

With ``num_workers >= 1`` a ``TorchTrainer`` starts the workers, sets up the process group, and each worker runs
``fit``: DDP wraps the student only, every rank updates its teacher from the synchronised student, samplers shard
source, target and val by rank, and metrics (losses, confusion matrix) are all-reduced before
``ray.train.report``; rank 0 attaches the checkpoint. The Train run is named after the Tune trial id, so a retried
trial finds its own run in storage and resumes from its newest checkpoint (``ray.train.get_checkpoint()``).

With ``num_workers == 0`` the run happens in the calling process (Ray's local mode for CPU and one-GPU trials):
inside a Tune trial it reports with ``ray.tune.report`` and resumes from ``ray.tune.get_checkpoint()``, because
Ray Train's local mode keeps reports to itself and would hide intermediate results from Tune's scheduler.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import ray.tune
from ray.train.torch import TorchTrainer

from uda_ray.config import Config, ConfigError, from_dict, to_dict
from uda_ray.data.readers import DatasetError
from uda_ray.models.segmenter import CheckpointError
from uda_ray.results.store import join, write_bytes
from uda_ray.train.loop import FitResult, fit


class TrialDiverged(RuntimeError):
    """Raised by a trial whose loss became NaN/inf, so Tune records it as failed with this message."""


# Errors that a retry of the same trial cannot fix: a config that does not validate, data that is missing or
# unreadable, a checkpoint that does not fit the network. Tune does not retry trials that fail with them.
NON_RETRYABLE: tuple[type[BaseException], ...] = (ConfigError, DatasetError, CheckpointError, FileNotFoundError)


def is_non_retryable(error: BaseException, also: tuple[type[BaseException], ...] = ()) -> bool:
    """Whether ``error`` (or its cause, or a Train worker's error inside it) is one of ``NON_RETRYABLE`` or ``also``
    (the callers' own, e.g. a chain's ``StageFailed``)."""
    seen: set[int] = set()
    todo = [error]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, (*NON_RETRYABLE, *also)):
            return True
        cause = getattr(e, "as_instanceof_cause", None)  # RayTaskError wraps the user's exception
        if callable(cause):
            try:
                todo.append(cause())
            except Exception:  # noqa: BLE001 - an unpicklable cause: look no further down this branch
                pass
        todo.extend(getattr(e, "worker_failures", {}).values())  # ray.train.WorkerGroupError
        todo.extend(x for x in (e.__cause__, e.__context__) if x is not None)
    return False


@dataclass(frozen=True)
class Scaling:
    num_workers: int = 0
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0

    def resources_per_worker(self) -> dict[str, float]:
        res = {"CPU": self.cpus_per_worker}
        if self.use_gpu:
            res["GPU"] = self.gpus_per_worker or 1.0
        return res


def _image_sink(images_uri: str | None) -> Callable[[str, bytes], None] | None:
    """Prediction grids go straight to the experiment's storage (a local folder or a URI), beside the trial's
    checkpoints: the run's own work folder is temporary."""
    if not images_uri:
        return None
    return lambda name, png: write_bytes(png, join(images_uri, name))


QUIET_LOGGERS = ("ray.train._internal.storage", "ray.train.v2._internal.execution.storage")  # "Checkpoint … created"


def _run_fit(cfg: Config, checkpoint: ray.train.Checkpoint | None, device: Any,
             report: Callable[[dict[str, float], Path | None], None], images_uri: str | None) -> FitResult:
    """``fit`` in a temporary work folder; ``report(metrics, checkpoint folder or None)`` wraps the folder in the
    ``Checkpoint`` class its receiver expects (``ray.tune.Checkpoint`` for ``ray.tune.report`` in a Tune function
    trainable, ``ray.train.Checkpoint`` for ``ray.train.report`` in a Train worker: Ray 2.5x warns on the other)."""
    for name in QUIET_LOGGERS:  # a run's status is uda-ray's own lines, not one Ray line per checkpoint
        logging.getLogger(name).setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="uda-ray-") as work:
        images = _image_sink(images_uri)
        if checkpoint is None:
            return fit(cfg, work_dir=work, report=report, device=device, images=images)
        with checkpoint.as_directory() as resume_dir:
            local = Path(work) / "resume"
            # copy out of the (possibly temporary) download folder before training writes new checkpoints
            shutil.copytree(resume_dir, local)
        return fit(cfg, work_dir=work, report=report, resume_from=local, device=device, images=images)


def _checkpoint(cls: type[ray.train.Checkpoint], folder: Path | None) -> ray.train.Checkpoint | None:
    return cls.from_directory(str(folder)) if folder is not None else None


def raise_if_diverged(result: FitResult) -> None:
    if result.status == "diverged":
        raise TrialDiverged(result.error)


def train_fn_per_worker(loop_config: dict[str, Any]) -> None:
    """Body of every Ray Train worker: rebuild the config, resume if Train has a checkpoint, run ``fit``."""
    cfg = from_dict(loop_config["config"], source="ray train loop config")
    device = ray.train.torch.get_device()
    rank = ray.train.get_context().get_world_rank()

    def report(metrics: dict[str, float], folder: Path | None) -> None:
        ray.train.report(metrics, checkpoint=_checkpoint(ray.train.Checkpoint, folder) if rank == 0 else None)

    raise_if_diverged(_run_fit(cfg, ray.train.get_checkpoint(), device, report, loop_config.get("images_uri")))


def run_in_process(cfg: Config, *, images_uri: str | None = None) -> FitResult:
    """0 workers: train in the Tune trial's own process, reporting straight to Tune."""
    from uda_ray.train.loop import resolve_device

    result = _run_fit(cfg, ray.tune.get_checkpoint(), resolve_device(cfg.run.device),
                      lambda m, folder: ray.tune.report(m, checkpoint=_checkpoint(ray.tune.Checkpoint, folder)),
                      images_uri)
    raise_if_diverged(result)
    return result


# How often a Ray Train controller polls its workers; Ray's default is 2 s. A run's end is only seen at a poll, and
# at 2 s a tiny DDP run ended about 6 s after its workers had returned (benchmarks/train_start.py prints the
# two side by side). A poll is one small remote call per worker. Ray hands the value on from the process that
# starts the run to its controller; a value the user exported wins.
TRAIN_POLL_ENV, TRAIN_POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"


def torch_trainer(train_fn: Callable[[dict[str, Any]], None], loop_config: dict[str, Any], scaling: Scaling,
                  run_config: ray.train.RunConfig) -> TorchTrainer:
    """Every Ray Train run of uda-ray (a trial's, a chain's train stage): ``train_fn(loop_config)`` on
    ``scaling.num_workers >= 1`` workers, its controller polling every ``TRAIN_POLL_S`` seconds unless
    ``$RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` is set."""
    os.environ.setdefault(TRAIN_POLL_ENV, TRAIN_POLL_S)
    return TorchTrainer(
        train_fn, train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                               resources_per_worker=scaling.resources_per_worker()),
        run_config=run_config)


def run_trainer(cfg: Config, scaling: Scaling, *, name: str, storage_path: str, callbacks: list | None = None,
                images_uri: str | None = None) -> ray.train.Result:
    """One Ray Train run of ``cfg`` on ``scaling.num_workers >= 1`` workers (DDP)."""
    return torch_trainer(
        train_fn_per_worker, {"config": to_dict(cfg), "images_uri": images_uri}, scaling,
        ray.train.RunConfig(name=name, storage_path=storage_path, callbacks=callbacks or [],
                            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1))).fit()
