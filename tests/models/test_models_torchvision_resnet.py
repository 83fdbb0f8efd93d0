"""SDCA's network (deeplabv2_tv_r101 / _bn) against torchvision's own dilated ResNet-101 loaded from a file in the
format of torchvision's resnet101-5d3b4d8f.pth: same layer3 / layer4 outputs; bad files fail naming the keys."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from uda_ray.config import Config, ConfigError, apply_overrides
from uda_ray.models import Segmenter
from uda_ray.models.backbones.torchvision_resnet import TorchvisionResNet, load_torchvision_resnet_checkpoint
from uda_ray.models.errors import CheckpointError

SMALL = (1, 1, 2, 1)  # blocks per layer of the quick networks (key checks, the BatchNorm variants)


def reference(eps: float, depths: tuple[int, ...] = (3, 4, 23, 3)) -> nn.Module:
    """torchvision's dilated ResNet as SDCA builds it (ResNet-101 by default, through torchvision's own constructor),
    its BatchNorm statistics and affine parameters randomised."""
    torch.manual_seed(0)
    norm = partial(nn.BatchNorm2d, eps=eps)
    net = (torchvision.models.resnet101(weights=None, replace_stride_with_dilation=[False, True, True],
                                        norm_layer=norm) if depths == (3, 4, 23, 3) else
           torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, list(depths),
                                            replace_stride_with_dilation=[False, True, True], norm_layer=norm))
    g = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            m.weight.data.copy_(0.5 + torch.rand(n, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(n, generator=g))
    return net


def save_official(net: nn.Module, path: Path, *, with_counters: bool) -> Path:
    """A plain state dict with the ImageNet classifier, as torchvision's file (written before PyTorch 0.4.1, so without
    num_batches_tracked unless asked)."""
    state = {k: v for k, v in net.state_dict().items() if with_counters or not k.endswith("num_batches_tracked")}
    torch.save(state, path)
    return path


def reference_levels(net: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    out = []
    for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
        x = layer(x)
        out.append(x)
    return out


def test_frozen_resnet101_equals_torchvision(tmp_path: Path):
    frozen_reference = reference(eps=0.0).eval()  # SDCA's FrozenBatchNorm2d: no eps
    file = save_official(frozen_reference, tmp_path / "resnet101-5d3b4d8f.pth", with_counters=False)
    model = Segmenter("deeplabv2_tv_r101", 19, decoder="deeplabv2", pretrained_path=str(file))
    assert isinstance(model.backbone, TorchvisionResNet)
    assert not [n for n, p in model.backbone.named_parameters() if ".bn" in n or "downsample.1" in n]
    # float64: a hundred layers amplify float32 rounding differences (rsqrt vs sqrt) past any useful tolerance
    x = torch.randn(1, 3, 65, 65, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    model.double()
    with torch.no_grad():
        want = reference_levels(frozen_reference.double(), x)
        for mode in (True, False):  # frozen: train and eval mode agree
            got = model.train(mode).backbone(x)
            assert [tuple(t.shape) for t in got] == [(1, 256, 17, 17), (1, 512, 9, 9), (1, 1024, 9, 9),
                                                     (1, 2048, 9, 9)]
            for g, w in zip(got[2:], want[2:]):
                torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9 * w.abs().max().item())


@pytest.mark.parametrize("with_counters", [False, True])
def test_frozen_batchnorm_has_no_eps(tmp_path: Path, with_counters: bool):
    """SDCA's frozen layer equals BatchNorm with eps 0 and differs from torchvision's eps 1e-5; a file with
    num_batches_tracked (written by a newer PyTorch) loads too."""
    net = reference(eps=0.0, depths=SMALL).eval().double()
    backbone = TorchvisionResNet(depths=SMALL)
    load_torchvision_resnet_checkpoint(backbone, str(save_official(net, tmp_path / "r.pth",
                                                                   with_counters=with_counters)))
    x = torch.randn(1, 3, 33, 33, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        got, want = backbone.double()(x)[-1], reference_levels(net, x)[-1]
        with_eps = reference_levels(reference(eps=1e-5, depths=SMALL).eval().double(), x)[-1]
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9 * want.abs().max().item())
    assert not torch.allclose(got, with_eps, rtol=1e-6, atol=1e-6 * want.abs().max().item())


def test_trainable_batchnorm_variant_equals_torchvision_in_both_modes(tmp_path: Path):
    net = reference(eps=1e-5, depths=SMALL)
    file = save_official(net, tmp_path / "resnet.pth", with_counters=False)
    backbone = TorchvisionResNet(frozen_bn=False, depths=SMALL)
    notes = load_torchvision_resnet_checkpoint(backbone, str(file))
    assert any("fc.weight" in n for n in notes)
    assert all(p.requires_grad for p in backbone.parameters())
    x = torch.randn(2, 3, 33, 33, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    net.double()
    backbone.double()
    for mode in (False, True):
        net.train(mode)
        backbone.train(mode)
        with torch.no_grad():
            want = reference_levels(net, x)[-1]
            torch.testing.assert_close(backbone(x)[-1], want, rtol=1e-9, atol=1e-9 * want.abs().max().item())


def test_bad_files_name_the_keys(tmp_path: Path):
    state = {k: v for k, v in reference(0.0, SMALL).state_dict().items() if not k.endswith("num_batches_tracked")}
    backbone = TorchvisionResNet(depths=SMALL)
    cases = {
        "missing backbone keys: 'layer4.0.conv3.weight'": {k: v for k, v in state.items()
                                                          if k != "layer4.0.conv3.weight"},
        "unexpected keys: 'head.weight'": {**state, "head.weight": torch.zeros(1)},
        r"shape mismatches: 'conv1.weight' \(64, 3, 3, 3\) vs expected \(64, 3, 7, 7\)":
            {**state, "conv1.weight": torch.zeros(64, 3, 3, 3)},
        "caffe-style DeepLab checkpoint": {f"Scale.{k}": v for k, v in state.items()},
    }
    for message, bad in cases.items():
        torch.save(bad, tmp_path / "bad.pth")
        with pytest.raises(CheckpointError, match=message):
            load_torchvision_resnet_checkpoint(backbone, str(tmp_path / "bad.pth"))


def test_config_names_and_checks():
    cfg = apply_overrides(Config(), {"model.backbone": "deeplabv2_tv_r101", "model.decoder": "deeplabv2",
                                     "model.input_norm": "imagenet"})
    assert cfg.model.backbone == "deeplabv2_tv_r101"
    with pytest.raises(ConfigError, match="input_norm = 'caffe' with model.backbone = 'deeplabv2_tv_r101_bn'"):
        apply_overrides(Config(), {"model.backbone": "deeplabv2_tv_r101_bn", "model.decoder": "deeplabv2",
                                   "model.input_norm": "caffe"})
