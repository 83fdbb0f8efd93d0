"""entropy_loss, cross-view contrasts and class_prototypes against loops and hand values."""

import math

import pytest
import torch

from uda_ray.losses import (
    class_prototypes,
    cross_view_contrast,
    cross_view_prototype_contrast,
    entropy_loss,
)


def entropy_reference(logits):
    b, c, h, w = logits.shape
    total = logits.sum() * 0
    for i in range(b):
        for y in range(h):
            for x in range(w):
                p = torch.softmax(logits[i, :, y, x], dim=0)
                total = total - sum(p[k] * torch.log(p[k]) for k in range(c))
    return total / (b * h * w * math.log(c))


def test_entropy_matches_reference_and_hand_values():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    got, want = entropy_loss(logits), entropy_reference(logits)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, logits)[0], torch.autograd.grad(want, logits)[0])
    assert entropy_loss(torch.zeros(1, 7, 2, 2)).item() == pytest.approx(1.0, rel=1e-6)
    two = torch.tensor([0.0, math.log(3)])[None, :, None, None]  # p = (1/4, 3/4)
    want = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)) / math.log(2)
    assert entropy_loss(two).item() == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="entropy_loss"):
        entropy_loss(torch.zeros(1, 1, 2, 2))


def cross_view_reference(a, b, tau):
    z = torch.cat([a, b])
    z = z / z.norm(dim=1, keepdim=True)
    n = a.shape[0]
    total = a.sum() * 0
    for i in range(2 * n):
        p = (i + n) % (2 * n)
        denominator = sum(torch.exp(z[i] @ z[k] / tau) for k in range(2 * n) if k != i)
        total = total - torch.log(torch.exp(z[i] @ z[p] / tau) / denominator)
    return total / (2 * n)


@pytest.mark.parametrize("tau", [0.05, 0.5])
def test_cross_view_matches_reference(tau):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    got, want = cross_view_contrast(a, b, temperature=tau), cross_view_reference(a, b, tau)
    torch.testing.assert_close(got, want)
    for x, y in zip(torch.autograd.grad(got, [a, b]), torch.autograd.grad(want, [a, b])):
        torch.testing.assert_close(x, y)
    got_p = cross_view_prototype_contrast(a, b, temperature=tau)
    torch.testing.assert_close(got_p, want)


def test_cross_view_hand_values():
    e = torch.eye(2)
    # each anchor: positive similarity 1, two others at 0 → −log(e / (e + 2))
    assert cross_view_contrast(e, e, temperature=1.0).item() == pytest.approx(math.log(1 + 2 / math.e), rel=1e-6)
    # one row per view: the positive is the only other row → loss 0
    assert cross_view_contrast(e[:1], e[1:], temperature=1.0).item() == pytest.approx(0.0, abs=1e-7)


def test_class_prototypes():
    feats = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 5.0], [0.0, 4.0], [7.0, 7.0]])
    labels = torch.tensor([2, 2, 255, 0, 255])
    protos, ids = class_prototypes(feats, labels, num_classes=4)
    assert ids.tolist() == [0, 2]
    torch.testing.assert_close(protos, torch.tensor([[0.0, 4.0], [2.0, 1.0]]))
    with pytest.raises(ValueError, match="class_prototypes"):
        class_prototypes(feats, torch.tensor([2, 2, 9, 0, 255]), num_classes=4)
