"""FusionDecoder and ProjectionHead against a straightforward reference written out with tensor algebra."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from uda_ray.models import FusionDecoder, ProjectionHead


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _conv1x1(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    y = torch.einsum("bchw,oc->bohw", x, conv.weight[:, :, 0, 0])
    return y if conv.bias is None else y + conv.bias.view(1, -1, 1, 1)


def _bn_eval(x: torch.Tensor, bn: torch.nn.BatchNorm2d) -> torch.Tensor:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return (x - bn.running_mean.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)


def _randomise_bn(bn: torch.nn.BatchNorm2d) -> None:
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)


def test_fusion_matches_reference() -> None:
    channels, sizes = [4, 6, 8], [(9, 13), (5, 7), (3, 4)]
    dec = FusionDecoder(channels, num_classes=5, embed_dim=3, dropout=0.5).eval()
    _randomise_bn(dec.fuse[1])
    feats = [torch.randn(2, c, h, w) for c, (h, w) in zip(channels, sizes)]
    with torch.no_grad():
        logits, fused = dec(feats)
        embedded = [_conv1x1(f, e) for f, e in zip(feats, dec.embed)]
        embedded = [embedded[0]] + [F.interpolate(e, size=(9, 13), mode="bilinear", align_corners=False)
                                    for e in embedded[1:]]
        ref_fused = torch.relu(_bn_eval(_conv1x1(torch.cat(embedded, 1), dec.fuse[0]), dec.fuse[1]))
        ref_logits = _conv1x1(ref_fused, dec.classifier)
    assert logits.shape == (2, 5, 9, 13)
    assert fused.shape == (2, 3, 9, 13)
    torch.testing.assert_close(fused, ref_fused, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)


def test_fused_map_is_taken_before_dropout() -> None:
    dec = FusionDecoder([4, 4], num_classes=2, embed_dim=8, dropout=0.9).train()
    feats = [torch.randn(2, 4, 6, 6), torch.randn(2, 4, 3, 3)]
    logits, fused = dec(feats)
    with torch.no_grad():
        no_drop = _conv1x1(fused, dec.classifier)
    assert not torch.allclose(logits, no_drop)  # dropout acts on the classifier input …
    dec.dropout.p = 0.0
    _, fused_again = dec(feats)
    torch.testing.assert_close(fused, fused_again)  # … but not on the returned fused map


def test_decoder_argument_errors() -> None:
    with pytest.raises(ValueError, match="in_channels is empty"):
        FusionDecoder([], num_classes=2)
    with pytest.raises(ValueError, match="dropout = 1.0"):
        FusionDecoder([4], num_classes=2, dropout=1.0)
    dec = FusionDecoder([4, 8], num_classes=2, embed_dim=4)
    with pytest.raises(ValueError, match="got 1 feature maps, expected 2"):
        dec([torch.randn(1, 4, 4, 4)])


def test_projection_head_matches_reference() -> None:
    head = ProjectionHead(6, 3).eval()
    _randomise_bn(head.net[1])
    assert head.net[0].out_channels == 6  # hidden width = input width
    x = torch.randn(2, 6, 4, 5)
    with torch.no_grad():
        ref = _conv1x1(torch.relu(_bn_eval(_conv1x1(x, head.net[0]), head.net[1])), head.net[3])
        out = head(x)
    assert out.shape == (2, 3, 4, 5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert ProjectionHead(6, 3, hidden_dim=10).net[0].out_channels == 10
