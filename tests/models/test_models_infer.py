"""Sliding-window and whole-image inference: window geometry by hand, slide against a per-window loop, batching."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from uda_ray.models.infer import overlap_counts, slide_logits, whole_logits, window_boxes

K = 5


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _net():
    """A small segmentor head at output stride 2 (its logits need upsampling to the window)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, K, 1)).eval()


def _images(b=2, h=10, w=14):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(0))


def test_window_boxes_hand_cases():
    # rows: 0 and 4 (= 10 − 6); columns 0, 4, 8 (= 14 − 6)
    assert window_boxes(10, 14, (6, 6), (4, 4)) == [(0, 6, 0, 6), (0, 6, 4, 10), (0, 6, 8, 14),
                                                   (4, 10, 0, 6), (4, 10, 4, 10), (4, 10, 8, 14)]
    # the last window moved back inside: 0, 4, then min(8, 11 − 6) = 5
    assert [b[:2] for b in window_boxes(11, 6, (6, 6), (4, 4))] == [(0, 6), (4, 10), (5, 11)]
    assert window_boxes(6, 6, (6, 6), (4, 4)) == [(0, 6, 0, 6)]


def test_hrda_test_protocol_geometry():
    # HRDA/MIC test: 1024² windows, stride 512, over 1024×2048 → 3 windows; the detail passes inside a 1024² input:
    # 512² windows, stride 256 → 3 × 3
    assert window_boxes(1024, 2048, (1024, 1024), (512, 512)) == [(0, 1024, 0, 1024), (0, 1024, 512, 1536),
                                                                  (0, 1024, 1024, 2048)]
    detail = window_boxes(1024, 1024, (512, 512), (256, 256))
    assert len(detail) == 9 and detail[-1] == (512, 1024, 512, 1024)
    counts = overlap_counts(1024, 2048, (1024, 1024), (512, 512))
    assert counts[0, [0, 511, 512, 1023, 1024, 1535, 1536, 2047]].tolist() == [1, 1, 2, 2, 2, 2, 1, 1]


def test_overlap_counts_at_borders():
    rows = torch.tensor([1, 1, 1, 1, 2, 2, 1, 1, 1, 1])
    cols = torch.tensor([1, 1, 1, 1, 2, 2, 1, 1, 2, 2, 1, 1, 1, 1])
    counts = overlap_counts(10, 14, (6, 6), (4, 4))
    assert counts.dtype == torch.int64 and torch.equal(counts, rows[:, None] * cols[None, :])
    rows = torch.tensor([1, 1, 1, 1, 2, 3, 2, 2, 2, 2, 1])  # H = 11: windows at 0, 4, 5
    assert torch.equal(overlap_counts(11, 6, (6, 6), (4, 4))[:, 0], rows)


def test_slide_equals_per_window_loop_reference():
    net = _net()
    x = _images()
    crop, stride = (6, 6), (4, 4)
    with torch.no_grad():
        got = slide_logits(net, x, num_classes=K, crop=crop, stride=stride)
        want = torch.zeros(2, K, 10, 14)
        for y1, y2, x1, x2 in window_boxes(10, 14, crop, stride):
            out = F.interpolate(net(x[:, :, y1:y2, x1:x2]), size=(y2 - y1, x2 - x1), mode="bilinear",
                                align_corners=False)
            want[:, :, y1:y2, x1:x2] += out
        want /= overlap_counts(10, 14, crop, stride)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_slide_equals_whole_when_one_window_covers_the_image():
    net = _net()
    x = _images()
    with torch.no_grad():
        slide = slide_logits(net, x, num_classes=K, crop=(10, 14), stride=(5, 7))
        whole = whole_logits(net, x, size=(10, 14))
    assert slide.shape == (2, K, 10, 14)
    torch.testing.assert_close(slide, whole, rtol=0, atol=0)


def test_pointwise_predictor_is_unchanged_by_sliding():
    # a per-pixel predictor gives every window the same logits at a pixel: averaging them changes nothing
    torch.manual_seed(1)
    net = nn.Conv2d(3, K, 1)
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(slide_logits(net, x, num_classes=K, crop=(6, 6), stride=(4, 4)), net(x))


@pytest.mark.parametrize("batch_windows", [1, 4, 5, 100])
def test_batched_equals_unbatched(batch_windows):
    net = _net()
    x = _images()
    calls = []

    def predict(w):
        calls.append(w.shape[0])
        return net(w)

    with torch.no_grad():
        everything = slide_logits(predict, x, num_classes=K, crop=(6, 6), stride=(4, 4))
        batched = slide_logits(predict, x, num_classes=K, crop=(6, 6), stride=(4, 4), batch_windows=batch_windows)
    torch.testing.assert_close(batched, everything, rtol=1e-6, atol=1e-6)
    jobs = 2 * 6  # 2 images × 6 windows
    assert calls[0] == jobs and sum(calls[1:]) == jobs and max(calls[1:]) == min(batch_windows, jobs)


def test_whole_logits_predicts_at_the_given_size():
    net = _net()
    x = _images(1, 12, 20)
    seen = []

    def predict(img):
        seen.append(tuple(img.shape[-2:]))
        return net(img)

    with torch.no_grad():
        out = whole_logits(predict, x, size=(6, 10))
        small = F.interpolate(x, size=(6, 10), mode="bilinear", align_corners=False)
        want = F.interpolate(net(small), size=(12, 20), mode="bilinear", align_corners=False)
    assert seen == [(6, 10)] and out.shape == (1, K, 12, 20)
    torch.testing.assert_close(out, want)


def test_errors_name_the_sizes():
    x = _images()
    with pytest.raises(ValueError, match=r"crop 12×12 is larger than the image 10×14"):
        slide_logits(_net(), x, num_classes=K, crop=(12, 12), stride=(4, 4))
    with pytest.raises(ValueError, match="stride 8×8 is larger than the crop 6×6"):
        window_boxes(10, 14, (6, 6), (8, 8))
    with pytest.raises(ValueError, match=r"expected \(12, 7, h, w\)"):
        slide_logits(_net(), x, num_classes=7, crop=(6, 6), stride=(4, 4))
    with pytest.raises(ValueError, match="must be divisible by output_stride 4"):
        slide_logits(_net(), x, num_classes=K, crop=(6, 6), stride=(4, 4), output_stride=4)
