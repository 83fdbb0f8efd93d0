"""``uda-ray``: thin subcommands over the package (train, evaluate, tune, ablate, analyze, retrain)."""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

from uda_ray.config import ConfigError


def _cmd_train(args: argparse.Namespace) -> int:
    from uda_ray.config import apply_overrides, load_config
    from uda_ray.preflight import preflight
    from uda_ray.stages import is_chain_file
    from uda_ray.train.run import default_run_name, train_local

    if is_chain_file(args.config):
        return _train_chain(args)
    if args.rerun_stage:
        raise ConfigError(f"--rerun-stage: {args.config} is a run config, not a chain of stages")
    cfg = load_config(args.config, args.overrides)
    if args.output_dir or args.name:
        cfg = apply_overrides(cfg, {k: v for k, v in (("run.output_dir", args.output_dir),
                                                       ("run.name", args.name)) if v})
    name = cfg.run.name or default_run_name(args.config)
    run_dir = Path(cfg.run.output_dir) / name
    preflight([cfg], storage=cfg.run.output_dir, storage_option="run.output_dir")
    if args.check:
        print(f"uda-ray train --check: {args.config} is valid ({cfg.run.iterations} iterations); the data, files and "
              f"folder it needs are in place. It would write {run_dir}.")
        return 0
    print(f"uda-ray train: {args.config} → {run_dir}")
    result = train_local(cfg, run_dir, resume=args.resume, progress=not args.no_progress,
                         overrides=args.overrides)
    return _print_result(result, run_dir)


def _print_result(result, run_dir: Path) -> int:
    miou = result.metrics.get("val/miou")
    print(f"status: {result.status} at iteration {result.iteration}"
          + (f", val/miou {100 * miou:.2f}%" if miou is not None else "")
          + (f"\n{result.error}" if result.error else ""))
    print(f"run folder: {run_dir}")
    return 0 if result.status == "completed" else 3


def _train_chain(args: argparse.Namespace) -> int:
    from uda_ray.stages import load_chain
    from uda_ray.stages.check import preflight_chain
    from uda_ray.stages.run import train_chain

    chain = load_chain(args.config, args.overrides)
    output_dir = args.output_dir or chain.final_config.run.output_dir
    name = args.name or chain.final_config.run.name or f"{chain.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(output_dir) / name
    preflight_chain(chain, storage=output_dir, storage_option="run.output_dir")
    if args.check:
        print(f"uda-ray train --check: chain {args.config} ({' → '.join(chain.names)}) is valid; the data and files "
              f"its stages need are in place. It would write {run_dir}.")
        return 0
    print(f"uda-ray train: chain {args.config} ({' → '.join(chain.names)}) → {run_dir}; stages cached under "
          f"{Path(output_dir) / 'stages'}")
    result = train_chain(chain, run_dir, storage=str(Path(output_dir).resolve()), resume=args.resume,
                         rerun=frozenset(args.rerun_stage or ()), progress=not args.no_progress,
                         overrides=args.overrides)
    return _print_result(result, run_dir)


def _cmd_stages(args: argparse.Namespace) -> int:
    from uda_ray.stages.cache import StageCache, stages_root
    from uda_ray.tune.driver import storage_root

    cache = StageCache(stages_root(storage_root(args.storage)))
    if args.remove:
        removed = cache.remove(args.remove)
        if not removed:
            print(f"uda-ray: no cached stage with key {args.remove!r} under {cache.root}", file=sys.stderr)
            return 2
        for uri in removed:
            print(f"removed {uri}")
        return 0
    entries = cache.entries()
    if not entries:
        print(f"no cached stages under {cache.root}")
        return 0
    for e in entries:
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.get("created", 0)))
        used = ", ".join(e["used_by"]) or "-"
        print(f"{e['name']:<16} {e['kind']:<13} {e['key']}  {e['size'] / 2**20:8.1f} MiB  {created}  "
              f"{e.get('seconds', 0):7.0f} s  used by: {used}")
    print(f"{len(entries)} cached stage(s) under {cache.root}; `uda-ray stages {args.storage} --remove KEY` deletes "
          "one")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from uda_ray.train.run_eval import evaluate_checkpoint

    if args.teacher and args.weights == "model":
        raise ValueError("--teacher and --weights model contradict each other (--teacher is --weights ema_model)")
    if args.config:
        return _evaluate_released(args)
    result = evaluate_checkpoint(args.checkpoint, split=args.split,
                                 use_teacher=args.teacher or args.weights == "ema_model",
                                 overrides=args.overrides, save_images=args.save_images)
    print(f"evaluated: {result.describe()}; IoU in percent")
    if args.save_images:
        print(f"coloured predictions of the {result.num_images} images: {args.save_images}/<image name>.png")
    width = max(len(k) for k in result.metrics)
    for k, v in result.metrics.items():
        print(f"{k:<{width}}  {100 * v:6.2f}")
    return 0


def _evaluate_released(args: argparse.Namespace) -> int:
    """``evaluate FILE --config RECIPE``: a released model with the recipe's network and evaluation, the recipe's
    published mIoU beside the measured one."""
    from uda_ray.train.run_eval import evaluate_released

    weights = "ema_model" if args.teacher else args.weights or "model"
    result = evaluate_released(args.checkpoint, args.config, weights=weights, split=args.split,
                               overrides=args.overrides, save_images=args.save_images)
    for note in result.notes:
        print(note)
    print(f"evaluated: {result.describe()}; IoU in percent")
    if args.save_images:
        print(f"coloured predictions of the {result.num_images} images: {args.save_images}/<image name>.png")
    width = max(len(k) for k in result.metrics)
    for k, v in result.metrics.items():
        beside = ""
        if k == f"{args.split}/miou":
            beside = (f"   published {result.published[0]:.1f}: {result.published[1]}" if result.published
                      else f"   (the README gives no published number for {result.recipe})")
        print(f"{k:<{width}}  {100 * v:6.2f}{beside}")
    return 0


NO_FINISHED_TRIAL = 3  # exit status: the command ran, but no trial (or not every planned run) finished
INTERRUPTED = 130  # exit status after SIGINT (128 + 2, the shell's convention)


def _resume_command(command: str, target: str, args: argparse.Namespace, name: str | None) -> str:
    parts = ["uda-ray", command, target]
    parts += [f"--storage {args.storage}"] if getattr(args, "storage", None) else []
    parts += [f"--address {args.address}"] if getattr(args, "address", None) else []
    parts += [f"--name {name}"] if name else []
    return " ".join(parts + ["--resume"])


def _interrupted(command: str, target: str, args: argparse.Namespace, name: str | None) -> int:
    print(f"\ninterrupted: every finished trial and report is saved. Continue with:\n  "
          f"{_resume_command(command, target, args, name)}", file=sys.stderr)
    return INTERRUPTED


def _statuses(statuses: dict[str, int]) -> str:
    return ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())) or "no trial ran"


def _cmd_tune(args: argparse.Namespace) -> int:
    from uda_ray.tune.search import run_search

    out = run_search(args.space, address=args.address, storage=args.storage, name=args.name, resume=args.resume,
                     num_samples=args.num_samples, overrides=args.overrides, check=args.check)
    if args.check:
        print(f"uda-ray tune --check: {out.plan}")
        return 0
    _print_outcome(out.experiment.uri, out.best, out.metrics)
    print(f"optuna study: {out.study_storage} (study '{out.experiment.name}'; open with optuna-dashboard "
          f"{out.study_storage})")
    if out.interrupted:
        return _interrupted("tune", args.space, args, out.experiment.name)
    if out.best is None:
        print(f"uda-ray: no trial finished ({_statuses(out.statuses)}); see the 'error' column of the trials "
              "table", file=sys.stderr)
        return NO_FINISHED_TRIAL
    return 0


def _cmd_ablate(args: argparse.Namespace) -> int:
    from uda_ray.tune.ablate import format_ablation, run_ablation

    out = run_ablation(args.spec, address=args.address, storage=args.storage, name=args.name, resume=args.resume,
                       overrides=args.overrides, check=args.check)
    if args.check:
        print(f"uda-ray ablate --check: {out.plan}")
        return 0
    print("\n" + format_ablation(out))
    if out.interrupted:
        return _interrupted("ablate", args.spec, args, out.experiment.name)
    return 0 if out.statuses.get("TERMINATED", 0) == out.summary.size else NO_FINISHED_TRIAL


def _cmd_retrain(args: argparse.Namespace) -> int:
    from uda_ray.tune.retrain import format_retrain, run_retrain

    out = run_retrain(args.results, top=args.top, seeds=args.seeds, iterations=args.iterations, address=args.address,
                      workers=args.workers, storage=args.storage, metric=args.metric, mode=args.mode,
                      resume=args.resume, reuse_stages=args.reuse_stages)
    print("\n" + format_retrain(out))
    if out.interrupted:
        return _interrupted("retrain", args.results, args, None)
    return 0 if (out.summary["n_unfinished"] == 0).all() else NO_FINISHED_TRIAL


def _cmd_analyze(args: argparse.Namespace) -> int:
    from uda_ray.analysis import analyze
    from uda_ray.analysis.report import NoFinishedTrials

    try:
        analyze(args.results, metric=args.metric, mode=args.mode, top=args.top, out_dir=args.out)
    except NoFinishedTrials as e:
        print(f"uda-ray: {e}", file=sys.stderr)
        return NO_FINISHED_TRIAL
    return 0


def _print_outcome(uri: str, best: dict | None, metrics: tuple[str, ...]) -> None:
    import json

    from uda_ray.results.schema import metric_text

    print(f"\ntrials:  {uri}/trials/*.parquet\nmetrics: {uri}/metrics/*.parquet")
    if best is None:
        print("no trial finished with a finite metric")
        return
    shown = [m for m in dict.fromkeys((*metrics, "val/miou", "holdout/miou"))
             if isinstance(best.get(f"last/{m}"), float)]
    at = best.get("score_iteration")
    print(f"best trial {best['trial_id']}: " + ", ".join(metric_text(m, best[f"last/{m}"]) for m in shown)
          + (f" (at its last evaluation, iteration {int(at)})" if at is not None and at == at else ""))
    print(f"  overrides:  {json.dumps(json.loads(best['overrides']), sort_keys=True)}")
    if isinstance(best.get("checkpoint"), str) and best["checkpoint"]:
        print(f"  checkpoint: {best['checkpoint']}  (uda-ray evaluate it to get this number again)")
    print(f"  retrain:    uda-ray retrain {uri}")
    print(f"  report:     uda-ray analyze {uri}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="uda-ray", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="one training run on this machine (no search)")
    t.add_argument("config", help="run config YAML, e.g. search_spaces/base/synthetic.yaml")
    t.add_argument("overrides", nargs="*", help="dotted overrides key=value, e.g. loss.cluda.weight=1.0 (anywhere on "
                                                "the line, also after the options)")
    t.add_argument("--name", help="run folder name (default: <config stem>-<time>)")
    t.add_argument("--output-dir", help="parent folder of the run (default: run.output_dir)")
    t.add_argument("--resume", action="store_true", help="continue the named run from its newest checkpoint")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    _check_arg(t)
    t.add_argument("--rerun-stage", action="append", metavar="NAME",
                   help="a chain: compute stage NAME again even when its output is cached (repeatable)")
    t.set_defaults(func=_cmd_train)

    st = sub.add_parser("stages", help="list (or remove) the cached stage outputs under a results root")
    st.add_argument("storage", nargs="?", default="results", help="results root (folder or URI; default ./results)")
    st.add_argument("--remove", metavar="KEY", help="delete the cached output with this key")
    st.set_defaults(func=_cmd_stages)

    e = sub.add_parser("evaluate", help="mIoU of a checkpoint (or, with --config, a released model) on the target "
                                        "split")
    e.add_argument("checkpoint", help="checkpoint.pt or the folder holding it; with --config also a released model "
                                      "file (DAFormer/HRDA/MIC/CLUDA latest.pth, an ADVENT-family DeepLabV2 .pth)")
    e.add_argument("--config", metavar="RECIPE.yaml", help="evaluate CHECKPOINT with this recipe's network and "
                                                           "evaluation, its published mIoU beside (e.g. "
                                                           "search_spaces/base/hrda_gta2cs.yaml)")
    e.add_argument("--weights", choices=("model", "ema_model"), help="the network of the file: model = the student "
                                                                     "(default), ema_model = the EMA teacher")
    e.add_argument("--split", default="val", choices=("val", "train"))
    e.add_argument("--teacher", action="store_true", help="evaluate the EMA teacher instead of the student "
                                                          "(= --weights ema_model)")
    e.add_argument("--save-images", metavar="DIR", help="also write the coloured prediction of every image to DIR")
    e.add_argument("overrides", nargs="*", help="dotted overrides of the checkpoint's config, or of --config (e.g. "
                                                "data paths), anywhere on the line")
    e.set_defaults(func=_cmd_evaluate)

    u = sub.add_parser("tune", help="hyper-parameter search from a search-space YAML on Ray Tune + Optuna")
    u.add_argument("space", help="search-space YAML, e.g. search_spaces/demo.yaml")
    u.add_argument("overrides", nargs="*", help="dotted overrides anywhere on the line: of the base config "
                                                "(data.source_root=/data/gta, run.iterations=100) or of the space's "
                                                "own keys (num_samples=4, scheduler.max_t=100, max_concurrent=1, "
                                                "resources.workers=0)")
    _ray_args(u)
    u.add_argument("--num-samples", type=int, help="override the YAML's num_samples")
    u.set_defaults(func=_cmd_tune)

    a = sub.add_parser("analyze", help="tables and plots of an experiment folder (no Ray needed)")
    a.add_argument("results", help="experiment folder or URI, e.g. results/demo-20261122-081500")
    a.add_argument("--metric", default="val/miou")
    a.add_argument("--mode", default="max", choices=("max", "min"))
    a.add_argument("--top", type=int, default=10, help="rows of the top-trials table")
    a.add_argument("--out", help="report folder (default: <results>/report)")
    a.set_defaults(func=_cmd_analyze)

    a = sub.add_parser("ablate", help="ablation study: components on/off x paired seeds as a Tune grid")
    a.add_argument("spec", help="ablation YAML, e.g. search_spaces/ablations/components.yaml")
    a.add_argument("overrides", nargs="*", help="dotted overrides anywhere on the line: of the base config of every "
                                                "cell (run.iterations=100) or of the spec's own keys ('seeds=[0, 1]', "
                                                "max_concurrent=1)")
    _ray_args(a)
    a.set_defaults(func=_cmd_ablate)

    r = sub.add_parser("retrain", help="retrain the best trials of an experiment with the full schedule x seeds")
    r.add_argument("results", help="experiment folder or URI (or its name with --storage), e.g. results/demo-<time>")
    r.add_argument("--top", type=int, default=1, help="how many of the best finished trials (default 1)")
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds per trial (default 0 1 2)")
    r.add_argument("--iterations", type=int, help="schedule length (default: each trial's own run.iterations)")
    r.add_argument("--address", help="Ray cluster address ('auto' inside a cluster); default: start a local Ray")
    r.add_argument("--storage", help="results root holding the experiment named by RESULTS")
    r.add_argument("--workers", type=int, help="Ray Train DDP workers per run (default: train in the trial)")
    r.add_argument("--metric", default="val/miou", help="ranking metric (default val/miou)")
    r.add_argument("--mode", default="max", choices=("max", "min"))
    r.add_argument("--resume", action="store_true", help="continue the newest interrupted retrain of RESULTS")
    r.add_argument("--reuse-stages", action="store_true",
                   help="a chain of stages: new seeds for its final stage only, reusing the source trial's earlier "
                        "stages (default: every stage gets the seed, so each seed retrains the whole chain)")
    r.set_defaults(func=_cmd_retrain)
    return p


def _ray_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray cluster address ('auto' inside a cluster); default: start a local Ray")
    p.add_argument("--storage", help="results root: a folder or a pyarrow.fs URI such as s3://bucket/uda-ray "
                                     "(default: ./results)")
    p.add_argument("--name", help="experiment folder name (default: <experiment>-<time>)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted experiment (--name, or the newest one of this YAML)")
    _check_arg(p)


def _check_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--check", action="store_true",
                   help="validate everything the command would run (config, space, every trial's config, data roots, "
                        "pretrained files, storage), print the plan and exit: nothing is written or started")


OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.([A-Za-z0-9_]+|\*))*=")  # a chain's stages.*.<key> too


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line; ``key=value`` overrides may stand anywhere on it, also after options (argparse
    alone takes positionals only before the first option): whatever argparse leaves over that looks like an
    override is appended to the command's overrides, in order, and anything else is an error as usual."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if not OVERRIDE.match(a)]
    if extra and not hasattr(args, "overrides"):
        unknown = extra  # this command takes no overrides
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*(args.overrides or []), *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"uda-ray: config error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:
        print(f"uda-ray: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nuda-ray: interrupted; '--resume' continues a tune, ablate or retrain from what was saved",
              file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
