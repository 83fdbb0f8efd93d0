"""The offline stages' model-running parts on a tiny stub network and a folder of PNGs: SDCA's pseudo-labels (against
a numpy reference of get_threshold and test), SDCA's source statistics (against pooled moments), CFContra's centroids
(against the pure functions fed by an explicit loop), and the files the terms read (round trip and errors)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from uda_ray.adaptation import ClassStatistics
from uda_ray.adaptation.centroids import source_centroids, target_centroids
from uda_ray.data.readers import SegmentationDataset, read_train_ids
from uda_ray.data.transforms import EvalTransform, TrainTransform
from uda_ray.train.offline import (
    compute_centroids,
    label_path,
    load_centroids,
    load_class_statistics,
    offline_pseudo_labels,
    save_centroids,
    save_class_statistics,
    source_class_statistics,
)

C, D = 4, 6
CPU = torch.device("cpu")


class Stub(nn.Module):
    """Features at 1/4 (with BatchNorm: eval and train mode differ), logits at 1/2 of the input."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.num_classes = C
        self.embed = nn.Conv2d(3, D, 1)
        self.bn = nn.BatchNorm2d(D)
        self.classify = nn.Conv2d(D, C, 1)
        self.bn.running_mean.fill_(0.1)
        self.bn.running_var.fill_(2.0)
        self.modes: list[bool] = []

    def forward(self, x):
        self.modes.append(self.training)
        f = self.bn(F.avg_pool2d(self.embed(x), 4)).relu()  # (B, D, h/4, w/4)
        logits = F.interpolate(self.classify(f) * 4, scale_factor=2.0, mode="nearest")  # (B, C, h/2, w/2)
        return SimpleNamespace(logits=logits, features=[f])


def folder(tmp_path: Path, n: int = 3, size: tuple[int, int] = (20, 28)) -> tuple[Path, list]:
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    pairs = []
    for i in range(n):
        image, label = root / "images" / "city" / f"{i}_img.png", root / "labels" / f"{i}.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        label.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(image)
        y = rng.integers(0, C, size, dtype=np.uint8)
        y[0] = 255
        Image.fromarray(y).save(label)
        pairs.append((image, label))
    return root, pairs


def reference_pseudo_labels(model, dataset):
    """get_threshold then test of SDCA's pseudo_label.py, written out with numpy."""
    model.eval()
    probs, preds = [], []
    with torch.no_grad():
        for i in range(len(dataset)):
            x = dataset[i]["image"][None]
            p = torch.softmax(F.interpolate(model(x).logits, size=x.shape[-2:], mode="bilinear",
                                            align_corners=True), dim=1)[0].numpy()
            probs.append(p.max(0).ravel())
            preds.append(p.argmax(0).ravel())
    prob, pred = np.concatenate(probs), np.concatenate(preds)
    thres = []
    for c in range(C):
        x = np.sort(prob[pred == c])
        thres.append(0 if len(x) == 0 else x[int(np.round(len(x) * 0.5))])
    thres = np.array(thres, dtype=np.float32)
    thres[thres > 0.6] = 0.6
    labels = []
    with torch.no_grad():
        for i in range(len(dataset)):
            item = dataset[i]
            p = torch.softmax(F.interpolate(model(item["image"][None]).logits, size=item["label"].shape,
                                            mode="bilinear", align_corners=True), dim=1)[0].numpy()
            lab = p.argmax(0)
            for c in range(C):
                lab[(p.max(0) < thres[c]) & (lab == c)] = 255
            labels.append(lab)
    return thres, labels


@pytest.mark.parametrize("batch_size", [1, 2])
def test_offline_pseudo_labels_match_sdca(tmp_path: Path, batch_size: int):
    root, pairs = folder(tmp_path)
    dataset = SegmentationDataset(pairs, read_train_ids, EvalTransform((12, 16)))
    model = Stub().train()
    result = offline_pseudo_labels(model, dataset, tmp_path / "out", root=root, device=CPU, cap=0.6,
                                   batch_size=batch_size)
    assert model.training and not any(model.modes)  # run in eval mode, left in train mode
    thres, labels = reference_pseudo_labels(model, dataset)
    np.testing.assert_allclose(result["thresholds"], thres, rtol=1e-6)
    assert result["num_images"] == 3 and 0 < result["kept_fraction"] < 1
    for (image, _), want in zip(pairs, labels):
        file = tmp_path / "out" / "labels" / "images" / "city" / f"{image.stem}.png"
        assert file == label_path(tmp_path / "out", root, image)
        got = read_train_ids(file)
        assert got.shape == (20, 28)  # the image's own size
        np.testing.assert_array_equal(got, want)
    kept = [(lab != 255) for lab in labels]
    assert result["kept_fraction"] == pytest.approx(sum(k.sum() for k in kept) / (3 * 20 * 28))


def test_source_class_statistics_are_pooled_moments(tmp_path: Path):
    _, pairs = folder(tmp_path, n=3)
    dataset = SegmentationDataset(pairs, read_train_ids, TrainTransform((16, 24), (16, 24), flip=False))
    model = Stub()
    feat, out = source_class_statistics(model, dataset, device=CPU)
    assert not any(model.modes)
    pixels = {"feat": [], "out": []}
    model.eval()
    with torch.no_grad():
        for i in range(len(dataset)):
            item = dataset[i]
            result = model(item["image"][None])
            for name, level in (("feat", result.features[-1]), ("out", result.logits)):
                h, w = level.shape[-2:]
                rows = torch.arange(h) * item["label"].shape[0] // h  # nearest: floor(i · H / h)
                cols = torch.arange(w) * item["label"].shape[1] // w
                y = item["label"][rows][:, cols]
                pixels[name].append((level[0].permute(1, 2, 0).reshape(-1, level.shape[1]), y.reshape(-1)))
    for name, stats in (("feat", feat), ("out", out)):
        f = torch.cat([p for p, _ in pixels[name]]).double()
        y = torch.cat([t for _, t in pixels[name]])
        for c in range(C):
            sel = f[y == c]
            assert int(stats.count[c]) == len(sel)
            torch.testing.assert_close(stats.mean[c].double(), sel.mean(0), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(stats.var[c].double(), sel.var(0, unbiased=False), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("train_mode", [True, False])
def test_compute_centroids_runs_the_pure_functions_on_layer4(tmp_path: Path, train_mode: bool):
    _, pairs = folder(tmp_path, n=4)
    dataset = SegmentationDataset(pairs, read_train_ids, TrainTransform((16, 24), (16, 24), flip=False))
    model = Stub()
    model.eval()  # the mode it is handed in is given back
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    src, tgt = compute_centroids(model, dataset, dataset, device=CPU, source_batches=None, target_batches=None,
                                 margin=0.01, train_mode=train_mode)
    assert set(model.modes) == {train_mode} and not model.training
    # train mode leaves BatchNorm's running statistics as they were
    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())
    reference = Stub()  # the official calls: one image per batch, the network in the mode given, no gradients
    reference.train(train_mode)
    with torch.no_grad():
        outs = [(reference(dataset[i]["image"][None]), dataset[i]["label"][None]) for i in range(len(dataset))]
    want_src = source_centroids(((o.features[-1], y, o.logits) for o, y in outs), C)
    want_tgt = target_centroids((o.features[-1] for o, _ in outs), want_src, C, margin=0.01)
    torch.testing.assert_close(src, want_src, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tgt, want_tgt, rtol=1e-5, atol=1e-6)
    limited, _ = compute_centroids(model, dataset, dataset, device=CPU, source_batches=1, target_batches=1,
                                   margin=0.01, train_mode=train_mode)
    assert not torch.allclose(limited, src)  # one image is not the whole split


def test_centroids_in_train_and_eval_mode_differ(tmp_path: Path):
    """The Stub's BatchNorm has stored statistics far from any image's: the two modes give other centroids."""
    _, pairs = folder(tmp_path, n=2)
    dataset = SegmentationDataset(pairs, read_train_ids, TrainTransform((16, 24), (16, 24), flip=False))
    by_mode = [compute_centroids(Stub(), dataset, dataset, device=CPU, source_batches=None, target_batches=None,
                                 margin=0.01, train_mode=mode)[0] for mode in (True, False)]
    assert not torch.allclose(*by_mode)


def test_class_statistics_file_round_trip_and_errors(tmp_path: Path):
    feat, out = ClassStatistics(C, D), ClassStatistics(C, C)
    feat.update(torch.randn(10, D), torch.randint(0, C, (10,)))
    out.update(torch.randn(10, C), torch.randint(0, C, (10,)))
    path = save_class_statistics(tmp_path / "class_stats.pt", feat, out)
    f_state, o_state = load_class_statistics(path, key="loss.sdca.init_stats", num_classes=C, feat_dim=D)
    assert torch.equal(f_state["mean"], feat.mean) and torch.equal(o_state["count"], out.count)
    with pytest.raises(ValueError, match=r"loss.sdca.init_stats = .*class_stats.pt.*\(4, 6\).*\(4, 8\)"):
        load_class_statistics(path, key="loss.sdca.init_stats", num_classes=C, feat_dim=8)
    with pytest.raises(FileNotFoundError, match="loss.sdca.init_stats = .*missing.pt"):
        load_class_statistics(tmp_path / "missing.pt", key="loss.sdca.init_stats", num_classes=C, feat_dim=D)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="loss.sdca.init_stats = .*junk.pt.*cannot be read"):
        load_class_statistics(tmp_path / "junk.pt", key="loss.sdca.init_stats", num_classes=C, feat_dim=D)


def test_centroid_file_round_trip_and_errors(tmp_path: Path):
    src, tgt = torch.randn(C, D), torch.randn(C, D)
    path = save_centroids(tmp_path / "centroids.pt", src, tgt)
    a, b = load_centroids(path, key="loss.cfcontra.init_centroids", num_classes=C, dim=D)
    assert torch.equal(a, src) and torch.equal(b, tgt)
    with pytest.raises(ValueError, match=r"loss.cfcontra.init_centroids = .*\(4, 6\).*\(4, 2048\)"):
        load_centroids(path, key="loss.cfcontra.init_centroids", num_classes=C, dim=2048)
    torch.save({"feat": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="expected the tensors 'source' and 'target'"):
        load_centroids(tmp_path / "other.pt", key="loss.cfcontra.init_centroids", num_classes=C, dim=D)
