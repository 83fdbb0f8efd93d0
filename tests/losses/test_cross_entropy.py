"""cross_entropy against a pixel loop and a hand value."""

import math

import pytest
import torch

from uda_ray.losses import cross_entropy


def reference(logits, labels, weights, ignore=255):
    total, count = logits.sum() * 0, 0
    b, _, h, w = logits.shape
    for i in range(b):
        for y in range(h):
            for x in range(w):
                c = int(labels[i, y, x])
                if c == ignore:
                    continue
                z = logits[i, :, y, x]
                nll = torch.log(torch.exp(z).sum()) - z[c]
                total = total + (1.0 if weights is None else weights[i, y, x]) * nll
                count += 1
    return total / max(count, 1)


@pytest.mark.parametrize("use_weights", [False, True])
def test_matches_reference(use_weights):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 4, (2, 3, 5), generator=g)
    labels[0, 0] = 255
    weights = torch.rand(2, 3, 5, generator=g, dtype=torch.float64) if use_weights else None
    if weights is not None:
        weights[1, 2] = 0.0
    got = cross_entropy(logits, labels, weights)
    want = reference(logits, labels, weights)
    torch.testing.assert_close(got, want)
    (g1,) = torch.autograd.grad(got, logits)
    (g2,) = torch.autograd.grad(want, logits)
    torch.testing.assert_close(g1, g2)
    assert g1[0, :, 0].abs().max() == 0  # ignored pixels get no gradient


def test_hand_value_scalar_weight_and_all_ignored():
    logits = torch.zeros(2, 4, 1, 2, requires_grad=True)
    labels = torch.tensor([[[1, 255]], [[2, 3]]])
    weights = torch.tensor([0.5, 0.25])[:, None, None].expand(2, 1, 2)  # per-image scalar, broadcast
    # (0.5 + 0.25 + 0.25) · log 4 over 3 valid pixels
    assert cross_entropy(logits, labels, weights).item() == pytest.approx(math.log(4) / 3, rel=1e-6)
    loss = cross_entropy(logits, torch.full((2, 1, 2), 255))
    (g,) = torch.autograd.grad(loss, logits)
    assert loss.item() == 0.0 and torch.equal(g, torch.zeros_like(g))


def test_rejects_mismatched_weights():
    with pytest.raises(ValueError, match="weights"):
        cross_entropy(torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long), torch.ones(2))
