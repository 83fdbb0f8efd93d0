"""The paper configs equal the official ones key by key.

Each table is written here from the official config files (DAFormer: configs/daformer/
gta2cs_uda_warm_fdthings_rcs_croppl_a999_daformer_mitb5_s0.py and the _base_ files it names), as
(official key, official value, our key, our value): the comparison is of our resolved config against our
reading of the official value, and the official key says where to look it up again.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from uda_ray.config import flatten, load_config

ROOT = Path(__file__).resolve().parents[2]
THINGS = (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)

DAFORMER = [
    # model: configs/_base_/models/daformer_sepaspp_mitb5.py (on daformer_conv1_mitb5.py)
    ("model.pretrained", "pretrained/mit_b5.pth", "model.pretrained_path", "pretrained/mit_b5.pth"),
    ("model.backbone.type", "mit_b5", "model.backbone", "mit_b5"),
    ("model.decode_head.type + fusion_cfg.type aspp, sep", "DAFormerHead", "model.decoder", "daformer"),
    ("model.decode_head.channels", 256, "model.embed_dim", 256),
    ("model.decode_head.dropout_ratio", 0.1, "model.dropout", 0.1),
    ("mit_b5 drop_path_rate", 0.1, "model.drop_path_rate", 0.1),
    ("norm_cfg BN", "BN", "model.decoder_norm", "batch"),
    ("img_norm_cfg mean/std (RGB)", "imagenet", "model.input_norm", "imagenet"),
    ("model.test_cfg.mode", "whole", "eval.mode", "whole"),
    # data: configs/_base_/datasets/uda_gta_to_cityscapes_512x512.py
    ("data.train.source.data_root", "data/gta/", "data.source_root", "data/gta"),
    ("data.train.target.data_root", "data/cityscapes/", "data.target_root", "data/cityscapes"),
    ("gta_train_pipeline Resize img_scale (w, h)", (1280, 720), "data.source_resize", (720, 1280)),
    ("cityscapes_train_pipeline Resize img_scale", (1024, 512), "data.target_resize", (512, 1024)),
    ("Resize keep_ratio (mmseg default)", True, "data.keep_ratio", True),
    ("crop_size", (512, 512), "data.crop", (512, 512)),
    ("gta_train_pipeline RandomCrop cat_max_ratio", 0.75, "data.cat_max_ratio", 0.75),
    ("RandomFlip prob", 0.5, "data.flip", True),
    ("test_pipeline img_scale", (1024, 512), "data.val_resize", (512, 1024)),
    ("data.samples_per_gpu", 2, "data.batch_size", 2),
    ("data.workers_per_gpu", 4, "data.loader_workers", 4),
    ("rare_class_sampling.class_temp", 0.01, "data.rcs.temperature", 0.01),
    ("rare_class_sampling.min_pixels", 3000, "data.rcs.min_pixels", 3000),
    ("rare_class_sampling.min_crop_ratio", 0.5, "data.rcs.min_crop_ratio", 0.5),
    ("rare_class_sampling", "on", "data.rcs.enabled", True),
    # uda: configs/_base_/uda/dacs.py + the experiment's uda dict
    ("uda.alpha", 0.999, "teacher.alpha", 0.999),
    ("uda.pseudo_threshold", 0.968, "teacher.pseudo_threshold", 0.968),
    ("uda.pseudo_weight_ignore_top", 15, "teacher.ignore_top", 15),
    ("uda.pseudo_weight_ignore_bottom", 120, "teacher.ignore_bottom", 120),
    ("dacs.py: one pseudo_weight over the batch", "batch", "teacher.weighting", "batch"),
    ("dacs.py: ema model in train mode, dropout/drop-path off", "batch", "teacher.bn_mode", "batch"),
    ("uda.mix", "class", "mix.class_ratio", 0.5),
    ("ClassMix on every pair", 1.0, "mix.prob", 1.0),
    ("uda.color_jitter_strength", 0.2, "mix.jitter_strength", 0.2),
    ("uda.color_jitter_probability (skip probability)", 0.2, "mix.jitter_prob", 0.8),
    ("uda.blur (applied when U(0,1) > 0.5)", True, "mix.blur_prob", 0.5),
    ("gaussian_blur sigma ~ U(0.15, 1.15)", 0.15, "mix.blur_sigma_min", 0.15),
    ("gaussian_blur sigma ~ U(0.15, 1.15)", 1.15, "mix.blur_sigma_max", 1.15),
    ("uda.imnet_feature_dist_lambda", 0.005, "loss.fd.weight", 0.005),
    ("uda.imnet_feature_dist_classes", THINGS, "loss.fd.classes", THINGS),
    ("uda.imnet_feature_dist_scale_min_ratio", 0.75, "loss.fd.scale_min_ratio", 0.75),
    ("decode loss weight (source CE)", 1.0, "loss.source_weight", 1.0),
    ("mixed CE weight", 1.0, "loss.mix_weight", 1.0),
    # optimiser and schedule: adamw.py, poly10warm.py and the experiment's optimizer dict
    ("optimizer.type", "AdamW", "optim.name", "adamw"),
    ("optimizer.lr", 6e-05, "optim.lr", 6e-05),
    ("optimizer.weight_decay", 0.01, "optim.weight_decay", 0.01),
    ("paramwise_cfg.custom_keys.head.lr_mult", 10.0, "optim.head_lr_mult", 10.0),
    ("lr_config.warmup_iters", 1500, "optim.warmup_iters", 1500),
    ("lr_config.warmup_ratio", 1e-06, "optim.warmup_ratio", 1e-06),
    ("lr_config.power", 1.0, "optim.poly_power", 1.0),
    ("optimizer_config = None (no clipping)", 0.0, "optim.grad_clip", 0.0),
    ("runner.max_iters", 40000, "run.iterations", 40000),
    ("evaluation.interval", 4000, "run.eval_every", 4000),
    ("checkpoint_config.interval (uda-ray also checkpoints at every evaluation)", 40000, "run.checkpoint_every",
     4000),
    ("fp32 training (no fp16 optimizer hook)", "fp32", "run.precision", "fp32"),
    ("no contrastive terms", 0.0, "loss.cluda.weight", 0.0),
]

# ADVENT (valeoai/ADVENT): advent/domain_adaptation/config.py with advent/scripts/configs/minent.yml merged on it
ADVENT_MINENT = [
    ("TRAIN.MODEL", "DeepLabv2", "model.backbone", "deeplabv2_r101"),
    ("TRAIN.MODEL (ASPP classifier)", "DeepLabv2", "model.decoder", "deeplabv2"),
    ("TRAIN.IMG_MEAN (BGR, no std)", (104.00698793, 116.66876762, 122.67891434), "model.input_norm", "caffe"),
    ("TRAIN.RESTORE_FROM", "../../pretrained_models/DeepLab_resnet_pretrained_imagenet.pth", "model.pretrained_path",
     "pretrained_models/DeepLab_resnet_pretrained_imagenet.pth"),
    ("TRAIN.MULTI_LEVEL + LAMBDA_SEG_AUX", 0.1, "model.aux_weight", 0.1),
    ("TRAIN.LAMBDA_SEG_MAIN", 1.0, "loss.source_weight", 1.0),
    ("TRAIN.DA_METHOD MinEnt: no mixing", 0.0, "loss.mix_weight", 0.0),
    ("TRAIN.LAMBDA_ENT_MAIN", 0.001, "loss.entropy.weight", 0.001),
    ("TRAIN.LAMBDA_ENT_AUX", 0.0002, "loss.entropy.aux_weight", 0.0002),
    ("DATA_DIRECTORY_SOURCE", "data/GTA5", "data.source_root", "data/GTA5"),
    ("DATA_DIRECTORY_TARGET", "data/Cityscapes", "data.target_root", "data/Cityscapes"),
    ("TRAIN.INPUT_SIZE_SOURCE (w, h)", (1280, 720), "data.source_resize", (720, 1280)),
    ("TRAIN.INPUT_SIZE_SOURCE: no crop", (1280, 720), "data.crop", (720, 1280)),
    ("TRAIN.INPUT_SIZE_TARGET (w, h)", (1024, 512), "data.target_resize", (512, 1024)),
    ("TRAIN.INPUT_SIZE_TARGET: no crop", (1024, 512), "data.target_crop", (512, 1024)),
    ("GTA5DataSet resizes to the size exactly", False, "data.keep_ratio", False),
    ("no flip in GTA5DataSet/CityscapesDataSet", False, "data.flip", False),
    ("TRAIN.BATCH_SIZE_SOURCE / _TARGET", 1, "data.batch_size", 1),
    ("NUM_WORKERS", 4, "data.loader_workers", 4),
    ("TEST.INPUT_SIZE_TARGET (w, h)", (1024, 512), "data.val_resize", (512, 1024)),
    ("NUM_CLASSES", 19, "data.protocol", 19),
    ("optim.SGD", "SGD", "optim.name", "sgd"),
    ("TRAIN.LEARNING_RATE", 2.5e-4, "optim.lr", 2.5e-4),
    ("TRAIN.MOMENTUM", 0.9, "optim.momentum", 0.9),
    ("TRAIN.WEIGHT_DECAY", 0.0005, "optim.weight_decay", 0.0005),
    ("optim_parameters: classifiers at 10 × lr", 10, "optim.head_lr_mult", 10.0),
    ("no warm-up", 0, "optim.warmup_iters", 0),
    ("TRAIN.POWER", 0.9, "optim.poly_power", 0.9),
    ("TRAIN.MAX_ITERS (the poly schedule's length)", 250000, "optim.poly_iters", 250000),
    ("TRAIN.EARLY_STOP", 120000, "run.iterations", 120000),
    ("TRAIN.SAVE_PRED_EVERY / TEST.SNAPSHOT_STEP", 2000, "run.eval_every", 2000),
    ("TRAIN.SAVE_PRED_EVERY", 2000, "run.checkpoint_every", 2000),
]

SYNTHIA_CHANGES = {
    "data.source": "synthia",
    "data.source_root": "data/synthia",
    "data.source_resize": (760, 1280),  # synthia_train_pipeline Resize img_scale (1280, 760)
    "data.protocol": 16,
}


def _check(cfg_file: str, table: list[tuple], changes: dict, folder: Path = ROOT / "search_spaces" / "base") -> None:
    flat = flatten(load_config(folder / cfg_file))
    wrong = []
    for official_key, _official, ours, value in table:
        expected = changes.get(ours, value)
        if flat[ours] != expected:
            wrong.append(f"{ours} = {flat[ours]!r}, expected {expected!r} (official {official_key})")
    assert not wrong, "\n".join(wrong)


def test_daformer_gta2cs_equals_the_official_config() -> None:
    _check("daformer_gta2cs.yaml", DAFORMER, {})
    flat = flatten(load_config(ROOT / "search_spaces" / "base" / "daformer_gta2cs.yaml"))
    assert (flat["data.source"], flat["data.target"], flat["data.protocol"]) == ("gta5", "cityscapes", 19)


def test_daformer_synthia2cs_equals_the_official_config() -> None:
    _check("daformer_synthia2cs.yaml", DAFORMER, SYNTHIA_CHANGES)
    flat = flatten(load_config(ROOT / "search_spaces" / "base" / "daformer_synthia2cs.yaml"))
    for key, value in SYNTHIA_CHANGES.items():
        assert flat[key] == value, key


def test_deeplabv2_gta2cs_equals_advent_minent() -> None:
    _check("deeplabv2_gta2cs.yaml", ADVENT_MINENT, {})


@pytest.mark.parametrize("key", ["model.backbone", "model.decoder", "data.rcs.enabled", "loss.fd.weight",
                                 "teacher.bn_mode", "teacher.weighting"])
def test_a_changed_key_is_caught(key: str, tmp_path: Path) -> None:
    """The comparison can fail: a copy of the config with one key changed does not pass."""
    import yaml

    data = yaml.safe_load((ROOT / "search_spaces" / "base" / "daformer_gta2cs.yaml").read_text())
    section, *rest = key.split(".")
    node = data[section]
    for part in rest[:-1]:
        node = node[part]
    changed = {"model.backbone": "mit_b4", "model.decoder": "mlp", "data.rcs.enabled": False,
               "loss.fd.weight": 0.0, "teacher.bn_mode": "running", "teacher.weighting": "scalar"}[key]
    node[rest[-1]] = changed
    (tmp_path / "daformer_gta2cs.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(AssertionError, match=key.replace(".", r"\.")):
        _check("daformer_gta2cs.yaml", DAFORMER, {}, folder=tmp_path)
