"""SDCA's network: torchvision's ResNet-101 dilated to output stride 8, and torchvision's ImageNet checkpoint.

SDCA (BIT-DA/SDCA, ``core/models/resnet.py``, ``feature_extractor.py``, ``build.py``) builds torchvision's ResNet
(its own copy of ``torchvision.models.resnet``) with ``replace_stride_with_dilation=[False, True, True]``: the stride
of a bottleneck sits on its 3×3 convolution, the stem's max-pool has no ceil mode, and layer3 / layer4 trade their
stride for dilation 2 / 4, the first block of each keeping the previous dilation (1 / 2). ``IntermediateLayerGetter``
returns layer4 (2048 channels, output stride 8) to ``ASPP_Classifier_V2`` (the same four-branch sum as
``heads/deeplabv2.py``). Input: ImageNet mean/std on RGB in [0, 1] (``INPUT.TO_BGR255`` False; ``input_norm:
imagenet``). Weights: ``resnet101-5d3b4d8f.pth``, loaded by mmcv's non-strict ``load_checkpoint`` (its ``fc.*``
belongs to no module that is kept).

BatchNorm. The source-only and SDCA stages (``MODEL.FREEZE_BN: True``) replace every BatchNorm by SDCA's
``FrozenBatchNorm2d`` (``core/models/layers.py``): affine weight and bias and running statistics are fixed buffers
and ``y = (x − mean) · weight / √var + bias`` with no ε (torchvision's own FrozenBatchNorm2d adds 1e-5; reproduced
as SDCA has it: ``FrozenBatchNorm2d``, backbone ``deeplabv2_tv_r101``). The self-training stage (``FREEZE_BN:
False``) trains plain ``nn.BatchNorm2d`` (ε 1e-5, SyncBatchNorm under DDP; backbone ``deeplabv2_tv_r101_bn``).

``forward`` returns the four layers' outputs, finest first, as the other backbones do; the state dict keys are
torchvision's (``conv1.weight``, ``bn1.running_var``, ``layer3.0.downsample.1.weight``, …).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from uda_ray.models.errors import CheckpointError, listing, read_state_dict, shape_mismatches

RESNET101_DEPTHS = (3, 4, 23, 3)
DILATE = [False, True, True]  # SDCA: layer2 keeps its stride, layers 3 and 4 dilate → output stride 8
CLASSIFIER_PREFIX = "fc."  # torchvision's ImageNet classifier: in the file, not in the backbone
STEM = ("conv1", "bn1", "relu", "maxpool")
LAYERS = ("layer1", "layer2", "layer3", "layer4")


class FrozenBatchNorm2d(nn.Module):
    """SDCA's ``FrozenBatchNorm2d``: ``y = x · s + (bias − mean · s)`` with ``s = weight / √(var + eps)``, all four
    as buffers (nothing trains, train and eval mode agree); ``eps`` 0 as in SDCA."""

    weight: torch.Tensor
    bias: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor

    def __init__(self, num_features: int, eps: float = 0.0) -> None:
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()  # (C,)
        shift = self.bias - self.running_mean * scale  # (C,)
        return x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)


class TorchvisionResNet(nn.Module):
    """torchvision's dilated ResNet (output stride 8) without its pooling and classifier; ``frozen_bn`` picks SDCA's
    ``FrozenBatchNorm2d`` or a trainable ``nn.BatchNorm2d``. ``depths`` (3, 4, 23, 3) is ResNet-101."""

    def __init__(self, *, frozen_bn: bool = True, depths: Sequence[int] = RESNET101_DEPTHS) -> None:
        super().__init__()
        if len(depths) != 4 or any(d < 1 for d in depths):
            raise ValueError(f"TorchvisionResNet: depths = {tuple(depths)}: expected 4 block counts >= 1")
        self.depths, self.frozen_bn = tuple(int(d) for d in depths), frozen_bn
        net = ResNet(Bottleneck, list(self.depths), replace_stride_with_dilation=DILATE,
                     norm_layer=FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d)
        for name in STEM + LAYERS:  # torchvision's names, so its checkpoints load key for key
            self.add_module(name, getattr(net, name))
        self.feature_channels: list[int] = [256, 512, 1024, 2048]
        self.feature_reductions: list[int] = [4, 8, 8, 8]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x (B, 3, H, W) ImageNet-normalised → [(B, 256, H/4, W/4), (B, 512, h, w), (B, 1024, h, w),
        (B, 2048, h, w)] with h = ⌈H/8⌉ (for H = 65: 17 then 9)."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"TorchvisionResNet.forward: input of shape {tuple(x.shape)}: expected (B, 3, H, W)")
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        features = []
        for name in LAYERS:
            x = getattr(self, name)(x)
            features.append(x)
        return features


def load_torchvision_resnet_checkpoint(backbone: TorchvisionResNet, path: str) -> list[str]:
    """Load torchvision's ImageNet ResNet file (``resnet101-5d3b4d8f.pth``) into ``backbone`` unchanged; returns notes.

    ``fc.*`` (the ImageNet classifier) is skipped, as SDCA's non-strict load leaves it on a module it drops. Every
    other key must belong to the backbone with its shape, and every backbone key must be in the file, except
    ``num_batches_tracked`` (files written before PyTorch 0.4.1 have none; a frozen backbone has no such buffer and
    ignores the file's): anything else raises a CheckpointError naming the file and the keys.
    """
    state = read_state_dict(path, "torchvision ResNet checkpoint")
    if any(k.startswith("Scale.") for k in state) or "layer5.conv2d_list.0.weight" in state:
        raise CheckpointError(f"torchvision ResNet checkpoint {path!r}: this is a caffe-style DeepLab checkpoint "
                              "(Scale.* or layer5/layer6 keys): it belongs to model.backbone: deeplabv2_r101 with "
                              "model.input_norm: caffe, not to the torchvision ResNet")
    own = backbone.state_dict()
    skipped = [k for k in state if k.startswith(CLASSIFIER_PREFIX)]
    loaded = {k: v for k, v in state.items() if k in own}
    unexpected = [k for k in state if k not in own and not k.startswith(CLASSIFIER_PREFIX)
                  and not (k.endswith("num_batches_tracked") and backbone.frozen_bn)]
    missing = [k for k in own if k not in loaded and not k.endswith("num_batches_tracked")]
    shapes = shape_mismatches(loaded, own)
    problems = []
    if unexpected:
        problems.append(f"unexpected keys: {listing([repr(k) for k in unexpected])}")
    if missing:
        problems.append(f"missing backbone keys: {listing([repr(k) for k in missing])}")
    if shapes:
        problems.append(f"shape mismatches: {listing(shapes)}")
    if problems:
        raise CheckpointError(f"torchvision ResNet checkpoint {path!r} does not fit the dilated ResNet"
                              f"{backbone.depths}: " + "; ".join(problems))
    notes = [f"{path}: loaded {len(loaded)} backbone tensors"]
    for key in own:  # a file without num_batches_tracked: keep the module's own counters
        loaded.setdefault(key, own[key])
    backbone.load_state_dict(loaded, strict=True)
    if skipped:
        notes.append(f"{path}: skipped torchvision's ImageNet classifier ({', '.join(skipped)})")
    return notes
