"""Running a chain: every stage the final one needs, each reused from the cache or computed once and published,
then the final stage's config with its inputs' files set.

``ChainRun.prepare()`` is what ``uda-ray train CHAIN.yaml`` and every search trial of a chain call before the final
run. ``coordinate`` lets a search make sure that two trials needing the same missing stage compute it once (the
default computes at once: one process, nothing to coordinate; ``uda_ray.tune.stage_coordinator`` for a search).
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uda_ray.config import Config, apply_overrides
from uda_ray.results.provenance import package_versions, process_git_revision
from uda_ray.results.store import join
from uda_ray.stages.cache import StageCache, code_versions, stage_keys, stages_root
from uda_ray.stages.chain import INPUT_KEYS, Chain, ChainError, StageFailed
from uda_ray.stages.kinds import StageJob, run_stage

OUTPUT_FILES = {"class_stats": "class_stats.pt", "centroids": "centroids.pt"}  # the file an input key names
PRIVATE = ".private"  # chains with ``cache: false`` keep each run's stages here, unshared


def _compute_now(name: str, key: str, compute: Callable[[], str]) -> str:
    return compute()


@dataclass(frozen=True)
class PreparedChain:
    """What the final stage needs: its config with the inputs' files set, and every stage it used."""

    config: Config
    keys: dict[str, str]  # stage -> cache key (checkpoint stages: the file's content hash)
    uris: dict[str, str]  # stage -> its output (a cache entry, or a checkpoint stage's file)


@dataclass
class ChainRun:
    """One run of a chain. ``storage``: the results root whose ``stages/`` holds the cache; ``who``: the run or
    trial (``<experiment>/<trial id>``) recorded as a user of each output; ``rerun``: stages computed again even when
    cached (the new output replaces the old)."""

    chain: Chain
    storage: str
    who: str
    rerun: frozenset[str] = frozenset()
    progress: bool = False
    log: Callable[[str], None] = print
    coordinate: Callable[[str, str, Callable[[], str]], str] = _compute_now
    train_fn: Callable[[Config, Path], Any] | None = None
    keys: dict[str, str] = field(init=False)
    cache: StageCache = field(init=False)
    _ready: dict[str, str] = field(init=False, default_factory=dict)  # stage -> output URI, once ensured

    def __post_init__(self) -> None:
        unknown = sorted(set(self.rerun) - set(self.chain.names[:-1]))
        if unknown:
            raise ChainError(f"{self.chain.source}: --rerun-stage {', '.join(unknown)}: no such cached stage "
                             f"(stages before the final one: {', '.join(self.chain.names[:-1]) or 'none'})")
        root = stages_root(self.storage)
        if not self.chain.cache:
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.who)
            root = join(root, PRIVATE, safe)
        self.cache = StageCache(root)
        self.keys = stage_keys(self.chain)

    # -------------------------------------------------------------------------------------------------- public
    def uri(self, name: str) -> str:
        """Where stage ``name``'s output is (or will be): its cache entry, or a checkpoint stage's file."""
        s = self.chain.stage(name)
        return s.path if s.kind == "checkpoint" else self.cache.entry_uri(name, self.keys[name])

    def prepare(self) -> PreparedChain:
        """Every stage the final stage needs, reused or computed, then the final stage's config."""
        final = self.chain.final.name
        uris = {n: self.ensure(n) for n in self.chain.ancestors(final)}
        return PreparedChain(self.stage_config(final, uris), dict(self.keys), uris)

    def ensure(self, name: str) -> str:
        """Stage ``name``'s output URI, computing it (and what it needs) if the cache does not hold it."""
        s = self.chain.stage(name)
        if s.kind == "checkpoint":
            return s.path
        if name in self._ready:
            return self._ready[name]
        for ref in s.inputs.values():
            self.ensure(ref.stage)
        key = self.keys[name]
        cached = None if name in self.rerun else self.cache.lookup(name, key)
        if cached is not None:
            self.log(f"[stage {name}] reusing {cached}")
            uri = cached
        elif name in self.rerun or not self.chain.cache:  # nothing to share with other runs
            uri = self._compute(name)
            self.rerun = self.rerun - {name}  # once per run (a stage is computed at most once per ChainRun)
        else:
            uri = self.coordinate(name, key, lambda: self.cache.lookup(name, key) or self._compute(name))
        self.cache.note_use(uri, self.who)
        self._ready[name] = uri
        return uri

    def stage_config(self, name: str, uris: dict[str, str]) -> Config:
        """The config stage ``name`` runs with: its own (or its model stage's), with its inputs' local files set."""
        s = self.chain.stage(name)
        cfg = self.chain.run_config(name)
        assert cfg is not None
        if s.kind != "train":
            return cfg
        changes: dict[str, Any] = {}
        for role, ref in s.inputs.items():
            local = self._local(ref.stage, uris[ref.stage])
            src = self.chain.stage(ref.stage)
            if role == "init":
                changes["model.init_from"] = str(local if src.kind == "checkpoint" else local / f"{ref.checkpoint}.pt")
                changes["model.init_weights"] = src.weights if src.kind == "checkpoint" else ref.weights
            elif src.kind in OUTPUT_FILES:
                changes[INPUT_KEYS[role]] = str(local / OUTPUT_FILES[src.kind])
            else:
                changes[INPUT_KEYS[role]] = str(local)
        return apply_overrides(cfg, changes, source=f"{self.chain.source} stage '{name}' inputs")

    # ------------------------------------------------------------------------------------------------ private
    def _local(self, name: str, uri: str) -> Path:
        if self.chain.stage(name).kind == "checkpoint":
            return Path(uri)  # a local file, or one load_released reads by URI
        return self.cache.local_copy(uri)

    def _compute(self, name: str) -> str:
        s, key = self.chain.stage(name), self.keys[name]
        uris = {ref.stage: self.uri(ref.stage) for ref in s.inputs.values()}
        cfg = self.stage_config(name, uris)
        run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        started = time.time()
        self.cache.record_run(name, key, run_id, who=self.who, status="running")
        self.log(f"[stage {name}] computing ({s.kind}, key {key})")
        job = StageJob(name=name, kind=s.kind, config=cfg, out_dir=self.cache.staging_dir(name, key),
                       work_dir=self.cache.work_dir(name, key), options=dict(s.options), progress=self.progress,
                       log=self.log, train_fn=self.train_fn)
        model = s.inputs.get("model")
        if model is not None:
            src = self.chain.stage(model.stage)
            local = self._local(model.stage, uris[model.stage])
            job.model_file = local if src.kind == "checkpoint" else local / f"{model.checkpoint}.pt"
            job.weights = src.weights if src.kind == "checkpoint" else model.weights
        try:
            info = run_stage(job)
        except BaseException as e:
            self.cache.record_run(name, key, run_id, status="failed", error=f"{type(e).__name__}: {e}"[:2000],
                                  finished=time.time())
            if isinstance(e, Exception) and not isinstance(e, StageFailed):  # every run that needs it names it
                raise StageFailed(f"stage '{name}' ({s.kind}, key {key}) failed: {type(e).__name__}: {e}") from e
            raise
        inputs = {role: {**dataclasses.asdict(ref), "key": self.keys[ref.stage], "uri": uris[ref.stage]}
                  for role, ref in s.inputs.items()}
        manifest = {"name": name, "kind": s.kind, "key": key, "created": time.time(),
                    "seconds": time.time() - started, "chain": self.chain.name, "source": self.chain.source,
                    "computed_by": self.who, "inputs": inputs, "options": s.options, "config": cfg.to_dict(),
                    "versions": {**package_versions(), **code_versions()}, "git_rev": process_git_revision(),
                    "result": info}
        uri = self.cache.publish(name, key, job.out_dir, manifest, replace=name in self.rerun)
        self.cache.record_run(name, key, run_id, status="done", finished=time.time(), uri=uri)
        _clear(job.work_dir)
        self.log(f"[stage {name}] published {uri}")
        return uri


def _clear(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


def stage_columns(chain: Chain, storage: str) -> dict[str, str]:
    """``stage/<name>/key`` and ``stage/<name>/uri`` of every stage before the final one, under the results root
    ``storage`` (trial rows, run folders). A chain with ``cache: false`` shares no output: its URIs are empty."""
    keys = stage_keys(chain)
    cache = StageCache(stages_root(storage))
    out = {}
    for name in chain.names[:-1]:
        s = chain.stage(name)
        uri = s.path if s.kind == "checkpoint" else (cache.entry_uri(name, keys[name]) if chain.cache else "")
        out[f"stage/{name}/key"], out[f"stage/{name}/uri"] = keys[name], uri
    return out


def train_chain(chain: Chain, run_dir: str | Path, *, storage: str, resume: bool = False,
                rerun: frozenset[str] = frozenset(), progress: bool = True, overrides: list[str] | None = None,
                log: Callable[[str], None] = print) -> Any:
    """``uda-ray train CHAIN.yaml``: the stages the final one needs (cached under ``<storage>/stages``), then the final
    stage as an ordinary run in ``run_dir`` (which also records the chain and the stages it used in
    ``stages.json``). Returns the final run's ``FitResult``."""
    import json

    from uda_ray.train.run import train_local

    run_dir = Path(run_dir)
    runner = ChainRun(chain, storage, who=f"train/{run_dir.name}", rerun=rerun, progress=progress, log=log)
    prepared = runner.prepare()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "stages.json").write_text(json.dumps({"chain": json.loads(chain.to_json()),
                                                     "stages": stage_columns(chain, storage)}, indent=1))
    log(f"[stage {chain.final.name}] training (the chain's final stage) in {run_dir}")
    return train_local(prepared.config, run_dir, resume=resume, progress=progress, overrides=overrides)
