"""``fit``: the training loop around ``step``, written out (no callbacks, no trainer hierarchy) and Ray-free.

Builds data, student, teacher, optimiser, schedule and terms from the config, optionally resumes from a
checkpoint, then iterates: step → (every ``log_every``) report averaged metrics → (every ``eval_every``) mIoU on
the target val split → (every ``checkpoint_every``) checkpoint. Under ``torch.distributed`` the caller has set up
the process group; metrics are all-reduced before they are reported, so every rank reports the same numbers.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from uda_ray.config import Config, PhotometricConfig, to_dict
from uda_ray.data.class_balanced import ClassBalancedSpec, build_class_balanced
from uda_ray.data.holdout import holdout_split, image_groups
from uda_ray.data.labels import eval_class_ids
from uda_ray.data.loaders import build_train_loader, build_val_loader
from uda_ray.data.offline_labels import use_offline_labels
from uda_ray.data.pil_photometric import Photometric
from uda_ray.data.rcs import RareClassSpec, build_rcs
from uda_ray.data.readers import SegmentationDataset, build_dataset
from uda_ray.data.synthetic import ensure_synthetic
from uda_ray.data.transforms import EvalTransform, TrainTransform
from uda_ray.models import build_segmenter, ema_update, make_teacher, unwrap
from uda_ray.models.hrda import HRDASegmenter
from uda_ray.models.released import load_released
from uda_ray.train.checkpoint import load_checkpoint, save_checkpoint, set_rng_state
from uda_ray.train.evaluate import evaluate, inference_fn
from uda_ray.train.images import pick_indices, prediction_grid
from uda_ray.train.step import DivergedError, StepSettings, batches_read, step
from uda_ray.train.terms import build_terms

NUM_CLASSES = 19  # train ids; the protocol (19/16/13) selects the classes that are evaluated
DEFAULT_THREADS = torch.get_num_threads()  # torch's own choice, before any run changes it
log = logging.getLogger(__name__)

T = TypeVar("T")
Reporter = Callable[[dict[str, float], "Path | None"], None]
ImageSink = Callable[[str, bytes], None]  # (file name, PNG bytes): where the prediction grids go


@dataclass
class FitResult:
    status: str  # "completed" | "diverged"
    iteration: int
    metrics: dict[str, float] = field(default_factory=dict)  # the last report
    error: str = ""


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1

    @staticmethod
    def current() -> DistInfo:
        if dist.is_available() and dist.is_initialized():
            return DistInfo(dist.get_rank(), dist.get_world_size())
        return DistInfo()


# -------------------------------------------------------------------------------------------------- builders
def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device = 'cuda' but torch sees no CUDA device")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def data_roots(cfg: Config) -> tuple[Path, Path]:
    """Source and target dataset folders; the synthetic pair is generated (once) into its cache."""
    d, s = cfg.data, cfg.data.synthetic
    src, tgt = Path(d.source_root), Path(d.target_root)
    if d.source == "synthetic" or d.target == "synthetic":
        syn_src, syn_tgt = ensure_synthetic(s.cache_dir, seed=s.seed, num_source=s.num_source,
                                            num_target=s.num_target, num_val=s.num_val, height=s.height,
                                            width=s.width, shift_strength=s.shift_strength)
        src = syn_src if d.source == "synthetic" else src
        tgt = syn_tgt if d.target == "synthetic" else tgt
    return src, tgt


def _reader(name: str, side: str) -> str:
    return {"synthetic": "gta5" if side == "source" else "cityscapes"}.get(name, name)


@dataclass(frozen=True)
class ValData:
    """The evaluation split: this rank's loader and, under ``eval.holdout``, the dataset indices of the report half
    (scored apart as ``holdout/*``; ``uda_ray.data.holdout``)."""

    loader: DataLoader
    report_indices: list[int] | None
    num_images: int


def build_val(cfg: Config, split: str = "val", dist_info: DistInfo | None = None, *,
              target_root: Path | None = None) -> ValData:
    """The target ``split`` at the inference size, sharded by rank; the report half only for the val split."""
    d, di = cfg.data, dist_info or DistInfo()
    root = target_root if target_root is not None else data_roots(cfg)[1]
    name = _reader(d.target, "target")
    ds = build_dataset(name, root, split, EvalTransform(d.val_resize, keep_ratio=d.keep_ratio),
                       cache_in_memory=d.target == "synthetic", label_format=d.label_format,
                       resize_labels=d.resize_labels)
    loader = build_val_loader(ds, rank=di.rank, world_size=di.world_size, max_images=d.val_max_images,
                              num_workers=d.loader_workers)
    n = len(ds) if d.val_max_images <= 0 else min(len(ds), d.val_max_images)
    report = None
    if cfg.eval.holdout and split == "val":
        report = holdout_split(image_groups(name, [img for img, _ in ds.pairs]), cfg.eval.holdout_seed)[1]
    return ValData(loader, report, n)


@dataclass(frozen=True)
class Data:
    """What a run reads: infinite source and target batch iterators, the target train set (for the prediction
    grids) and the val split."""

    source: Iterator
    target: Iterator
    target_train: SegmentationDataset
    val: ValData


def build_data(cfg: Config, dist_info: DistInfo, start_iteration: int) -> Data:
    """The run's data, the iterators resuming at ``start_iteration``.

    With ``data.rcs.enabled`` the source images are drawn by Rare Class Sampling, with ``data.class_balanced`` by
    SDCA's class-balanced list; their class statistics are read from (or computed into) the source root by rank 0
    first, while the other ranks wait, then read by all.
    """
    d = cfg.data
    src_root, tgt_root = data_roots(cfg)
    src_ds = build_dataset(_reader(d.source, "source"), src_root, "train", _source_transform(cfg, None),
                           cache_in_memory=d.source == "synthetic", label_format=d.label_format,
                           resize_labels=d.resize_labels)
    rcs = None
    if d.rcs.enabled:
        rcs = _rare_class_spec(cfg, src_ds, src_root, dist_info)
        src_ds.transform = _source_transform(cfg, rcs.min_crop_pixels)
    balanced = _class_balanced_spec(cfg, src_ds, src_root, dist_info) if d.class_balanced else None
    tgt_ds = build_dataset(_reader(d.target, "target"), tgt_root, "train",
                           TrainTransform(d.target_resize, d.target_crop if d.target_crop[0] else d.crop, d.flip,
                                          keep_ratio=d.keep_ratio, pseudo_margins=d.target_pseudo_margins,
                                          scale=(d.target_scale_min, d.target_scale_max),
                                          photometric=_photometric(d.target_photometric)),
                           cache_in_memory=d.target == "synthetic", label_format=d.label_format,
                           resize_labels=d.resize_labels)
    if d.target_pseudo_labels:  # self-training: the target's labels are a pseudo_labels stage's
        tgt_ds = use_offline_labels(tgt_ds, tgt_root, Path(d.target_pseudo_labels))
    start = start_iteration * d.batch_size
    common = dict(batch_size=d.batch_size, rank=dist_info.rank, world_size=dist_info.world_size,
                  num_workers=d.loader_workers, start=start)
    # distinct seeds per domain so source and target orders are not correlated
    src_it = build_train_loader(src_ds, seed=cfg.run.seed, rcs=rcs, class_balanced=balanced, **common)
    tgt_it = build_train_loader(tgt_ds, seed=cfg.run.seed + 1_000_003, **common)
    return Data(src_it, tgt_it, tgt_ds, build_val(cfg, "val", dist_info, target_root=tgt_root))


def _source_transform(cfg: Config, rcs_min_crop_pixels: float | None) -> TrainTransform:
    d = cfg.data
    return TrainTransform(d.source_resize, d.crop, d.flip, keep_ratio=d.keep_ratio, cat_max_ratio=d.cat_max_ratio,
                          rcs_min_crop_pixels=rcs_min_crop_pixels, scale=(d.source_scale_min, d.source_scale_max),
                          photometric=_photometric(d.source_photometric))


def _photometric(p: PhotometricConfig) -> Photometric:
    return Photometric(jitter=(p.brightness, p.contrast, p.saturation, p.hue), jitter_prob=p.jitter_prob,
                       grayscale_prob=p.grayscale_prob, blur_prob=p.blur_prob, blur_kind=p.blur_kind,
                       blur_kernel=p.blur_kernel, blur_sigma=(p.blur_sigma_min, p.blur_sigma_max))


def _class_balanced_spec(cfg: Config, src_ds: SegmentationDataset, src_root: Path,
                         dist_info: DistInfo) -> ClassBalancedSpec:
    """SDCA's class-balanced list; without data.class_balanced_draws it is as long as the run's schedule needs
    ((optim.poly_iters or run.iterations) x the global source batch), as SDCA sizes it by SOLVER.MAX_ITER."""
    d = cfg.data
    draws = d.class_balanced_draws or (cfg.optim.poly_iters or cfg.run.iterations) * d.batch_size * \
        dist_info.world_size
    return _rank0_first(lambda: build_class_balanced(src_ds, src_root, draws=draws, cache_dir=d.rcs.stats_dir or None,
                                                     progress=dist_info.rank == 0), dist_info)


def _rare_class_spec(cfg: Config, src_ds: SegmentationDataset, src_root: Path, dist_info: DistInfo) -> RareClassSpec:
    r = cfg.data.rcs
    return _rank0_first(lambda: build_rcs(src_ds, src_root, temperature=r.temperature, min_pixels=r.min_pixels,
                                          min_crop_ratio=r.min_crop_ratio, cache_dir=r.stats_dir or None,
                                          progress=dist_info.rank == 0), dist_info)


def _rank0_first(build: Callable[[], T], dist_info: DistInfo) -> T:
    """``build()`` on rank 0 first (it computes and writes the class statistics once), then on the other ranks."""
    if not (dist.is_available() and dist.is_initialized() and dist_info.world_size > 1):
        return build()
    spec = build() if dist_info.rank == 0 else None
    dist.barrier()
    return spec if spec is not None else build()


def eval_infer(cfg: Config) -> Callable[[nn.Module, torch.Tensor], torch.Tensor] | None:
    """The logits function of ``eval.mode`` for ``evaluate`` (None: one whole-image pass)."""
    e = cfg.eval
    return inference_fn(e.mode, num_classes=NUM_CLASSES, crop=e.crop, stride=e.stride,
                        batch_windows=e.batch_windows)


def build_model(cfg: Config, *, load_pretrained: bool = True) -> nn.Module:
    """The student (and, copied, the teacher) of ``cfg``; ``load_pretrained=False`` skips the pretrained weights
    (for a network whose weights come from a training checkpoint next)."""
    m, cf = cfg.model, cfg.loss.cfcontra
    pretrained, path = (m.pretrained, m.pretrained_path) if load_pretrained else (False, "")
    common = dict(pretrained=pretrained, pretrained_path=path, out_indices=m.out_indices, embed_dim=m.embed_dim,
                  dropout=m.dropout, proj_dim=cf.proj_dim if cf.weight > 0 else 0, decoder_norm=m.decoder_norm,
                  decoder=m.decoder, input_norm=m.input_norm, drop_path_rate=m.drop_path_rate,
                  aux_weight=m.aux_weight, fuse_channels=m.fuse_channels, align_corners=m.align_corners)
    h, cl = m.hrda, cfg.loss.cluda
    if h.enabled:
        return HRDASegmenter(m.backbone, NUM_CLASSES, context_scale=h.context_scale, detail_crop=h.detail_crop,
                             detail_stride=h.detail_window_stride, attention_classwise=h.attention_classwise,
                             detail_loss_weight=h.detail_loss_weight, feature_weighter=cl.multires and cl.weight > 0,
                             weighter_lr_mult=cl.weighter_lr_mult, fuse_upsampled=h.fuse_upsampled, **common)
    return build_segmenter(m.backbone, NUM_CLASSES, **common)


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    groups = model.param_groups(o.lr, o.head_lr_mult, o.weight_decay, norm_decay=o.norm_decay)
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    return torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay)


def lr_factor(iteration: int, *, total: int, warmup: int, warmup_ratio: float, power: float) -> float:
    """Poly decay ``(1 - t/T)^power`` times a linear warm-up from ``warmup_ratio`` to 1 (DAFormer's schedule)."""
    poly = (1.0 - min(iteration, total) / total) ** power
    if iteration < warmup:
        return poly * (1.0 - (1.0 - iteration / warmup) * (1.0 - warmup_ratio))
    return poly


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    o = cfg.optim
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: lr_factor(
        t, total=o.poly_iters or cfg.run.iterations, warmup=o.warmup_iters, warmup_ratio=o.warmup_ratio,
        power=o.poly_power))


def step_settings(cfg: Config, device: torch.device) -> StepSettings:
    t, m, lo = cfg.teacher, cfg.mix, cfg.loss
    return StepSettings(num_classes=NUM_CLASSES, source_weight=lo.source_weight, mix_weight=lo.mix_weight,
                        pseudo_threshold=t.pseudo_threshold, weighting=t.weighting, ignore_top=t.ignore_top,
                        ignore_bottom=t.ignore_bottom, class_ratio=m.class_ratio, mix_prob=m.prob,
                        jitter_strength=m.jitter_strength, jitter_prob=m.jitter_prob, blur_prob=m.blur_prob,
                        blur_sigma=(m.blur_sigma_min, m.blur_sigma_max), ema_alpha=t.alpha,
                        grad_clip=cfg.optim.grad_clip,
                        autocast_dtype=torch.bfloat16 if cfg.run.precision == "bf16" else None,
                        aux_bn_update=cfg.model.aux_pass_bn_update, teacher_bn_batch=t.bn_mode == "batch",
                        mix_entropy_crop_after=lo.cluda.entropy_crop_after,
                        target_labels=bool(cfg.data.target_pseudo_labels))


def seed_everything(seed: int, rank: int) -> torch.Generator:
    """Seed torch's global RNG (initialisation: identical on every rank) and return the mixing generator."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed * 1000 + rank + 1)


# ---------------------------------------------------------------------------------------------------- metrics
class _Window:
    """Averages per-iteration metrics over the iterations since the last report."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + 1

    def pop(self) -> dict[str, float]:
        out = {k: self.sums[k] / self.counts[k] for k in self.sums}
        self.sums, self.counts = {}, {}
        return out


def all_reduce_mean(metrics: dict[str, float], device: torch.device) -> dict[str, float]:
    """Mean over ranks of every metric (all ranks report the same keys)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return metrics
    keys = sorted(metrics)
    t = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


# -------------------------------------------------------------------------------------------------------- fit
def fit(cfg: Config, *, work_dir: str | Path, report: Reporter | None = None, resume_from: str | Path | None = None,
        device: torch.device | None = None, progress: bool = False, images: ImageSink | None = None) -> FitResult:
    """Train one UDA run. Checkpoints go to ``<work_dir>/checkpoints/iter_<k>/`` (rank 0; only the newest kept).

    ``report(metrics, checkpoint_dir)`` is called every ``run.log_every`` iterations, at every evaluation and at
    the end, with train metrics averaged over the window, ``iteration``, ``time/iter_s``, and val metrics at
    evaluation iterations; ``checkpoint_dir`` is the checkpoint written at that iteration, if any. With
    ``run.save_images``, rank 0 hands the prediction grid of every evaluation (``uda_ray.train.images``) to
    ``images`` as ``iter_<k>.png`` (default: ``<work_dir>/images/``).
    """
    di = DistInfo.current()
    device = device or resolve_device(cfg.run.device)
    # always set: a Tune process that is reused for the next trial must not keep the previous trial's setting
    torch.set_num_threads(cfg.run.threads or DEFAULT_THREADS)
    work_dir = Path(work_dir)
    ckpt_root = work_dir / "checkpoints"
    generator = seed_everything(cfg.run.seed, di.rank)

    student = build_model(cfg)
    terms = nn.ModuleList(build_terms(cfg, student)).to(device)  # before training: FD copies the initial backbone
    if cfg.model.init_from and resume_from is None:  # a trained model to start from (a resumed run has its own)
        for note in load_released(student, cfg.model.init_from, weights=cfg.model.init_weights):
            log.info("model.init_from: %s", note)
    student = student.to(device)
    teacher = make_teacher(student)
    eval_ema = make_teacher(student) if cfg.eval.model == "ema" else None  # an EMA copy that is evaluated (EHTDI)
    student.generator = generator  # draws of the training passes (HRDA's detail box); saved with the checkpoints
    optimizer = build_optimizer(cfg, student)
    scheduler = build_scheduler(cfg, optimizer)
    start = 0
    if resume_from is not None:
        state = load_checkpoint(resume_from, map_location=device)
        student.load_state_dict(state["student"])
        teacher.load_state_dict(state["teacher"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        terms.load_state_dict(state["terms"])
        if eval_ema is not None:
            eval_ema.load_state_dict(state["eval_ema"])
        start = int(state["iteration"])
    if di.world_size > 1:
        if cfg.model.sync_bn:
            if device.type != "cuda":
                raise RuntimeError("model.sync_bn = true needs CUDA devices (torch's SyncBatchNorm is GPU-only); "
                                   "on CPU use model.decoder_norm = group with a LayerNorm backbone")
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        student = nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None)

    data = build_data(cfg, di, start)
    src_it, tgt_it, val = data.source, data.target, data.val
    grid = _grid_writer(cfg, data, images or _folder_sink(work_dir / "images"), device) \
        if cfg.run.save_images and di.rank == 0 else None
    settings = step_settings(cfg, device)
    read_src, read_tgt = batches_read(settings, terms)
    if resume_from is not None:
        # last: building the data iterators draws from torch's global generator (DataLoader's base seed), which
        # would shift the dropout and drop-path draws of a resumed run against an uninterrupted one
        set_rng_state(state["rng"], generator)
    class_ids = eval_class_ids(cfg.data.protocol)
    infer = eval_infer(cfg)
    model_for_eval = eval_ema if eval_ema is not None else unwrap(student)
    resolved = to_dict(cfg)
    window, last = _Window(), {}
    bar = _progress_bar(start, cfg.run.iterations) if progress and di.rank == 0 else None
    best_miou = -math.inf

    iteration = start
    try:
        while iteration < cfg.run.iterations:
            t0 = time.perf_counter()
            src = _to_device(next(src_it), device) if read_src else None
            tgt = _to_device(next(tgt_it), device) if read_tgt else None
            metrics = step(student, teacher, optimizer, scheduler, src, tgt, iteration, settings=settings,
                           terms=terms, generator=generator)
            if eval_ema is not None:
                ema_update(eval_ema, student, iteration, cfg.eval.ema_alpha)
            iteration += 1
            metrics["time/iter_s"] = time.perf_counter() - t0
            window.add(metrics)

            is_last = iteration == cfg.run.iterations
            do_eval = iteration % cfg.run.eval_every == 0 or is_last
            # every evaluation is checkpointed: a trial's score (its last evaluation) then always has its model
            do_ckpt = iteration % cfg.run.checkpoint_every == 0 or do_eval
            if not (do_eval or do_ckpt or iteration % cfg.run.log_every == 0):
                if bar is not None:
                    bar.update(1)
                continue
            out = all_reduce_mean(window.pop(), device)
            out["iteration"] = float(iteration)
            if do_eval:
                out.update(evaluate(model_for_eval, val.loader, num_classes=NUM_CLASSES, class_ids=class_ids,
                                    device=device, autocast_dtype=settings.autocast_dtype,
                                    report_indices=val.report_indices, infer=infer))
                best_miou = max(best_miou, out["val/miou"]) if math.isfinite(out["val/miou"]) else best_miou
                if grid is not None:
                    grid(model_for_eval, teacher, iteration)
            ckpt_dir = None
            if do_ckpt:
                ckpt_dir = ckpt_root / f"iter_{iteration:07d}"
                if di.rank == 0:
                    save_checkpoint(ckpt_dir, iteration=iteration, student=student, teacher=teacher,
                                    optimizer=optimizer, scheduler=scheduler, terms=terms, generator=generator,
                                    config=resolved, eval_ema=eval_ema)
                    _prune_checkpoints(ckpt_root, keep=ckpt_dir)
                else:
                    ckpt_dir = None
            last = out
            if report is not None:
                report(out, ckpt_dir)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(_postfix(out, best_miou))
    except DivergedError as e:
        last = {**{k: float("nan") if not math.isfinite(v) else v for k, v in e.metrics.items()},
                "iteration": float(e.iteration)}
        if report is not None:
            report(last, None)
        return FitResult("diverged", e.iteration, last, str(e))
    finally:
        if bar is not None:
            bar.close()
    return FitResult("completed", iteration, last)


def _folder_sink(folder: Path) -> ImageSink:
    def write(name: str, png: bytes) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{name}.tmp"
        tmp.write_bytes(png)
        tmp.replace(folder / name)

    return write


def _grid_writer(cfg: Config, data: Data, sink: ImageSink,
                 device: torch.device) -> Callable[[nn.Module, nn.Module, int], None]:
    """Draws the prediction grid of an evaluation for a fixed, seeded set of val and target-train images."""
    n, seed = cfg.run.image_count, cfg.run.seed
    val_ds = data.val.loader.dataset
    val_items = [val_ds[i] for i in pick_indices(data.val.num_images, n, seed, salt=1)]
    tgt_items = [data.target_train[i] for i in pick_indices(len(data.target_train), n, seed, salt=2)]

    def write(student: nn.Module, teacher: nn.Module, iteration: int) -> None:
        png = prediction_grid(student, teacher, val_items, tgt_items, device=device,
                              threshold=cfg.teacher.pseudo_threshold, title=f"iteration {iteration}")
        sink(f"iter_{iteration:07d}.png", png)

    return write


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _prune_checkpoints(root: Path, keep: Path) -> None:
    for d in root.glob("iter_*"):
        if d != keep and d.is_dir():
            shutil.rmtree(d, ignore_errors=True)


def _progress_bar(start: int, total: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, unit="it", dynamic_ncols=True)


def _postfix(m: dict[str, float], best_miou: float) -> dict[str, str]:
    out = {"loss": f"{m.get('train/loss', float('nan')):.3f}"}
    if "val/miou" in m:
        out["mIoU"] = f"{100 * m['val/miou']:.1f}"
    if math.isfinite(best_miou):
        out["best"] = f"{100 * best_miou:.1f}"
    return out
