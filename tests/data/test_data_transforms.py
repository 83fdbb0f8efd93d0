"""Train/eval transforms: mmseg resize/crop/pad semantics, cat_max_ratio and RCS re-draws against written-out
references, deterministic for a seed, labels nearest, shapes; ImageNet normalisation."""

import cv2
import numpy as np
import pytest
import torch

from uda_ray.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    TrainTransform,
    cat_ratio_ok,
    normalize,
    rescaled_size,
)


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


def test_crop_larger_than_the_image_is_padded_like_mmseg():
    image, label = _pair(6, 8)
    for s in range(4):
        img, lab = TrainTransform((6, 8), (9, 11), flip=True)(image, label, np.random.default_rng(s))
        ref = np.random.default_rng(s)
        assert int(ref.integers(0, 1)) == 0 and int(ref.integers(0, 1)) == 0  # margins are 0: offsets 0
        flip = ref.random() < 0.5
        want_lab, want_img = (label[:, ::-1], image[:, ::-1]) if flip else (label, image)
        assert img.shape == (3, 9, 11) and lab.shape == (9, 11)
        assert np.array_equal(lab[:6, :8].numpy(), want_lab)  # flipped first, then padded at the bottom/right
        assert (lab[6:] == 255).all() and (lab[:, 8:] == 255).all()
        assert np.array_equal((img[:, :6, :8] * 255).round().byte().numpy(), want_img.transpose(2, 0, 1))
        pad = normalize(img)[:, 6:, :]
        assert torch.allclose(pad, torch.zeros_like(pad), atol=1e-6)  # mmseg pads with 0 after Normalize


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="cat_max_ratio"):
        TrainTransform((8, 8), (4, 4), flip=False, cat_max_ratio=0.0)
    with pytest.raises(ValueError, match="crop"):
        TrainTransform((8, 8), (0, 4), flip=False)


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


# ------------------------------------------------------------------------------------- mmseg resize semantics
@pytest.mark.parametrize(("size", "bound", "want"), [
    ((1052, 1914), (720, 1280), (704, 1280)),  # GTA5 in DAFormer: img_scale (1280, 720)
    ((760, 1280), (760, 1280), (760, 1280)),  # SYNTHIA: (1280, 760)
    ((1024, 2048), (512, 1024), (512, 1024)),  # Cityscapes: (1024, 512)
    ((1024, 2048), (1024, 2048), (1024, 2048)),
    ((10, 30), (6, 8), (3, 8)),  # long side binds
    ((30, 10), (8, 6), (8, 3)),
])
def test_rescaled_size_is_mmcv_rescale_size(size, bound, want):
    assert rescaled_size(size, bound) == want
    assert rescaled_size(size, bound[::-1]) == want  # only the long and the short side of the bound matter
    h, w = size  # mmcv: s = min(long / long_edge, short / short_edge), new = int(x * s + 0.5)
    s = min(max(bound) / max(h, w), min(bound) / min(h, w))
    assert want == (int(h * s + 0.5), int(w * s + 0.5))


def test_keep_ratio_transforms_resize_to_fit():
    image = np.zeros((1052, 1914, 3), np.uint8)
    label = np.tile((np.arange(1914) % 19).astype(np.uint8), (1052, 1))
    label[::7] = 255
    img, lab = EvalTransform((720, 1280), keep_ratio=True)(image, label)
    assert img.shape == (3, 704, 1280) and lab.shape == (1052, 1914)
    img, lab = EvalTransform((720, 1280))(image, label)
    assert img.shape == (3, 720, 1280)
    resized = cv2.resize(label, (1280, 704), interpolation=cv2.INTER_NEAREST)
    tf = TrainTransform((720, 1280), (512, 512), flip=True, keep_ratio=True)
    for s in range(3):  # offsets drawn within the 704 x 1280 resized image
        img, lab = tf(image, label, np.random.default_rng(s))
        ref = np.random.default_rng(s)
        y, x, f = int(ref.integers(0, 704 - 512 + 1)), int(ref.integers(0, 1280 - 512 + 1)), ref.random() < 0.5
        want = resized[y:y + 512, x:x + 512]
        assert img.shape == (3, 512, 512)
        assert np.array_equal(lab.numpy(), want[:, ::-1] if f else want)


def test_resize_is_cv2_linear_for_images_and_nearest_for_labels():
    image, label = _pair(37, 53, seed=3)
    img, lab = TrainTransform((16, 24), (16, 24), flip=False)(image, label, None)
    want_img = cv2.resize(image, (24, 16), interpolation=cv2.INTER_LINEAR)  # what mmcv.imresize calls
    want_lab = cv2.resize(label, (24, 16), interpolation=cv2.INTER_NEAREST)
    assert np.array_equal((img * 255).round().byte().numpy(), want_img.transpose(2, 0, 1))
    assert np.array_equal(lab.numpy(), want_lab)
    ev, _ = EvalTransform((16, 24))(image, label)
    assert torch.equal(ev, img)


# ----------------------------------------------------------------------------------- cat_max_ratio and RCS
def _reference_crop(label, crop, rng, cat_max_ratio=1.0, flip=True, rcs=None):
    """mmseg RandomCrop + RandomFlip written out, re-run as DAFormer's get_rare_class_sample does for ``rcs``."""
    h, w = label.shape
    ch, cw = crop

    def draw():
        return int(rng.integers(0, max(h - ch, 0) + 1)), int(rng.integers(0, max(w - cw, 0) + 1))

    def pipeline():
        y, x = draw()
        if cat_max_ratio < 1.0:
            for _ in range(10):
                labels, cnt = np.unique(label[y:y + ch, x:x + cw], return_counts=True)
                cnt = cnt[labels != 255]
                if len(cnt) > 1 and np.max(cnt) / np.sum(cnt) < cat_max_ratio:
                    break
                y, x = draw()
        f = flip and rng.random() < 0.5
        out = label[y:y + ch, x:x + cw]
        return (out[:, ::-1] if f else out), (y, x, f)

    out, meta = pipeline()
    if rcs is not None:
        c, need = rcs
        for _ in range(10):
            if np.sum(out == c) > need:
                break
            out, meta = pipeline()
    return out, meta


def _blocky_label(seed, h=24, w=32):
    rng = np.random.default_rng(seed)
    label = np.zeros((h, w), np.uint8)  # mostly road: many crops hold a single class
    label[rng.integers(0, h - 6):, :rng.integers(3, 10)] = 13
    label[:3, :] = 255
    label[rng.integers(0, h - 4), rng.integers(0, w - 4)] = 5
    return label


@pytest.mark.parametrize("ratio", [0.75, 0.5, 1.0])
def test_cat_max_ratio_matches_the_mmseg_loop(ratio):
    retried = 0
    for seed in range(40):
        label = _blocky_label(seed)
        image = np.repeat(label[:, :, None], 3, axis=2)
        tf = TrainTransform(label.shape, (8, 8), flip=True, cat_max_ratio=ratio)
        _, lab = tf(image, label, np.random.default_rng(seed))
        want, _ = _reference_crop(label, (8, 8), np.random.default_rng(seed), cat_max_ratio=ratio)
        assert np.array_equal(lab.numpy(), want)
        first, _ = _reference_crop(label, (8, 8), np.random.default_rng(seed))
        retried += not np.array_equal(first, want)
    assert (retried > 0) == (ratio < 1.0)  # the loop did re-draw some crops


def test_cat_max_ratio_keeps_the_eleventh_draw_when_none_passes():
    label = np.full((20, 20), 7, np.uint8)  # one class: no crop passes (len(cnt) > 1 fails)
    tf = TrainTransform((20, 20), (5, 5), flip=False, cat_max_ratio=0.75)
    rng = np.random.default_rng(0)
    img, _ = tf(np.arange(1200, dtype=np.uint8).reshape(20, 20, 3) % 251, label, rng)
    ref = np.random.default_rng(0)
    boxes = [(int(ref.integers(0, 16)), int(ref.integers(0, 16))) for _ in range(11)]
    assert rng.random() == ref.random()  # exactly 11 crop draws (22 integers) were consumed
    y, x = boxes[-1]
    want = (np.arange(1200, dtype=np.uint8).reshape(20, 20, 3) % 251)[y:y + 5, x:x + 5]
    assert np.array_equal((img * 255).round().byte().numpy(), want.transpose(2, 0, 1))


def test_rcs_redraws_match_daformer_and_reach_the_threshold_when_possible():
    reached = 0
    for seed in range(30):
        label = np.zeros((30, 40), np.uint8)
        label[2:10, 30:38] = 11  # a rare 'person' patch in one corner: 64 pixels
        image = np.repeat(label[:, :, None], 3, axis=2)
        tf = TrainTransform((30, 40), (12, 12), flip=True, cat_max_ratio=0.75, rcs_min_crop_pixels=20)
        _, lab = tf(image, label, np.random.default_rng(seed), rcs_class=11)
        want, _ = _reference_crop(label, (12, 12), np.random.default_rng(seed), 0.75, rcs=(11, 20))
        assert np.array_equal(lab.numpy(), want)
        reached += int((lab == 11).sum()) > 20
        _, plain = tf(image, label, np.random.default_rng(seed))  # no class requirement: no RCS re-draws
        assert np.array_equal(plain.numpy(), _reference_crop(label, (12, 12), np.random.default_rng(seed), 0.75)[0])
    assert reached >= 25  # 11 tries of a crop that holds > 20 of the patch's pixels with probability ~0.2 each


def test_rcs_requirement_is_ignored_without_a_threshold_or_a_generator():
    image, label = _pair(20, 30)
    tf = TrainTransform((20, 30), (8, 8), flip=True)
    a = tf(image, label, np.random.default_rng(1), rcs_class=7)
    b = tf(image, label, np.random.default_rng(1))
    assert torch.equal(a[1], b[1])
    c = TrainTransform((20, 30), (8, 8), flip=True, rcs_min_crop_pixels=1e9)(image, label, None, rcs_class=7)
    assert np.array_equal(c[1].numpy(), label[6:14, 11:19])  # centre crop, no re-draws


def test_cat_ratio_ok_condition():
    assert not cat_ratio_ok(np.array([[1, 1], [255, 255]], np.uint8), 0.75)  # one class
    assert cat_ratio_ok(np.array([[1, 2], [255, 255]], np.uint8), 0.75)
    assert not cat_ratio_ok(np.array([[1, 1, 1, 2]], np.uint8), 0.75)  # 0.75 is not < 0.75
    assert not cat_ratio_ok(np.full((2, 2), 255, np.uint8), 0.75)


def test_all_options_are_deterministic_per_seed():
    image, label = _pair(45, 70, seed=2)
    tf = TrainTransform((30, 50), (16, 16), flip=True, keep_ratio=True, cat_max_ratio=0.75, rcs_min_crop_pixels=40)
    runs = [tf(image, label, np.random.default_rng(s), rcs_class=13) for s in (8, 8, 9, 10)]
    assert runs[0][0].shape == (3, 16, 16)
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert any(not torch.equal(runs[0][1], r[1]) for r in runs[2:])


def test_pseudo_margins_follow_the_crop_and_flip():
    """HRDA's valid_pseudo_mask: margins of the image as loaded, carried through resize, crop and flip. A label that
    encodes each pixel's column and row tells where the crop came from."""
    h, w = 10, 20
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    image = np.zeros((h, w, 3), np.uint8)
    position = (rows * w + cols).astype(np.int64)  # (H, W): where each pixel was
    margins = (2, 3, 3, 4)
    expected_full = (rows >= 2) & (rows < h - 3) & (cols >= 3) & (cols < w - 4)
    tf = TrainTransform((h, w), (6, 12), flip=True, pseudo_margins=margins)
    seen_flip = set()
    for seed in range(20):
        img, lab, valid = tf(image, (position % 251).astype(np.uint8), np.random.default_rng(seed))
        assert valid.shape == (6, 12) and valid.dtype == torch.bool
        # find the crop from the same draws without margins (the mask does not change the draws)
        _, lab_plain = TrainTransform((h, w), (6, 12), flip=True)(image, (position % 251).astype(np.uint8),
                                                                  np.random.default_rng(seed))
        assert torch.equal(lab, lab_plain)
        flat = lab.numpy().astype(np.int64)
        # positions are unique modulo 251 over this 10 × 20 image
        where = {int(v): (r, c) for (r, c), v in np.ndenumerate(position % 251)}
        want = np.array([[expected_full[where[int(v)]] for v in row] for row in flat])
        assert np.array_equal(valid.numpy(), want)
        seen_flip.add(bool(flat[0, 0] > flat[0, -1]))
    assert seen_flip == {True, False}
    assert len(TrainTransform((h, w), (6, 12), flip=True)(image, position.astype(np.uint8) % 251,
                                                            np.random.default_rng(0))) == 2  # no margins: no mask
    with pytest.raises(ValueError, match="leave nothing"):
        TrainTransform((h, w), (6, 12), flip=False, pseudo_margins=(5, 5, 0, 0))(image, image[..., 0], None)


def test_pseudo_margins_are_made_before_the_resize():
    image = np.zeros((10, 20, 3), np.uint8)
    label = np.zeros((10, 20), np.uint8)
    _, _, valid = TrainTransform((20, 40), (20, 40), flip=False, pseudo_margins=(1, 2, 3, 0))(image, label, None)
    expected = torch.zeros(20, 40, dtype=torch.bool)
    expected[2:16, 6:] = True  # every margin doubled by the ×2 nearest resize
    assert torch.equal(valid, expected)
