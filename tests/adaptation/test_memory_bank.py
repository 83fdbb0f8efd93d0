"""MemoryBank (centroid and FIFO modes), ambiguous_mask, and ClassStatistics against direct computations."""

import math

import pytest
import torch
import torch.nn.functional as F

from uda_ray.adaptation import ClassStatistics, MemoryBank, ambiguous_mask
from uda_ray.losses import prototype_contrast


def _batch(seed, n=20, d=3, classes=4):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, d, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    labels[:2] = 255
    return feats, labels


def test_centroid_mode_follows_momentum_formula():
    bank = MemoryBank(num_classes=5, dim=3, size_per_class=1, momentum=0.9)
    assert bank.entries().shape == (5, 1, 3) and bank.entries().abs().max() == 0
    f1, y1 = _batch(0)
    y1[y1 == 3] = 0  # class 3 absent from the first batch
    bank.update(f1, y1)
    expected = torch.zeros(5, 3)
    for c in range(5):
        sel = F.normalize(f1, dim=1)[y1 == c]
        if len(sel):
            expected[c] = F.normalize(sel.mean(0), dim=0)  # first update initialises
    torch.testing.assert_close(bank.entries()[:, 0], expected)
    assert bank.fill.tolist() == [1, 1, 1, 0, 0]
    f2, y2 = _batch(1)
    bank.update(f2, y2)
    for c in range(5):
        sel = F.normalize(f2, dim=1)[y2 == c]
        if not len(sel):
            continue
        new = sel.mean(0) if expected[c].abs().max() == 0 else 0.9 * expected[c] + 0.1 * sel.mean(0)
        expected[c] = F.normalize(new, dim=0)
    torch.testing.assert_close(bank.entries()[:, 0], expected)
    assert expected[4].abs().max() == 0  # never seen: still empty
    norms = bank.entries()[:, 0].norm(dim=1)
    torch.testing.assert_close(norms[:4], torch.ones(4))


def test_queue_mode_is_a_fifo_per_class():
    k = 4
    bank = MemoryBank(num_classes=3, dim=2, size_per_class=k)
    rings = {c: [None] * k for c in range(3)}
    ptr = dict.fromkeys(range(3), 0)
    for seed, n in [(0, 3), (1, 11), (2, 5)]:  # the second batch pushes more than k rows into some class
        feats, labels = _batch(seed, n=n, d=2, classes=3)
        bank.update(feats, labels)
        for f, y in zip(F.normalize(feats, dim=1), labels.tolist()):  # one push at a time
            if y == 255:
                continue
            rings[y][ptr[y]] = f
            ptr[y] = (ptr[y] + 1) % k
    for c in range(3):
        filled = [r for r in rings[c] if r is not None]
        assert bank.fill[c].item() == len(filled)
        for slot in range(k):
            want = rings[c][slot] if rings[c][slot] is not None else torch.zeros(2)
            torch.testing.assert_close(bank.entries()[c, slot], want)
    assert bank.ptr.tolist() == [ptr[c] for c in range(3)]


def test_state_dict_round_trip_and_errors():
    bank = MemoryBank(3, 2, size_per_class=2)
    bank.update(*_batch(0, d=2, classes=3))
    assert set(bank.state_dict()) == {"bank", "fill", "ptr"}
    other = MemoryBank(3, 2, size_per_class=2)
    other.load_state_dict(bank.state_dict())
    assert torch.equal(other.entries(), bank.entries()) and torch.equal(other.ptr, bank.ptr)
    with pytest.raises(ValueError, match="labels"):
        bank.update(torch.randn(2, 2), torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="size_per_class"):
        MemoryBank(3, 2, size_per_class=0)


@pytest.mark.parametrize("size", [1, 3])
def test_start_from_centroids(size):
    centroids = torch.tensor([[2.0, 0.0], [0.0, 0.0], [3.0, 4.0]])  # class 1 never seen
    bank = MemoryBank(3, 2, size_per_class=size, momentum=0.9)
    bank.start_from(centroids)
    assert bank.fill.tolist() == [1, 0, 1] and bank.ptr.tolist() == [1 % size, 0, 1 % size]
    torch.testing.assert_close(bank.entries()[:, 0], torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.6, 0.8]]))
    assert bank.entries()[:, 1:].abs().sum() == 0
    bank.update(torch.tensor([[0.0, 1.0], [0.0, 1.0]]), torch.tensor([0, 1]))
    if size == 1:  # the started centroid blends with the batch; the unfilled class takes the batch mean
        torch.testing.assert_close(bank.entries()[0, 0], F.normalize(torch.tensor([0.9, 0.1]), dim=0))
        torch.testing.assert_close(bank.entries()[1, 0], torch.tensor([0.0, 1.0]))
    else:  # the batch goes into the next free slot
        torch.testing.assert_close(bank.entries()[0, 1], torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="expected \\(3, 2\\)"):
        bank.start_from(torch.zeros(3, 4))


def test_prototype_contrast_on_an_empty_and_a_filled_bank():
    feats, labels = _batch(0)
    bank = MemoryBank(4, 3)
    assert prototype_contrast(feats, labels, bank.entries()).item() == 0.0
    bank.update(feats, labels)
    assert prototype_contrast(feats, labels, bank.entries()).item() > 0


def test_ambiguous_mask():
    bank = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[0.0, 0.0]]])  # class 2 empty
    feats = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 0.9], [0.0, -1.0]])
    # cosine distances to (e1, e2): (0, 1), (0.29, 0.29), (0.26, 0.33), (1, 2)
    assert ambiguous_mask(feats, bank, margin=0.05).tolist() == [False, True, False, False]
    assert ambiguous_mask(feats, bank, margin=0.1).tolist() == [False, True, True, False]
    assert not ambiguous_mask(feats, bank[:1], margin=10.0).any()  # one class: nothing to compare


def test_class_statistics_equal_pooled_moments():
    stats = ClassStatistics(num_classes=4, dim=3)
    batches = [_batch(s, n=n) for s, n in [(0, 15), (1, 3), (2, 40)]]
    for f, y in batches:
        stats.update(f, y)
    feats = torch.cat([f for f, _ in batches]).double()
    labels = torch.cat([y for _, y in batches])
    for c in range(4):
        sel = feats[labels == c]
        assert stats.count[c].item() == len(sel)
        if len(sel):
            torch.testing.assert_close(stats.mean[c].double(), sel.mean(0), rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(stats.var[c].double(), sel.var(0, unbiased=False), rtol=1e-6, atol=1e-6)


def test_class_statistics_one_step_formula():
    stats = ClassStatistics(num_classes=2, dim=1)
    stats.mean.fill_(1.0)
    stats.var.fill_(2.0)
    stats.count.copy_(torch.tensor([3, 0]))
    stats.update(torch.tensor([[5.0], [7.0], [4.0]]), torch.tensor([0, 0, 255]))
    w = 2 / 5  # n_b = 2, n_seen = 3, μ_b = 6, σ²_b = 1
    assert stats.mean[0].item() == pytest.approx((1 - w) * 1 + w * 6)
    assert stats.var[0].item() == pytest.approx((1 - w) * 2 + w * 1 + w * (1 - w) * 25)
    assert stats.mean[1].item() == 1.0 and stats.var[1].item() == 2.0 and stats.count.tolist() == [5, 0]
    assert math.isfinite(stats.var.sum().item())
