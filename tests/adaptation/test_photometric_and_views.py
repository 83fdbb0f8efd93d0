"""Photometric augmentations and views: determinism, range, identity when off, and reference values."""

import colorsys

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from uda_ray.adaptation import strong_view, target_to_source_mix
from uda_ray.data.photometric import (
    color_jitter,
    gaussian_blur,
    gaussian_kernels,
    grayscale,
    hsv_to_rgb,
    rgb_to_hsv,
)


def _images(seed=0, b=4, h=9, w=11):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


AUGMENTS = {
    "jitter": lambda x, g: color_jitter(x, strength=0.4, prob=0.8, generator=g),
    "blur": lambda x, g: gaussian_blur(x, sigma_min=0.15, sigma_max=1.15, prob=0.5, generator=g),
    "gray": lambda x, g: grayscale(x, prob=0.5, generator=g),
    "strong": lambda x, g: strong_view(x, generator=g),
}


@pytest.mark.parametrize("name", list(AUGMENTS))
def test_deterministic_and_in_range(name):
    x = _images()
    fn = AUGMENTS[name]
    a = fn(x, torch.Generator().manual_seed(3))
    b = fn(x, torch.Generator().manual_seed(3))
    assert a.shape == x.shape and torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    outs = [fn(x, torch.Generator().manual_seed(s)) for s in range(6)]
    assert any(not torch.equal(o, outs[0]) for o in outs[1:])


def test_probability_zero_is_identity():
    x = _images()
    g = torch.Generator().manual_seed(0)
    assert torch.equal(color_jitter(x, strength=0.5, prob=0.0, generator=g), x)
    assert torch.equal(gaussian_blur(x, sigma_min=0.5, sigma_max=1.0, prob=0.0, generator=g), x)
    assert torch.equal(grayscale(x, prob=0.0, generator=g), x)
    off = strong_view(x, generator=g, jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0)
    assert torch.equal(off, x)


def test_per_image_choice_leaves_others_untouched():
    x = _images(b=16)
    y = grayscale(x, prob=0.5, generator=torch.Generator().manual_seed(1))
    changed = [not torch.equal(x[i], y[i]) for i in range(16)]
    assert 0 < sum(changed) < 16
    for i in range(16):
        if changed[i]:
            want = 0.299 * x[i, 0] + 0.587 * x[i, 1] + 0.114 * x[i, 2]
            for c in range(3):
                torch.testing.assert_close(y[i, c], want)


def test_hsv_matches_colorsys():
    x = _images(b=1, h=3, w=4)
    hsv = rgb_to_hsv(x)
    for yy in range(3):
        for xx in range(4):
            h, s, v = colorsys.rgb_to_hsv(*x[0, :, yy, xx].tolist())
            assert hsv[0, :, yy, xx].tolist() == pytest.approx([h, s, v], abs=1e-5)
    torch.testing.assert_close(hsv_to_rgb(hsv), x, atol=1e-5, rtol=0)


def test_jitter_strength_zero_is_identity_up_to_rounding():
    x = _images()
    torch.testing.assert_close(color_jitter(x, strength=0.0, prob=1.0, generator=torch.Generator()), x,
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("sigma", [0.15, 0.6, 1.15])
def test_blur_matches_scipy(sigma):
    x = _images(b=2)
    y = gaussian_blur(x, sigma_min=sigma, sigma_max=sigma, prob=1.0, generator=torch.Generator())
    radius = int(np.ceil(3 * sigma))
    for i in range(2):
        for c in range(3):
            want = gaussian_filter(x[i, c].double().numpy(), sigma, mode="nearest", truncate=radius / sigma)
            np.testing.assert_allclose(y[i, c].numpy(), want, atol=1e-5)


def test_gaussian_kernels():
    k = gaussian_kernels(torch.tensor([0.3, 1.0]))
    assert k.shape == (2, 7)
    torch.testing.assert_close(k.sum(1), torch.ones(2))
    assert k[0, :2].abs().max() == 0 and k[0, -2:].abs().max() == 0  # radius ceil(0.9) = 1 inside radius 3


def test_target_to_source_mix():
    g = torch.Generator().manual_seed(0)
    src, tgt = torch.rand(2, 3, 4, 5, generator=g), torch.rand(2, 3, 4, 5, generator=g)
    src_lbl, pseudo = torch.randint(0, 3, (2, 4, 5), generator=g), torch.randint(3, 6, (2, 4, 5), generator=g)
    src_lbl[0, 0, 0] = 255
    conf = torch.rand(2, 4, 5, generator=g)
    conf[1, 1, 1] = 0.95  # equal to t_max: not pasted (strict >)
    img, lbl, mask = target_to_source_mix(src, src_lbl, tgt, pseudo, conf, t_max=0.95)
    assert torch.equal(mask, conf > 0.95) and not mask[1, 1, 1]
    assert torch.equal(img, torch.where(mask[:, None], tgt, src))
    assert torch.equal(lbl, torch.where(mask, pseudo, src_lbl))
    with pytest.raises(ValueError, match="confidence"):
        target_to_source_mix(src, src_lbl, tgt, pseudo, conf[:, :2], t_max=0.95)
