"""Per-image photometric ops (SDCA's jitter, grayscale and 3×3 blur; PixMatch/EHTDI's PIL blur): against
torchvision's own transforms and PIL on the same draws, against a written-out blur, and the draws' distributions."""

import itertools

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F
from PIL import Image, ImageFilter

from uda_ray.data.pil_photometric import Photometric, PhotometricDraws, jitter_ranges

SDCA = dict(jitter=(0.5, 0.5, 0.5, 0.2), grayscale_prob=0.2, blur_prob=1.0, blur_kind="torchvision", blur_kernel=3,
            blur_sigma=(0.1, 2.0))


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the blur is a tiny conv2d: a thread pool only adds waiting on a shared machine
    yield
    torch.set_num_threads(threads)


def image(seed: int, h: int = 12, w: int = 17) -> np.ndarray:
    """A smooth colour gradient plus noise: every op changes it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (h + w)], axis=-1)
    return np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)


def torchvision_jitter(img: np.ndarray, jitter, d: PhotometricDraws, monkeypatch) -> np.ndarray:
    """torchvision's ColorJitter on the PIL image with its parameters replaced by the draws ``d``."""
    cj = T.ColorJitter(*jitter)
    params = [None if v is None else d.factors[k] for k, v in
              enumerate((cj.brightness, cj.contrast, cj.saturation, cj.hue))]
    monkeypatch.setattr(T.ColorJitter, "get_params", staticmethod(lambda *_: (torch.tensor(d.order), *params)))
    return np.array(cj(Image.fromarray(img)))


@pytest.mark.parametrize("jitter", [(0.5, 0.5, 0.5, 0.2), (0.4, 0.0, 1.5, 0.0), (0.0, 0.3, 0.0, 0.5)])
def test_jitter_equals_torchvisions_color_jitter_on_the_same_draws(jitter, monkeypatch):
    ph = Photometric(jitter=jitter)
    seen_orders = set()
    for seed in range(12):
        img = image(seed)
        d = ph.draw(np.random.default_rng(seed))
        assert d.jitter  # jitter_prob 1: always
        seen_orders.add(d.order)
        want = torchvision_jitter(img, jitter, d, monkeypatch)
        got = ph.apply(img, d)
        assert got.dtype == np.uint8 and got.shape == img.shape
        np.testing.assert_array_equal(got, want)
        assert not np.array_equal(got, img)
    assert len(seen_orders) > 6  # the order is drawn, not fixed


def test_jitter_order_matters_and_is_followed(monkeypatch):
    ph = Photometric(jitter=(0.5, 0.5, 0.5, 0.2))
    d = ph.draw(np.random.default_rng(0))
    img = image(3)
    out = {}
    for order in [(0, 1, 2, 3), (3, 2, 1, 0), (1, 3, 0, 2)]:
        dd = PhotometricDraws(jitter=True, order=order, factors=(1.4, 0.6, 1.5, 0.15))
        out[order] = ph.apply(img, dd)
        np.testing.assert_array_equal(out[order], torchvision_jitter(img, (0.5, 0.5, 0.5, 0.2), dd, monkeypatch))
    assert not np.array_equal(out[(0, 1, 2, 3)], out[(3, 2, 1, 0)])
    assert d.order != (0, 1, 2, 3) or d.factors != (1.4, 0.6, 1.5, 0.15)


def test_grayscale_equals_torchvisions_random_grayscale():
    ph = Photometric(grayscale_prob=1.0)
    img = image(1)
    d = ph.draw(np.random.default_rng(0))
    want = np.array(T.RandomGrayscale(p=1.0)(Image.fromarray(img)))
    got = ph.apply(img, d)
    np.testing.assert_array_equal(got, want)
    # PIL's ITU-R 601-2 luma (0.299, 0.587, 0.114) in 16-bit fixed point, rounded
    r, g, b = (img[..., i].astype(np.int64) for i in range(3))
    luma = (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16
    np.testing.assert_array_equal(got[..., 0], luma)
    assert (got == got[..., :1]).all()


def reference_blur(img: np.ndarray, sigma: float, k: int) -> np.ndarray:
    """The k×k Gaussian exp(−x²/2σ²) (x = −(k−1)/2 … (k−1)/2) over img/255 with reflect padding, in float64,
    times 255 (before torchvision 0.8.2's truncation)."""
    x = np.arange(k) - (k - 1) / 2
    g = np.exp(-x ** 2 / (2 * sigma ** 2))
    g /= g.sum()
    r = k // 2
    pad = np.pad(img.astype(np.float64) / 255, ((r, r), (r, r), (0, 0)), mode="reflect")
    out = np.zeros(img.shape)
    for i, j in itertools.product(range(k), range(k)):
        out += g[i] * g[j] * pad[i:i + img.shape[0], j:j + img.shape[1]]
    return out * 255


@pytest.mark.parametrize("k", [3, 5])
def test_torchvision_blur_is_0_8_2s_pil_path_truncated(k):
    ph = Photometric(blur_prob=1.0, blur_kernel=k, blur_sigma=(0.1, 2.0))
    for seed in range(6):
        img = image(seed)
        d = ph.draw(np.random.default_rng(seed))
        assert d.blur and 0.1 <= d.sigma < 2.0
        got = ph.apply(img, d)
        # torchvision's own chain as 0.8.2's F.gaussian_blur runs it on a PIL image: to_tensor, blur, to_pil_image
        blur = T.GaussianBlur(k, sigma=(d.sigma, d.sigma))
        want = np.array(F.to_pil_image(blur(F.to_tensor(Image.fromarray(img)))))
        np.testing.assert_array_equal(got, want)
        # the formula: the grey level below the exact value (or one lower where float32 lands just under an integer)
        ref = reference_blur(img, d.sigma, k)
        near = np.abs(ref - np.round(ref)) < 1e-3
        assert (got[~near] == np.floor(ref[~near])).all()
        assert np.isin(got[near].astype(int) - np.round(ref[near]).astype(int), (-1, 0)).all()
        # today's torchvision PIL path rounds: at most one grey level apart, higher on average
        rounded = np.array(T.GaussianBlur(k, sigma=(d.sigma, d.sigma))(Image.fromarray(img)))
        diff = rounded.astype(int) - got.astype(int)
        assert np.abs(diff).max() <= 1 and 0.2 < diff.mean() < 0.8


def test_pil_blur_is_pils_gaussian_blur_with_the_drawn_radius():
    ph = Photometric(blur_prob=0.5, blur_kind="pil", blur_sigma=(0.0, 1.0))
    blurred = 0
    for seed in range(20):
        img = image(seed)
        d = ph.draw(np.random.default_rng(seed))
        assert 0.0 <= d.sigma < 1.0
        want = np.array(Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius=d.sigma))) if d.blur else img
        np.testing.assert_array_equal(ph.apply(img, d), want)
        blurred += d.blur
    assert 4 <= blurred <= 16


def test_draws_follow_the_stated_distributions():
    ph = Photometric(jitter=(0.5, 0.5, 1.5, 0.2), jitter_prob=0.6, grayscale_prob=0.2, blur_prob=0.5,
                     blur_sigma=(0.1, 2.0))
    n = 4000
    draws = [ph.draw(np.random.default_rng([7, i])) for i in range(n)]
    assert abs(np.mean([d.jitter for d in draws]) - 0.6) < 0.03
    assert abs(np.mean([d.grayscale for d in draws]) - 0.2) < 0.03
    assert abs(np.mean([d.blur for d in draws]) - 0.5) < 0.03
    f = np.array([d.factors for d in draws])  # (n, 4)
    for col, (lo, hi) in enumerate(jitter_ranges((0.5, 0.5, 1.5, 0.2))):
        assert lo <= f[:, col].min() and f[:, col].max() < hi
        assert abs(f[:, col].mean() - (lo + hi) / 2) < 0.03 * (hi - lo)
    assert jitter_ranges((0.5, 0.5, 1.5, 0.2)) == ((0.5, 1.5), (0.5, 1.5), (0.0, 2.5), (-0.2, 0.2))
    counts = {}
    for d in draws:
        counts[d.order] = counts.get(d.order, 0) + 1
    assert len(counts) == 24 and min(counts.values()) > n / 24 * 0.7  # a uniform random order
    s = np.array([d.sigma for d in draws])
    assert 0.1 <= s.min() and s.max() < 2.0 and abs(s.mean() - 1.05) < 0.03


def test_a_seed_fixes_the_result_and_nothing_is_drawn_when_off():
    ph = Photometric(**SDCA)
    img = image(0)
    a = ph(img, np.random.default_rng(11))
    np.testing.assert_array_equal(a, ph(img, np.random.default_rng(11)))
    assert not np.array_equal(a, ph(img, np.random.default_rng(12)))
    off = Photometric(jitter=(0.5, 0.5, 0.5, 0.2), jitter_prob=0.0)
    assert not off.enabled and not Photometric().enabled
    rng = np.random.default_rng(3)
    assert off.draw(rng) == PhotometricDraws()
    assert rng.random() == np.random.default_rng(3).random()
    np.testing.assert_array_equal(off(img, rng), img)


def test_bad_arguments_are_rejected():
    for kwargs, match in [(dict(jitter=(0.5, 0.5, 0.5, 0.6)), "hue <= 0.5"), (dict(jitter=(-1, 0, 0, 0)), "jitter"),
                          (dict(blur_prob=1.5), "blur_prob 1.5"), (dict(blur_kernel=4), "blur_kernel 4"),
                          (dict(blur_kind="box"), "blur_kind 'box'"), (dict(blur_sigma=(0.0, 1.0)), "blur_sigma"),
                          (dict(blur_sigma=(2.0, 1.0), blur_kind="pil"), "blur_sigma")]:
        with pytest.raises(ValueError, match=match):
            Photometric(**kwargs)
    with pytest.raises(ValueError, match="uint8"):
        Photometric(**SDCA).apply(image(0).astype(np.float32), PhotometricDraws(blur=True, sigma=1.0))
