"""Released trained models as a user meets them: ``uda-ray evaluate FILE --config RECIPE.yaml`` gives the mIoU of the
reference network the file was written from, beside the recipe's published number; a file of another recipe is
refused with the recipe it needs; ``model.init_from`` starts training from the file's weights (FD keeps the backbone
as built), and a resumed run ignores it."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import uda_ray.train.loop as loop
from tests.conftest import ROOT, tiny_overrides
from tests.models.test_models_released import (
    daformer_logits,
    daformer_reference,
    hrda_reference,
    perturb_,
    uda_checkpoint,
    udaray_checkpoint,
)
from tests.train.test_train_recipes import DAFORMER_TOY
from uda_ray.cli import main
from uda_ray.config import Config, apply_overrides, load_config, save_config
from uda_ray.models import unwrap
from uda_ray.preflight import PreflightError, check_init_from
from uda_ray.train.checkpoint import load_checkpoint
from uda_ray.train.images import colorize
from uda_ray.train.run_eval import PUBLISHED

K = 19


@pytest.fixture()
def recipe(tmp_path: Path, synthetic_cache: Path) -> Path:
    """DAFormer's recipe at toy scale (MiT-B0, the DAFormer head at width 16, FD, one iteration) under the shipped
    recipe's file name, so that its published number is looked up."""
    cfg = apply_overrides(Config(), tiny_overrides(synthetic_cache, **{
        **DAFORMER_TOY, "data.rcs.enabled": False, "run.iterations": 1, "run.eval_every": 1, "run.save_images": False}))
    path = tmp_path / "daformer_gta2cs.yaml"
    save_config(cfg, path)
    return path


def varied(ref):
    """The reference with a classifier whose spatial variation outweighs its biases: many classes predicted."""
    with torch.no_grad():
        ref.decode_head.conv_seg.weight.mul_(30)
        ref.decode_head.conv_seg.bias.zero_()
    return ref


def reference_predictions(ref, cfg: Config) -> tuple[dict[str, np.ndarray], float]:
    """The reference network's predictions on the recipe's val images (logits resized to the label, bilinear;
    argmax), by image name, and their mIoU from a confusion matrix written out here (IoU of each class present in
    the labels or the predictions, their mean)."""
    val = loop.build_val(cfg).loader
    conf = np.zeros((K, K), dtype=np.int64)
    preds = {}
    for batch in val:
        label = batch["label"]
        logits = F.interpolate(daformer_logits(ref, batch["image"]), size=label.shape[-2:], mode="bilinear",
                               align_corners=False)
        pred, keep = logits.argmax(1), label != 255
        np.add.at(conf, (label[keep].numpy(), pred[keep].numpy()), 1)
        for i, index in enumerate(batch["index"].tolist()):
            preds[Path(val.dataset.pairs[index][0]).stem] = pred[i].numpy()
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    return preds, float(np.mean(tp[union > 0] / union[union > 0]))


def read_prediction(png: Path) -> np.ndarray:
    """Train ids of a coloured prediction PNG (the Cityscapes palette)."""
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(np.int64)
    palette = colorize(np.arange(K, dtype=np.uint8)[None])[0].astype(np.int64)  # (K, 3)
    return np.abs(rgb[:, :, None, :] - palette).sum(-1).argmin(-1)  # (H, W)


def test_evaluate_a_released_file_with_its_recipe(tmp_path: Path, recipe: Path, capsys: pytest.CaptureFixture):
    student, teacher = varied(daformer_reference(seed=21)), varied(daformer_reference(seed=22))
    file = uda_checkpoint(tmp_path / "latest.pth", student, teacher)
    cfg = load_config(recipe)
    for argv, ref in (([], student), (["--weights", "ema_model"], teacher)):
        out = tmp_path / f"predictions{len(argv)}"
        assert main(["evaluate", str(file), "--config", str(recipe), "--save-images", str(out), *argv]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert any("skipped imnet_model.*" in line for line in lines)
        described = next(line for line in lines if line.startswith("evaluated: "))
        which = "the student (model.*)" if not argv else "the EMA teacher (ema_model.*)"
        assert described == (f"evaluated: {which} of {file} with daformer_gta2cs.yaml's network and evaluation on "
                             "the target val split: 3 images; IoU in percent")
        preds, miou = reference_predictions(ref, cfg)
        assert sorted(p.stem for p in out.glob("*.png")) == sorted(preds)
        for name, pred in preds.items():  # every pixel's class is the reference network's
            assert np.array_equal(read_prediction(out / f"{name}.png"), pred), name
        assert len({int(c) for p in preds.values() for c in np.unique(p)}) > 2  # the comparison means something
        row = next(line for line in lines if line.startswith("val/miou"))
        assert row.split()[1] == f"{100 * miou:.2f}"
        assert row.split("  published ", 1)[1] == "68.3: DAFormer paper, GTA5→Cityscapes, mean of 3 seeds; " \
                                                  "DAFormer's README: its released checkpoint gives 68.85"


def test_evaluate_refuses_a_file_of_another_recipe(tmp_path: Path, recipe: Path, capsys: pytest.CaptureFixture):
    ref = hrda_reference(seed=23)
    file = uda_checkpoint(tmp_path / "hrda.pth", ref, ref)
    assert main(["evaluate", str(file), "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert f"uda-ray: {file}: this is an HRDA checkpoint (keys decode_head.scale_attention.*; mit_b0" in err
    assert "use search_spaces/base/hrda_gta2cs.yaml" in err
    assert main(["evaluate", str(file), "--config", str(recipe), "--teacher", "--weights", "model"]) == 2
    assert "--teacher and --weights model contradict" in capsys.readouterr().err


class FirstStep:
    """Wraps ``loop.step``: keeps copies of the student, the teacher and FD's frozen backbone as the first
    iteration receives them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.step, self.seen = loop.step, None
        monkeypatch.setattr(loop, "step", self)

    def __call__(self, student, teacher, *args, terms, **kwargs):
        if self.seen is None:
            fd = next(t for t in terms if t.name == "fd")
            self.seen = (copy.deepcopy(unwrap(student)).eval(), copy.deepcopy(teacher).eval(),
                         copy.deepcopy(fd._frozen[0]))
        return self.step(student, teacher, *args, terms=terms, **kwargs)


def test_train_from_a_released_file(tmp_path: Path, recipe: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture):
    ref = daformer_reference(seed=24)
    file = uda_checkpoint(tmp_path / "latest.pth", ref, daformer_reference(seed=25))
    first = FirstStep(monkeypatch)
    assert main(["train", str(recipe), f"model.init_from={file}", "--name", "init", "--output-dir", str(tmp_path),
                 "--no-progress"]) == 0
    student, teacher, fd_backbone = first.seen
    x = torch.rand(2, 3, 32, 64, generator=torch.Generator().manual_seed(26))
    with torch.no_grad():
        expected = daformer_logits(ref, x)
        torch.testing.assert_close(student(x).logits, expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(teacher(x).logits, expected, rtol=1e-4, atol=1e-5)
    # FD's frozen copy is the backbone as built (here: the seeded random init), not the file's
    cfg = load_config(recipe)
    loop.seed_everything(cfg.run.seed, 0)
    built = loop.build_model(cfg).backbone.state_dict()
    assert all(torch.equal(v, built[k]) for k, v in fd_backbone.state_dict().items())
    assert not torch.equal(student.backbone.patch_embed1.proj.weight, built["patch_embed1.proj.weight"])
    capsys.readouterr()
    assert main(["train", str(recipe), f"model.init_from={tmp_path / 'absent.pth'}", "--name", "absent",
                 "--output-dir", str(tmp_path), "--no-progress"]) == 2  # preflight, before any training
    assert f"model.init_from = '{tmp_path / 'absent.pth'}': no such file" in capsys.readouterr().err


def test_init_from_a_udaray_checkpoint_and_resume_ignores_it(tmp_path: Path, recipe: Path,
                                                              monkeypatch: pytest.MonkeyPatch):
    """A chain's stage starts from an earlier stage's checkpoint (here its EMA teacher); resuming that stage starts
    from its own checkpoint instead."""
    cfg = load_config(recipe)
    student = loop.build_model(cfg)
    teacher = perturb_(copy.deepcopy(student), seed=27)  # an EMA teacher that differs from its student
    earlier = udaray_checkpoint(tmp_path / "a" / "iter_0000001", student, teacher).parent
    stage = apply_overrides(cfg, {"model.init_from": str(earlier), "model.init_weights": "ema_model"})
    check_init_from(stage)  # a checkpoint folder passes the preflight check; an empty folder does not
    (tmp_path / "empty").mkdir()
    with pytest.raises(PreflightError, match="model.init_from = .*empty'.*checkpoint folder holding checkpoint.pt"):
        check_init_from(apply_overrides(cfg, {"model.init_from": str(tmp_path / "empty")}))
    first = FirstStep(monkeypatch)
    loop.fit(stage, work_dir=tmp_path / "b")
    teacher = load_checkpoint(earlier)["teacher"]
    assert all(torch.equal(v, teacher[k]) for k, v in first.seen[0].state_dict().items())
    resumed = FirstStep(monkeypatch)
    own = tmp_path / "b" / "checkpoints" / "iter_0000001"
    loop.fit(apply_overrides(stage, {"run.iterations": 2}), work_dir=tmp_path / "c", resume_from=own)
    student = load_checkpoint(own)["student"]
    assert all(torch.equal(v, student[k]) for k, v in resumed.seen[0].state_dict().items())


def test_published_numbers_are_the_readmes_for_shipped_recipes():
    """Each recipe of ``PUBLISHED`` ships, and its number is the one the README's "Reproducing" sections give."""
    text = (ROOT / "README.md").read_text()
    reproducing = text[text.index("### Reproducing DAFormer"):text.index("### Evaluate a released model")]
    for name, (miou, source) in PUBLISHED.items():
        assert (ROOT / "search_spaces" / "base" / name).is_file(), name
        assert f"{miou}" in reproducing, (name, miou)
        protocol = load_config(ROOT / "search_spaces" / "base" / name).data.protocol
        assert ("16 classes" in source) == (protocol == 16), name  # the number is over the recipe's classes
