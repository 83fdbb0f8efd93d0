"""pretrained_path: loading a local backbone state dict or a full timm classification checkpoint, and its errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from uda_ray.models import build_segmenter


def _features(model, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return model.eval()(x).features


@pytest.mark.parametrize("backbone", ["resnet18", "test_convnext", "pvt_v2_b0"])
def test_backbone_state_dict_round_trip(tmp_path: Path, backbone: str) -> None:
    torch.manual_seed(0)
    source = build_segmenter(backbone, 3, embed_dim=8)
    with torch.no_grad():  # make BN statistics non-trivial so that buffers are checked too
        source.train()(torch.rand(2, 3, 64, 64))
    path = tmp_path / "backbone.pth"
    torch.save(source.backbone.state_dict(), path)

    torch.manual_seed(1)
    fresh = build_segmenter(backbone, 3, embed_dim=8)
    torch.manual_seed(1)
    loaded = build_segmenter(backbone, 3, embed_dim=8, pretrained_path=str(path))
    x = torch.rand(2, 3, 64, 96)
    for a, b in zip(_features(source, x), _features(loaded, x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(_features(fresh, x)[-1], _features(source, x)[-1])
    # the decoder is left as built (same seed → same decoder as the fresh model)
    for k, v in fresh.decoder.state_dict().items():
        torch.testing.assert_close(loaded.decoder.state_dict()[k], v)


def _resnet18_reference(full: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The four stride-4…32 stages of a torchvision-style ResNet written out by hand."""
    h = full.maxpool(full.act1(full.bn1(full.conv1(x))))
    out = []
    for layer in (full.layer1, full.layer2, full.layer3, full.layer4):
        h = layer(h)
        out.append(h)
    return out


@pytest.mark.parametrize("backbone", ["resnet18", "test_convnext", "pvt_v2_b0"])
def test_full_classification_checkpoint_loads(tmp_path: Path, backbone: str) -> None:
    torch.manual_seed(5)
    full = timm.create_model(backbone, num_classes=7).eval()  # a classifier of another size is dropped too
    path = tmp_path / "full.pth"
    torch.save({"state_dict": full.state_dict()}, path)
    model = build_segmenter(backbone, 3, embed_dim=8, pretrained_path=str(path))
    x = torch.rand(1, 3, 64, 64)
    x_norm = (x - model.pixel_mean) / model.pixel_std
    with torch.no_grad():
        if backbone == "resnet18":
            ref = _resnet18_reference(full, x_norm)
        else:
            ref = full.forward_intermediates(x_norm, indices=4, intermediates_only=True)
    got = _features(model, x)
    assert len(got) == len(ref) == 4
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)


def _saved(tmp_path: Path, state: object, name: str = "ckpt.pth") -> str:
    path = tmp_path / name
    torch.save(state, path)
    return str(path)


def test_unknown_key_names_file_and_key(tmp_path: Path) -> None:
    sd = build_segmenter("resnet18", 3, embed_dim=8).backbone.state_dict()
    sd["layer9.conv.weight"] = torch.zeros(1)
    path = _saved(tmp_path, sd, "extra.pth")
    with pytest.raises(ValueError, match=r"extra\.pth.*unknown keys.*layer9\.conv\.weight"):
        build_segmenter("resnet18", 3, pretrained_path=path)


def test_missing_key_names_file_and_key(tmp_path: Path) -> None:
    sd = build_segmenter("resnet18", 3, embed_dim=8).backbone.state_dict()
    del sd["layer2.0.bn1.running_var"]
    path = _saved(tmp_path, sd, "partial.pth")
    with pytest.raises(ValueError, match=r"partial\.pth.*missing backbone keys.*layer2\.0\.bn1\.running_var"):
        build_segmenter("resnet18", 3, pretrained_path=path)


def test_missing_key_in_full_checkpoint(tmp_path: Path) -> None:
    sd = timm.create_model("test_convnext").state_dict()
    del sd["stages.1.blocks.0.gamma"]
    path = _saved(tmp_path, sd, "full_partial.pth")
    with pytest.raises(ValueError, match=r"full_partial\.pth.*missing backbone keys.*stages_1\.blocks\.0\.gamma"):
        build_segmenter("test_convnext", 3, pretrained_path=path)


def test_shape_mismatch_names_file_and_key(tmp_path: Path) -> None:
    sd = build_segmenter("resnet18", 3, embed_dim=8).backbone.state_dict()
    path = _saved(tmp_path, sd, "r18.pth")
    with pytest.raises(ValueError, match=r"r18\.pth.*shape mismatches.*conv1\.weight"):
        build_segmenter("resnet50", 3, pretrained_path=path)


def test_other_architecture_is_rejected(tmp_path: Path) -> None:
    sd = build_segmenter("test_convnext", 3, embed_dim=8).backbone.state_dict()
    path = _saved(tmp_path, sd, "convnext.pth")
    with pytest.raises(ValueError, match=r"convnext\.pth.*does not fit backbone 'resnet18'"):
        build_segmenter("resnet18", 3, pretrained_path=path)


def test_not_a_state_dict(tmp_path: Path) -> None:
    path = _saved(tmp_path, [1, 2, 3], "list.pth")
    with pytest.raises(ValueError, match=r"list\.pth.*mapping of parameter names to tensors"):
        build_segmenter("resnet18", 3, pretrained_path=path)


def test_unsafe_pickle_is_refused(tmp_path: Path) -> None:
    path = _saved(tmp_path, {"w": torch.zeros(1), "obj": Path("x")}, "pickle.pth")
    with pytest.raises(ValueError, match=r"pickle\.pth.*weights_only=True"):
        build_segmenter("resnet18", 3, pretrained_path=path)


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nowhere.pth")
    with pytest.raises(FileNotFoundError, match=r"nowhere\.pth"):
        build_segmenter("resnet18", 3, pretrained_path=path)
