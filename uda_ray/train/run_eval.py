"""``uda-ray evaluate``: mIoU of a saved checkpoint's student (or teacher, or ``eval.model: ema``'s EMA copy) on a
target split.

The evaluation is the one training runs (``uda_ray.train.loop.build_val`` and ``evaluate`` with the checkpoint's own
config: inference size, image limit, precision, the held-out report half), so evaluating the checkpoint behind a
trial's score gives that score.

``evaluate_released`` evaluates a released trained model (``uda_ray.models.released``: DAFormer, HRDA, MIC, CLUDA,
ADVENT-family files, or a uda-ray checkpoint) with a recipe config's network and evaluation (HRDA's slide inference
included), and gives the published mIoU of that recipe (``PUBLISHED``) to set beside it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from uda_ray.config import Config, apply_overrides, from_dict, load_config
from uda_ray.data.labels import eval_class_ids
from uda_ray.models.released import load_released
from uda_ray.train.checkpoint import load_checkpoint
from uda_ray.train.evaluate import evaluate, predict_labels
from uda_ray.train.images import label_png
from uda_ray.train.loop import (
    DEFAULT_THREADS,
    NUM_CLASSES,
    build_model,
    build_val,
    eval_infer,
    resolve_device,
    step_settings,
)

CHECKPOINT_NETWORKS = {"student": "student", "teacher": "teacher", "ema": "eval_ema"}  # evaluated → checkpoint key


@dataclass(frozen=True)
class CheckpointEvaluation:
    """What was evaluated (model, split, images per half, the checkpoint's iteration) and the metrics."""

    model: str  # "student" | "teacher" | "ema" (the EMA copy of eval.model: ema)
    split: str
    iteration: int
    num_images: int
    num_report_images: int  # images of the held-out report half (holdout/*), 0 without eval.holdout
    metrics: dict[str, float]

    def describe(self) -> str:
        halves = (f"{self.num_images - self.num_report_images} selection-half images (val/*) and "
                  f"{self.num_report_images} report-half images (holdout/*)" if self.num_report_images
                  else f"{self.num_images} images")
        return f"{self.model} of iteration {self.iteration} on the target {self.split} split: {halves}"


def evaluate_checkpoint(path: str | Path, *, split: str = "val", use_teacher: bool = False,
                        overrides: list[str] | None = None, save_images: str | Path | None = None
                        ) -> CheckpointEvaluation:
    """Evaluate a training checkpoint's student (or teacher) as the run evaluated it (same inference mode, size,
    precision and thread count); with ``save_images`` also write the coloured prediction of every evaluated image
    to ``<save_images>/<image name>.png`` (the Cityscapes palette, ``uda_ray.train.images``). A run with
    ``eval.model: ema`` evaluated its EMA copy, so that copy is what is evaluated (unless ``use_teacher``)."""
    state = load_checkpoint(path)
    cfg: Config = from_dict(state["config"], source=f"{path} (saved config)")
    if overrides:
        cfg = apply_overrides(cfg, overrides, source=f"{path} (overrides)")
    device = resolve_device(cfg.run.device)
    torch.set_num_threads(cfg.run.threads or DEFAULT_THREADS)  # as the run's own evaluations: the same sums
    model = build_model(cfg, load_pretrained=False)  # the checkpoint holds every weight
    which = "teacher" if use_teacher else cfg.eval.model
    key = CHECKPOINT_NETWORKS[which]
    if key not in state:
        raise KeyError(f"{path}: checkpoint has no {key!r} weights, which eval.model = {which!r} evaluates (a run "
                       "with eval.model: ema saves them)")
    model.load_state_dict(state[key])
    metrics, num_images, n_report = _evaluate_model(cfg, model, device, split, save_images)
    return CheckpointEvaluation(which, split, int(state["iteration"]), num_images, n_report, metrics)


def _evaluate_model(cfg: Config, model: torch.nn.Module, device: torch.device, split: str,
                    save_images: str | Path | None) -> tuple[dict[str, float], int, int]:
    """``cfg``'s evaluation of ``model`` on the target ``split``: (metrics, images, report-half images)."""
    model.to(device)
    val = build_val(cfg, split)
    infer, autocast_dtype = eval_infer(cfg), step_settings(cfg, device).autocast_dtype
    metrics = evaluate(model, val.loader, num_classes=NUM_CLASSES, class_ids=eval_class_ids(cfg.data.protocol),
                       device=device, autocast_dtype=autocast_dtype, prefix=split,
                       report_indices=val.report_indices, infer=infer)
    n_report = sum(1 for i in val.report_indices if i < val.num_images) if val.report_indices is not None else 0
    if save_images is not None:
        save_predictions(model, val.loader, Path(save_images), infer=infer, device=device,
                         autocast_dtype=autocast_dtype)
    return metrics, val.num_images, n_report


# The published mIoU (percent, over the recipe's data.protocol classes) of each shipped recipe, as the README's
# "Reproducing" sections give it, and where it comes from; the number a released checkpoint of that recipe should
# come close to (the papers average 3 seeds; the repositories release the median seed's model).
PUBLISHED: dict[str, tuple[float, str]] = {
    "daformer_gta2cs.yaml": (68.3, "DAFormer paper, GTA5→Cityscapes, mean of 3 seeds; DAFormer's README: its released "
                                   "checkpoint gives 68.85"),
    "daformer_synthia2cs.yaml": (60.9, "DAFormer paper, SYNTHIA→Cityscapes, 16 classes"),
    "hrda_gta2cs.yaml": (73.8, "HRDA README, GTA5→Cityscapes, mean of 3 seeds; its released checkpoint gives 73.79"),
    "hrda_synthia2cs.yaml": (65.8, "HRDA, SYNTHIA→Cityscapes, 16 classes"),
    "cluda_hrda_gta2cs.yaml": (74.4, "CLUDA paper, GTA5→Cityscapes (the repository states no number)"),
    "mic_hrda_gta2cs.yaml": (75.9, "MIC README, GTA5→Cityscapes, mean of 3 seeds"),
    "mic_hrda_synthia2cs.yaml": (67.3, "MIC paper, SYNTHIA→Cityscapes, 16 classes"),
    "deeplabv2_gta2cs.yaml": (42.3, "ADVENT paper, MinEnt, GTA5→Cityscapes, best snapshot"),
    "cfcontra_deeplabv2_gta2cs.yaml": (45.8, "CFContra paper: MinEnt + 3.5, GTA5→Cityscapes"),
    "sdca_deeplabv2_gta2cs.yaml": (52.9, "SDCA paper, GTA5→Cityscapes, after all three stages"),
    "target_mix_deeplabv2_gta2cs.yaml": (58.8, "EHTDI README, Main Results, GTA5→Cityscapes"),
    "target_mix_deeplabv2_synthia2cs.yaml": (57.8, "EHTDI README, Main Results, SYNTHIA→Cityscapes, 16 classes"),
}


@dataclass(frozen=True)
class ReleasedEvaluation:
    """A released model evaluated with a recipe: the file, which network, the recipe, the split, the metrics, the
    loader's notes and the recipe's published mIoU (None when the README gives none)."""

    file: str
    weights: str  # "model" | "ema_model"
    recipe: str  # the config file's name
    split: str
    num_images: int
    num_report_images: int
    metrics: dict[str, float]
    notes: list[str]
    published: tuple[float, str] | None

    def describe(self) -> str:
        which = "the student (model.*)" if self.weights == "model" else "the EMA teacher (ema_model.*)"
        halves = (f"{self.num_images - self.num_report_images} selection-half images (val/*) and "
                  f"{self.num_report_images} report-half images (holdout/*)" if self.num_report_images
                  else f"{self.num_images} images")
        return f"{which} of {self.file} with {self.recipe}'s network and evaluation on the target {self.split} " \
               f"split: {halves}"


def evaluate_released(path: str | Path, config: str | Path, *, weights: str = "model", split: str = "val",
                      overrides: list[str] | None = None, save_images: str | Path | None = None
                      ) -> ReleasedEvaluation:
    """Evaluate the released model in ``path`` (``weights``: ``model`` or ``ema_model``) with the network and the
    evaluation of the recipe ``config`` (dotted ``overrides`` applied: data roots, run.device, …)."""
    cfg = load_config(config, overrides)
    device = resolve_device(cfg.run.device)
    torch.set_num_threads(cfg.run.threads or DEFAULT_THREADS)
    model = build_model(cfg, load_pretrained=False)  # the released file holds every weight
    notes = load_released(model, path, weights=weights)
    metrics, num_images, n_report = _evaluate_model(cfg, model, device, split, save_images)
    name = Path(config).name
    return ReleasedEvaluation(str(path), weights, name, split, num_images, n_report, metrics, notes,
                              PUBLISHED.get(name))


@torch.no_grad()
def save_predictions(model: torch.nn.Module, loader: DataLoader, folder: Path, *,
                     infer: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] | None, device: torch.device,
                     autocast_dtype: torch.dtype | None) -> list[Path]:
    """The coloured argmax prediction of every image of ``loader`` (batch size 1), at the label's resolution, as
    ``<folder>/<image file stem>.png``; returns the files written."""
    folder.mkdir(parents=True, exist_ok=True)
    dataset = loader.dataset
    was_training = model.training
    model.eval()
    written = []
    try:
        for batch in loader:
            x = batch["image"].to(device)
            size = tuple(batch["label"].shape[-2:])
            pred = predict_labels(model, x, size, infer=infer, autocast_dtype=autocast_dtype)[0].cpu().numpy()  # (H, W)
            image_path = Path(dataset.pairs[int(batch["index"][0])][0])
            out = folder / f"{image_path.stem}.png"
            out.write_bytes(label_png(pred.astype(np.uint8)))
            written.append(out)
    finally:
        model.train(was_training)
    return written
