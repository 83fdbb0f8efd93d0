"""DeepLabV2-ResNet-101 (ADVENT family) against an independent reference, and its official checkpoint formats.

The reference backbone is torchvision's ResNet with the caffe changes applied by hand (stride moved to the first
1×1 convolution, dilation 2/4 with padding = dilation in layers 3/4, ceil-mode max-pool); the reference classifier
is a functional sum of dilated convolutions. Weights are random with O(1) activations, so equality is meaningful.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from tests.conftest import SHALLOW_DEPTHS
from uda_ray.models.backbones.deeplabv2 import (
    CAFFE_MEAN_BGR,
    DeepLabV2ResNet,
    build_deeplabv2_r101,
    caffe_normalize,
    load_deeplabv2_checkpoint,
)
from uda_ray.models.heads.deeplabv2 import DeepLabV2Head

R101 = (3, 4, 23, 3)
SMALL = SHALLOW_DEPTHS
NUM_CLASSES = 5
DILATIONS = (6, 12, 18, 24)
TOL = {"rtol": 1e-5, "atol": 1e-5}


# ------------------------------------------------------------------------------------------------- reference
def reference_backbone(depths: tuple[int, ...]) -> torchvision.models.ResNet:
    """torchvision's ResNet made caffe-style: stride on conv1 of a layer's first block, dilated layers 3 and 4."""
    net = torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, list(depths))
    net.fc = nn.Identity()
    net.maxpool.ceil_mode = True
    for layer, (stride, dilation) in zip([net.layer1, net.layer2, net.layer3, net.layer4],
                                         [(1, 1), (2, 1), (1, 2), (1, 4)]):
        for i, block in enumerate(layer):
            block.conv1.stride = (stride, stride) if i == 0 else (1, 1)
            block.conv2.stride = (1, 1)
            block.conv2.dilation = (dilation, dilation)
            block.conv2.padding = (dilation, dilation)
            if block.downsample is not None:
                block.downsample[0].stride = (stride, stride)
    return net


def reference_features(net: torchvision.models.ResNet, x: torch.Tensor) -> list[torch.Tensor]:
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    out = []
    for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
        x = layer(x)
        out.append(x)
    return out


def reference_aspp(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor]) -> torch.Tensor:
    return sum(F.conv2d(x, w, b, padding=d, dilation=d) for w, b, d in zip(weights, biases, DILATIONS))


def randomize(net: nn.Module, generator: torch.Generator) -> None:
    """He-scaled convolutions and non-trivial BN affine/statistics, so activations stay O(1) through 100 layers."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=generator) * math.sqrt(1.0 / fan_in))
            elif isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(0.5 + 0.5 * torch.rand(n, generator=generator))
                m.bias.copy_(0.1 * torch.randn(n, generator=generator))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
                m.running_var.copy_(0.5 + torch.rand(n, generator=generator))


def classifier_weights(in_channels: int, num_classes: int, generator: torch.Generator):
    ws = [torch.randn(num_classes, in_channels, 3, 3, generator=generator) / math.sqrt(9 * in_channels)
          for _ in DILATIONS]
    bs = [torch.randn(num_classes, generator=generator) for _ in DILATIONS]
    return ws, bs


def classifier_state(prefix: str, ws: list[torch.Tensor], bs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    state = {}
    for i, (w, b) in enumerate(zip(ws, bs)):
        state[f"{prefix}conv2d_list.{i}.weight"] = w.clone()
        state[f"{prefix}conv2d_list.{i}.bias"] = b.clone()
    return state


def backbone_state(net: nn.Module, *, prefix: str = "", batches_tracked: bool = True) -> dict[str, torch.Tensor]:
    return {prefix + k: v.clone() for k, v in net.state_dict().items()
            if batches_tracked or not k.endswith("num_batches_tracked")}


@pytest.fixture(scope="module")
def ref() -> dict:
    """ResNet-101 reference with random weights, classifier weights for layer4 and layer3, reference outputs."""
    g = torch.Generator().manual_seed(0)
    net = reference_backbone(R101).eval()
    randomize(net, g)
    main = classifier_weights(2048, NUM_CLASSES, g)
    aux = classifier_weights(1024, NUM_CLASSES, g)
    return {"net": net, "main": main, "aux": aux}


def reference_outputs(ref: dict, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        feats = reference_features(ref["net"], x)
        return feats, reference_aspp(feats[-1], *ref["main"]), reference_aspp(feats[-2], *ref["aux"])


def network_outputs(backbone: DeepLabV2ResNet, head: DeepLabV2Head, x: torch.Tensor):
    with torch.no_grad():
        feats = backbone.eval()(x)
        logits, fused = head(feats)
        return feats, logits, fused, head.aux_logits(feats)


def assert_same(ours, theirs) -> None:
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, **TOL)


# ------------------------------------------------------------------------------------------------- network
@pytest.mark.parametrize("shape", [(1, 3, 65, 97), (2, 3, 64, 64)])
def test_matches_reference(ref: dict, shape: tuple[int, ...]) -> None:
    backbone = DeepLabV2ResNet()
    backbone.load_state_dict(ref["net"].state_dict(), strict=True)  # the official key names = torchvision's
    head = DeepLabV2Head(backbone.feature_channels, NUM_CLASSES, aux=True)
    head.classifier.load_state_dict(classifier_state("", *ref["main"]))
    head.aux_classifier.load_state_dict(classifier_state("", *ref["aux"]))
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 50
    feats, logits, fused, aux = network_outputs(backbone, head, x)
    ref_feats, ref_logits, ref_aux = reference_outputs(ref, x)
    assert feats[-1].abs().mean() > 0.1  # activations are not vanishing: the comparison means something
    assert_same(feats, ref_feats)
    torch.testing.assert_close(logits, ref_logits, **TOL)
    torch.testing.assert_close(aux, ref_aux, **TOL)
    assert fused is feats[-1]
    assert [f.shape[1] for f in feats] == backbone.feature_channels == [256, 512, 1024, 2048]


def test_official_module_names() -> None:
    keys = set(DeepLabV2ResNet().state_dict())
    for key in ["conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer1.0.bn1.weight",
                "layer1.0.downsample.0.weight", "layer1.0.downsample.1.running_var", "layer2.0.downsample.0.weight",
                "layer3.0.downsample.1.bias", "layer3.22.conv3.weight", "layer4.0.downsample.0.weight",
                "layer4.2.bn3.num_batches_tracked"]:
        assert key in keys, key
    assert "layer1.1.downsample.0.weight" not in keys
    head_keys = set(DeepLabV2Head([256, 512, 1024, 2048], 19, aux=True).state_dict())
    assert head_keys == {f"{m}.conv2d_list.{i}.{p}" for m in ("classifier", "aux_classifier") for i in range(4)
                         for p in ("weight", "bias")}


def _pooled(n: int) -> int:
    """conv 7×7/2 pad 3, then max-pool 3×3/2 pad 1 with ceil mode (the last window starts inside the input)."""
    n = (n + 6 - 7) // 2 + 1
    out = math.ceil((n + 2 - 3) / 2) + 1
    return out - 1 if (out - 1) * 2 >= n + 1 else out


@pytest.fixture(scope="module")
def meta_pair() -> tuple[DeepLabV2ResNet, torchvision.models.ResNet]:
    with torch.device("meta"):  # shapes only: no memory, no compute
        return DeepLabV2ResNet(), reference_backbone(R101)


@pytest.mark.parametrize("size", [(512, 1024), (33, 47), (71, 1)])
def test_spatial_sizes(meta_pair: tuple, size: tuple[int, int]) -> None:
    x = torch.empty(1, 3, *size, device="meta")
    ours, theirs = meta_pair[0](x), reference_features(meta_pair[1], x)
    assert [f.shape for f in ours] == [f.shape for f in theirs]
    h1, w1 = _pooled(size[0]), _pooled(size[1])
    h, w = (h1 - 1) // 2 + 1, (w1 - 1) // 2 + 1
    assert [tuple(f.shape[-2:]) for f in ours] == [(h1, w1)] + [(h, w)] * 3
    if size == (512, 1024):
        assert (h1, w1, h, w) == (129, 257, 65, 129)


def test_train_mode_matches_reference_and_updates_bn_statistics() -> None:
    g = torch.Generator().manual_seed(2)
    net = reference_backbone(SMALL)
    randomize(net, g)
    ours = DeepLabV2ResNet(SMALL)
    ours.load_state_dict(net.state_dict())
    x = torch.randn(2, 3, 40, 56, generator=g) * 50
    before = ours.layer3[1].bn2.running_mean.clone()
    assert_same(ours.train()(x), reference_features(net.train(), x))
    assert not torch.equal(ours.layer3[1].bn2.running_mean, before)  # ADVENT trains with running statistics updating
    torch.testing.assert_close(ours.layer3[1].bn2.running_mean, net.layer3[1].bn2.running_mean, **TOL)


def test_frozen_bn_and_parameter_counts() -> None:
    backbone = DeepLabV2ResNet()
    for name, module in backbone.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            assert module.affine and not any(p.requires_grad for p in module.parameters()), name
    assert all(p.requires_grad for n, p in backbone.named_parameters() if n.endswith("conv1.weight"))
    assert sum(p.numel() for p in backbone.parameters()) == 42_500_160  # torchvision ResNet-101 without fc
    assert sum(p.numel() for p in backbone.parameters() if p.requires_grad) == 42_394_816  # minus 105,344 BN γ, β
    head = DeepLabV2Head(backbone.feature_channels, 19, aux=True)
    assert sum(p.numel() for p in head.classifier.parameters()) == 4 * (2048 * 19 * 9 + 19) == 1_400_908
    assert sum(p.numel() for p in head.aux_classifier.parameters()) == 4 * (1024 * 19 * 9 + 19) == 700_492
    assert all(p.requires_grad for p in head.parameters())
    weights = torch.cat([c.weight.flatten() for c in head.classifier.conv2d_list])
    assert abs(weights.std().item() - 0.01) < 1e-3  # N(0, 0.01) like the official ClassifierModule


def test_head_interface_errors() -> None:
    head = DeepLabV2Head([256, 512, 1024, 2048], 3)
    assert head.aux_classifier is None
    feats = [torch.zeros(1, c, 4, 4) for c in (256, 512, 1024, 2048)]
    logits, fused = head(feats)
    assert logits.shape == (1, 3, 4, 4) and fused is feats[-1]
    with pytest.raises(ValueError, match="aux=False"):
        head.aux_logits(feats)
    with pytest.raises(ValueError, match=r"expected \[256, 512, 1024, 2048\]"):
        head(feats[:3])


def test_caffe_normalize() -> None:
    x = torch.tensor([1.0, 0.5, 0.0]).view(1, 3, 1, 1)  # RGB
    expected = torch.tensor([0.0 - CAFFE_MEAN_BGR[0], 127.5 - CAFFE_MEAN_BGR[1], 255.0 - CAFFE_MEAN_BGR[2]])
    torch.testing.assert_close(caffe_normalize(x).flatten(), expected)
    assert CAFFE_MEAN_BGR == (104.00698793, 116.66876762, 122.67891434)
    with pytest.raises(ValueError, match="expected"):
        caffe_normalize(torch.zeros(3, 4, 4))


# ------------------------------------------------------------------------------------------------- checkpoints
def test_imagenet_init_format(ref: dict, tmp_path: Path) -> None:
    """``Scale.``-prefixed keys, no num_batches_tracked, its own classifier ``Scale.layer5`` (21 VOC classes)."""
    state = backbone_state(ref["net"], prefix="Scale.", batches_tracked=False)
    state.update(classifier_state("Scale.layer5.", *classifier_weights(2048, 21, torch.Generator().manual_seed(3))))
    path = tmp_path / "DeepLab_resnet_pretrained_imagenet.pth"
    torch.save(state, path)
    backbone = build_deeplabv2_r101(pretrained_path=str(path))
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(4)) * 50
    with torch.no_grad():
        assert_same(backbone.eval()(x), reference_outputs(ref, x)[0])

    head = DeepLabV2Head(backbone.feature_channels, NUM_CLASSES, aux=True)
    init = {k: v.clone() for k, v in head.state_dict().items()}
    notes = load_deeplabv2_checkpoint(backbone, head, str(path))
    assert any("Scale.layer5" in n and "skipped" in n for n in notes)
    assert sum("keeps its initialisation" in n for n in notes) == 2
    assert all(torch.equal(v, init[k]) for k, v in head.state_dict().items())


def test_advent_trained_multi_level_format(ref: dict, tmp_path: Path) -> None:
    """A trained ADVENT state dict: plain keys, layer5 = ASPP on layer3, layer6 = ASPP on layer4."""
    state = backbone_state(ref["net"])
    state.update(classifier_state("layer5.", *ref["aux"]))
    state.update(classifier_state("layer6.", *ref["main"]))
    path = tmp_path / "gta2cityscapes_advent.pth"
    torch.save(state, path)
    backbone = DeepLabV2ResNet()
    head = DeepLabV2Head(backbone.feature_channels, NUM_CLASSES, aux=True)
    notes = load_deeplabv2_checkpoint(backbone, head, str(path))
    assert sum("loaded classifier" in n for n in notes) == 2
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(5)) * 50
    feats, logits, _, aux = network_outputs(backbone, head, x)
    ref_feats, ref_logits, ref_aux = reference_outputs(ref, x)
    assert_same(feats, ref_feats)
    torch.testing.assert_close(logits, ref_logits, **TOL)
    torch.testing.assert_close(aux, ref_aux, **TOL)


@pytest.fixture(scope="module")
def small_state() -> dict[str, torch.Tensor]:
    """A valid trained-format state dict of a shallow network (fast to write and load)."""
    net = reference_backbone(SMALL)
    randomize(net, torch.Generator().manual_seed(6))
    state = backbone_state(net)
    g = torch.Generator().manual_seed(7)
    state.update(classifier_state("layer5.", *classifier_weights(1024, NUM_CLASSES, g)))
    state.update(classifier_state("layer6.", *classifier_weights(2048, NUM_CLASSES, g)))
    return state


def _load(state: dict, tmp_path: Path, head: DeepLabV2Head | None = None, name: str = "ckpt.pth") -> list[str]:
    path = tmp_path / name
    torch.save(state, path)
    return load_deeplabv2_checkpoint(DeepLabV2ResNet(SMALL), head, str(path))


@pytest.mark.parametrize(("classes", "aux", "loaded", "skipped"), [
    (NUM_CLASSES, True, 2, 0),
    (NUM_CLASSES, False, 1, 1),  # the layer3 classifier has nowhere to go
    (NUM_CLASSES + 1, True, 0, 2),  # other number of classes (e.g. a 19-class source model for SYNTHIA's 16)
])
def test_classifier_notes(small_state: dict, tmp_path: Path, classes: int, aux: bool, loaded: int,
                          skipped: int) -> None:
    head = DeepLabV2Head([256, 512, 1024, 2048], classes, aux=aux)
    notes = _load(small_state, tmp_path, head)
    assert sum("loaded classifier" in n for n in notes) == loaded
    assert sum("skipped classifier" in n for n in notes) == skipped
    if loaded == 2:
        torch.testing.assert_close(head.classifier.conv2d_list[3].bias, small_state["layer6.conv2d_list.3.bias"])
        aux_weight = head.aux_classifier.conv2d_list[0].weight
        torch.testing.assert_close(aux_weight, small_state["layer5.conv2d_list.0.weight"])


def test_no_head_skips_classifiers(small_state: dict, tmp_path: Path) -> None:
    notes = _load(small_state, tmp_path)
    assert sum("no head was given" in n for n in notes) == 2


@pytest.mark.parametrize(("edit", "message"), [
    (lambda s: s.pop("layer2.0.downsample.1.running_var"),
     "missing backbone keys: 'layer2.0.downsample.1.running_var'"),
    (lambda s: s.update({"layer4.7.conv1.weight": torch.zeros(1)}), "unexpected keys: 'layer4.7.conv1.weight'"),
    (lambda s: s.update({"layer1.0.conv2.weight": torch.zeros(64, 64, 1, 1)}),
     r"'layer1.0.conv2.weight' \(64, 64, 1, 1\) vs expected \(64, 64, 3, 3\)"),
    (lambda s: s.update({"layer6.conv2d_list.0.weight": torch.zeros(NUM_CLASSES, 2048, 1, 1)}),
     r"'layer6.conv2d_list.0.weight' \(5, 2048, 1, 1\) vs expected \(5, 2048, 3, 3\)"),
    (lambda s: s.update({"layer7.conv2d_list.0.weight": torch.zeros(1)}), "unexpected keys: 'layer7"),
    (lambda s: s.update({"layer5.conv2d_list.0.weight": torch.zeros(NUM_CLASSES, 2048, 3, 3)}),
     "'layer5' and 'layer6' both take 2048 channels"),
    (lambda s: s.pop("layer6.conv2d_list.2.bias"), "classifier 'layer6' has keys"),
    (lambda s: s.update({"Scale.conv1.weight": torch.zeros(1)}), "start with 'Scale.'"),
])
def test_errors_name_file_and_key(small_state: dict, tmp_path: Path, edit, message: str) -> None:
    state = dict(small_state)
    edit(state)
    with pytest.raises(ValueError, match=message) as info:
        _load(state, tmp_path, DeepLabV2Head([256, 512, 1024, 2048], NUM_CLASSES, aux=True), name="broken.pth")
    assert "broken.pth" in str(info.value)


def test_other_networks_are_rejected(tmp_path: Path) -> None:
    mit = {"patch_embed1.proj.weight": torch.zeros(64, 3, 7, 7), "block1.0.attn.q.weight": torch.zeros(64, 64)}
    with pytest.raises(ValueError, match=r"mit\.pth.*not a DeepLabV2 checkpoint.*patch_embed1"):
        _load(mit, tmp_path, name="mit.pth")
    tv = torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, list(SMALL)).state_dict()
    with pytest.raises(ValueError, match=r"tv\.pth.*not a DeepLabV2 checkpoint.*'fc\.weight'"):
        _load(tv, tmp_path, name="tv.pth")
    with pytest.raises(ValueError, match=r"junk\.pth.*expected a mapping of parameter names to tensors"):
        _load({"epoch": 3, "state": {"a": 1}}, tmp_path, name="junk.pth")
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        load_deeplabv2_checkpoint(DeepLabV2ResNet(SMALL), None, str(tmp_path / "absent.pth"))
