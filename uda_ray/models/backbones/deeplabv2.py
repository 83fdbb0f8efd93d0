"""DeepLabV2's caffe-style dilated ResNet-101, as the ADVENT family defines it, and its checkpoints.

The network of ADVENT (``advent/model/deeplabv2.py``), reused unchanged by CFContra; METHODS.md §13. The
target-information method (EHTDI, ``models/deeplab_multi.py``, from PixMatch) has the same layers and names but
freezes only the stem's BN affine parameters and its ASPP returns after the second branch (see heads/deeplabv2.py).
It differs from torchvision's ResNet in three places, which is why torchvision weights (same key names, same
shapes) do not fit it:

- the stride of a bottleneck sits on its first 1×1 convolution (caffe), not on the 3×3 one;
- the stem's 3×3/2 max-pool has ``ceil_mode=True`` (a 512×1024 input gives 129×257 after it, 65×129 at stride 8);
- layer3 and layer4 keep stride 1 and dilate every 3×3 convolution by 2 and 4 (padding = dilation), including
  their first blocks, so the output stride is 8.

SDCA does not use this network: its ``core/models/resnet.py`` is torchvision's ResNet-101 (stride on the 3×3 conv,
floor-mode pool, ``replace_stride_with_dilation=[False, True, True]``, so the first blocks of layers 3/4 have
dilation 1/2), with torchvision's ImageNet weights, ImageNet mean/std RGB input and ``FrozenBatchNorm2d``.

Every layer's first block has a projection shortcut (1×1 conv with the layer's stride + BN): the official rule
"stride ≠ 1, or channels change, or dilation is 2 or 4" holds for all four layers of ResNet-101.

BatchNorm: ``nn.BatchNorm2d`` with affine parameters whose ``requires_grad`` is False (frozen γ, β), default
momentum 0.1 and eps 1e-5. The official scripts call ``model.train()`` and nothing switches BN to eval mode, so the
running statistics keep updating during adaptation; this module does the same (its mode decides).

Input: caffe normalisation, ``x = 255·x_BGR − mean_BGR`` with no division by a std (``caffe_normalize``).

Checkpoints (``load_deeplabv2_checkpoint``):

- the DeepLab ImageNet init ``DeepLab_resnet_pretrained_imagenet.pth`` (ADVENT, CFContra) or the COCO init
  ``DeepLab_resnet_pretrained_init-f81d91e8.pth`` (AdaptSegNet, PixMatch/EHTDI): every key is prefixed ``Scale.``,
  the keys after the prefix are the network's own, and ``Scale.layer5.*`` is the init's classifier, which the
  official scripts drop (they keep every other key). Written by an old PyTorch: no ``num_batches_tracked``.
- a trained ADVENT-family state dict (``torch.save(model.state_dict())``): plain keys, ``layer5`` = classifier on
  layer3 (1024 channels, multi-level "aux") and ``layer6`` = classifier on layer4 (2048 channels); an older
  single-level DeepLab (AdaptSegNet's ``Res_Deeplab``) names its classifier on layer4 ``layer5``. The role of a
  classifier is therefore read from its input width, not its name.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from uda_ray.models.errors import CheckpointError, listing, read_state_dict, shape_mismatches

if TYPE_CHECKING:
    from uda_ray.models.heads.deeplabv2 import DeepLabV2Head

log = logging.getLogger(__name__)

# ADVENT cfg.TRAIN.IMG_MEAN / cfg.TEST.IMG_MEAN (advent/domain_adaptation/config.py), in BGR order, 0–255 scale.
CAFFE_MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)
RESNET101_DEPTHS = (3, 4, 23, 3)
EXPANSION = 4
INIT_PREFIX = "Scale."
CLASSIFIER_NAMES = ("layer5", "layer6")


def caffe_normalize(x: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] → what the caffe DeepLab weights expect: ``255·x[:, [2, 1, 0]] − CAFFE_MEAN_BGR``.

    x: (B, 3, H, W). ADVENT reads 8-bit RGB as float 0–255, reverses the channels to BGR and subtracts the mean;
    there is no std.
    """
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"caffe_normalize: input of shape {tuple(x.shape)}: expected (B, 3, H, W) RGB in [0, 1]")
    mean = torch.tensor(CAFFE_MEAN_BGR, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return x.flip(1) * 255.0 - mean  # (B, 3, H, W), BGR


def _frozen_bn(channels: int) -> nn.BatchNorm2d:
    """BatchNorm whose γ, β do not train; its running statistics still update in train mode (as in ADVENT)."""
    bn = nn.BatchNorm2d(channels, affine=True)
    for p in bn.parameters():
        p.requires_grad = False
    return bn


class CaffeBottleneck(nn.Module):
    """1×1 (stride) → 3×3 (dilation, padding = dilation) → 1×1 ×4 channels, each + frozen BN; residual; ReLU."""

    def __init__(self, in_channels: int, width: int, *, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=1, stride=stride, bias=False)
        self.bn1 = _frozen_bn(width)
        self.conv2 = nn.Conv2d(width, width, kernel_size=3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = _frozen_bn(width)
        self.conv3 = nn.Conv2d(width, width * EXPANSION, kernel_size=1, bias=False)
        self.bn3 = _frozen_bn(width * EXPANSION)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


class DeepLabV2ResNet(nn.Module):
    """Caffe-style dilated ResNet (output stride 8); ``forward`` returns the four layers' outputs, finest first.

    Module names are the official ones (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0``, …), so
    the official checkpoints load key for key. The input must already be normalised (``caffe_normalize``).
    ``depths`` = blocks per layer: (3, 4, 23, 3) is ResNet-101; (3, 4, 6, 3) gives DeepLab's ResNet-50.
    """

    def __init__(self, depths: Sequence[int] = RESNET101_DEPTHS):
        super().__init__()
        if len(depths) != 4 or any(d < 1 for d in depths):
            raise ValueError(f"DeepLabV2ResNet: depths = {tuple(depths)}: expected 4 block counts >= 1")
        self.depths = tuple(int(d) for d in depths)
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = _frozen_bn(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1, ceil_mode=True)
        # (width, stride, dilation) per layer: layers 3 and 4 trade their stride for dilation → output stride 8.
        specs = [(64, 1, 1), (128, 2, 1), (256, 1, 2), (512, 1, 4)]
        in_channels = 64
        for index, ((width, stride, dilation), depth) in enumerate(zip(specs, self.depths), start=1):
            self.add_module(f"layer{index}", _make_layer(in_channels, width, depth, stride=stride, dilation=dilation))
            in_channels = width * EXPANSION
        self.feature_channels: list[int] = [w * EXPANSION for w, _, _ in specs]  # [256, 512, 1024, 2048]
        self.feature_reductions: list[int] = [4, 8, 8, 8]
        # ADVENT's init (ImageNet/COCO weights replace it in practice): conv N(0, 0.01), BN γ = 1, β = 0.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.01)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: (B, 3, H, W) caffe-normalised → [(B, 256, h1, w1), (B, 512, h, w), (B, 1024, h, w), (B, 2048, h, w)].

        h1 = ⌈(⌊(H − 1)/2⌋ + 1 − 1)/2⌉ + 1 (conv 7×7/2, then ceil-mode pool 3×3/2); h = ⌊(h1 − 1)/2⌋ + 1.
        """
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"DeepLabV2ResNet.forward: input of shape {tuple(x.shape)}: expected (B, 3, H, W)")
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        features = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            features.append(x)
        return features


def _make_layer(in_channels: int, width: int, depth: int, *, stride: int, dilation: int) -> nn.Sequential:
    """``depth`` bottlenecks; the first one carries the stride and a projection shortcut (1×1 conv + frozen BN)."""
    out_channels = width * EXPANSION
    downsample = None
    # The official rule; true for the first block of every layer of ResNet-101.
    if stride != 1 or in_channels != out_channels or dilation in (2, 4):
        downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                                   _frozen_bn(out_channels))
    blocks = [CaffeBottleneck(in_channels, width, stride=stride, dilation=dilation, downsample=downsample)]
    blocks += [CaffeBottleneck(out_channels, width, dilation=dilation) for _ in range(depth - 1)]
    return nn.Sequential(*blocks)


def build_deeplabv2_r101(*, pretrained_path: str = "") -> DeepLabV2ResNet:
    """DeepLabV2's ResNet-101; with ``pretrained_path`` its backbone weights are loaded from an official file.

    A classifier in the file is skipped (no head here); use ``load_deeplabv2_checkpoint`` with the head to load it.
    """
    backbone = DeepLabV2ResNet(RESNET101_DEPTHS)
    if pretrained_path:
        for note in load_deeplabv2_checkpoint(backbone, None, pretrained_path):
            log.info("%s", note)
    return backbone


# ------------------------------------------------------------------------------------------------- checkpoints
def _strip_init_prefix(state: dict[str, torch.Tensor], path: str) -> tuple[dict[str, torch.Tensor], bool]:
    """Drop the ImageNet/COCO init's ``Scale.`` prefix; returns (state, whether the file is in that format)."""
    prefixed = [k for k in state if k.startswith(INIT_PREFIX)]
    if not prefixed:
        return state, False
    if len(prefixed) != len(state):
        plain = [repr(k) for k in state if not k.startswith(INIT_PREFIX)]
        raise CheckpointError(f"DeepLabV2 checkpoint {path!r}: {len(prefixed)} keys start with {INIT_PREFIX!r} (the "
                              f"DeepLab init format) but {len(plain)} do not: {listing(plain)}")
    return {k[len(INIT_PREFIX):]: v for k, v in state.items()}, True


def _check_is_deeplabv2(state: dict[str, torch.Tensor], path: str) -> None:
    """Reject files of other networks before listing hundreds of missing keys."""
    first = listing([repr(k) for k in state], limit=5)
    if "fc.weight" in state:
        raise CheckpointError(f"DeepLabV2 checkpoint {path!r}: not a DeepLabV2 checkpoint: it has 'fc.weight', an "
                              "ImageNet classifier, so it is a torchvision/timm classification ResNet; those put the "
                              "stride on the 3×3 convolution and pool without ceil mode, so their weights do not "
                              "belong to the caffe-style DeepLabV2 ResNet even though the key names match "
                              f"(first keys: {first})")
    if "conv1.weight" not in state or "layer1.0.conv1.weight" not in state:
        raise CheckpointError(f"DeepLabV2 checkpoint {path!r}: not a DeepLabV2 checkpoint: expected the keys "
                              f"'conv1.weight' and 'layer1.0.conv1.weight' (optionally prefixed {INIT_PREFIX!r}); "
                              f"first keys: {first}")


def load_deeplabv2_checkpoint(backbone: DeepLabV2ResNet, head: DeepLabV2Head | None, path: str, *,
                              state: dict[str, torch.Tensor] | None = None) -> list[str]:
    """Load an official DeepLabV2 file into ``backbone`` (and the classifiers into ``head``); returns notes.
    ``state``: the file's tensors when the caller has read them already (``uda_ray.models.released``); ``path`` then
    only names the file in notes and errors.

    Backbone: strict. Keys of the network the file lacks, keys of neither backbone nor classifier, and shape
    mismatches raise a CheckpointError naming the file and the keys. ``num_batches_tracked`` may be absent (old
    PyTorch).
    Classifiers (``layer5``/``layer6``): the init file's ``Scale.layer5`` is skipped, as the official scripts do.
    A trained file's classifier on layer4 (2048 channels in) goes to ``head.classifier``, the one on layer3 (1024 in)
    to ``head.aux_classifier``; each is skipped with a note when there is no head, no aux classifier, or the number
    of classes differs. A head classifier the file lacks keeps its initialisation (noted).
    """
    if state is None:
        state = read_state_dict(path, "DeepLabV2 checkpoint")
    state, init_format = _strip_init_prefix(state, path)
    _check_is_deeplabv2(state, path)
    notes: list[str] = []
    own = backbone.state_dict()
    loaded: dict[str, torch.Tensor] = {}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for key, tensor in state.items():
        name, _, rest = key.partition(".")
        if key in own:
            loaded[key] = tensor
        elif name in CLASSIFIER_NAMES:
            groups.setdefault(name, {})[rest] = tensor
        else:
            unknown.append(key)
    if init_format and "layer5" in groups:
        skipped = groups.pop("layer5")
        notes.append(f"{path}: skipped the init's classifier '{INIT_PREFIX}layer5.*' ({len(skipped)} keys), as "
                     "ADVENT's train.py does")

    missing = [k for k in own if k not in loaded and not k.endswith("num_batches_tracked")]
    shapes = shape_mismatches(loaded, own)
    problems = []
    if unknown:
        problems.append(f"unexpected keys: {listing([repr(k) for k in unknown])}")
    if missing:
        problems.append(f"missing backbone keys: {listing([repr(k) for k in missing])}")
    if shapes:
        problems.append(f"shape mismatches: {listing(shapes)}")
    if problems:
        raise CheckpointError(f"DeepLabV2 checkpoint {path!r} does not fit DeepLabV2ResNet{backbone.depths}: "
                              + "; ".join(problems))

    classifiers = _classifier_roles(groups, backbone, path)
    for key in own:  # an old file without num_batches_tracked: keep the module's own counters
        loaded.setdefault(key, own[key])
    backbone.load_state_dict(loaded, strict=True)
    notes += _load_classifiers(classifiers, head, path)
    return notes


def _classifier_roles(groups: dict[str, dict[str, torch.Tensor]], backbone: DeepLabV2ResNet,
                      path: str) -> dict[str, tuple[str, dict[str, torch.Tensor]]]:
    """{'main' | 'aux': (file name, sub-state)} by the classifier's input width (layer4's or layer3's channels)."""
    roles = {backbone.feature_channels[-1]: "main", backbone.feature_channels[-2]: "aux"}
    found: dict[str, tuple[str, dict[str, torch.Tensor]]] = {}
    for name, sub in sorted(groups.items()):
        weight = sub.get("conv2d_list.0.weight")
        if weight is None or weight.dim() != 4:
            raise CheckpointError(f"DeepLabV2 checkpoint {path!r}: classifier {name!r} has no 4-d "
                                  f"'conv2d_list.0.weight' (its keys: {listing([repr(f'{name}.{k}') for k in sub])})")
        role = roles.get(int(weight.shape[1]))
        if role is None:
            raise CheckpointError(f"DeepLabV2 checkpoint {path!r}: classifier {name!r} takes {weight.shape[1]} "
                                  f"channels: expected {backbone.feature_channels[-1]} (layer4) or "
                                  f"{backbone.feature_channels[-2]} (layer3)")
        if role in found:
            raise CheckpointError(f"DeepLabV2 checkpoint {path!r}: classifiers {found[role][0]!r} and {name!r} both "
                                  f"take {weight.shape[1]} channels")
        found[role] = (name, sub)
    return found


def _load_classifiers(classifiers: dict[str, tuple[str, dict[str, torch.Tensor]]], head: DeepLabV2Head | None,
                      path: str) -> list[str]:
    """Load each found classifier into the head module of its role, or say why it was skipped."""
    notes: list[str] = []
    targets = {"main": ("classifier", "on layer4"), "aux": ("aux_classifier", "on layer3 (aux)")}
    for role, (attr, where) in targets.items():
        module = getattr(head, attr, None) if head is not None else None
        if role not in classifiers:
            if module is not None:
                notes.append(f"{path}: has no classifier {where}: head.{attr} keeps its initialisation")
            continue
        name, sub = classifiers[role]
        if head is None or module is None:
            reason = "no head was given" if head is None else "the head has no aux classifier (aux=False)"
            notes.append(f"{path}: skipped classifier {name!r} {where}: {reason}")
            continue
        own = module.state_dict()
        if set(sub) != set(own):
            raise CheckpointError(f"DeepLabV2 checkpoint {path!r}: classifier {name!r} has keys "
                                  f"{listing(sorted(sub))}; head.{attr} expects {listing(sorted(own))}")
        file_classes = int(sub["conv2d_list.0.weight"].shape[0])
        head_classes = int(own["conv2d_list.0.weight"].shape[0])
        if file_classes != head_classes:
            notes.append(f"{path}: skipped classifier {name!r} {where}: it has {file_classes} classes, the head "
                         f"{head_classes}")
            continue
        shapes = shape_mismatches(sub, own, prefix=f"{name}.")
        if shapes:
            raise CheckpointError(f"DeepLabV2 checkpoint {path!r}: shape mismatches in classifier {name!r}: "
                                  f"{listing(shapes)}")
        module.load_state_dict(sub, strict=True)
        notes.append(f"{path}: loaded classifier {name!r} {where} into head.{attr}")
    return notes
