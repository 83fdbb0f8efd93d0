"""The paper configs equal the official ones key by key.

Each table is written here from the official config files (DAFormer: configs/daformer/
gta2cs_uda_warm_fdthings_rcs_croppl_a999_daformer_mitb5_s0.py and the _base_ files it names), as
(official key, official value, our key, our value): the comparison is of our resolved config against our
reading of the official value, and the official key says where to look it up again. The DeepLabV2 tables come
from the ADVENT-family repositories named above each (ADVENT, DADA, CFContra, SDCA, EHTDI); where uda-ray cannot
take the official value, the official key says why and the YAML's header lists the difference.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from uda_ray.config import Config, flatten, load_config

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
    ("interp / interp_target: nn.Upsample(align_corners=True), the test's too", True, "model.align_corners", True),
]

# valeoai/DADA (the ADVENT authors' SYNTHIA → Cityscapes code; ADVENT's own repository has no SYNTHIA loader):
# dada/domain_adaptation/config.py. The MinEnt recipe itself stays ADVENT_MINENT's.
DADA_SYNTHIA = [
    ("cfg.SOURCE", "SYNTHIA", "data.source", "synthia"),
    ("cfg.DATA_DIRECTORY_SOURCE", "data/SYNTHIA", "data.source_root", "data/SYNTHIA"),
    ("cfg.DATA_DIRECTORY_TARGET", "data/Cityscapes", "data.target_root", "data/Cityscapes"),
    ("cfg.NUM_CLASSES (16-class protocol, info16class.json)", 16, "data.protocol", 16),
    ("TRAIN.INPUT_SIZE_SOURCE (w, h)", (1280, 760), "data.source_resize", (760, 1280)),
    ("TRAIN.INPUT_SIZE_SOURCE: no crop", (1280, 760), "data.crop", (760, 1280)),
    ("TRAIN.INPUT_SIZE_TARGET (w, h)", (1024, 512), "data.target_resize", (512, 1024)),
    ("TEST.INPUT_SIZE_TARGET (w, h)", (1024, 512), "data.val_resize", (512, 1024)),
]

# CFContra (shiyutang/Coarse-to-fine-UDA): advent/domain_adaptation/config.py with advent/scripts/configs/minent.yml
# merged on it; advent/domain_adaptation/train_UDA.py, advent/model/deeplabv2.py, advent/model/hm.py
CFCONTRA = [
    ("TRAIN.MODEL", "DeepLabv2", "model.backbone", "deeplabv2_r101"),
    ("TRAIN.MODEL (ClassifierModule: sum of 4 dilated convs)", "DeepLabv2", "model.decoder", "deeplabv2"),
    ("TRAIN.IMG_MEAN (BGR, no std)", (104.00698793, 116.66876762, 122.67891434), "model.input_norm", "caffe"),
    ("minent.yml TRAIN.RESTORE_FROM", "../../pretrained_models/DeepLab_resnet_pretrained_imagenet.pth",
     "model.pretrained_path", "pretrained_models/DeepLab_resnet_pretrained_imagenet.pth"),
    ("minent.yml TRAIN.MULTI_LEVEL + LAMBDA_SEG_AUX", 0.1, "model.aux_weight", 0.1),
    ("TRAIN.LAMBDA_SEG_MAIN", 1.0, "loss.source_weight", 1.0),
    ("minent.yml TRAIN.DA_METHOD MinEnt: no mixing", 0.0, "loss.mix_weight", 0.0),
    ("minent.yml TRAIN.LAMBDA_ENT_MAIN", 0.001, "loss.entropy.weight", 0.001),
    ("minent.yml TRAIN.LAMBDA_ENT_AUX", 0.0002, "loss.entropy.aux_weight", 0.0002),
    ("TRAIN.LAMBDA_CONTRA_S / _T / _T2S / _S2T", 0.001, "loss.cfcontra.weight", 0.001),
    ("TRAIN.contra_temp", 0.07, "loss.cfcontra.temperature", 0.07),
    ("TRAIN.contra_momentum", 0.9, "loss.cfcontra.momentum", 0.9),
    ("TRAIN.cluster_threshold (pixels with the two nearest centroids closer are ignored)", 0.05,
     "loss.cfcontra.margin", 0.05),
    ("HybridMemory(num_features, NUM_CLASSES): one centroid per class", 1, "loss.cfcontra.bank_size", 1),
    ("deeplabv2.py feat_dim (head_mode moco: 2048 → 2048 → 2048 on layer4)", 2048, "loss.cfcontra.proj_dim", 2048),
    ("TRAIN.pseudolabel_cluster + ignore_instances, normEuclid False: get_pseudo_labels(src_memory.features, …)",
     True, "teacher.kind", "nearest_centroid"),
    ("train_UDA.py: no EMA model", 0.0, "teacher.alpha", 0.0),
    ("train_UDA.py: model.train() for every pass (BN on the batch)", "train", "teacher.bn_mode", "batch"),
    ("interp / interp_target: nn.Upsample(align_corners=True)", True, "model.align_corners", True),
    ("README <root_dir>/data/GTA5 (config.py: ../data/GTA5)", "data/GTA5", "data.source_root", "data/GTA5"),
    ("README <root_dir>/data/Cityscapes (config.py: ../data/cityscapes)", "data/Cityscapes", "data.target_root",
     "data/Cityscapes"),
    ("TRAIN.SET_SOURCE all (gta5_list/all.txt, every frame)", "all", "data.source", "gta5"),
    ("TRAIN.INPUT_SIZE_SOURCE (w, h)", (1280, 640), "data.source_resize", (640, 1280)),
    ("TRAIN.INPUT_SIZE_SOURCE: no crop", (1280, 640), "data.crop", (640, 1280)),
    ("TRAIN.INPUT_SIZE_TARGET (w, h)", (1280, 640), "data.target_resize", (640, 1280)),
    ("TRAIN.INPUT_SIZE_TARGET: no crop", (1280, 640), "data.target_crop", (640, 1280)),
    ("base_dataset.py resizes to the size exactly", False, "data.keep_ratio", False),
    ("no flip in the datasets", False, "data.flip", False),
    ("TRAIN.BATCH_SIZE_SOURCE / _TARGET", 1, "data.batch_size", 1),
    ("NUM_WORKERS", 4, "data.loader_workers", 4),
    ("TEST.INPUT_SIZE_TARGET (w, h)", (1024, 512), "data.val_resize", (512, 1024)),
    ("NUM_CLASSES", 19, "data.protocol", 19),
    ("optim.SGD", "SGD", "optim.name", "sgd"),
    ("TRAIN.LEARNING_RATE", 2.5e-4, "optim.lr", 2.5e-4),
    ("TRAIN.MOMENTUM", 0.9, "optim.momentum", 0.9),
    ("TRAIN.WEIGHT_DECAY", 0.0005, "optim.weight_decay", 0.0005),
    ("optim_parameters: classifiers at 10 × lr", 10, "optim.head_lr_mult", 10.0),
    ("optim.SGD(model.optim_parameters(…), weight_decay=…): decay on every optimised parameter", True,
     "optim.norm_decay", True),
    ("no warm-up", 0, "optim.warmup_iters", 0),
    ("TRAIN.POWER", 0.9, "optim.poly_power", 0.9),
    ("TRAIN.MAX_ITERS (the poly schedule's length)", 250000, "optim.poly_iters", 250000),
    ("TRAIN.EARLY_STOP", 120000, "run.iterations", 120000),
    ("TRAIN.SAVE_PRED_EVERY / TEST.SNAPSHOT_STEP", 2000, "run.eval_every", 2000),
    ("TRAIN.SAVE_PRED_EVERY", 2000, "run.checkpoint_every", 2000),
]

# SDCA (BIT-DA/SDCA): configs/deeplabv2_r101_sdca.yaml on core/configs/defaults.py; train_sdca.py,
# core/datasets/build.py, core/datasets/dataset_path_catalog.py, core/models/build.py, test.py
SDCA = [
    ("MODEL.NAME deeplab_resnet101 + FREEZE_BN True (torchvision ResNet-101, dilated, FrozenBatchNorm2d)",
     "deeplab_resnet101", "model.backbone", "deeplabv2_tv_r101"),
    ("build_classifier: ASPP_Classifier_V2(2048, [6, 12, 18, 24]), summed", "ASPP_Classifier_V2", "model.decoder",
     "deeplabv2"),
    ("one classifier (SOLVER.MULTI_LEVEL switches the logit-level contrast)", 0.0, "model.aux_weight", 0.0),
    ("INPUT.PIXEL_MEAN / PIXEL_STD (defaults.py: ImageNet, RGB)", ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
     "model.input_norm", "imagenet"),
    ("MODEL.WEIGHTS (torchvision's ImageNet ResNet-101, loaded unchanged)",
     "https://download.pytorch.org/models/resnet101-5d3b4d8f.pth", "model.pretrained_path",
     "pretrained_models/resnet101-5d3b4d8f.pth"),
    ("F.interpolate(..., align_corners=True): src_pred, test.py", True, "model.align_corners", True),
    ("loss_sup (CE) weight 1", 1.0, "loss.source_weight", 1.0),
    ("SOLVER.LAMBDA_LOV", 0.75, "loss.lovasz.weight", 0.75),
    ("no mixing", 0.0, "loss.mix_weight", 0.0),
    ("no entropy term", 0.0, "loss.entropy.weight", 0.0),
    ("SOLVER.LAMBDA_FEAT", 1.0, "loss.sdca.weight_feat", 1.0),
    ("SOLVER.LAMBDA_OUT", 1.0, "loss.sdca.weight_out", 1.0),
    ("SOLVER.TAU (defaults.py)", 100.0, "loss.sdca.tau", 100.0),
    ("SOLVER.DELTA", 0.9, "loss.sdca.delta", 0.9),
    ("train_sdca.py: target mask from the network's own tgt_out, no EMA model", 0.0, "teacher.alpha", 0.0),
    ("MODEL.FREEZE_BN: FrozenBatchNorm2d (stored statistics)", True, "teacher.bn_mode", "running"),
    ("DatasetCatalog gtav_train: datasets/gtav", "datasets/gtav", "data.source_root", "data/GTA5"),
    ("DatasetCatalog cityscapes_train: datasets/cityscapes", "datasets/cityscapes", "data.target_root",
     "data/Cityscapes"),
    ("DATASETS.SOURCE_TRAIN gtav_train (gtav_train_list.txt, every frame)", "gtav_train", "data.source", "gta5"),
    ("INPUT.SOURCE_INPUT_SIZE_TRAIN (w, h)", (1280, 720), "data.source_resize", (720, 1280)),
    ("INPUT_SCALES_TRAIN (1.0, 1.0): Resize, no crop", (1280, 720), "data.crop", (720, 1280)),
    ("gtav.py with max_iters: FADA's class-balanced list (gtav_label_info.p)", True, "data.class_balanced", True),
    ("build_dataset: max_iters = SOLVER.MAX_ITER * SOLVER.BATCH_SIZE", 62500 * 8, "data.class_balanced_draws",
     500000),
    ("INPUT.BRIGHTNESS (transform.ColorJitter, source only)", 0.5, "data.source_photometric.brightness", 0.5),
    ("INPUT.CONTRAST", 0.5, "data.source_photometric.contrast", 0.5),
    ("INPUT.SATURATION", 0.5, "data.source_photometric.saturation", 0.5),
    ("INPUT.HUE", 0.2, "data.source_photometric.hue", 0.2),
    ("ColorJitter always (INPUT.RANDOMAPPLY 1.0 is never read)", 1.0, "data.source_photometric.jitter_prob", 1.0),
    ("INPUT.GRAYSCALE (transform.RandomGrayscale)", 0.2, "data.source_photometric.grayscale_prob", 0.2),
    ("INPUT.GAUSSIANBLUR: transform.GaussianBlur on every source image", True,
     "data.source_photometric.blur_prob", 1.0),
    ("GaussianBlur: torchvision's F.gaussian_blur", "torchvision", "data.source_photometric.blur_kind",
     "torchvision"),
    ("GaussianBlur(kernel_size=[3, 3])", 3, "data.source_photometric.blur_kernel", 3),
    ("GaussianBlur sigma=(0.1, 2.0)", 0.1, "data.source_photometric.blur_sigma_min", 0.1),
    ("GaussianBlur sigma=(0.1, 2.0)", 2.0, "data.source_photometric.blur_sigma_max", 2.0),
    ("build_transform(is_source=False): no colour augmentation of the target", 0.0,
     "data.target_photometric.brightness", 0.0),
    ("build_transform(is_source=False)", 0.0, "data.target_photometric.grayscale_prob", 0.0),
    ("build_transform(is_source=False)", 0.0, "data.target_photometric.blur_prob", 0.0),
    ("INPUT.TARGET_INPUT_SIZE_TRAIN (w, h), defaults.py", (1024, 512), "data.target_resize", (512, 1024)),
    ("INPUT_SCALES_TRAIN (1.0, 1.0): Resize, no crop", (1024, 512), "data.target_crop", (512, 1024)),
    ("transform.Resize to (h, w) exactly", False, "data.keep_ratio", False),
    ("INPUT.HORIZONTAL_FLIP_PROB_TRAIN (defaults.py)", 0.0, "data.flip", False),
    ("SOLVER.BATCH_SIZE 8 = 4 source + 4 target (1 + 1 on each of 4 GPUs)", 8, "data.batch_size", 4),
    ("DataLoader num_workers", 4, "data.loader_workers", 4),
    ("INPUT.INPUT_SIZE_TEST (w, h)", (1024, 512), "data.val_resize", (512, 1024)),
    ("MODEL.NUM_CLASSES", 19, "data.protocol", 19),
    ("torch.optim.SGD", "SGD", "optim.name", "sgd"),
    ("SOLVER.BASE_LR", 2.5e-4, "optim.lr", 2.5e-4),
    ("SOLVER.MOMENTUM", 0.9, "optim.momentum", 0.9),
    ("SOLVER.WEIGHT_DECAY", 0.0005, "optim.weight_decay", 0.0005),
    ("optimizer_cls: BASE_LR * 10", 10, "optim.head_lr_mult", 10.0),
    ("SGD(feature_extractor.parameters()): weight decay on every parameter", True, "optim.norm_decay", True),
    ("no warm-up", 0, "optim.warmup_iters", 0),
    ("SOLVER.LR_POWER", 0.9, "optim.poly_power", 0.9),
    ("SOLVER.MAX_ITER (the poly schedule's length)", 62500, "optim.poly_iters", 62500),
    ("SOLVER.STOP_ITER", 40000, "run.iterations", 40000),
    ("SOLVER.CHECKPOINT_PERIOD (test.py reports the best checkpoint)", 1000, "run.eval_every", 1000),
    ("SOLVER.CHECKPOINT_PERIOD", 1000, "run.checkpoint_every", 1000),
    ("no clipping", 0.0, "optim.grad_clip", 0.0),
]

# SDCA on SYNTHIA: what configs/deeplabv2_r101_sdca_synthia.yaml changes on configs/deeplabv2_r101_sdca.yaml
SDCA_SYNTHIA = [
    ("DATASETS.SOURCE_TRAIN synthia_train (synthia_train_list.txt, all 9400 frames, class-balanced)", "synthia_train",
     "data.source", "synthia"),
    ("DatasetCatalog synthia_train: datasets/synthia (ADVENT's layout here)", "datasets/synthia", "data.source_root",
     "data/SYNTHIA"),
    ("INPUT.SOURCE_INPUT_SIZE_TRAIN (w, h)", (1280, 760), "data.source_resize", (760, 1280)),
    ("INPUT_SCALES_TRAIN (1.0, 1.0): Resize, no crop", (1280, 760), "data.crop", (760, 1280)),
    ("MODEL.NUM_CLASSES (test.py: mIoU over the 16)", 16, "data.protocol", 16),
]

# The high-quality target information method, EHTDI (ljjcoder/EHTDI): configs/gta5.yaml with train.sh's
# lam_aug=0.10; main.py, models/deeplab_multi.py, models/__init__.py, perturbations/augmentations.py,
# datasets/cityscapes_Dataset.py
TARGET_MIX = [
    ("model.backbone deeplabv2_multi", "deeplabv2_multi", "model.backbone", "deeplabv2_r101"),
    ("layer6 Classifier_Module (its loop returns after 2 of 4 branches; uda-ray sums 4)", "Classifier_Module",
     "model.decoder", "deeplabv2"),
    ("IMG_MEAN (BGR, no std), cityscapes_Dataset.py", (104.00698793, 116.66876762, 122.67891434),
     "model.input_norm", "caffe"),
    ("model.imagenet_pretrained (model.checkpoint GTA5_source.pth is not loaded here)",
     "${pretrain_model_root}/DeepLab_resnet_pretrained_init-f81d91e8.pth", "model.pretrained_path",
     "pretrained_models/DeepLab_resnet_pretrained_init-f81d91e8.pth"),
    ("aux + lam_aux", 0.1, "model.aux_weight", 0.1),
    ("loss_source_1 weight 1", 1.0, "loss.source_weight", 1.0),
    ("train.sh lam_aug=0.10 (CE on the strong view with source classes pasted)", 0.1, "loss.mix_weight", 0.1),
    ("num_class_select: half (rounded down) of the source classes above train id 4", 0.5, "mix.class_ratio", 0.5),
    ("every image pair is mixed", 1.0, "mix.prob", 1.0),
    ("get_augmentation: colour Compose p", 0.8, "mix.jitter_prob", 0.8),
    ("RandomBrightnessContrast limits (albumentations default)", 0.2, "mix.jitter_strength", 0.2),
    ("get_augmentation: GaussianBlur p", 0.5, "mix.blur_prob", 0.5),
    ("use_NCE: target→source mix on", True, "mix.target_to_source.enabled", True),
    ("Tmax", 0.95, "mix.target_to_source.t_max", 0.95),
    ("mix_weight", 0.1, "mix.target_to_source.weight", 0.1),
    ("NCE_weight (pixel level)", 0.01, "loss.cross_view.pixel_weight", 0.01),
    ("NCE_weight (prototype level)", 0.01, "loss.cross_view.proto_weight", 0.01),
    ("criterion(20 * NCE_2_all): τ = 1/20", 20, "loss.cross_view.pixel_temperature", 0.05),
    ("criterion(7 * NCE_2): τ = 1/7", 7, "loss.cross_view.proto_temperature", 0.142857),
    ("pred[2] of a 512 × 512 crop: 65 × 65 logits", 65, "loss.cross_view.grid_size", 65),
    ("pseudo-labels from self.model under no_grad (ema_decay 0.999 only for the evaluated copy)", 0.0,
     "teacher.alpha", 0.0),
    ("train(): ema.apply_shadow() before validate(): the EMA copy is evaluated and saved", "ema", "eval.model", "ema"),
    ("ema_decay", 0.999, "eval.ema_alpha", 0.999),
    ("deeplab_multi.py: F.interpolate(..., align_corners=True)", True, "model.align_corners", True),
    ("self.model in train mode (BN on the batch)", "train", "teacher.bn_mode", "batch"),
    ("T = 0.0 (pseudolabel_threshold 0.0): every pixel", 0.0, "teacher.pseudo_threshold", 0.0),
    ("mask_1 = maxpred_1 > T: weight 1 per pixel", "pixel", "teacher.weighting", "pixel"),
    ("data.source.kwargs.root", "${data_leinao}/GTA5", "data.source_root", "data/GTA5"),
    ("data.target.kwargs.root", "${data_leinao}/Cityscapes", "data.target_root", "data/Cityscapes"),
    ("data.source.dataset", "gta5", "data.source", "gta5"),
    ("data.source.kwargs.crop_size (w, h), resize: True", (1280, 720), "data.source_resize", (720, 1280)),
    ("data.target.kwargs.crop_size (w, h), resize: True", (1280, 640), "data.target_resize", (640, 1280)),
    ("the whole target image (the mixes need one size: the source is cropped to it)", (1280, 640), "data.crop",
     (640, 1280)),
    ("PIL resize to the size exactly", False, "data.keep_ratio", False),
    ("random_mirror", True, "data.flip", True),
    ("source gaussian_blur True: PIL GaussianBlur(radius=random.random()) with p 0.5", 0.5,
     "data.source_photometric.blur_prob", 0.5),
    ("ImageFilter.GaussianBlur (PIL)", "pil", "data.source_photometric.blur_kind", "pil"),
    ("radius=random.random(): U(0, 1)", 0.0, "data.source_photometric.blur_sigma_min", 0.0),
    ("radius=random.random(): U(0, 1)", 1.0, "data.source_photometric.blur_sigma_max", 1.0),
    ("target gaussian_blur True (the same transform)", 0.5, "data.target_photometric.blur_prob", 0.5),
    ("ImageFilter.GaussianBlur (PIL)", "pil", "data.target_photometric.blur_kind", "pil"),
    ("radius=random.random(): U(0, 1)", 0.0, "data.target_photometric.blur_sigma_min", 0.0),
    ("radius=random.random(): U(0, 1)", 1.0, "data.target_photometric.blur_sigma_max", 1.0),
    ("no colour jitter in the loaders", 0.0, "data.source_photometric.brightness", 0.0),
    ("source_loader / target_loader batch_size", 2, "data.batch_size", 2),
    ("num_workers", 4, "data.loader_workers", 4),
    ("target val: City_Dataset(split='val') resized to crop_size", (1280, 640), "data.val_resize", (640, 1280)),
    ("data.num_classes", 19, "data.protocol", 19),
    ("opt.kind", "SGD", "optim.name", "sgd"),
    ("opt.lr", 2.5e-4, "optim.lr", 2.5e-4),
    ("opt.momentum", 0.9, "optim.momentum", 0.9),
    ("opt.weight_decay", 5e-4, "optim.weight_decay", 5e-4),
    ("poly_lr_scheduler: param_groups[1] at 10 × lr", 10, "optim.head_lr_mult", 10.0),
    ("SGD(optim_parameters(…), weight_decay): decay on every optimised parameter", True, "optim.norm_decay", True),
    ("no warm-up", 0, "optim.warmup_iters", 0),
    ("opt.poly_power", 0.9, "optim.poly_power", 0.9),
    ("opt.iterations (the poly schedule's length)", 250000, "optim.poly_iters", 250000),
    ("opt.iterations", 250000, "run.iterations", 250000),
    ("validate() after every epoch: min(len(source), len(target)) = 2975 // 2", 1487, "run.eval_every", 1487),
    ("save_checkpoint('best.pth') at every validation", 1487, "run.checkpoint_every", 1487),
    ("no entropy term", 0.0, "loss.entropy.weight", 0.0),
]

# EHTDI on SYNTHIA: configs/synthia.yaml (defaults: gta5, then its own keys)
TARGET_MIX_SYNTHIA = [
    ("data.source.dataset", "synthia", "data.source", "synthia"),
    ("data.source.kwargs.root (README: SYNTHIA/RAND_CITYSCAPES)", "${data_leinao}/synthia", "data.source_root",
     "data/SYNTHIA"),
    ("data.num_classes, class_16", 16, "data.protocol", 16),
    ("base_size/crop_size kept from gta5.yaml (w, h)", (1280, 720), "data.source_resize", (720, 1280)),
    ("NCE_weight (pixel level)", 0.008, "loss.cross_view.pixel_weight", 0.008),
    ("NCE_weight (prototype level)", 0.008, "loss.cross_view.proto_weight", 0.008),
]

SYNTHIA_CHANGES = {
    "data.source": "synthia",
    "data.source_root": "data/synthia",
    "data.source_resize": (760, 1280),  # synthia_train_pipeline Resize img_scale (1280, 760)
    "data.protocol": 16,
}


def _check(cfg_file: str | Config, table: list[tuple], changes: dict,
           folder: Path = ROOT / "search_spaces" / "base") -> None:
    """Every row's key of ``cfg_file`` (a file in ``folder``, or a resolved config: a chain's stage) has its value, or
    the value ``changes`` gives for it."""
    flat = flatten(cfg_file if isinstance(cfg_file, Config) else load_config(folder / cfg_file))
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


def test_deeplabv2_synthia2cs_is_advent_minent_with_dada_synthia_data() -> None:
    _check("deeplabv2_synthia2cs.yaml", ADVENT_MINENT, {ours: value for _, _, ours, value in DADA_SYNTHIA})
    _check("deeplabv2_synthia2cs.yaml", DADA_SYNTHIA, {})


def test_cfcontra_deeplabv2_gta2cs_equals_the_official_config() -> None:
    _check("cfcontra_deeplabv2_gta2cs.yaml", CFCONTRA, {})


def test_sdca_deeplabv2_gta2cs_equals_the_official_config() -> None:
    _check("sdca_deeplabv2_gta2cs.yaml", SDCA, {})


def test_sdca_deeplabv2_synthia2cs_equals_the_official_config() -> None:
    _check("sdca_deeplabv2_synthia2cs.yaml", SDCA, {ours: value for _, _, ours, value in SDCA_SYNTHIA})
    _check("sdca_deeplabv2_synthia2cs.yaml", SDCA_SYNTHIA, {})


def test_target_mix_deeplabv2_gta2cs_equals_the_official_config() -> None:
    _check("target_mix_deeplabv2_gta2cs.yaml", TARGET_MIX, {})


def test_target_mix_deeplabv2_synthia2cs_equals_the_official_config() -> None:
    synthia = {ours: value for _, _, ours, value in TARGET_MIX_SYNTHIA}
    _check("target_mix_deeplabv2_synthia2cs.yaml", TARGET_MIX, synthia)
    _check("target_mix_deeplabv2_synthia2cs.yaml", TARGET_MIX_SYNTHIA, {})


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
