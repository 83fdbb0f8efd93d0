"""Per-image photometric augmentation of one training image, on its uint8 pixels, as SDCA and PixMatch/EHTDI do in
their datasets: after resize, crop and flip, on the image only (``TrainTransform(photometric=...)``).

The official transforms run on PIL uint8 images, and so do these: the ops are torchvision's PIL kernels called
through ``torchvision.transforms.v2.functional`` (or PIL's own filter), with uda-ray's draws from the sample's
``np.random.Generator``, so a seed fixes the augmentation and a resumed run repeats it. In this order:

1. Colour jitter, with probability ``jitter_prob`` (SDCA's ``transform.ColorJitter`` wraps torchvision 0.8.2's
   ``ColorJitter(brightness, contrast, saturation, hue)``; SDCA's ``RandomApply``/``INPUT.RANDOMAPPLY`` is never
   built by ``core/datasets/build.py``, so its jitter is always on: ``jitter_prob`` 1). Brightness, contrast and
   saturation factors uniform in [max(0, 1 − x), 1 + x], the hue shift uniform in [−h, h] (h ≤ 0.5), the four ops
   in a uniformly random order. torchvision 0.8.2 draws ``randperm(4)`` and then each factor right before its op;
   later versions draw the four factors after the permutation: the same distribution (a uniform order and four
   independent uniforms), which is what is reproduced. An op whose range is one point (x = 0) is skipped, as
   torchvision skips it. Brightness, contrast and saturation are PIL's ``ImageEnhance`` blends, hue a rotation of
   PIL's 8-bit HSV hue channel (torchvision's ``_functional_pil``).
2. Grayscale with probability ``grayscale_prob`` (``RandomGrayscale``: PIL's ``convert("L")``, ITU-R 601-2 luma in
   integers, copied to the three channels).
3. Gaussian blur with probability ``blur_prob``, σ uniform in ``blur_sigma``:

   - ``blur_kind="torchvision"``: SDCA's ``transform.GaussianBlur(kernel_size=[3, 3])`` (σ ∈ [0.1, 2], always
     applied when ``INPUT.GAUSSIANBLUR``): torchvision's ``gaussian_blur`` with a k × k kernel ``exp(−x²/2σ²)``
     normalised, x = −(k−1)/2 … (k−1)/2, reflect padding, on the image as float in [0, 1], then ``mul(255).byte()``:
     torchvision 0.8.2's PIL path (``to_tensor``, blur, ``to_pil_image``), which truncates to the grey level below.
     Later torchvision versions round instead (at most one grey level apart, 0.5 lower on average: reproduced as
     SDCA ran it).
   - ``blur_kind="pil"``: PixMatch/EHTDI's ``gaussian_blur: True`` (``datasets/cityscapes_Dataset.py``
     ``_train_sync_transform``: ``if random.random() < 0.5: img.filter(ImageFilter.GaussianBlur(radius=
     random.random()))``, i.e. p 0.5, σ ∈ [0, 1)): PIL's ``ImageFilter.GaussianBlur(radius=σ)`` itself (PIL's
     extended-box approximation of a Gaussian of standard deviation σ).

Draws from the generator per image, a fixed number whatever the outcomes, and only for the ops that can change an
image: jitter (apply u, a permutation of 4, factors b, c, s, h), grayscale (u), blur (u, σ). The official code draws
from Python's, numpy's and torch's global generators instead: the same distributions, other numbers.

Remaining differences: SDCA builds its jitter only when ``INPUT.BRIGHTNESS > 0`` (here: when any of the four is),
and only for datasets built with ``is_source=True`` (its SDCA stage's source, its self-training stage's pseudo-labelled
Cityscapes; uda-ray sets each domain apart); the Pillow version of the official runs is not pinned (Pillow's
``ImageEnhance`` and box-blur code have been stable for years, but the results are Pillow's).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageFilter

JITTER_OPS = ("brightness", "contrast", "saturation", "hue")
BLUR_KINDS = ("torchvision", "pil")
_ADJUST = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


@dataclass(frozen=True)
class PhotometricDraws:
    """One image's draws: ``order`` a permutation of (brightness, contrast, saturation, hue) indices, ``factors``
    the four values in that fixed (b, c, s, h) order."""

    jitter: bool = False
    order: tuple[int, ...] = (0, 1, 2, 3)
    factors: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 0.0)
    grayscale: bool = False
    blur: bool = False
    sigma: float = 0.0


def jitter_ranges(jitter: tuple[float, float, float, float]) -> tuple[tuple[float, float], ...]:
    """torchvision's ``ColorJitter`` ranges: [max(0, 1 − x), 1 + x] for b, c, s and [−h, h] for the hue."""
    b, c, s, h = (float(x) for x in jitter)
    return (max(0.0, 1 - b), 1 + b), (max(0.0, 1 - c), 1 + c), (max(0.0, 1 - s), 1 + s), (-h, h)


class Photometric:
    """The photometric ops of one domain (module docstring); ``__call__(image, rng)`` on (H, W, 3) uint8."""

    def __init__(self, *, jitter: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0), jitter_prob: float = 1.0,
                 grayscale_prob: float = 0.0, blur_prob: float = 0.0, blur_kind: str = "torchvision",
                 blur_kernel: int = 3, blur_sigma: tuple[float, float] = (0.1, 2.0)) -> None:
        if len(jitter) != 4 or min(jitter) < 0 or jitter[3] > 0.5:
            raise ValueError(f"jitter {tuple(jitter)}: expected (brightness, contrast, saturation, hue) >= 0 with "
                             "hue <= 0.5")
        for name, p in (("jitter_prob", jitter_prob), ("grayscale_prob", grayscale_prob), ("blur_prob", blur_prob)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} {p}: expected a probability in [0, 1]")
        if blur_kind not in BLUR_KINDS:
            raise ValueError(f"blur_kind {blur_kind!r}: expected one of {BLUR_KINDS}")
        if blur_kernel < 1 or blur_kernel % 2 == 0:
            raise ValueError(f"blur_kernel {blur_kernel}: expected an odd kernel size >= 1")
        lo, hi = blur_sigma
        if not (0.0 <= lo <= hi and (lo > 0.0 or blur_kind == "pil")):
            raise ValueError(f"blur_sigma {tuple(blur_sigma)}: expected 0 < lo <= hi (0 <= lo <= hi for PIL's blur)")
        self.jitter = tuple(float(x) for x in jitter)
        self.ranges = jitter_ranges(self.jitter)
        self.jitter_prob, self.grayscale_prob, self.blur_prob = float(jitter_prob), float(grayscale_prob), \
            float(blur_prob)
        self.blur_kind, self.blur_kernel, self.blur_sigma = blur_kind, int(blur_kernel), (float(lo), float(hi))

    @property
    def jitter_on(self) -> bool:
        return self.jitter_prob > 0 and any(self.jitter)

    @property
    def enabled(self) -> bool:
        """Whether any op can change an image (otherwise nothing is drawn)."""
        return self.jitter_on or self.grayscale_prob > 0 or self.blur_prob > 0

    def draw(self, rng: np.random.Generator) -> PhotometricDraws:
        """The draws of one image, in the module docstring's order."""
        out: dict = {}
        if self.jitter_on:
            out["jitter"] = bool(rng.random() < self.jitter_prob)
            out["order"] = tuple(int(i) for i in rng.permutation(4))
            out["factors"] = tuple(float(rng.uniform(lo, hi)) for lo, hi in self.ranges)
        if self.grayscale_prob > 0:
            out["grayscale"] = bool(rng.random() < self.grayscale_prob)
        if self.blur_prob > 0:
            out["blur"] = bool(rng.random() < self.blur_prob)
            out["sigma"] = float(rng.uniform(*self.blur_sigma))
        return PhotometricDraws(**out)

    def apply(self, image: np.ndarray, draws: PhotometricDraws) -> np.ndarray:
        """(H, W, 3) uint8 → (H, W, 3) uint8 with the drawn ops (a new array; the input is not changed)."""
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"photometric: expected an (H, W, 3) uint8 image, got {image.dtype} {image.shape}")
        if not (draws.jitter or draws.grayscale or draws.blur):
            return image
        pil = Image.fromarray(np.ascontiguousarray(image))
        if draws.jitter:
            for op in draws.order:
                lo, hi = self.ranges[op]
                if lo != hi:  # torchvision skips an op whose range is one point (x = 0)
                    pil = _ADJUST[op](pil, draws.factors[op])
        if draws.grayscale:
            pil = TF.rgb_to_grayscale(pil, num_output_channels=3)
        if draws.blur and self.blur_kind == "pil":
            pil = pil.filter(ImageFilter.GaussianBlur(radius=draws.sigma))
        out = np.array(pil)  # (H, W, 3) uint8, writable
        if draws.blur and self.blur_kind == "torchvision":
            out = blur_truncated(out, self.blur_kernel, draws.sigma)
        return out

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self.apply(image, self.draw(rng))


def blur_truncated(image: np.ndarray, kernel: int, sigma: float) -> np.ndarray:
    """torchvision 0.8.2's ``gaussian_blur`` of a PIL image: (H, W, 3) uint8 / 255 blurred in float32 with a
    ``kernel`` × ``kernel`` Gaussian (reflect padding), then ``mul(255).byte()`` (truncation)."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div(255)  # (3, H, W)
    x = TF.gaussian_blur(x, [kernel, kernel], [sigma, sigma])
    return x.mul(255).byte().permute(1, 2, 0).numpy()  # (H, W, 3)
