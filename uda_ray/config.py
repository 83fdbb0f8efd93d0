"""The run configuration: a tree of frozen dataclasses, the one source of defaults.

A YAML file may set only fields that exist; dotted overrides (``loss.cluda.temperature=0.1``) are parsed to the
field's type. Every bound of METHODS.md is declared next to its field and checked on load, so a wrong key, type or
value fails with the key's name, the value and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration key, type or value that is not allowed; the message names the source and the key."""


def _f(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
       lt: float | None = None, choices: tuple | None = None, doc: str = "") -> Any:
    """A dataclass field with its allowed range recorded in metadata."""
    meta = {k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt, choices=choices, doc=doc).items() if v not in (None, "")}
    return field(default=default, metadata=meta)


def _sub(cls: type) -> Any:
    return field(default_factory=cls)


# ----------------------------------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class SyntheticConfig:
    """The built-in procedural domain pair (see uda_ray/data/synthetic.py)."""

    cache_dir: str = _f("~/.cache/uda-ray/synthetic", doc="generated once per parameter set under this folder")
    seed: int = _f(0, ge=0)
    num_source: int = _f(300, ge=1)
    num_target: int = _f(300, ge=1)
    num_val: int = _f(60, ge=1)
    height: int = _f(96, ge=16)
    width: int = _f(192, ge=16)
    shift_strength: float = _f(1.0, ge=0.0, doc="0 = the target looks like the source; 1 = the default domain gap")


@dataclass(frozen=True)
class RareClassConfig:
    """Rare Class Sampling of source images (DAFormer, METHODS.md §9)."""

    enabled: bool = _f(False)
    temperature: float = _f(0.01, gt=0.0, doc="P(c) = softmax((1 - f_c) / T)")
    min_pixels: int = _f(3000, ge=0, doc="an image is drawn for class c only with more pixels of c than this")
    min_crop_ratio: float = _f(0.5, ge=0.0, doc="crops are re-drawn (10 times) until they hold more than "
                               "min_pixels * min_crop_ratio pixels of c (HRDA's 1024 crops: 2.0)")
    stats_dir: str = _f("", doc="where the class statistics are cached when the source root holds none and is "
                        "read-only; empty = ~/.cache/uda-ray/rcs/<hash>. DAFormer's sample_class_stats.json in the "
                        "source root is always read first")


@dataclass(frozen=True)
class PhotometricConfig:
    """Per-image photometric augmentation of one domain's training images (``uda_ray.data.pil_photometric``): after
    resize, crop and flip, on the uint8 image only, drawn from the sample's seed (exact on resume); jitter, then
    grayscale, then blur. The defaults change nothing."""

    brightness: float = _f(0.0, ge=0.0, doc="colour jitter (torchvision's ColorJitter on the PIL image, its four ops "
                           "in a random order): brightness factor uniform in [max(0, 1 - x), 1 + x] (SDCA: 0.5); 0 = "
                           "off")
    contrast: float = _f(0.0, ge=0.0, doc="colour jitter: contrast factor, as brightness (SDCA: 0.5)")
    saturation: float = _f(0.0, ge=0.0, doc="colour jitter: saturation factor, as brightness (SDCA: 0.5)")
    hue: float = _f(0.0, ge=0.0, le=0.5, doc="colour jitter: hue shift uniform in [-x, x] turns (SDCA: 0.2)")
    jitter_prob: float = _f(1.0, ge=0.0, le=1.0, doc="probability that an image is jittered (SDCA: always; its "
                            "INPUT.RANDOMAPPLY is never read)")
    grayscale_prob: float = _f(0.0, ge=0.0, le=1.0, doc="torchvision's RandomGrayscale (SDCA: 0.2); 0 = off")
    blur_prob: float = _f(0.0, ge=0.0, le=1.0, doc="probability of a Gaussian blur (SDCA: 1.0; PixMatch/EHTDI's "
                          "gaussian_blur: 0.5); 0 = off")
    blur_kind: str = _f("torchvision", choices=("torchvision", "pil"),
                        doc="torchvision: torchvision's gaussian_blur with a blur_kernel-sized kernel and reflect "
                        "padding, truncated back to uint8 as torchvision 0.8.2 does it (SDCA's GaussianBlur); pil: "
                        "PIL's ImageFilter.GaussianBlur(radius=sigma) (PixMatch/EHTDI)")
    blur_kernel: int = _f(3, ge=1, doc="torchvision blur: the odd kernel size (SDCA: 3)")
    blur_sigma_min: float = _f(0.1, ge=0.0, doc="sigma uniform in [blur_sigma_min, blur_sigma_max] (SDCA: 0.1 to "
                               "2.0; PixMatch/EHTDI's PIL radius: 0.0 to 1.0); > 0 for the torchvision blur")
    blur_sigma_max: float = _f(2.0, ge=0.0)


@dataclass(frozen=True)
class DataConfig:
    source: str = _f("synthetic", choices=("synthetic", "gta5", "synthia"))
    target: str = _f("synthetic", choices=("synthetic", "cityscapes"))
    source_root: str = _f("", doc="dataset folder; empty for the synthetic pair's cache")
    target_root: str = _f("")
    protocol: int = _f(19, choices=(19, 16, 13), doc="evaluation classes (METHODS.md §7)")
    source_resize: tuple[int, int] = _f((96, 192), ge=1, doc="(height, width) before cropping")
    target_resize: tuple[int, int] = _f((96, 192), ge=1)
    crop: tuple[int, int] = _f((64, 64), ge=1, doc="(height, width) random crop, at most the resize")
    target_crop: tuple[int, int] = _f((0, 0), ge=0, doc="(height, width) random crop of the target images when it "
                                      "differs from data.crop (ADVENT: whole 1280x720 source, 1024x512 target); "
                                      "(0, 0) = data.crop. Mixing source and target pixels needs one size")
    val_resize: tuple[int, int] = _f((96, 192), ge=1, doc="inference size; logits are upsampled to the label")
    flip: bool = _f(True)
    batch_size: int = _f(2, ge=1, doc="images per domain per worker")
    loader_workers: int = _f(0, ge=0)
    val_max_images: int = _f(0, ge=0, doc="0 = the whole val split")
    label_format: str = _f("auto", choices=("auto", "ids", "train_ids"),
                           doc="ids: the datasets' label ids; train_ids: DAFormer's converted *_labelTrainIds.png; "
                           "auto: the one kind found (an error when both exist)")
    resize_labels: bool = _f(False, doc="a label whose size differs from its image is resized (nearest) instead of "
                             "being an error")
    keep_ratio: bool = _f(False, doc="resize to fit the *_resize sizes keeping the aspect ratio (mmseg's Resize, "
                          "DAFormer) instead of to them exactly")
    cat_max_ratio: float = _f(1.0, gt=0.0, le=1.0, doc="source crops are re-drawn (10 times) while one class covers "
                              "more than this share (DAFormer: 0.75); 1.0 = off")
    target_pseudo_margins: tuple[int, int, int, int] = _f((0, 0, 0, 0), ge=0, doc="(top, bottom, left, right) "
                                                          "pixels of each target image as loaded, before resize and "
                                                          "crop, whose pseudo-labels get weight 0 (HRDA/MIC's "
                                                          "crop_pseudo_margins [30, 240, 30, 30]); teacher.ignore_top "
                                                          "and ignore_bottom count on the crop instead (DAFormer)")
    target_pseudo_labels: str = _f("", doc="a folder of offline target labels (a pseudo_labels stage's output: "
                                   "labels/<image path relative to data.target_root>.png, train ids, 255 = ignore) "
                                   "that replace the target train split's labels, for loss.self_training; a chain "
                                   "sets it from a stage's target_labels input")
    source_scale_min: float = _f(1.0, gt=0.0, doc="before the random crop the source image (and label, nearest) is "
                                 "resized to source_resize times a ratio s uniform in [source_scale_min, "
                                 "source_scale_max), (int(h*s), int(w*s)), and padded with the mean colour / ignore "
                                 "where smaller than the crop (SDCA's RandomScale); 1 and 1 = off")
    source_scale_max: float = _f(1.0, gt=0.0)
    target_scale_min: float = _f(1.0, gt=0.0, doc="the same for the target (SDCA's self-training stage: 0.5 to 1.5 "
                                 "of the whole 1024x2048 image before a 512x1024 crop)")
    target_scale_max: float = _f(1.0, gt=0.0)
    source_photometric: PhotometricConfig = _sub(PhotometricConfig)
    target_photometric: PhotometricConfig = _sub(PhotometricConfig)
    class_balanced: bool = _f(False, doc="SDCA's class-balanced source sampling (uda_ray.data.class_balanced): the "
                              "source images are read, shuffled, from a list drawn so that every class is seen about "
                              "equally often (classes from the RCS class statistics, cached as data.rcs.stats_dir "
                              "says); not with data.rcs.enabled")
    class_balanced_draws: int = _f(0, ge=0, doc="class_balanced: SDCA's max_iters, the list holds (int(draws / 3000) "
                                   "+ 1) * 3000 images (SDCA: SOLVER.MAX_ITER x SOLVER.BATCH_SIZE, 500000 in its "
                                   "SDCA stage, 250000 source-only); 0 = (optim.poly_iters or run.iterations) x the "
                                   "source images per iteration over all workers")
    rcs: RareClassConfig = _sub(RareClassConfig)
    synthetic: SyntheticConfig = _sub(SyntheticConfig)


@dataclass(frozen=True)
class HRDAConfig:
    """HRDA's multi-resolution training and inference (METHODS.md §10; ``uda_ray.models.hrda``)."""

    enabled: bool = _f(False)
    context_scale: float = _f(0.5, choices=(0.5,), doc="the context pass sees the crop resized by this factor")
    detail_crop: int = _f(512, ge=8, doc="side of the full-resolution detail window (a multiple of 8, at most the "
                          "training crop)")
    detail_window_stride: int = _f(256, ge=8, doc="inference and pseudo-labels: detail windows every this many "
                                   "pixels (a multiple of 8, at most detail_crop)")
    attention_classwise: bool = _f(True, doc="one scale-attention map per class (HRDA) instead of one for all")
    detail_loss_weight: float = _f(0.1, ge=0.0, lt=1.0, doc="loss = (1 - w) CE(fused) + w CE(detail crop)")
    fuse_upsampled: bool = _f(False, doc="fuse as (1 - up(a)) up(y_LR) + up(a) y_HR (CLUDA's HRDA head) instead of "
                              "HRDA's up((1 - a) y_LR) + up(a) y_HR")


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = _f("resnet18", doc="mit_b0 … mit_b5 (SegFormer's Mix Transformer), deeplabv2_r101 (DeepLabV2's "
                       "caffe-style ResNet-101), deeplabv2_tv_r101 / deeplabv2_tv_r101_bn (SDCA's torchvision "
                       "ResNet-101 at output stride 8, BatchNorm frozen / trainable; torchvision's "
                       "resnet101-5d3b4d8f.pth as pretrained_path) or any timm model that supports features_only")
    decoder: str = _f("mlp", choices=("mlp", "daformer", "deeplabv2"),
                      doc="mlp: multi-level fusion with a 1x1 fusion (SegFormer-style); daformer: DAFormer's head "
                      "(separable ASPP fusion); deeplabv2: the ASPP classifier on layer4 (deeplabv2_r101 only)")
    input_norm: str = _f("imagenet", choices=("imagenet", "caffe"),
                         doc="imagenet: RGB mean/std; caffe: BGR x255 minus DeepLab's mean (DeepLab checkpoints)")
    drop_path_rate: float = _f(0.1, ge=0.0, lt=1.0, doc="stochastic depth of MiT backbones (SegFormer: 0.1)")
    aux_weight: float = _f(0.0, ge=0.0, doc="deeplabv2: weight of the auxiliary classifier on layer3 (ADVENT's "
                           "multi-level 0.1); 0 = no auxiliary classifier")
    pretrained: bool = _f(False, doc="timm's ImageNet weights (downloads; timm backbones only)")
    pretrained_path: str = _f("", doc="local checkpoint: a timm state dict, SegFormer's mit_b*.pth, or DeepLab's "
                              "DeepLab_resnet_pretrained_imagenet.pth / an ADVENT-family model")
    init_from: str = _f("", doc="start training from a trained model file (uda_ray.models.released): a released "
                        "DAFormer/HRDA/MIC/CLUDA mmseg checkpoint, an ADVENT-family DeepLabV2 state dict, or a uda-ray "
                        "checkpoint.pt (or its folder); loaded into the student after the pretrained backbone and FD's "
                        "copy of it, before the teacher copy; ignored when a run resumes; empty = off")
    init_weights: str = _f("model", choices=("model", "ema_model"), doc="which network of model.init_from: model = "
                           "the student (uda-ray: 'student'), ema_model = the EMA teacher (uda-ray: 'teacher')")
    out_indices: tuple[int, ...] = _f((), ge=0, doc="backbone levels; empty = the last four")
    embed_dim: int = _f(256, ge=1, doc="channels each level is embedded to in the fusion decoder")
    fuse_channels: int = _f(0, ge=0, doc="daformer: width of the fused map (and ASPP branches) when it differs from "
                            "embed_dim (CLUDA: embed 512, fuse 256); 0 = embed_dim. Also HRDA's attention width")
    dropout: float = _f(0.1, ge=0.0, lt=1.0)
    decoder_norm: str = _f("batch", choices=("batch", "group"),
                           doc="norm of the decoder and projection head; group = per sample (batch-split invariant)")
    sync_bn: bool = _f(False, doc="SyncBatchNorm under DDP (CUDA only)")
    hrda: HRDAConfig = _sub(HRDAConfig)
    align_corners: bool = _f(False, doc="logits resized to a label or image bilinearly with align_corners=True (the "
                             "DeepLab-family code: ADVENT, SDCA, PixMatch/EHTDI): the supervised loss, the teacher's "
                             "pseudo-labels and the evaluation; false = align_corners False (mmseg: DAFormer, HRDA)")
    aux_pass_bn_update: bool = _f(True, doc="student passes other than the source and the mixed batch (the plain "
                                  "target batch, the target-mix and strong-view batches) update BatchNorm running "
                                  "statistics, as the methods' code does; false: they leave them to the source and "
                                  "mixed passes, so a method's gain is its loss's alone")


@dataclass(frozen=True)
class TeacherConfig:
    kind: str = _f("ema", choices=("ema", "nearest_centroid"),
                   doc="where target labels come from: ema = the EMA teacher's pseudo-labels; nearest_centroid = "
                   "CFContra's get_pseudo_labels: each target pixel of the student's projection takes its nearest "
                   "source-bank centroid (Euclidean), ignored where the two nearest are within loss.cfcontra.margin "
                   "(serves loss.cfcontra only; the EMA teacher then labels nothing)")
    alpha: float = _f(0.999, ge=0.0, lt=1.0, doc="EMA: alpha_t = min(1 - 1/(t+1), alpha)")
    pseudo_threshold: float = _f(0.968, ge=0.0, le=1.0)
    weighting: str = _f("scalar", choices=("scalar", "pixel", "batch"),
                        doc="scalar: fraction above threshold per image (margins excluded); pixel: 1 above the "
                        "threshold; batch: one fraction over the whole target batch, margins zeroed after (DAFormer)")
    bn_mode: str = _f("running", choices=("running", "batch"),
                      doc="teacher BatchNorm while pseudo-labelling: running = eval mode (running statistics); "
                      "batch = train mode, normalising with the target batch's statistics, only dropout and "
                      "drop-path off (DAFormer's code); the teacher's running statistics are never changed")
    ignore_top: int = _f(0, ge=0, doc="pixels at the top with pseudo-label weight 0")
    ignore_bottom: int = _f(0, ge=0)


@dataclass(frozen=True)
class TargetToSourceConfig:
    enabled: bool = _f(False)
    t_max: float = _f(0.95, ge=0.0, le=1.0, doc="target pixels above this teacher confidence are pasted")
    weight: float = _f(0.1, ge=0.0)


@dataclass(frozen=True)
class MixConfig:
    class_ratio: float = _f(0.5, ge=0.0, le=1.0, doc="fraction (ceil) of source classes pasted by ClassMix")
    prob: float = _f(1.0, ge=0.0, le=1.0, doc="probability that an image pair is ClassMixed")
    jitter_strength: float = _f(0.2, ge=0.0, le=1.0)
    jitter_prob: float = _f(0.8, ge=0.0, le=1.0)
    blur_prob: float = _f(0.5, ge=0.0, le=1.0)
    blur_sigma_min: float = _f(0.15, gt=0.0)
    blur_sigma_max: float = _f(1.15, gt=0.0)
    target_to_source: TargetToSourceConfig = _sub(TargetToSourceConfig)


@dataclass(frozen=True)
class CludaConfig:
    weight: float = _f(0.0, ge=0.0, doc="0 removes the term (METHODS default when on: 1.0)")
    temperature: float = _f(1.0, gt=0.0)
    fm_size: int = _f(65, ge=1, doc="features and labels are resized to fm_size x fm_size")
    on_source: bool = _f(True)
    on_mix: bool = _f(True)
    chunk_size: int = _f(0, ge=0, doc="anchor block size; 0 = direct N x N form")
    multires: bool = _f(False, doc="CLUDA on HRDA: the learned-weighted multi-resolution contrast of context and "
                        "detail features (METHODS.md §11) instead of the single-resolution one; needs model.hrda")
    weighter_lr_mult: float = _f(10.0, gt=0.0, doc="multires: learning rate of the weight head = optim.lr x this")
    official_resizing: bool = _f(False, doc="multires: CLUDA's resizes (align_corners True for the context map's x2 "
                                 "and the fm_size resizes, pseudo weights bilinear) instead of align_corners False "
                                 "and nearest pseudo weights")
    entropy_crop_after: int = _f(0, ge=0, doc="HRDA: after this iteration the mixed image's detail window is, per "
                                 "image, the inference-grid window of highest mean context entropy (CLUDA: 12000); "
                                 "0 = off (HRDA's random window)")


@dataclass(frozen=True)
class CFContraConfig:
    weight: float = _f(0.0, ge=0.0, doc="each of the four src/tgt x bank pairs (METHODS default 0.001)")
    temperature: float = _f(0.07, gt=0.0)
    bank_size: int = _f(1, ge=1, doc="entries per class; 1 = momentum centroid")
    momentum: float = _f(0.9, ge=0.0, le=1.0)
    margin: float = _f(0.05, ge=0.0)
    proj_dim: int = _f(128, ge=1)
    init_centroids: str = _f("", doc="a centroids.pt of a centroids stage (uda_ray.train.offline.save_centroids): the "
                             "two banks start from its source and target centroids, as CFContra loads "
                             "src/tgt_center_minent_20.pkl (layer4 centroids into banks of projected features, as "
                             "there: needs proj_dim = their width, 2048 on DeepLabV2); empty = the banks start empty")


@dataclass(frozen=True)
class EntropyConfig:
    weight: float = _f(0.0, ge=0.0, doc="MinEnt on target predictions (METHODS default 0.001)")
    aux_weight: float = _f(0.0, ge=0.0, doc="MinEnt on the auxiliary (layer3) prediction of DeepLabV2 (ADVENT's "
                           "multi-level 0.0002); needs model.aux_weight > 0")


@dataclass(frozen=True)
class SDCAConfig:
    weight_feat: float = _f(0.0, ge=0.0, doc="backbone-feature level (METHODS default 1.0)")
    weight_out: float = _f(0.0, ge=0.0, doc="logit level")
    tau: float = _f(100.0, gt=0.0)
    delta: float = _f(0.9, ge=0.0, le=1.0, doc="target pixels need this teacher confidence")
    init_stats: str = _f("", doc="a class_stats.pt of a class_stats stage (SDCA's semantic_dist_init.py; "
                         "uda_ray.train.offline.save_class_statistics): the feature and output statistics start from "
                         "it, as SDCA's CV_DIR; empty = they start empty")


@dataclass(frozen=True)
class CrossViewConfig:
    pixel_weight: float = _f(0.0, ge=0.0, doc="METHODS default 0.01 (GTA) / 0.008 (SYNTHIA)")
    proto_weight: float = _f(0.0, ge=0.0)
    pixel_temperature: float = _f(0.05, gt=0.0)
    proto_temperature: float = _f(0.14, gt=0.0)
    grid_size: int = _f(32, ge=1, doc="views are compared on a grid_size x grid_size grid of pixels")


@dataclass(frozen=True)
class MICConfig:
    """Masked Image Consistency (METHODS.md §12): CE of the student on a block-masked target image against the
    teacher's pseudo-labels of the unmasked one."""

    weight: float = _f(0.0, ge=0.0, doc="MIC's lambda (1.0); 0 removes the term")
    mask_ratio: float = _f(0.7, ge=0.0, lt=1.0, doc="share of blocks masked")
    block_size: int = _f(64, ge=1, doc="mask block side in pixels (64 at HRDA's resolution, 32 at DAFormer's)")


THING_CLASSES = (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)  # traffic light/sign, person … bicycle (METHODS.md §9)


@dataclass(frozen=True)
class FeatureDistanceConfig:
    weight: float = _f(0.0, ge=0.0, doc="ImageNet Feature Distance on the source (DAFormer: 0.005); 0 removes it; "
                       "needs the ImageNet weights it is defined against (model.pretrained_path or model.pretrained)")
    classes: tuple[int, ...] = _f(THING_CLASSES, ge=0, le=18, doc="train ids whose features are kept close")
    scale_min_ratio: float = _f(0.75, gt=0.0, le=1.0, doc="a feature cell takes its label's majority class only "
                                "when it covers this share of the cell")
    without_pretrained: bool = _f(False, doc="allow FD with no ImageNet weights loaded: its reference is then a "
                                  "frozen copy of the randomly initialised backbone, which is not DAFormer's FD "
                                  "(toy runs and tests only)")


@dataclass(frozen=True)
class LovaszConfig:
    weight: float = _f(0.0, ge=0.0, doc="Lovász-softmax on the source logits (upsampled with align_corners=True, as "
                       "SDCA), beside the source CE (SDCA's source-only and SDCA stages: 0.75); 0 removes it")


@dataclass(frozen=True)
class SelfTrainingConfig:
    """Supervised training on offline target labels (SDCA's last stage: ``data.target_pseudo_labels``)."""

    weight: float = _f(0.0, ge=0.0, doc="the model's supervised loss on the target images against "
                       "data.target_pseudo_labels; 0 removes it")


@dataclass(frozen=True)
class LossConfig:
    source_weight: float = _f(1.0, ge=0.0)
    mix_weight: float = _f(1.0, ge=0.0, doc="weighted CE on the mixed image; 0 = source-only")
    cluda: CludaConfig = _sub(CludaConfig)
    cfcontra: CFContraConfig = _sub(CFContraConfig)
    entropy: EntropyConfig = _sub(EntropyConfig)
    sdca: SDCAConfig = _sub(SDCAConfig)
    cross_view: CrossViewConfig = _sub(CrossViewConfig)
    fd: FeatureDistanceConfig = _sub(FeatureDistanceConfig)
    mic: MICConfig = _sub(MICConfig)
    lovasz: LovaszConfig = _sub(LovaszConfig)
    self_training: SelfTrainingConfig = _sub(SelfTrainingConfig)


@dataclass(frozen=True)
class OptimConfig:
    name: str = _f("adamw", choices=("adamw", "sgd"))
    lr: float = _f(6e-5, gt=0.0)
    head_lr_mult: float = _f(10.0, gt=0.0)
    weight_decay: float = _f(0.01, ge=0.0)
    momentum: float = _f(0.9, ge=0.0, lt=1.0, doc="SGD only")
    warmup_iters: int = _f(1500, ge=0)
    warmup_ratio: float = _f(1e-6, ge=0.0, le=1.0, doc="learning-rate factor at iteration 0 of the warm-up")
    poly_power: float = _f(1.0, ge=0.0)
    poly_iters: int = _f(0, ge=0, doc="length T of the poly schedule (1 - t/T)^power; 0 = run.iterations (ADVENT "
                         "decays over 250000 iterations and stops at 120000)")
    grad_clip: float = _f(0.0, ge=0.0, doc="max gradient norm; 0 = off")
    norm_decay: bool = _f(False, doc="weight decay on normalisation parameters and position embeddings too (the "
                          "DeepLab-family code's SGD over every parameter); false = none on them (DAFormer)")


@dataclass(frozen=True)
class EvalConfig:
    model: str = _f("student", choices=("student", "ema"),
                    doc="the network evaluated (and saved for uda-ray evaluate): the student, or an EMA copy of it "
                    "updated every iteration with eval.ema_alpha (EHTDI evaluates a 0.999 EMA of its network)")
    ema_alpha: float = _f(0.999, ge=0.0, lt=1.0, doc="eval.model ema: alpha_t = min(1 - 1/(t+1), ema_alpha), the "
                          "teacher's EMA rule (uda_ray.models.ema)")
    holdout: bool = _f(False, doc="split the target val split (by city for Cityscapes; by image, seeded, when every "
                       "val image is in one city, as on the built-in synthetic pair) into a selection half (val/*: "
                       "what ASHA, Optuna and the best trial see) and a report half (holdout/*: what retrain and the "
                       "final tables report); off by default, for comparability with papers")
    holdout_seed: int = _f(0, ge=0, doc="seed of the cut; the same for every trial of a search (not run.seed)")
    mode: str = _f("whole", choices=("whole", "slide"), doc="whole: one pass over the val image at data.val_resize; "
                   "slide: windows of eval.crop every eval.stride over it, logits averaged over overlaps (HRDA/MIC "
                   "test protocol: 1024x1024 windows, stride 512, on 1024x2048 images)")
    crop: tuple[int, int] = _f((512, 512), ge=1, doc="slide: (height, width) of a window")
    stride: tuple[int, int] = _f((341, 341), ge=1, doc="slide: (height, width) step between windows")
    batch_windows: int = _f(0, ge=0, doc="slide: windows per forward pass; 0 = all windows of a batch at once")


@dataclass(frozen=True)
class RunConfig:
    iterations: int = _f(40000, ge=1)
    eval_every: int = _f(4000, ge=1)
    checkpoint_every: int = _f(4000, ge=1, doc="also written at every evaluation: each reported score has its model")
    log_every: int = _f(50, ge=1)
    seed: int = _f(0, ge=0)
    device: str = _f("auto", choices=("auto", "cpu", "cuda"))
    precision: str = _f("fp32", choices=("fp32", "bf16"), doc="bf16 = torch.autocast with bfloat16")
    output_dir: str = _f("results")
    name: str = _f("", doc="run folder name under output_dir; empty = derived from the config file and time")
    threads: int = _f(0, ge=0, doc="torch intra-op threads; 0 = torch's default (all cores): set it on a machine "
                      "shared with other jobs, e.g. run.threads=4")
    save_images: bool = _f(True, doc="a PNG grid of val images, ground truth, predictions and the teacher's "
                           "pseudo-labels at every evaluation (images/iter_<k>.png beside the checkpoints)")
    image_count: int = _f(4, ge=1, doc="val images and target-train images in each prediction grid")


@dataclass(frozen=True)
class Config:
    data: DataConfig = _sub(DataConfig)
    model: ModelConfig = _sub(ModelConfig)
    teacher: TeacherConfig = _sub(TeacherConfig)
    mix: MixConfig = _sub(MixConfig)
    loss: LossConfig = _sub(LossConfig)
    optim: OptimConfig = _sub(OptimConfig)
    eval: EvalConfig = _sub(EvalConfig)
    run: RunConfig = _sub(RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "<dict>") -> Config:
        return from_dict(d, source=source)


# ----------------------------------------------------------------------------------------------- conversion
@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """A config class's field types (read-only: cached, the classes never change). Evaluating the string
    annotations anew on every ``from_dict`` was most of its time."""
    return typing.get_type_hints(cls)


def to_dict(obj: Any) -> dict[str, Any]:
    """Nested plain dict (tuples become lists) that ``from_dict`` turns back into an equal config."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            out[f.name] = to_dict(v)
        elif isinstance(v, tuple):
            out[f.name] = list(v)
        else:
            out[f.name] = v
    return out


def flatten(cfg: Config) -> dict[str, Any]:
    """``{dotted key: value}`` for every leaf field; tuples stay tuples."""
    out: dict[str, Any] = {}

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                walk(v, f"{prefix}{f.name}.")
            else:
                out[f"{prefix}{f.name}"] = v

    walk(cfg, "")
    return out


def all_keys() -> list[str]:
    return list(flatten(Config()))


def _closest(key: str, candidates: list[str]) -> str:
    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.0)
    return f" (closest valid key: '{match[0]}')" if match else ""


def _describe(meta: dict[str, Any]) -> str:
    if "choices" in meta:
        return "one of " + ", ".join(repr(c) for c in meta["choices"])
    lo = f"> {meta['gt']}" if "gt" in meta else (f">= {meta['ge']}" if "ge" in meta else "")
    hi = f"< {meta['lt']}" if "lt" in meta else (f"<= {meta['le']}" if "le" in meta else "")
    return " and ".join(p for p in (lo, hi) if p) or "any value"


def _check_range(value: Any, meta: dict[str, Any]) -> bool:
    if "choices" in meta:
        return value in meta["choices"]
    if isinstance(value, float) and not math.isfinite(value):
        return False
    return not (("ge" in meta and value < meta["ge"]) or ("gt" in meta and value <= meta["gt"])
                or ("le" in meta and value > meta["le"]) or ("lt" in meta and value >= meta["lt"]))


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it in canonical form."""

    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{source}: key '{key}' = {value!r}: expected {expected}")

    origin = typing.get_origin(tp)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise bad(f"a list of {'any number of' if args[-1] is Ellipsis else len(args)} integers")
        if args[-1] is not Ellipsis and len(value) != len(args):
            raise bad(f"a list of {len(args)} values")
        return tuple(_coerce(v, args[0], key, source) for v in value)
    raise TypeError(f"unsupported annotation {tp} for {key}")


def from_dict(d: dict[str, Any], *, source: str = "<dict>", cls: type = Config, prefix: str = "") -> Any:
    """Build a (sub)config from a nested dict; unknown keys, wrong types and out-of-range values raise."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {d!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in d.items():
        key = f"{prefix}{name}"
        if name not in fields:
            raise ConfigError(f"{source}: unknown key '{key}'{_closest(key, all_keys())}")
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(value, source=source, cls=tp, prefix=f"{key}.")
            continue
        v = _coerce(value, tp, key, source)
        meta = dict(fields[name].metadata)
        items = v if isinstance(v, tuple) else (v,)
        if not all(_check_range(x, meta) for x in items):
            raise ConfigError(f"{source}: key '{key}' = {value!r} is out of range: expected {_describe(meta)}")
        kwargs[name] = v
    obj = cls(**kwargs)
    if cls is Config:
        _check_cross(obj, source)
    return obj


def _check_cross(cfg: Config, source: str) -> None:
    """Constraints that involve more than one field."""
    d = cfg.data
    if (d.target_crop[0] == 0) != (d.target_crop[1] == 0):
        raise ConfigError(f"{source}: key 'data.target_crop' = {list(d.target_crop)}: expected (0, 0) (= data.crop) "
                          "or a positive (height, width)")
    for name, key in (("source_resize", "crop"), ("target_resize", "target_crop" if d.target_crop[0] else "crop")):
        size, crop = getattr(d, name), getattr(d, key)
        if crop[0] > size[0] or crop[1] > size[1]:
            raise ConfigError(f"{source}: key 'data.{key}' = {list(crop)} is larger than 'data.{name}' = "
                              f"{list(size)}: the crop must fit inside the resized image")
    if d.target_crop[0] and tuple(d.target_crop) != tuple(d.crop):
        mixing = {"loss.mix_weight": cfg.loss.mix_weight > 0,
                  "mix.target_to_source.enabled": cfg.mix.target_to_source.enabled}
        on = [k for k, v in mixing.items() if v]
        if on:
            raise ConfigError(f"{source}: key 'data.target_crop' = {list(d.target_crop)} differs from 'data.crop' = "
                              f"{list(d.crop)}, but {', '.join(on)} mixes source and target pixels, which needs "
                              "one size: set the crops equal or switch the mixing off")
    if (cfg.loss.self_training.weight > 0) != bool(d.target_pseudo_labels):
        raise ConfigError(f"{source}: key 'loss.self_training.weight' = {cfg.loss.self_training.weight} and "
                          f"'data.target_pseudo_labels' = {d.target_pseudo_labels!r}: self-training needs both (the "
                          "offline labels and a weight > 0), or neither")
    _check_teacher_kind(cfg, source)
    _check_augmentation(cfg, source)
    if cfg.loss.entropy.aux_weight > 0 and cfg.model.aux_weight == 0:
        raise ConfigError(f"{source}: key 'loss.entropy.aux_weight' = {cfg.loss.entropy.aux_weight} needs the "
                          "auxiliary classifier: set model.aux_weight > 0 (model.decoder: deeplabv2)")
    if cfg.model.align_corners and cfg.model.hrda.enabled:
        raise ConfigError(f"{source}: key 'model.align_corners' = true with model.hrda.enabled: HRDA's fusion and "
                          "windows resize with align_corners False (mmseg); set model.align_corners = false")
    _check_hrda(cfg, source)
    _check_fd(cfg, source)
    _check_margins(cfg, source)
    e = cfg.eval
    if e.mode == "slide":
        if e.crop[0] > d.val_resize[0] or e.crop[1] > d.val_resize[1]:
            raise ConfigError(f"{source}: key 'eval.crop' = {list(e.crop)} is larger than 'data.val_resize' = "
                              f"{list(d.val_resize)}: a window must fit inside the val image")
        if e.stride[0] > e.crop[0] or e.stride[1] > e.crop[1]:
            raise ConfigError(f"{source}: key 'eval.stride' = {list(e.stride)} is larger than 'eval.crop' = "
                              f"{list(e.crop)}: windows would leave pixels uncovered")
    if cfg.mix.blur_sigma_min > cfg.mix.blur_sigma_max:
        raise ConfigError(f"{source}: key 'mix.blur_sigma_min' = {cfg.mix.blur_sigma_min} exceeds "
                          f"'mix.blur_sigma_max' = {cfg.mix.blur_sigma_max}")
    from uda_ray.models.segmenter import check_model_names  # torch, timm for timm names: when checked

    m = cfg.model
    try:
        check_model_names(m.backbone, m.decoder, m.input_norm, m.pretrained, aux_weight=m.aux_weight,
                          fuse_channels=m.fuse_channels)
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None
    for side in ("source", "target"):
        if getattr(d, side) != "synthetic" and not getattr(d, f"{side}_root"):
            raise ConfigError(f"{source}: key 'data.{side}_root' is empty but 'data.{side}' = "
                              f"{getattr(d, side)!r} needs the dataset folder")


def _check_augmentation(cfg: Config, source: str) -> None:
    """Ranges of the augmentation keys that involve two values, and one source sampler at a time."""
    d = cfg.data
    for side in ("source", "target"):
        lo, hi = getattr(d, f"{side}_scale_min"), getattr(d, f"{side}_scale_max")
        if lo > hi:
            raise ConfigError(f"{source}: key 'data.{side}_scale_min' = {lo} exceeds 'data.{side}_scale_max' = {hi}")
        p, key = getattr(d, f"{side}_photometric"), f"data.{side}_photometric"
        if p.blur_kernel % 2 == 0:
            raise ConfigError(f"{source}: key '{key}.blur_kernel' = {p.blur_kernel}: expected an odd kernel size")
        if p.blur_sigma_min > p.blur_sigma_max:
            raise ConfigError(f"{source}: key '{key}.blur_sigma_min' = {p.blur_sigma_min} exceeds "
                              f"'{key}.blur_sigma_max' = {p.blur_sigma_max}")
        if p.blur_sigma_min == 0 and p.blur_kind == "torchvision":
            raise ConfigError(f"{source}: key '{key}.blur_sigma_min' = 0: torchvision's blur needs sigma > 0 (0 is "
                              "allowed with blur_kind 'pil', PixMatch's radius)")
    if d.class_balanced and d.rcs.enabled:
        raise ConfigError(f"{source}: keys 'data.class_balanced' and 'data.rcs.enabled' are both true: they are two "
                          "source samplers (SDCA's and DAFormer's): choose one")
    if d.class_balanced_draws and not d.class_balanced:
        raise ConfigError(f"{source}: key 'data.class_balanced_draws' = {d.class_balanced_draws} sizes SDCA's "
                          "class-balanced list: set data.class_balanced = true, or 0")


def _check_teacher_kind(cfg: Config, source: str) -> None:
    """teacher.kind = nearest_centroid labels CFContra's target pixels and nothing else."""
    if cfg.teacher.kind != "nearest_centroid":
        return
    lo = cfg.loss
    if lo.cfcontra.weight == 0:
        raise ConfigError(f"{source}: key 'teacher.kind' = 'nearest_centroid' labels the target pixels of CFContra's "
                          "contrast by the nearest source-bank centroid: set loss.cfcontra.weight > 0")
    users = {"loss.mix_weight": lo.mix_weight, "loss.sdca.weight_feat": lo.sdca.weight_feat,
             "loss.sdca.weight_out": lo.sdca.weight_out, "loss.cross_view.pixel_weight": lo.cross_view.pixel_weight,
             "loss.cross_view.proto_weight": lo.cross_view.proto_weight, "loss.mic.weight": lo.mic.weight,
             "mix.target_to_source.enabled": cfg.mix.target_to_source.enabled}
    on = [k for k, v in users.items() if v]
    if on:
        raise ConfigError(f"{source}: key 'teacher.kind' = 'nearest_centroid' serves CFContra only, but "
                          f"{', '.join(on)} use the EMA teacher's pseudo-labels: set teacher.kind = 'ema' or switch "
                          "them off (0 / false)")


def _check_fd(cfg: Config, source: str) -> None:
    """FD keeps features close to the ImageNet-pretrained backbone: without those weights it silently means
    something else (closeness to a random network), so that takes an explicit opt-in."""
    fd, m = cfg.loss.fd, cfg.model
    if fd.weight > 0 and not (m.pretrained or m.pretrained_path) and not fd.without_pretrained:
        raise ConfigError(f"{source}: key 'loss.fd.weight' = {fd.weight} keeps features close to the ImageNet-"
                          "pretrained backbone, but neither 'model.pretrained_path' nor 'model.pretrained' loads "
                          "ImageNet weights: FD would pull towards a frozen copy of a randomly initialised network. "
                          "Set model.pretrained_path (DAFormer: pretrained/mit_b5.pth), or loss.fd.weight=0, or "
                          "loss.fd.without_pretrained=true to run it so anyway (toy runs)")


def _check_margins(cfg: Config, source: str) -> None:
    """The pseudo-label margins leave something of what they apply to: teacher.ignore_top/bottom count rows of the
    target crop; data.target_pseudo_margins pixels of the target image as loaded (known here for the synthetic
    pair, whose images are data.synthetic.height x width)."""
    d, t = cfg.data, cfg.teacher
    key, crop = ("data.target_crop", d.target_crop) if d.target_crop[0] else ("data.crop", d.crop)
    if t.ignore_top + t.ignore_bottom >= crop[0]:
        raise ConfigError(f"{source}: keys 'teacher.ignore_top' = {t.ignore_top} and 'teacher.ignore_bottom' = "
                          f"{t.ignore_bottom} leave none of the {crop[0]} rows of the target crop '{key}' = "
                          f"{list(crop)}: the margins count rows of the crop (DAFormer: 15 and 120 of 512); for "
                          "margins of the whole image use data.target_pseudo_margins")
    top, bottom, left, right = d.target_pseudo_margins
    if d.target == "synthetic" and any(d.target_pseudo_margins):
        h, w = d.synthetic.height, d.synthetic.width
        if top + bottom >= h or left + right >= w:
            raise ConfigError(f"{source}: key 'data.target_pseudo_margins' = {list(d.target_pseudo_margins)} "
                              f"(top, bottom, left, right) leaves nothing of the synthetic target images as loaded, "
                              f"'data.synthetic.height' x 'data.synthetic.width' = {h} x {w}")


def _check_hrda(cfg: Config, source: str) -> None:
    h, d = cfg.model.hrda, cfg.data
    if cfg.loss.cluda.multires and not h.enabled:
        raise ConfigError(f"{source}: key 'loss.cluda.multires' = true needs HRDA's context and detail passes: set "
                          "model.hrda.enabled = true")
    if cfg.loss.cluda.entropy_crop_after and not h.enabled:
        raise ConfigError(f"{source}: key 'loss.cluda.entropy_crop_after' = {cfg.loss.cluda.entropy_crop_after} "
                          "chooses HRDA's detail window: set model.hrda.enabled = true (or 0 = off)")
    if not h.enabled:
        return
    crops = {"data.crop": d.crop, "data.target_crop": d.target_crop if d.target_crop[0] else d.crop}
    for key, crop in crops.items():
        if h.detail_crop > min(crop):
            raise ConfigError(f"{source}: key 'model.hrda.detail_crop' = {h.detail_crop} is larger than '{key}' = "
                              f"{list(crop)}: the detail window must fit inside the training crop")
        if crop[0] % 8 or crop[1] % 8:
            raise ConfigError(f"{source}: key '{key}' = {list(crop)}: HRDA needs sides divisible by 8")
    from uda_ray.models.hrda import check_hrda_settings  # torch: imported only when a config is checked

    try:
        check_hrda_settings(cfg.model.decoder, detail_crop=h.detail_crop, detail_stride=h.detail_window_stride,
                            context_scale=h.context_scale, detail_loss_weight=h.detail_loss_weight)
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None
    size, key = (cfg.eval.crop, "eval.crop") if cfg.eval.mode == "slide" else (d.val_resize, "data.val_resize")
    if size[0] % 8 or size[1] % 8:
        raise ConfigError(f"{source}: key '{key}' = {list(size)}: HRDA's inference needs sides divisible by 8")


# ------------------------------------------------------------------------------------------------- overrides
def _nested_set(d: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = d
    for p in parts[:-1]:
        nxt = node.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            node[p] = nxt
        node = nxt
    node[parts[-1]] = value


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def field_type(key: str) -> Any:
    """The annotation of a dotted key; raises ConfigError for unknown keys."""
    cls: Any = Config
    parts = key.split(".")
    for i, p in enumerate(parts):
        hints = _hints(cls) if dataclasses.is_dataclass(cls) else {}
        if p not in hints:
            raise ConfigError(f"unknown key '{key}'{_closest(key, all_keys())}")
        cls = hints[p]
        if i < len(parts) - 1 and not dataclasses.is_dataclass(cls):
            raise ConfigError(f"unknown key '{key}'{_closest(key, all_keys())}")
    if dataclasses.is_dataclass(cls):
        raise ConfigError(f"key '{key}' is a section, not a value{_closest(key, all_keys())}")
    return cls


def parse_override(text: str) -> tuple[str, Any]:
    """``'loss.cluda.temperature=0.1'`` → ``('loss.cluda.temperature', 0.1)``, typed by the field."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    tp = field_type(key)
    if tp is str:
        return key, raw
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: cannot parse value {raw!r}: {e}") from e
    return key, value


def apply_overrides(cfg: Config, overrides: dict[str, Any] | list[str], *, source: str = "overrides") -> Config:
    """A new config with dotted overrides applied (a dict of typed values or a list of ``key=value`` strings)."""
    if isinstance(overrides, (list, tuple)):
        overrides = dict(parse_override(o) for o in overrides)
    d = to_dict(cfg)
    for key, value in overrides.items():
        field_type(key)  # unknown keys fail here with the closest valid key
        _nested_set(d, key, value)
    return from_dict(d, source=source)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config sections, got {type(data).__name__}")
    return data


def load_dict(path: str | Path) -> dict[str, Any]:
    """The nested dict of a config YAML with its ``base:`` file merged under it (one level)."""
    path = Path(path)
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: key 'base' must be a file path, got {base!r}")
    base_path = (path.parent / base).resolve()
    base_data = _read_yaml(base_path)
    if "base" in base_data:
        raise ConfigError(f"{base_path}: a base config may not name another base (only one level is allowed)")
    from_dict(base_data, source=str(base_path))  # errors in the base name the base file
    return _deep_merge(base_data, data)


def load_config(path: str | Path, overrides: dict[str, Any] | list[str] | None = None) -> Config:
    """Load a run config YAML (with its optional ``base:``) and apply dotted overrides."""
    cfg = from_dict(load_dict(path), source=str(path))
    return apply_overrides(cfg, overrides, source=f"{path} (overrides)") if overrides else cfg


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
