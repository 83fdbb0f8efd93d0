"""pixel_contrast against the N×N definition written with explicit loops, hand values, and chunked == direct."""

import math

import pytest
import torch

from uda_ray.losses import pixel_contrast


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def reference(feats, labels, weights, tau, ignore=255):
    """CLUDA loss, METHODS.md §2, one anchor and one pair at a time."""
    f = feats / feats.norm(dim=1, keepdim=True)
    anchors = [i for i in range(len(labels)) if labels[i] != ignore]
    total = feats.sum() * 0
    for i in anchors:
        positives = [j for j in anchors if j != i and labels[j] == labels[i]]
        negatives = [k for k in anchors if labels[k] != labels[i]]
        acc = feats.sum() * 0
        for j in positives:
            s_ij = f[i] @ f[j] / tau
            denominator = torch.exp(s_ij)
            for k in negatives:
                denominator = denominator + torch.exp(f[i] @ f[k] / tau)
            pi = 1.0 if weights is None else weights[i] * weights[j]
            acc = acc + pi * (s_ij - torch.log(denominator))
        if positives:
            total = total + acc / len(positives)
    return -total / len(anchors)


def _case(seed, n=14, d=5, classes=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, d, generator=g, dtype=dtype)
    labels = torch.randint(0, classes, (n,), generator=g)
    labels[0] = 255  # ignore pixels
    labels[3] = 255
    labels[5] = 9  # a class with a single pixel: an anchor without positives
    weights = torch.rand(n, generator=g, dtype=dtype)
    weights[2] = 0.0  # zero weight
    return feats, labels, weights


def _grads(fn, feats, weights):
    feats = feats.clone().requires_grad_(True)
    weights = None if weights is None else weights.clone().requires_grad_(True)
    loss = fn(feats, weights)
    grads = torch.autograd.grad(loss, [feats] + ([] if weights is None else [weights]))
    return loss.detach(), grads


@pytest.mark.parametrize("use_weights", [False, True])
@pytest.mark.parametrize("tau", [1.0, 0.1])
@pytest.mark.parametrize("chunk", [None, 4])
def test_matches_loop_reference_values_and_gradients(use_weights, tau, chunk):
    feats, labels, weights = _case(0)
    weights = weights if use_weights else None
    got, got_g = _grads(lambda f, w: pixel_contrast(f, labels, w, temperature=tau, chunk_size=chunk), feats, weights)
    want, want_g = _grads(lambda f, w: reference(f, labels, w, tau), feats, weights)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # ignore pixels receive no gradient; the zero-weight pixel still does (it is a negative of others)
    assert got_g[0][0].abs().max() == 0 and got_g[0][3].abs().max() == 0
    assert got_g[0][2].abs().max() > 0


def test_hand_computed_value():
    # f0 = f1 = e1 (class 0), f2 = e2 (class 1), tau = 1. Anchors 0 and 1: one positive (s = 1) and one negative
    # (s = 0): 1 − log(e + 1) each; anchor 2 has no positive and adds 0 but counts: L = 2/3 · log(1 + e^{-1}).
    feats = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [5.0, 5.0]])
    labels = torch.tensor([0, 0, 1, 255])
    want = 2 / 3 * math.log(1 + math.exp(-1))
    assert pixel_contrast(feats, labels).item() == pytest.approx(want, rel=1e-6)
    weights = torch.tensor([0.5, 0.4, 1.0, 1.0])
    assert pixel_contrast(feats, labels, weights).item() == pytest.approx(0.2 * want, rel=1e-6)


def test_degenerate_inputs_give_zero_with_finite_gradients():
    feats = torch.randn(6, 3, requires_grad=True)
    for labels in (torch.full((6,), 255), torch.zeros(6, dtype=torch.long), torch.arange(6)):
        for chunk in (None, 4):
            loss = pixel_contrast(feats, labels, chunk_size=chunk)
            (g,) = torch.autograd.grad(loss, feats)
            assert loss.item() == 0.0  # no anchors / no negatives / no positives
            assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("chunk", [None, 5])
def test_small_temperature_is_stable(chunk):
    feats, labels, weights = _case(3)
    got, got_g = _grads(lambda f, w: pixel_contrast(f.float(), labels, w.float(), temperature=0.005, chunk_size=chunk),
                        feats, weights)
    want, want_g = _grads(lambda f, w: reference(f, labels, w, 0.005), feats, weights)
    assert torch.isfinite(got) and all(torch.isfinite(g).all() for g in got_g)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * b.abs().max().item())


@pytest.mark.parametrize("chunk", [1, 7, 16, 64, 97, 500])
def test_chunked_equals_direct(chunk):
    g = torch.Generator().manual_seed(1)
    n = 97
    feats = torch.randn(n, 16, generator=g)
    labels = torch.randint(0, 5, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.1] = 255
    weights = torch.rand(n, generator=g)
    direct, direct_g = _grads(lambda f, w: pixel_contrast(f, labels, w, temperature=0.1), feats, weights)
    chunked, chunked_g = _grads(lambda f, w: pixel_contrast(f, labels, w, temperature=0.1, chunk_size=chunk),
                                feats, weights)
    torch.testing.assert_close(chunked, direct, rtol=1e-5, atol=0)
    for a, b in zip(chunked_g, direct_g):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="pixel_contrast"):
        pixel_contrast(torch.randn(4, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="weights"):
        pixel_contrast(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), torch.ones(3))
