"""CFContra's centroids and nearest-centroid labels against loop references written from train_UDA.py's
calculate_src_center, calculate_tgt_center and get_pseudo_labels (ignore_instances, normEuclid)."""

import pytest
import torch

from uda_ray.adaptation.centroids import nearest_centroid_labels, source_centroids, target_centroids

C, D = 4, 5


def image_class_mean(f, mask):
    """The official per-image mean: average pool of f·mask over the grid / (average pool of mask + 1e-6)."""
    return (f * mask).mean(dim=(1, 2)) / (mask.float().mean() + 1e-6)


def finish(per_class):
    rows = []
    for c in range(C):
        if not per_class[c]:
            rows.append(torch.zeros(D, dtype=torch.float64))
            continue
        m = torch.stack(per_class[c]).mean(0)
        rows.append(m / m.norm())
    return torch.stack(rows)


def nearest(f, centroids, margin):
    """One pixel (D,): Python loop over the classes, the two smallest distances among the non-zero centroids."""
    dist = sorted((float((f - centroids[c]).norm()), c) for c in range(C) if centroids[c].abs().sum() > 0)
    if not dist:
        return 255
    if len(dist) > 1 and dist[1][0] - dist[0][0] < margin:
        return 255
    return dist[0][1]


def batches(seed, n=3, b=2, size=(3, 4), label_size=(6, 8)):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        feats = torch.rand(b, D, *size, generator=g, dtype=torch.float64)
        labels = torch.randint(0, C - 1, (b, *label_size), generator=g)  # the last class never occurs
        labels[:, 0] = 255
        logits = torch.randn(b, C, *size, generator=g, dtype=torch.float64)
        logits[:, 0] += 1.5 * (labels[:, ::2, ::2] == 0)  # some correct predictions of class 0
        out.append((feats, labels, logits))
    return out


@pytest.mark.parametrize("max_batches", [None, 2])
def test_source_centroids_match_loops(max_batches):
    data = batches(0)
    got = source_centroids(iter(data), C, max_batches=max_batches)
    per_class = {c: [] for c in range(C)}
    for feats, labels, logits in data[:max_batches]:
        for n in range(feats.shape[0]):
            lab = labels[n, ::2, ::2]  # nearest resize from 6×8 to 3×4 picks every second row and column
            pred = logits[n].argmax(0)
            for c in range(C):
                mask = (lab == c) & (pred == c)
                if mask.sum() == 0:
                    continue
                per_class[c].append(image_class_mean(feats[n], mask))
    want = finish(per_class)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)
    assert got[-1].abs().max() == 0 and got[0].norm() == pytest.approx(1.0)


@pytest.mark.parametrize("normalize", [False, True])
def test_nearest_centroid_labels_match_loops(normalize):
    g = torch.Generator().manual_seed(1)
    feats = torch.rand(2, D, 3, 4, generator=g)
    centroids = torch.nn.functional.normalize(torch.rand(C, D, generator=g), dim=1)
    centroids[2] = 0  # a class never seen
    margin = 0.05
    got = nearest_centroid_labels(feats, centroids, margin=margin, normalize=normalize)
    f = feats
    if normalize:
        scale = torch.stack([feats[:, d].pow(2).sum().sqrt() for d in range(D)])
        f = feats / scale.view(1, D, 1, 1)
    want = torch.tensor([[[nearest(f[b, :, i, j], centroids, margin) for j in range(4)] for i in range(3)]
                         for b in range(2)])
    assert torch.equal(got, want)
    assert (got == 255).any() and (got != 255).any() and not (got == 2).any()


def test_nearest_centroid_labels_edge_cases():
    feats = torch.zeros(1, 2, 1, 2)
    feats[0, :, 0, 1] = torch.tensor([1.0, 0.0])
    one = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    assert nearest_centroid_labels(feats, one, margin=10.0).tolist() == [[[1, 1]]]
    assert nearest_centroid_labels(feats, torch.zeros(2, 2), margin=0.0).tolist() == [[[255, 255]]]
    tie = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # two equal nearest centroids: ambiguous for any margin > 0
    assert nearest_centroid_labels(feats, tie, margin=1e-9).tolist() == [[[255, 255]]]


def test_target_centroids_match_loops():
    data = batches(2)
    src = source_centroids(iter(data), C)
    margin = 0.01
    feats_only = [f for f, _, _ in data]
    got = target_centroids(iter(feats_only), src, C, margin=margin, max_batches=2)
    per_class = {c: [] for c in range(C)}
    for feats in feats_only[:2]:
        for n in range(feats.shape[0]):
            lab = torch.tensor([[nearest(feats[n, :, i, j], src.double(), margin) for j in range(4)]
                                for i in range(3)])
            for c in range(C):
                mask = lab == c
                if mask.sum() == 0:
                    continue
                per_class[c].append(image_class_mean(feats[n], mask))
    torch.testing.assert_close(got.double(), finish(per_class), rtol=1e-6, atol=1e-7)


def test_bad_inputs_are_errors():
    with pytest.raises(ValueError, match="one D"):
        nearest_centroid_labels(torch.rand(1, 3, 2, 2), torch.rand(4, 5), margin=0.1)
    with pytest.raises(ValueError, match="max_batches"):
        source_centroids(iter(batches(0)), C, max_batches=0)
    with pytest.raises(ValueError, match="no batch"):
        source_centroids(iter([]), C)


def test_max_batches_draws_no_further_batch():
    drawn = []

    def lazy():  # a source that runs a model per batch: the limit must not run it once more
        for i, batch in enumerate(batches(3, n=4)):
            drawn.append(i)
            yield batch

    source_centroids(lazy(), C, max_batches=2)
    assert drawn == [0, 1]
