"""A ``centroids`` stage: CFContra's ``calculate_src_center`` and ``calculate_tgt_center`` with its ``model`` input
(``uda_ray.train.offline.compute_centroids``: layer4 features, the source centroid of the pixels the model predicts
correctly, the target pixels labelled by the nearest source centroid with the ``margin`` option; at most
``source_batches`` / ``target_batches`` images, in an order fixed by the stage config's seed; with ``train_mode``, the
default, the network in train mode as the official code runs it), which a later stage's
CFContra memory banks start from (``centroids: <stage>`` → ``loss.cfcontra.init_centroids``).

Output: ``centroids.pt`` (``uda_ray.train.offline.save_centroids``).
"""

from __future__ import annotations

from typing import Any

from uda_ray.stages.kinds import StageJob
from uda_ray.stages.kinds.common import dataset, stage_model
from uda_ray.train.offline import compute_centroids, save_centroids


def run(job: StageJob) -> dict[str, Any]:
    model, device, autocast = stage_model(job)
    source, _ = dataset(job.config, "source", "train", whole=True)
    target, _ = dataset(job.config, "target", "train", whole=True)
    o = job.options
    src, tgt = compute_centroids(model, source, target, device=device, source_batches=o["source_batches"],
                                 target_batches=o["target_batches"], margin=o["margin"], autocast_dtype=autocast,
                                 seed=job.config.run.seed, train_mode=o["train_mode"])
    save_centroids(job.out_dir / "centroids.pt", src, tgt)
    found = [bool(v) for v in (src.norm(dim=1) > 0).tolist()]
    job.log(f"[stage {job.name}] centroids of {sum(found)} classes from {min(len(source), o['source_batches'])} "
            f"source and {min(len(target), o['target_batches'])} target images")
    return {"source_classes": found, "target_classes": [bool(v) for v in (tgt.norm(dim=1) > 0).tolist()],
            "dim": int(src.shape[1])}
