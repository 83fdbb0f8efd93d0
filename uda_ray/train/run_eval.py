"""``uda-ray evaluate``: mIoU of a saved checkpoint's student (or teacher) on a target split."""

from __future__ import annotations

from pathlib import Path

from uda_ray.config import Config, apply_overrides, from_dict
from uda_ray.data.labels import eval_class_ids
from uda_ray.data.loaders import build_val_loader
from uda_ray.data.readers import build_dataset
from uda_ray.data.transforms import EvalTransform
from uda_ray.train.checkpoint import load_checkpoint
from uda_ray.train.evaluate import evaluate
from uda_ray.train.loop import NUM_CLASSES, _reader, build_model, data_roots, resolve_device


def evaluate_checkpoint(path: str | Path, *, split: str = "val", use_teacher: bool = False,
                        overrides: list[str] | None = None) -> dict[str, float]:
    state = load_checkpoint(path)
    cfg: Config = from_dict(state["config"], source=f"{path} (saved config)")
    if overrides:
        cfg = apply_overrides(cfg, overrides, source=f"{path} (overrides)")
    device = resolve_device(cfg.run.device)
    model = build_model(cfg)
    model.load_state_dict(state["teacher" if use_teacher else "student"])
    model.to(device)
    _, tgt_root = data_roots(cfg)
    ds = build_dataset(_reader(cfg.data.target, "target"), tgt_root, split, EvalTransform(cfg.data.val_resize))
    loader = build_val_loader(ds, max_images=cfg.data.val_max_images)
    return evaluate(model, loader, num_classes=NUM_CLASSES, class_ids=eval_class_ids(cfg.data.protocol),
                    device=device, prefix=split)
