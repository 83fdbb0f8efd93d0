"""The published recipes at toy scale on the synthetic pair: DAFormer (MiT, DAFormer head, RCS, FD, the teacher's
batch statistics and batch weighting), DeepLabV2 (caffe ResNet-101, ASPP classifier with the layer3 auxiliary,
SGD), MinEnt, and HRDA alone, with CLUDA's multi-resolution contrast and with MIC (slide evaluation) train a few
iterations end to end and resume exactly."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_overrides
from uda_ray.config import Config, apply_overrides, load_config
from uda_ray.train.checkpoint import load_checkpoint
from uda_ray.train.loop import build_model, build_optimizer, fit

ROOT = Path(__file__).resolve().parents[2]
DAFORMER_TOY = {
    "model.backbone": "mit_b0", "model.decoder": "daformer", "model.embed_dim": 16, "model.dropout": 0.1,
    "data.rcs.enabled": True, "data.rcs.min_pixels": 20, "data.rcs.min_crop_ratio": 0.5,
    "data.cat_max_ratio": 0.75, "data.keep_ratio": True,
    # at 32×32 crops MiT's last stage is one cell per image: every class counts and a 10 % majority suffices
    "loss.fd.weight": 0.005, "loss.fd.classes": list(range(19)), "loss.fd.scale_min_ratio": 0.1,
    "loss.fd.without_pretrained": True,  # no ImageNet file at toy scale: FD against the random initialisation
    "teacher.bn_mode": "batch", "teacher.weighting": "batch",
    "teacher.ignore_top": 2, "teacher.ignore_bottom": 4,
}
DEEPLABV2_TOY = {
    "model.backbone": "deeplabv2_r101", "model.decoder": "deeplabv2", "model.input_norm": "caffe",
    "model.aux_weight": 0.1, "optim.name": "sgd", "optim.lr": 2.5e-4, "optim.momentum": 0.9,
    "optim.weight_decay": 5e-4, "optim.head_lr_mult": 10.0, "optim.warmup_iters": 0, "optim.poly_power": 0.9,
    "run.iterations": 2, "run.eval_every": 1, "run.checkpoint_every": 1,
}
MINENT_TOY = {  # ADVENT's MinEnt: whole images of a different size per domain, multi-level entropy, no mixing
    **DEEPLABV2_TOY, "loss.mix_weight": 0.0, "loss.entropy.weight": 0.001, "loss.entropy.aux_weight": 0.0002,
    "data.crop": [32, 64], "data.target_resize": [24, 48], "data.target_crop": [24, 48], "data.flip": False,
    "optim.poly_iters": 10,
}
HRDA_TOY = {  # HRDA on MiT-B0 (whose first stage needs 32 × 32 inputs): 64² crops, 32² detail windows, slide eval
    **DAFORMER_TOY, "model.hrda.enabled": True, "model.hrda.detail_crop": 32, "model.hrda.detail_window_stride": 16,
    "data.synthetic.height": 64, "data.synthetic.width": 128, "data.source_resize": [64, 128],
    "data.target_resize": [64, 128], "data.val_resize": [64, 128], "data.crop": [64, 64],
    "data.rcs.min_crop_ratio": 2.0, "eval.mode": "slide", "eval.crop": [64, 64], "eval.stride": [32, 32],
    # HRDA's pseudo-label margins are on the whole target image, before the crop
    "teacher.ignore_top": 0, "teacher.ignore_bottom": 0, "data.target_pseudo_margins": [4, 8, 4, 4],
    "run.iterations": 4, "run.eval_every": 2, "run.checkpoint_every": 2,
}
# the mixed image's detail window follows the entropy from iteration 2 on (CLUDA: after 12000)
CLUDA_HRDA_TOY = {**HRDA_TOY, "loss.cluda.weight": 1.0, "loss.cluda.multires": True, "loss.cluda.fm_size": 9,
                  "loss.cluda.chunk_size": 64, "loss.cluda.entropy_crop_after": 1}
# a low threshold so that the (batch-weighted) pseudo-labels of the untrained teacher count and MIC's loss is not 0
MIC_HRDA_TOY = {**HRDA_TOY, "loss.mic.weight": 1.0, "loss.mic.block_size": 8, "teacher.pseudo_threshold": 0.05}
RECIPES = {"daformer": DAFORMER_TOY, "deeplabv2": DEEPLABV2_TOY, "minent": MINENT_TOY, "hrda": HRDA_TOY,
           "cluda_hrda": CLUDA_HRDA_TOY, "mic_hrda": MIC_HRDA_TOY}

# The DeepLabV2 method configs as shipped, with only the data, the checkpoint file and the run length made small:
# every method setting (terms, weights, teacher, optimiser) is the paper file's. Crops keep each file's structure
# (one size for both domains, or the source's own size).
SHIPPED = ROOT / "search_spaces" / "base"
TOY_RUN = {"data.source": "synthetic", "data.target": "synthetic", "data.source_root": "", "data.target_root": "",
           "data.label_format": "auto", "data.protocol": 19, "data.loader_workers": 0, "model.pretrained_path": "",
           "run.iterations": 2, "run.eval_every": 1, "run.checkpoint_every": 1, "run.log_every": 1, "run.threads": 1,
           "optim.poly_iters": 10}
PAPER_TOYS = {
    "cfcontra_dlv2": ("cfcontra_deeplabv2_gta2cs.yaml", {
        "data.source_resize": [32, 64], "data.target_resize": [32, 64], "data.crop": [32, 64],
        "data.target_crop": [32, 64], "data.val_resize": [32, 64]}),
    "sdca_dlv2": ("sdca_deeplabv2_gta2cs.yaml", {
        "data.source_resize": [36, 64], "data.crop": [36, 64], "data.target_resize": [24, 48],
        "data.target_crop": [24, 48], "data.val_resize": [24, 48],
        "data.class_balanced_draws": 8}),  # SDCA's class-balanced list: 500k draws, seconds per fit
    "target_mix_dlv2": ("target_mix_deeplabv2_gta2cs.yaml", {
        "data.source_resize": [36, 64], "data.target_resize": [32, 64], "data.crop": [32, 64],
        "data.val_resize": [32, 64], "loss.cross_view.grid_size": 16}),  # a size: 65 of a 512 crop
}
pytestmark = pytest.mark.filterwarnings("ignore:RCS. no source image:UserWarning")


def recipe_config(cache: Path, name: str) -> Config:
    """The toy config of a recipe; no prediction grids (a quarter of a toy run's time, tested elsewhere)."""
    if name in PAPER_TOYS:
        file, sizes = PAPER_TOYS[name]
        synthetic = {k: v for k, v in tiny_overrides(cache).items() if k.startswith("data.synthetic.")}
        return load_config(SHIPPED / file, {**synthetic, **TOY_RUN, **sizes, "run.save_images": False})
    return apply_overrides(Config(), tiny_overrides(cache, **RECIPES[name], **{"run.save_images": False}))


def _plain(rows: list[dict]) -> list[dict]:
    return [{k: "nan" if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()
             if not k.startswith("time/")} for r in rows]


def _trains_and_resumes_exactly(cfg: Config, tmp_path: Path) -> list[dict]:
    """Train ``cfg`` once, then again from its middle checkpoint: the resumed run reports what the first one did."""
    full: list[dict] = []
    half = cfg.run.iterations // 2
    ckpt = tmp_path / "ckpt"

    def keep(m: dict, c: Path | None) -> None:  # the uninterrupted run's reports, and its middle checkpoint
        full.append(m)
        if int(m["iteration"]) == half and c is not None:
            shutil.copytree(c, ckpt)

    result = fit(cfg, work_dir=tmp_path / "a", report=keep)
    assert result.status == "completed", result
    assert all(math.isfinite(m["train/loss"]) for m in full)
    assert any("val/miou" in m for m in full)
    assert ckpt.is_dir(), f"no checkpoint at iteration {half}"
    rerun: list[dict] = []
    fit(cfg, work_dir=tmp_path / "c", report=lambda m, c: rerun.append(m), resume_from=ckpt)
    assert _plain(rerun) == _plain(full[half:])
    return full


@pytest.mark.usefixtures("shallow_resnets")  # DeepLabV2 recipes on shallow ResNet-101s
@pytest.mark.parametrize("name", list(PAPER_TOYS))
def test_deeplabv2_method_configs_train_and_resume_at_toy_scale(name: str, tmp_path: Path, synthetic_cache: Path):
    """CFContra, SDCA and the target-information method from their shipped DeepLabV2 files, only data and length
    made small: each term reports a finite, non-zero loss, and a resumed run repeats the uninterrupted one."""
    cfg = recipe_config(synthetic_cache, name)
    assert cfg.model.backbone in ("deeplabv2_r101", "deeplabv2_tv_r101") and cfg.optim.name == "sgd"
    full = _trains_and_resumes_exactly(cfg, tmp_path)
    expected = {"cfcontra_dlv2": ["train/loss_cfcontra", "train/loss_entropy", "train/loss_entropy_aux",
                                  "train/loss_src_aux"],
                "sdca_dlv2": ["train/loss_sdca"],
                "target_mix_dlv2": ["train/loss_t2s", "train/loss_cross_view_pixel", "train/loss_cross_view_proto",
                                    "train/loss_mix", "train/loss_src_aux"]}[name]
    for key in expected:
        assert all(key in m and math.isfinite(m[key]) for m in full), key
        assert any(m[key] != 0 for m in full), key


@pytest.mark.usefixtures("shallow_resnets")  # DeepLabV2 recipes on shallow ResNet-101s
@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_trains_and_resumes_exactly(name: str, tmp_path: Path, synthetic_cache: Path):
    cfg = recipe_config(synthetic_cache, name)
    full = _trains_and_resumes_exactly(cfg, tmp_path)
    if name == "daformer" or name.endswith("hrda"):
        assert all(m["train/loss_fd"] >= 0 for m in full) and any(m["train/loss_fd"] > 0 for m in full)
        assert "train/loss_mix" in full[0]
    else:
        assert all(m["train/loss_src_aux"] > 0 for m in full)
    if name == "minent":
        assert all(m["train/loss_entropy"] > 0 and m["train/loss_entropy_aux"] > 0 for m in full)
        assert "train/loss_mix" not in full[0]
        # poly over 10 iterations while training stops at 2: lr = 2.5e-4 · (1 − t/10)^0.9
        assert full[-1]["train/lr"] == pytest.approx(2.5e-4 * (1 - 1 / 10) ** 0.9)
    if name.endswith("hrda"):  # (1 − 0.1)·CE(fused) and 0.1·CE(detail) for the source and the mixed image
        assert all(m["train/loss_src_detail"] > 0 and m["train/loss_mix_detail"] > 0 for m in full)
    if name == "cluda_hrda":
        assert all(m["train/loss_cluda"] > 0 for m in full)
    if name == "mic_hrda":
        assert all(m["train/loss_mic"] > 0 and m["train/loss_mic_detail"] > 0 for m in full)


@pytest.mark.usefixtures("shallow_resnets")  # DeepLabV2 recipes on shallow ResNet-101s
def test_deeplabv2_frozen_batchnorm_is_not_optimised_and_does_not_change(tmp_path: Path, synthetic_cache: Path):
    cfg = recipe_config(synthetic_cache, "deeplabv2")
    model = build_model(cfg)
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(".bn" in n or "bn1" in n or "downsample.1" in n for n in frozen)
    in_optimizer = {id(p) for g in build_optimizer(cfg, model).param_groups for p in g["params"]}
    assert not in_optimizer & {id(p) for p in frozen.values()}
    before = {n: p.detach().clone() for n, p in frozen.items()}
    fit(cfg, work_dir=tmp_path / "run")
    state = load_checkpoint(next((tmp_path / "run" / "checkpoints").glob("iter_*")))
    for n, value in before.items():
        assert torch.equal(state["student"][n], value), n


def test_daformer_fd_frozen_copy_stays_out_of_checkpoints(tmp_path: Path, synthetic_cache: Path):
    cfg = recipe_config(synthetic_cache, "daformer")
    fit(cfg, work_dir=tmp_path / "run")
    state = load_checkpoint(next((tmp_path / "run" / "checkpoints").glob("iter_*")))
    term_keys = [k for k in state.get("terms", {})]
    assert not [k for k in term_keys if "patch_embed" in k or "block" in k]
