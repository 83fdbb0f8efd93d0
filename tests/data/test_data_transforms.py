"""Train/eval transforms: deterministic for a seed, labels nearest, shapes; ImageNet normalisation."""

import numpy as np
import pytest
import torch

from uda_ray.data.transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, TrainTransform, normalize


def _pair(h=20, w=30, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    label = rng.choice(np.array([0, 7, 13, 255], np.uint8), (h, w))
    return image, label


def test_deterministic_for_a_seed_and_varies_across_seeds():
    image, label = _pair()
    tf = TrainTransform((16, 24), (8, 8), flip=True)
    runs = [tf(image, label, np.random.default_rng(s)) for s in (3, 3, 4, 5, 6)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert any(not torch.equal(runs[0][0], r[0]) for r in runs[2:])


def test_output_types_and_shapes():
    image, label = _pair()
    img, lab = TrainTransform((16, 24), (8, 12), flip=True)(image, label, np.random.default_rng(0))
    assert img.shape == (3, 8, 12) and img.dtype == torch.float32 and 0 <= img.min() and img.max() <= 1
    assert lab.shape == (8, 12) and lab.dtype == torch.int64


def test_labels_are_nearest_no_new_values():
    image, label = _pair(37, 53)
    for size in ((16, 24), (50, 70)):
        tf = TrainTransform(size, (12, 12), flip=True)
        for s in range(5):
            _, lab = tf(image, label, np.random.default_rng(s))
            assert set(lab.unique().tolist()) <= {0, 7, 13, 255}


def test_crop_and_flip_match_a_reference_without_resize():
    image, label = _pair(10, 12)
    tf = TrainTransform((10, 12), (4, 5), flip=True)
    for s in range(8):
        img, lab = tf(image, label, np.random.default_rng(s))
        ref = np.random.default_rng(s)  # same draws in the documented order: top, left, flip
        top, left, flip = int(ref.integers(0, 7)), int(ref.integers(0, 8)), ref.random() < 0.5
        want_lab = label[top:top + 4, left:left + 5]
        want_img = image[top:top + 4, left:left + 5]
        if flip:
            want_lab, want_img = want_lab[:, ::-1], want_img[:, ::-1]
        assert np.array_equal(lab.numpy(), want_lab)
        assert np.array_equal((img * 255).round().byte().numpy(), want_img.transpose(2, 0, 1))


def test_no_generator_is_a_centre_crop_without_flip():
    image, label = _pair(10, 12)
    img, lab = TrainTransform((10, 12), (4, 6), flip=True)(image, label, None)
    assert np.array_equal(lab.numpy(), label[3:7, 3:9])


def test_crop_larger_than_resize_is_rejected():
    with pytest.raises(ValueError, match="crop"):
        TrainTransform((8, 8), (9, 4), flip=False)


def test_eval_keeps_full_resolution_label():
    image, label = _pair(40, 60)
    img, lab = EvalTransform((20, 30))(image, label, None)
    assert img.shape == (3, 20, 30)
    assert np.array_equal(lab.numpy(), label)


def test_normalize_batched_and_single():
    x = torch.rand(2, 3, 4, 5)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(normalize(x), (x - mean) / std)
    assert torch.allclose(normalize(x[0]), ((x - mean) / std)[0])
    with pytest.raises(ValueError, match="shape"):
        normalize(torch.rand(2, 4, 4, 5))
