"""The seeds' published runs as shipped chains (search_spaces/chains/): SDCA's five stages (source-only → class
statistics → SDCA → offline pseudo-labels → self-training), CFContra's MinEnt → centroids → CFContra and EHTDI's
source-only → EHTDI, on GTA5 and SYNTHIA.

Each stage's resolved config is compared key by key with a table written here from the official scripts and configs,
as (official key, official value, our key, our value) rows checked by the paper-config test's ``_check`` (the single
stages reuse its tables: ``SDCA``, ``CFCONTRA``, ``ADVENT_MINENT``, ``TARGET_MIX``); the chain's structure (stages,
kinds, inputs, checkpoints, options) is the official sequence of commands; each header's commented variant (a released
file as a checkpoint stage) loads. At toy size (the synthetic pair, 32×64 images, ResNet-101's widths at depth 1 per
stage, one iteration per train stage) each GTA5 chain runs end to end in-process, and one of its stages, killed after
the first of its two iterations, resumes exactly: the same models, metrics and later outputs as an uninterrupted run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import yaml

from tests.conftest import ROOT
from tests.tune.test_tune_paper_configs import (
    ADVENT_MINENT,
    CFCONTRA,
    SDCA,
    SDCA_SYNTHIA,
    TARGET_MIX,
    TARGET_MIX_SYNTHIA,
    _check,
)
from uda_ray.stages import Chain, load_chain
from uda_ray.stages.run import ChainRun
from uda_ray.train.checkpoint import load_checkpoint
from uda_ray.train.loop import fit

CHAINS = ROOT / "search_spaces" / "chains"
TV_WEIGHTS = "https://download.pytorch.org/models/resnet101-5d3b4d8f.pth"

# ------------------------------------------------------------------------------------------------------- SDCA
# BIT-DA/SDCA train_with_ssl.sh "ResNet-101 GTA5 -> cityscapes": train_src.py with configs/deeplabv2_r101_src.yaml
# SOLVER.LAMBDA_LOV 0.75 SOLVER.BATCH_SIZE 8, on core/configs/defaults.py; core/datasets/build.py, test.py
SDCA_SOURCE = [
    ("MODEL.NAME deeplab_resnet101 + FREEZE_BN True (torchvision ResNet-101, FrozenBatchNorm2d)", "deeplab_resnet101",
     "model.backbone", "deeplabv2_tv_r101"),
    ("build_classifier: ASPP_Classifier_V2(2048, [6, 12, 18, 24])", "ASPP_Classifier_V2", "model.decoder",
     "deeplabv2"),
    ("one classifier", 0.0, "model.aux_weight", 0.0),
    ("INPUT.PIXEL_MEAN / PIXEL_STD (ImageNet, RGB)", ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
     "model.input_norm", "imagenet"),
    ("MODEL.WEIGHTS", TV_WEIGHTS, "model.pretrained_path", "pretrained_models/resnet101-5d3b4d8f.pth"),
    ("train_with_ssl.sh: no resume (torchvision's ImageNet weights)", "", "model.init_from", ""),
    ("classifier(feature_extractor(x), size): F.interpolate(align_corners=True)", True, "model.align_corners", True),
    ("ce_criterion weight 1", 1.0, "loss.source_weight", 1.0),
    ("train_with_ssl.sh SOLVER.LAMBDA_LOV", 0.75, "loss.lovasz.weight", 0.75),
    ("train_src.py: source only, no contrast", 0.0, "loss.sdca.weight_feat", 0.0),
    ("train_src.py: source only, no contrast", 0.0, "loss.sdca.weight_out", 0.0),
    ("train_src.py: no mixing", 0.0, "loss.mix_weight", 0.0),
    ("train_src.py: no entropy term", 0.0, "loss.entropy.weight", 0.0),
    ("DATASETS.SOURCE_TRAIN gtav_train (gtav_train_list.txt, every frame)", "gtav_train", "data.source", "gta5"),
    ("DatasetCatalog gtav_train: datasets/gtav (ADVENT's layout here)", "datasets/gtav", "data.source_root",
     "data/GTA5"),
    ("INPUT.SOURCE_INPUT_SIZE_TRAIN (w, h)", (1280, 720), "data.source_resize", (720, 1280)),
    ("INPUT_SCALES_TRAIN (1.0, 1.0): Resize, no crop", (1280, 720), "data.crop", (720, 1280)),
    ("transform.Resize to (h, w) exactly", False, "data.keep_ratio", False),
    ("INPUT.HORIZONTAL_FLIP_PROB_TRAIN (defaults.py)", 0.0, "data.flip", False),
    ("train_with_ssl.sh SOLVER.BATCH_SIZE 8: 2 source images on each of 4 GPUs", 8, "data.batch_size", 8),
    ("gtav.py with max_iters: FADA's class-balanced list (gtav_label_info.p)", True, "data.class_balanced", True),
    ("build_dataset: max_iters = SOLVER.MAX_ITER * SOLVER.BATCH_SIZE", 31250 * 8, "data.class_balanced_draws",
     250000),
    ("deeplabv2_r101_src.yaml sets no INPUT.BRIGHTNESS: no ColorJitter", 0.0, "data.source_photometric.brightness",
     0.0),
    ("no ColorJitter", 0.0, "data.source_photometric.contrast", 0.0),
    ("no ColorJitter", 0.0, "data.source_photometric.saturation", 0.0),
    ("no ColorJitter", 0.0, "data.source_photometric.hue", 0.0),
    ("INPUT.GRAYSCALE 0.0 (defaults.py)", 0.0, "data.source_photometric.grayscale_prob", 0.0),
    ("INPUT.GAUSSIANBLUR False (defaults.py)", False, "data.source_photometric.blur_prob", 0.0),
    ("DataLoader num_workers", 4, "data.loader_workers", 4),
    ("DATASETS.TEST cityscapes_val", "cityscapes_val", "data.target", "cityscapes"),
    ("DatasetCatalog cityscapes_val: datasets/cityscapes", "datasets/cityscapes", "data.target_root",
     "data/Cityscapes"),
    ("INPUT.INPUT_SIZE_TEST (w, h)", (1024, 512), "data.val_resize", (512, 1024)),
    ("MODEL.NUM_CLASSES", 19, "data.protocol", 19),
    ("torch.optim.SGD", "SGD", "optim.name", "sgd"),
    ("SOLVER.BASE_LR", 5e-4, "optim.lr", 5e-4),
    ("SOLVER.MOMENTUM", 0.9, "optim.momentum", 0.9),
    ("SOLVER.WEIGHT_DECAY", 0.0005, "optim.weight_decay", 0.0005),
    ("SGD(feature_extractor.parameters()): weight decay on every parameter", True, "optim.norm_decay", True),
    ("optimizer_cls: BASE_LR * 10", 10, "optim.head_lr_mult", 10.0),
    ("no warm-up", 0, "optim.warmup_iters", 0),
    ("SOLVER.LR_POWER", 0.9, "optim.poly_power", 0.9),
    ("SOLVER.MAX_ITER (the poly schedule's length)", 31250, "optim.poly_iters", 31250),
    ("SOLVER.STOP_ITER", 20000, "run.iterations", 20000),
    ("SOLVER.CHECKPOINT_PERIOD (test.py scores each, keeps model_best.pth)", 1000, "run.eval_every", 1000),
    ("SOLVER.CHECKPOINT_PERIOD", 1000, "run.checkpoint_every", 1000),
    ("no clipping", 0.0, "optim.grad_clip", 0.0),
]
# semantic_dist_init.py on the source model_best.pth: build_dataset(mode='train', is_source=True, epochwise=True)
# with the source-only config (Resize to 1280×720, no flip), eval mode, batch 1 (SOLVER.BATCH_SIZE_VAL)
SDCA_STATS = [
    ("deeplabv2_r101_src.yaml: the source model's network", "deeplab_resnet101", "model.backbone",
     "deeplabv2_tv_r101"),
    ("DATASETS.SOURCE_TRAIN gtav_train", "gtav_train", "data.source", "gta5"),
    ("INPUT.SOURCE_INPUT_SIZE_TRAIN (w, h): transform.Resize", (1280, 720), "data.source_resize", (720, 1280)),
    ("transform.Resize to (h, w) exactly", False, "data.keep_ratio", False),
]
# the SDCA stage: train_sdca.py with configs/deeplabv2_r101_sdca.yaml (SDCA, the base file's table), plus what
# train_with_ssl.sh passes: resume results/r101_g2c_src/model_best.pth, CV_DIR results/r101_g2c_src/
SDCA_INPUTS = [
    ("resume results/r101_g2c_src/model_best.pth (weights only, iteration 0)", "model_best.pth", "model.init_from",
     "stage://source/best.pt"),
    ("resume: its feature_extractor and classifier", "model", "model.init_weights", "model"),
    ("CV_DIR results/r101_g2c_src/ (feat_dist.pth, out_dist.pth)", "results/r101_g2c_src/", "loss.sdca.init_stats",
     "stage://stats"),
]
# pseudo_label.py with configs/deeplabv2_r101_sdca.yaml DATASETS.TEST cityscapes_train on the SDCA model_best.pth:
# build_dataset(mode='test'): Resize to INPUT.INPUT_SIZE_TEST, label at full size; no flip
SDCA_LABELS = [
    ("deeplabv2_r101_sdca.yaml: the SDCA model's network", "deeplab_resnet101", "model.backbone", "deeplabv2_tv_r101"),
    ("DATASETS.TEST cityscapes_train (DatasetCatalog: datasets/cityscapes)", "cityscapes_train", "data.target",
     "cityscapes"),
    ("INPUT.INPUT_SIZE_TEST (w, h)", (1024, 512), "data.val_resize", (512, 1024)),
    ("inference(..., flip=False): one pass over the whole image", "whole", "eval.mode", "whole"),
    ("MODEL.NUM_CLASSES", 19, "data.protocol", 19),
]
# train_ssl.py with configs/deeplabv2_r101_ssl.yaml PREPARE_DIR results/r101_g2c_ours/ SOLVER.BATCH_SIZE 8
SDCA_SSL = [
    ("MODEL.NAME deeplab_resnet101 + FREEZE_BN False (BatchNorm2d)", "deeplab_resnet101", "model.backbone",
     "deeplabv2_tv_r101_bn"),
    ("train_ssl.py: convert_sync_batchnorm when BatchNorm is not frozen", True, "model.sync_bn", True),
    ("build_classifier: ASPP_Classifier_V2(2048, [6, 12, 18, 24])", "ASPP_Classifier_V2", "model.decoder",
     "deeplabv2"),
    ("one classifier", 0.0, "model.aux_weight", 0.0),
    ("INPUT.PIXEL_MEAN / PIXEL_STD (ImageNet, RGB)", ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
     "model.input_norm", "imagenet"),
    ("MODEL.WEIGHTS", TV_WEIGHTS, "model.pretrained_path", "pretrained_models/resnet101-5d3b4d8f.pth"),
    ("train_with_ssl.sh: no resume (from torchvision's ImageNet weights, not an earlier stage)", "",
     "model.init_from", ""),
    ("classifier(feature_extractor(x), size): F.interpolate(align_corners=True)", True, "model.align_corners", True),
    ("DATASETS.SOURCE_TRAIN cityscapes_train_soft: Cityscapes train images", "cityscapes_train_soft", "data.target",
     "cityscapes"),
    ("PREPARE_DIR results/r101_g2c_ours/ (soft_labels/cityscapes_train)", "results/r101_g2c_ours/",
     "data.target_pseudo_labels", "stage://labels"),
    ("ce_criterion on the pseudo-labels, weight 1", 1.0, "loss.self_training.weight", 1.0),
    ("no other supervision (no GTA5)", 0.0, "loss.source_weight", 0.0),
    ("CE only", 0.0, "loss.lovasz.weight", 0.0),
    ("CE only", 0.0, "loss.sdca.weight_feat", 0.0),
    ("CE only", 0.0, "loss.sdca.weight_out", 0.0),
    ("CE only", 0.0, "loss.mix_weight", 0.0),
    ("RandomScale of the image at its own size (2048×1024)", (2048, 1024), "data.target_resize", (1024, 2048)),
    ("INPUT.SOURCE_INPUT_SIZE_TRAIN (w, h): RandomCrop((h, w))", (1024, 512), "data.target_crop", (512, 1024)),
    ("INPUT.HORIZONTAL_FLIP_PROB_TRAIN", 0.5, "data.flip", True),
    ("INPUT.INPUT_SCALES_TRAIN (0.5, 1.5): RandomScale", 0.5, "data.target_scale_min", 0.5),
    ("INPUT.INPUT_SCALES_TRAIN (0.5, 1.5): RandomScale", 1.5, "data.target_scale_max", 1.5),
    ("INPUT.BRIGHTNESS (build_transform(is_source=True): ColorJitter)", 0.5, "data.target_photometric.brightness",
     0.5),
    ("INPUT.CONTRAST", 0.5, "data.target_photometric.contrast", 0.5),
    ("INPUT.SATURATION", 0.5, "data.target_photometric.saturation", 0.5),
    ("INPUT.HUE", 0.2, "data.target_photometric.hue", 0.2),
    ("ColorJitter always (INPUT.RANDOMAPPLY is never read)", 1.0, "data.target_photometric.jitter_prob", 1.0),
    ("INPUT.GRAYSCALE", 0.2, "data.target_photometric.grayscale_prob", 0.2),
    ("INPUT.GAUSSIANBLUR: on every image", True, "data.target_photometric.blur_prob", 1.0),
    ("GaussianBlur: torchvision's F.gaussian_blur", "torchvision", "data.target_photometric.blur_kind",
     "torchvision"),
    ("GaussianBlur(kernel_size=[3, 3])", 3, "data.target_photometric.blur_kernel", 3),
    ("GaussianBlur sigma=(0.1, 2.0)", 0.1, "data.target_photometric.blur_sigma_min", 0.1),
    ("GaussianBlur sigma=(0.1, 2.0)", 2.0, "data.target_photometric.blur_sigma_max", 2.0),
    ("no GTA5: no class-balanced source list", False, "data.class_balanced", False),
    ("SOLVER.BATCH_SIZE 8: 2 images on each of 4 GPUs", 8, "data.batch_size", 8),
    ("DataLoader num_workers", 4, "data.loader_workers", 4),
    ("INPUT.INPUT_SIZE_TEST (w, h)", (1024, 512), "data.val_resize", (512, 1024)),
    ("MODEL.NUM_CLASSES", 19, "data.protocol", 19),
    ("torch.optim.SGD", "SGD", "optim.name", "sgd"),
    ("SOLVER.BASE_LR", 5e-4, "optim.lr", 5e-4),
    ("SOLVER.MOMENTUM", 0.9, "optim.momentum", 0.9),
    ("SOLVER.WEIGHT_DECAY", 0.0005, "optim.weight_decay", 0.0005),
    ("SGD(feature_extractor.parameters()): weight decay on every parameter, BatchNorm's too", True,
     "optim.norm_decay", True),
    ("optimizer_cls: BASE_LR * 10", 10, "optim.head_lr_mult", 10.0),
    ("no warm-up", 0, "optim.warmup_iters", 0),
    ("SOLVER.LR_POWER", 0.9, "optim.poly_power", 0.9),
    ("SOLVER.MAX_ITER (the poly schedule's length)", 31250, "optim.poly_iters", 31250),
    ("SOLVER.STOP_ITER", 20000, "run.iterations", 20000),
    ("SOLVER.CHECKPOINT_PERIOD (test.py reports the best)", 1000, "run.eval_every", 1000),
    ("SOLVER.CHECKPOINT_PERIOD", 1000, "run.checkpoint_every", 1000),
]
# train_with_ssl.sh "ResNet-101 SYNTHIA -> cityscapes": the *_synthia.yaml configs change the source and the classes
SYNTHIA = {ours: value for _, _, ours, value in SDCA_SYNTHIA}
SDCA_STRUCTURE = [  # (stage, kind, inputs as (stage, checkpoint, weights), options)
    ("source", "train", {}, {}),
    ("stats", "class_stats", {"model": ("source", "best", "model")}, {}),
    ("sdca", "train", {"init": ("source", "best", "model"), "class_stats": ("stats", "last", "model")}, {}),
    ("labels", "pseudo_labels", {"model": ("sdca", "best", "model")}, {"cap": 0.9}),
    ("self_train", "train", {"target_labels": ("labels", "last", "model")}, {}),
]

# --------------------------------------------------------------------------------------------------- CFContra
# shiyutang/Coarse-to-fine-UDA: a MinEnt model (ADVENT's minent.yml: the deeplabv2_gta2cs.yaml table), then
# calculate_src_center / calculate_tgt_center (train_UDA.py) on it with the CFContra config.py's loaders
MINENT_STAGE = [("ADVENT interp: nn.Upsample(..., align_corners=True)", True, "model.align_corners", True)]
CENTROIDS = [
    ("the MinEnt model's network (advent/model/deeplabv2.py)", "DeepLabv2", "model.backbone", "deeplabv2_r101"),
    ("config.py TRAIN.INPUT_SIZE_SOURCE (w, h): the source loader's resize", (1280, 640), "data.source_resize",
     (640, 1280)),
    ("config.py TRAIN.INPUT_SIZE_TARGET (w, h): the target loader's resize", (1280, 640), "data.target_resize",
     (640, 1280)),
    ("base_dataset.py resizes to the size exactly", False, "data.keep_ratio", False),
    ("TRAIN.SET_SOURCE all: every GTA5 frame", "all", "data.source", "gta5"),
    ("TRAIN.SET_TARGET train: Cityscapes train", "train", "data.target", "cityscapes"),
]
CFCONTRA_INPUTS = [
    ("minent.yml TRAIN.RESTORE_FROM: the DeepLab ImageNet init, not the MinEnt model", "", "model.init_from", ""),
    ("src_memory.features = src_center; tgt_memory.features = tgt_center", "src/tgt_center_minent_20.pkl",
     "loss.cfcontra.init_centroids", "stage://centroids"),
]
CFCONTRA_STRUCTURE = [
    ("minent", "train", {}, {}),
    ("centroids", "centroids", {"model": ("minent", "best", "model")},
     # `if i == 300: break` / `if i == 1600: break` after the image; TRAIN.cluster_threshold; the network as
     # train.py hands it to train_minent (built in train mode, nothing calls eval())
     {"source_batches": 301, "target_batches": 1601, "margin": 0.05, "train_mode": True}),
    ("cfcontra", "train", {"centroids": ("centroids", "last", "model")}, {}),
]

# ------------------------------------------------------------------------------------------------------ EHTDI
# ljjcoder/EHTDI configs/gta5.yaml + train.sh lam_aug=0.10 (the TARGET_MIX table), started from model.checkpoint
EHTDI_INPUTS = [("model.checkpoint ${pretrain_model_root}/GTA5_source.pth (load_checkpoint: state_dict only)",
                 "GTA5_source.pth", "model.init_from", "stage://source/best.pt")]
# uda-ray's source-only stage (its chain's header says why): the EHTDI file with every adaptation term off
EHTDI_SOURCE = {"loss.mix_weight": 0.0, "mix.target_to_source.enabled": False, "loss.cross_view.pixel_weight": 0.0,
                "loss.cross_view.proto_weight": 0.0, "data.crop": (720, 1280), "eval.model": "student",
                "optim.poly_iters": 125000, "run.iterations": 60000, "run.eval_every": 2000,
                "run.checkpoint_every": 2000}
EHTDI_SOURCE_ROWS = [("uda-ray: the whole target image (a crop must fit the resize; the stage reads no target)",
                      (1280, 640), "data.target_crop", (640, 1280))]
EHTDI_STRUCTURE = [("source", "train", {}, {}), ("ehtdi", "train", {"init": ("source", "best", "model")}, {})]


def _structure(chain: Chain) -> list[tuple]:
    return [(s.name, s.kind, {r: (ref.stage, ref.checkpoint, ref.weights) for r, ref in s.inputs.items()}, s.options)
            for s in chain.stages]


@pytest.mark.parametrize("source", ["gta2cs", "synthia2cs"])
def test_sdca_chain_is_sdca_train_with_ssl_sh(source: str) -> None:
    chain = load_chain(CHAINS / f"sdca_deeplabv2_{source}.yaml")
    assert _structure(chain) == SDCA_STRUCTURE
    synthia = SYNTHIA if source == "synthia2cs" else {}
    _check(chain.stage("source").config, SDCA_SOURCE, synthia)
    _check(chain.run_config("stats"), SDCA_STATS, synthia)
    _check(chain.stage("sdca").config, SDCA + SDCA_INPUTS, synthia)
    _check(chain.run_config("labels"), SDCA_LABELS, {"data.protocol": synthia.get("data.protocol", 19)})
    _check(chain.stage("self_train").config, SDCA_SSL, {"data.protocol": synthia.get("data.protocol", 19)})
    assert chain.final.name == "self_train" and chain.seed == 0


def test_cfcontra_chain_is_minent_then_centroids_then_cfcontra() -> None:
    chain = load_chain(CHAINS / "cfcontra_deeplabv2_gta2cs.yaml")
    assert _structure(chain) == CFCONTRA_STRUCTURE
    _check(chain.stage("minent").config, ADVENT_MINENT + MINENT_STAGE, {})
    _check(chain.run_config("centroids"), CENTROIDS, {})
    _check(chain.stage("cfcontra").config, CFCONTRA + CFCONTRA_INPUTS, {})


@pytest.mark.parametrize("source", ["gta2cs", "synthia2cs"])
def test_target_mix_chain_is_a_source_only_stage_then_ehtdi(source: str) -> None:
    chain = load_chain(CHAINS / f"target_mix_deeplabv2_{source}.yaml")
    assert _structure(chain) == EHTDI_STRUCTURE
    synthia = {ours: value for _, _, ours, value in TARGET_MIX_SYNTHIA} if source == "synthia2cs" else {}
    _check(chain.stage("source").config, TARGET_MIX + EHTDI_SOURCE_ROWS, {**synthia, **EHTDI_SOURCE})
    _check(chain.stage("ehtdi").config, TARGET_MIX + EHTDI_INPUTS, synthia)
    assert chain.stage("ehtdi").config.eval.model == "ema"


def _variant(path: Path) -> dict[str, Any]:
    """The header's commented variant (lines after '# Variant:' indented under it), as a stage mapping."""
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# Variant:"))
    block = []
    for line in lines[start + 1:]:
        if not line.startswith("#   "):
            if block:
                break
            continue
        block.append(line[4:])
    return yaml.safe_load("\n".join(block))


@pytest.mark.parametrize(("file", "replaced", "reader", "released"), [
    ("cfcontra_deeplabv2_gta2cs.yaml", "minent", "centroids", "gta2cityscapes_minent_ER.pth"),
    ("target_mix_deeplabv2_gta2cs.yaml", "source", "ehtdi", "GTA5_source.pth"),
    ("target_mix_deeplabv2_synthia2cs.yaml", "source", "ehtdi", "synthia_source.pth"),
])
def test_the_released_model_variant_in_each_header_loads(tmp_path: Path, file: str, replaced: str, reader: str,
                                                         released: str) -> None:
    """The commented variant replaces the chain's first stage by the released file; the chain then validates."""
    data = yaml.safe_load((CHAINS / file).read_text())
    variant = _variant(CHAINS / file)
    assert list(variant) == [replaced] and variant[replaced]["kind"] == "checkpoint"
    data["stages"][replaced] = variant[replaced]
    for spec in data["stages"].values():  # the copy lives elsewhere: paths relative to the shipped file
        for key in ("config", "path"):
            if key in spec:
                spec[key] = str((CHAINS / spec[key]).resolve())
    (tmp_path / file).write_text(yaml.safe_dump(data, sort_keys=False))
    chain = load_chain(tmp_path / file)
    stage = chain.stage(replaced)
    assert stage.kind == "checkpoint" and Path(stage.path) == ROOT / "pretrained_models" / released
    assert replaced in chain.ancestors(chain.final.name) and reader in chain.names
    if reader == "centroids":  # the centroids stage runs the released file with the MinEnt config's network
        assert chain.run_config("centroids").model.backbone == "deeplabv2_r101"


# ---------------------------------------------------------------------------------------------------- toy runs
def toy(cache: Path, killed: str, **per_stage: Any) -> dict[str, Any]:
    """Overrides that shrink a shipped chain: every stage with a config of its own on the tiny synthetic pair (32×64,
    4 + 4 train and 2 val images), one iteration with an evaluation and a checkpoint; stage ``killed`` two iterations,
    a checkpoint after each and an evaluation at the end; then ``per_stage`` (``stage__dotted__key``)."""
    common = {
        "data.source": "synthetic", "data.target": "synthetic", "data.source_root": "", "data.target_root": "",
        "data.label_format": "auto", "data.protocol": 19, "data.loader_workers": 0, "model.pretrained_path": "",
        "data.synthetic.cache_dir": str(cache), "data.synthetic.num_source": 4, "data.synthetic.num_target": 4,
        "data.synthetic.num_val": 2, "data.synthetic.height": 32, "data.synthetic.width": 64,
        "data.source_resize": [32, 64], "data.target_resize": [32, 64], "data.crop": [32, 64],
        "data.target_crop": [32, 64], "data.val_resize": [32, 64], "data.batch_size": 1,
        "loss.cross_view.grid_size": 16,  # a size: 65 of a 512 crop
        "optim.poly_iters": 10, "run.iterations": 1, "run.eval_every": 1, "run.checkpoint_every": 1,
        "run.log_every": 1, "run.threads": 1, "run.save_images": False,
    }
    out = {f"stages.*.{k}": v for k, v in common.items()}
    out.update({f"stages.{killed}.run.iterations": 2, f"stages.{killed}.run.eval_every": 2})
    out.update({f"stages.{k.replace('__', '.')}": v for k, v in per_stage.items()})
    return out


class _Killed(BaseException):  # a kill: nothing on the way out catches or wraps it
    pass


def _kill_after_first_checkpoint(stage: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Train stage ``stage`` dies right after the checkpoint of its iteration 1; the others train normally. Returns
    the real ``fit``."""
    from uda_ray.stages.kinds import train as train_kind

    real_fit = train_kind.fit

    def fit_killed(cfg, **kw):
        if not Path(kw["work_dir"]).name.startswith(f"{stage}-"):
            return real_fit(cfg, **kw)
        report = kw["report"]

        def dying(metrics, checkpoint_dir):
            report(metrics, checkpoint_dir)
            if metrics["iteration"] == 1 and checkpoint_dir is not None:
                raise _Killed(f"stage {stage} killed after the checkpoint of iteration 1")

        return real_fit(cfg, **{**kw, "report": dying})

    monkeypatch.setattr(train_kind, "fit", fit_killed)
    return real_fit


def _equal(x: Any, y: Any, moved: tuple[str, str]) -> bool:
    """Nested dicts of tensors and plain values, equal exactly (NaN equal to NaN, timings left out), but for the
    storage root ``moved[0]`` that ``x``'s text names where ``y``'s names ``moved[1]`` (a model file's config holds
    its inputs' paths)."""
    if isinstance(x, dict):
        keys = {k for k in x if not str(k).startswith("time/")}
        return isinstance(y, dict) and keys == {k for k in y if not str(k).startswith("time/")} and \
            all(_equal(x[k], y[k], moved) for k in keys)
    if isinstance(x, torch.Tensor):
        return isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)
    return repr(x).replace(*moved) == repr(y)


def _outputs(folder: Path) -> list[Path]:
    """A stage's output files, but for those that name the run or the storage (its manifest, its users, its config
    with the inputs' paths: the chain's keys already say the configs are the same)."""
    return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file() and
                  p.name not in ("manifest.json", "config.yaml") and "used_by" not in p.relative_to(folder).parts)


def _resumes_exactly(chain: Chain, whole: dict[str, str], tmp_path: Path, stage: str,
                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Kill ``stage`` after its first checkpoint, run the chain again: ``stage`` resumes at iteration 1 and every
    stage's output equals the uninterrupted run's (``whole``: stage → its folder) file by file."""
    from uda_ray.stages.kinds import train as train_kind

    real_fit = _kill_after_first_checkpoint(stage, monkeypatch)
    storage = str(tmp_path / "killed")
    moved = (str(Path(whole[stage]).parent), str(Path(storage) / "stages"))
    with pytest.raises(_Killed):
        ChainRun(chain, storage, who="first", log=lambda _: None).prepare()
    monkeypatch.setattr(train_kind, "fit", real_fit)
    again = ChainRun(chain, storage, who="second", log=lambda _: None)
    resumed = again.prepare()
    assert [r["status"] for r in again.cache.runs(stage, again.keys[stage])] == ["failed", "done"]
    assert again.cache.manifest(resumed.uris[stage])["result"]["resumed_from"] == 1
    assert set(resumed.uris) == set(whole)
    for name, folder in whole.items():
        a, b = Path(folder), Path(resumed.uris[name])
        files = _outputs(a)
        assert files == _outputs(b), name
        for rel in files:
            if rel.suffix == ".pt":
                x, y = (torch.load(f / rel, weights_only=True) for f in (a, b))
                assert _equal(x, y, moved), (name, str(rel))
            elif rel.suffix == ".parquet":
                rows = [pd.read_parquet(f / rel).drop(columns=["time/iter_s"], errors="ignore") for f in (a, b)]
                pd.testing.assert_frame_equal(rows[0], rows[1])
            else:
                assert (a / rel).read_bytes() == (b / rel).read_bytes(), (name, str(rel))


def _stage_metrics(folder: str) -> pd.DataFrame:
    return pd.read_parquet(Path(folder) / "metrics.parquet")


def _run(chain: Chain, tmp_path: Path) -> tuple[Any, Any]:
    """The chain end to end in-process: its stages, then the final stage as a run."""
    prepared = ChainRun(chain, str(tmp_path / "whole"), who="whole", log=lambda _: None).prepare()
    result = fit(prepared.config, work_dir=tmp_path / "final")
    assert result.status == "completed", result
    assert all(v == v for k, v in result.metrics.items() if k.startswith("train/loss")), result.metrics
    return prepared, result


@pytest.mark.usefixtures("shallow_resnets")
def test_sdca_chain_runs_end_to_end_and_resumes_exactly(tmp_path: Path, synthetic_cache: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    draws = {f"{s}__data__class_balanced_draws": 8 for s in ("source", "sdca")}  # SDCA's list: 250k / 500k draws
    chain = load_chain(CHAINS / "sdca_deeplabv2_gta2cs.yaml",
                       toy(synthetic_cache, "sdca", self_train__data__target_crop=[16, 32], **draws))
    prepared, result = _run(chain, tmp_path)
    uris = prepared.uris
    # each stage read what the official script reads: the source model's best, its statistics, the SDCA model's best
    assert prepared.config.data.target_pseudo_labels == uris["labels"] and prepared.config.model.init_from == ""
    source, sdca = _stage_metrics(uris["source"]), _stage_metrics(uris["sdca"])
    assert "train/loss_lovasz" in source and "train/loss_sdca" not in source
    assert (sdca["train/loss_sdca"] > 0).all() and (sdca["train/loss_lovasz"] > 0).all()
    sdca_config = yaml.safe_load((Path(uris["sdca"]) / "config.yaml").read_text())
    assert sdca_config["model"]["init_from"] == f"{uris['source']}/best.pt"
    assert sdca_config["loss"]["sdca"]["init_stats"] == f"{uris['stats']}/class_stats.pt"
    assert "train/loss_self_training" in result.metrics
    _resumes_exactly(chain, uris, tmp_path, "sdca", monkeypatch)


@pytest.mark.usefixtures("shallow_resnets")
def test_cfcontra_chain_runs_end_to_end_and_resumes_exactly(tmp_path: Path, synthetic_cache: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    sizes = {f"centroids__data__{k}": [32, 64] for k in ("source_resize", "target_resize", "crop", "target_crop")}
    chain = load_chain(CHAINS / "cfcontra_deeplabv2_gta2cs.yaml",
                       toy(synthetic_cache, "minent", **sizes, centroids__source_batches=4,
                           centroids__target_batches=4, cfcontra__run__iterations=2))
    prepared, result = _run(chain, tmp_path)
    assert prepared.config.loss.cfcontra.init_centroids == f"{prepared.uris['centroids']}/centroids.pt"
    assert prepared.config.model.init_from == "" and prepared.config.teacher.kind == "nearest_centroid"
    # at iteration 2 the banks hold more classes than the few the toy MinEnt model gets right: a contrast to learn
    assert result.metrics["train/loss_cfcontra"] > 0 and result.metrics["train/loss_entropy"] > 0
    assert "train/loss_entropy" in _stage_metrics(prepared.uris["minent"])
    _resumes_exactly(chain, prepared.uris, tmp_path, "minent", monkeypatch)


@pytest.mark.usefixtures("shallow_resnets")
def test_target_mix_chain_runs_end_to_end_and_resumes_exactly(tmp_path: Path, synthetic_cache: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    chain = load_chain(CHAINS / "target_mix_deeplabv2_gta2cs.yaml", toy(synthetic_cache, "source"))
    prepared, result = _run(chain, tmp_path)
    assert prepared.config.model.init_from == f"{prepared.uris['source']}/best.pt"
    source = _stage_metrics(prepared.uris["source"])
    assert "train/loss_t2s" not in source and "train/loss_cross_view_pixel" not in source
    assert all(result.metrics[k] > 0 for k in ("train/loss_t2s", "train/loss_cross_view_pixel", "train/loss_mix"))
    # the final run evaluated (and saved) its EMA copy
    final = load_checkpoint(max((tmp_path / "final" / "checkpoints").glob("iter_*")))
    assert "eval_ema" in final and "val/miou" in result.metrics
    _resumes_exactly(chain, prepared.uris, tmp_path, "source", monkeypatch)
