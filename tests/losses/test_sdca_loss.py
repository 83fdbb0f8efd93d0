"""sdca_loss against explicit loops of METHODS.md §5 and a hand value."""

import math

import pytest
import torch

from uda_ray.losses import sdca_loss


def reference(feats, labels, mean, var, tau, ignore=255):
    total, count = feats.sum() * 0, 0
    for i in range(len(labels)):
        y = int(labels[i])
        if y == ignore:
            continue
        f = feats[i] / feats[i].norm()
        logits = []
        for k in range(mean.shape[0]):
            mu = mean[k] / mean[k].norm() if mean[k].norm() > 0 else mean[k]
            sigma = var[k] / var[k].norm() if var[k].norm() > 0 else var[k]
            logits.append((f @ mu + 0.5 * ((f * f) @ sigma) / tau) / tau)
        logits = torch.stack(logits)
        ce = torch.log(torch.exp(logits).sum()) - logits[y]
        sigma_y = var[y] / var[y].norm() if var[y].norm() > 0 else var[y]
        total = total + ce + 0.5 * ((f * f) @ sigma_y / tau) / tau
        count += 1
    return total / max(count, 1)


@pytest.mark.parametrize("tau", [100.0, 1.0])
def test_matches_reference(tau):
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(10, 6, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 255, 0, 1, 2, 3, 3, 255])
    mean = torch.randn(4, 6, generator=g, dtype=torch.float64)
    var = torch.rand(4, 6, generator=g, dtype=torch.float64)
    mean[3], var[3] = 0, 0  # a class never seen: zero statistics
    got = sdca_loss(feats, labels, mean, var, tau=tau)
    want = reference(feats, labels, mean, var, tau)
    torch.testing.assert_close(got, want)
    (g1,) = torch.autograd.grad(got, feats)
    (g2,) = torch.autograd.grad(want, feats)
    torch.testing.assert_close(g1, g2)
    assert g1[3].abs().max() == 0


def test_hand_value():
    # f̂ = e1, μ̂ = (e1, e2), Σ̂ = (e1, e2), τ = 2: spread = (0.5, 0), logits = ((1 + 0.25)/2, 0) = (0.625, 0);
    # L = softplus(−0.625) + ½ · 0.5 / 2.
    feats = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    labels = torch.tensor([0, 255])
    mean = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    var = torch.tensor([[0.5, 0.0], [0.0, 4.0]])
    want = math.log(1 + math.exp(-0.625)) + 0.125
    assert sdca_loss(feats, labels, mean, var, tau=2.0).item() == pytest.approx(want, rel=1e-6)


def test_all_ignored_is_zero():
    feats = torch.randn(3, 2, requires_grad=True)
    loss = sdca_loss(feats, torch.full((3,), 255), torch.ones(2, 2), torch.ones(2, 2))
    (g,) = torch.autograd.grad(loss, feats)
    assert loss.item() == 0.0 and torch.equal(g, torch.zeros_like(g))
