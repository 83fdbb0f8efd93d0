"""ClassMix masks and mixing: invariants and determinism."""

import math

import pytest
import torch

from uda_ray.adaptation import classmix_masks, mix, num_mixed_classes


def _labels(seed=0, b=6, h=12, w=12):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 5, (b, h, w), generator=g)
    labels[:, :3] = 255  # many ignore pixels
    return labels


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7, 1.0, 0.0])
def test_pastes_whole_classes_never_ignore(ratio):
    labels = _labels()
    masks = classmix_masks(labels, ratio=ratio, prob=1.0, generator=torch.Generator().manual_seed(1))
    for lbl, m in zip(labels, masks):
        present = [c for c in lbl.unique().tolist() if c != 255]
        pasted = lbl[m].unique().tolist()
        assert 255 not in pasted
        assert len(pasted) == math.ceil(ratio * len(present) - 1e-9)
        for c in pasted:  # every pixel of a chosen class is pasted
            assert m[lbl == c].all()


def test_num_mixed_classes_rounding():
    assert num_mixed_classes(10, 0.3) == 3
    assert num_mixed_classes(5, 0.5) == 3
    assert num_mixed_classes(1, 0.5) == 1
    assert num_mixed_classes(0, 0.5) == 0


def test_probability():
    labels = _labels(b=200, h=4, w=4)
    labels[:, 3, 0] = 1  # every image has at least one class
    none = classmix_masks(labels, ratio=0.5, prob=0.0, generator=torch.Generator().manual_seed(0))
    assert not none.any()
    every = classmix_masks(labels, ratio=0.5, prob=1.0, generator=torch.Generator().manual_seed(0))
    assert every.flatten(1).any(1).all()
    half = classmix_masks(labels, ratio=0.5, prob=0.5, generator=torch.Generator().manual_seed(0))
    assert 0.35 < half.flatten(1).any(1).float().mean().item() < 0.65


def test_deterministic_by_generator():
    labels = _labels(2)
    a = classmix_masks(labels, ratio=0.5, prob=0.8, generator=torch.Generator().manual_seed(7))
    b = classmix_masks(labels, ratio=0.5, prob=0.8, generator=torch.Generator().manual_seed(7))
    c = classmix_masks(labels, ratio=0.5, prob=0.8, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_mix_images_labels_weights():
    mask = torch.tensor([[[True, False], [False, True]]])
    img_a, img_b = torch.ones(1, 3, 2, 2), torch.zeros(1, 3, 2, 2)
    out = mix(mask, img_a, img_b)
    assert torch.equal(out, mask[:, None].expand(1, 3, 2, 2).float())
    src_lbl, pseudo = torch.full((1, 2, 2), 4), torch.full((1, 2, 2), 7)
    assert mix(mask, src_lbl, pseudo).tolist() == [[[4, 7], [7, 4]]]
    omega = torch.full((1, 2, 2), 0.3)
    torch.testing.assert_close(mix(mask, torch.ones_like(omega), omega), torch.tensor([[[1.0, 0.3], [0.3, 1.0]]]))
    with pytest.raises(ValueError, match="mix"):
        mix(mask, torch.zeros(1, 3, 3), torch.zeros(1, 3, 3))
