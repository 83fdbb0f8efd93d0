"""multires_pixel_contrast against a per-anchor loop written from the formula, hand values, the official formula where
the two agree, chunked == direct, and the largest tensor the chunked form allocates."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from uda_ray.losses import multires_pixel_contrast


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def reference(lr, hr, labels, att, inside, weights, tau, ignore=255):
    """METHODS.md §11 with ignore pixels excluded and only inside-crop HR features as candidates, one pair at a time."""
    anchors = [i for i in range(len(labels)) if labels[i] != ignore]
    cands = [j for j in anchors if inside[j]]
    total = lr.sum() * 0
    for i in anchors:
        li = lr[i] / lr[i].norm()
        positives = [j for j in anchors if j != i and labels[j] == labels[i]]
        negatives = [k for k in anchors if labels[k] != labels[i]]
        acc = lr.sum() * 0
        for j in positives:
            w_ij = att[i] * att[j] * (1.0 if inside[i] else 0.0)
            om = 1.0 if weights is None else weights[i] * weights[j]
            s = li @ lr[j] / lr[j].norm() / tau
            den = torch.exp(s)
            for k in negatives:
                den = den + torch.exp(li @ lr[k] / lr[k].norm() / tau)
            acc = acc + om * w_ij * (s - torch.log(den))
            if j in cands:
                s = li @ hr[j] / hr[j].norm() / tau
                den = torch.exp(s)
                for k in negatives:
                    if k in cands:
                        den = den + torch.exp(li @ hr[k] / hr[k].norm() / tau)
                acc = acc + om * (1 - w_ij) * (s - torch.log(den))
        if positives:
            total = total + acc / len(positives)
    return -0.5 * total / len(anchors)


def official_formula(lr, hr, labels, att, weights):
    """The official multi_resolution_cl restated for one image whose whole grid lies in the detail crop, with no
    ignore and no road pixel (where its quirks do not apply): every row an anchor, HR term with the LR term's
    positives, both divided by the LR positives' count, 0.5 · mean over rows."""
    lo, hi = F.normalize(lr, dim=1), F.normalize(hr, dim=1)
    same = (labels[:, None] == labels[None, :]).to(lr.dtype)
    pos = same * (1 - torch.eye(len(labels), dtype=lr.dtype))
    sim_w = att[:, None] * att[None, :]

    def log_prob(s):
        neg = (torch.exp(s) * (1 - same)).sum(1, keepdim=True)
        return s - torch.log(torch.exp(s) + neg)

    log_p = log_prob(lo @ lo.T) * sim_w * pos + log_prob(lo @ hi.T) * (1 - sim_w) * pos
    if weights is not None:
        log_p = log_p * (weights[:, None] * weights[None, :])
    return 0.5 * (-log_p.sum(1) / pos.sum(1).clamp_min(1)).mean()


def _case(seed, images=2, pixels=8, d=4, classes=3, dtype=torch.float64):
    """A batch of ``images`` flattened batch-major; the detail crop is the first half of each image's pixels, hr a zero
    canvas outside it; a few ignore pixels, a singleton class, and a road (0) pixel inside the crop."""
    g = torch.Generator().manual_seed(seed)
    n = images * pixels
    lr = torch.randn(n, d, generator=g, dtype=dtype)
    inside = (torch.arange(n) % pixels) < pixels // 2
    hr = torch.randn(n, d, generator=g, dtype=dtype) * inside[:, None]
    labels = torch.randint(0, classes, (n,), generator=g)
    labels[0] = 0
    labels[[3, pixels + 5]] = 255
    labels[6] = 9  # a class with one pixel: an anchor without positives
    att = torch.rand(n, generator=g, dtype=dtype)
    weights = torch.rand(n, generator=g, dtype=dtype)
    weights[2] = 0.0
    return lr, hr, labels, att, inside, weights


def _grads(fn, lr, hr, att, weights):
    leaves = [t.clone().requires_grad_(True) for t in (lr, hr, att)]
    if weights is not None:
        leaves.append(weights.clone().requires_grad_(True))
    loss = fn(*leaves[:3], leaves[3] if weights is not None else None)
    return loss.detach(), torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("use_weights", [False, True])
@pytest.mark.parametrize("tau", [1.0, 0.2])
@pytest.mark.parametrize("chunk", [None, 3])
def test_matches_loop_reference_values_and_gradients(use_weights, tau, chunk):
    lr, hr, labels, att, inside, weights = _case(0)
    weights = weights if use_weights else None
    got, got_g = _grads(lambda a, b, c, w: multires_pixel_contrast(a, b, labels, att=c, inside=inside, weights=w,
                                                                   temperature=tau, chunk_size=chunk),
                        lr, hr, att, weights)
    want, want_g = _grads(lambda a, b, c, w: reference(a, b, labels, c, inside, w, tau), lr, hr, att, weights)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    g_lr, g_hr, g_att = got_g[:3]
    # ignore pixels and hr outside the crop receive nothing; att is learned through this loss
    assert g_lr[3].abs().max() == 0 and g_lr[13].abs().max() == 0
    assert g_hr[~inside].abs().max() == 0 and g_hr[inside & (labels != 255)].abs().max() > 0
    assert g_att[3] == 0 and g_att.abs().max() > 0


@pytest.mark.parametrize("chunk", [None, 5])
def test_small_temperature_is_stable_in_float32(chunk):
    lr, hr, labels, att, inside, weights = _case(3)
    got, got_g = _grads(lambda a, b, c, w: multires_pixel_contrast(a.float(), b.float(), labels, att=c.float(),
                                                                   inside=inside, weights=w.float(), temperature=0.01,
                                                                   chunk_size=chunk),
                        lr, hr, att, weights)
    want, want_g = _grads(lambda a, b, c, w: reference(a, b, labels, c, inside, w, 0.01), lr, hr, att, weights)
    assert torch.isfinite(got) and all(torch.isfinite(g).all() for g in got_g)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * b.abs().max().item())


def test_hand_computed_values():
    # anchors 0, 1 (class 0, lr = e1) and 2 (class 1, lr = e2, no positive); 3 ignored. hr: e1, e2, e2.
    # att 0.5 → W = 1/4.
    # Anchor 0: LR −log p = log(1 + e^-1) =: L1 (positive s = 1, negative s = 0); HR positive h1 = e2: s = 0, negative
    # h2: s = 0 → log 2. Anchor 1: LR L1; HR positive h0 = e1: L1. Anchor 2 adds 0 and counts.
    e1, e2 = [1.0, 0.0], [0.0, 1.0]
    lr = torch.tensor([e1, [2.0, 0.0], e2, [3.0, 1.0]])
    hr = torch.tensor([e1, e2, [0.0, 5.0], [1.0, 1.0]])
    labels = torch.tensor([0, 0, 1, 255])
    att = torch.full((4,), 0.5)
    l1, w = math.log(1 + math.exp(-1)), 0.25
    inside = torch.ones(4, dtype=torch.bool)
    want = 0.5 / 3 * ((w * l1 + (1 - w) * math.log(2)) + (w * l1 + (1 - w) * l1))
    assert multires_pixel_contrast(lr, hr, labels, att=att, inside=inside).item() == pytest.approx(want, rel=1e-6)
    # pixel 1 outside the crop: its hr is no candidate, and anchor 1 has W = 0 (h_1 = 0): anchor 0 keeps only
    # W · L1, anchor 1 only its HR pair with h0 (weight 1)
    inside = torch.tensor([True, False, True, True])
    want = 0.5 / 3 * (w * l1 + l1)
    assert multires_pixel_contrast(lr, hr, labels, att=att, inside=inside).item() == pytest.approx(want, rel=1e-6)
    # pseudo weights multiply both terms: the only pairs are (0, 1) and (1, 0), weighted 1 · 0.5
    weights = torch.tensor([1.0, 0.5, 0.3, 0.7])
    got = multires_pixel_contrast(lr, hr, labels, att=att, inside=inside, weights=weights)
    assert got.item() == pytest.approx(0.5 * want, rel=1e-6)


@pytest.mark.parametrize("use_weights", [False, True])
def test_equals_official_formula_where_its_quirks_do_not_apply(use_weights):
    g = torch.Generator().manual_seed(4)
    n = 20
    lr, hr = torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randn(n, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(1, 5, (n,), generator=g)
    att, weights = torch.rand(n, generator=g, dtype=torch.float64), torch.rand(n, generator=g, dtype=torch.float64)
    weights = weights if use_weights else None
    got = multires_pixel_contrast(lr, hr, labels, att=att, inside=torch.ones(n, dtype=torch.bool), weights=weights)
    torch.testing.assert_close(got, official_formula(lr, hr, labels, att, weights), rtol=1e-12, atol=0)


def test_one_order_for_every_input():
    # the loss is a function of pixels, not of their order: one permutation of every input leaves it unchanged
    lr, hr, labels, att, inside, weights = _case(1)
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    a = multires_pixel_contrast(lr, hr, labels, att=att, inside=inside, weights=weights)
    b = multires_pixel_contrast(lr[perm], hr[perm], labels[perm], att=att[perm], inside=inside[perm],
                                weights=weights[perm])
    torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


def test_ignored_pixels_and_hr_outside_the_crop_do_not_matter():
    lr, hr, labels, att, inside, weights = _case(2)
    base = multires_pixel_contrast(lr, hr, labels, att=att, inside=inside, weights=weights)
    lr2, hr2, att2 = lr.clone(), hr.clone(), att.clone()
    ignored = labels == 255
    lr2[ignored], att2[ignored] = 7.0, 0.9
    hr2[~inside | ignored] = torch.randn(int((~inside | ignored).sum()), hr.shape[1], dtype=hr.dtype)
    got = multires_pixel_contrast(lr2, hr2, labels, att=att2, inside=inside, weights=weights)
    torch.testing.assert_close(got, base, rtol=1e-12, atol=0)


@pytest.mark.parametrize("chunk", [None, 4])
def test_degenerate_inputs_give_zero_with_finite_gradients(chunk):
    n = 6
    inside = torch.tensor([True, True, True, False, False, False])
    for labels in (torch.full((n,), 255), torch.zeros(n, dtype=torch.long), torch.arange(n)):
        lr, hr, att = torch.randn(n, 3, requires_grad=True), torch.randn(n, 3, requires_grad=True), torch.rand(n)
        att.requires_grad_(True)
        loss = multires_pixel_contrast(lr, hr, labels, att=att, inside=inside, chunk_size=chunk)
        grads = torch.autograd.grad(loss, [lr, hr, att])
        assert loss.item() == 0.0  # no anchors / no negatives / no positives
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    # no pixel inside the detail crop: no HR candidate and W = 0 everywhere, so both terms vanish
    lr = torch.randn(n, 3, requires_grad=True)
    loss = multires_pixel_contrast(lr, lr.detach(), torch.tensor([0, 0, 1, 1, 2, 255], dtype=torch.uint8),
                                   att=torch.rand(n), inside=torch.zeros(n, dtype=torch.bool), chunk_size=chunk)
    (g,) = torch.autograd.grad(loss, lr)
    assert loss.item() == 0.0 and torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("chunk", [1, 7, 32, 97, 500])
def test_chunked_equals_direct(chunk):
    # batch of 2 on a 7×7 grid flattened batch-major, 5 classes, 10 % ignore, a 4×4 detail crop per image
    g = torch.Generator().manual_seed(1)
    grid = torch.zeros(7, 7, dtype=torch.bool)
    grid[1:5, 2:6] = True
    inside = grid.flatten().repeat(2)  # (98,)
    n = inside.numel()
    lr = torch.randn(n, 16, generator=g, dtype=torch.float64)
    hr = torch.randn(n, 16, generator=g, dtype=torch.float64) * inside[:, None]
    labels = torch.randint(0, 5, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.1] = 255
    att, weights = torch.rand(n, generator=g, dtype=torch.float64), torch.rand(n, generator=g, dtype=torch.float64)

    def run(c):
        return lambda a, b, t, w: multires_pixel_contrast(a, b, labels, att=t, inside=inside, weights=w,
                                                          temperature=0.1, chunk_size=c)

    direct, direct_g = _grads(run(None), lr, hr, att, weights)
    chunked, chunked_g = _grads(run(chunk), lr, hr, att, weights)
    torch.testing.assert_close(chunked, direct, rtol=1e-12, atol=0)
    for a, b in zip(chunked_g, direct_g):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12 * b.abs().max().item())


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


@pytest.mark.parametrize("chunk", [None, 50])
def test_chunked_form_allocates_no_n_by_n_matrix(chunk):
    g = torch.Generator().manual_seed(2)
    n, d = 600, 8
    lr, hr = torch.randn(n, d, generator=g, requires_grad=True), torch.randn(n, d, generator=g, requires_grad=True)
    att = torch.rand(n, generator=g).requires_grad_(True)
    labels = torch.randint(0, 19, (n,), generator=g)
    inside = torch.rand(n, generator=g) < 0.5
    with _LargestTensor() as probe:
        loss = multires_pixel_contrast(lr, hr, labels, att=att, inside=inside, weights=torch.rand(n, generator=g),
                                       chunk_size=chunk)
        loss.backward()
    if chunk is None:
        assert probe.numel >= n * n // 2
    else:
        assert probe.numel <= chunk * n


def test_rejects_bad_inputs():
    lr, labels, att = torch.randn(4, 3), torch.zeros(4, dtype=torch.long), torch.rand(4)
    inside = torch.ones(4, dtype=torch.bool)
    with pytest.raises(ValueError, match="lr and hr"):
        multires_pixel_contrast(lr, torch.randn(5, 3), labels, att=att, inside=inside)
    with pytest.raises(ValueError, match="att must be"):
        multires_pixel_contrast(lr, lr, labels, att=torch.rand(3), inside=inside)
    with pytest.raises(ValueError, match="bool"):
        multires_pixel_contrast(lr, lr, labels, att=att, inside=inside.float())
    with pytest.raises(ValueError, match="weights must be"):
        multires_pixel_contrast(lr, lr, labels, att=att, inside=inside, weights=torch.ones(5))
