"""The HRDA-family paper configs equal the official ones key by key.

Rows are (official key, official value, our key, our value), as in test_tune_paper_configs.py. The official key
names the file it was read in, relative to the repository's ``configs/`` folder unless it says otherwise:
lhoyer/HRDA configs/hrda/gtaHR2csHR_hrda.py and the _base_ files it names (``models/…``, ``datasets/…``, ``uda/…``,
``schedules/…``), experiments.py for SYNTHIA; lhoyer/MIC seg/configs/mic/gtaHR2csHR_mic_hrda.py and
seg/experiments.py; user0407/CLUDA configs/hrda/gtaHR2csHR_hrda.py, configs/_base_/models/daformer_conv1_mitb5.py
and the values hard-coded in its mmseg/ code. CLUDA has no SYNTHIA config, so there is no CLUDA SYNTHIA table.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.tune.test_tune_paper_configs import ROOT, THINGS, _check
from uda_ray.config import load_config

HRDA_GTA = "datasets/uda_gtaHR_to_cityscapesHR_1024x1024.py"

HRDA = [
    # model: models/daformer_sepaspp_mitb5.py on models/daformer_conv1_mitb5.py, and hrda/gtaHR2csHR_hrda.py
    ("models/daformer_conv1_mitb5.py model.pretrained", "pretrained/mit_b5.pth", "model.pretrained_path",
     "pretrained/mit_b5.pth"),
    ("models/daformer_conv1_mitb5.py model.pretrained: the local checkpoint, not timm's weights", False,
     "model.pretrained", False),
    ("models/daformer_conv1_mitb5.py model.backbone.type", "mit_b5", "model.backbone", "mit_b5"),
    ("hrda.py single_scale_head + models/daformer_sepaspp_mitb5.py fusion_cfg aspp, sep", "DAFormerHead",
     "model.decoder", "daformer"),
    ("models/daformer_conv1_mitb5.py decoder_params.embed_dims", 256, "model.embed_dim", 256),
    ("models/daformer_conv1_mitb5.py decode_head.channels (= embed_dims)", 256, "model.fuse_channels", 0),
    ("models/daformer_conv1_mitb5.py decode_head.dropout_ratio", 0.1, "model.dropout", 0.1),
    ("mmseg/models/backbones/mix_transformer.py mit_b5 drop_path_rate", 0.1, "model.drop_path_rate", 0.1),
    ("models/daformer_conv1_mitb5.py norm_cfg BN", "BN", "model.decoder_norm", "batch"),
    (f"{HRDA_GTA} img_norm_cfg mean/std (RGB)", "imagenet", "model.input_norm", "imagenet"),
    ("hrda/gtaHR2csHR_hrda.py model.type", "HRDAEncoderDecoder", "model.hrda.enabled", True),
    ("hrda/gtaHR2csHR_hrda.py scales [1, 0.5]: context", 0.5, "model.hrda.context_scale", 0.5),
    ("hrda/gtaHR2csHR_hrda.py hr_crop_size", (512, 512), "model.hrda.detail_crop", 512),
    ("hrda/gtaHR2csHR_hrda.py hr_slide_inference, hr_slide_overlapping: stride hr_crop_size / 2", 256,
     "model.hrda.detail_window_stride", 256),
    ("hrda/gtaHR2csHR_hrda.py decode_head.attention_classwise", True, "model.hrda.attention_classwise", True),
    ("hrda/gtaHR2csHR_hrda.py decode_head.hr_loss_weight", 0.1, "model.hrda.detail_loss_weight", 0.1),
    ("hrda/gtaHR2csHR_hrda.py test_cfg.mode", "slide", "eval.mode", "slide"),
    ("hrda/gtaHR2csHR_hrda.py test_cfg.crop_size", (1024, 1024), "eval.crop", (1024, 1024)),
    ("hrda/gtaHR2csHR_hrda.py test_cfg.stride", (512, 512), "eval.stride", (512, 512)),
    ("hrda/gtaHR2csHR_hrda.py test_cfg.batched_slide", True, "eval.batch_windows", 0),
    # data: datasets/uda_gtaHR_to_cityscapesHR_1024x1024.py and hrda/gtaHR2csHR_hrda.py data.train
    (f"{HRDA_GTA} data.train.source.type", "GTADataset", "data.source", "gta5"),
    (f"{HRDA_GTA} data.train.target.type", "CityscapesDataset", "data.target", "cityscapes"),
    (f"{HRDA_GTA} data.train.source.data_root", "data/gta/", "data.source_root", "data/gta"),
    (f"{HRDA_GTA} data.train.target.data_root", "data/cityscapes/", "data.target_root", "data/cityscapes"),
    ("README: tools/convert_datasets/*.py write *_labelTrainIds.png", "train_ids", "data.label_format",
     "train_ids"),
    (f"{HRDA_GTA} num_classes 19 (val: CityscapesDataset)", 19, "data.protocol", 19),
    (f"{HRDA_GTA} gta_train_pipeline Resize img_scale (w, h)", (2560, 1440), "data.source_resize", (1440, 2560)),
    (f"{HRDA_GTA} cityscapes_train_pipeline Resize img_scale", (2048, 1024), "data.target_resize", (1024, 2048)),
    ("mmseg/datasets/pipelines/transforms.py Resize keep_ratio (default)", True, "data.keep_ratio", True),
    (f"{HRDA_GTA} crop_size", (1024, 1024), "data.crop", (1024, 1024)),
    (f"{HRDA_GTA} gta_train_pipeline RandomCrop cat_max_ratio", 0.75, "data.cat_max_ratio", 0.75),
    (f"{HRDA_GTA} RandomFlip prob", 0.5, "data.flip", True),
    (f"{HRDA_GTA} test_pipeline img_scale", (2048, 1024), "data.val_resize", (1024, 2048)),
    (f"{HRDA_GTA} data.samples_per_gpu", 2, "data.batch_size", 2),
    ("hrda/gtaHR2csHR_hrda.py data.workers_per_gpu", 1, "data.loader_workers", 1),
    ("hrda/gtaHR2csHR_hrda.py rare_class_sampling", "on", "data.rcs.enabled", True),
    ("hrda/gtaHR2csHR_hrda.py rare_class_sampling.class_temp", 0.01, "data.rcs.temperature", 0.01),
    ("hrda/gtaHR2csHR_hrda.py rare_class_sampling.min_pixels", 3000, "data.rcs.min_pixels", 3000),
    ("hrda/gtaHR2csHR_hrda.py rare_class_sampling.min_crop_ratio", 2.0, "data.rcs.min_crop_ratio", 2.0),
    # uda: uda/dacs_a999_fdthings.py on uda/dacs.py; margins: hrda/gtaHR2csHR_hrda.py data.train.target
    ("uda/dacs_a999_fdthings.py uda.alpha", 0.999, "teacher.alpha", 0.999),
    ("uda/dacs.py uda.pseudo_threshold", 0.968, "teacher.pseudo_threshold", 0.968),
    ("hrda/gtaHR2csHR_hrda.py data.train.target.crop_pseudo_margins (top, bottom, left, right; full image)",
     (30, 240, 30, 30), "data.target_pseudo_margins", (30, 240, 30, 30)),
    ("uda/dacs.py uda.pseudo_weight_ignore_top", 0, "teacher.ignore_top", 0),
    ("uda/dacs.py uda.pseudo_weight_ignore_bottom", 0, "teacher.ignore_bottom", 0),
    ("mmseg/models/uda/dacs.py: one pseudo_weight over the batch", "batch", "teacher.weighting", "batch"),
    ("mmseg/models/uda/dacs.py: ema model in train mode, dropout/drop-path off", "batch", "teacher.bn_mode",
     "batch"),
    ("uda/dacs.py uda.mix", "class", "mix.class_ratio", 0.5),
    ("mmseg/models/uda/dacs.py: ClassMix on every pair", 1.0, "mix.prob", 1.0),
    ("uda/dacs.py uda.color_jitter_strength", 0.2, "mix.jitter_strength", 0.2),
    ("uda/dacs.py uda.color_jitter_probability (skip probability)", 0.2, "mix.jitter_prob", 0.8),
    ("uda/dacs.py uda.blur (applied when U(0,1) > 0.5)", True, "mix.blur_prob", 0.5),
    ("mmseg/models/utils/dacs_transforms.py gaussian_blur sigma ~ U(0.15, 1.15)", 0.15, "mix.blur_sigma_min", 0.15),
    ("mmseg/models/utils/dacs_transforms.py gaussian_blur sigma ~ U(0.15, 1.15)", 1.15, "mix.blur_sigma_max", 1.15),
    ("uda/dacs_a999_fdthings.py uda.imnet_feature_dist_lambda", 0.005, "loss.fd.weight", 0.005),
    ("uda/dacs_a999_fdthings.py uda.imnet_feature_dist_classes", THINGS, "loss.fd.classes", THINGS),
    ("uda/dacs_a999_fdthings.py uda.imnet_feature_dist_scale_min_ratio", 0.75, "loss.fd.scale_min_ratio", 0.75),
    ("models/daformer_conv1_mitb5.py loss_decode.loss_weight (source CE)", 1.0, "loss.source_weight", 1.0),
    ("mmseg/models/uda/dacs.py: mixed CE weight", 1.0, "loss.mix_weight", 1.0),
    ("no contrastive term", 0.0, "loss.cluda.weight", 0.0),
    ("no multi-resolution contrast", False, "loss.cluda.multires", False),
    ("random detail crop for every pass", 0, "loss.cluda.entropy_crop_after", 0),
    ("HRDA hrda_head.py forward: lr_seg = (1 − att)·lr_seg before the ×2 resize", False, "model.hrda.fuse_upsampled",
     False),
    ("no masked image consistency (uda/dacs.py has no mask_* keys)", 0.0, "loss.mic.weight", 0.0),
    # optimiser and schedule: schedules/adamw.py, schedules/poly10warm.py and hrda/gtaHR2csHR_hrda.py
    ("schedules/adamw.py optimizer.type", "AdamW", "optim.name", "adamw"),
    ("hrda/gtaHR2csHR_hrda.py optimizer.lr", 6e-05, "optim.lr", 6e-05),
    ("schedules/adamw.py optimizer.weight_decay", 0.01, "optim.weight_decay", 0.01),
    ("hrda/gtaHR2csHR_hrda.py paramwise_cfg.custom_keys.head.lr_mult", 10.0, "optim.head_lr_mult", 10.0),
    ("schedules/poly10warm.py lr_config.warmup_iters", 1500, "optim.warmup_iters", 1500),
    ("schedules/poly10warm.py lr_config.warmup_ratio", 1e-06, "optim.warmup_ratio", 1e-06),
    ("schedules/poly10warm.py lr_config.power", 1.0, "optim.poly_power", 1.0),
    ("hrda/gtaHR2csHR_hrda.py optimizer_config = None (no clipping)", 0.0, "optim.grad_clip", 0.0),
    ("hrda/gtaHR2csHR_hrda.py runner.max_iters", 40000, "run.iterations", 40000),
    ("hrda/gtaHR2csHR_hrda.py evaluation.interval", 4000, "run.eval_every", 4000),
    ("hrda/gtaHR2csHR_hrda.py checkpoint_config.interval (uda-ray also checkpoints at every evaluation)", 40000,
     "run.checkpoint_every", 4000),
    ("schedules/… no fp16 key, no Fp16OptimizerHook", "fp32", "run.precision", "fp32"),
    ("default_runtime.py log_config.interval", 50, "run.log_every", 50),
    ("hrda/gtaHR2csHR_hrda.py seed", 1, "run.seed", 1),
]

# HRDA experiments.py id 40: syn2cs = ('synthiaHR', 'cityscapesHR', '1024x1024', 2.0); only the dataset base changes
HRDA_SYN = "datasets/uda_synthiaHR_to_cityscapesHR_1024x1024.py"
HRDA_SYNTHIA = [
    (f"{HRDA_SYN} data.train.source.type", "SynthiaDataset", "data.source", "synthia"),
    (f"{HRDA_SYN} data.train.source.data_root", "data/synthia/", "data.source_root", "data/synthia"),
    (f"{HRDA_SYN} synthia_train_pipeline Resize img_scale (w, h)", (2560, 1520), "data.source_resize",
     (1520, 2560)),
    ("README: Synthia mIoU16 = mIoU19 * 19 / 16", 16, "data.protocol", 16),
]

# user0407/CLUDA: configs/hrda/gtaHR2csHR_hrda.py is HRDA's file but for evaluation.save_best='mIoU' (uda-ray scores
# the last model, a difference stated in the YAML); the rest is its model base and hard-coded code values
CLUDA_HRDA = [
    ("CLUDA configs/_base_/models/daformer_conv1_mitb5.py decoder_params.embed_dims", 512, "model.embed_dim", 512),
    ("CLUDA configs/_base_/models/daformer_conv1_mitb5.py decode_head.channels", 256, "model.fuse_channels", 256),
    ("CLUDA mmseg/models/uda/dacs.py: src_multi_res_cl.backward() and mix CL, weight 1 each", 1.0,
     "loss.cluda.weight", 1.0),
    ("CLUDA mmseg/models/losses/contrastive_loss.py: no temperature (raw dot products)", 1.0,
     "loss.cluda.temperature", 1.0),
    ("CLUDA mmseg/models/uda/dacs.py forward_train fm_size", (65, 65), "loss.cluda.fm_size", 65),
    ("CLUDA mmseg/models/uda/dacs.py: multi_resolution_cl on the source image", True, "loss.cluda.on_source", True),
    ("CLUDA mmseg/models/uda/dacs.py: multi_resolution_cl on the mixed image", True, "loss.cluda.on_mix", True),
    ("CLUDA mmseg/models/uda/dacs.py: multi_resolution_cl (HRDAHead.feat_weighter)", True, "loss.cluda.multires",
     True),
    ("CLUDA decode_head.feat_weighter.* under custom_keys head lr_mult", 10.0, "loss.cluda.weighter_lr_mult", 10.0),
    ("uda-ray's choice: anchor blocks (CLUDA builds the full matrices; same value)", None, "loss.cluda.chunk_size",
     1024),
    ("CLUDA mmseg/models/uda/dacs.py: entropy-guided mixed crop when local_iter > 12000", 12000,
     "loss.cluda.entropy_crop_after", 12000),
    ("CLUDA mmseg/models/decode_heads/hrda_head.py forward: fused = att·hr + (1 − att)·up(lr)", True,
     "model.hrda.fuse_upsampled", True),
    ("CLUDA dacs.py forward_train: F.interpolate(..., align_corners=True) to fm_size, pseudo weights bilinear",
     True, "loss.cluda.official_resizing", True),
    ("CLUDA configs/hrda/gtaHR2csHR_hrda.py seed", 1, "run.seed", 1),
]

# lhoyer/MIC: seg/configs/mic/gtaHR2csHR_mic_hrda.py (HRDA's bases, identical values) with its uda dict
MIC_HRDA = [
    ("MIC mic/gtaHR2csHR_mic_hrda.py uda.mask_lambda", 1, "loss.mic.weight", 1.0),
    ("MIC mic/gtaHR2csHR_mic_hrda.py uda.mask_generator.mask_ratio", 0.7, "loss.mic.mask_ratio", 0.7),
    ("MIC mic/gtaHR2csHR_mic_hrda.py uda.mask_generator.mask_block_size", 64, "loss.mic.block_size", 64),
    ("MIC mic/gtaHR2csHR_mic_hrda.py seed ('seed with median performance')", 2, "run.seed", 2),
]

# MIC seg/experiments.py id 80: ('synthiaHR', 'cityscapesHR', 'separatetrgaug'), the dataset base as HRDA's
MIC_HRDA_SYNTHIA = HRDA_SYNTHIA


def _changes(*tables: list[tuple]) -> dict:
    return {ours: value for table in tables for _, _, ours, value in table}


def test_hrda_gta2cs_equals_the_official_config() -> None:
    _check("hrda_gta2cs.yaml", HRDA, {})


def test_hrda_synthia2cs_is_hrda_with_synthia_data() -> None:
    _check("hrda_synthia2cs.yaml", HRDA, _changes(HRDA_SYNTHIA))
    _check("hrda_synthia2cs.yaml", HRDA_SYNTHIA, {})


def test_cluda_hrda_gta2cs_equals_the_official_config() -> None:
    _check("cluda_hrda_gta2cs.yaml", HRDA, _changes(CLUDA_HRDA))
    _check("cluda_hrda_gta2cs.yaml", CLUDA_HRDA, {})


def test_mic_hrda_gta2cs_equals_the_official_config() -> None:
    _check("mic_hrda_gta2cs.yaml", HRDA, _changes(MIC_HRDA))
    _check("mic_hrda_gta2cs.yaml", MIC_HRDA, {})


def test_mic_hrda_synthia2cs_is_mic_with_synthia_data() -> None:
    _check("mic_hrda_synthia2cs.yaml", HRDA, _changes(MIC_HRDA, MIC_HRDA_SYNTHIA))
    _check("mic_hrda_synthia2cs.yaml", MIC_HRDA, {})
    _check("mic_hrda_synthia2cs.yaml", MIC_HRDA_SYNTHIA, {})


def test_no_cluda_synthia_config_is_shipped() -> None:
    """CLUDA's repository has no SYNTHIA config; uda-ray invents none."""
    assert not list((ROOT / "search_spaces" / "base").glob("cluda_hrda_synthia*"))


def test_the_tables_cover_every_key_the_hrda_files_set() -> None:
    """Every key a file sets is in a table of its checks, so no official value goes unchecked."""

    def keys(node: dict, prefix: str = "") -> set[str]:
        out: set[str] = set()
        for k, v in node.items():
            out |= keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"}
        return out

    tables = {"hrda_gta2cs.yaml": [HRDA], "hrda_synthia2cs.yaml": [HRDA, HRDA_SYNTHIA],
              "cluda_hrda_gta2cs.yaml": [HRDA, CLUDA_HRDA], "mic_hrda_gta2cs.yaml": [HRDA, MIC_HRDA],
              "mic_hrda_synthia2cs.yaml": [HRDA, MIC_HRDA, MIC_HRDA_SYNTHIA]}
    for name, ts in tables.items():
        written = keys(yaml.safe_load((ROOT / "search_spaces" / "base" / name).read_text()))
        checked = {ours for t in ts for _, _, ours, _ in t}
        assert written - checked == set(), name


@pytest.mark.parametrize(("key", "changed"), [("model.hrda.enabled", False), ("model.hrda.detail_crop", 256),
                                              ("data.target_pseudo_margins", [30, 240, 0, 0]),
                                              ("data.rcs.min_crop_ratio", 0.5),
                                              ("eval.stride", [341, 341])])
def test_a_changed_hrda_key_is_caught(key: str, changed: object, tmp_path: Path) -> None:
    """The comparison can fail: a copy of the HRDA config with one key changed does not pass."""
    data = yaml.safe_load((ROOT / "search_spaces" / "base" / "hrda_gta2cs.yaml").read_text())
    section, *rest = key.split(".")
    node = data[section]
    for part in rest[:-1]:
        node = node[part]
    node[rest[-1]] = changed
    (tmp_path / "hrda_gta2cs.yaml").write_text(yaml.safe_dump(data))
    load_config(tmp_path / "hrda_gta2cs.yaml")  # the changed copy is still a valid config
    with pytest.raises(AssertionError, match=key.replace(".", r"\.")):
        _check("hrda_gta2cs.yaml", HRDA, {}, folder=tmp_path)
