"""``uda-ray train``: one run on this machine, no Ray; resolved config, provenance, metrics parquet, checkpoints.

    <output_dir>/<name>/config.yaml        the resolved config (re-runnable with `uda-ray train config.yaml`)
    <output_dir>/<name>/provenance.json    git revision, package versions, seed, command-line overrides
    <output_dir>/<name>/metrics.parquet    one row per report (rewritten atomically at each report)
    <output_dir>/<name>/checkpoints/iter_<k>/checkpoint.pt
    <output_dir>/<name>/status.json        RUNNING, then TERMINATED, DIVERGED or ERROR (with the error and the
                                           command that resumes it), as in the trials table

A run that fails (or is interrupted) before its first checkpoint leaves no folder behind: one that this command
created and that holds nothing to resume from is removed, so no half-made folder looks like a result. A later
failure keeps the folder, marked ERROR in ``status.json``, and ``--resume`` continues it from its newest checkpoint
(``uda-ray analyze`` on such a folder says what it is). A run folder that already holds checkpoints is never
trained into again without ``--resume``, and a resume with other settings than the run's (other than where the data
is, how it reports and how long it trains: ``RESUMABLE``) is refused, naming each changed key.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from uda_ray.config import Config, flatten, load_config, save_config
from uda_ray.results.provenance import git_revision, package_versions
from uda_ray.results.store import metrics_table, write_parquet
from uda_ray.train.loop import FitResult, fit

STATUS_FILE = "status.json"
# what a resumed run may change: where things are, how it runs and reports, and how long it trains
RESUMABLE = ("run.iterations", "run.eval_every", "run.checkpoint_every", "run.log_every", "run.threads",
             "run.device", "run.output_dir", "run.name", "run.save_images", "run.image_count", "data.source_root",
             "data.target_root", "data.loader_workers", "data.synthetic.cache_dir", "data.rcs.stats_dir")


class RunFolderError(ValueError):
    """A run folder that cannot be used as asked; the message says why and what to pass instead."""


def write_status(run_dir: Path, status: str, **details: Any) -> None:
    """``status.json``: the run's status (the trials table's words: RUNNING, TERMINATED, DIVERGED, ERROR)."""
    tmp = run_dir / f".{STATUS_FILE}.tmp"
    tmp.write_text(json.dumps({"status": status, **details}, indent=1))
    tmp.replace(run_dir / STATUS_FILE)


def _check_same_run(run_dir: Path, cfg: Config) -> None:
    """A resumed run is the run it continues: only the ``RESUMABLE`` keys may differ from its saved config."""
    saved = flatten(load_config(run_dir / "config.yaml"))
    now = flatten(cfg)
    changed = [f"{k}: {saved[k]!r} → {now[k]!r}" for k in now if k in saved and saved[k] != now[k]
               and k not in RESUMABLE]
    if changed:
        raise RunFolderError(f"--resume: {run_dir} was trained with other settings ({'; '.join(changed)}); resume "
                             "with the config and overrides it was started with, or start a new run with another "
                             f"--name (its resolved config: {run_dir / 'config.yaml'})")


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest ``checkpoints/iter_<k>`` folder holding a complete checkpoint, or None."""
    found = sorted(p.parent for p in Path(run_dir).glob("checkpoints/iter_*/checkpoint.pt"))
    return found[-1] if found else None


def checkpoint_iteration(checkpoint_dir: str | Path) -> int:
    """The iteration ``k`` of a ``checkpoints/iter_<k>`` folder."""
    return int(Path(checkpoint_dir).name.split("_")[-1])


class MetricsFile:
    """A run folder's ``metrics.parquet`` (``uda_ray.results.store.metrics_table``, named ``name``): one row per
    report, the file rewritten atomically at each. A run resumed from ``resume_from`` (a checkpoint folder) keeps the
    rows up to that checkpoint's iteration; the later ones are reported again."""

    def __init__(self, path: Path, name: str, *, resume_from: Path | None = None) -> None:
        self.path, self.name = path, name
        self.rows: list[dict[str, Any]] = []
        if resume_from is not None and path.is_file():
            import pandas as pd

            old = pd.read_parquet(path)
            # the table's own columns go, and the keys a row never had (NaN where other rows have them)
            self.rows = [{k: v for k, v in r.items() if k not in ("experiment", "trial_id") and v == v}
                         for r in old[old["iteration"] <= checkpoint_iteration(resume_from)].to_dict("records")]

    def append(self, metrics: dict[str, float]) -> None:
        self.rows.append(dict(metrics))
        write_parquet(metrics_table(self.name, self.name, self.rows), str(self.path))


def default_run_name(config_path: str | Path) -> str:
    return f"{Path(config_path).stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def provenance(cfg: Config, overrides: list[str] | dict[str, Any] | None = None) -> dict[str, Any]:
    return {"git_rev": git_revision(), "versions": package_versions(), "seed": cfg.run.seed,
            "overrides": overrides or [], "torch_threads": torch.get_num_threads()}


def train_local(cfg: Config, run_dir: str | Path, *, resume: bool = False, progress: bool = True,
                overrides: list[str] | None = None) -> FitResult:
    """Run ``fit`` in this process, writing the run folder; ``resume`` continues from its newest checkpoint. A
    failure before the first checkpoint removes the folder this call created; a later one marks it ERROR
    (module docstring)."""
    run_dir = Path(run_dir)
    ckpt = latest_checkpoint(run_dir)
    if resume and ckpt is None:
        raise FileNotFoundError(f"{run_dir}: --resume given but no checkpoint under {run_dir / 'checkpoints'}")
    if not resume and ckpt is not None:
        raise RunFolderError(f"{run_dir} already holds a run (checkpoints up to {ckpt.name}): pass --resume to "
                             "continue it, or choose another --name for a new run")
    if resume and (run_dir / "config.yaml").is_file():
        _check_same_run(run_dir, cfg)
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    (run_dir / "provenance.json").write_text(json.dumps(provenance(cfg, overrides), indent=2))

    metrics = MetricsFile(run_dir / "metrics.parquet", run_dir.name, resume_from=ckpt)

    def report(reported: dict[str, float], checkpoint_dir: Path | None) -> None:
        metrics.append(reported)

    resume_hint = (f"uda-ray train {run_dir / 'config.yaml'} --output-dir {run_dir.parent} --name {run_dir.name} "
                   "--resume")
    write_status(run_dir, "RUNNING", started_at=time.time())
    try:
        result = fit(cfg, work_dir=run_dir, report=report, resume_from=ckpt, progress=progress)
    except BaseException as e:
        saved = latest_checkpoint(run_dir)
        if created and saved is None:
            shutil.rmtree(run_dir, ignore_errors=True)
            print(f"uda-ray train: the run stopped before its first checkpoint; {run_dir} was removed (nothing to "
                  "resume from)", file=sys.stderr)
        else:
            error = "interrupted (Ctrl-C)" if isinstance(e, KeyboardInterrupt) else f"{type(e).__name__}: {e}"
            write_status(run_dir, "ERROR", error=error[:2000], checkpoint=str(saved) if saved else None,
                         resume=resume_hint if saved else None, ended_at=time.time())
        raise
    write_status(run_dir, "TERMINATED" if result.status == "completed" else "DIVERGED", iteration=result.iteration,
                 error=result.error or None, ended_at=time.time())
    return result
