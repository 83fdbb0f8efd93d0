"""MIC's block mask and term, and CLUDA's multi-resolution term on HRDA's passes (METHODS.md §11–12)."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from uda_ray.adaptation import apply_mask, block_mask
from uda_ray.losses import multires_pixel_contrast
from uda_ray.models import Segmenter, make_teacher
from uda_ray.models.hrda import HRDASegmenter
from uda_ray.train.context import StepContext, make_pseudo_fn
from uda_ray.train.terms.cluda import CludaTerm
from uda_ray.train.terms.mic import MICTerm

K = 19


def test_block_mask_keeps_whole_blocks_with_probability_one_minus_ratio() -> None:
    g = torch.Generator().manual_seed(0)
    mask = block_mask(64, 64, 128, block_size=16, mask_ratio=0.7, generator=g)
    assert mask.shape == (64, 1, 64, 128) and set(mask.unique().tolist()) <= {0.0, 1.0}
    blocks = mask.reshape(64, 1, 4, 16, 8, 16)
    assert (blocks == blocks[:, :, :, :1, :, :1]).all()  # constant inside every 16 × 16 block
    assert mask.mean().item() == pytest.approx(0.3, abs=0.02)  # 2048 blocks kept with probability 0.3
    again = block_mask(64, 64, 128, block_size=16, mask_ratio=0.7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(mask, again)
    assert block_mask(2, 64, 64, block_size=16, mask_ratio=0.0, generator=g).min() == 1.0
    with pytest.raises(ValueError, match="mask_ratio = 1.0"):
        block_mask(1, 8, 8, block_size=4, mask_ratio=1.0, generator=g)


@pytest.mark.parametrize("backbone, norm", [("test_resnet", "imagenet"), ("deeplabv2_r101", "caffe")])
def test_masked_pixels_are_zero_after_the_input_normalisation(backbone: str, norm: str) -> None:
    """MIC masks the normalised image: the fill colour is the one ``normalize`` maps to 0."""
    m = Segmenter(backbone, K, input_norm=norm, decoder="deeplabv2" if norm == "caffe" else "mlp", embed_dim=8)
    x = torch.rand(2, 3, 16, 16)
    mask = block_mask(2, 16, 16, block_size=4, mask_ratio=0.5, generator=torch.Generator().manual_seed(1))
    normalised = m.normalize(apply_mask(x, mask, m.mean_colour()))
    torch.testing.assert_close(normalised * (1 - mask), torch.zeros_like(normalised), atol=1e-4, rtol=0)
    torch.testing.assert_close(normalised * mask, m.normalize(x) * mask)


def _context(student, x_src, y_src, x_tgt, generator, valid=None) -> StepContext:
    teacher = make_teacher(student)
    return StepContext(tgt_valid=valid, student=student, teacher=teacher, x_src=x_src, y_src=y_src, x_tgt=x_tgt,
                       out_src=student(x_src), generator=generator, autocast=contextlib.nullcontext,
                       pseudo_fn=make_pseudo_fn(threshold=0.0, weighting="pixel", ignore_top=0, ignore_bottom=0),
                       num_classes=K)


def test_mic_without_mask_or_augmentation_is_the_pseudo_labelled_loss() -> None:
    """mask_ratio 0, no jitter, no blur: MIC's loss is the student's CE on the plain target against the teacher's
    pseudo-labels and weights; with a mask the loss changes and the masked pass sees the mean colour."""
    torch.manual_seed(0)
    student = Segmenter("test_resnet", K, embed_dim=8, dropout=0.0).train()
    x_src, x_tgt = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    y_src = torch.randint(0, K, (2, 32, 32))
    ctx = _context(student, x_src, y_src, x_tgt, torch.Generator().manual_seed(0))
    plain = MICTerm(weight=2.0, mask_ratio=0.0, block_size=8, jitter_strength=0.2, jitter_prob=0.0, blur_prob=0.0,
                    blur_sigma=(0.15, 1.15))
    p = ctx.pseudo
    expected = 2.0 * F.cross_entropy(F.interpolate(student(x_tgt).logits, size=(32, 32), mode="bilinear"),
                                     p.labels, reduction="mean")
    torch.testing.assert_close(plain(ctx)["mic"], expected, rtol=1e-5, atol=1e-6)
    masked = MICTerm(weight=2.0, mask_ratio=0.7, block_size=8, jitter_strength=0.2, jitter_prob=0.8, blur_prob=0.5,
                     blur_sigma=(0.15, 1.15))
    images = masked.masked_images(ctx)
    at_mean = (images == student.mean_colour()).all(dim=1)  # (B, H, W)
    assert 0.4 < at_mean.float().mean() < 0.95
    assert masked(ctx)["mic"].item() != pytest.approx(expected.item())


def test_target_valid_mask_zeroes_the_pseudo_weights() -> None:
    """HRDA's valid_pseudo_mask (``data.target_pseudo_margins``) multiplies the confidence weights: what ClassMix and
    MIC read."""
    torch.manual_seed(0)
    student = Segmenter("test_resnet", K, embed_dim=8, dropout=0.0).eval()  # the same teacher for both contexts
    x = torch.rand(2, 3, 32, 32)
    valid = torch.ones(2, 32, 32, dtype=torch.bool)
    valid[:, :3], valid[:, :, -5:] = False, False
    plain = _context(student, x, torch.zeros(2, 32, 32, dtype=torch.long), x, torch.Generator()).pseudo
    masked = _context(student, x, torch.zeros(2, 32, 32, dtype=torch.long), x, torch.Generator(), valid).pseudo
    assert torch.equal(masked.labels, plain.labels)
    torch.testing.assert_close(masked.weights, plain.weights * valid)
    assert (plain.weights[~valid] > 0).all() and (masked.weights[~valid] == 0).all()


@pytest.mark.parametrize("official", [False, True])
def test_cluda_multires_term_builds_the_maps_batch_major(official: bool) -> None:
    """The term's inputs to ``multires_pixel_contrast`` built here pixel by pixel for a batch of 2: context fused
    map up to the detail grid, detail fused map pasted at its box, learned weights, inside mask, labels, pseudo
    weights; with CLUDA's resizes (align_corners True, pseudo weights bilinear) when ``official``."""
    torch.manual_seed(0)
    m = HRDASegmenter("mit_b0", K, decoder="daformer", embed_dim=16, detail_crop=32, detail_stride=16,
                      feature_weighter=True, drop_path_rate=0.0, dropout=0.0).train()
    m.generator = torch.Generator().manual_seed(4)
    x = torch.rand(2, 3, 64, 64)
    labels = torch.randint(0, K, (2, 64, 64))
    weights = torch.rand(2, 64, 64)
    out = m(x)
    term = CludaTerm(weight=1.0, temperature=0.5, fm_size=9, on_source=True, on_mix=False, chunk_size=0,
                     multires=True, official_resizing=official)
    got = term._multires(out, labels, weights)

    y1, y2, x1, x2 = (c // 4 for c in out.detail.boxes[0])
    up = lambda t, s, a=official: F.interpolate(t, size=s, mode="bilinear", align_corners=a)  # noqa: E731
    lr_rows, hr_rows, att_rows, inside_rows, label_rows, pw_rows = [], [], [], [], [], []
    for b in range(2):
        lr = up(up(out.fused[b:b + 1], (16, 16)), (9, 9))[0]  # (E, 9, 9)
        canvas = torch.zeros(1, out.fused.shape[1], 16, 16)
        canvas[:, :, y1:y2, x1:x2] = out.detail.fused[b:b + 1]
        hr = up(canvas, (9, 9))[0]
        w = up(up(out.detail.weight[b:b + 1], (16, 16), False), (9, 9))[0, 0]  # the head's ×2: align_corners False
        if official:
            pw = up(weights[b:b + 1, None], (9, 9))[0, 0]
        else:
            pw = F.interpolate(weights[b:b + 1, None], size=(9, 9), mode="nearest")[0, 0]
        box = torch.zeros(1, 1, 16, 16)
        box[..., y1:y2, x1:x2] = 1
        inside = F.interpolate(box, size=(9, 9), mode="nearest")[0, 0] > 0
        lab = F.interpolate(labels[b:b + 1, None].float(), size=(9, 9), mode="nearest")[0, 0].long()
        for i in range(9):
            for j in range(9):
                lr_rows.append(lr[:, i, j])
                hr_rows.append(hr[:, i, j])
                att_rows.append(w[i, j])
                inside_rows.append(inside[i, j])
                label_rows.append(lab[i, j])
                pw_rows.append(pw[i, j])
    expected = multires_pixel_contrast(torch.stack(lr_rows), torch.stack(hr_rows), torch.stack(label_rows),
                                       att=torch.stack(att_rows), inside=torch.stack(inside_rows),
                                       weights=torch.stack(pw_rows), temperature=0.5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    got.backward()
    assert all(p.grad is not None for p in m.feature_weighter.parameters() if p.requires_grad)


def test_cluda_multires_needs_the_feature_weighter() -> None:
    m = HRDASegmenter("mit_b0", K, decoder="daformer", embed_dim=16, detail_crop=32, detail_stride=16).train()
    m.generator = torch.Generator().manual_seed(0)
    term = CludaTerm(weight=1.0, temperature=1.0, fm_size=9, on_source=True, on_mix=False, chunk_size=0,
                     multires=True)
    with pytest.raises(RuntimeError, match="feature weighter"):
        term._multires(m(torch.rand(2, 3, 64, 64)), torch.randint(0, K, (2, 64, 64)), None)
