"""DAFormer's decode head: parameter counts derived by hand, shapes, the fused map, and a functional reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from uda_ray.models.heads.daformer import DAFormerHead

MIT_B5_CHANNELS = (64, 128, 320, 512)
E, K = 256, 19


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parameter_count_aspp_fusion_mit_b5_by_hand():
    embed = (64 + 128 + 320 + 512) * E + 4 * E  # four linear layers C_l → 256 with bias           = 263_168
    concat = 4 * E  # 1024 channels into the ASPP
    branch_d1 = concat * E + 2 * E  # 1×1 conv (no bias) + BN(256)                                 = 262_656
    branch_sep = (concat * 3 * 3 + 2 * concat) + (concat * E + 2 * E)  # dw 3×3 + BN(1024), pw 1×1 + BN(256) = 273_920
    bottleneck = 4 * E * E * 3 * 3 + 2 * E  # 3×3 conv 1024 → 256 (no bias) + BN(256)              = 2_359_808
    classifier = E * K + K  # 1×1 conv with bias                                                   = 4_883
    expected = embed + branch_d1 + 3 * branch_sep + bottleneck + classifier
    assert expected == 3_712_275
    head = DAFormerHead(MIT_B5_CHANNELS, K)
    assert n_params(head) == expected
    assert n_params(head.embed) == embed and n_params(head.classifier) == classifier
    assert [n_params(b) for b in head.fuse.branches] == [branch_d1, branch_sep, branch_sep, branch_sep]
    assert n_params(head.fuse.bottleneck) == bottleneck


def test_parameter_count_conv1_fusion_mit_b5_by_hand():
    embed = (64 + 128 + 320 + 512) * E + 4 * E  # = 263_168
    fuse = 4 * E * E + 2 * E  # 1×1 conv 1024 → 256 (no bias) + BN(256)                           = 262_656
    classifier = E * K + K  # = 4_883
    assert embed + fuse + classifier == 530_707
    assert n_params(DAFormerHead(MIT_B5_CHANNELS, K, fusion="conv1")) == embed + fuse + classifier


def mit_features(batch: int = 2, size: tuple[int, int] = (64, 96), channels=MIT_B5_CHANNELS) -> list[torch.Tensor]:
    h, w = size
    return [torch.randn(batch, c, h // r, w // r) for c, r in zip(channels, (4, 8, 16, 32))]


@pytest.mark.parametrize("fusion", ["aspp", "conv1"])
def test_shapes(fusion):
    head = DAFormerHead((8, 16, 24, 32), 5, embed_dim=16, fusion=fusion)
    logits, fused = head(mit_features(channels=(8, 16, 24, 32)))
    assert logits.shape == (2, 5, 16, 24) and fused.shape == (2, 16, 16, 24)


def test_fused_map_is_taken_before_dropout():
    head = DAFormerHead((8, 16, 24, 32), 5, embed_dim=16, dropout=0.5).train()
    feats = mit_features(channels=(8, 16, 24, 32))
    torch.manual_seed(1)
    logits_a, fused_a = head(feats)
    torch.manual_seed(2)
    logits_b, fused_b = head(feats)
    assert torch.equal(fused_a, fused_b)  # deterministic: no dropout in it
    assert not torch.allclose(logits_a, logits_b)  # the classifier sees dropped channels
    head.eval()
    logits, fused = head(feats)
    torch.testing.assert_close(logits, head.classifier(fused))


def _cbr(x, seq, **conv_kwargs):
    """conv → BN (running statistics) → ReLU from one conv_norm_relu Sequential, written with functional ops."""
    conv, bn = seq[0], seq[1]
    y = F.conv2d(x, conv.weight, None, **conv_kwargs)
    return F.relu(F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, eps=bn.eps))


def test_matches_functional_reference_in_eval():
    head = DAFormerHead((8, 16, 24, 32), 5, embed_dim=12, dilations=(1, 2, 3)).eval()
    with torch.no_grad():  # non-trivial BN statistics and affine parameters
        for m in head.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    feats = mit_features(channels=(8, 16, 24, 32))
    size = feats[0].shape[-2:]
    emb = [F.conv2d(f, lin.weight, lin.bias) for f, lin in zip(feats, head.embed)]
    x = torch.cat([F.interpolate(e, size=size, mode="bilinear", align_corners=False) for e in emb], dim=1)
    c = x.shape[1]
    b1, b2, b3 = head.fuse.branches
    outs = [_cbr(x, b1)]
    for branch, d in ((b2, 2), (b3, 3)):
        dw = _cbr(x, branch[0], padding=d, dilation=d, groups=c)
        outs.append(_cbr(dw, branch[1]))
    fused = _cbr(torch.cat(outs, dim=1), head.fuse.bottleneck, padding=1)
    logits = F.conv2d(fused, head.classifier.weight, head.classifier.bias)
    with torch.no_grad():
        got_logits, got_fused = head(feats)
    torch.testing.assert_close(got_fused, fused)
    torch.testing.assert_close(got_logits, logits)


def test_convs_before_a_norm_have_no_bias_and_no_name_contains_head():
    head = DAFormerHead(MIT_B5_CHANNELS, K)
    for seq in head.modules():
        if isinstance(seq, nn.Sequential) and len(seq) == 3 and isinstance(seq[1], nn.BatchNorm2d):
            assert seq[0].bias is None
    assert all("head" not in name for name, _ in head.named_parameters())
    sep = head.fuse.branches[3][0][0]  # dilation 18 depthwise conv
    assert (sep.groups, sep.dilation, sep.padding, sep.kernel_size) == (1024, (18, 18), (18, 18), (3, 3))


def test_group_norm_and_bad_arguments():
    head = DAFormerHead((8, 16), 3, embed_dim=32, norm="group")
    assert any(isinstance(m, nn.GroupNorm) for m in head.modules())
    with pytest.raises(ValueError, match="fusion = 'sep'"):
        DAFormerHead((8, 16), 3, fusion="sep")
    with pytest.raises(ValueError, match="got 1 feature maps, expected 2"):
        head([torch.randn(1, 8, 4, 4)])
