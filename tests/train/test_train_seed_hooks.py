"""What the seeds' later stages start from: SDCA's statistics (loss.sdca.init_stats), CFContra's centroid banks
(loss.cfcontra.init_centroids) and nearest-centroid target labels (teacher.kind), and EHTDI's evaluated EMA copy
(eval.model, eval.ema_alpha), in unit tests and toy runs that resume exactly."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import tiny_overrides
from uda_ray.adaptation import ClassStatistics
from uda_ray.config import Config, ConfigError, apply_overrides
from uda_ray.losses import prototype_contrast
from uda_ray.models import build_segmenter
from uda_ray.train.checkpoint import load_checkpoint
from uda_ray.train.loop import build_model, fit
from uda_ray.train.offline import save_centroids, save_class_statistics
from uda_ray.train.run_eval import evaluate_checkpoint
from uda_ray.train.terms.cfcontra import build_cfcontra
from uda_ray.train.terms.sdca import build_sdca

K = 19


def model():
    return build_segmenter("resnet18", K, embed_dim=8)


# ------------------------------------------------------------------------------------------------- SDCA statistics
def test_sdca_statistics_start_from_the_file(tmp_path: Path):
    feat, out = ClassStatistics(K, 512), ClassStatistics(K, K)
    feat.update(torch.randn(40, 512), torch.randint(0, K, (40,)))
    out.update(torch.randn(40, K), torch.randint(0, K, (40,)))
    path = save_class_statistics(tmp_path / "class_stats.pt", feat, out)
    cfg = apply_overrides(Config(), {"loss.sdca.weight_feat": 1.0, "loss.sdca.init_stats": str(path)})
    term = build_sdca(cfg, model())
    for got, want in ((term.stats_feat, feat), (term.stats_out, out)):
        for name in ("mean", "var", "count"):
            assert torch.equal(getattr(got, name), getattr(want, name))
    assert build_sdca(apply_overrides(Config(), {"loss.sdca.weight_feat": 1.0}), model()).stats_feat.count.sum() == 0
    wrong = save_class_statistics(tmp_path / "wrong.pt", ClassStatistics(K, 64), out)
    with pytest.raises(ValueError, match=r"loss.sdca.init_stats = '.*wrong.pt'.*\(19, 512\)"):
        build_sdca(apply_overrides(cfg, {"loss.sdca.init_stats": str(wrong)}), model())


# ----------------------------------------------------------------------------------------------- CFContra banks
def test_cfcontra_banks_start_from_the_centroids(tmp_path: Path):
    src, tgt = torch.rand(K, 8), torch.rand(K, 8)
    src[3] = 0  # a class the centroid stage never saw stays unfilled
    path = save_centroids(tmp_path / "centroids.pt", src, tgt)
    cfg = apply_overrides(Config(), {"loss.cfcontra.weight": 0.1, "loss.cfcontra.proj_dim": 8,
                                     "loss.cfcontra.init_centroids": str(path)})
    term = build_cfcontra(cfg, model())
    torch.testing.assert_close(term.bank_src.entries()[:, 0], F.normalize(src, dim=1))
    torch.testing.assert_close(term.bank_tgt.entries()[:, 0], F.normalize(tgt, dim=1))
    assert term.bank_src.fill[3] == 0 and term.bank_src.fill.sum() == K - 1
    with pytest.raises(ValueError, match=r"loss.cfcontra.init_centroids = .*\(19, 8\).*\(19, 16\)"):
        build_cfcontra(apply_overrides(cfg, {"loss.cfcontra.proj_dim": 16}), model())
    with pytest.raises(FileNotFoundError, match="loss.cfcontra.init_centroids = .*nowhere.pt"):
        build_cfcontra(apply_overrides(cfg, {"loss.cfcontra.init_centroids": str(tmp_path / "nowhere.pt")}), model())


def nearest_by_loops(f: torch.Tensor, centroids: torch.Tensor, margin: float) -> int:
    dist = sorted((float((f - centroids[c]).norm()), c) for c in range(len(centroids)) if centroids[c].norm() > 0)
    return 255 if len(dist) > 1 and dist[1][0] - dist[0][0] < margin else dist[0][1]


def test_nearest_centroid_teacher_labels_the_target_by_the_source_bank():
    g = torch.Generator().manual_seed(0)
    cfg = apply_overrides(Config(), {"loss.cfcontra.weight": 0.1, "loss.cfcontra.proj_dim": 4, "loss.mix_weight": 0.0,
                                     "loss.cfcontra.margin": 0.05, "teacher.kind": "nearest_centroid"})
    term = build_cfcontra(cfg, model())
    start = torch.rand(K, 4, generator=g)
    start[5:] = 0  # five filled source centroids
    term.bank_src.start_from(start)
    term.bank_tgt.start_from(torch.rand(K, 4, generator=g))
    bank_src, bank_tgt = term.bank_src.entries().clone(), term.bank_tgt.entries().clone()
    proj_src, proj_tgt = 2 * torch.rand(2, 4, 3, 3, generator=g), 2 * torch.rand(2, 4, 3, 3, generator=g)
    y_src = torch.randint(0, 5, (2, 6, 6), generator=g)

    class NoTeacher:
        @property
        def pseudo(self):
            raise AssertionError("teacher.kind nearest_centroid must not ask the EMA teacher")

    ctx = NoTeacher()
    ctx.out_src, ctx.out_tgt, ctx.y_src = SimpleNamespace(proj=proj_src), SimpleNamespace(proj=proj_tgt), y_src
    loss = term(ctx)["cfcontra"]
    centroids = F.normalize(start, dim=1)
    y_tgt = torch.tensor([nearest_by_loops(proj_tgt[b, :, i, j], centroids, 0.05)
                          for b in range(2) for i in range(3) for j in range(3)])
    assert (y_tgt == 255).any() and (y_tgt != 255).any()
    f_src = F.normalize(proj_src, dim=1).permute(0, 2, 3, 1).reshape(-1, 4)
    f_tgt = F.normalize(proj_tgt, dim=1).permute(0, 2, 3, 1).reshape(-1, 4)
    ys = y_src[:, ::2, ::2].reshape(-1)
    want = 0.1 * (prototype_contrast(f_src, ys, bank_src, temperature=0.07)
                  + prototype_contrast(f_tgt, y_tgt, bank_tgt, temperature=0.07)
                  + prototype_contrast(f_tgt, y_tgt, bank_src, temperature=0.07)
                  + prototype_contrast(f_src, ys, bank_tgt, temperature=0.07))
    torch.testing.assert_close(loss, want)


@pytest.mark.parametrize("extra, message", [
    ({}, "loss.mix_weight"),
    ({"loss.mix_weight": 0.0, "loss.sdca.weight_feat": 1.0}, "loss.sdca.weight_feat"),
    ({"loss.mix_weight": 0.0, "loss.mic.weight": 1.0}, "loss.mic.weight"),
    ({"loss.mix_weight": 0.0, "mix.target_to_source.enabled": True}, "mix.target_to_source.enabled"),
    ({"loss.mix_weight": 0.0, "loss.cfcontra.weight": 0.0}, "set loss.cfcontra.weight > 0"),
])
def test_nearest_centroid_teacher_serves_cfcontra_only(extra, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(Config(), {"teacher.kind": "nearest_centroid", "loss.cfcontra.weight": 0.1, **extra})


# ------------------------------------------------------------------------------------------------------ toy runs
def _resumes_exactly(cfg: Config, tmp_path: Path) -> tuple[list[dict], Path]:
    """Train once, then again from the middle checkpoint: the resumed run reports what the first one did."""
    full: list[dict] = []
    last: list[Path] = []

    def keep_all(m: dict, c: Path | None) -> None:
        full.append(m)
        if c is not None:
            last.append(c)
            if int(m["iteration"]) == cfg.run.iterations // 2:
                shutil.copytree(c, tmp_path / "ckpt")

    assert fit(cfg, work_dir=tmp_path / "a", report=keep_all).status == "completed"
    rerun: list[dict] = []
    fit(cfg, work_dir=tmp_path / "b", report=lambda m, c: rerun.append(m), resume_from=tmp_path / "ckpt")
    assert _plain(rerun) == _plain(full)[len(full) // 2:]
    return full, last[-1]


def _plain(rows: list[dict]) -> list[dict]:
    """Reports without timings; NaN (a class absent from the val images) as a string, so equal rows compare equal."""
    return [{k: "nan" if isinstance(v, float) and math.isnan(v) else v for k, v in m.items()
             if not k.startswith("time/")} for m in rows]


def test_toy_cfcontra_from_centroids_with_nearest_centroid_labels(tmp_path: Path, synthetic_cache: Path):
    cfg = apply_overrides(Config(), tiny_overrides(synthetic_cache, **{
        "loss.mix_weight": 0.0, "loss.cfcontra.weight": 0.1, "loss.cfcontra.proj_dim": 96, "teacher.kind":
            "nearest_centroid", "loss.cfcontra.margin": 0.001, "run.iterations": 4, "run.eval_every": 2,
        "run.checkpoint_every": 2, "run.save_images": False}))
    torch.manual_seed(0)
    layer4 = build_model(cfg).feature_channels[-1]
    assert layer4 == 96
    path = save_centroids(tmp_path / "centroids.pt", torch.rand(K, 96), torch.rand(K, 96))
    cfg = apply_overrides(cfg, {"loss.cfcontra.init_centroids": str(path)})
    full, _ = _resumes_exactly(cfg, tmp_path)
    assert all(math.isfinite(m["train/loss_cfcontra"]) and m["train/loss_cfcontra"] > 0 for m in full)
    assert all("pseudo/keep_frac" not in m for m in full)  # the EMA teacher labelled nothing


def test_toy_sdca_from_statistics(tmp_path: Path, synthetic_cache: Path):
    cfg = apply_overrides(Config(), tiny_overrides(synthetic_cache, **{
        "loss.mix_weight": 0.0, "loss.sdca.weight_feat": 1.0, "loss.sdca.weight_out": 1.0, "loss.lovasz.weight": 0.75,
        "run.iterations": 2, "run.eval_every": 1, "run.checkpoint_every": 1, "run.save_images": False}))
    feat, out = ClassStatistics(K, 96), ClassStatistics(K, K)
    feat.update(torch.rand(200, 96), torch.randint(0, K, (200,)))
    out.update(torch.randn(200, K), torch.randint(0, K, (200,)))
    cfg = apply_overrides(cfg, {"loss.sdca.init_stats": str(save_class_statistics(tmp_path / "s.pt", feat, out))})
    full, ckpt = _resumes_exactly(cfg, tmp_path)
    assert all(m["train/loss_sdca"] > 0 and m["train/loss_lovasz"] > 0 for m in full)
    counts = load_checkpoint(ckpt)["terms"]["0.stats_feat.count"]
    assert int(counts.sum()) > int(feat.count.sum())  # started from the file, then updated by training


def test_toy_ema_evaluation_resumes_and_is_what_evaluate_reads(tmp_path: Path, synthetic_cache: Path):
    base = tiny_overrides(synthetic_cache, **{"eval.model": "ema", "eval.ema_alpha": 0.9, "run.iterations": 4,
                                              "run.eval_every": 2, "run.checkpoint_every": 2, "run.save_images": False})
    cfg = apply_overrides(Config(), base)
    full, ckpt = _resumes_exactly(cfg, tmp_path)
    state = load_checkpoint(ckpt)
    assert "eval_ema" in state
    assert any(not torch.equal(state["eval_ema"][k], state["student"][k]) for k in state["student"]
               if state["student"][k].is_floating_point())
    reported = full[-1]["val/miou"]
    ema = evaluate_checkpoint(ckpt)
    assert ema.model == "ema" and ema.metrics["val/miou"] == pytest.approx(reported, abs=1e-12)
    student = evaluate_checkpoint(ckpt, overrides=["eval.model=student"])
    assert student.model == "student" and student.metrics["val/miou"] != pytest.approx(reported, abs=1e-12)
    # ema_alpha 0: the copy is the student after every step, so the run reports the student's score
    same: list[dict] = []
    fit(apply_overrides(cfg, {"eval.ema_alpha": 0.0}), work_dir=tmp_path / "c", report=lambda m, c: same.append(m))
    plain: list[dict] = []
    fit(apply_overrides(cfg, {"eval.model": "student"}), work_dir=tmp_path / "d", report=lambda m, c: plain.append(m))
    assert [m.get("val/miou") for m in same] == [m.get("val/miou") for m in plain]
