"""Paper-scale backbones build with features_only and give the stage widths the methods assume."""

from __future__ import annotations

import pytest
import torch

from uda_ray.models import build_segmenter


@pytest.mark.parametrize(("backbone", "channels"), [
    ("pvt_v2_b5", [64, 128, 320, 512]),  # the same stage widths as DAFormer's MiT-B5
    ("resnet101", [256, 512, 1024, 2048]),  # DeepLabV2's ResNet-101 stages
])
def test_paper_backbone_widths(backbone: str, channels: list[int]) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = build_segmenter(backbone, 19, pretrained=False, proj_dim=128).eval()
        assert model.feature_channels == channels
        assert model.feature_reductions == [4, 8, 16, 32]
        with torch.no_grad():
            out = model(torch.rand(1, 3, 64, 64))
        assert [f.shape[1] for f in out.features] == channels
        assert out.logits.shape == (1, 19, 16, 16)
        assert out.fused.shape == (1, 256, 16, 16)
        assert out.proj.shape == (1, 128, 2, 2)
    finally:
        torch.set_num_threads(threads)
