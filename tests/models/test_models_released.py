"""Released trained models (``uda_ray.models.released``) against independent reference networks.

Each checkpoint is written here in its official key layout from a reference network built in this file from the
official module structure and names: mmseg's ``EncoderDecoder`` (``backbone``, ``decode_head``) with DAFormer's head
(``embed_layers`` of ``MLP``s, ``fuse_layer`` = ``ASPPWrapper`` with ``aspp_modules`` of mmcv ``ConvModule`` /
``DepthwiseSeparableConvModule`` and a ``bottleneck``, or a 1×1 ``ConvModule``; ``conv_seg``), HRDA's head (``head``,
``scale_attention``; CLUDA's also ``feat_weighter``), inside the UDA wrapper's ``model`` / ``ema_model`` /
``imnet_model``. The MiT backbone is Hugging Face's SegFormer encoder, whose weights are written under SegFormer's
names by the key map of ``test_models_mit``; the DeepLabV2 reference is ``test_models_deeplabv2``'s; SDCA's is its
``resnet_feature_extractor`` (torchvision's ResNet behind an ``IntermediateLayerGetter``, its eps-free
``FrozenBatchNorm2d``) and ``ASPP_Classifier_V2``. The loaded uda-ray network must give the reference's logits
(HRDA: the fused output of one context + detail pass).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter

from tests.models.test_models_deeplabv2 import (
    CAFFE_MEAN_BGR,
    SMALL,
    backbone_state,
    classifier_state,
    classifier_weights,
    randomize,
    reference_aspp,
    reference_backbone,
    reference_features,
)
from tests.models.test_models_mit import hf_encoder, hf_stage_maps, hf_to_segformer
from uda_ray.models.errors import CheckpointError
from uda_ray.models.hrda import HRDASegmenter
from uda_ray.models.released import TRAINING_CHECKPOINT, load_released
from uda_ray.models.segmenter import Segmenter

K = 19
MIT_B0 = (32, 64, 160, 256)
DILATIONS = (1, 6, 12, 18)  # daformer_sepaspp_mitb5.py
MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)  # mmseg's img_norm_cfg, RGB 0–255


# ------------------------------------------------------------------------------------ reference (mmseg names)
class ConvModule(nn.Module):
    """mmcv's ConvModule with a BN and ReLU: ``conv`` (no bias before a norm), ``bn``."""

    def __init__(self, cin: int, cout: int, kernel: int, *, padding: int = 0, dilation: int = 1, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=padding, dilation=dilation, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class DepthwiseSeparableConvModule(nn.Module):
    def __init__(self, cin: int, cout: int, dilation: int):
        super().__init__()
        self.depthwise_conv = ConvModule(cin, cin, 3, padding=dilation, dilation=dilation, groups=cin)
        self.pointwise_conv = ConvModule(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise_conv(self.depthwise_conv(x))


class ASPPWrapper(nn.Module):
    """DAFormer's fusion: separable ASPP without image pooling, then a 3×3 bottleneck."""

    def __init__(self, cin: int, channels: int):
        super().__init__()
        self.aspp_modules = nn.ModuleList(ConvModule(cin, channels, 1) if d == 1
                                          else DepthwiseSeparableConvModule(cin, channels, d) for d in DILATIONS)
        self.bottleneck = ConvModule(len(DILATIONS) * channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(torch.cat([m(x) for m in self.aspp_modules], dim=1))


class MLP(nn.Module):
    def __init__(self, cin: int, embed: int):
        super().__init__()
        self.proj = nn.Linear(cin, embed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.flatten(2).transpose(1, 2))  # (B, hw, E)


class DAFormerHead(nn.Module):
    def __init__(self, embed: int, channels: int, classes: int, fusion: str):
        super().__init__()
        self.embed_layers = nn.ModuleDict({str(i): MLP(c, embed) for i, c in enumerate(MIT_B0)})
        self.fuse_layer = ASPPWrapper(4 * embed, channels) if fusion == "aspp" else ConvModule(4 * embed, channels, 1)
        self.conv_seg = nn.Conv2d(channels, classes, 1)  # dropout: identity in eval

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        size = feats[0].shape[2:]
        maps = []
        for i, f in enumerate(feats):
            e = self.embed_layers[str(i)](f).transpose(1, 2).reshape(f.shape[0], -1, *f.shape[2:])  # (B, E, h, w)
            maps.append(F.interpolate(e, size=size, mode="bilinear", align_corners=False))
        return self.conv_seg(self.fuse_layer(torch.cat(maps, dim=1)))


class HRDAHead(nn.Module):
    """HRDA's head: the DAFormer head, a 1×1-fusion scale attention of width ``att``; CLUDA's adds a feat_weighter."""

    def __init__(self, embed: int, channels: int, att: int, cluda: bool):
        super().__init__()
        self.head = DAFormerHead(embed, channels, K, "aspp")
        self.scale_attention = DAFormerHead(att, att, K, "conv1")
        if cluda:
            self.feat_weighter = DAFormerHead(att, att, 1, "conv1")


class EncoderDecoder(nn.Module):
    def __init__(self, decode_head: nn.Module):
        super().__init__()
        self.backbone = hf_encoder("mit_b0")
        self.decode_head = decode_head

    def official_state(self) -> dict[str, torch.Tensor]:
        """Keys as mmseg saves them: SegFormer's MiT names under ``backbone.``."""
        state = {f"backbone.{k}": v for k, v in hf_to_segformer(self.backbone.state_dict()).items()}
        state.update({f"decode_head.{k}": v for k, v in self.decode_head.state_dict().items()})
        return state

    def feats(self, x: torch.Tensor) -> list[torch.Tensor]:
        return hf_stage_maps(self.backbone, x)


def perturb_(net: nn.Module, seed: int) -> nn.Module:
    """Random biases, norm affine parameters and BN statistics, so a wrong mapping of any of them shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
    return net.eval()


def normalize(x: torch.Tensor) -> torch.Tensor:
    """mmseg's Normalize on RGB 0–255 (the pipeline's to_rgb), from x in [0, 1]."""
    return (255 * x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def daformer_reference(fusion: str = "aspp", seed: int = 0) -> EncoderDecoder:
    torch.manual_seed(seed)
    return perturb_(EncoderDecoder(DAFormerHead(16, 16, K, fusion)), seed)


def hrda_reference(cluda: bool = False, seed: int = 0) -> EncoderDecoder:
    torch.manual_seed(seed)
    embed, channels = (32, 16) if cluda else (16, 16)  # CLUDA: embed 512, fuse 256 (scaled down)
    return perturb_(EncoderDecoder(HRDAHead(embed, channels, channels, cluda)), seed)


@torch.no_grad()
def daformer_logits(ref: EncoderDecoder, x: torch.Tensor) -> torch.Tensor:
    return ref.decode_head(ref.feats(normalize(x)))


@torch.no_grad()
def hrda_logits(ref: EncoderDecoder, x: torch.Tensor, cluda: bool) -> torch.Tensor:
    """HRDAEncoderDecoder.encode_decode on an input of one detail window: the 0.5-scale context and the whole input
    as the only slide window; HRDAHead.forward's fusion (CLUDA's head: (1 − a) after upsampling)."""
    img = normalize(x)
    lr_feats = ref.feats(F.interpolate(img, scale_factor=0.5, mode="bilinear", align_corners=False))
    head = ref.decode_head
    lr, hr = head.head(lr_feats), head.head(ref.feats(img))
    att = torch.sigmoid(head.scale_attention(lr_feats))

    def up(t: torch.Tensor) -> torch.Tensor:
        return F.interpolate(t, scale_factor=2.0, mode="bilinear", align_corners=False)

    if cluda:
        return up(att) * hr + (1 - up(att)) * up(lr)
    return up(att) * hr + up((1 - att) * lr)


def uda_checkpoint(path: Path, student: EncoderDecoder, teacher: EncoderDecoder, **extra: dict) -> Path:
    """DACS's ``{"state_dict", "meta"}`` as mmcv saves it, with FD's imnet_model (a segmentor of its own) and a
    numpy scalar in meta (EvalHook's best score)."""
    state = {f"model.{k}": v for k, v in student.official_state().items()}
    state.update({f"ema_model.{k}": v for k, v in teacher.official_state().items()})
    state.update({f"imnet_model.{k}": torch.zeros_like(v) for k, v in student.official_state().items()})
    for part, sub in extra.items():
        state.update({f"{part}.{k}": v for k, v in sub.items()})
    meta = {"CLASSES": ("road",) * K, "iter": 40000, "hook_msgs": {"best_score": np.float64(0.6885)}}
    torch.save({"meta": meta, "state_dict": state}, path)
    return path


def daformer_model(decoder: str = "daformer") -> Segmenter:
    return Segmenter("mit_b0", K, decoder=decoder, embed_dim=16, dropout=0.1, drop_path_rate=0.0).eval()


def hrda_model(cluda: bool = False) -> HRDASegmenter:
    widths = dict(embed_dim=32, fuse_channels=16, feature_weighter=True, fuse_upsampled=True) if cluda \
        else dict(embed_dim=16)
    return HRDASegmenter("mit_b0", K, decoder="daformer", detail_crop=64, detail_stride=32, dropout=0.1,
                         drop_path_rate=0.0, **widths).eval()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


X = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(9))


# ----------------------------------------------------------------------------------------------------- mmseg
@pytest.mark.parametrize(("fusion", "decoder", "weights"), [
    ("aspp", "daformer", "model"), ("aspp", "daformer", "ema_model"), ("conv1", "mlp", "model")])
def test_daformer_checkpoint_gives_the_reference_logits(tmp_path: Path, fusion: str, decoder: str, weights: str):
    student, teacher = daformer_reference(fusion, seed=1), daformer_reference(fusion, seed=2)
    path = uda_checkpoint(tmp_path / "latest.pth", student, teacher)
    model = daformer_model(decoder)
    notes = load_released(model, path, weights=weights)
    ref = student if weights == "model" else teacher
    with torch.no_grad():
        got = model(X).logits
    assert got.shape == (2, K, 16, 16)
    torch.testing.assert_close(got, daformer_logits(ref, X), rtol=1e-4, atol=1e-5)
    other = "ema_model" if weights == "model" else "model"
    assert any(f"loaded {weights}.*" in n for n in notes)
    assert any(f"skipped {other}.*" in n for n in notes) and any("skipped imnet_model.*" in n for n in notes)


def test_plain_segmentor_state_dict_loads_and_skips_the_auxiliary_head(tmp_path: Path):
    ref = daformer_reference(seed=3)
    state = ref.official_state()
    state["auxiliary_head.conv_seg.weight"] = torch.zeros(K, 8, 1, 1)
    torch.save(state, tmp_path / "bare.pth")
    torch.save({"state_dict": state, "meta": {}}, tmp_path / "wrapped.pth")
    for name in ("bare.pth", "wrapped.pth"):
        model = daformer_model()
        notes = load_released(model, tmp_path / name)
        with torch.no_grad():
            torch.testing.assert_close(model(X).logits, daformer_logits(ref, X), rtol=1e-4, atol=1e-5)
        assert any("skipped auxiliary_head.* (1 keys)" in n for n in notes)
    with pytest.raises(CheckpointError, match=r"bare\.pth: a plain segmentor state dict .* weights='ema_model'"):
        load_released(daformer_model(), tmp_path / "bare.pth", weights="ema_model")


@pytest.mark.parametrize("recipe", ["hrda", "mic", "cluda"])
def test_hrda_checkpoint_gives_the_reference_fused_output(tmp_path: Path, recipe: str):
    """HRDA's file (MIC's has the same network; its file may add its masking module's own teacher ``mic.*``, which
    is skipped; its EMA teacher is loaded here) and CLUDA's (512/256 widths scaled down, feature weighter, (1 − a)
    after upsampling) give the reference's fused logits."""
    cluda = recipe == "cluda"
    student, teacher = hrda_reference(cluda, seed=4), hrda_reference(cluda, seed=5)
    extra = {"mic": {f"teacher.ema_model.{k}": v for k, v in teacher.official_state().items()}} \
        if recipe == "mic" else {}
    path = uda_checkpoint(tmp_path / "latest.pth", student, teacher, **extra)
    weights = "ema_model" if recipe == "mic" else "model"
    model = hrda_model(cluda)
    notes = load_released(model, path, weights=weights)
    with torch.no_grad():
        got = model(X).logits
    assert got.shape == (2, K, 16, 16)
    ref = teacher if recipe == "mic" else student
    torch.testing.assert_close(got, hrda_logits(ref, X, cluda), rtol=1e-4, atol=1e-5)
    if cluda:
        torch.testing.assert_close(model.feature_weighter.classifier.weight,
                                   student.decode_head.feat_weighter.conv_seg.weight)
    assert any("skipped mic.*" in n for n in notes) == (recipe == "mic")


def test_cludas_feature_weighter_is_skipped_when_the_config_has_none(tmp_path: Path):
    ref = hrda_reference(cluda=True, seed=6)
    path = uda_checkpoint(tmp_path / "cluda.pth", ref, ref)
    model = HRDASegmenter("mit_b0", K, decoder="daformer", embed_dim=32, fuse_channels=16, detail_crop=64,
                          detail_stride=32, fuse_upsampled=True, drop_path_rate=0.0).eval()
    notes = load_released(model, path)
    assert any("skipped feature_weighter.*" in n and "CLUDA's feature weighter" in n for n in notes)
    with torch.no_grad():
        torch.testing.assert_close(model(X).logits, hrda_logits(ref, X, cluda=True), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("file_recipe", "model_recipe", "message"), [
    ("hrda", "daformer", r"this is an HRDA checkpoint \(keys decode_head\.scale_attention\.\*.*use "
                         r"search_spaces/base/hrda_gta2cs\.yaml"),
    ("daformer", "hrda", r"this is a DAFormer checkpoint .*use search_spaces/base/daformer_gta2cs\.yaml"),
    ("cluda", "hrda", r"shape mismatches .*'model\.decode_head\.head\.embed_layers\.0\.proj\.weight'.* This is a "
                      r"CLUDA checkpoint \(keys decode_head\.feat_weighter\.\*.*cluda_hrda_gta2cs\.yaml"),
    ("daformer", "mit_b1", r"this is a DAFormer checkpoint \(.*mit_b0, .*model\.backbone=mit_b1"),
    ("daformer", "deeplabv2", r"this is a DAFormer checkpoint .*model\.backbone=deeplabv2_r101"),
])
@pytest.mark.usefixtures("shallow_resnets")
def test_a_file_of_another_recipe_is_refused_naming_its_recipe(tmp_path: Path, file_recipe: str, model_recipe: str,
                                                                message: str):
    ref = {"hrda": hrda_reference, "cluda": lambda: hrda_reference(cluda=True),
           "daformer": daformer_reference}[file_recipe]()
    path = uda_checkpoint(tmp_path / "latest.pth", ref, ref)
    model = {"daformer": daformer_model, "hrda": hrda_model,
             "mit_b1": lambda: Segmenter("mit_b1", K, decoder="daformer", embed_dim=16),
             "deeplabv2": lambda: Segmenter("deeplabv2_r101", K, decoder="deeplabv2", input_norm="caffe")}[
        model_recipe]()
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=message) as info:
        load_released(model, path)
    assert str(path) in str(info.value)
    assert unchanged(model, before)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda s: s.pop("model.decode_head.conv_seg.bias"), r"network keys the file lacks \(1: 'decoder\.classifier"),
    (lambda s: s.update({"model.decode_head.extra.weight": torch.zeros(1)}),
     r"unexpected keys \(1: 'model\.decode_head\.extra\.weight'\)"),
    (lambda s: s.update({"model.backbone.block5.0.norm1.weight": torch.zeros(1)}),
     r"unexpected keys \(1: 'model\.backbone\.block5\.0\.norm1\.weight'\)"),
    (lambda s: s.update({"model.decode_head.conv_seg.weight": torch.zeros(5, 16, 1, 1)}),
     r"'model\.decode_head\.conv_seg\.weight' \(5, 16, 1, 1\) vs expected \(19, 16, 1, 1\)"),
    (lambda s: s.update({"discriminator.conv1.weight": torch.zeros(1)}), r"unexpected parts .*'?discriminator\.\*"),
])
def test_key_faults_name_the_keys_and_copy_nothing(tmp_path: Path, edit, message: str):
    ref = daformer_reference(seed=7)
    path = uda_checkpoint(tmp_path / "broken.pth", ref, ref)
    obj = torch.load(path, weights_only=False)
    edit(obj["state_dict"])
    torch.save(obj, path)
    model = daformer_model()
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=message) as info:
        load_released(model, path)
    assert "broken.pth" in str(info.value) and unchanged(model, before)


def test_weights_that_the_file_lacks_are_refused(tmp_path: Path):
    ref = daformer_reference(seed=8)
    state = {f"model.{k}": v for k, v in ref.official_state().items()}
    torch.save({"state_dict": state}, tmp_path / "student_only.pth")
    with pytest.raises(CheckpointError, match=r"without 'ema_model\.\*' keys \(it holds model\.\*\)"):
        load_released(daformer_model(), tmp_path / "student_only.pth", weights="ema_model")
    with pytest.raises(ValueError, match="weights = 'teacher'"):
        load_released(daformer_model(), tmp_path / "student_only.pth", weights="teacher")
    for absent in (tmp_path / "absent.pth", (tmp_path / "absent.pth").as_uri()):
        with pytest.raises(FileNotFoundError, match="absent.pth: no such file"):
            load_released(daformer_model(), absent)


# ------------------------------------------------------------------------------------------------- DeepLabV2
def deeplabv2_model() -> Segmenter:
    model = Segmenter("deeplabv2_r101", 5, decoder="deeplabv2", input_norm="caffe", aux_weight=0.1)
    assert model.backbone.depths == SMALL
    return model.eval()


@pytest.mark.usefixtures("shallow_resnets")
def test_advent_state_dict_routes_through_the_deeplabv2_loader(tmp_path: Path):
    net = reference_backbone(SMALL)
    randomize(net, torch.Generator().manual_seed(10))
    main = classifier_weights(2048, 5, torch.Generator().manual_seed(11))
    state = backbone_state(net)
    state.update(classifier_state("layer6.", *main))
    state.update(classifier_state("layer5.", *classifier_weights(1024, 5, torch.Generator().manual_seed(12))))
    torch.save(state, tmp_path / "advent.pth")
    model = deeplabv2_model()
    notes = load_released(model, tmp_path / "advent.pth")
    assert sum("loaded classifier" in n for n in notes) == 2
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(13))
    caffe = 255 * x.flip(1) - torch.tensor(CAFFE_MEAN_BGR).view(1, 3, 1, 1)  # BGR 0–255 minus the mean
    with torch.no_grad():
        expected = reference_aspp(reference_features(net.eval(), caffe)[-1], *main)
        torch.testing.assert_close(model(x).logits, expected, rtol=1e-5, atol=1e-5)
    # PixMatch/EHTDI's training file: under 'state_dict', DataParallel's 'module.' prefix, beside optimizer state
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "iter": 5, "best_MIou": 0.3,
                "optimizer": {"state": {}, "param_groups": [{"lr": 2.5e-4}]}}, tmp_path / "ehtdi.pth")
    model = deeplabv2_model()
    load_released(model, tmp_path / "ehtdi.pth")
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, expected, rtol=1e-5, atol=1e-5)
    # a classifier the loader refuses after the backbone: nothing stays changed
    del state["layer6.conv2d_list.2.bias"]
    torch.save(state, tmp_path / "broken.pth")
    model = deeplabv2_model()
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=r"classifier 'layer6' has keys.*This is an ADVENT-family DeepLabV2"):
        load_released(model, tmp_path / "broken.pth")
    assert unchanged(model, before)
    with pytest.raises(CheckpointError, match=r"this is an ADVENT-family DeepLabV2 checkpoint .*deeplabv2_gta2cs"):
        load_released(daformer_model(), tmp_path / "advent.pth")
    torch.save({**backbone_state(net), "fc.weight": torch.zeros(1000, 2048)}, tmp_path / "resnet101.pth")
    with pytest.raises(CheckpointError, match=r"this is an ImageNet classification ResNet .*model\.pretrained_path"):
        load_released(daformer_model(), tmp_path / "resnet101.pth")


# ----------------------------------------------------------------------------------------- uda-ray and others
def udaray_checkpoint(folder: Path, student: nn.Module, teacher: nn.Module) -> Path:
    from uda_ray.config import Config, to_dict
    from uda_ray.train.checkpoint import save_checkpoint

    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1.0)
    return save_checkpoint(folder, iteration=7, student=student, teacher=teacher, optimizer=optimizer,
                           scheduler=scheduler, terms=nn.ModuleList(), generator=torch.Generator(),
                           config=to_dict(Config()))


def test_udaray_checkpoint_loads_student_or_teacher_and_added_parts_are_noted(tmp_path: Path):
    from uda_ray.train.checkpoint import FILENAME

    assert TRAINING_CHECKPOINT == FILENAME
    torch.manual_seed(14)
    student = perturb_(daformer_model(), 14)
    teacher = perturb_(copy.deepcopy(student), 15)
    folder = udaray_checkpoint(tmp_path / "iter_0000007", student, teacher).parent
    for weights, source, where in (("model", student, folder), ("ema_model", teacher, folder.as_uri())):
        model = daformer_model()
        notes = load_released(model, where, weights=weights)  # a local path or a pyarrow.fs URI
        assert any(f"loaded the {'student' if weights == 'model' else 'teacher'} of a uda-ray" in n for n in notes)
        with torch.no_grad():
            assert torch.equal(model(X).logits, source(X).logits)
    # a later stage adds CFContra's projection head: it keeps its initialisation; the reverse skips it
    with_proj = Segmenter("mit_b0", K, decoder="daformer", embed_dim=16, proj_dim=8, drop_path_rate=0.0)
    init = snapshot(with_proj.proj)
    notes = load_released(with_proj, folder / TRAINING_CHECKPOINT)
    assert any("proj.* (7 keys) keeps its initialisation" in n for n in notes)  # + num_batches_tracked
    assert all(torch.equal(v, init[k]) for k, v in with_proj.proj.state_dict().items())
    udaray_checkpoint(tmp_path / "proj", with_proj, with_proj)
    notes = load_released(daformer_model(), tmp_path / "proj")
    assert any("skipped proj.* (8 keys): CFContra's projection head" in n for n in notes)
    with pytest.raises(CheckpointError, match=r"a uda-ray training checkpoint of model\.backbone=resnet18, "
                                              r"model\.decoder=mlp.*without --config"):
        load_released(hrda_model(), folder)


class SDCAFrozenBatchNorm2d(nn.Module):
    """SDCA's ``core/models/layers.py``: four buffers, no ε."""

    def __init__(self, n: int):
        super().__init__()
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            self.register_buffer(name, torch.full((n,), value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * self.running_var.rsqrt()
        return x * scale.view(1, -1, 1, 1) + (self.bias - self.running_mean * scale).view(1, -1, 1, 1)


class ResnetFeatureExtractor(nn.Module):
    """SDCA's ``resnet_feature_extractor``: torchvision's ResNet dilated [False, True, True] behind an
    ``IntermediateLayerGetter`` that returns layer4 (shallow here)."""

    def __init__(self, frozen: bool):
        super().__init__()
        net = torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, list(SMALL),
                                               replace_stride_with_dilation=[False, True, True],
                                               norm_layer=SDCAFrozenBatchNorm2d if frozen else nn.BatchNorm2d)
        self.backbone = IntermediateLayerGetter(net, return_layers={"layer4": "out"})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)["out"]


class ASPPClassifierV2(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv2d_list = nn.ModuleList(nn.Conv2d(2048, K, 3, padding=d, dilation=d) for d in (6, 12, 18, 24))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(conv(x) for conv in self.conv2d_list)


def sdca_file(path: Path, frozen: bool, seed: int) -> tuple[ResnetFeatureExtractor, ASPPClassifierV2]:
    """``train_sdca.py``'s file: iteration, both networks under DataParallel's ``module.``, optimiser states."""
    g = torch.Generator().manual_seed(seed)
    extractor, classifier = ResnetFeatureExtractor(frozen).eval(), ASPPClassifierV2().eval()
    randomize(extractor, g)
    randomize(classifier, g)
    with torch.no_grad():
        for m in extractor.modules():
            if isinstance(m, SDCAFrozenBatchNorm2d):
                m.weight.copy_(0.5 + 0.5 * torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    torch.save({"iteration": 40000, "optimizer_fea": {"state": {}, "param_groups": []}, "optimizer_cls": {},
                "feature_extractor": {f"module.{k}": v for k, v in extractor.state_dict().items()},
                "classifier": {f"module.{k}": v for k, v in classifier.state_dict().items()}}, path)
    return extractor, classifier


def sdca_model(frozen: bool) -> Segmenter:
    model = Segmenter("deeplabv2_tv_r101" if frozen else "deeplabv2_tv_r101_bn", K, decoder="deeplabv2")
    assert model.backbone.depths == SMALL and model.backbone.frozen_bn == frozen
    return model.eval()


@pytest.mark.usefixtures("shallow_resnets")
@pytest.mark.parametrize("frozen", [True, False])
def test_sdca_checkpoint_gives_the_reference_logits(tmp_path: Path, frozen: bool):
    """FrozenBatchNorm2d (source-only / SDCA stage) and BatchNorm2d (self-training stage, r101_g2c_best.pth)."""
    extractor, classifier = sdca_file(tmp_path / "model_iter040000.pth", frozen, seed=30)
    model = sdca_model(frozen)
    notes = load_released(model, tmp_path / "model_iter040000.pth")
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(31))
    img = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(
        1, 3, 1, 1)  # SDCA's INPUT.PIXEL_MEAN / PIXEL_STD on RGB in [0, 1]
    with torch.no_grad():
        expected = classifier(extractor(img))
        assert expected.abs().mean() > 0.1
        torch.testing.assert_close(model(x).logits, expected, rtol=1e-4, atol=1e-4)
    assert any("iteration 40000" in n for n in notes) and not any("differ by BatchNorm" in n for n in notes)
    # the file's BatchNorm kind decides the hint; the other backbone loads with a note
    other = sdca_model(not frozen)
    notes = load_released(other, tmp_path / "model_iter040000.pth")
    assert any("differ by BatchNorm's ε" in n for n in notes)
    assert any("skipped" in n and "num_batches_tracked" in n for n in notes) == (not frozen)
    backbone = "deeplabv2_tv_r101" if frozen else "deeplabv2_tv_r101_bn"
    with pytest.raises(CheckpointError, match=rf"model_iter040000\.pth: this is an SDCA checkpoint .*"
                                              rf"sdca_deeplabv2_gta2cs\.yaml with model\.backbone={backbone} "):
        load_released(deeplabv2_model(), tmp_path / "model_iter040000.pth")


def test_unknown_files_are_refused_with_what_they_are(tmp_path: Path):
    torch.save({"weights": torch.zeros(1)}, tmp_path / "junk.pth")
    with pytest.raises(CheckpointError, match=re.escape("not a released model uda-ray knows")):
        load_released(daformer_model(), tmp_path / "junk.pth")
