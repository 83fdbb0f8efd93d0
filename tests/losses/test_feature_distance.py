"""downscale_label_ratio against DAFormer's one-hot/avg-pool recipe and a per-cell loop; feature_distance against a
per-cell loop, a hand value, the empty mask and the gradient's reach."""

from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from uda_ray.losses import downscale_label_ratio, feature_distance

THINGS = (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def onehot_avgpool_reference(labels, scale, min_ratio, num_classes, ignore=255):
    """DAFormer's recipe (mmseg/utils/utils.py), restated: one-hot with the ignore label as the last channel,
    avg_pool2d with kernel = stride = scale, max over channels."""
    y = labels.clone()
    y[y == ignore] = num_classes
    onehot = F.one_hot(y, num_classes + 1).permute(0, 3, 1, 2).float()  # (B, C + 1, H, W)
    share, out = F.avg_pool2d(onehot, kernel_size=scale).max(dim=1)  # (B, h, w)
    out[out == num_classes] = ignore
    out[share < min_ratio] = ignore
    return out


def loop_reference(labels, scale, min_ratio, num_classes, ignore=255):
    """One cell at a time: majority (lowest class on ties, a class before the ignore label) and its share."""
    b, h_full, w_full = labels.shape
    out = torch.full((b, h_full // scale, w_full // scale), ignore, dtype=torch.int64)
    for n in range(b):
        for u in range(h_full // scale):
            for v in range(w_full // scale):
                cell = labels[n, u * scale:(u + 1) * scale, v * scale:(v + 1) * scale].flatten().tolist()
                counts = Counter(num_classes if c == ignore else c for c in cell)
                top = max(counts.values())
                winner = min(c for c, k in counts.items() if k == top)
                if winner != num_classes and top / scale**2 >= min_ratio:
                    out[n, u, v] = winner
    return out


def _labels(seed, shape, num_classes=19, ignore_frac=0.2, spread=4):
    """Blocky random labels (few classes per cell, so majorities and ties both happen)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, spread, shape, generator=g) + torch.randint(0, num_classes - spread + 1, (1,), generator=g)
    y[torch.rand(shape, generator=g) < ignore_frac] = 255
    return y


@pytest.mark.parametrize("min_ratio", [0.0, 0.5, 0.7, 0.75, 1.0])
@pytest.mark.parametrize(("shape", "scale"), [((2, 8, 12), 2), ((2, 9, 12), 3), ((1, 16, 16), 4), ((2, 13, 10), 4),
                                              ((1, 6, 5), 1)])
def test_downscale_equals_daformer_recipe(min_ratio, shape, scale):
    y = _labels(shape[1] * 7 + scale, shape)
    got = downscale_label_ratio(y, scale, min_ratio, 19)
    assert got.dtype == torch.int64 and got.shape == (shape[0], shape[1] // scale, shape[2] // scale)
    assert torch.equal(got, onehot_avgpool_reference(y, scale, min_ratio, 19))
    assert torch.equal(got, loop_reference(y, scale, min_ratio, 19))


def test_downscale_hand_cases():
    cells = [
        [[1, 1], [1, 1]],  # 1
        [[1, 1], [1, 255]],  # 1 at share 0.75
        [[2, 2], [255, 255]],  # tie with the ignore label: the class wins (share 0.5)
        [[5, 3], [3, 5]],  # tie between classes: the lower one (share 0.5)
        [[255, 255], [255, 0]],  # majority ignore
    ]
    y = torch.cat([torch.tensor(c) for c in cells], dim=1)[None]  # (1, 2, 10)
    assert downscale_label_ratio(y, 2, 0.5, 19).tolist() == [[[1, 1, 2, 3, 255]]]
    assert downscale_label_ratio(y, 2, 0.75, 19).tolist() == [[[1, 1, 255, 255, 255]]]
    # trailing rows/columns that do not fill a cell are dropped, like avg_pool2d's floor
    y3 = torch.zeros(1, 3, 5, dtype=torch.long)
    y3[:, 2, :] = 255
    y3[:, :, 4] = 255
    assert downscale_label_ratio(y3, 2, 0.75, 19).tolist() == [[[0, 0]]]


def test_downscale_rejects_bad_inputs():
    with pytest.raises(ValueError, match="labels must be in 0 … 18 or 255"):
        downscale_label_ratio(torch.full((1, 4, 4), 19), 2, 0.75, 19)
    with pytest.raises(ValueError, match="scale=5"):
        downscale_label_ratio(torch.zeros(1, 4, 4, dtype=torch.long), 5, 0.75, 19)
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        downscale_label_ratio(torch.zeros(1, 1, 4, 4, dtype=torch.long), 2, 0.75, 19)


def fd_loop_reference(student, imagenet, labels, classes, min_ratio, num_classes):
    """Mean over qualifying cells, one cell at a time, of ‖student − imagenet‖₂ (downscaled labels from the loop)."""
    scale = labels.shape[1] // student.shape[2]
    down = loop_reference(labels, scale, min_ratio, num_classes)
    dists = [torch.sqrt(((student[b, :, u, v] - imagenet[b, :, u, v]) ** 2).sum())
             for b in range(student.shape[0]) for u in range(student.shape[2]) for v in range(student.shape[3])
             if int(down[b, u, v]) in classes]
    return torch.stack(dists).mean()


@pytest.mark.parametrize("min_ratio", [0.5, 0.75])
def test_feature_distance_matches_loop_reference(min_ratio):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    imagenet = torch.randn(2, 5, 4, 6, generator=g, dtype=torch.float64)
    labels = _labels(3, (2, 16, 24), spread=3)
    # thing cells with clear, borderline and unclear majorities
    labels[:, :8, :12] = 13
    labels[:, :8, 12:] = torch.tensor(THINGS)[torch.randint(0, 2, (2, 8, 12), generator=g)]
    labels[:, 0, :] = 255
    got = feature_distance(student, imagenet, labels, classes=THINGS, scale_min_ratio=min_ratio, num_classes=19)
    want = fd_loop_reference(student, imagenet, labels, THINGS, min_ratio, 19)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    (g_got,) = torch.autograd.grad(got, student)
    (g_want,) = torch.autograd.grad(want, student)
    torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=1e-15)


def test_feature_distance_hand_computed():
    # 2×2 feature cells from 4×4 labels (scale 2). Cell (0,0): car (13), diff (3, 4) → 5. Cell (0,1): person (11)
    # at share 0.75, diff (0, 1) → 1. Cell (1,0): road (stuff). Cell (1,1): person at share 0.5 < 0.75 → ignored.
    labels = torch.tensor([[13, 13, 11, 11],
                           [13, 13, 11, 255],
                           [0, 0, 11, 11],
                           [0, 0, 255, 1]])[None]
    student = torch.zeros(1, 2, 2, 2)
    student[0, :, 0, 0] = torch.tensor([3.0, 4.0])
    student[0, :, 0, 1] = torch.tensor([0.0, 1.0])
    student[0, :, 1, 0] = torch.tensor([100.0, 0.0])
    student[0, :, 1, 1] = torch.tensor([0.0, 100.0])
    loss = feature_distance(student, torch.zeros_like(student), labels, classes=THINGS, scale_min_ratio=0.75,
                            num_classes=19)
    assert loss.item() == pytest.approx(3.0)
    loss = feature_distance(student, torch.zeros_like(student), labels, classes=THINGS, scale_min_ratio=0.5,
                            num_classes=19)
    assert loss.item() == pytest.approx((5 + 1 + 100) / 3)


def test_no_qualifying_cell_gives_zero_with_graph():
    student = torch.randn(2, 3, 2, 2, requires_grad=True)
    imagenet = torch.randn(2, 3, 2, 2)
    labels = torch.zeros(2, 8, 8, dtype=torch.long)  # road only
    loss = feature_distance(student, imagenet, labels, classes=THINGS, scale_min_ratio=0.75, num_classes=19)
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


def test_gradient_reaches_student_only():
    student = torch.randn(1, 3, 2, 2, requires_grad=True)
    imagenet = torch.randn(1, 3, 2, 2, requires_grad=True)
    labels = torch.full((1, 4, 4), 13)
    loss = feature_distance(student, imagenet, labels, classes=THINGS, scale_min_ratio=0.75, num_classes=19)
    g_student, g_imagenet = torch.autograd.grad(loss, [student, imagenet], allow_unused=True)
    assert g_imagenet is None
    diff = (student - imagenet).detach()
    torch.testing.assert_close(g_student, diff / diff.norm(dim=1, keepdim=True) / 4)


def test_identical_features_have_finite_zero_gradient():
    student = torch.randn(1, 3, 2, 2, requires_grad=True)
    labels = torch.full((1, 4, 4), 13)
    loss = feature_distance(student, student.detach().clone(), labels, classes=THINGS, scale_min_ratio=0.75,
                            num_classes=19)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(student.grad, torch.zeros_like(student))


def test_feature_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="integer factor"):
        feature_distance(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4), torch.zeros(1, 16, 8, dtype=torch.long),
                         classes=THINGS, scale_min_ratio=0.75, num_classes=19)
    with pytest.raises(ValueError, match="one shape"):
        feature_distance(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 5), torch.zeros(1, 16, 16, dtype=torch.long),
                         classes=THINGS, scale_min_ratio=0.75, num_classes=19)
