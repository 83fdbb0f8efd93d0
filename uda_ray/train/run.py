"""``uda-ray train``: one run on this machine, no Ray; resolved config, provenance, metrics parquet, checkpoints.

    <output_dir>/<name>/config.yaml        the resolved config (re-runnable with `uda-ray train config.yaml`)
    <output_dir>/<name>/provenance.json    git revision, package versions, seed, command-line overrides
    <output_dir>/<name>/metrics.parquet    one row per report (rewritten atomically at each report)
    <output_dir>/<name>/checkpoints/iter_<k>/checkpoint.pt
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from uda_ray.config import Config, save_config
from uda_ray.results.provenance import git_revision, package_versions
from uda_ray.results.store import metrics_table, write_parquet
from uda_ray.train.loop import FitResult, fit


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest ``checkpoints/iter_<k>`` folder holding a complete checkpoint, or None."""
    found = sorted(p.parent for p in Path(run_dir).glob("checkpoints/iter_*/checkpoint.pt"))
    return found[-1] if found else None


def default_run_name(config_path: str | Path) -> str:
    return f"{Path(config_path).stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def provenance(cfg: Config, overrides: list[str] | dict[str, Any] | None = None) -> dict[str, Any]:
    return {"git_rev": git_revision(), "versions": package_versions(), "seed": cfg.run.seed,
            "overrides": overrides or [], "torch_threads": torch.get_num_threads()}


def train_local(cfg: Config, run_dir: str | Path, *, resume: bool = False, progress: bool = True,
                overrides: list[str] | None = None) -> FitResult:
    """Run ``fit`` in this process, writing the run folder; ``resume`` continues from its newest checkpoint."""
    run_dir = Path(run_dir)
    ckpt = latest_checkpoint(run_dir) if resume else None
    if resume and ckpt is None:
        raise FileNotFoundError(f"{run_dir}: --resume given but no checkpoint under {run_dir / 'checkpoints'}")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    (run_dir / "provenance.json").write_text(json.dumps(provenance(cfg, overrides), indent=2))

    metrics_path = run_dir / "metrics.parquet"
    rows: list[dict[str, float]] = []
    if ckpt is not None and metrics_path.exists():
        import pandas as pd

        done = int(str(ckpt.name).split("_")[-1])
        old = pd.read_parquet(metrics_path)
        rows = [{k: v for k, v in r.items() if k not in ("experiment", "trial_id")}
                for r in old[old["iteration"] <= done].to_dict("records")]

    def report(metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        rows.append(dict(metrics))
        write_parquet(metrics_table(run_dir.name, run_dir.name, rows), str(metrics_path))

    return fit(cfg, work_dir=run_dir, report=report, resume_from=ckpt, progress=progress)
