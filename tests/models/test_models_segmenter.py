"""Segmenter: output shapes over several timm backbones, normalisation, gradients, parameter groups."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from uda_ray.models import Segmenter, SegOutput, build_segmenter

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
BACKBONES = ["resnet18", "test_convnext", "pvt_v2_b0", "test_vit"]


def _sizes(backbone: str) -> list[tuple[int, int]]:
    # ViT patch embedding needs multiples of its patch size; the hierarchical models take any size.
    return [(64, 96)] if backbone == "test_vit" else [(64, 96), (67, 101)]


@pytest.mark.parametrize("proj_dim", [0, 8])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_output_shapes(backbone: str, proj_dim: int) -> None:
    model = build_segmenter(backbone, 5, embed_dim=16, proj_dim=proj_dim)
    assert isinstance(model, Segmenter)
    assert len(model.feature_channels) == 4
    for h, w in _sizes(backbone):
        out = model(torch.rand(2, 3, h, w))
        assert isinstance(out, SegOutput)
        assert len(out.features) == 4
        for f, c in zip(out.features, model.feature_channels):
            assert f.shape[:2] == (2, c)
        finest = out.features[0].shape[-2:]
        assert out.logits.shape == (2, 5, *finest)
        assert out.fused.shape == (2, 16, *finest)
        if proj_dim:
            assert out.proj is not None
            assert out.proj.shape == (2, proj_dim, *out.features[-1].shape[-2:])
        else:
            assert out.proj is None
            assert model.proj is None


def test_resnet_default_drops_stride_two_level() -> None:
    model = build_segmenter("resnet18", 3, embed_dim=8)
    assert model.feature_reductions == [4, 8, 16, 32]
    assert model.feature_channels == [64, 128, 256, 512]
    out = model(torch.rand(2, 3, 64, 96))
    assert out.logits.shape[-2:] == (16, 24)


def test_explicit_out_indices() -> None:
    model = build_segmenter("resnet18", 3, embed_dim=8, out_indices=(0, 1, 2, 3, 4))
    assert model.feature_reductions == [2, 4, 8, 16, 32]
    out = model(torch.rand(2, 3, 64, 96))
    assert out.logits.shape[-2:] == (32, 48)
    three = build_segmenter("resnet18", 3, embed_dim=8, out_indices=(1, 2, 3))
    assert three.feature_channels == [64, 128, 256]
    assert len(three(torch.rand(2, 3, 64, 96)).features) == 3


def test_levels_out_of_order_are_an_error() -> None:
    with pytest.raises(ValueError, match=r"out_indices = \(3, 1\)"):
        build_segmenter("resnet18", 3, out_indices=(3, 1))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="pretrained_path"):
        build_segmenter("resnet18", 3, pretrained=True, pretrained_path="x.pth")
    with pytest.raises(ValueError, match="proj_dim"):
        build_segmenter("resnet18", 3, proj_dim=-1)
    model = build_segmenter("resnet18", 3, embed_dim=8)
    with pytest.raises(ValueError, match=r"\(2, 1, 32, 32\)"):
        model(torch.rand(2, 1, 32, 32))


@pytest.mark.parametrize("backbone", ["resnet18", "pvt_v2_b0"])
def test_input_is_normalised_inside(backbone: str) -> None:
    model = build_segmenter(backbone, 4, embed_dim=8, proj_dim=4).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        feats = list(model.backbone((x - MEAN) / STD))
        ref_logits, ref_fused = model.decoder(feats)
        raw_logits, _ = model.decoder(list(model.backbone(x)))
    torch.testing.assert_close(out.logits, ref_logits)
    torch.testing.assert_close(out.fused, ref_fused)
    torch.testing.assert_close(out.proj, model.proj(feats[-1]))
    assert not torch.allclose(out.logits, raw_logits)
    assert "pixel_mean" not in model.state_dict()  # constants, not checkpointed state


@pytest.mark.parametrize("backbone", ["resnet18", "test_convnext", "pvt_v2_b0"])
def test_gradients_reach_backbone_and_heads(backbone: str) -> None:
    model = build_segmenter(backbone, 4, embed_dim=8, proj_dim=4).train()
    out = model(torch.rand(2, 3, 64, 64))
    target = torch.randint(0, 4, out.logits.shape[:1] + out.logits.shape[2:])
    loss = nn.functional.cross_entropy(out.logits, target) + out.proj.pow(2).mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    first = next(model.backbone.parameters())
    assert first.grad.abs().sum() > 0
    assert model.decoder.classifier.weight.grad.abs().sum() > 0
    assert model.decoder.embed[0].weight.grad.abs().sum() > 0
    assert model.proj.net[0].weight.grad.abs().sum() > 0


def test_builder_is_deterministic_given_seed() -> None:
    torch.manual_seed(3)
    a = build_segmenter("resnet18", 3, embed_dim=8, proj_dim=4)
    torch.manual_seed(3)
    b = build_segmenter("resnet18", 3, embed_dim=8, proj_dim=4)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k])


@pytest.mark.parametrize("proj_dim", [0, 4])
@pytest.mark.parametrize("backbone", ["resnet18", "test_vit"])
def test_param_groups_cover_each_trainable_parameter_once(backbone: str, proj_dim: int) -> None:
    model = build_segmenter(backbone, 3, embed_dim=8, proj_dim=proj_dim)
    frozen = next(model.backbone.parameters())
    frozen.requires_grad_(False)
    groups = model.param_groups(lr=2e-4, head_lr_mult=10.0, weight_decay=0.01)
    seen = [id(p) for g in groups for p in g["params"]]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(seen) == len(set(seen))
    assert set(seen) == trainable
    assert id(frozen) not in seen

    head_ids = {id(p) for p in model.head_parameters()}
    backbone_ids = {id(p) for p in model.backbone_parameters()}
    assert head_ids.isdisjoint(backbone_ids)
    assert head_ids | backbone_ids == {id(p) for p in model.parameters()}
    for g in groups:
        ids = {id(p) for p in g["params"]}
        if g["name"].startswith("head"):
            assert ids <= head_ids
            assert g["lr"] == pytest.approx(2e-3)
            assert g["lr_mult"] == 10.0
        else:
            assert ids <= backbone_ids
            assert g["lr"] == pytest.approx(2e-4)
            assert g["lr_mult"] == 1.0
        assert g["weight_decay"] == (0.0 if g["name"].endswith("_no_decay") else 0.01)

    wd = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if not p.requires_grad:
                continue
            is_norm = isinstance(module, (nn.BatchNorm2d, nn.LayerNorm))
            expected = 0.0 if is_norm else 0.01
            if is_norm or isinstance(module, (nn.Conv2d, nn.Linear)):
                assert wd[id(p)] == expected, (type(module).__name__, p.shape)
    if proj_dim:
        assert wd[id(model.proj.net[1].weight)] == 0.0
        assert wd[id(model.proj.net[0].weight)] == 0.01
    torch.optim.AdamW(groups)  # the groups are valid optimiser input


def test_position_embeddings_get_no_weight_decay() -> None:
    model = build_segmenter("test_vit", 3, embed_dim=8)
    wd = {name: g["weight_decay"] for g in model.param_groups(1e-4, 10.0, 0.05)
          for name, p in model.named_parameters() for q in g["params"] if q is p}
    pos = [n for n in wd if "pos_embed" in n]
    assert pos
    assert all(wd[n] == 0.0 for n in pos)
