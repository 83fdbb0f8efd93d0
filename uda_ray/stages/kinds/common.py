"""What the model-reading stage kinds share: the model of their ``model`` input, in eval mode on the device, and the
datasets they read, built from the stage's config as training builds them."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from uda_ray.config import Config
from uda_ray.data.readers import SegmentationDataset, build_dataset
from uda_ray.data.transforms import EvalTransform, TrainTransform
from uda_ray.models.released import load_released
from uda_ray.stages.kinds import StageJob
from uda_ray.train.loop import build_model, data_roots, resolve_device, step_settings


def stage_model(job: StageJob) -> tuple[nn.Module, torch.device, torch.dtype | None]:
    """(the model of ``job.model_file`` built from the stage's config, the device, the autocast dtype)."""
    assert job.model_file is not None
    cfg = job.config
    torch.set_num_threads(cfg.run.threads or torch.get_num_threads())
    device = resolve_device(cfg.run.device)
    model = build_model(cfg, load_pretrained=False)
    for note in load_released(model, job.model_file, weights=job.weights):
        job.log(f"[stage {job.name}] {note}")
    model.to(device).eval()
    return model, device, step_settings(cfg, device).autocast_dtype


def _reader(name: str, side: str) -> str:
    return {"synthetic": "gta5" if side == "source" else "cityscapes"}.get(name, name)


def dataset(cfg: Config, side: str, split: str, *, whole: bool) -> tuple[SegmentationDataset, Path]:
    """(the ``side`` ("source" or "target") ``split`` of ``cfg``'s data, its root). ``whole``: every image resized to
    the side's training size without a crop or a flip (as the seeds' offline passes read their training data);
    otherwise resized to the inference size (``data.val_resize``), the label at the image's own size."""
    d = cfg.data
    src_root, tgt_root = data_roots(cfg)
    root = src_root if side == "source" else tgt_root
    name = getattr(d, side)
    if whole:
        size = d.source_resize if side == "source" else d.target_resize
        transform = TrainTransform(size, size, False, keep_ratio=d.keep_ratio)
    else:
        transform = EvalTransform(d.val_resize, keep_ratio=d.keep_ratio)
    ds = build_dataset(_reader(name, side), root, split, transform, cache_in_memory=name == "synthetic",
                       label_format=d.label_format, resize_labels=d.resize_labels)
    return ds, root
