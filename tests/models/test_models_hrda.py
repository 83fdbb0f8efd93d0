"""HRDA's model wrapper: the detail box sampler, the fused logits of training and inference, the loss, the parameter
groups and the bad-input errors (METHODS.md §10)."""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn.functional as F

from uda_ray.losses import cross_entropy
from uda_ray.models.hrda import HRDASegmenter, draw_box

K = 19


def _model(**kw) -> HRDASegmenter:
    torch.manual_seed(0)
    args = dict(decoder="daformer", embed_dim=16, detail_crop=32, detail_stride=16, dropout=0.0, drop_path_rate=0.0)
    args.update(kw)
    return HRDASegmenter("mit_b0", K, **args)


def _up(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def test_draw_box_follows_hrdas_formula_exactly() -> None:
    """HRDA: offset = randint(0, (margin + 1) // 8) · 8: for a 512 window in a 1024 crop 64 equally likely values
    0 … 504 (never 512); the same generator state gives the same box."""
    g = torch.Generator().manual_seed(0)
    counts = collections.Counter()
    for _ in range(6400):
        y1, y2, x1, x2 = draw_box(1024, 1024, 512, g)
        assert (y2 - y1, x2 - x1) == (512, 512)
        counts[y1] += 1
    assert sorted(counts) == list(range(0, 512, 8))
    assert min(counts.values()) > 50 and max(counts.values()) < 150  # about 100 each
    assert draw_box(1024, 1024, 512, torch.Generator().manual_seed(3)) == \
        draw_box(1024, 1024, 512, torch.Generator().manual_seed(3))
    assert draw_box(64, 64, 64, g) == (0, 64, 0, 64)  # margin 0: the whole input
    assert {draw_box(64, 128, 32, g)[2] for _ in range(300)} == set(range(0, 97, 8)) - {96}
    with pytest.raises(ValueError, match="larger than the input"):
        draw_box(64, 64, 128, g)


@pytest.mark.parametrize("fuse_upsampled", [False, True])
def test_training_pass_fuses_attention_masked_to_the_box(fuse_upsampled: bool) -> None:
    """y = up((1 − a)·y_LR) + up(a)·y_HR (HRDA; CLUDA's head: (1 − up(a))·up(y_LR) + up(a)·y_HR) with a zeroed
    outside the box and y_HR pasted at its place: recomputed here from the shared backbone and heads."""
    m = _model(fuse_upsampled=fuse_upsampled).train()
    m.generator = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 64, 96)
    out = m(x)
    y1, y2, x1, x2 = out.detail.boxes[0]
    assert (y2 - y1, x2 - x1) == (32, 32) and y1 % 8 == 0 and x1 % 8 == 0
    with torch.no_grad():
        ctx = F.interpolate(x, size=(32, 48), mode="bilinear", align_corners=False)
        feats = m.backbone(m.normalize(ctx))
        lr, lr_fused = m.decoder(feats)
        hr, _ = m.decoder(m.backbone(m.normalize(x[:, :, y1:y2, x1:x2])))
        att = torch.sigmoid(m.scale_attention(feats)[0])  # (2, K, 8, 12)
        mask = torch.zeros_like(att)
        mask[:, :, y1 // 8:y2 // 8, x1 // 8:x2 // 8] = 1
        att = att * mask
        canvas = torch.zeros(2, K, 16, 24)
        canvas[:, :, y1 // 4:y2 // 4, x1 // 4:x2 // 4] = hr
        if fuse_upsampled:
            expected = (1 - _up(att, (16, 24))) * _up(lr, (16, 24)) + _up(att, (16, 24)) * canvas
        else:
            expected = _up((1 - att) * lr, (16, 24)) + _up(att, (16, 24)) * canvas
    # BatchNorm in train mode normalises with the batch either way: the same batches give the same numbers
    torch.testing.assert_close(out.logits, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.fused, lr_fused, rtol=1e-4, atol=1e-5)
    assert out.detail.logits.shape == (2, K, 8, 8)
    outside = torch.ones(16, 24, dtype=torch.bool)
    outside[y1 // 4:y2 // 4, x1 // 4:x2 // 4] = False
    # outside the (upsampled) box the fused logits are the context logits' (a = 0 there, up to the bilinear rim)
    rim = torch.zeros(16, 24, dtype=torch.bool)
    rim[max(y1 // 4 - 1, 0):y2 // 4 + 1, max(x1 // 4 - 1, 0):x2 // 4 + 1] = True
    far = outside & ~rim
    torch.testing.assert_close(out.logits[..., far], _up(lr, (16, 24))[..., far], rtol=1e-4, atol=1e-5)


def test_inference_averages_detail_windows_and_leaves_attention_unmasked() -> None:
    m = _model().eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        out = m(x)
        ctx = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
        feats = m.backbone(m.normalize(ctx))
        lr, _ = m.decoder(feats)
        att = torch.sigmoid(m.scale_attention(feats)[0])
        canvas, count = torch.zeros(1, K, 16, 16), torch.zeros(16, 16)
        for y in (0, 16, 32):  # windows of 32 every 16 over 64: 3 × 3
            for xx in (0, 16, 32):
                logits, _ = m.decoder(m.backbone(m.normalize(x[:, :, y:y + 32, xx:xx + 32])))
                canvas[:, :, y // 4:y // 4 + 8, xx // 4:xx // 4 + 8] += logits
                count[y // 4:y // 4 + 8, xx // 4:xx // 4 + 8] += 1
        hr = canvas / count
        expected = _up((1 - att) * lr, (16, 16)) + _up(att, (16, 16)) * hr
    assert out.detail.boxes is None and (att > 0).all()
    torch.testing.assert_close(out.logits, expected, rtol=1e-4, atol=1e-5)
    assert count.min() == 1 and count.max() == 4  # exact overlap counts: corners 1, centre 4


def test_seg_loss_weights_fused_and_detail_ce() -> None:
    m = _model(detail_loss_weight=0.1).train()
    m.generator = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, 64, 64)
    labels = torch.randint(0, K, (2, 64, 64))
    labels[:, :5] = 255
    weights = torch.rand(2, 64, 64)
    out = m(x)
    parts = m.seg_loss(out, labels, weights)
    y1, y2, x1, x2 = out.detail.boxes[0]
    fused = cross_entropy(_up(out.logits, (64, 64)), labels, weights)
    detail = cross_entropy(_up(out.detail.logits, (32, 32)), labels[:, y1:y2, x1:x2], weights[:, y1:y2, x1:x2])
    torch.testing.assert_close(parts[""], 0.9 * fused)
    torch.testing.assert_close(parts["_detail"], 0.1 * detail)
    (parts[""] + parts["_detail"]).backward()
    assert all(p.grad is not None for p in m.scale_attention.parameters() if p.requires_grad)


def test_parameter_groups_hold_every_parameter_once() -> None:
    m = _model(feature_weighter=True, weighter_lr_mult=3.0)
    groups = m.param_groups(1e-3, 10.0, 0.01)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(1 for p in m.parameters() if p.requires_grad)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert all(lr_of[id(p)] == pytest.approx(1e-2) for p in m.scale_attention.parameters())
    assert all(lr_of[id(p)] == pytest.approx(3e-3) for p in m.feature_weighter.parameters())
    assert all(lr_of[id(p)] == pytest.approx(1e-3) for p in m.backbone.parameters())


def test_feature_weighter_gives_one_weight_per_context_pixel() -> None:
    m = _model(feature_weighter=True).train()
    m.generator = torch.Generator().manual_seed(0)
    out = m(torch.rand(2, 3, 64, 64))
    w = out.detail.weight
    assert w.shape == (2, 1, 8, 8) and ((w > 0) & (w < 1)).all()
    m.eval()
    with torch.no_grad():
        assert m(torch.rand(1, 3, 64, 64)).detail.weight is None  # only training passes need it


@pytest.mark.parametrize("kw, match", [
    (dict(decoder="deeplabv2"), "multi-level decode head"),
    (dict(detail_crop=30), "multiple of 8"),
    (dict(detail_stride=40), "detail_window_stride"),
    (dict(context_scale=0.25), "context_scale"),
    (dict(detail_loss_weight=1.0), "detail_loss_weight"),
])
def test_bad_hrda_settings_are_errors(kw: dict, match: str) -> None:
    args = dict(decoder="daformer", embed_dim=16, detail_crop=32, detail_stride=16)
    args.update(kw)
    backbone = "deeplabv2_r101" if kw.get("decoder") == "deeplabv2" else "mit_b0"
    with pytest.raises(ValueError, match=match):
        HRDASegmenter(backbone, K, **args)


def test_input_not_divisible_by_8_is_an_error() -> None:
    with pytest.raises(ValueError, match="divisible by 8"):
        _model().eval()(torch.rand(1, 3, 60, 64))


def test_entropy_crop_picks_each_images_most_uncertain_window() -> None:
    """CLUDA's crop: per image, the inference-grid window (detail_crop every detail_stride) whose mean entropy of the
    context prediction is highest; recomputed here on the full-resolution entropy map (nearest upsampling)."""
    m = _model()
    torch.manual_seed(5)
    logits = torch.randn(3, K, 8, 12) * 3  # context logits of a 64 × 96 input
    logits[1, :, 4:8, 8:12] = 0  # uniform there: maximal entropy at the bottom-right window of image 1
    boxes = m.entropy_boxes(logits, 64, 96)
    p = torch.softmax(logits, 1)
    ent = F.interpolate(-(p * p.log()).sum(1, keepdim=True), size=(64, 96), mode="nearest")[:, 0]
    windows = [(y, y + 32, x, x + 32) for y in (0, 16, 32) for x in (0, 16, 32, 48, 64)]
    for i in range(3):
        scores = [ent[i, y1:y2, x1:x2].mean().item() for y1, y2, x1, x2 in windows]
        assert boxes[i] == windows[max(range(len(windows)), key=lambda k: (scores[k], -k))]
    assert boxes[1] == (32, 64, 64, 96)


def test_per_image_boxes_cut_labels_and_paste_per_image() -> None:
    m = _model().train()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        feats = m.backbone(m.normalize(F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)))
        lr, _ = m.decoder(feats)
    lr = lr.clone()
    lr[0, :, :4, :4], lr[1, :, 4:, 4:] = 0, 0  # image 0 most uncertain top-left, image 1 bottom-right
    expected = m.entropy_boxes(lr, 64, 64)
    m.entropy_boxes = lambda *_: expected  # the boxes as drawn from these logits
    out = m(x, detail="entropy")
    assert out.detail.boxes == expected and expected[0] != expected[1]
    labels = torch.randint(0, K, (2, 64, 64))
    parts = m.seg_loss(out, labels)
    cut = torch.stack([labels[i, y1:y2, x1:x2] for i, (y1, y2, x1, x2) in enumerate(expected)])
    torch.testing.assert_close(parts["_detail"], 0.1 * cross_entropy(_up(out.detail.logits, (32, 32)), cut))
    for i, (y1, y2, x1, x2) in enumerate(expected):
        att = out.detail.attention[i, 0]
        inside = torch.zeros_like(att, dtype=torch.bool)
        inside[y1 // 8:y2 // 8, x1 // 8:x2 // 8] = True
        assert (att[~inside] == 0).all() and (att[inside] > 0).all()
    with pytest.raises(ValueError, match="detail = 'middle'"):
        m(x, detail="middle")
