"""mIoU from an accumulated confusion matrix, against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from uda_ray.data.labels import CLASSES
from uda_ray.models import SegOutput
from uda_ray.train.evaluate import confusion_matrix, evaluate, iou_from_confusion, miou_metrics


def test_confusion_matrix_skips_ignore():
    label = torch.tensor([[0, 0, 1, 255], [2, 2, 1, 1]])
    pred = torch.tensor([[0, 1, 1, 2], [2, 0, 1, 2]])
    conf = confusion_matrix(pred, label, 3).numpy()
    # rows = truth, columns = prediction
    assert conf.tolist() == [[1, 1, 0], [0, 2, 1], [1, 0, 1]]


def test_iou_and_miou_hand_computed():
    conf = np.zeros((19, 19), dtype=np.int64)
    conf[0, 0], conf[0, 1] = 3, 1   # road: TP 3, FN 1
    conf[1, 1], conf[1, 0] = 2, 2   # sidewalk: TP 2, FN 2; road gains FP 2
    iou = iou_from_confusion(conf)
    assert iou[0] == pytest.approx(3 / (3 + 2 + 1))
    assert iou[1] == pytest.approx(2 / (2 + 1 + 2))
    assert math.isnan(iou[5])  # absent from truth and prediction
    m = miou_metrics(conf, list(range(19)))
    assert m["val/miou"] == pytest.approx((0.5 + 0.4) / 2)
    assert m["val/iou/road"] == pytest.approx(0.5)
    assert "val/iou/traffic_light" in m  # names use '_' for spaces
    # the 13-class protocol drops classes 3, 4, 5, 9, 14, 16
    m13 = miou_metrics(conf, (0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18))
    assert m13["val/miou"] == pytest.approx(0.45) and "val/iou/wall" not in m13


def test_false_positive_only_class_counts_as_zero():
    conf = np.zeros((19, 19), dtype=np.int64)
    conf[0, 0] = 4
    conf[0, 2] = 1  # class 2 predicted but never true: IoU 0, included in the mean
    m = miou_metrics(conf, list(range(19)))
    assert m["val/iou/building"] == 0.0
    assert m["val/miou"] == pytest.approx((4 / 5 + 0.0) / 2)


class _Fixed(nn.Module):
    """Predicts a fixed low-resolution map; evaluation must upsample it to the label's full resolution."""

    def __init__(self, pred: torch.Tensor) -> None:
        super().__init__()
        self.pred = pred

    def forward(self, x: torch.Tensor) -> SegOutput:
        logits = torch.nn.functional.one_hot(self.pred, len(CLASSES)).permute(0, 3, 1, 2).float() * 10
        return SegOutput(logits.expand(x.shape[0], -1, -1, -1), logits, [logits], None)


def test_evaluate_accumulates_over_batches_and_upsamples():
    pred = torch.tensor([[[0, 1], [0, 1]]])  # (1, 2, 2): left half road, right half sidewalk
    model = _Fixed(pred)
    label_a = torch.zeros(1, 4, 4, dtype=torch.int64)  # all road
    label_b = torch.ones(1, 4, 4, dtype=torch.int64)
    label_b[0, 0, 0] = 255
    batches = [{"image": torch.zeros(1, 3, 8, 8), "label": y} for y in (label_a, label_b)]
    m = evaluate(model, batches, num_classes=19, class_ids=list(range(19)), device=torch.device("cpu"))
    # a: road TP 8, road→sidewalk 8 ; b: sidewalk TP 8, sidewalk→road 7 (one ignored)
    road = 8 / (8 + 8 + 7)
    side = 8 / (8 + 7 + 8)
    assert m["val/iou/road"] == pytest.approx(road)
    assert m["val/iou/sidewalk"] == pytest.approx(side)
    assert m["val/miou"] == pytest.approx((road + side) / 2)
