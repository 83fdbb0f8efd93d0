"""What the seeds' offline stages compute with a trained model, and the files the training loop starts from.

- ``offline_pseudo_labels``: SDCA's ``pseudo_label.py`` (class-wise thresholds over the whole target train split,
  label PNGs for the self-training stage).
- ``source_class_statistics`` / ``save_class_statistics`` / ``load_class_statistics``: SDCA's
  ``semantic_dist_init.py`` (per-class feature and output statistics of the source split), read by the SDCA term
  (``loss.sdca.init_stats``).
- ``compute_centroids`` / ``save_centroids`` / ``load_centroids``: CFContra's ``calculate_src_center`` and
  ``calculate_tgt_center``, read by the CFContra term (``loss.cfcontra.init_centroids``).

Every function runs the model in eval mode without gradients (under autocast when ``autocast_dtype`` is given) and
puts it back in the mode it found it in. Files are written to a temporary name and renamed.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from uda_ray.adaptation import ClassStatistics
from uda_ray.adaptation.centroids import source_centroids, target_centroids
from uda_ray.adaptation.self_training import threshold_labels, thresholds_from_groups
from uda_ray.data.labels import CLASS_COLOURS, IGNORE_INDEX
from uda_ray.data.readers import SegmentationDataset
from uda_ray.models import unwrap
from uda_ray.models.segmenter import upsample
from uda_ray.train.context import resize_labels

Infer = Callable[[nn.Module, Tensor], Tensor]
LABELS_DIR = "labels"
_PALETTE = [v for colour in CLASS_COLOURS for v in colour]  # PNG palette: index = train id, Cityscapes colours


# ------------------------------------------------------------------------------------------------------ helpers
@contextlib.contextmanager
def _offline_mode(model: nn.Module, *, train: bool = False) -> Iterator[None]:
    """Eval mode (or train mode) without gradients; afterwards the model's mode as it was and, after train mode,
    its buffers too (BatchNorm's running statistics and batch count: a pass in train mode updates them, which would
    change what the model predicts in eval mode)."""
    was_training = model.training
    kept = [(b, b.detach().clone()) for b in model.buffers()] if train else []
    model.train(train)
    try:
        with torch.no_grad():
            yield
    finally:
        with torch.no_grad():
            for buffer, value in kept:
                buffer.copy_(value)
        model.train(was_training)


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def _loader(dataset: Dataset, indices: Sequence[int], batch_size: int, num_workers: int) -> DataLoader:
    """Batches of ``dataset[i]`` for ``indices`` in that order (no augmentation draws: int keys)."""
    if batch_size < 1:
        raise ValueError(f"batch_size = {batch_size}: expected >= 1")
    return DataLoader(dataset, batch_size=batch_size, sampler=list(indices), num_workers=num_workers, shuffle=False)


def _atomic_save(obj: object, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


def _read(path: str | Path, key: str, what: str) -> dict:
    """The dict saved in ``path``; errors name the config ``key`` and the path."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"{key} = {str(path)!r}: no such file (expected the {what} file of a stage)")
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{key} = {str(path)!r}: cannot be read as a {what} file: {e}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{key} = {str(path)!r}: expected a dict ({what}), got {type(obj).__name__}")
    return obj


def train_id_png(labels: np.ndarray) -> bytes:
    """An 8-bit palette PNG of (H, W) train ids (255 = ignore): the pixel values are the train ids
    (``read_train_ids`` reads them), the palette shows them in the Cityscapes colours, as SDCA's label files."""
    image = Image.fromarray(labels.astype(np.uint8))  # mode L
    image.putpalette(_PALETTE)  # → mode P, same pixel values
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def label_path(out_dir: str | Path, root: str | Path, image: str | Path) -> Path:
    """``<out_dir>/labels/<image path relative to root, suffix .png>``: where the offline label of ``image`` goes."""
    try:
        relative = Path(image).relative_to(root)
    except ValueError as e:
        raise ValueError(f"{image}: not under the dataset root {root}: {e}") from None
    return Path(out_dir) / LABELS_DIR / relative.with_suffix(".png")


# ------------------------------------------------------------------------------------------------ pseudo-labels
def _probabilities(model: nn.Module, x: Tensor, size: Sequence[int], infer: Infer | None,
                   autocast_dtype: torch.dtype | None) -> Tensor:
    """(B, C, *size) softmax of the logits upsampled bilinearly with align_corners=True (SDCA's inference)."""
    with _autocast(x.device, autocast_dtype):
        logits = infer(model, x) if infer is not None else model(x).logits
    return torch.softmax(upsample(logits.float(), tuple(size), align_corners=True), dim=1)


def offline_pseudo_labels(model: nn.Module, dataset: SegmentationDataset, out_dir: str | Path, *, root: str | Path,
                          device: torch.device, cap: float = 0.9, infer: Infer | None = None,
                          autocast_dtype: torch.dtype | None = None, batch_size: int = 1,
                          num_workers: int = 0) -> dict[str, object]:
    """SDCA's ``pseudo_label.py``: class-wise thresholds over the whole split, then one label PNG per image.

    ``dataset``: the target train split with an ``EvalTransform`` at the test size (``data.val_resize``: the image
    resized, the label at the image's own resolution), as SDCA's test transform (``Resize(resize_label=False)``).
    Two passes over the split, as the official script:

    1. thresholds (``get_threshold``): logits upsampled to the *input* size (bilinear, align_corners=True), softmax,
       per pixel the max probability and its class; per class the middle of the sorted confidences of the pixels
       predicted as that class over the whole split, capped at ``cap`` (``thresholds_from_groups``). Exactness needs
       every confidence: they are kept per class as float32, 4 bytes per pixel at the input size (the Cityscapes
       train split at 1024×512: 2975·512·1024·4 B ≈ 6.2 GB of host memory; SDCA keeps 12 B per pixel).
    2. labels (``test``): logits upsampled to the label's size (the image as loaded), softmax, argmax; pixels whose
       confidence is below their class's threshold become 255 (``threshold_labels``); written as
       ``<out_dir>/labels/<image path relative to root, suffix .png>`` (``label_path``), 8-bit train ids with the
       Cityscapes palette (``train_id_png``). No flip in either pass (SDCA calls its inference with flip=False).

    ``infer(model, x)`` gives the logits (``eval.mode``'s function; default one whole-image pass). With
    ``batch_size > 1`` the labels of a batch must share one size.

    Returns:
        ``{"thresholds": [C floats], "num_images": n, "kept_fraction": share of written pixels not ignored,
        "kept_accuracy": share of kept pixels that equal the split's own label (where it is not ignored)}``.
    """
    inner = unwrap(model)
    num_classes = inner.num_classes
    loader = _loader(dataset, range(len(dataset)), batch_size, num_workers)
    groups: list[list[Tensor]] = [[] for _ in range(num_classes)]
    with _offline_mode(model):
        for batch in loader:
            x = batch["image"].to(device)
            conf, pred = _probabilities(model, x, x.shape[-2:], infer, autocast_dtype).max(dim=1)  # (B, h, w)
            conf, pred = conf.cpu().reshape(-1), pred.cpu().reshape(-1)  # (B*h*w,)
            for c in torch.unique(pred).tolist():
                groups[c].append(conf[pred == c])
        thresholds = thresholds_from_groups([torch.cat(g) if g else torch.zeros(0) for g in groups], cap=cap)
        del groups
        kept = total = correct = checked = 0
        for batch in loader:
            x, truth = batch["image"].to(device), batch["label"]
            conf, pred = _probabilities(model, x, truth.shape[-2:], infer, autocast_dtype).max(dim=1)  # (B, H, W)
            labels = threshold_labels(pred.cpu(), conf.cpu(), thresholds)  # (B, H, W)
            keep = labels != IGNORE_INDEX
            kept, total = kept + int(keep.sum()), total + labels.numel()
            scored = keep & (truth != IGNORE_INDEX)
            correct, checked = correct + int((labels == truth)[scored].sum()), checked + int(scored.sum())
            for b, index in enumerate(batch["index"].tolist()):
                out = label_path(out_dir, root, dataset.pairs[index][0])
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(train_id_png(labels[b].numpy()))
    return {"thresholds": thresholds.tolist(), "num_images": len(dataset),
            "kept_fraction": kept / max(total, 1), "kept_accuracy": correct / max(checked, 1)}


# ------------------------------------------------------------------------------------------- class statistics
def source_class_statistics(model: nn.Module, source_dataset: Dataset, *, device: torch.device,
                            autocast_dtype: torch.dtype | None = None, batch_size: int = 1,
                            num_workers: int = 0) -> tuple[ClassStatistics, ClassStatistics]:
    """SDCA's ``semantic_dist_init.py``: the SDCA term's class statistics filled from the whole source split.

    In dataset order, batch size 1 (SDCA's ``BATCH_SIZE_VAL``), eval mode: the SDCA term's feature level
    (``features[-1]``, layer4) and the logits, each with the labels resized (nearest) to its grid, go through
    ``ClassStatistics.update`` (SDCA's ``semantic_dist_estimator.update``). ``source_dataset`` should transform as
    SDCA's source train transform does with the source-only config: image and label resized to the training size
    (GTA5 1280×720, SYNTHIA 1280×760), no crop, no flip, no colour augmentation (e.g. a ``TrainTransform`` with
    crop = resize and flip off, indexed without a seed).

    Returns:
        (feat (C, D) statistics, out (C, C) statistics), on the CPU.
    """
    inner = unwrap(model)
    num_classes = inner.num_classes
    feat: ClassStatistics | None = None
    out = ClassStatistics(num_classes, num_classes).to(device)
    with _offline_mode(model):
        for batch in _loader(source_dataset, range(len(source_dataset)), batch_size, num_workers):
            x, y = batch["image"].to(device), batch["label"].to(device)
            with _autocast(device, autocast_dtype):
                result = model(x)
            f, z = result.features[-1].float(), result.logits.float()
            if feat is None:
                feat = ClassStatistics(num_classes, f.shape[1]).to(device)
            for stats, level in ((feat, f), (out, z)):
                pixels = level.permute(0, 2, 3, 1).reshape(-1, level.shape[1])  # (B*h*w, D)
                stats.update(pixels, resize_labels(y, level.shape[-2:]).reshape(-1))
    if feat is None:
        raise ValueError("source_class_statistics: the source dataset is empty")
    return feat.cpu(), out.cpu()


def save_class_statistics(path: str | Path, feat: ClassStatistics, out: ClassStatistics) -> Path:
    """Write ``{"feat": feat.state_dict(), "out": out.state_dict()}`` (``class_stats.pt``) atomically."""
    return _atomic_save({"feat": feat.state_dict(), "out": out.state_dict()}, Path(path))


def load_class_statistics(path: str | Path, *, key: str, num_classes: int,
                          feat_dim: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The feat and out state dicts of a ``save_class_statistics`` file, checked against the statistics of a
    network with ``num_classes`` classes and ``feat_dim`` feature channels; errors name ``key`` and the path."""
    state = _read(path, key, "class statistics")
    expected = {"feat": (num_classes, feat_dim), "out": (num_classes, num_classes)}
    if set(state) != set(expected):
        raise ValueError(f"{key} = {str(path)!r}: expected the keys 'feat' and 'out' (save_class_statistics), got "
                         f"{sorted(state)}")
    for level, shape in expected.items():
        sub = state[level]
        if not isinstance(sub, dict) or set(sub) != {"mean", "var", "count"}:
            raise ValueError(f"{key} = {str(path)!r}: '{level}' must hold 'mean', 'var' and 'count'")
        if tuple(sub["mean"].shape) != shape or tuple(sub["var"].shape) != shape or \
                tuple(sub["count"].shape) != shape[:1]:
            raise ValueError(f"{key} = {str(path)!r}: '{level}' statistics have mean {tuple(sub['mean'].shape)}, but "
                             f"this network needs {shape} ({num_classes} classes, "
                             f"{shape[1]} {'feature channels' if level == 'feat' else 'logits'})")
    return state["feat"], state["out"]


# ---------------------------------------------------------------------------------------------------- centroids
def compute_centroids(model: nn.Module, source_dataset: Dataset, target_dataset: Dataset, *, device: torch.device,
                      source_batches: int | None, target_batches: int | None, margin: float,
                      autocast_dtype: torch.dtype | None = None, seed: int = 0, num_workers: int = 0,
                      train_mode: bool = True) -> tuple[Tensor, Tensor]:
    """CFContra's ``calculate_src_center`` then ``calculate_tgt_center`` with ``model``: (C, D) source
    and target centroids of layer4 (``features[-1]``), the source ones of the pixels the model predicts correctly.

    The feature level is layer4 (2048 channels on DeepLabV2): the official centroid files
    (``src_center_minent_20.pkl``, ``tgt_center_minent_20.pkl``) hold 19×2048 unit rows without one negative entry,
    so they come from post-ReLU layer4 maps, not from the projection head (its last layer is linear). The images
    come one per batch in a random order fixed by ``seed`` (the official code reads the first batches of its
    shuffled training loaders, batch size 1); ``source_batches`` / ``target_batches`` limit how many (official: 301
    and 1601, its loops break after index 300 and 1600; None = the whole split). The datasets should resize image
    and label to the training size as ADVENT's loaders do (1280×640 for both domains, no crop, no flip: e.g. a
    ``TrainTransform`` with crop = resize and flip off).

    ``train_mode`` (the official way): the network runs as the official ``train.py`` hands it over, in train mode,
    so BatchNorm normalises each image by its own statistics; its running statistics are left as they were. False:
    eval mode (the stored statistics), as every other offline pass of this module.
    """
    generator = torch.Generator().manual_seed(seed)
    num_classes = unwrap(model).num_classes

    def order(dataset: Dataset, limit: int | None) -> list[int]:
        indices = torch.randperm(len(dataset), generator=generator).tolist()
        return indices if limit is None else indices[:limit]

    def run(dataset: Dataset, indices: list[int]) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        for batch in _loader(dataset, indices, 1, num_workers):
            with _autocast(device, autocast_dtype):
                result = model(batch["image"].to(device))
            yield result.features[-1].float(), batch["label"].to(device), result.logits.float()

    with _offline_mode(model, train=train_mode):
        src = source_centroids(run(source_dataset, order(source_dataset, source_batches)), num_classes)
        tgt = target_centroids((f for f, _, _ in run(target_dataset, order(target_dataset, target_batches))),
                               src, num_classes, margin=margin)
    return src.cpu(), tgt.cpu()


def save_centroids(path: str | Path, src: Tensor, tgt: Tensor) -> Path:
    """Write ``{"source": (C, D), "target": (C, D)}`` (``centroids.pt``) atomically."""
    if src.dim() != 2 or src.shape != tgt.shape:
        raise ValueError(f"save_centroids: source {tuple(src.shape)} and target {tuple(tgt.shape)} must both be (C, D)")
    return _atomic_save({"source": src.detach().cpu().float(), "target": tgt.detach().cpu().float()}, Path(path))


def load_centroids(path: str | Path, *, key: str, num_classes: int, dim: int) -> tuple[Tensor, Tensor]:
    """(source, target) (C, D) centroids of a ``save_centroids`` file, checked against ``num_classes`` and the bank
    width ``dim``; errors name ``key`` and the path."""
    state = _read(path, key, "centroids")
    if set(state) != {"source", "target"} or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{key} = {str(path)!r}: expected the tensors 'source' and 'target' (save_centroids), got "
                         f"{sorted(state)}")
    for side, t in state.items():
        if tuple(t.shape) != (num_classes, dim):
            raise ValueError(f"{key} = {str(path)!r}: the {side} centroids are {tuple(t.shape)}, but the memory banks "
                             f"hold ({num_classes}, {dim}) (classes, loss.cfcontra.proj_dim)")
    return state["source"].float(), state["target"].float()
