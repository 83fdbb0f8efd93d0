"""A ``class_stats`` stage: SDCA's ``semantic_dist_init.py``, the per-class feature (layer4) and output statistics of
its ``model`` input over the whole source train split (``uda_ray.train.offline.source_class_statistics``), which a
later stage's SDCA term starts from (``class_stats: <stage>`` → ``loss.sdca.init_stats``).

Output: ``class_stats.pt`` (``uda_ray.train.offline.save_class_statistics``).
"""

from __future__ import annotations

from typing import Any

from uda_ray.stages.kinds import StageJob
from uda_ray.stages.kinds.common import dataset, stage_model
from uda_ray.train.offline import save_class_statistics, source_class_statistics


def run(job: StageJob) -> dict[str, Any]:
    model, device, autocast = stage_model(job)
    source, _ = dataset(job.config, "source", "train", whole=True)
    feat, out = source_class_statistics(model, source, device=device, autocast_dtype=autocast)
    save_class_statistics(job.out_dir / "class_stats.pt", feat, out)
    counts = feat.count.tolist()
    job.log(f"[stage {job.name}] statistics of {len(source)} source images, {sum(c > 0 for c in counts)} classes seen")
    return {"num_images": len(source), "pixels_per_class": counts, "feat_dim": feat.dim}
