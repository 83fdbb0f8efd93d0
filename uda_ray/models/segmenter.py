"""The segmentation network: a timm backbone (``features_only``) + the multi-level fusion decoder (+ projection head).

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

import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import timm
import torch
from torch import nn

from uda_ray.models.decoder import FusionDecoder, ProjectionHead

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_NUM_LEVELS = 4
NO_DECAY_NAME_PARTS = ("pos_embed", "pos_block")


class SegOutput(NamedTuple):
    """What one forward pass returns.

    logits:   (B, K, h, w) at the finest used backbone level's resolution (stride 4 for CNNs/PVT).
    fused:    (B, E, h, w) the decoder's fused multi-level map before dropout (CLUDA's contrast space).
    features: the used backbone levels, finest first, each (B, C_l, h_l, w_l).
    proj:     (B, P, h_L, w_L) projection of the deepest level (CFContra), or None when proj_dim = 0.
    """

    logits: torch.Tensor
    fused: torch.Tensor
    features: list[torch.Tensor]
    proj: torch.Tensor | None


class Segmenter(nn.Module):
    """timm backbone with ``features_only=True`` → FusionDecoder (→ ProjectionHead on the deepest level)."""

    def __init__(self, backbone: str, num_classes: int = 19, *, pretrained: bool = False, pretrained_path: str = "",
                 out_indices: tuple[int, ...] = (), embed_dim: int = 256, dropout: float = 0.1, proj_dim: int = 0,
                 decoder_norm: str = "batch"):
        super().__init__()
        if pretrained and pretrained_path:
            raise ValueError(f"Segmenter({backbone!r}): pretrained=True and pretrained_path={pretrained_path!r} are "
                             "both set: choose timm's weights or the local file, not both")
        if proj_dim < 0:
            raise ValueError(f"Segmenter({backbone!r}): proj_dim = {proj_dim}: expected >= 0 (0 = no projection head)")
        self.backbone_name = backbone
        self.backbone = timm.create_model(backbone, pretrained=pretrained, features_only=True,
                                          out_indices=tuple(out_indices) if out_indices else DEFAULT_NUM_LEVELS)
        info = self.backbone.feature_info
        self.feature_channels: list[int] = list(info.channels())
        self.feature_reductions: list[int] = list(info.reduction())
        if self.feature_reductions != sorted(self.feature_reductions):
            raise ValueError(f"Segmenter({backbone!r}): out_indices = {tuple(out_indices)} give levels with strides "
                             f"{self.feature_reductions}: expected the levels finest first (non-decreasing stride)")
        if pretrained_path:
            load_backbone_checkpoint(self.backbone, backbone, pretrained_path)
        self.decoder = FusionDecoder(self.feature_channels, num_classes, embed_dim=embed_dim, dropout=dropout,
                                     norm=decoder_norm)
        self.proj = ProjectionHead(self.feature_channels[-1], proj_dim, norm=decoder_norm) if proj_dim > 0 else None
        self.num_classes = num_classes
        # Constants, not state: kept out of the state dict so checkpoints hold only learned weights and BN statistics.
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(x − mean) / std with ImageNet statistics; x is (B, 3, H, W) in [0, 1]."""
        return (x - self.pixel_mean) / self.pixel_std

    def forward(self, x: torch.Tensor) -> SegOutput:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"Segmenter.forward: input of shape {tuple(x.shape)}: expected (B, 3, H, W) in [0, 1]")
        features = list(self.backbone(self.normalize(x)))  # L × (B, C_l, h_l, w_l)
        logits, fused = self.decoder(features)
        proj = self.proj(features[-1]) if self.proj is not None else None
        return SegOutput(logits=logits, fused=fused, features=features, proj=proj)

    # ------------------------------------------------------------------------------------------------ parameters
    def head_modules(self) -> list[nn.Module]:
        return [self.decoder] + ([self.proj] if self.proj is not None else [])

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        return self.backbone.parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        for module in self.head_modules():
            yield from module.parameters()

    def param_groups(self, lr: float, head_lr_mult: float, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW/SGD parameter groups over every trainable parameter, each exactly once.

        Groups ``backbone``, ``backbone_no_decay``, ``head``, ``head_no_decay`` (empty ones are left out), each with
        ``lr`` (× head_lr_mult for the head), ``weight_decay`` (0 for norm layers and position embeddings), and the
        extra keys ``name`` and ``lr_mult`` that a schedule can use.
        """
        no_decay = _no_decay_parameter_ids(self)
        groups: list[dict[str, Any]] = []
        parts = [("backbone", [self.backbone], 1.0), ("head", self.head_modules(), head_lr_mult)]
        for name, modules, mult in parts:
            params = [p for m in modules for p in m.parameters() if p.requires_grad]
            decay = [p for p in params if id(p) not in no_decay]
            plain = [p for p in params if id(p) in no_decay]
            for suffix, ps, wd in (("", decay, weight_decay), ("_no_decay", plain, 0.0)):
                if ps:
                    groups.append({"name": name + suffix, "params": ps, "lr": lr * mult, "lr_mult": mult,
                                   "weight_decay": wd})
        return groups


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
def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A flat ``{key: tensor}`` from ``path`` (also accepted: that mapping under a lone 'state_dict' or 'model' key)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"pretrained_path {path!r}: no such file")
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise ValueError(f"pretrained_path {path!r}: cannot be read as a state dict with torch.load(weights_only=True)"
                         f": {e}") from e
    if isinstance(obj, dict) and len(obj) == 1 and next(iter(obj)) in ("state_dict", "model"):
        obj = next(iter(obj.values()))
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise ValueError(f"pretrained_path {path!r}: expected a mapping of parameter names to tensors "
                         f"(optionally under a single 'state_dict' or 'model' key), got {type(obj).__name__}")
    return obj


def _full_to_backbone_keys(backbone: nn.Module, name: str) -> dict[str, str | None]:
    """Map every key of timm's full classification model ``name`` to the features_only backbone's key, or None.

    timm's feature wrappers rename flattened Sequential children (``stages.0`` → ``stages_0``), may prefix
    ``model.``, and drop the modules after the last used level (classifier, final norm). The full model is built on
    the meta device (no memory, no init cost) only to learn its key set.
    """
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


def _listing(keys: list[str], limit: int = 10) -> str:
    """The first ``limit`` items joined by commas, with a count of the rest."""
    shown = ", ".join(keys[:limit])
    return shown + (f", … ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_backbone_checkpoint(backbone: nn.Module, name: str, path: str) -> None:
    """Load a local state dict into a features_only timm backbone, strictly.

    Accepted key sets: the features_only backbone's own state dict (``segmenter.backbone.state_dict()``), or a full
    timm classification checkpoint of the same architecture, whose keys for modules the features_only model lacks
    (classifier, final norm) are dropped. Keys of neither model, backbone keys the file lacks, a key given twice
    (in both spellings) and shape mismatches raise an error naming the file and the keys.
    """
    state = _read_state_dict(path)
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
                        f"{_listing([repr(k) for k in unknown])}")
    if missing:
        problems.append(f"missing backbone keys: {_listing([repr(k) for k in missing])}")
    if twice:
        problems.append(f"keys given twice (features_only and full-model spelling): "
                        f"{_listing([repr(k) for k in twice])}")
    shapes = [f"{k!r} {tuple(v.shape)} vs expected {tuple(own[k].shape)}" for k, v in loaded.items()
              if v.shape != own[k].shape]
    if shapes:
        problems.append(f"shape mismatches: {_listing(shapes)}")
    if problems:
        raise ValueError(f"pretrained_path {path!r} does not fit backbone {name!r}: " + "; ".join(problems))
    backbone.load_state_dict(loaded, strict=True)
