"""Checks made on this machine before anything starts (no Ray, no model): a mistake in a data root, a pretrained
file or the results storage is reported at once, naming the key and the path, instead of as one failed trial after
another once the search is running.

Every problem found is reported at once (a missing source root, target root and pretrained file are three lines of
one error), not one per attempt. What is checked, for every distinct run config a command will launch:
- each local dataset root (``data.source_root``, ``data.target_root``): the folder, its published layout, that the
  splits training needs pair every image with a label, and that the first pair of each split decodes;
- ``model.pretrained_path``: the file exists;
- ``model.init_from``: the file exists (or the uda-ray checkpoint folder holds its ``checkpoint.pt``);
- the results storage: a file can be written there (and is removed again).
Roots and storage given as URIs (``s3://…``) are left to the trials: they may only be reachable from the cluster.
The synthetic pair is generated on first use and needs no check.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from pathlib import Path

from uda_ray.config import Config
from uda_ray.data.readers import DatasetError, build_dataset
from uda_ray.data.transforms import EvalTransform
from uda_ray.models.released import TRAINING_CHECKPOINT
from uda_ray.results.store import resolve


class PreflightError(ValueError):
    """Something a run needs is missing or unusable; the message names the config key (or option) and the path."""


def _local(path: str) -> bool:
    return "://" not in path


def _reader_name(name: str, side: str) -> str:
    return {"synthetic": "gta5" if side == "source" else "cityscapes"}.get(name, name)


def data_problems(cfg: Config) -> list[str]:
    """What is wrong with each local dataset root (the source's and the target's, each checked)."""
    d, problems = cfg.data, []
    for side, splits in (("source", ("train",)), ("target", ("train", "val"))):
        name, root = getattr(d, side), getattr(d, f"{side}_root")
        if name == "synthetic" or not _local(root):
            continue
        key = f"data.{side}_root"
        if not Path(root).expanduser().is_dir():
            problems.append(f"{key} = {root!r}: no such folder (resolved: {Path(root).expanduser().resolve()}); "
                            f"put the {name} data there or set {key}=/path/to/{name}")
            continue
        for split in splits:
            try:
                ds = build_dataset(_reader_name(name, side), root, split, EvalTransform(d.val_resize))
                ds.load(0)
            except DatasetError as e:
                problems.append(f"{key} = {root!r} ({name}, split {split!r}): {e}")
                break  # the next split of a broken root would only repeat it
    return problems


def check_data(cfg: Config) -> None:
    problems = data_problems(cfg)
    if problems:
        raise PreflightError(joined(problems))


def check_pretrained(cfg: Config) -> None:
    path = cfg.model.pretrained_path
    if path and _local(path) and not Path(path).expanduser().is_file():
        raise PreflightError(f"model.pretrained_path = {path!r}: no such file "
                             f"(resolved: {Path(path).expanduser().resolve()})")


def check_init_from(cfg: Config) -> None:
    path = cfg.model.init_from
    if not path or not _local(path):
        return
    file = Path(path).expanduser()
    if not (file / TRAINING_CHECKPOINT).is_file() if file.is_dir() else not file.is_file():
        raise PreflightError(f"model.init_from = {path!r}: no such file (resolved: {file.resolve()}; a released "
                             f"model file, or a uda-ray checkpoint folder holding {TRAINING_CHECKPOINT})")


def check_storage(root: str, what: str = "--storage") -> None:
    """A probe file can be written under ``root`` (created if missing) and deleted again."""
    if not _local(root):
        return
    fs, path = resolve(root)
    probe = f"{path}/.uda-ray-write-test-{uuid.uuid4().hex}"
    try:
        fs.create_dir(path, recursive=True)
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        fs.delete_file(probe)
    except OSError as e:
        raise PreflightError(f"{what} = {root!r}: results cannot be written there ({e})") from e


def joined(problems: list[str]) -> str:
    """One problem as it is; several as a count and one line each."""
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems, to fix before anything runs:\n  - " + "\n  - ".join(problems)


def preflight(configs: Iterable[Config], *, storage: str | None = None, storage_option: str = "--storage") -> None:
    """Every check of the module docstring for each distinct config, then the storage; raises one
    ``PreflightError`` listing every problem found."""
    seen: set[tuple] = set()
    problems: list[str] = []
    for cfg in configs:
        key = (cfg.data.source, cfg.data.source_root, cfg.data.target, cfg.data.target_root,
               cfg.model.pretrained_path, cfg.model.init_from, cfg.data.val_resize)
        if key in seen:
            continue
        seen.add(key)
        problems += data_problems(cfg)
        for check in (check_pretrained, check_init_from):
            try:
                check(cfg)
            except PreflightError as e:
                problems.append(str(e))
    if storage is not None:
        try:
            check_storage(storage, storage_option)
        except PreflightError as e:
            problems.append(str(e))
    problems = list(dict.fromkeys(problems))  # configs that share a root share its problem
    if problems:
        raise PreflightError(joined(problems))
