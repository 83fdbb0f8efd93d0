"""One UDA iteration: metrics, EMA, the registry of terms (each alone and all together), determinism, divergence."""

from __future__ import annotations

import math

import pytest
import torch

from uda_ray.config import Config, apply_overrides
from uda_ray.models import build_segmenter
from uda_ray.train.loop import build_model, build_optimizer, build_scheduler, step_settings
from uda_ray.train.step import DivergedError, batches_read, step
from uda_ray.train.terms import TERMS, build_terms

# each registry entry switched on alone, with the metric names it must report
TERM_ON = {
    "cluda": ({"loss.cluda.weight": 1.0, "loss.cluda.fm_size": 9}, ["train/loss_cluda"]),
    "cfcontra": ({"loss.cfcontra.weight": 0.1, "loss.cfcontra.proj_dim": 8}, ["train/loss_cfcontra"]),
    "entropy": ({"loss.entropy.weight": 0.1}, ["train/loss_entropy"]),
    "sdca": ({"loss.sdca.weight_feat": 1.0, "loss.sdca.weight_out": 1.0}, ["train/loss_sdca"]),
    "cross_view": ({"loss.cross_view.pixel_weight": 0.1, "loss.cross_view.proto_weight": 0.1,
                    "loss.cross_view.grid_size": 8}, ["train/loss_cross_view_pixel", "train/loss_cross_view_proto"]),
    "target_mix": ({"mix.target_to_source.enabled": True, "mix.target_to_source.t_max": 0.0},
                   ["train/loss_t2s"]),
    # 32×32 crops give a 1×1 last stage: every class, a 10 % majority
    "fd": ({"loss.fd.weight": 0.005, "loss.fd.classes": list(range(19)), "loss.fd.scale_min_ratio": 0.1,
            "loss.fd.without_pretrained": True},  # no ImageNet weights in a unit test
           ["train/loss_fd"]),
    "mic": ({"loss.mic.weight": 1.0, "loss.mic.block_size": 8}, ["train/loss_mic"]),
    "lovasz": ({"loss.lovasz.weight": 0.75}, ["train/loss_lovasz"]),
    # the target batch's labels stand for a pseudo_labels stage's (the step reads them from the batch)
    "self_training": ({"loss.self_training.weight": 1.0, "data.target_pseudo_labels": "offline-labels"},
                      ["train/loss_self_training"]),
}

TINY = {"model.backbone": "resnet18", "model.embed_dim": 8, "model.dropout": 0.0, "optim.lr": 1e-3,
        "optim.warmup_iters": 0, "run.iterations": 10, "data.crop": [32, 32], "teacher.pseudo_threshold": 0.5}


def _cfg(extra: dict | None = None) -> Config:
    return apply_overrides(Config(), {**TINY, **(extra or {})})


def _batches(seed: int = 0, b: int = 2, h: int = 32, w: int = 32):
    g = torch.Generator().manual_seed(seed)
    src = {"image": torch.rand(b, 3, h, w, generator=g), "label": torch.randint(0, 5, (b, h, w), generator=g)}
    src["label"][:, :2] = 255
    tgt = {"image": torch.rand(b, 3, h, w, generator=g), "label": torch.randint(0, 5, (b, h, w), generator=g)}
    return src, tgt


def _setup(cfg: Config, seed: int = 0):
    torch.manual_seed(seed)
    student = build_model(cfg)
    from uda_ray.models import make_teacher

    teacher = make_teacher(student)
    terms = torch.nn.ModuleList(build_terms(cfg, student))
    opt = build_optimizer(cfg, student)
    sched = build_scheduler(cfg, opt)
    return student, teacher, terms, opt, sched


def _run(cfg: Config, iters: int = 2, seed: int = 0, *, unread_as_none: bool = False,
         ) -> tuple[list[dict], torch.nn.Module, torch.nn.Module]:
    """``unread_as_none``: hand the step None for a batch that ``batches_read`` says it does not read, as the loop
    does."""
    student, teacher, terms, opt, sched = _setup(cfg, seed)
    gen = torch.Generator().manual_seed(seed)
    student.generator = gen  # HRDA's detail boxes, as the loop does
    read_src, read_tgt = batches_read(step_settings(cfg, torch.device("cpu")), terms)
    out = []
    for it in range(iters):
        src, tgt = _batches(it)
        if unread_as_none:
            src, tgt = (src if read_src else None), (tgt if read_tgt else None)
        out.append(step(student, teacher, opt, sched, src, tgt, it, settings=step_settings(cfg, torch.device("cpu")),
                        terms=terms, generator=gen))
    return out, student, teacher


def test_base_step_reports_losses_and_updates_teacher():
    cfg = _cfg()
    student, teacher, terms, opt, sched = _setup(cfg)
    before_s = [p.detach().clone() for p in student.parameters()]
    before_t = [p.detach().clone() for p in teacher.parameters()]
    src, tgt = _batches()
    m = step(student, teacher, opt, sched, src, tgt, 0, settings=step_settings(cfg, torch.device("cpu")),
             terms=terms, generator=torch.Generator().manual_seed(0))
    for key in ("train/loss", "train/loss_src", "train/loss_mix", "pseudo/keep_frac", "train/lr"):
        assert key in m and math.isfinite(m[key]), key
    assert m["train/loss"] == pytest.approx(m["train/loss_src"] + m["train/loss_mix"], rel=1e-5)
    assert 0.0 <= m["pseudo/keep_frac"] <= 1.0
    assert any(not torch.equal(a, b) for a, b in zip(before_s, student.parameters()))
    # alpha_0 = min(1 - 1/1, alpha) = 0: the teacher becomes the updated student
    for pt, ps in zip(teacher.parameters(), student.parameters()):
        assert torch.allclose(pt, ps)
    assert any(not torch.equal(a, b) for a, b in zip(before_t, teacher.parameters()))
    assert all(not p.requires_grad for p in teacher.parameters())


def test_source_only_skips_the_teacher():
    cfg = _cfg({"loss.mix_weight": 0.0})
    (m,), _, _ = _run(cfg, iters=1)
    assert "train/loss_mix" not in m and "pseudo/keep_frac" not in m
    assert m["train/loss"] == pytest.approx(m["train/loss_src"])


@pytest.mark.parametrize("source_weight", [1.0, 0.0])
@pytest.mark.parametrize("name", list(TERMS))
def test_a_batch_the_step_does_not_read_can_be_left_out(name: str, source_weight: float):
    """Without the mixed pass, each term alone (with and without the source CE): the step given None for the batch
    that ``batches_read`` calls unread computes the same losses and weights as with it, so the loop need not draw
    it. A term that reads only the source pass needs no target batch, one that reads only the target pass no
    source batch."""
    cfg = _cfg({**TERM_ON[name][0], "loss.mix_weight": 0.0, "loss.source_weight": source_weight})
    _, _, terms, _, _ = _setup(cfg)
    reads = batches_read(step_settings(cfg, torch.device("cpu")), terms)
    only = {t.reads for t in terms}
    assert reads == (source_weight > 0 or only != {frozenset({"tgt"})}, only != {frozenset({"src"})}), (name, only)
    full, s_full, t_full = _run(cfg, iters=2, seed=1)
    left, s_left, t_left = _run(cfg, iters=2, seed=1, unread_as_none=True)
    assert left == full
    for a, b in zip([*s_full.parameters(), *t_full.parameters()], [*s_left.parameters(), *t_left.parameters()]):
        assert torch.equal(a, b)


def test_batches_read_by_the_chain_stages():
    """The seeds' source-only warm-up (CE + Lovász, no mixing) reads no target batch; their self-training stage
    (offline target labels alone) no source batch; the base with mixing reads both."""
    def reads(overrides: dict) -> tuple[bool, bool]:
        cfg = _cfg(overrides)
        return batches_read(step_settings(cfg, torch.device("cpu")),
                            build_terms(cfg, build_segmenter("resnet18", 19, embed_dim=8)))

    assert reads({"loss.mix_weight": 0.0, "loss.lovasz.weight": 0.75}) == (True, False)
    assert reads({"loss.mix_weight": 0.0, "loss.source_weight": 0.0, **TERM_ON["self_training"][0]}) == (False, True)
    assert reads({}) == (True, True)
    assert reads({"loss.mix_weight": 0.0, "loss.mic.weight": 1.0}) == (True, True)  # its own pass: both, to be safe


def test_registry_builds_nothing_by_default():
    assert build_terms(_cfg(), build_segmenter("resnet18", 19, embed_dim=8)) == []


@pytest.mark.parametrize("name", list(TERMS))
def test_each_term_alone(name: str):
    overrides, keys = TERM_ON[name]
    cfg = _cfg(overrides)
    assert [t.name for t in build_terms(cfg, build_segmenter("resnet18", 19, embed_dim=8))], name
    metrics, _, _ = _run(cfg, iters=2)
    for m in metrics:
        for k in keys:
            assert k in m and math.isfinite(m[k]), (name, k, m)
        parts = sum(v for k, v in m.items() if k.startswith("train/loss_"))
        assert m["train/loss"] == pytest.approx(parts, rel=1e-4, abs=1e-6)


def test_all_terms_together_and_deterministic():
    overrides = {k: v for o, _ in TERM_ON.values() for k, v in o.items()}
    cfg = _cfg(overrides)
    a, sa, _ = _run(cfg, iters=2, seed=3)
    b, sb, _ = _run(cfg, iters=2, seed=3)
    assert a == b
    for pa, pb in zip(sa.parameters(), sb.parameters()):
        assert torch.equal(pa, pb)
    assert all(k in a[-1] for _, keys in TERM_ON.values() for k in keys)


def test_all_terms_together_under_hrda():
    """Every registered term reads HRDA's passes (fused logits, context features and fused map), here with the
    multi-level MLP head, CLUDA's multi-resolution contrast and its entropy-guided crop from the second iteration."""
    overrides = {k: v for o, _ in TERM_ON.values() for k, v in o.items()}
    overrides.update({"model.hrda.enabled": True, "model.hrda.detail_crop": 16, "model.hrda.detail_window_stride": 8,
                      "loss.cluda.multires": True, "loss.cluda.entropy_crop_after": 0})
    a, student, _ = _run(_cfg(overrides), iters=2, seed=3)
    b, _, _ = _run(_cfg(overrides), iters=2, seed=3)
    assert a == b
    for m in a:
        assert all(k in m and math.isfinite(m[k]) for _, keys in TERM_ON.values() for k in keys)
        assert m["train/loss_src_detail"] > 0 and m["train/loss_mix_detail"] > 0
        parts = sum(v for k, v in m.items() if k.startswith("train/loss_"))
        assert m["train/loss"] == pytest.approx(parts, rel=1e-4, abs=1e-6)
    assert type(student).__name__ == "HRDASegmenter"
    entropy, _, _ = _run(_cfg({**overrides, "loss.cluda.entropy_crop_after": 1}), iters=3, seed=3)
    assert entropy[:2] == a[:2] and entropy[2] != _run(_cfg(overrides), iters=3, seed=3)[0][2]


def test_non_finite_loss_raises_before_any_update():
    cfg = _cfg()
    student, teacher, terms, opt, sched = _setup(cfg)
    before = [p.detach().clone() for p in student.parameters()]
    src, tgt = _batches()
    src["image"][0, 0, 0, 0] = float("nan")
    with pytest.raises(DivergedError, match="Diverged at iteration 4: non-finite .*train/loss"):
        step(student, teacher, opt, sched, src, tgt, 4, settings=step_settings(cfg, torch.device("cpu")),
             terms=terms, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters()))


def _bn_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


@pytest.mark.parametrize("name", ["sdca", "cross_view", "target_mix"])
def test_aux_passes_leave_bn_statistics_when_asked(name: str):
    """With model.aux_pass_bn_update false, a term's extra student passes (plain target, strong view, target mix)
    leave the BatchNorm running statistics exactly as the source and mixed passes set them; by default they move."""
    _, base_student, _ = _run(_cfg(), iters=1)
    _, frozen, _ = _run(_cfg({**TERM_ON[name][0], "model.aux_pass_bn_update": False}), iters=1)
    _, moved, _ = _run(_cfg(TERM_ON[name][0]), iters=1)
    base, after_frozen, after_moved = _bn_buffers(base_student), _bn_buffers(frozen), _bn_buffers(moved)
    assert base.keys() == after_frozen.keys() and len(base) > 0
    assert all(torch.equal(base[k], after_frozen[k]) for k in base)
    assert any(not torch.equal(base[k], after_moved[k]) for k in base if k.endswith("running_mean"))


def test_bn_stats_frozen_normalises_with_the_batch_and_keeps_gradients():
    from uda_ray.train.context import bn_stats_frozen

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.BatchNorm2d(4, momentum=None))
    net.train()
    x = torch.randn(2, 3, 8, 8)
    reference = net(x)  # moves the statistics once
    before = _bn_buffers(net)
    with bn_stats_frozen(net):
        out = net(x)
    assert torch.allclose(out, reference)  # batch statistics, as in train mode
    assert all(torch.equal(before[k], v) for k, v in _bn_buffers(net).items())
    assert (net[1].momentum, net[2].momentum) == (0.1, None)
    out.sum().backward()
    assert net[0].weight.grad is not None and net[0].weight.grad.abs().sum() > 0
