"""Does data loading keep up with the step? Images/s per loader worker at the real sizes, against a 0.5 s/iter
DAFormer step.

    python benchmarks/loader_throughput.py                 # 6 images per dataset, 40 samples each
    python benchmarks/loader_throughput.py --images 12 --samples 100

PNGs are generated at the datasets' sizes into a temporary folder in their published layouts: GTA5
``images/NNNNN.png`` + ``labels/NNNNN.png`` (1914×1052, Cityscapes label ids) and Cityscapes
``leftImg8bit/train/<city>/*_leftImg8bit.png`` + ``gtFine/train/<city>/*_gtFine_labelIds.png`` (2048×1024). The
images are smooth colour fields with pixel noise, about 2.3 MB per file at PNG compression 6, the order of the
datasets' photographs (a noise-free image decodes faster, pure noise slower); the labels are regions of a few
classes. They are read through
the readers a run uses (``uda_ray.data.readers.build_dataset``, label ids mapped to train ids) with DAFormer's
transforms from ``search_spaces/base/daformer_gta2cs.yaml``: the source resized to fit 1280×720, its 512² crop
re-drawn for ``cat_max_ratio`` and Rare Class Sampling (statistics computed over the generated labels; samples drawn
by the ``RareClassSampler``), flipped; the target resized to 1024×512, cropped and flipped.

One loader worker is one process on one core: each sample is read in this process with torch and OpenCV limited to
one thread, as ``dataset[key]`` runs inside a worker. Printed per dataset: images/s, the time of each part (image
decode, label decode, transforms), the files' size; then what a 0.5 s/iter DAFormer step needs: 2 source and 2
target images per iteration, 4 images/s from each domain's loader, and the number of workers each loader needs
(``data.loader_workers``, DAFormer's config: 4); the aim is that one worker delivers at least a quarter of the
8 images/s.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from uda_ray.config import load_config
from uda_ray.data.rcs import RareClassSampler, build_rcs
from uda_ray.data.readers import build_dataset, read_image
from uda_ray.data.transforms import TrainTransform

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "search_spaces" / "base" / "daformer_gta2cs.yaml"
GTA5_SIZE, CITYSCAPES_SIZE = (1052, 1914), (1024, 2048)  # (height, width)
STEP_S, PER_ITERATION = 0.5, 2  # the aimed DAFormer step; images per domain per iteration (batch 2)
# Cityscapes label ids of a few frequent classes (road, sidewalk, building, vegetation, sky, car, person, pole)
LABEL_IDS = np.array([7, 8, 11, 21, 23, 26, 24, 17], dtype=np.uint8)


def _image(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """A smooth colour field with pixel noise: (H, W, 3) uint8, about as compressible as a photograph."""
    h, w = size
    coarse = rng.integers(0, 256, (h // 64 + 2, w // 64 + 2, 3), dtype=np.uint8)
    field = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC).astype(np.int16)
    noise = np.rint(rng.normal(0.0, 0.7, (h, w, 3))).astype(np.int16)
    return np.clip(field + noise, 0, 255).astype(np.uint8)


def _label(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """(H, W) uint8 Cityscapes label ids: blocks of a few classes, the sky on top and the road below."""
    h, w = size
    cells = LABEL_IDS[rng.integers(0, len(LABEL_IDS), (8, 16))]
    label = cv2.resize(cells, (w, h), interpolation=cv2.INTER_NEAREST)
    label[: h // 5] = 23
    label[-h // 4:] = 7
    return label


def _write(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if array.ndim == 3:
        array = array[:, :, ::-1]  # OpenCV writes BGR
    if not cv2.imwrite(str(path), np.ascontiguousarray(array), [cv2.IMWRITE_PNG_COMPRESSION, 6]):
        raise OSError(f"{path}: could not write")


def generate(root: Path, n: int) -> tuple[Path, Path]:
    """GTA5 and Cityscapes folders of ``n`` image/label pairs each, in their published layouts."""
    rng = np.random.default_rng(0)
    gta, cityscapes = root / "gta", root / "cityscapes"
    for i in range(n):
        _write(gta / "images" / f"{i + 1:05d}.png", _image(rng, GTA5_SIZE))
        _write(gta / "labels" / f"{i + 1:05d}.png", _label(rng, GTA5_SIZE))
        name = f"aachen_{i:06d}_000019"
        _write(cityscapes / "leftImg8bit/train/aachen" / f"{name}_leftImg8bit.png", _image(rng, CITYSCAPES_SIZE))
        _write(cityscapes / "gtFine/train/aachen" / f"{name}_gtFine_labelIds.png", _label(rng, CITYSCAPES_SIZE))
    return gta, cityscapes


def _timed(fn, *args, **kwargs) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def measure(dataset, keys: list) -> dict[str, float]:
    """Seconds per sample of each part (median over ``keys``) and of the whole ``dataset[key]``."""
    parts: dict[str, list[float]] = {"image decode": [], "label decode": [], "transforms": [], "whole item": []}
    for key in keys:
        index, seed = key[0], key[1]
        img_path, lab_path = dataset.pairs[index]
        image, t_img = _timed(read_image, img_path)
        label, t_lab = _timed(dataset.decode_label, lab_path)
        rng = np.random.default_rng(seed)
        extra = {"rcs_class": key[2]} if len(key) == 3 else {}
        _, t_tf = _timed(dataset.transform, image, label, rng, **extra)
        _, t_item = _timed(dataset.__getitem__, key)
        for name, t in zip(parts, (t_img, t_lab, t_tf, t_item)):
            parts[name].append(t)
    return {name: statistics.median(ts) for name, ts in parts.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=6, help="generated image/label pairs per dataset")
    p.add_argument("--samples", type=int, default=40, help="samples read per dataset")
    p.add_argument("--keep", default="", help="generate into (or reuse) this folder instead of a temporary one")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    cfg = load_config(CONFIG)
    d = cfg.data
    with tempfile.TemporaryDirectory(prefix="uda_loader_") as tmp:
        root = Path(args.keep or tmp)
        gta, cityscapes = root / "gta", root / "cityscapes"
        if not gta.is_dir():
            t0 = time.perf_counter()
            generate(root, args.images)
            print(f"generated {args.images} GTA5 and {args.images} Cityscapes pairs in "
                  f"{time.perf_counter() - t0:.1f} s")
        source = build_dataset("gta5", gta, "train", TrainTransform(d.source_resize, d.crop, d.flip,
                                                                     keep_ratio=d.keep_ratio,
                                                                     cat_max_ratio=d.cat_max_ratio),
                               label_format="ids")
        r = d.rcs
        spec = build_rcs(source, gta, temperature=r.temperature, min_pixels=r.min_pixels,
                         min_crop_ratio=r.min_crop_ratio, cache_dir=root / "rcs", progress=False)
        source.transform = TrainTransform(d.source_resize, d.crop, d.flip, keep_ratio=d.keep_ratio,
                                          cat_max_ratio=d.cat_max_ratio, rcs_min_crop_pixels=spec.min_crop_pixels)
        target = build_dataset("cityscapes", cityscapes, "train",
                               TrainTransform(d.target_resize, d.crop, d.flip, keep_ratio=d.keep_ratio),
                               label_format="ids")
        sampler = iter(RareClassSampler(spec, seed=0))
        source_keys = [next(sampler) for _ in range(args.samples)]
        target_keys = [(i % len(target), i) for i in range(args.samples)]
        sizes = {name: statistics.mean(p.stat().st_size for p, _ in ds.pairs) / 2 ** 20
                 for name, ds in (("GTA5", source), ("Cityscapes", target))}
        results = {"GTA5": measure(source, source_keys), "Cityscapes": measure(target, target_keys)}

    need = PER_ITERATION / STEP_S
    print(f"one worker = one process, 1 thread; {args.samples} samples per dataset; medians")
    print(f"{'dataset':<11} {'image MB':>8} {'image decode':>13} {'label decode':>13} {'transforms':>11} "
          f"{'item':>8} {'images/s':>9} {'workers for ' + format(need, 'g') + '/s':>16}")
    for name, r in results.items():
        rate = 1.0 / r["whole item"]
        print(f"{name:<11} {sizes[name]:8.2f} {1e3 * r['image decode']:10.1f} ms {1e3 * r['label decode']:10.1f} ms "
              f"{1e3 * r['transforms']:8.1f} ms {1e3 * r['whole item']:5.1f} ms {rate:9.1f} "
              f"{math.ceil(need / rate):16d}")
    slowest = min(1.0 / r["whole item"] for r in results.values())
    aim = 2 * need / 4
    print(f"a {STEP_S} s/iter DAFormer step reads {2 * need:g} images/s ({need:g}/s per domain, batch 2 + 2); "
          f"aim: one worker ≥ a quarter of it ({aim:g} images/s): slowest {slowest:.1f} images/s per worker, "
          f"{'PASS' if slowest >= aim else 'FAIL'}; DAFormer's config runs {d.loader_workers} workers per loader")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
