"""The Lovász term: SDCA's resize of the source logits (bilinear, align_corners=True, to the label size), softmax,
Lovász-softmax, times the weight; no term at weight 0."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from uda_ray.config import Config, apply_overrides
from uda_ray.losses import lovasz_softmax
from uda_ray.models import build_segmenter
from uda_ray.train.terms.lovasz import build_lovasz


def test_term_resizes_as_sdca_and_weights():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 4, 6, generator=g, requires_grad=True)
    labels = torch.randint(0, 5, (2, 13, 21), generator=g)
    labels[:, :3] = 255
    cfg = apply_overrides(Config(), {"loss.lovasz.weight": 0.75})
    term = build_lovasz(cfg, build_segmenter("resnet18", 19, embed_dim=8))
    ctx = SimpleNamespace(out_src=SimpleNamespace(logits=logits), y_src=labels)
    got = term(ctx)["lovasz"]
    probs = torch.softmax(F.interpolate(logits, size=(13, 21), mode="bilinear", align_corners=True), dim=1)
    torch.testing.assert_close(got, 0.75 * lovasz_softmax(probs, labels))
    other = torch.softmax(F.interpolate(logits, size=(13, 21), mode="bilinear", align_corners=False), dim=1)
    assert got.item() != pytest.approx(0.75 * lovasz_softmax(other, labels).item(), rel=1e-6)
    got.backward()
    assert logits.grad.abs().sum() > 0


def test_no_term_at_weight_zero():
    assert build_lovasz(Config(), build_segmenter("resnet18", 19, embed_dim=8)) is None
