"""The seeds' data augmentation and source sampling in a run: the config keys (checked, off by default), what
build_data makes of them, and toy runs with each that resume exactly."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import tiny_overrides
from uda_ray.config import Config, ConfigError, apply_overrides
from uda_ray.data.class_balanced import pass_length
from uda_ray.data.loaders import InfiniteSampler
from uda_ray.data.readers import build_dataset
from uda_ray.data.transforms import EvalTransform
from uda_ray.train.loop import DistInfo, _class_balanced_spec, build_data, data_roots, fit

JITTER = {"brightness": 0.5, "contrast": 0.5, "saturation": 0.5, "hue": 0.2}  # SDCA's
SDCA_SOURCE = {**{f"data.source_photometric.{k}": v for k, v in JITTER.items()},
               "data.source_photometric.grayscale_prob": 0.2, "data.source_photometric.blur_prob": 1.0}
SSL_TARGET = {**{f"data.target_photometric.{k}": v for k, v in JITTER.items()},
              "data.target_scale_min": 0.5, "data.target_scale_max": 1.5, "data.target_photometric.blur_prob": 0.5,
              "data.target_photometric.blur_kind": "pil", "data.target_photometric.blur_sigma_min": 0.0,
              "data.target_photometric.blur_sigma_max": 1.0}
BALANCED = {"data.class_balanced": True, "data.source_scale_min": 0.8, "data.source_scale_max": 1.2}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # the class statistics' cache, if any


def tiny(cache: Path, **extra) -> Config:
    return apply_overrides(Config(), tiny_overrides(cache, **extra))


def first_batches(cfg: Config, n: int = 2) -> tuple[list[dict], list[dict]]:
    data = build_data(cfg, DistInfo(), 0)
    return [next(data.source) for _ in range(n)], [next(data.target) for _ in range(n)]


def test_keys_are_off_by_default_and_checked():
    d = Config().data
    assert (d.source_scale_min, d.source_scale_max, d.target_scale_min, d.target_scale_max) == (1.0,) * 4
    assert not d.class_balanced and d.class_balanced_draws == 0
    for p in (d.source_photometric, d.target_photometric):
        assert (p.brightness, p.contrast, p.saturation, p.hue, p.grayscale_prob, p.blur_prob) == (0.0,) * 6
    bad = {
        "data.target_scale_min=1.5": "'data.target_scale_min' = 1.5 exceeds 'data.target_scale_max' = 1.0",
        "data.source_scale_min=0": "'data.source_scale_min' = 0 is out of range",
        "data.source_photometric.hue=0.6": "'data.source_photometric.hue' = 0.6 is out of range",
        "data.target_photometric.blur_kernel=4": "'data.target_photometric.blur_kernel' = 4: expected an odd",
        "data.source_photometric.blur_sigma_min=0": "'data.source_photometric.blur_sigma_min' = 0: torchvision's",
        "data.source_photometric.blur_sigma_min=3": "'data.source_photometric.blur_sigma_min' = 3.0 exceeds",
        "data.source_photometric.blur_prob=1.5": "'data.source_photometric.blur_prob' = 1.5 is out of range",
        "data.source_photometric.blur_kind=box": "'data.source_photometric.blur_kind' = 'box' is out of range",
        "data.class_balanced_draws=100": "'data.class_balanced_draws' = 100 sizes SDCA's class-balanced list",
    }
    for override, match in bad.items():
        with pytest.raises(ConfigError, match=match):
            apply_overrides(Config(), [override])
    with pytest.raises(ConfigError, match="'data.class_balanced' and 'data.rcs.enabled' are both true"):
        apply_overrides(Config(), ["data.class_balanced=true", "data.rcs.enabled=true"])
    ok = apply_overrides(Config(), ["data.target_photometric.blur_kind=pil",
                                    "data.target_photometric.blur_sigma_min=0"])
    assert ok.data.target_photometric.blur_sigma_min == 0.0


def test_build_data_applies_the_photometric_ops_and_the_scale_to_their_domain_only(synthetic_cache: Path):
    cache = synthetic_cache
    plain_src, plain_tgt = first_batches(tiny(cache))
    src, tgt = first_batches(tiny(cache, **SDCA_SOURCE))
    for a, b in zip(plain_src, src):  # the same images and crops, recoloured
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["label"], b["label"])
        assert not torch.equal(a["image"], b["image"])
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(plain_tgt, tgt))
    src, tgt = first_batches(tiny(cache, **SSL_TARGET))
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(plain_src, src))
    assert any(not torch.equal(a["label"], b["label"]) for a, b in zip(plain_tgt, tgt))  # rescaled before the crop


def test_build_data_reads_the_source_in_the_class_balanced_order(synthetic_cache: Path):
    cfg = tiny(synthetic_cache, **BALANCED)
    data = build_data(cfg, DistInfo(), 0)
    root = data_roots(cfg)[0]
    src_ds = build_dataset("gta5", root, "train", EvalTransform((32, 64)))
    spec = _class_balanced_spec(cfg, src_ds, root, DistInfo())
    assert spec.length == pass_length(6 * 2) == 3000  # 6 iterations × 2 images (SDCA: MAX_ITER × BATCH_SIZE)
    sampler = iter(InfiniteSampler(spec.length, seed=cfg.run.seed, pool=spec.pool))
    want = [next(sampler)[0] for _ in range(6)]
    assert [int(i) for _ in range(3) for i in next(data.source)["index"]] == want
    drawn = apply_overrides(cfg, {"data.class_balanced_draws": 7000})
    assert _class_balanced_spec(drawn, src_ds, root, DistInfo(0, 2)).length == 9000
    longer = apply_overrides(cfg, {"optim.poly_iters": 2000})  # the schedule's length × the global source batch
    assert _class_balanced_spec(longer, src_ds, root, DistInfo(0, 2)).length == pass_length(2000 * 2 * 2)


def _strip_time(rows: list[dict]) -> list[dict]:
    return [{k: "nan" if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()
             if not k.startswith("time/")} for r in rows]


@pytest.mark.parametrize("keys", [SDCA_SOURCE, SSL_TARGET, BALANCED], ids=["sdca_source", "ssl_target", "balanced"])
def test_toy_run_resumes_exactly(tmp_path: Path, synthetic_cache: Path, keys: dict):
    cfg = tiny(synthetic_cache, **keys)
    full: list[dict] = []
    ckpt3 = tmp_path / "ckpt3"

    def keep(m: dict, c: Path | None) -> None:
        full.append(m)
        if int(m["iteration"]) == 3:
            shutil.copytree(c, ckpt3)

    assert fit(cfg, work_dir=tmp_path / "a", report=keep).status == "completed"
    rerun: list[dict] = []
    fit(cfg, work_dir=tmp_path / "b", report=lambda m, c: rerun.append(m), resume_from=ckpt3)
    assert [int(m["iteration"]) for m in rerun] == [4, 5, 6]
    assert _strip_time(rerun) == _strip_time(full[3:])
    assert all(np.isfinite(m["train/loss"]) for m in full)
