"""pseudo_labels: labels, confidence, scalar and per-pixel weights, margins, keep fraction."""

import pytest
import torch

from uda_ray.adaptation import keep_fraction, pseudo_labels


def _logits(seed=0, b=2, c=3, h=5, w=4):
    g = torch.Generator().manual_seed(seed)
    return 4 * torch.randn(b, c, h, w, generator=g)


def test_labels_and_confidence():
    logits = _logits()
    labels, _, confidence = pseudo_labels(logits, threshold=0.9)
    p = logits.softmax(1)
    assert labels.dtype == torch.int64 and labels.shape == (2, 5, 4)
    assert torch.equal(labels, p.argmax(1))
    torch.testing.assert_close(confidence, p.amax(1))


@pytest.mark.parametrize("top,bottom", [(0, 0), (1, 0), (1, 2)])
def test_scalar_and_pixel_weights_with_margins(top, bottom):
    logits = _logits(1)
    threshold = 0.8
    _, w_scalar, conf = pseudo_labels(logits, threshold=threshold, ignore_top=top, ignore_bottom=bottom)
    _, w_pixel, _ = pseudo_labels(logits, threshold=threshold, weighting="pixel", ignore_top=top, ignore_bottom=bottom)
    b, h, w = conf.shape
    kept_total = 0
    for i in range(b):
        rows = [r for r in range(h) if top <= r < h - bottom]
        kept = sum(int(conf[i, r, x] >= threshold) for r in rows for x in range(w))
        kept_total += kept
        fraction = kept / (len(rows) * w)
        for r in range(h):
            for x in range(w):
                inside = r in rows
                assert w_scalar[i, r, x].item() == pytest.approx(fraction if inside else 0.0)
                assert w_pixel[i, r, x].item() == float(inside and conf[i, r, x].item() >= threshold)
    assert 0 < kept_total < b * h * w  # the case exercises both sides of the threshold
    assert keep_fraction(w_scalar) == pytest.approx(kept_total / (b * h * w))
    assert keep_fraction(w_pixel) == pytest.approx(kept_total / (b * h * w))


def test_threshold_is_inclusive_and_no_gradient():
    logits = torch.tensor([[[[0.0]], [[0.0]]]], requires_grad=True)  # confidence exactly 0.5
    labels, weights, confidence = pseudo_labels(logits, threshold=0.5, weighting="pixel")
    assert weights.item() == 1.0 and not weights.requires_grad and not confidence.requires_grad
    _, weights, _ = pseudo_labels(logits, threshold=0.5001, weighting="pixel")
    assert weights.item() == 0.0


def test_errors():
    with pytest.raises(ValueError, match="weighting"):
        pseudo_labels(_logits(), threshold=0.9, weighting="mean")
    with pytest.raises(ValueError, match="ignore_top"):
        pseudo_labels(_logits(), threshold=0.9, ignore_top=3, ignore_bottom=2)
