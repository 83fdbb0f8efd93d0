"""SDCA's class-wise thresholds and thresholding against a numpy reference written from get_threshold_const."""

import numpy as np
import pytest
import torch

from uda_ray.adaptation.self_training import class_thresholds, middle_value, threshold_labels


def reference_thresholds(conf: np.ndarray, labels: np.ndarray, num_classes: int, cap: float) -> np.ndarray:
    out = []
    for c in range(num_classes):
        x = np.sort(conf[labels == c])
        out.append(0.0 if len(x) == 0 else x[int(np.round(len(x) * 0.5))])
    out = np.array(out, dtype=np.float32)
    out[out > cap] = cap
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_thresholds_match_reference(seed):
    rng = np.random.default_rng(seed)
    num_classes = 6
    labels = rng.integers(0, num_classes - 1, size=(3, 7, 5))  # the last class is never predicted
    labels[0, 0, :] = 2  # class counts of both parities among the classes
    conf = rng.uniform(0.2, 1.0, size=labels.shape).astype(np.float32)
    got = class_thresholds(torch.from_numpy(conf), torch.from_numpy(labels), num_classes, cap=0.9)
    want = reference_thresholds(conf, labels, num_classes, 0.9)
    np.testing.assert_array_equal(got.numpy(), want)
    assert got[-1] == 0


@pytest.mark.parametrize("n, index", [(1, 0), (2, 1), (3, 2), (4, 2), (5, 2), (6, 3), (7, 4), (9, 4)])
def test_middle_index_rounds_half_to_even(n, index):
    values = torch.arange(n, dtype=torch.float32).flip(0)  # unsorted: n−1 … 0
    assert middle_value(values) == index


def test_cap_and_empty():
    conf = torch.tensor([0.95, 0.99, 0.97, 0.3])
    labels = torch.tensor([0, 0, 0, 1])
    torch.testing.assert_close(class_thresholds(conf, labels, 3, cap=0.9), torch.tensor([0.9, 0.3, 0.0]))


def test_threshold_labels_is_strictly_below():
    labels = torch.tensor([[0, 0, 1, 1]])
    conf = torch.tensor([[0.5, 0.49, 0.8, 0.81]])
    out = threshold_labels(labels, conf, torch.tensor([0.5, 0.81]))
    assert out.tolist() == [[0, 255, 255, 1]]


def test_bad_labels_are_an_error():
    with pytest.raises(ValueError, match="labels must lie in"):
        class_thresholds(torch.rand(4), torch.tensor([0, 1, 2, 3]), 3)
    with pytest.raises(ValueError, match="one shape"):
        class_thresholds(torch.rand(4), torch.zeros(5, dtype=torch.long), 3)
