"""The segmentation network: a backbone (timm ``features_only``, SegFormer's MiT or DeepLabV2's ResNet-101) + a decode
head (the multi-level fusion decoder, DAFormer's head or DeepLabV2's ASPP classifier) (+ projection head).

Student and teacher are two instances of this one builder (METHODS.md §1). The input is an RGB batch in [0, 1], not
normalised, because ClassMix and the photometric augmentation work in that space; ImageNet mean/std normalisation
happens inside ``forward``.

Parameter groups for AdamW (DAFormer's recipe, METHODS.md §1): the head (decoder + projection head) gets
lr × head_lr_mult. Weight decay is switched off for every parameter of a normalisation layer (any torch/timm module
whose class name contains "Norm": BatchNorm, LayerNorm, GroupNorm, RmsNorm, …) and for position embeddings (parameter
names containing ``pos_embed`` or ``pos_block``). DAFormer matches the substrings "norm" and "pos_block" in parameter
names, which misses its own decode head's BatchNorm ("bn"); matching by module type applies one rule to every backbone.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from uda_ray.losses import cross_entropy
from uda_ray.models.backbones.deeplabv2 import (
    CAFFE_MEAN_BGR,
    DeepLabV2ResNet,
    caffe_normalize,
    load_deeplabv2_checkpoint,
)
from uda_ray.models.backbones.mit import MIT_VARIANTS, build_mit, load_segformer_checkpoint
from uda_ray.models.backbones.torchvision_resnet import TorchvisionResNet, load_torchvision_resnet_checkpoint
from uda_ray.models.decoder import FusionDecoder, ProjectionHead
from uda_ray.models.errors import CheckpointError, listing, read_state_dict, shape_mismatches
from uda_ray.models.heads.daformer import DAFormerHead
from uda_ray.models.heads.deeplabv2 import DeepLabV2Head

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_NUM_LEVELS = 4
NO_DECAY_NAME_PARTS = ("pos_embed", "pos_block")


class SegOutput(NamedTuple):
    """What one forward pass returns.

    logits:   (B, K, h, w) at the head's output resolution (the finest used level for the fusion heads: stride 4
              for CNNs, PVT and MiT; layer4's stride 8 for DeepLabV2).
    fused:    (B, E, h, w) the head's feature map before its classifier (CLUDA's contrast space): the fused
              multi-level map before dropout for ``mlp`` and ``daformer``, layer4 itself for ``deeplabv2``.
    features: the used backbone levels, finest first, each (B, C_l, h_l, w_l).
    proj:     (B, P, h_L, w_L) projection of the deepest level (CFContra), or None when proj_dim = 0.
    aux:      (B, K, h, w) the multi-level auxiliary prediction (DeepLabV2 on layer3) in training mode, or None.
    detail:   HRDA's detail pass and scale attention (``uda_ray.models.hrda.DetailOutput``), or None.

    Under HRDA (``uda_ray.models.hrda``) ``logits`` are the fused multi-resolution logits and ``fused``, ``features``
    and ``proj`` belong to the context pass (the whole input at the context scale).
    """

    logits: torch.Tensor
    fused: torch.Tensor
    features: list[torch.Tensor]
    proj: torch.Tensor | None
    aux: torch.Tensor | None = None
    detail: Any = None


DECODERS = ("mlp", "daformer", "deeplabv2")
INPUT_NORMS = ("imagenet", "caffe")
MIT_PREFIX = "mit_"
# torchvision's dilated ResNet-101 (SDCA's network): FrozenBatchNorm2d (its source-only and SDCA stages) or
# trainable BatchNorm (its self-training stage); name → frozen
TORCHVISION_DEEPLABV2 = {"deeplabv2_tv_r101": True, "deeplabv2_tv_r101_bn": False}
DEEPLABV2_BACKBONES = ("deeplabv2_r101", *TORCHVISION_DEEPLABV2)


def backbone_family(name: str) -> str:
    """``'mit'`` (SegFormer's Mix Transformer), ``'deeplabv2'`` (a ResNet-101 with output stride 8: DeepLab's
    caffe-style one or SDCA's torchvision one) or ``'timm'``; an unknown name raises a ValueError that says which
    names exist."""
    if name in MIT_VARIANTS:
        return "mit"
    if name in DEEPLABV2_BACKBONES:
        return "deeplabv2"
    import timm  # here: a trial process that builds a MiT or DeepLabV2 backbone never imports timm (0.7 s)

    if timm.is_model(name):
        return "timm"
    raise ValueError(f"model.backbone = {name!r}: not a backbone: expected one of {', '.join(MIT_VARIANTS)}, "
                     f"{', '.join(DEEPLABV2_BACKBONES)} or a timm model name (timm.list_models())")


def check_model_names(backbone: str, decoder: str, input_norm: str = "imagenet", pretrained: bool = False, *,
                      aux_weight: float = 0.0, fuse_channels: int = 0) -> None:
    """The checks of ``Segmenter``'s names and head options that need no weights: run when a config is loaded, before
    any training, and when the model is built."""
    family = backbone_family(backbone)
    if decoder not in DECODERS:
        raise ValueError(f"model.decoder = {decoder!r}: expected one of {', '.join(DECODERS)}")
    if input_norm not in INPUT_NORMS:
        raise ValueError(f"model.input_norm = {input_norm!r}: expected one of {', '.join(INPUT_NORMS)}")
    if decoder == "deeplabv2" and family != "deeplabv2":
        raise ValueError(f"model.decoder = 'deeplabv2' needs a backbone whose layer4 has output stride 8 "
                         f"({', '.join(DEEPLABV2_BACKBONES)}); model.backbone = {backbone!r} is not one")
    if input_norm == "caffe" and backbone in TORCHVISION_DEEPLABV2:
        raise ValueError(f"model.input_norm = 'caffe' with model.backbone = {backbone!r}: torchvision's ImageNet "
                         "weights (SDCA's network) expect ImageNet-normalised RGB input (input_norm: imagenet)")
    if input_norm == "caffe" and pretrained:
        raise ValueError(f"model.input_norm = 'caffe' with model.pretrained = true: timm's ImageNet weights for "
                         f"{backbone!r} expect ImageNet-normalised RGB input (input_norm: imagenet)")
    if fuse_channels and decoder != "daformer":
        raise ValueError(f"key 'model.fuse_channels' = {fuse_channels} applies to model.decoder = 'daformer' only, "
                         f"not {decoder!r}")
    if aux_weight < 0:
        raise ValueError(f"key 'model.aux_weight' = {aux_weight}: expected >= 0")
    if aux_weight > 0 and decoder != "deeplabv2":
        raise ValueError(f"key 'model.aux_weight' = {aux_weight}: the auxiliary classifier exists only for "
                         f"model.decoder = 'deeplabv2', not {decoder!r}")


class Segmenter(nn.Module):
    """Backbone (timm ``features_only``, MiT or DeepLabV2's ResNet) → decode head (→ ProjectionHead on the deepest
    level).

    ``decoder``: ``mlp`` (the multi-level fusion decoder, SegFormer-style), ``daformer`` (DAFormer's head with the
    separable ASPP fusion) or ``deeplabv2`` (the ASPP classifier on layer4, with ``aux`` also on layer3).
    ``input_norm``: ``imagenet`` (RGB, mean/std) or ``caffe`` (BGR ×255 minus the mean, what the DeepLab
    checkpoints expect). ``drop_path_rate`` is MiT's stochastic depth (SegFormer's 0.1); other backbones ignore it.
    """

    def __init__(self, backbone: str, num_classes: int = 19, *, pretrained: bool = False, pretrained_path: str = "",
                 out_indices: tuple[int, ...] = (), embed_dim: int = 256, dropout: float = 0.1, proj_dim: int = 0,
                 decoder_norm: str = "batch", decoder: str = "mlp", input_norm: str = "imagenet",
                 drop_path_rate: float = 0.1, aux_weight: float = 0.0, fuse_channels: int = 0,
                 align_corners: bool = False):
        super().__init__()
        self.align_corners = align_corners  # logits → label/image size: bilinear with align_corners (DeepLab code)
        if pretrained and pretrained_path:
            raise ValueError(f"Segmenter({backbone!r}): pretrained=True and pretrained_path={pretrained_path!r} are "
                             "both set: choose timm's weights or the local file, not both")
        if proj_dim < 0:
            raise ValueError(f"Segmenter({backbone!r}): proj_dim = {proj_dim}: expected >= 0 (0 = no projection head)")
        check_model_names(backbone, decoder, input_norm, pretrained, aux_weight=aux_weight, fuse_channels=fuse_channels)
        family = backbone_family(backbone)
        if pretrained and family != "timm":
            raise ValueError(f"model.pretrained = true: {backbone!r} has no timm weights: set model.pretrained_path "
                             "to its checkpoint file")
        self.backbone_name, self.decoder_name, self.input_norm = backbone, decoder, input_norm
        if family == "mit":
            self.backbone: nn.Module = build_mit(backbone, drop_path_rate=drop_path_rate,
                                                 out_indices=tuple(out_indices))
            self.feature_channels = list(self.backbone.feature_channels)
            self.feature_reductions = list(self.backbone.feature_reductions)
        elif family == "deeplabv2":
            if out_indices:
                raise ValueError(f"model.out_indices = {list(out_indices)}: {backbone!r} always gives its four "
                                 "layers; leave out_indices empty")
            self.backbone = (TorchvisionResNet(frozen_bn=TORCHVISION_DEEPLABV2[backbone])
                             if backbone in TORCHVISION_DEEPLABV2 else DeepLabV2ResNet())
            self.feature_channels = list(self.backbone.feature_channels)
            self.feature_reductions = list(self.backbone.feature_reductions)
        else:
            import timm

            self.backbone = timm.create_model(backbone, pretrained=pretrained, features_only=True,
                                              out_indices=tuple(out_indices) if out_indices else DEFAULT_NUM_LEVELS)
            info = self.backbone.feature_info
            self.feature_channels = list(info.channels())
            self.feature_reductions = list(info.reduction())
        if self.feature_reductions != sorted(self.feature_reductions):
            raise ValueError(f"Segmenter({backbone!r}): out_indices = {tuple(out_indices)} give levels with strides "
                             f"{self.feature_reductions}: expected the levels finest first (non-decreasing stride)")
        if decoder == "daformer":
            self.decoder: nn.Module = DAFormerHead(self.feature_channels, num_classes, embed_dim=embed_dim,
                                                   channels=fuse_channels or embed_dim,
                                                   dropout=dropout, fusion="aspp", norm=decoder_norm)
        elif decoder == "deeplabv2":
            self.decoder = DeepLabV2Head(self.feature_channels, num_classes, aux=aux_weight > 0)
        else:
            self.decoder = FusionDecoder(self.feature_channels, num_classes, embed_dim=embed_dim, dropout=dropout,
                                         norm=decoder_norm)
        if pretrained_path:
            if family == "mit":
                load_segformer_checkpoint(self.backbone, pretrained_path)
            elif family == "deeplabv2":
                notes = (load_torchvision_resnet_checkpoint(self.backbone, pretrained_path)
                         if backbone in TORCHVISION_DEEPLABV2
                         else load_deeplabv2_checkpoint(self.backbone, self.decoder, pretrained_path))
                for note in notes:
                    log.info("%s", note)
            else:
                load_backbone_checkpoint(self.backbone, backbone, pretrained_path)
        self.proj = ProjectionHead(self.feature_channels[-1], proj_dim, norm=decoder_norm) if proj_dim > 0 else None
        self.num_classes = num_classes
        self.aux_weight = aux_weight
        # draws of a training forward pass (HRDA's detail box); the loop hands over the run's generator, so a seed
        # and a checkpoint fix them. A plain Segmenter draws nothing.
        self.generator: torch.Generator | None = None
        # Constants, not state: kept out of the state dict so checkpoints hold only learned weights and BN statistics.
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's input from x (B, 3, H, W) RGB in [0, 1]: (x − mean) / std with ImageNet statistics, or
        DeepLab's caffe convention (``caffe_normalize``)."""
        if self.input_norm == "caffe":
            return caffe_normalize(x)
        return (x - self.pixel_mean) / self.pixel_std

    def context_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input whose backbone features are ``SegOutput.features``: x itself (HRDA: x at the context scale)."""
        return x

    def mean_colour(self) -> torch.Tensor:
        """(1, 3, 1, 1) the RGB colour in [0, 1] that ``normalize`` maps to 0: a pixel masked to it is a 0 of the
        normalised image (MIC's masking)."""
        if self.input_norm == "caffe":
            return (torch.tensor(CAFFE_MEAN_BGR, device=self.pixel_mean.device).flip(0) / 255.0).view(1, 3, 1, 1)
        return self.pixel_mean

    def seg_loss(self, out: SegOutput, labels: torch.Tensor, weights: torch.Tensor | None = None
                 ) -> dict[str, torch.Tensor]:
        """The supervised loss of a training pass against (B, H, W) labels with optional (B, H, W) pixel weights,
        as named parts: ``""`` = CE of the logits upsampled to the labels, ``"_aux"`` = ``aux_weight`` × CE of the
        auxiliary prediction (DeepLabV2's multi-level loss) when there is one. HRDA overrides this."""
        size, corners = labels.shape[-2:], self.align_corners
        parts = {"": cross_entropy(upsample(out.logits.float(), size, corners), labels, weights)}
        if self.aux_weight > 0 and out.aux is not None:
            parts["_aux"] = self.aux_weight * cross_entropy(upsample(out.aux.float(), size, corners), labels, weights)
        return parts

    def forward(self, x: torch.Tensor, detail: str = "random") -> SegOutput:
        """x (B, 3, H, W) RGB in [0, 1] → ``SegOutput``. ``detail`` is HRDA's choice of detail window for a
        training pass (``uda_ray.models.hrda``); a plain Segmenter has no detail pass and ignores it."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"Segmenter.forward: input of shape {tuple(x.shape)}: expected (B, 3, H, W) in [0, 1]")
        features = list(self.backbone(self.normalize(x)))  # L × (B, C_l, h_l, w_l)
        logits, fused = self.decoder(features)
        proj = self.proj(features[-1]) if self.proj is not None else None
        aux = None
        if self.training and getattr(self.decoder, "aux_classifier", None) is not None:
            aux = self.decoder.aux_logits(features)
        return SegOutput(logits=logits, fused=fused, features=features, proj=proj, aux=aux)

    # ------------------------------------------------------------------------------------------------ parameters
    def head_modules(self) -> list[nn.Module]:
        return [self.decoder] + ([self.proj] if self.proj is not None else [])

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        return self.backbone.parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        for module in self.head_modules():
            yield from module.parameters()

    def param_parts(self, head_lr_mult: float) -> list[tuple[str, list[nn.Module], float]]:
        """(group name, modules, lr multiplier) of every part with its own learning rate."""
        return [("backbone", [self.backbone], 1.0), ("head", self.head_modules(), head_lr_mult)]

    def param_groups(self, lr: float, head_lr_mult: float, weight_decay: float, *,
                     norm_decay: bool = False) -> list[dict[str, Any]]:
        """AdamW/SGD parameter groups over every trainable parameter, each exactly once.

        Groups ``backbone``, ``backbone_no_decay``, ``head``, ``head_no_decay`` (empty ones are left out), each with
        ``lr`` (× head_lr_mult for the head), ``weight_decay`` (0 for norm layers and position embeddings, unless
        ``norm_decay``: every parameter decays, as the DeepLab-family code's SGD over all parameters), and the extra
        keys ``name`` and ``lr_mult`` that a schedule can use.
        """
        no_decay = set() if norm_decay else _no_decay_parameter_ids(self)
        groups: list[dict[str, Any]] = []
        for name, modules, mult in self.param_parts(head_lr_mult):
            params = [p for m in modules for p in m.parameters() if p.requires_grad]
            decay = [p for p in params if id(p) not in no_decay]
            plain = [p for p in params if id(p) in no_decay]
            for suffix, ps, wd in (("", decay, weight_decay), ("_no_decay", plain, 0.0)):
                if ps:
                    groups.append({"name": name + suffix, "params": ps, "lr": lr * mult, "lr_mult": mult,
                                   "weight_decay": wd})
        return groups


def upsample(x: torch.Tensor, size: tuple[int, int] | torch.Size, align_corners: bool = False) -> torch.Tensor:
    """Bilinear resize of a (B, C, h, w) map to ``size`` (align_corners False unless asked); the map itself when it
    matches."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners)


def _no_decay_parameter_ids(model: nn.Module) -> set[int]:
    """ids of parameters that get no weight decay: those of normalisation layers and position embeddings."""
    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)) \
                or "Norm" in type(module).__name__:
            ids.update(id(p) for p in module.parameters(recurse=False))
    for name, p in model.named_parameters():
        if any(part in name for part in NO_DECAY_NAME_PARTS):
            ids.add(id(p))
    return ids


def build_segmenter(backbone: str, num_classes: int, **kwargs: Any) -> Segmenter:
    """The one builder for student and teacher: ``Segmenter(backbone, num_classes, **kwargs)``."""
    return Segmenter(backbone, num_classes, **kwargs)


# ------------------------------------------------------------------------------------------------- checkpoints
def _full_to_backbone_keys(backbone: nn.Module, name: str) -> dict[str, str | None]:
    """Map every key of timm's full classification model ``name`` to the features_only backbone's key, or None.

    timm's feature wrappers rename flattened Sequential children (``stages.0`` → ``stages_0``), may prefix
    ``model.``, and drop the modules after the last used level (classifier, final norm). The full model is built on
    the meta device (no memory, no init cost) only to learn its key set.
    """
    import timm

    with torch.device("meta"):
        full = timm.create_model(name, pretrained=False)
    by_norm: dict[str, str] = {}
    for key in full.state_dict():
        norm = key.replace("_", ".")
        if norm in by_norm:
            raise ValueError(f"backbone {name!r}: keys {by_norm[norm]!r} and {key!r} cannot be told apart when "
                             "matching a full checkpoint to the features_only model")
        by_norm[norm] = key
    mapping: dict[str, str | None] = dict.fromkeys(by_norm.values())
    for key in backbone.state_dict():
        norm = key.replace("_", ".")
        if norm not in by_norm and norm.startswith("model."):
            norm = norm[len("model."):]
        if norm not in by_norm:
            raise ValueError(f"backbone {name!r}: features_only key {key!r} has no counterpart in the full model")
        mapping[by_norm[norm]] = key
    return mapping


def load_backbone_checkpoint(backbone: nn.Module, name: str, path: str) -> None:
    """Load a local state dict into a features_only timm backbone, strictly.

    Accepted key sets: the features_only backbone's own state dict (``segmenter.backbone.state_dict()``), or a full
    timm classification checkpoint of the same architecture, whose keys for modules the features_only model lacks
    (classifier, final norm) are dropped. Keys of neither model, backbone keys the file lacks, a key given twice
    (in both spellings) and shape mismatches raise an error naming the file and the keys.
    """
    state = read_state_dict(path, "pretrained_path")
    own = backbone.state_dict()
    full_map: dict[str, str | None] | None = None
    loaded: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    twice: list[str] = []
    for key, tensor in state.items():
        target: str | None = key
        if key not in own:
            if full_map is None:
                full_map = _full_to_backbone_keys(backbone, name)
            if key not in full_map:
                unknown.append(key)
                continue
            target = full_map[key]
            if target is None:  # a module of the full model that the features_only model does not use
                continue
        if target in loaded:
            twice.append(key)
        loaded[target] = tensor
    missing = [k for k in own if k not in loaded]
    problems = []
    if unknown:
        problems.append(f"unknown keys (in neither the features_only nor the full {name!r} model): "
                        f"{listing([repr(k) for k in unknown])}")
    if missing:
        problems.append(f"missing backbone keys: {listing([repr(k) for k in missing])}")
    if twice:
        problems.append(f"keys given twice (features_only and full-model spelling): "
                        f"{listing([repr(k) for k in twice])}")
    shapes = shape_mismatches(loaded, own)
    if shapes:
        problems.append(f"shape mismatches: {listing(shapes)}")
    if problems:
        raise CheckpointError(f"pretrained_path {path!r} does not fit backbone {name!r}: " + "; ".join(problems))
    backbone.load_state_dict(loaded, strict=True)
