"""A ``pseudo_labels`` stage: the model of its ``model`` input labels the target train split offline, with SDCA's
class-wise thresholds (``uda_ray.train.offline.offline_pseudo_labels``: inference at the test size,
``data.val_resize``, the config's ``eval.mode``; per class the middle of its sorted confidences over the split,
capped at the ``cap`` option; pixels under their class's threshold set to 255).

Output: ``labels/<image path relative to the target root>.png`` (train ids at the image's own size, read by
``data.target_pseudo_labels``) and ``labels.json`` (the thresholds, the kept share and its accuracy against the
split's own labels, when it has them: a diagnostic, never used for training).
"""

from __future__ import annotations

import json
from typing import Any

from uda_ray.stages.kinds import StageJob
from uda_ray.stages.kinds.common import dataset, stage_model
from uda_ray.train.loop import eval_infer
from uda_ray.train.offline import offline_pseudo_labels


def run(job: StageJob) -> dict[str, Any]:
    model, device, autocast = stage_model(job)
    target, root = dataset(job.config, "target", "train", whole=False)
    info = offline_pseudo_labels(model, target, job.out_dir, root=root, device=device, cap=job.options["cap"],
                                 infer=eval_infer(job.config), autocast_dtype=autocast)
    (job.out_dir / "labels.json").write_text(json.dumps(info, indent=1))
    job.log(f"[stage {job.name}] {info['num_images']} target images labelled, {100 * info['kept_fraction']:.1f}% "
            "of the pixels kept")
    return info
