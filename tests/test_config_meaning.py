"""Config checks against silent changes of meaning: FD without the ImageNet weights it is defined against needs an
explicit opt-in, and pseudo-label margins that leave nothing of what they apply to are config errors naming the
keys (not a failure at run time)."""

from __future__ import annotations

import pytest

from uda_ray.config import Config, ConfigError, apply_overrides

FD = {"loss.fd.weight": 0.005}


def test_fd_needs_imagenet_weights_or_an_opt_in() -> None:
    with pytest.raises(ConfigError, match=r"'loss.fd.weight' = 0.005 .*'model.pretrained_path' nor "
                                          r"'model.pretrained'.*loss.fd.without_pretrained=true"):
        apply_overrides(Config(), FD)
    assert apply_overrides(Config(), {**FD, "loss.fd.without_pretrained": True}).loss.fd.weight == 0.005
    assert apply_overrides(Config(), {**FD, "model.pretrained_path": "pretrained/mit_b5.pth"}).loss.fd.weight > 0
    assert apply_overrides(Config(), {**FD, "model.pretrained": True}).loss.fd.weight > 0  # timm's weights


@pytest.mark.parametrize("overrides, message", [
    ({"data.crop": [64, 64], "teacher.ignore_top": 15, "teacher.ignore_bottom": 120},
     r"'teacher.ignore_top' = 15 and 'teacher.ignore_bottom' = 120 leave none of the 64 rows of the target crop "
     r"'data.crop' = \[64, 64\]"),
    ({"data.crop": [64, 64], "data.target_crop": [32, 64], "loss.mix_weight": 0.0, "teacher.ignore_bottom": 32},
     r"of the 32 rows of the target crop 'data.target_crop' = \[32, 64\]"),
    ({"data.target_pseudo_margins": [30, 240, 30, 30]},
     r"'data.target_pseudo_margins' = \[30, 240, 30, 30\].*'data.synthetic.height' x 'data.synthetic.width' = "
     r"96 x 192"),
])
def test_margins_that_leave_nothing_name_the_keys(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        apply_overrides(Config(), overrides)


def test_margins_that_leave_something_are_fine() -> None:
    cfg = apply_overrides(Config(), {"data.crop": [64, 64], "teacher.ignore_top": 15, "teacher.ignore_bottom": 48,
                                     "data.target_pseudo_margins": [8, 40, 8, 8]})
    assert cfg.teacher.ignore_bottom == 48
    # on a real target the image size is only known when it is read: the transform checks it then
    real = apply_overrides(Config(), {"data.target": "cityscapes", "data.target_root": "/data/cityscapes",
                                      "data.target_pseudo_margins": [30, 240, 30, 30]})
    assert real.data.target_pseudo_margins == (30, 240, 30, 30)
