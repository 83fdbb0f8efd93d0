"""The DeepLab-family code's two conventions as options: logits resized with align_corners=True where they meet a
label or an image (model.align_corners: the loss, the teacher's pseudo-labels, the evaluation), and weight decay on
every parameter (optim.norm_decay)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from uda_ray.config import Config, ConfigError, apply_overrides
from uda_ray.models import build_segmenter, make_teacher
from uda_ray.train.context import StepContext, make_pseudo_fn
from uda_ray.train.evaluate import predict_labels
from uda_ray.train.loop import build_model, build_optimizer


def _model(align_corners: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_segmenter("test_resnet", 19, embed_dim=8, dropout=0.0, align_corners=align_corners).eval()


def test_align_corners_resizes_the_logits_of_the_loss_the_pseudo_labels_and_the_evaluation() -> None:
    x = torch.rand(2, 3, 35, 37, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 19, (2, 35, 37), generator=torch.Generator().manual_seed(2))
    plain, corners = _model(False), _model(True)
    out = corners(x)
    expected = F.cross_entropy(F.interpolate(out.logits, size=(35, 37), mode="bilinear", align_corners=True), labels)
    assert torch.allclose(corners.seg_loss(out, labels)[""], expected)
    assert not torch.allclose(plain.seg_loss(plain(x), labels)[""], expected)  # same weights, other resize
    up = F.interpolate(out.logits, size=(35, 37), mode="bilinear", align_corners=True)
    assert torch.equal(predict_labels(corners, x, (35, 37)), up.argmax(dim=1))
    teacher = make_teacher(corners)
    ctx = StepContext(student=corners, teacher=teacher, x_src=x, y_src=labels, x_tgt=x, out_src=out,
                      pseudo_fn=make_pseudo_fn(threshold=0.0, weighting="pixel", ignore_top=0, ignore_bottom=0),
                      generator=torch.Generator(), autocast=lambda: torch.autocast("cpu", enabled=False),
                      num_classes=19)
    assert torch.equal(ctx.pseudo.labels, up.argmax(dim=1))


def test_norm_decay_puts_every_parameter_under_weight_decay() -> None:
    cfg = apply_overrides(Config(), {"model.backbone": "test_resnet", "model.embed_dim": 8})
    default = build_optimizer(cfg, build_model(cfg))
    assert any(g["weight_decay"] == 0.0 for g in default.param_groups)  # BatchNorm without decay (DAFormer)
    decayed = build_optimizer(apply_overrides(cfg, {"optim.norm_decay": True}), build_model(cfg))
    assert {g["weight_decay"] for g in decayed.param_groups} == {cfg.optim.weight_decay}
    count = sum(p.numel() for g in default.param_groups for p in g["params"])
    assert count == sum(p.numel() for g in decayed.param_groups for p in g["params"])


def test_align_corners_is_refused_under_hrda() -> None:
    with pytest.raises(ConfigError, match="model.align_corners"):
        apply_overrides(Config(), {"model.backbone": "mit_b0", "model.decoder": "daformer",
                                   "model.hrda.enabled": True, "model.hrda.detail_crop": 32,
                                   "model.hrda.detail_window_stride": 16, "model.align_corners": True,
                                   "data.crop": [64, 64], "data.val_resize": [64, 128]})


def test_a_target_only_step_runs_no_source_pass() -> None:
    """loss.source_weight 0 with no term of the source (SDCA's self-training stage trains on the target alone): the
    step runs no source pass, so the source images neither cost a pass nor move BatchNorm's statistics."""
    from tests.train.test_train_step import _batches, _cfg, _setup
    from uda_ray.train.loop import step_settings
    from uda_ray.train.step import step

    cfg = _cfg({"loss.source_weight": 0.0, "loss.mix_weight": 0.0, "loss.entropy.weight": 0.1})
    student, teacher, terms, opt, sched = _setup(cfg)
    src, tgt = _batches()
    seen = []
    hook = student.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    metrics = step(student, teacher, opt, sched, src, tgt, 0, settings=step_settings(cfg, torch.device("cpu")),
                   terms=terms, generator=torch.Generator().manual_seed(0))
    hook.remove()
    assert len(seen) == 1 and seen[0] is tgt["image"]  # the target pass of the entropy term only
    assert "train/loss_src" not in metrics and math.isfinite(metrics["train/loss_entropy"])
    with_source = _cfg({"loss.source_weight": 0.0, "loss.mix_weight": 0.0, "loss.lovasz.weight": 0.75})
    student, teacher, terms, opt, sched = _setup(with_source)
    seen.clear()
    hook = student.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    step(student, teacher, opt, sched, src, tgt, 0, settings=step_settings(with_source, torch.device("cpu")),
         terms=terms, generator=torch.Generator().manual_seed(0))
    hook.remove()
    assert seen and seen[0] is src["image"]  # a term of the source (Lovász) still gets its pass
