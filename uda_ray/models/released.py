"""Released trained models, loaded unchanged into the network a recipe config builds (issue 21).

``load_released(model, path, weights=...)`` is the one entry point for every trained-model file a user brings, and
for the files uda-ray writes itself (``model.init_from`` starts a run from either):

- mmseg checkpoints of DAFormer, HRDA, MIC and CLUDA: ``{"state_dict": …, "meta": …}`` of the UDA wrapper, whose
  ``model.*`` is the student (what their ``tools/test.py`` evaluates: it strips ``model.`` and drops the rest),
  ``ema_model.*`` the EMA teacher and ``imnet_model.*`` FD's frozen ImageNet copy; ``weights`` picks ``model`` or
  ``ema_model``. Also a plain mmseg ``EncoderDecoder`` / ``HRDAEncoderDecoder`` state dict (``backbone.*``,
  ``decode_head.*``), bare or under ``state_dict``.
- ADVENT-family DeepLabV2 state dicts (``load_deeplabv2_checkpoint``: backbone, and the classifiers that fit), bare
  or under ``state_dict`` (PixMatch/EHTDI's training files), keys with or without DataParallel's ``module.``.
- SDCA's ``{"feature_extractor": …, "classifier": …}`` (keys with DataParallel's ``module.``): its torchvision
  ResNet-101 (``backbone.<torchvision name>`` → ``backbone.<same>``, ``model.backbone: deeplabv2_tv_r101`` for the
  FrozenBatchNorm2d of its source-only and SDCA stages, ``deeplabv2_tv_r101_bn`` for its self-training stage, whose
  BatchNorm2d counters tell the two apart) and ``ASPP_Classifier_V2`` (``conv2d_list.<i>`` →
  ``decoder.classifier.conv2d_list.<i>``).
- uda-ray's training checkpoints (``checkpoint.pt`` or the folder holding it, ``uda_ray.train.checkpoint``):
  ``student`` for ``weights="model"``, ``teacher`` for ``"ema_model"``.

Every file is read with ``torch.load(weights_only=True)`` (numpy scalars in mmcv's ``meta`` allowed), from a local
path or a ``pyarrow.fs`` URI (a chain's checkpoint cached on ``s3://``).

mmseg → uda-ray keys (mmcv's ``ConvModule`` holds ``conv`` and ``bn``; H is ``decode_head`` for DAFormer and
``decode_head.head`` for HRDA, whose ``decode_head.scale_attention`` and CLUDA's ``decode_head.feat_weighter`` are
DAFormer heads with a 1×1 fusion):

    backbone.<k>                                     backbone.<k>          (SegFormer's MiT names, unchanged)
    H.embed_layers.<l>.proj.weight (E, C), .bias     decoder.embed.<l>.weight (E, C, 1, 1), .bias  (Linear = 1×1 conv)
    H.fuse_layer.aspp_modules.<j>.conv | .bn         decoder.fuse.branches.<j>.0 | .1             (dilation 1)
    H.fuse_layer.aspp_modules.<j>.depthwise_conv.conv | .bn, .pointwise_conv.conv | .bn
                                                     decoder.fuse.branches.<j>.0.0 | .0.1, .1.0 | .1.1
    H.fuse_layer.bottleneck.conv | .bn               decoder.fuse.bottleneck.0 | .1
    H.fuse_layer.conv | .bn                          decoder.fuse.0 | .1   (the 1×1 fusion: ``mlp`` decoder, attention)
    H.conv_seg                                       decoder.classifier
    decode_head.scale_attention.<as H>               scale_attention.<as decoder>
    decode_head.feat_weighter.<as H>                 feature_weighter.<as decoder>

Every mismatch (a missing, unexpected or mis-shaped key; a file of another network than the config builds) is a
``CheckpointError`` that names the keys and says which recipe the file looks like, raised before any weight is
copied. Skipped with a note: the other network of a UDA file, FD's ``imnet_model.*``, MIC's ``mic.*`` (its masking
module's own teacher), mmseg's ``auxiliary_head.*``, and the parts of ``ADDED_PARTS`` when the config does not build
them. Parts of ``ADDED_PARTS`` that the config builds and the file lacks keep their initialisation, with a note:
a later stage adds them to the same network (CFContra's projection head, CLUDA's feature weighter); neither changes
the predictions.
"""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow.fs as pafs
import torch
from torch import Tensor, nn

from uda_ray.models.backbones.deeplabv2 import DeepLabV2ResNet, load_deeplabv2_checkpoint
from uda_ray.models.backbones.mit import MIT_VARIANTS, MixTransformer
from uda_ray.models.backbones.torchvision_resnet import TorchvisionResNet
from uda_ray.models.ema import unwrap
from uda_ray.models.errors import CheckpointError, listing
from uda_ray.models.hrda import HRDASegmenter

WEIGHTS = ("model", "ema_model")
TRAINING_CHECKPOINT = "checkpoint.pt"  # uda_ray.train.checkpoint.FILENAME (models/ does not import train/)
RECIPES = "search_spaces/base/"
# parts a later stage adds to a released network, or that a stage may leave out; none changes the logits
ADDED_PARTS = {"proj.": "CFContra's projection head", "feature_weighter.": "CLUDA's feature weighter"}
# top-level parts of a UDA wrapper other than the chosen network
UDA_SKIPPED = {
    "model": "the student (weights='model' loads it)",
    "ema_model": "the EMA teacher (weights='ema_model' loads it)",
    "imnet_model": "FD's frozen ImageNet copy of the backbone (uda-ray copies the backbone it builds)",
    "mic": "MIC's masking module (its own EMA teacher, used in training only)",
}
AUX_HEAD = "auxiliary_head."
DECODE = "decode_head."
SCALE_ATTENTION, FEAT_WEIGHTER, HRDA_HEAD = DECODE + "scale_attention.", DECODE + "feat_weighter.", DECODE + "head."

_HEAD_RULES = [(re.compile(p), t) for p, t in (
    (r"embed_layers\.(\d+)\.proj\.(weight|bias)", r"embed.\1.\2"),
    (r"fuse_layer\.aspp_modules\.(\d+)\.conv\.(.+)", r"fuse.branches.\1.0.\2"),
    (r"fuse_layer\.aspp_modules\.(\d+)\.bn\.(.+)", r"fuse.branches.\1.1.\2"),
    (r"fuse_layer\.aspp_modules\.(\d+)\.depthwise_conv\.conv\.(.+)", r"fuse.branches.\1.0.0.\2"),
    (r"fuse_layer\.aspp_modules\.(\d+)\.depthwise_conv\.bn\.(.+)", r"fuse.branches.\1.0.1.\2"),
    (r"fuse_layer\.aspp_modules\.(\d+)\.pointwise_conv\.conv\.(.+)", r"fuse.branches.\1.1.0.\2"),
    (r"fuse_layer\.aspp_modules\.(\d+)\.pointwise_conv\.bn\.(.+)", r"fuse.branches.\1.1.1.\2"),
    (r"fuse_layer\.bottleneck\.conv\.(.+)", r"fuse.bottleneck.0.\1"),
    (r"fuse_layer\.bottleneck\.bn\.(.+)", r"fuse.bottleneck.1.\1"),
    (r"fuse_layer\.conv\.(.+)", r"fuse.0.\1"),
    (r"fuse_layer\.bn\.(.+)", r"fuse.1.\1"),
    (r"conv_seg\.(weight|bias)", r"classifier.\1"),
)]


def load_released(model: nn.Module, path: str | Path, *, weights: str = "model") -> list[str]:
    """Load the trained model in ``path`` into ``model`` (a ``Segmenter`` or ``HRDASegmenter`` built from the
    matching recipe config, pretrained weights not needed) and return notes: what the file is, what was loaded, what
    was skipped and why. ``weights``: ``model`` (the student) or ``ema_model`` (the EMA teacher) of a file that holds
    both. Raises ``CheckpointError`` (naming the keys and the recipe the file looks like) before any weight is
    copied, and FileNotFoundError for a missing file."""
    if weights not in WEIGHTS:
        raise ValueError(f"load_released: weights = {weights!r}: expected one of {', '.join(WEIGHTS)}")
    model = unwrap(model)
    file, obj = read_released(path)
    if isinstance(obj, dict) and "student" in obj and "config" in obj:
        return _load_udaray(model, obj, file, weights)
    if isinstance(obj, dict) and {"feature_extractor", "classifier"} <= set(obj):
        return _load_sdca(model, obj, file, weights)
    state = _without_module(_tensors(obj, file))
    if "conv1.weight" in state or "Scale.conv1.weight" in state:
        return _load_deeplabv2(model, state, file, weights)
    if any(k.split(".", 1)[0] in ("backbone", "decode_head", *UDA_SKIPPED) for k in state):
        return _load_mmseg(model, state, file, weights)
    raise CheckpointError(f"{file}: not a released model uda-ray knows (an mmseg checkpoint of DAFormer, HRDA, MIC or "
                          "CLUDA, an ADVENT-family DeepLabV2 state dict, SDCA's {feature_extractor, classifier}, or a "
                          f"uda-ray checkpoint.pt); first keys: {listing([repr(k) for k in state], limit=5)}")


def read_released(path: str | Path) -> tuple[str, Any]:
    """(the file's name, its contents) of ``path``: a file, or a uda-ray checkpoint folder's ``checkpoint.pt``; a
    local path or a ``pyarrow.fs`` URI (``s3://``, ``gs://``, ``file://``: a chain's cached checkpoint stage)."""
    text = str(path)
    missing = (f"{text}: no such file (a released model file, or a uda-ray checkpoint folder holding "
               f"{TRAINING_CHECKPOINT})")
    if "://" in text:
        fs, where = pafs.FileSystem.from_uri(text)
        if fs.get_file_info(where).type == pafs.FileType.Directory:
            where, text = f"{where.rstrip('/')}/{TRAINING_CHECKPOINT}", f"{text.rstrip('/')}/{TRAINING_CHECKPOINT}"
        if fs.get_file_info(where).type != pafs.FileType.File:
            raise FileNotFoundError(missing)
        with fs.open_input_file(where) as f:
            return text, _load(io.BytesIO(f.read()), text)
    file = Path(path).expanduser()
    if file.is_dir():
        file = file / TRAINING_CHECKPOINT
    if not file.is_file():
        raise FileNotFoundError(missing)
    return str(file), _load(file, str(file))


# --------------------------------------------------------------------------------------------------- reading
def _numpy_globals() -> list[Any]:
    """What mmcv's ``meta`` may pickle besides tensors (numpy scalars such as EvalHook's best score, small arrays),
    under numpy 2's module names and numpy 1's: allowed in ``torch.load(weights_only=True)``."""
    scalar, rebuild = np._core.multiarray.scalar, np._core.multiarray._reconstruct
    allowed: list[Any] = [np.dtype, np.ndarray]
    allowed += [type(np.dtype(code)) for code in np.typecodes["All"] if code not in "OMm"]
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        allowed += [(scalar, f"{module}.scalar"), (rebuild, f"{module}._reconstruct")]
    return allowed


def _load(source: Path | io.BytesIO, file: str) -> Any:
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(source, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise CheckpointError(f"{file}: cannot be read with torch.load(weights_only=True): {e}") from e


def _without_module(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state`` without the ``module.`` prefix of a file saved from a DataParallel wrapper (every key has it)."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def _tensors(obj: Any, file: str) -> dict[str, Tensor]:
    """The ``{key: tensor}`` mapping of a file: itself, or under ``state_dict`` (mmcv), or under a lone ``model``."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and set(obj) == {"model"}:
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        raise CheckpointError(f"{file}: expected a mapping of parameter names to tensors (bare, under 'state_dict' or "
                              f"under a lone 'model' key), got {type(obj).__name__}"
                              + (f" with keys {listing([repr(k) for k in obj], limit=5)}" if isinstance(obj, dict)
                                 else ""))
    return dict(obj)


# ----------------------------------------------------------------------------------------------------- mmseg
class MmsegNetwork(NamedTuple):
    """What an mmseg segmentor state dict is, read from its keys and shapes."""

    backbone: str  # a MIT_VARIANTS name, or a description of another backbone
    hrda: bool  # decode_head.scale_attention.*
    weighter: bool  # decode_head.feat_weighter.* (CLUDA)
    fusion: str  # "aspp" (DAFormer), "conv1" (1×1 fusion) or "other"
    widths: str  # "head embeds to E, fuses to F, K classes"

    def hint(self) -> str:
        """Which network this is and which shipped recipe builds it."""
        arch = f"{self.backbone}, {self.widths}"
        if self.weighter:
            return (f"a CLUDA checkpoint (keys {FEAT_WEIGHTER}*; {arch}): use {RECIPES}cluda_hrda_gta2cs.yaml")
        if self.hrda:
            return (f"an HRDA checkpoint (keys {SCALE_ATTENTION}*; {arch}): use {RECIPES}hrda_gta2cs.yaml (SYNTHIA: "
                    "hrda_synthia2cs.yaml; MIC's checkpoints are the same network: mic_hrda_gta2cs.yaml, "
                    "mic_hrda_synthia2cs.yaml)")
        if self.fusion == "aspp":
            return (f"a DAFormer checkpoint (keys {DECODE}fuse_layer.aspp_modules.*, no {SCALE_ATTENTION}*; {arch}): "
                    f"use {RECIPES}daformer_gta2cs.yaml (SYNTHIA: daformer_synthia2cs.yaml)")
        if self.fusion == "conv1":
            return (f"a DAFormer checkpoint with the 1×1 fusion head (daformer_conv1_mitb5; keys {DECODE}fuse_layer."
                    f"conv.*; {arch}): use {RECIPES}daformer_gta2cs.yaml with model.decoder=mlp")
        return f"an mmseg checkpoint of a decode head uda-ray does not build ({arch})"


def read_mmseg_network(net: dict[str, Tensor]) -> MmsegNetwork:
    """Backbone variant, HRDA, CLUDA's weighter, the head's fusion and widths of a segmentor state dict."""
    hrda = any(k.startswith(SCALE_ATTENTION) for k in net)
    head = HRDA_HEAD if hrda else DECODE
    if any(k.startswith(head + "fuse_layer.aspp_modules.") for k in net):
        fusion = "aspp"
    elif head + "fuse_layer.conv.weight" in net:
        fusion = "conv1"
    else:
        fusion = "other"
    embed, classes = net.get(head + "embed_layers.0.proj.weight"), net.get(head + "conv_seg.weight")
    widths = (f"head embeds to {embed.shape[0] if embed is not None else '?'}, fuses to "
              f"{classes.shape[1] if classes is not None else '?'}, "
              f"{classes.shape[0] if classes is not None else '?'} classes")
    return MmsegNetwork(_mit_variant(net), hrda, any(k.startswith(FEAT_WEIGHTER) for k in net), fusion, widths)


def _mit_variant(net: dict[str, Tensor]) -> str:
    dims = [net.get(f"backbone.patch_embed{s}.proj.weight") for s in range(1, 5)]
    if any(d is None for d in dims):
        return f"a backbone that is not a MiT (keys {listing([repr(k) for k in net if k.startswith('backbone.')], 3)})"
    depths = tuple(len({k.split(".")[2] for k in net if k.startswith(f"backbone.block{s}.")}) for s in range(1, 5))
    embed_dims = tuple(int(d.shape[0]) for d in dims)
    for name, arch in MIT_VARIANTS.items():
        if arch["embed_dims"] == embed_dims and arch["depths"] == depths:
            return name
    return f"a MiT of embed dims {embed_dims} and depths {depths}"


def _pick_network(state: dict[str, Tensor], file: str, weights: str) -> tuple[dict[str, Tensor], str, list[str]]:
    """The chosen segmentor of a UDA wrapper's state dict (``weights``.*), or a plain segmentor's state dict; its
    prefix in the file; notes."""
    tops = sorted({k.split(".", 1)[0] for k in state})
    if "model" not in tops and "ema_model" not in tops:
        if weights != "model":
            raise CheckpointError(f"{file}: a plain segmentor state dict (no 'model.*' / 'ema_model.*' keys) holds one "
                                  f"network: weights={weights!r} needs the UDA checkpoint with its EMA teacher")
        return state, "", [f"{file}: loaded a plain mmseg segmentor state dict"]
    if weights not in tops:
        raise CheckpointError(f"{file}: a UDA checkpoint without '{weights}.*' keys (it holds "
                              f"{', '.join(t + '.*' for t in tops)}): choose weights from those")
    unknown = [t + ".*" for t in tops if t not in UDA_SKIPPED]
    if unknown:
        raise CheckpointError(f"{file}: unexpected parts of the UDA checkpoint: {listing(unknown)} (known: "
                              f"{', '.join(t + '.*' for t in UDA_SKIPPED)})")
    what = "the student" if weights == "model" else "the EMA teacher"
    notes = [f"{file}: loaded {weights}.* ({what}) of the UDA checkpoint"]
    for top in tops:
        if top != weights:
            n = sum(1 for k in state if k.startswith(top + "."))
            notes.append(f"{file}: skipped {top}.* ({n} keys): {UDA_SKIPPED[top]}")
    prefix = weights + "."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, prefix, notes


def _map_head_key(rest: str, tensor: Tensor) -> tuple[str, Tensor] | None:
    for pattern, template in _HEAD_RULES:
        m = pattern.fullmatch(rest)
        if m:
            if rest.endswith("proj.weight") and tensor.dim() == 2:
                tensor = tensor[:, :, None, None]  # (E, C) → (E, C, 1, 1): the Linear as a 1×1 convolution
            return m.expand(template), tensor
    return None


def _load_mmseg(model: nn.Module, state: dict[str, Tensor], file: str, weights: str) -> list[str]:
    net, top, notes = _pick_network(state, file, weights)
    found = read_mmseg_network(net)
    hint, built = found.hint(), describe_model(model)
    fusion = {"DAFormerHead": getattr(getattr(model, "decoder", None), "fusion", None),
              "FusionDecoder": "conv1"}.get(type(getattr(model, "decoder", None)).__name__)
    if (not isinstance(getattr(model, "backbone", None), MixTransformer) or found.backbone != model.backbone_name
            or found.hrda != isinstance(model, HRDASegmenter) or found.fusion != fusion):
        raise CheckpointError(f"{file}: this is {hint}; the config builds another network ({built})")
    parts = [(SCALE_ATTENTION, "scale_attention."), (FEAT_WEIGHTER, "feature_weighter."),
             (HRDA_HEAD if found.hrda else DECODE, "decoder.")]
    mapped: dict[str, Tensor] = {}
    source: dict[str, tuple[str, tuple[int, ...]]] = {}
    unexpected: list[str] = []
    aux = [k for k in net if k.startswith(AUX_HEAD)]
    for key, tensor in net.items():
        if key.startswith(AUX_HEAD):
            continue
        if key.startswith("backbone."):
            mapped[key], source[key] = tensor, (top + key, tuple(tensor.shape))
            continue
        done = None
        for prefix, target in parts:
            if key.startswith(prefix):
                done = _map_head_key(key[len(prefix):], tensor)
                if done is not None:
                    name = target + done[0]
                    mapped[name], source[name] = done[1], (top + key, tuple(tensor.shape))
                break
        if done is None:
            unexpected.append(top + key)
    if aux:
        notes.append(f"{file}: skipped {AUX_HEAD}* ({len(aux)} keys): mmseg's auxiliary head trains only")
    return notes + _load_checked(model, mapped, source, unexpected, file, hint, built)


# ------------------------------------------------------------------------------- uda-ray, DeepLabV2 and SDCA
def _load_udaray(model: nn.Module, obj: dict[str, Any], file: str, weights: str) -> list[str]:
    which = "student" if weights == "model" else "teacher"
    state = _tensors(obj.get(which), file)
    saved = obj["config"].get("model", {}) if isinstance(obj["config"], dict) else {}
    hrda = ", model.hrda.enabled=true" if saved.get("hrda", {}).get("enabled") else ""
    hint = (f"a uda-ray training checkpoint of model.backbone={saved.get('backbone')}, model.decoder="
            f"{saved.get('decoder')}{hrda}: evaluate it with its own saved config (uda-ray evaluate {file} without "
            "--config) or use a config that builds that model")
    notes = [f"{file}: loaded the {which} of a uda-ray training checkpoint (iteration {obj.get('iteration')})"]
    source = {k: (k, tuple(v.shape)) for k, v in state.items()}
    return notes + _load_checked(model, state, source, [], file, hint, describe_model(model))


def _load_deeplabv2(model: nn.Module, state: dict[str, Tensor], file: str, weights: str) -> list[str]:
    hint = (f"an ADVENT-family DeepLabV2 checkpoint (keys conv1.*, layer1.* … layer4.*, classifiers layer5/layer6): "
            f"use {RECIPES}deeplabv2_gta2cs.yaml or another *deeplabv2*.yaml recipe")
    if "fc.weight" in state:
        hint = ("an ImageNet classification ResNet (key fc.weight), not a trained segmentation model: an ImageNet "
                "initialisation belongs in model.pretrained_path")
    if not isinstance(getattr(model, "backbone", None), DeepLabV2ResNet):
        raise CheckpointError(f"{file}: this is {hint}; the config builds another network ({describe_model(model)})")
    if weights != "model":
        raise CheckpointError(f"{file}: a DeepLabV2 state dict holds one network: weights={weights!r} needs a file "
                              "with an EMA teacher")
    # the DeepLabV2 loader checks its classifiers after copying the backbone: put everything back if it refuses
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        notes = load_deeplabv2_checkpoint(model.backbone, model.decoder, file, state=state)
    except CheckpointError as e:
        model.load_state_dict(before)
        raise CheckpointError(f"{e}. This is {hint}") from e
    notes += [f"{file}: {k}* keeps its initialisation: {what} is not part of a DeepLabV2 file"
              for k, what in ADDED_PARTS.items() if getattr(model, k[:-1], None) is not None]
    return notes


def _load_sdca(model: nn.Module, obj: dict[str, Any], file: str, weights: str) -> list[str]:
    extractor, classifier = (_without_module(_tensors(obj[k], file)) for k in ("feature_extractor", "classifier"))
    trained_bn = any(k.endswith("num_batches_tracked") for k in extractor)
    backbone = "deeplabv2_tv_r101_bn" if trained_bn else "deeplabv2_tv_r101"
    stage = "BatchNorm2d: its self-training stage" if trained_bn else "FrozenBatchNorm2d: a source-only or SDCA stage"
    hint = (f"an SDCA checkpoint ('feature_extractor', 'classifier'; {stage}): use {RECIPES}sdca_deeplabv2_gta2cs.yaml "
            f"with model.backbone={backbone} model.input_norm=imagenet")
    built = describe_model(model)
    net = getattr(model, "backbone", None)
    if not isinstance(net, TorchvisionResNet) or getattr(model, "decoder_name", None) != "deeplabv2":
        raise CheckpointError(f"{file}: this is {hint}; the config builds another network ({built})")
    if weights != "model":
        raise CheckpointError(f"{file}: an SDCA checkpoint holds one network: weights={weights!r} needs a file with "
                              "an EMA teacher")
    own = model.state_dict()
    mapped: dict[str, Tensor] = {}
    source: dict[str, tuple[str, tuple[int, ...]]] = {}
    unexpected: list[str] = []
    counters = 0
    for part, sub, target in (("feature_extractor", extractor, ""), ("classifier", classifier, "decoder.classifier.")):
        for key, tensor in sub.items():
            name = target + key
            if part == "feature_extractor" and not key.startswith("backbone."):
                unexpected.append(f"{part}.{key}")
            elif key.endswith("num_batches_tracked") and name not in own:
                counters += 1  # BatchNorm2d's counter: a FrozenBatchNorm2d has none
            else:
                mapped[name], source[name] = tensor, (f"{part}.{key}", tuple(tensor.shape))
    notes = [f"{file}: loaded SDCA's feature_extractor into backbone.* and its classifier into decoder.classifier.* "
             f"(iteration {obj.get('iteration')})"]
    if counters:
        notes.append(f"{file}: skipped {counters} BatchNorm counters (num_batches_tracked): the config's backbone has "
                     "frozen BatchNorm")
    if trained_bn == net.frozen_bn:
        notes.append(f"{file}: trained with {stage.split(':')[0]}, but the config builds "
                     f"{'FrozenBatchNorm2d (ε 0)' if net.frozen_bn else 'BatchNorm2d (ε 1e-5)'}: the outputs differ "
                     f"by BatchNorm's ε; model.backbone={backbone} is the file's network")
    return notes + _load_checked(model, mapped, source, unexpected, file, hint, built)


# -------------------------------------------------------------------------------------------------- checking
def describe_model(model: nn.Module) -> str:
    """The network a config built, in config keys and widths, for error messages."""
    parts = [f"model.backbone={getattr(model, 'backbone_name', type(model).__name__)}",
             f"model.decoder={getattr(model, 'decoder_name', '?')}"]
    if isinstance(model, HRDASegmenter):
        parts.append("model.hrda.enabled=true" + (" with CLUDA's feature weighter" if model.feature_weighter else ""))
    decoder = getattr(model, "decoder", None)
    embed, classifier = getattr(decoder, "embed", None), getattr(decoder, "classifier", None)
    if embed is not None and isinstance(classifier, nn.Conv2d):
        parts.append(f"head embeds to {embed[0].out_channels}, fuses to {classifier.in_channels}, "
                     f"{classifier.out_channels} classes")
    return ", ".join(parts)


def _load_checked(model: nn.Module, mapped: dict[str, Tensor], source: dict[str, tuple[str, tuple[int, ...]]],
                  unexpected: list[str], file: str, hint: str, built: str) -> list[str]:
    """Load ``mapped`` (model key → tensor; ``source``: each one's key and shape in the file) into ``model``
    strictly, after every check; ``unexpected``: file keys that have no place in the network."""
    own = model.state_dict()
    added = tuple(ADDED_PARTS)
    notes: list[str] = []
    for prefix, what in ADDED_PARTS.items():
        extra = [k for k in mapped if k not in own and k.startswith(prefix)]
        if extra:
            notes.append(f"{file}: skipped {prefix}* ({len(extra)} keys): {what}, which the config does not build")
    unexpected = unexpected + [source[k][0] for k in mapped if k not in own and not k.startswith(added)]
    missing = [k for k in own if k not in mapped and not k.endswith("num_batches_tracked")]
    fresh = [k for k in missing if k.startswith(added)]
    missing = [k for k in missing if not k.startswith(added)]
    shapes = [f"{source[k][0]!r} {source[k][1]} vs expected {tuple(own[k].shape)} ({k!r})"
              for k, v in mapped.items() if k in own and v.shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"network keys the file lacks ({listing([repr(k) for k in missing], counted=True)})")
    if unexpected:
        problems.append(f"unexpected keys ({listing([repr(k) for k in unexpected], counted=True)})")
    if shapes:
        problems.append(f"shape mismatches ({listing(shapes, counted=True)})")
    if problems:
        raise CheckpointError(f"{file} does not fit the network the config builds ({built}): " + "; ".join(problems)
                              + f". This is {hint}")
    for prefix, what in ADDED_PARTS.items():
        n = sum(1 for k in fresh if k.startswith(prefix))
        if n:
            notes.append(f"{file}: {prefix}* ({n} keys) keeps its initialisation: {what} is not in the file (a part "
                         "this run adds to the network)")
    model.load_state_dict({k: mapped[k] if k in mapped else own[k] for k in own}, strict=True)
    return notes

