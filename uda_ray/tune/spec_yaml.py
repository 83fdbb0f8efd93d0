"""What every spec YAML shares (search spaces, ablation specs): strict reading, key checks with the closest valid
key, the ``experiment``/``base``/``metric``/``mode``/``resources`` entries, and typed number checks. Every error is a
``SpaceError`` naming the file and the key."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import yaml

from uda_ray.config import Config, ConfigError
from uda_ray.stages.chain import Run, apply_run_overrides, final_config, load_run, parse_run_override


class SpaceError(ValueError):
    """A search-space or ablation YAML that cannot run; the message names the file and the key at fault."""


MODES = ("max", "min")
METRIC_PATTERN = re.compile(r"^(train|val|pseudo|time)/[A-Za-z0-9_.\-/]+$")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
T = TypeVar("T")


@dataclass(frozen=True)
class Resources:
    """Per trial: Ray Train workers (0 = in-process) and what each worker (or the in-process trial) reserves."""

    workers: int = 0
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0


class HasBase(Protocol):
    base_config: Path
    base_overrides: dict[str, Any]
    base: Run  # the base run config or chain, base overrides applied, as read when the spec was loaded


@dataclass(frozen=True)
class Header:
    """What search spaces and ablation specs share: the raw mapping, the name, the base run and the objective."""

    data: dict[str, Any]
    experiment: str
    base_path: Path
    base_overrides: dict[str, Any]
    cfg: Run  # the base run config, or the base chain (``uda_ray.stages``)
    metric: str | list[str]
    mode: str | list[str]


def read_header(path: Path, allowed: set[str], required: tuple[str, ...],
                extra_overrides: list[str] | None = None) -> Header:
    """Read a spec YAML, check its top-level keys and parse the parts every spec has. ``extra_overrides``
    (``key=value`` strings from the command line) are split by their first dotted part: the spec's own keys
    (``num_samples=4``, ``scheduler.max_t=100``: ``apply_spec_overrides``) change the YAML mapping before anything
    is parsed, so every check of the file applies to them; config keys are added to the base overrides, after the
    YAML's own."""
    data = read_yaml(path)
    spec_part, config_part = split_overrides(extra_overrides, allowed)
    data = apply_spec_overrides(data, spec_part, allowed, path)
    check_keys(data, allowed, path, "")
    for key in required:
        if key not in data:
            raise SpaceError(f"{path}: missing required key '{key}'")
    base_path, base_overrides, cfg = parse_base(data["base"], path, config_part)
    metric, mode = parse_objective(data["metric"], data["mode"], path)
    return Header(data, parse_experiment(data["experiment"], path), base_path, base_overrides, cfg, metric, mode)


# The spec's content (what is searched or compared, and on which base) is edited in the file, where it is recorded;
# its settings (budget, scheduler, resources, seeds, ...) may also be changed from the command line.
CONTENT_KEYS = ("base", "params", "switches", "baseline", "components")


def split_overrides(overrides: list[str] | None, allowed: set[str]) -> tuple[list[str], list[str]]:
    """``(spec-key overrides, config overrides)``: a ``key=value`` whose first dotted part is a top-level key of the
    spec (``allowed``) is the spec's own; every other one is a config key (checked against the config tree)."""
    spec, config = [], []
    for text in overrides or []:
        key = text.split("=", 1)[0].strip()
        (spec if key.split(".", 1)[0] in allowed else config).append(text)
    return spec, config


def apply_spec_overrides(data: dict[str, Any], overrides: list[str], allowed: set[str],
                         path: Path) -> dict[str, Any]:
    """A copy of the spec mapping with ``key=value`` overrides of its own keys applied (``num_samples=4``,
    ``scheduler.max_t=100``, ``resources.workers=0``, ``'seeds=[0, 1]'``); values are read as YAML. A section that
    the file lacks is created, so ``scheduler.max_t=100`` on a file without ``scheduler`` reaches the scheduler's
    own check. Errors name the override."""
    out = copy.deepcopy(data)
    for text in overrides:
        if "=" not in text:
            raise SpaceError(f"{path}: command-line override {text!r}: expected key=value")
        key, raw = (part.strip() for part in text.split("=", 1))
        top, *rest = key.split(".")
        if top not in allowed or top in CONTENT_KEYS:
            what = ("is part of what the spec searches or compares: edit the file (config keys are overridden "
                    "directly, e.g. loss.cluda.weight=0.1)") if top in CONTENT_KEYS else "is not a key of this spec"
            raise SpaceError(f"{path}: command-line override {text!r}: '{top}' {what}")
        try:
            value = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError as e:
            raise SpaceError(f"{path}: command-line override {text!r}: cannot read the value {raw!r}: {e}") from e
        node = out
        for i, part in enumerate([top, *rest][:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                parent = ".".join([top, *rest][:i + 1])
                raise SpaceError(f"{path}: command-line override {text!r}: '{parent}' is {child!r} in the file, "
                                 "not a mapping")
            node = child
        node[[top, *rest][-1]] = value
    return out


def naming_spec_overrides(load: Callable[[], T], overrides: list[str] | None) -> T:
    """``load()``; a ``SpaceError`` it raises also names the command-line overrides of the spec's own keys (those
    that are not config keys), whose values the message may quote without saying where they came from."""
    sections = {f.name for f in dataclasses.fields(Config)} | {"stages", "seed"}  # config keys, and a chain's
    spec_part = [o for o in overrides or [] if o.split("=", 1)[0].strip().split(".", 1)[0] not in sections]
    try:
        return load()
    except SpaceError as e:
        if not spec_part or "command-line override" in str(e):
            raise
        raise SpaceError(f"{e} (the file as changed by the command-line override(s) {' '.join(spec_part)})") from None


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (plain PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping, refusing duplicate keys; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise SpaceError(f"{path}: file not found")
    try:
        data = yaml.load(path.read_text(), Loader=_StrictLoader)  # _StrictLoader is a SafeLoader
    except yaml.YAMLError as e:
        raise SpaceError(f"{path}: invalid YAML: {e}") from e
    if not isinstance(data, dict):
        raise SpaceError(f"{path}: expected a mapping of top-level keys, got {type(data).__name__}")
    return data


def closest(name: str, candidates: list[str] | set[str]) -> str:
    match = difflib.get_close_matches(name, sorted(candidates), n=1, cutoff=0.0)
    return f" (closest: '{match[0]}')" if match else ""


def check_keys(data: dict[str, Any], allowed: set[str], path: Path, where: str) -> None:
    """Refuse keys outside ``allowed``, naming the closest allowed one."""
    for key in data:
        if key not in allowed:
            raise SpaceError(f"{path}: {where}unknown key '{key}'{closest(str(key), allowed)}; "
                             f"expected some of {', '.join(sorted(allowed))}")


def number(value: Any, path: Path, where: str) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        hint = ""
        if isinstance(value, str):
            try:
                float(value)
                hint = " (YAML 1.1 reads numbers like 1e-4 as strings: write 1.0e-4)"
            except ValueError:
                pass
        raise SpaceError(f"{path}: {where} = {value!r}: expected a number{hint}")
    if not math.isfinite(value):
        raise SpaceError(f"{path}: {where} = {value!r}: expected a finite number")
    return value


def integer(value: Any, path: Path, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpaceError(f"{path}: {where} = {value!r}: expected an integer")
    if value < minimum:
        raise SpaceError(f"{path}: {where} = {value}: expected an integer >= {minimum}")
    return value


def parse_experiment(value: Any, path: Path) -> str:
    if not isinstance(value, str) or not NAME_PATTERN.match(value):
        raise SpaceError(f"{path}: experiment = {value!r}: expected a folder-safe name (letters, digits, _ . -)")
    return value


def parse_base(value: Any, path: Path, extra: list[str] | None = None) -> tuple[Path, dict[str, Any], Run]:
    """``base: {config, overrides}`` (+ command-line ``key=value`` overrides) → (absolute config path, overrides,
    the validated base config)."""
    if not isinstance(value, dict):
        raise SpaceError(f"{path}: base = {value!r}: expected a mapping {{config: FILE, overrides: {{...}}}}")
    check_keys(value, {"config", "overrides"}, path, "base: ")
    if not isinstance(value.get("config"), str):
        raise SpaceError(f"{path}: base.config = {value.get('config')!r}: expected a run-config path "
                         "relative to this file")
    config_path = (path.parent / value["config"]).resolve()
    overrides = value.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise SpaceError(f"{path}: base.overrides = {overrides!r}: expected a mapping of dotted keys to values")
    try:
        cfg = load_run(config_path, overrides)
    except ConfigError as e:
        raise SpaceError(f"{path}: base: {e}") from e
    if extra:
        try:
            parsed = dict(parse_run_override(cfg, o) for o in extra)
            cfg = apply_run_overrides(cfg, parsed, source=f"{path} (command-line overrides)")
        except ConfigError as e:
            raise SpaceError(f"command-line override of {path}: {e}") from e
        overrides = {**overrides, **parsed}
    return config_path, dict(overrides), cfg


def parse_objective(metric: Any, mode: Any, path: Path) -> tuple[str | list[str], str | list[str]]:
    """One metric and mode, or equally long lists of distinct metrics and modes."""
    metrics = metric if isinstance(metric, list) else [metric]
    modes = mode if isinstance(mode, list) else [mode]
    if not metrics:
        raise SpaceError(f"{path}: metric is an empty list")
    for m in metrics:
        if isinstance(m, str) and m.startswith("holdout/"):
            raise SpaceError(f"{path}: metric {m!r}: holdout/* is the report half of eval.holdout, which must never "
                             "choose anything; search on its selection half, val/*")
        if not isinstance(m, str) or not METRIC_PATTERN.match(m):
            raise SpaceError(f"{path}: metric {m!r} does not look like a uda-ray metric: expected a name under "
                             "train/, val/, pseudo/ or time/ (e.g. val/miou)")
    if len(set(metrics)) != len(metrics):
        raise SpaceError(f"{path}: metric {metrics} names a metric twice")
    for m in modes:
        if m not in MODES:
            raise SpaceError(f"{path}: mode {m!r}: expected max or min")
    if isinstance(metric, list) != isinstance(mode, list) or len(metrics) != len(modes):
        raise SpaceError(f"{path}: metric {metric!r} and mode {mode!r} must both be single values or lists of "
                         "the same length")
    return metric, mode


def objectives(metric: str | list[str], mode: str | list[str]) -> list[tuple[str, str]]:
    """The (metric, mode) pairs of a single- or multi-objective spec, the primary one first."""
    if isinstance(metric, list):
        return list(zip(metric, mode))
    return [(metric, mode)]  # type: ignore[list-item]


def parse_resources(value: Any, path: Path) -> Resources:
    if value is None:
        return Resources()
    if not isinstance(value, dict):
        raise SpaceError(f"{path}: resources = {value!r}: expected a mapping")
    check_keys(value, {"workers", "gpus_per_worker", "cpus_per_worker"}, path, "resources: ")
    workers = integer(value.get("workers", 0), path, "resources.workers", 0)
    gpus = number(value.get("gpus_per_worker", 0.0), path, "resources.gpus_per_worker")
    cpus = number(value.get("cpus_per_worker", 1.0), path, "resources.cpus_per_worker")
    if gpus < 0:
        raise SpaceError(f"{path}: resources.gpus_per_worker = {gpus}: expected >= 0")
    if cpus <= 0:
        raise SpaceError(f"{path}: resources.cpus_per_worker = {cpus}: expected > 0")
    return Resources(workers, float(gpus), float(cpus))


def parse_counts(data: dict[str, Any], path: Path) -> tuple[int, int]:
    """(max_concurrent, max_failures) with their defaults 1 and 0."""
    return (integer(data.get("max_concurrent", 1), path, "max_concurrent", 1),
            integer(data.get("max_failures", 0), path, "max_failures", 0))


def check_overrides(cfg: Run, overrides: dict[str, Any], path: Path, where: str) -> Run:
    """The run config (or chain) with ``overrides`` applied; a ConfigError becomes a SpaceError naming ``where``."""
    if not isinstance(overrides, dict):
        raise SpaceError(f"{path}: {where} = {overrides!r}: expected a mapping of dotted keys to values")
    try:
        return apply_run_overrides(cfg, overrides, source=str(path))
    except ConfigError as e:
        raise SpaceError(f"{path}: {where}: {e}") from e


def same_value(a: Any, b: Any) -> bool:
    """Equality that keeps booleans apart from the integers 0 and 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a is b
    return a == b


def plain(value: Any) -> Any:
    """numpy scalars (e.g. from parquet rows) → Python scalars; everything else unchanged."""
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        return value.item()
    return value


def base_config(spec: HasBase) -> Config:
    """The base run config of a search or ablation spec: its base file with the base overrides applied (for a chain,
    its final stage's)."""
    return final_config(spec.base)


def own_overrides(spec: HasBase, overrides: dict[str, Any]) -> dict[str, Any]:
    """The part of a trial's overrides that is its own (what the base overrides, shared by every trial, do not
    already say): the ``overrides`` column of the trials table. The full config is in its ``config/*`` columns."""
    base = spec.base_overrides or {}
    return {k: v for k, v in overrides.items() if k not in base or not same_value(base[k], plain(v))}


