"""prototype_contrast against explicit loops: partially filled and empty banks, ignore pixels, hand values."""

import math

import pytest
import torch

from uda_ray.losses import bank_class_means, prototype_contrast


def reference(feats, labels, bank, tau, ignore=255):
    """Class score = mean over the class's filled (non-zero) entries of f̂·m̂/τ; NLL over the filled classes."""
    f = feats / feats.norm(dim=1, keepdim=True)
    classes = range(bank.shape[0])
    filled = {c: [k for k in range(bank.shape[1]) if bank[c, k].abs().max() > 0] for c in classes}
    live = [c for c in classes if filled[c]]
    total, count = feats.sum() * 0, 0
    for i in range(len(labels)):
        y = int(labels[i])
        if y == ignore or not filled[y]:
            continue
        scores = {}
        for c in live:
            s = 0
            for k in filled[c]:
                m = bank[c, k] / bank[c, k].norm()
                s = s + f[i] @ m / tau
            scores[c] = s / len(filled[c])
        denominator = sum(torch.exp(scores[c]) for c in live)
        total = total + torch.log(denominator) - scores[y]
        count += 1
    return total / max(count, 1)


def _bank(seed):
    g = torch.Generator().manual_seed(seed)
    bank = torch.randn(5, 3, 4, generator=g, dtype=torch.float64)
    bank[1, 1:] = 0  # one entry only
    bank[2] = 0  # empty class
    bank[4, 0] = 0  # a hole in the middle
    return bank


@pytest.mark.parametrize("tau", [0.07, 1.0])
def test_matches_reference(tau):
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(12, 4, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 4, 255, 0, 2, 1, 3, 4, 4])
    bank = _bank(1)
    got = prototype_contrast(feats, labels, bank, temperature=tau)
    want = reference(feats, labels, bank, tau)
    torch.testing.assert_close(got, want)
    (g1,) = torch.autograd.grad(got, feats)
    (g2,) = torch.autograd.grad(want, feats)
    torch.testing.assert_close(g1, g2)
    # pixels of the empty class and ignore pixels are not anchors
    assert g1[2].abs().max() == 0 and g1[5].abs().max() == 0 and g1[7].abs().max() == 0


def test_hand_values():
    bank = torch.tensor([[[1.0, 0.0]], [[0.0, 2.0]]])  # centroids e1, e2 (norm does not matter)
    feats = torch.tensor([[3.0, 0.0]])
    labels = torch.tensor([0])
    assert prototype_contrast(feats, labels, bank, temperature=1.0).item() == pytest.approx(
        math.log(1 + math.exp(-1)), rel=1e-6)
    half_empty = bank.clone()
    half_empty[1] = 0  # only class 0 left: the softmax has one class, NLL 0
    assert prototype_contrast(feats, labels, half_empty, temperature=1.0).item() == pytest.approx(0.0, abs=1e-7)
    # K = 2: class 0 score is the mean of its two entries' similarities (1 and 0) = 0.5
    two = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [0.0, 0.0]]])
    assert prototype_contrast(feats, labels, two, temperature=1.0).item() == pytest.approx(
        math.log(1 + math.exp(-0.5)), rel=1e-6)


def test_empty_bank_gives_zero():
    feats = torch.randn(6, 4, requires_grad=True)
    loss = prototype_contrast(feats, torch.arange(6) % 3, torch.zeros(3, 2, 4))
    (g,) = torch.autograd.grad(loss, feats)
    assert loss.item() == 0.0 and torch.equal(g, torch.zeros_like(g))


def test_bank_class_means():
    means, filled = bank_class_means(_bank(2))
    assert filled.tolist() == [True, True, False, True, True]
    torch.testing.assert_close(means[2], torch.zeros(4, dtype=torch.float64))
    b = _bank(2)
    torch.testing.assert_close(means[4], (b[4, 1] / b[4, 1].norm() + b[4, 2] / b[4, 2].norm()) / 2)
