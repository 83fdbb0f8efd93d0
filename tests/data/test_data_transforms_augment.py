"""TrainTransform's random rescale before the crop (SDCA's RandomScale) and per-image photometric ops, against a
written-out pipeline on the same draws; the defaults change nothing, draws included."""

import cv2
import numpy as np
import pytest
import torch

from uda_ray.data.pil_photometric import Photometric
from uda_ray.data.transforms import IMAGENET_MEAN, TrainTransform

SDCA_PHOTOMETRIC = Photometric(jitter=(0.5, 0.5, 0.5, 0.2), grayscale_prob=0.2, blur_prob=1.0, blur_kernel=3,
                               blur_sigma=(0.1, 2.0))


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the blur is a tiny conv2d: a thread pool only adds waiting on a shared machine
    yield
    torch.set_num_threads(threads)


def _pair(h=24, w=40, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    label = rng.choice(np.array([0, 7, 13, 255], np.uint8), (h, w))
    return image, label


def reference(image, label, rng, *, resize, crop, scale, flip=True, margins=None, photometric=None):
    """SDCA's train pipeline in uda-ray's terms, written out: s = lo + (hi − lo)·u, one resize from the image as
    loaded to (int(h·s), int(w·s)) (cv2 linear / nearest), crop top then left uniform in [0, max(size − crop, 0)],
    flip with probability 0.5, photometric ops on the uint8 crop, padding at the bottom and right (mean / 255)."""
    s = scale[0] + (scale[1] - scale[0]) * rng.random()
    size = (int(resize[0] * s), int(resize[1] * s))
    img = cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    lab = cv2.resize(label, (size[1], size[0]), interpolation=cv2.INTER_NEAREST)
    valid = None
    if margins is not None:
        top, bottom, left, right = margins
        valid = np.zeros(image.shape[:2], np.uint8)
        valid[top:image.shape[0] - bottom, left:image.shape[1] - right] = 1
        valid = cv2.resize(valid, (size[1], size[0]), interpolation=cv2.INTER_NEAREST)
    t = int(rng.integers(0, max(size[0] - crop[0], 0) + 1))
    left = int(rng.integers(0, max(size[1] - crop[1], 0) + 1))
    f = flip and rng.random() < 0.5
    cut = (slice(t, t + crop[0]), slice(left, left + crop[1]))
    img, lab = img[cut], lab[cut]
    valid = valid[cut] if valid is not None else None
    if f:
        img, lab = img[:, ::-1], lab[:, ::-1]
        valid = valid[:, ::-1] if valid is not None else None
    if photometric is not None:
        img = photometric(np.ascontiguousarray(img), rng)
    out_img = np.tile(np.array(IMAGENET_MEAN, np.float32), (*crop, 1))
    out_img[:img.shape[0], :img.shape[1]] = img / np.float32(255)
    out_lab = np.full(crop, 255, np.int64)
    out_lab[:lab.shape[0], :lab.shape[1]] = lab
    result = [torch.from_numpy(out_img).permute(2, 0, 1), torch.from_numpy(out_lab)]
    if valid is not None:
        v = np.zeros(crop, bool)
        v[:valid.shape[0], :valid.shape[1]] = valid.astype(bool)
        result.append(torch.from_numpy(v))
    return result


@pytest.mark.parametrize(("scale", "photometric"), [((0.5, 1.5), None), ((0.3, 0.9), None),
                                                    ((0.5, 1.5), SDCA_PHOTOMETRIC)])
def test_scale_crop_flip_photometric_match_the_written_out_pipeline(scale, photometric):
    image, label = _pair()
    resize, crop = (24, 40), (12, 20)
    tf = TrainTransform(resize, crop, flip=True, scale=scale, photometric=photometric)
    sizes = set()
    for seed in range(25):
        got = tf(image, label, np.random.default_rng(seed))
        want = reference(image, label, np.random.default_rng(seed), resize=resize, crop=crop, scale=scale,
                         photometric=photometric)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        s = scale[0] + (scale[1] - scale[0]) * np.random.default_rng(seed).random()
        sizes.add((int(24 * s), int(40 * s)))
    assert len(sizes) > 10  # the scale is drawn per sample
    if scale[1] < 1:  # every scaled image is smaller than 24×40; some smaller than the crop: padded
        assert any((tf(image, label, np.random.default_rng(s))[1] == 255).all(dim=0).any() for s in range(25))


def test_scale_resizes_once_from_the_image_as_loaded_and_carries_the_pseudo_margins():
    image, label = _pair(30, 50, seed=3)
    resize, crop, margins = (24, 40), (16, 16), (2, 3, 4, 5)
    tf = TrainTransform(resize, crop, flip=True, scale=(0.6, 1.4), pseudo_margins=margins)
    for seed in range(15):
        got = tf(image, label, np.random.default_rng(seed))
        want = reference(image, label, np.random.default_rng(seed), resize=resize, crop=crop, scale=(0.6, 1.4),
                         margins=margins)
        assert len(got) == 3 and all(torch.equal(a, b) for a, b in zip(got, want))


def test_photometric_changes_the_image_only_after_the_same_geometry():
    image, label = _pair()
    plain = TrainTransform((24, 40), (12, 20), flip=True)
    augmented = TrainTransform((24, 40), (12, 20), flip=True, photometric=SDCA_PHOTOMETRIC)
    for seed in range(10):
        a_img, a_lab = plain(image, label, np.random.default_rng(seed))
        b_img, b_lab = augmented(image, label, np.random.default_rng(seed))
        assert torch.equal(a_lab, b_lab) and not torch.equal(a_img, b_img)
        # the photometric draws come after the crop and flip draws, from the same generator
        rng = np.random.default_rng(seed)
        plain(image, label, rng)
        crop = (a_img * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        want = torch.from_numpy(SDCA_PHOTOMETRIC(crop, rng)).permute(2, 0, 1).float() / 255
        assert torch.equal(b_img, want)


def test_defaults_change_nothing_draws_included():
    image, label = _pair()
    base = TrainTransform((20, 30), (10, 10), flip=True, cat_max_ratio=0.75)
    same = TrainTransform((20, 30), (10, 10), flip=True, cat_max_ratio=0.75, scale=(1.0, 1.0),
                          photometric=Photometric(jitter=(0.5, 0.5, 0.5, 0.2), jitter_prob=0.0))
    assert same.photometric is None and same.scale == (1.0, 1.0)
    for seed in range(10):
        r1, r2 = np.random.default_rng(seed), np.random.default_rng(seed)
        a, b = base(image, label, r1), same(image, label, r2)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        assert r1.random() == r2.random()  # the same number of draws


def test_no_generator_stays_deterministic_without_scale_or_photometric():
    image, label = _pair()
    tf = TrainTransform((24, 40), (12, 20), flip=True, scale=(0.5, 1.5), photometric=SDCA_PHOTOMETRIC)
    plain = TrainTransform((24, 40), (12, 20), flip=True)
    assert all(torch.equal(a, b) for a, b in zip(tf(image, label, None), plain(image, label, None)))


def test_bad_scale_is_rejected():
    for scale in [(0.0, 1.0), (1.5, 0.5), (1.0,)]:
        with pytest.raises(ValueError, match="scale"):
            TrainTransform((24, 40), (12, 20), flip=True, scale=scale)
