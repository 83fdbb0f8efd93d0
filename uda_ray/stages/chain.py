"""A chain of named stages: the YAML format, its validation, and the stages' resolved run configs.

    # uda-ray train search_spaces/chains/toy_synthetic.yaml
    chain: toy                          # optional: the name of runs and experiments (default: the file's stem)
    seed: 0                             # optional: run.seed of every train stage (retrain --seeds sets it)
    cache: true                         # optional: false = every run computes its stages itself, nothing shared
    stages:                             # any order; inputs must not form a cycle; the last train stage listed
      source:                           # that no other stage reads is the chain's result (its "final" stage)
        kind: train                     # train | class_stats | centroids | pseudo_labels | checkpoint
        config: ../base/synthetic.yaml  # a run config, relative to this file
        overrides: {loss.mix_weight: 0.0}
      adapt:
        kind: train
        config: ../base/synthetic.yaml
        init: {stage: source, checkpoint: best}          # start the model from a stage's model (last | best;
                                                         # weights: model = student | ema_model = teacher)
      labels:
        kind: pseudo_labels                              # offline target labels with class-wise thresholds
        model: {stage: adapt}                            # the model it runs (checkpoint: last by default)
        options: {cap: 0.9}
      self_train:
        kind: train
        config: ../base/synthetic.yaml
        target_labels: labels                            # CE on the target against the stage's labels
        overrides: {loss.self_training.weight: 1.0}

What each kind reads (``KINDS``): a ``train`` stage may take ``init`` (a train or checkpoint stage: its model file →
``model.init_from``), ``target_labels`` (a pseudo_labels stage → ``data.target_pseudo_labels``), ``class_stats``
(→ ``loss.sdca.init_stats``) and ``centroids`` (→ ``loss.cfcontra.init_centroids``). ``class_stats``, ``centroids``
and ``pseudo_labels`` need a ``model`` (a train or checkpoint stage) and run on that stage's config with their own
``overrides`` on top (e.g. the inference size). A ``checkpoint`` stage is an existing file (``path``; ``weights``;
``config`` when a non-train stage runs it) standing in for a stage.

Dotted overrides of a chain (search spaces, ``uda-ray train CHAIN key=value``): ``stages.<name>.<config key>`` for a
stage's config, ``stages.<name>.<option>`` for a kind's option, ``stages.*.<config key>`` for every stage that has a
config of its own (data roots, say), ``seed`` for every train stage's seed, and a plain ``<config key>`` for the final
stage. Every error is a ``ChainError`` naming the file, the stage and the key, raised before anything runs.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from uda_ray.config import (
    Config,
    ConfigError,
    apply_overrides,
    field_type,
    from_dict,
    load_config,
    parse_override,
    to_dict,
)


class ChainError(ConfigError):
    """A chain that cannot run; the message names the file, the stage and the key at fault."""


class StageFailed(RuntimeError):
    """A stage that did not produce its output (a train stage diverged, a kind raised); the message names the stage.
    Every run or trial that needs the stage fails with it."""


@dataclass(frozen=True)
class KindSpec:
    """What a stage kind reads and which options it takes (``name: (type, default, low, high)``)."""

    inputs: dict[str, tuple[str, ...]]  # role -> kinds of stage it may name
    required: tuple[str, ...] = ()
    options: dict[str, tuple[type, Any, float | None, float | None]] = field(default_factory=dict)
    config: str = "none"  # "own": a run config of its own; "model": its model stage's; "optional": own if given


MODEL_KINDS = ("train", "checkpoint")
KINDS: dict[str, KindSpec] = {
    "train": KindSpec(inputs={"init": MODEL_KINDS, "target_labels": ("pseudo_labels",),
                              "class_stats": ("class_stats",), "centroids": ("centroids",)}, config="own"),
    "class_stats": KindSpec(inputs={"model": MODEL_KINDS}, required=("model",), config="model"),
    "centroids": KindSpec(inputs={"model": MODEL_KINDS}, required=("model",), config="model",
                          # CFContra's loops stop after index 300 / 1600: 301 / 1601 images
                          options={"source_batches": (int, 301, 1, None), "target_batches": (int, 1601, 1, None),
                                   "margin": (float, 0.05, 0.0, None),
                                   # the network as the official train.py hands it over: in train mode
                                   "train_mode": (bool, True, None, None)}),
    "pseudo_labels": KindSpec(inputs={"model": MODEL_KINDS}, required=("model",), config="model",
                              options={"cap": (float, 0.9, 0.0, 1.0)}),
    "checkpoint": KindSpec(inputs={}, config="optional"),
}
# the config key each train-stage input sets to the input stage's output
INPUT_KEYS = {"init": "model.init_from", "target_labels": "data.target_pseudo_labels",
              "class_stats": "loss.sdca.init_stats", "centroids": "loss.cfcontra.init_centroids"}
STAGE_SCHEME = "stage://"
ALL = "*"  # stages.*.<config key>: every stage with a config of its own
CHECKPOINTS = ("last", "best")
WEIGHTS = ("model", "ema_model")
_STAGE_KEYS = {"kind", "config", "overrides", "options", "path", "weights", *{r for k in KINDS.values()
                                                                                 for r in k.inputs}}
_TOP_KEYS = {"chain", "seed", "cache", "stages"}


@dataclass(frozen=True)
class Ref:
    """An input: stage ``stage``'s output; for models also which checkpoint and which weights."""

    stage: str
    checkpoint: str = "last"
    weights: str = "model"


@dataclass(frozen=True)
class Stage:
    """One stage. ``config``: the resolved run config of a train stage (and of a checkpoint stage that has one);
    ``overrides``: what a model-reading stage changes on its model stage's config."""

    name: str
    kind: str
    config: Config | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, Ref] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    path: str = ""  # checkpoint stages: the file
    weights: str = "model"  # checkpoint stages: which weights of the file (mmseg: model / ema_model)


@dataclass(frozen=True)
class Chain:
    """A validated chain; ``stages`` in the order they run (every stage after its inputs), the final stage last."""

    name: str
    source: str  # the file it came from (for messages)
    stages: tuple[Stage, ...]
    seed: int | None = None
    cache: bool = True

    # ------------------------------------------------------------------------------------------------ lookups
    @property
    def final(self) -> Stage:
        return self.stages[-1]

    @property
    def final_config(self) -> Config:
        assert self.final.config is not None
        return self.final.config

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise ChainError(f"{self.source}: no stage named '{name}' (stages: {', '.join(self.names)})")

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    def ancestors(self, name: str) -> list[str]:
        """The stages ``name`` needs, directly or not, in run order."""
        needed: set[str] = set()
        todo = [name]
        while todo:
            for ref in self.stage(todo.pop()).inputs.values():
                if ref.stage not in needed:
                    needed.add(ref.stage)
                    todo.append(ref.stage)
        return [n for n in self.names if n in needed]

    def run_config(self, name: str) -> Config | None:
        """The config a stage runs with (without its inputs' paths): its own, or its model stage's with its
        overrides; None for a checkpoint stage without a config."""
        s = self.stage(name)
        if KINDS[s.kind].config == "model":
            base = self.run_config(s.inputs["model"].stage)
            if base is None:
                raise ChainError(f"{self.source}: stage '{name}' (kind {s.kind}) runs the model of stage "
                                 f"'{s.inputs['model'].stage}', a checkpoint without a config: give that stage "
                                 "'config: <the run config of the network the file holds>'")
            try:
                return apply_overrides(base, s.overrides, source=f"{self.source} stage '{name}' overrides") \
                    if s.overrides else base
            except ConfigError as e:
                raise ChainError(str(e)) from None
        return s.config

    # ---------------------------------------------------------------------------------------------- changes
    def with_overrides(self, overrides: dict[str, Any], *, source: str = "overrides") -> Chain:
        """A new chain with dotted overrides applied (module docstring: ``stages.<name>.…``, ``seed``, or a key
        of the final stage)."""
        chain = self
        per_stage: dict[str, dict[str, Any]] = {}
        for key, value in overrides.items():
            if key == "seed":
                chain = chain.with_seed(_seed(value, f"{source}: key 'seed'"))
                continue
            name, rest = split_key(chain, key)
            for target in _targets(chain, name, rest):
                per_stage.setdefault(target, {})[rest] = value
        stages = []
        for s in chain.stages:
            changes = per_stage.get(s.name)
            stages.append(_changed(chain, s, changes, source) if changes else s)
        return _validated(dataclasses.replace(chain, stages=tuple(stages)))

    def with_seed(self, seed: int) -> Chain:
        """Every train stage's ``run.seed`` set to ``seed`` (the chain's ``seed``)."""
        stages = tuple(dataclasses.replace(s, config=apply_overrides(s.config, {"run.seed": seed}))
                       if s.kind == "train" else s for s in self.stages)
        return dataclasses.replace(self, stages=stages, seed=seed)

    # ------------------------------------------------------------------------------------------ persistence
    def to_json(self) -> str:
        """Everything the chain runs with, resolved (no file is needed to rebuild it: ``Chain.from_json``)."""
        return json.dumps({
            "chain": self.name, "source": self.source, "seed": self.seed, "cache": self.cache,
            "stages": [{"name": s.name, "kind": s.kind, "config": to_dict(s.config) if s.config else None,
                        "overrides": s.overrides, "inputs": {r: dataclasses.asdict(v) for r, v in s.inputs.items()},
                        "options": s.options, "path": s.path, "weights": s.weights} for s in self.stages]},
            sort_keys=True)

    @staticmethod
    def from_json(text: str) -> Chain:
        d = json.loads(text)
        stages = tuple(Stage(name=s["name"], kind=s["kind"],
                             config=from_dict(s["config"], source=f"{d['source']} stage '{s['name']}'")
                             if s["config"] is not None else None,
                             overrides=s["overrides"], inputs={r: Ref(**v) for r, v in s["inputs"].items()},
                             options=s["options"], path=s["path"], weights=s["weights"]) for s in d["stages"])
        return _validated(Chain(d["chain"], d["source"], stages, d["seed"], d["cache"]))


# --------------------------------------------------------------------------------------------- dotted keys
def split_key(chain: Chain, key: str) -> tuple[str, str]:
    """``stages.<name>.<rest>`` → (name, rest); any other key → (final stage, key). Unknown names raise."""
    if key.startswith("stages."):
        parts = key.split(".", 2)
        if len(parts) < 3 or not parts[2]:
            raise ChainError(f"{chain.source}: key '{key}': expected stages.<stage>.<config key or option>")
        if parts[1] != ALL and parts[1] not in chain.names:
            raise ChainError(f"{chain.source}: key '{key}' names no stage '{parts[1]}' (stages: "
                             f"{', '.join(chain.names)})")
        return parts[1], parts[2]
    return chain.final.name, key


def key_type(chain: Chain, key: str) -> Any:
    """The type of a chain's dotted key (``field_type`` for config keys, the option's type for options)."""
    if key == "seed":
        return int
    name, rest = split_key(chain, key)
    if name == ALL:
        try:
            return field_type(rest)
        except ConfigError as e:
            raise ChainError(f"{chain.source}: key '{key}': {e}") from None
    s = chain.stage(name)
    if rest in KINDS[s.kind].options:
        return KINDS[s.kind].options[rest][0]
    if s.kind == "checkpoint" and s.config is None:
        raise ChainError(f"{chain.source}: key '{key}': stage '{name}' is a checkpoint without a config")
    try:
        return field_type(rest)
    except ConfigError as e:
        raise ChainError(f"{chain.source}: key '{key}' (stage '{name}'): {e}") from None


def _targets(chain: Chain, name: str, rest: str) -> list[str]:
    """The stages a key addresses: one, or with ``stages.*.<config key>`` every stage that has a config of its own
    (train stages and checkpoint stages with a config; the others run on their model stage's config)."""
    if name != ALL:
        return [name]
    try:
        field_type(rest)  # an unknown key fails here, once
    except ConfigError as e:
        raise ChainError(f"{chain.source}: key 'stages.*.{rest}': {e}") from None
    return [s.name for s in chain.stages if s.config is not None]


def _changed(chain: Chain, s: Stage, changes: dict[str, Any], source: str) -> Stage:
    spec = KINDS[s.kind]
    options = dict(s.options)
    config_changes = {}
    for k, v in changes.items():
        if k in spec.options:
            options[k] = _option(spec, k, v, f"{source}: key 'stages.{s.name}.{k}'")
        else:
            config_changes[k] = v
    if not config_changes:
        return dataclasses.replace(s, options=options)
    where = f"{source} (stage '{s.name}')"
    try:
        for k in config_changes:
            field_type(k)
        if spec.config == "model":
            # checked on the model stage's config when the chain is validated (``Chain.run_config``)
            return dataclasses.replace(s, options=options, overrides={**s.overrides, **config_changes})
        if s.config is None:
            raise ChainError(f"{where}: stage '{s.name}' is a checkpoint without a config: it has no config keys")
        return dataclasses.replace(s, options=options, config=apply_overrides(s.config, config_changes, source=where))
    except ChainError:
        raise
    except ConfigError as e:
        raise ChainError(str(e)) from None


# -------------------------------------------------------------------------------------------------- loading
def is_chain_file(path: str | Path) -> bool:
    """Whether a YAML file is a chain (a mapping with ``stages``) rather than a run config."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and "stages" in data


def load_chain(path: str | Path, overrides: dict[str, Any] | list[str] | None = None) -> Chain:
    """Read and validate a chain YAML (module docstring), then apply dotted overrides."""
    path = Path(path)
    source = str(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ChainError(f"{path}: cannot read the chain file ({e})") from None
    except yaml.YAMLError as e:
        raise ChainError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("stages"), dict) or not data["stages"]:
        raise ChainError(f"{path}: expected a mapping with 'stages': {{name: {{kind: …}}, …}}")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise ChainError(f"{path}: unknown key(s) {sorted(unknown)}: expected some of {sorted(_TOP_KEYS)}")
    name = data.get("chain", path.stem)
    if not isinstance(name, str) or not name:
        raise ChainError(f"{path}: key 'chain' = {name!r}: expected a name")
    cache = data.get("cache", True)
    if not isinstance(cache, bool):
        raise ChainError(f"{path}: key 'cache' = {cache!r}: expected true or false")
    seed = _seed(data["seed"], f"{path}: key 'seed'") if data.get("seed") is not None else None
    stages = [_parse_stage(str(n), spec, path) for n, spec in data["stages"].items()]
    chain = Chain(name, source, tuple(_ordered(stages, source)), None, cache)
    if seed is not None:
        chain = chain.with_seed(seed)
    chain = _validated(chain)
    if overrides:
        chain = chain.with_overrides(_parsed(chain, overrides), source=f"{path} (overrides)")
    return chain


def _parsed(chain: Chain, overrides: dict[str, Any] | list[str]) -> dict[str, Any]:
    if isinstance(overrides, dict):
        return overrides
    out = {}
    for text in overrides:
        if "=" not in text:
            raise ChainError(f"override {text!r}: expected key=value")
        key, raw = (t.strip() for t in text.split("=", 1))
        tp = key_type(chain, key)
        try:
            out[key] = raw if tp is str else yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ChainError(f"override {text!r}: cannot parse value {raw!r}: {e}") from None
    return out


def _seed(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ChainError(f"{where} = {value!r}: expected an integer >= 0")
    return value


def _option(spec: KindSpec, name: str, value: Any, where: str) -> Any:
    tp, _, lo, hi = spec.options[name]
    if tp is bool:
        ok, expected = isinstance(value, bool), "true or false"
    elif tp is float:
        ok, expected = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    else:
        ok, expected = isinstance(value, tp) and not isinstance(value, bool), "an integer"
    if not ok:
        raise ChainError(f"{where} = {value!r}: expected {expected}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ChainError(f"{where} = {value!r}: expected a value in [{lo}, {hi if hi is not None else '∞'}]")
    return tp(value)


def _ref(value: Any, role: str, stage: str, path: Path) -> Ref:
    where = f"{path}: stage '{stage}' key '{role}'"
    if isinstance(value, str):
        value = {"stage": value}
    if not isinstance(value, dict) or not isinstance(value.get("stage"), str):
        raise ChainError(f"{where} = {value!r}: expected a stage name or {{stage: NAME, checkpoint: last|best}}")
    allowed = {"stage", "checkpoint", "weights"} if role in ("init", "model") else {"stage"}
    extra = set(value) - allowed
    if extra:
        raise ChainError(f"{where}: unknown key(s) {sorted(extra)}: expected some of {sorted(allowed)}")
    checkpoint, weights = value.get("checkpoint", "last"), value.get("weights", "model")
    if checkpoint not in CHECKPOINTS:
        raise ChainError(f"{where}.checkpoint = {checkpoint!r}: expected one of {', '.join(CHECKPOINTS)} (best = "
                         "the stage's best val/miou evaluation, a selection on val)")
    if weights not in WEIGHTS:
        raise ChainError(f"{where}.weights = {weights!r}: expected one of {', '.join(WEIGHTS)}")
    return Ref(value["stage"], checkpoint, weights)


def _parse_stage(name: str, spec: Any, path: Path) -> Stage:
    where = f"{path}: stage '{name}'"
    if not isinstance(spec, dict):
        raise ChainError(f"{where}: expected a mapping with 'kind'")
    kind = spec.get("kind")
    if kind not in KINDS:
        raise ChainError(f"{where}: kind = {kind!r}: expected one of {', '.join(KINDS)}")
    k = KINDS[kind]
    allowed = {"kind", "overrides", "options", *k.inputs}
    allowed |= {"config"} if k.config in ("own", "optional") else set()
    allowed |= {"path", "weights"} if kind == "checkpoint" else set()
    extra = set(spec) - allowed
    if extra:
        raise ChainError(f"{where}: key(s) {sorted(extra)} do not apply to a {kind} stage: expected some of "
                         f"{sorted(allowed)}")
    inputs = {role: _ref(spec[role], role, name, path) for role in k.inputs if role in spec}
    for role in k.required:
        if role not in inputs:
            raise ChainError(f"{where}: a {kind} stage needs '{role}: {{stage: NAME}}' (the stage whose model it "
                             "runs)")
    options = {}
    raw_options = spec.get("options") or {}
    if not isinstance(raw_options, dict):
        raise ChainError(f"{where}: options = {raw_options!r}: expected a mapping")
    for opt, (_, default, _, _) in k.options.items():
        options[opt] = _option(k, opt, raw_options[opt], f"{where} key 'options.{opt}'") \
            if opt in raw_options else default
    extra = set(raw_options) - set(k.options)
    if extra:
        raise ChainError(f"{where}: unknown option(s) {sorted(extra)}: a {kind} stage takes "
                         f"{sorted(k.options) or 'none'}")
    overrides = spec.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise ChainError(f"{where}: overrides = {overrides!r}: expected a mapping of dotted keys to values")
    config = None
    if "config" in spec:
        if not isinstance(spec["config"], str):
            raise ChainError(f"{where}: config = {spec['config']!r}: expected a run-config path relative to "
                             f"{path.name}")
        hand_set = sorted(set(overrides) & set(placeholders(inputs)))
        if hand_set:
            raise ChainError(f"{where}: overrides set {hand_set}, which the stage's inputs set: name the input "
                             f"stage instead ({', '.join(r for r, k in INPUT_KEYS.items() if k in hand_set)})")
        try:
            config = load_config((path.parent / spec["config"]).resolve(), {**overrides, **placeholders(inputs)}
                                 or None)
        except ConfigError as e:
            raise ChainError(f"{where}: {e}") from None
        overrides = {}
    elif k.config == "own":
        raise ChainError(f"{where}: a {kind} stage needs 'config: <run config path>'")
    stage = Stage(name=name, kind=kind, config=config, overrides=dict(overrides), inputs=inputs, options=options)
    if kind == "checkpoint":
        file, weights = spec.get("path"), spec.get("weights", "model")
        if not isinstance(file, str) or not file:
            raise ChainError(f"{where}: a checkpoint stage needs 'path: <file>'")
        if weights not in WEIGHTS:
            raise ChainError(f"{where}: weights = {weights!r}: expected one of {', '.join(WEIGHTS)}")
        if overrides and config is None:
            raise ChainError(f"{where}: overrides need a 'config' to apply to")
        resolved = Path(file).expanduser()
        file = str(resolved if resolved.is_absolute() or "://" in file else (path.parent / resolved).resolve())
        stage = dataclasses.replace(stage, path=file, weights=weights)
    return stage


def placeholders(inputs: dict[str, Ref]) -> dict[str, Any]:
    """The input keys of a train stage as its stored config holds them: ``stage://<stage>/<file>`` until the chain
    runs and sets the files (so the config validates as a whole: self-training has its labels, and so on)."""
    out: dict[str, Any] = {}
    for role, ref in inputs.items():
        if role == "init":
            out[INPUT_KEYS[role]] = f"{STAGE_SCHEME}{ref.stage}/{ref.checkpoint}.pt"
            out["model.init_weights"] = ref.weights
        elif role in INPUT_KEYS:
            out[INPUT_KEYS[role]] = f"{STAGE_SCHEME}{ref.stage}"
    return out


def _ordered(stages: list[Stage], source: str) -> list[Stage]:
    """Stages in run order (each after its inputs; YAML order among the free ones), the final stage last."""
    by_name = {s.name: s for s in stages}
    for s in stages:
        for role, ref in s.inputs.items():
            if ref.stage not in by_name:
                raise ChainError(f"{source}: stage '{s.name}' key '{role}' names stage '{ref.stage}', which does not "
                                 f"exist (stages: {', '.join(by_name)})")
            if ref.stage == s.name:
                raise ChainError(f"{source}: stage '{s.name}' key '{role}' names the stage itself (a cycle)")
            wanted = KINDS[s.kind].inputs[role]
            if by_name[ref.stage].kind not in wanted:
                raise ChainError(f"{source}: stage '{s.name}' key '{role}' names stage '{ref.stage}' of kind "
                                 f"{by_name[ref.stage].kind}: expected a stage of kind {' or '.join(wanted)}")
    order: list[Stage] = []
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "open":
            cycle = trail[trail.index(name):] + [name]
            raise ChainError(f"{source}: the stages' inputs form a cycle: {' → '.join(cycle)}")
        state[name] = "open"
        for ref in by_name[name].inputs.values():
            visit(ref.stage, [*trail, name])
        state[name] = "done"
        order.append(by_name[name])

    for s in stages:
        visit(s.name, [])
    consumed = {ref.stage for s in stages for ref in s.inputs.values()}
    finals = [s for s in stages if s.name not in consumed]
    if len(finals) != 1 or finals[0].kind != "train":
        names = ", ".join(f"'{s.name}' ({s.kind})" for s in finals)
        raise ChainError(f"{source}: a chain ends in one train stage that no other stage reads (its result); the "
                         f"stages no other stage reads are {names}: remove the unused ones or make them inputs")
    order.remove(finals[0])
    return [*order, finals[0]]


def _model_signature(cfg: Config) -> dict[str, Any]:
    """The parts of a config that decide the shape of the network's weights."""
    m = cfg.model
    return {"model.backbone": m.backbone, "model.decoder": m.decoder, "model.embed_dim": m.embed_dim,
            "model.fuse_channels": m.fuse_channels, "model.out_indices": m.out_indices,
            "model.hrda.enabled": m.hrda.enabled, "model.hrda.attention_classwise": m.hrda.attention_classwise,
            "model.input_norm": m.input_norm}


def _validated(chain: Chain) -> Chain:
    """Cross-stage checks: resolvable configs, compatible models for ``init``, no input key set by hand."""
    for s in chain.stages:
        cfg = chain.run_config(s.name)  # raises for a model stage without a config
        if s.kind != "train":
            continue
        assert cfg is not None
        expected = placeholders(s.inputs)
        for role, key in INPUT_KEYS.items():
            value = _get(cfg, key) or ""
            if key in expected and value != expected[key]:
                raise ChainError(f"{chain.source}: stage '{s.name}' sets '{key}' = {value!r} and also takes "
                                 f"'{role}' from stage '{s.inputs[role].stage}': set one of them")
            if key not in expected and value.startswith(STAGE_SCHEME):
                raise ChainError(f"{chain.source}: stage '{s.name}' key '{key}' = {value!r}: a stage's output is "
                                 f"named with the stage's '{role}: <stage>' key, not a {STAGE_SCHEME} value")
        ref = s.inputs.get("init")
        if ref is not None:
            other = chain.run_config(ref.stage)
            if other is not None:
                mine, theirs = _model_signature(cfg), _model_signature(other)
                diff = [k for k in mine if mine[k] != theirs[k]]
                if diff:
                    detail = "; ".join(f"{k}: {theirs[k]!r} there, {mine[k]!r} here" for k in diff)
                    raise ChainError(f"{chain.source}: stage '{s.name}' key 'init' starts from stage '{ref.stage}', "
                                     f"whose model is another network ({detail})")
    return chain


def _get(cfg: Config, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part, None)
        if node is None:
            return None
    return node


# ------------------------------------------------------------------------------- a run config or a chain alike
Run = Config | Chain  # what a search or a command runs: one run config, or a chain whose final stage is the result


def load_run(path: str | Path, overrides: dict[str, Any] | list[str] | None = None) -> Run:
    """A chain file as a ``Chain``, any other YAML as a run ``Config``, with dotted overrides applied."""
    return load_chain(path, overrides) if is_chain_file(path) else load_config(path, overrides or None)


def final_config(run: Run) -> Config:
    """The config of the run whose metrics are the result: the config itself, or a chain's final stage's."""
    return run.final_config if isinstance(run, Chain) else run


def run_key_type(run: Run, key: str) -> Any:
    """The type of a dotted key of a run config or a chain (``stages.<name>.…`` keys for chains)."""
    return key_type(run, key) if isinstance(run, Chain) else field_type(key)


def apply_run_overrides(run: Run, overrides: dict[str, Any], *, source: str = "overrides") -> Run:
    """``apply_overrides`` for a run config, ``Chain.with_overrides`` for a chain."""
    if isinstance(run, Chain):
        return run.with_overrides(overrides, source=source)
    return apply_overrides(run, overrides, source=source)


def parse_run_override(run: Run, text: str) -> tuple[str, Any]:
    """``'key=value'`` → (key, typed value) for a run config or a chain (``parse_override`` for chains)."""
    if not isinstance(run, Chain):
        return parse_override(text)
    return next(iter(_parsed(run, [text]).items()))
