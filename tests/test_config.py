"""Config tree: round trip, dotted overrides, and every kind of bad input naming its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from uda_ray.config import (
    Config,
    ConfigError,
    all_keys,
    apply_overrides,
    flatten,
    from_dict,
    load_config,
    parse_override,
    save_config,
    to_dict,
)


def test_round_trip_default_and_modified():
    cfg = apply_overrides(Config(), ["loss.cluda.weight=0.5", "data.crop=[32, 48]", "model.out_indices=[1, 2]",
                                     "teacher.weighting=pixel", "run.name=007"])
    assert from_dict(to_dict(cfg)) == cfg
    assert cfg.data.crop == (32, 48) and cfg.model.out_indices == (1, 2)
    assert cfg.run.name == "007"  # str fields keep the text, not YAML's int
    assert from_dict(to_dict(Config())) == Config()


def test_save_and_load_round_trip(tmp_path: Path):
    cfg = apply_overrides(Config(), {"optim.lr": 1e-3, "loss.sdca.tau": 50.0})
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_flatten_covers_every_key():
    flat = flatten(Config())
    assert set(flat) == set(all_keys())
    assert "loss.cluda.temperature" in flat and flat["teacher.alpha"] == 0.999


def test_override_types_are_parsed_by_field():
    assert parse_override("loss.cluda.temperature=0.1") == ("loss.cluda.temperature", 0.1)
    assert parse_override("run.iterations=10") == ("run.iterations", 10)
    assert parse_override("data.flip=false") == ("data.flip", False)
    cfg = apply_overrides(Config(), ["optim.lr=1"])  # an int is accepted for a float field
    assert isinstance(cfg.optim.lr, float)


@pytest.mark.parametrize("override, expected", [
    ("loss.cluda.temprature=1", "closest valid key: 'loss.cluda.temperature'"),
    ("loss.cluda.temperature=0", "'loss.cluda.temperature' = 0 is out of range: expected > 0.0"),
    ("loss.cfcontra.temperature=-1", "'loss.cfcontra.temperature' = -1 is out of range"),
    ("teacher.alpha=1.0", "'teacher.alpha' = 1.0 is out of range: expected >= 0.0 and < 1.0"),
    ("teacher.pseudo_threshold=1.5", "expected >= 0.0 and <= 1.0"),
    ("mix.class_ratio=-0.1", "'mix.class_ratio'"),
    ("mix.prob=2", "'mix.prob'"),
    ("run.iterations=0", "'run.iterations' = 0 is out of range: expected >= 1"),
    ("loss.cfcontra.bank_size=0", "'loss.cfcontra.bank_size'"),
    ("run.iterations=true", "'run.iterations' = True: expected an integer"),
    ("data.flip=3", "'data.flip' = 3: expected true or false"),
    ("data.crop=[200, 64]", "'data.crop' = [200, 64] is larger than 'data.source_resize'"),
    ("data.crop=[64]", "'data.crop' = [64]: expected a list of 2 values"),
    ("teacher.weighting=soft", "one of 'scalar', 'pixel'"),
    ("data.protocol=17", "one of 19, 16, 13"),
    ("loss.cluda=1", "is a section, not a value"),
    ("run.seed", "expected key=value"),
    ("optim.lr=nan", "'optim.lr'"),
    ("model.backbone=no_such_net", "model.backbone = 'no_such_net': not a backbone"),
    ("model.decoder=deeplabv2", "model.decoder = 'deeplabv2' needs a backbone whose layer4 has output stride 8"),
    ("model.aux_weight=0.1", "'model.aux_weight' = 0.1: the auxiliary classifier exists only"),
    ("loss.entropy.aux_weight=0.1", "'loss.entropy.aux_weight' = 0.1 needs the auxiliary classifier"),
    ("data.target_crop=[32, 32]", "'data.target_crop' = [32, 32] differs from 'data.crop' = [64, 64], but "
                                  "loss.mix_weight mixes"),
    ("data.target_crop=[0, 32]", "'data.target_crop' = [0, 32]: expected (0, 0)"),
    ("data.target_crop=[200, 64]", "'data.target_crop' = [200, 64] is larger than 'data.target_resize'"),
    ("eval.mode=slide", "'eval.crop' = [512, 512] is larger than 'data.val_resize'"),
])
def test_bad_overrides_name_the_key(override: str, expected: str):
    with pytest.raises(ConfigError, match=None) as e:
        apply_overrides(Config(), [override])
    assert expected in str(e.value)


@pytest.mark.parametrize("overrides, expected", [
    (["model.hrda.enabled=true", "model.hrda.detail_crop=128"],
     "'model.hrda.detail_crop' = 128 is larger than 'data.crop' = [64, 64]"),
    (["model.hrda.enabled=true", "model.hrda.detail_crop=36"],
     "'model.hrda.detail_crop' = 36: expected a multiple of 8"),
    (["model.hrda.enabled=true", "model.hrda.detail_crop=32", "model.hrda.detail_window_stride=40"],
     "'model.hrda.detail_window_stride' = 40"),
    (["model.hrda.enabled=true", "model.hrda.detail_crop=32", "data.crop=[60, 60]"],
     "'data.crop' = [60, 60]: HRDA needs sides divisible by 8"),
    (["loss.cluda.multires=true"], "'loss.cluda.multires' = true needs HRDA"),
    (["loss.mic.mask_ratio=1.0"], "'loss.mic.mask_ratio' = 1.0 is out of range: expected >= 0.0 and < 1.0"),
    (["loss.mic.mask_ratio=-0.1"], "'loss.mic.mask_ratio' = -0.1 is out of range"),
    (["eval.mode=slide", "eval.crop=[128, 128]"], "'eval.crop' = [128, 128] is larger than 'data.val_resize'"),
    (["model.fuse_channels=64"], "'model.fuse_channels' = 64 applies to model.decoder = 'daformer' only"),
])
def test_bad_multiresolution_settings_name_the_key(overrides: list[str], expected: str):
    with pytest.raises(ConfigError) as e:
        apply_overrides(Config(), overrides)
    assert expected in str(e.value)


def test_yaml_errors_name_the_file(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss:\n  clud:\n    weight: 1.0\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'loss\.clud'.*closest valid key: 'loss\.cluda"):
        load_config(bad)
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(missing)
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml: expected a mapping"):
        load_config(tmp_path / "list.yaml")


def test_real_dataset_needs_a_root():
    with pytest.raises(ConfigError, match="'data.source_root' is empty but 'data.source' = 'gta5'"):
        from_dict({"data": {"source": "gta5"}})


def test_base_file_one_level(tmp_path: Path):
    (tmp_path / "base.yaml").write_text("optim:\n  lr: 0.001\nrun:\n  iterations: 50\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nrun:\n  iterations: 20\n")
    cfg = load_config(tmp_path / "child.yaml", ["run.seed=3"])
    assert (cfg.optim.lr, cfg.run.iterations, cfg.run.seed) == (0.001, 20, 3)
    (tmp_path / "grandchild.yaml").write_text("base: child.yaml\n")
    with pytest.raises(ConfigError, match="child.yaml: a base config may not name another base"):
        load_config(tmp_path / "grandchild.yaml")
    (tmp_path / "badbase.yaml").write_text("optim:\n  lr: 0\n")
    (tmp_path / "c2.yaml").write_text("base: badbase.yaml\n")
    with pytest.raises(ConfigError, match="badbase.yaml: key 'optim.lr' = 0 is out of range"):
        load_config(tmp_path / "c2.yaml")
