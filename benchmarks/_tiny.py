"""The tiny run the platform benchmarks time: the built-in synthetic pair at 32×64, six source and six target
images and three val images, ``iterations`` iterations with one evaluation and one checkpoint at the end, one thread,
no warm-up. Each benchmark adds its own model, crop and logging keys (``extra``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC = ROOT / "search_spaces" / "base" / "synthetic.yaml"


def tiny_run(cache: Path, iterations: int, extra: dict[str, Any]) -> dict[str, Any]:
    """Overrides of ``search_spaces/base/synthetic.yaml`` for the tiny run, the synthetic pair cached in ``cache``."""
    return {
        "data.synthetic.cache_dir": str(cache), "data.synthetic.num_source": 6, "data.synthetic.num_target": 6,
        "data.synthetic.num_val": 3, "data.synthetic.height": 32, "data.synthetic.width": 64,
        "data.source_resize": [32, 64], "data.target_resize": [32, 64], "data.val_resize": [32, 64],
        "run.iterations": iterations, "run.eval_every": iterations, "run.checkpoint_every": iterations,
        "run.threads": 1, "optim.warmup_iters": 0, **extra,
    }
