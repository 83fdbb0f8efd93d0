"""The built-in synthetic domain pair: procedural street scenes over the 19 Cityscapes classes in two looks.

Layout (``uda_ray.data.synthetic_scene``). A pinhole camera above a flat street; roads, façades, vehicles,
people, poles, signs and trees are painted with a z-buffer at sizes in metres, so image sizes follow depth;
rare classes (train, bus, truck, motorcycle, rider) appear in few scenes, as in the real data.

Appearance. Each instance has canonical part colours (e.g. car paint, glass, tyres, lights); a domain's
``Appearance`` turns them into pixels: a per-class hue/saturation/value shift, texture (source: mild stripes along
the surface; target: blotchy value noise), directional shading, sky haze, a lighting gradient and vignette,
contrast/gamma/colour cast, blur and sensor noise. The source ("GTA-like") is clean and saturated; the target
("Cityscapes-like") is shifted per class, duller, noisier and blurred, while shapes and the rough ordering of class
brightness stay, so pseudo-labels are partly right. ``shift_strength`` s interpolates the target's numbers between
the source's (s = 0: no shift) and ``TARGET_APPEARANCE`` (s = 1).

Files. The source is written in the GTA5 layout, the target in the Cityscapes layout (train and val splits, city
``synthcity``), labels as 8-bit Cityscapes label ids (including void ids: 'ego vehicle' hood in the target,
'unlabeled' specks in the source, 'parking' strips), so the real readers and label map decode them.

``python -m uda_ray.data.synthetic --out DIR`` writes a preview grid PNG.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from uda_ray.data.labels import CITYSCAPES_ID_TO_TRAIN, CLASS_COLOURS
from uda_ray.data.synthetic_scene import TID, Canvas, make_scene

GENERATOR_VERSION = 1  # part of the cache key: bump it when the generator's output changes
CITY = "synthcity"


# Source stripes along the surface: (period in metres, angle in degrees) per class.
STRIPES = np.array([(2.0, 0), (0.6, 90), (1.5, 0), (0.4, 90), (0.25, 0), (0.3, 90), (0.3, 90), (0.3, 0),
                    (0.5, 60), (0.8, 30), (1.0, 90), (0.2, 90), (0.2, 90), (0.5, 90), (0.6, 90), (0.7, 90),
                    (0.7, 90), (0.3, 0), (0.3, 0)], dtype=np.float32)
# How strongly the target's value noise shows on each class (vegetation and terrain most).
NOISE_GAIN = np.array([0.7, 0.8, 0.8, 0.9, 0.8, 0.5, 0.5, 0.4, 1.6, 1.4, 0.5, 0.6, 0.6, 0.5, 0.5, 0.5, 0.5, 0.5,
                       0.5], dtype=np.float32)


@dataclass(frozen=True)
class Appearance:
    """How a domain turns canonical colours into pixels; every number is interpolated by ``shift_strength``."""

    class_shift: tuple[tuple[float, float, float], ...]  # per train id: (hue shift deg, saturation x, value x)
    stripe_amp: float  # relative amplitude of surface stripes
    noise_amp: float  # relative amplitude of image-space value noise (times NOISE_GAIN)
    facing_gain: tuple[float, float, float, float]  # shading of ground, left planes, right planes, frontal planes
    sky_haze: float  # blend of the sky towards white at the horizon
    light_grad: float  # strength of a linear lighting gradient in a random direction
    vignette: float
    exposure_jitter: float  # per-image brightness factor in [1 - j, 1 + j]
    contrast: float
    gamma: float
    cast: tuple[float, float, float]  # per-channel gain (white balance)
    blur_sigma: float  # pixels
    sensor_noise: float  # std of additive noise in [0, 1] units


SOURCE_APPEARANCE = Appearance(
    class_shift=((0.0, 1.0, 1.0),) * 19, stripe_amp=0.07, noise_amp=0.0, facing_gain=(1.0, 1.12, 0.82, 0.97),
    sky_haze=0.45, light_grad=0.0, vignette=0.0, exposure_jitter=0.05, contrast=1.1, gamma=1.0,
    cast=(1.04, 1.0, 0.94), blur_sigma=0.0, sensor_noise=0.0,
)
TARGET_APPEARANCE = Appearance(
    class_shift=(
        (30, 0.5, 1.3), (-40, 0.45, 0.72), (25, 0.45, 0.8), (-30, 0.6, 1.15), (40, 0.5, 1.25), (0, 1.0, 1.6),
        (0, 1.0, 1.5), (30, 0.7, 0.85), (40, 0.55, 0.8), (-30, 0.6, 0.85), (15, 0.25, 1.12), (0, 0.7, 1.15),
        (0, 0.7, 1.15), (20, 0.6, 0.85), (-20, 0.7, 0.9), (40, 0.7, 0.9), (-40, 0.7, 0.9), (0, 0.8, 1.3),
        (0, 0.8, 1.4),
    ),
    stripe_amp=0.0, noise_amp=0.18, facing_gain=(1.0, 0.95, 1.0, 1.0), sky_haze=0.15, light_grad=0.45,
    vignette=0.25, exposure_jitter=0.15, contrast=0.8, gamma=1.15, cast=(0.94, 1.0, 1.08), blur_sigma=0.8,
    sensor_noise=0.035,
)


def blend_appearance(source: Appearance, target: Appearance, strength: float) -> Appearance:
    """``source + strength * (target - source)`` field by field (strength 0: source look, 1: target look)."""
    def mix(a: object, b: object) -> object:
        if isinstance(a, tuple):
            return tuple(mix(x, y) for x, y in zip(a, b))  # type: ignore[arg-type]
        return float(a) + strength * (float(b) - float(a))  # type: ignore[arg-type]

    return Appearance(**{f.name: mix(getattr(source, f.name), getattr(target, f.name))
                         for f in dataclasses.fields(Appearance)})


# -------------------------------------------------------------------------------------------------- rendering
def _value_noise(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(H, W) smooth noise in about [-0.5, 0.5]: two octaves of bilinearly upsampled random grids (cells 3 and 10)."""
    out = np.zeros((h, w), np.float32)
    for cell, weight in ((3, 0.45), (10, 0.55)):
        grid = rng.random((h // cell + 2, w // cell + 2), dtype=np.float32)
        up = Image.fromarray(grid).resize((grid.shape[1] * cell, grid.shape[0] * cell),
                                                      Image.Resampling.BILINEAR)
        out += weight * np.asarray(up)[:h, :w]
    return out - 0.5


def _class_shift(colours: np.ndarray, train_ids: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Per-class HSV change of (K, P, 3) colours: hue += shift[c, 0] degrees, saturation and value scaled."""
    out = colours.copy()
    has = train_ids >= 0
    if not has.any():
        return out
    # here, not at the top: only generating the pair needs matplotlib and scipy, and every trial process imports
    # this module (half a second of start-up)
    from matplotlib.colors import hsv_to_rgb, rgb_to_hsv

    hsv = rgb_to_hsv(np.clip(colours[has], 0, 1))  # (K', P, 3)
    sh = shift[train_ids[has]][:, None, :]  # (K', 1, 3)
    hsv[..., 0] = np.mod(hsv[..., 0] + sh[..., 0] / 360.0, 1.0)
    hsv[..., 1] = np.clip(hsv[..., 1] * sh[..., 1], 0, 1)
    hsv[..., 2] = np.clip(hsv[..., 2] * sh[..., 2], 0, 1)
    out[has] = hsv_to_rgb(hsv)
    return out


def render(cv: Canvas, app: Appearance, rng: np.random.Generator) -> np.ndarray:
    """The (H, W, 3) uint8 image of a painted canvas in one domain's appearance."""
    h, w = cv.h, cv.w
    train_ids = np.array([CITYSCAPES_ID_TO_TRAIN.get(i, -1) for i in cv.label_ids])  # (K,)
    colours = _class_shift(np.stack(cv.colours), train_ids, np.asarray(app.class_shift, np.float32))  # (K, 4, 3)
    img = colours[cv.inst, cv.part]  # (H, W, 3)
    tid = train_ids[cv.inst]  # (H, W)
    cls = np.clip(tid, 0, 18)
    period, angle = STRIPES[cls, 0], np.deg2rad(STRIPES[cls, 1])
    stripes = np.sin(np.float32(2 * np.pi) * (cv.u * np.cos(angle) + cv.v * np.sin(angle)) / period)
    gain = np.asarray(app.facing_gain, np.float32)[cv.facing]
    tex = 1 + app.stripe_amp * stripes * (tid >= 0)
    if app.noise_amp > 0:
        tex = tex + app.noise_amp * NOISE_GAIN[cls] * _value_noise(rng, h, w)
    img = img * (gain * tex)[..., None]
    haze = app.sky_haze * np.clip(cv.ys / max(cv.yh, 1.0), 0, 1)[:, None, None]  # (H, 1, 1) whiter at the horizon
    sky = (tid == TID["sky"])[..., None]
    img = np.where(sky, img * (1 - haze) + haze * np.float32(0.95), img)
    phi = rng.uniform(0, 2 * np.pi)
    gx, gy = (cv.xs / w - 0.5)[None, :], (cv.ys / h - 0.5)[:, None]
    light = 1 + app.light_grad * (gx * np.cos(phi) + gy * np.sin(phi)) - app.vignette * 2 * (gx**2 + gy**2)
    exposure = rng.uniform(1 - app.exposure_jitter, 1 + app.exposure_jitter)
    img = img * (light * np.float32(exposure * app.contrast))[..., None] + np.float32(0.45 * (1 - app.contrast))
    img = np.clip(img, 0, 1, out=img)
    if app.gamma != 1.0:
        img **= np.float32(app.gamma)
    img *= np.asarray(app.cast, np.float32)
    if app.blur_sigma > 0:
        from scipy.ndimage import gaussian_filter  # as matplotlib in _class_shift

        img = gaussian_filter(img, sigma=(app.blur_sigma, app.blur_sigma, 0), mode="nearest")
    if app.sensor_noise > 0:
        img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(app.sensor_noise)
    return (np.clip(img, 0, 1, out=img) * 255 + 0.5).astype(np.uint8)


def make_pair(seed: int, domain: int, index: int, height: int, width: int,
              shift_strength: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 image and (H, W) uint8 Cityscapes label ids of one synthetic scene."""
    cv = make_scene(seed, domain, index, height, width)
    app = SOURCE_APPEARANCE if domain == 0 else blend_appearance(SOURCE_APPEARANCE, TARGET_APPEARANCE,
                                                                  shift_strength)
    return render(cv, app, np.random.default_rng([seed, domain, index, 1])), cv.label_map()


# ------------------------------------------------------------------------------------------------------ files
def _save(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path, compress_level=1)


def _write_all(out: Path, params: dict[str, float | int], shift_strength: float) -> None:
    seed, h, w = int(params["seed"]), int(params["height"]), int(params["width"])
    for folder in ("source/images", "source/labels", *(f"target/{kind}/{split}/{CITY}" for kind in
                                                       ("leftImg8bit", "gtFine") for split in ("train", "val"))):
        (out / folder).mkdir(parents=True)
    for i in range(int(params["num_source"])):
        image, label = make_pair(seed, 0, i, h, w)
        _save(image, out / "source" / "images" / f"{i:05d}.png")
        _save(label, out / "source" / "labels" / f"{i:05d}.png")
    for domain, split, n in ((1, "train", params["num_target"]), (2, "val", params["num_val"])):
        for i in range(int(n)):
            image, label = make_pair(seed, domain, i, h, w, shift_strength)
            name = f"{CITY}_{i:06d}_000019"
            _save(image, out / "target" / "leftImg8bit" / split / CITY / f"{name}_leftImg8bit.png")
            _save(label, out / "target" / "gtFine" / split / CITY / f"{name}_gtFine_labelIds.png")
    (out / "params.json").write_text(json.dumps(params, indent=1, sort_keys=True))


def ensure_synthetic(cache_dir: str | Path, *, seed: int, num_source: int, num_target: int, num_val: int,
                     height: int, width: int, shift_strength: float = 1.0) -> tuple[Path, Path]:
    """(source root in the GTA5 layout, target root in the Cityscapes layout), generated once per parameter set.

    The data lives in ``<cache_dir>/<hash of the parameters and GENERATOR_VERSION>/``. It is written into a private
    temporary folder and renamed into place, so concurrent callers (e.g. Ray trials) never see a partial data set;
    a caller that loses the rename race discards its copy and uses the winner's.
    """
    for name, value in (("num_source", num_source), ("num_target", num_target), ("num_val", num_val)):
        if value < 1:
            raise ValueError(f"ensure_synthetic: {name} = {value}: expected at least 1 image")
    if height < 16 or width < 16 or seed < 0 or shift_strength < 0:
        raise ValueError(f"ensure_synthetic: height {height}, width {width}, seed {seed}, shift_strength "
                         f"{shift_strength}: expected sizes >= 16, seed >= 0, shift_strength >= 0")
    params: dict[str, float | int] = dict(version=GENERATOR_VERSION, seed=seed, num_source=num_source,
                                          num_target=num_target, num_val=num_val, height=height, width=width,
                                          shift_strength=float(shift_strength))
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cache_dir).expanduser() / key
    if not root.is_dir():
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = root.parent / f".{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            _write_all(tmp, params, shift_strength)
            try:
                os.rename(tmp, root)
            except OSError:
                if not root.is_dir():  # not a lost race: a real failure
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    return root / "source", root / "target"


# ---------------------------------------------------------------------------------------------------- preview
def colourize(label_ids: np.ndarray) -> np.ndarray:
    """(H, W) Cityscapes label ids → (H, W, 3) uint8 in the Cityscapes class colours (void black)."""
    lut = np.zeros((256, 3), np.uint8)
    for label_id, train_id in CITYSCAPES_ID_TO_TRAIN.items():
        lut[label_id] = CLASS_COLOURS[train_id]
    return lut[label_ids]


def preview(out: Path, *, seed: int = 0, count: int = 6, height: int = 96, width: int = 192,
            shift_strength: float = 1.0, scale: int = 2) -> Path:
    """A grid PNG, one row per scene: source image | its labels | the same scene in the target look |
    a target scene | its labels."""
    rows = []
    app = blend_appearance(SOURCE_APPEARANCE, TARGET_APPEARANCE, shift_strength)
    gap = np.full((height, 4, 3), 255, np.uint8)
    for i in range(count):
        src, src_lab = make_pair(seed, 0, i, height, width)
        same = render(make_scene(seed, 0, i, height, width), app, np.random.default_rng([seed, 0, i, 2]))
        tgt, tgt_lab = make_pair(seed, 1, i, height, width, shift_strength)
        tiles = [src, colourize(src_lab), same, tgt, colourize(tgt_lab)]
        rows.append(np.concatenate([t for tile in tiles for t in (tile, gap)][:-1], axis=1))
        rows.append(np.full((4, rows[-1].shape[1], 3), 255, np.uint8))
    grid = np.concatenate(rows[:-1], axis=0)
    grid = grid.repeat(scale, 0).repeat(scale, 1)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "synthetic_preview.png"
    Image.fromarray(grid).save(path)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a preview grid of the synthetic domain pair.")
    parser.add_argument("--out", required=True, type=Path, help="folder for synthetic_preview.png")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count", type=int, default=6, help="scenes (rows)")
    parser.add_argument("--height", type=int, default=96)
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--shift-strength", type=float, default=1.0)
    args = parser.parse_args(argv)
    path = preview(args.out, seed=args.seed, count=args.count, height=args.height, width=args.width,
                   shift_strength=args.shift_strength)
    print(f"wrote {path}; columns: source | source labels | source scene in target look | target | target labels")


if __name__ == "__main__":
    main()
