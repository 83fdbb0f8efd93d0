"""The stage cache: one folder per computed stage output, keyed by a hash of what determines it.

    <storage>/stages/<stage>-<key>/             a published output (it holds manifest.json, written last)
    <storage>/stages/<stage>-<key>/used_by/     one small file per run or trial that used it
    <storage>/stages/.runs/<stage>-<key>/       one record per computation of it (who, when, done or not)
    <storage>/stages/.work/<stage>-<key>/       a train stage's checkpoints while it runs (a killed run resumes)
    <storage>/stages/.tmp/                      outputs being written, never read

The key (``stage_keys``) is a hash of the stage's kind, its resolved config (keys that do not change the output,
such as log intervals, thread counts and folder names, left out), its options, the keys of its inputs (so a stage
whose inputs change gets a key of its own, and every stage after it too), the code-relevant versions (uda-ray,
torch, timm and this cache's format), and for a checkpoint stage the file's content. The seed is part of the config.

Publishing is atomic. On a local (or mounted) file system the output is written to a hidden folder under ``.tmp``
and renamed onto its final name in one step, so a folder under its final name is always complete; a killed stage
leaves only ``.tmp`` and ``.work`` behind, which nothing trusts. On an object store (``s3://``, ``gs://``) the files
are uploaded first and ``manifest.json`` last: an entry without a manifest is incomplete and is computed again. When
two runs publish the same key, the first one wins and the second one's copy is discarded (both hold the same
output).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import os
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from uda_ray.config import Config, flatten
from uda_ray.results.store import exists, join, read_bytes, resolve, write_bytes
from uda_ray.stages.chain import INPUT_KEYS, Chain

CACHE_FORMAT = 1
STAGES_DIR = "stages"
MANIFEST = "manifest.json"
USED_BY = "used_by"
RUNS, WORK, TMP = ".runs", ".work", ".tmp"
KEY_LENGTH = 16
# keys that do not change a stage's output: where it is written, how often it logs, how fast it runs
UNHASHED_KEYS = frozenset({"run.name", "run.output_dir", "run.log_every", "run.save_images", "run.image_count",
                           "run.threads", "data.loader_workers", "eval.batch_windows", "data.rcs.stats_dir",
                           "data.synthetic.cache_dir", *INPUT_KEYS.values()})


def stages_root(storage: str) -> str:
    """``<storage>/stages``: where a storage root keeps its stage outputs."""
    return join(storage, STAGES_DIR)


@functools.cache
def code_versions() -> dict[str, Any]:
    """What of the code decides a stage's output beyond its config: uda-ray's and the numeric libraries' versions."""
    import torch

    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "unknown"

    return {"format": CACHE_FORMAT, "uda_ray": version("uda-ray"), "torch": torch.__version__.split("+")[0],
            "timm": version("timm")}


def hashed_config(cfg: Config) -> dict[str, Any]:
    """The config entries a stage key covers."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in flatten(cfg).items() if k not in UNHASHED_KEYS}


_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(uri: str) -> str:
    """SHA-256 of a file's content (local path or URI), remembered per (path, size, modification time)."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"{uri}: no such file")
    memo = (uri, info.size or 0, info.mtime_ns or 0)
    if memo not in _DIGESTS:
        h = hashlib.sha256()
        with fs.open_input_stream(path) as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        _DIGESTS[memo] = h.hexdigest()
    return _DIGESTS[memo]


def _hash(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:KEY_LENGTH]


def stage_keys(chain: Chain) -> dict[str, str]:
    """The cache key of every stage but the final one (whose run is the chain's result, not a cached output)."""
    keys: dict[str, str] = {}
    for s in chain.stages[:-1]:
        inputs = {role: [keys[ref.stage], ref.checkpoint, ref.weights] for role, ref in sorted(s.inputs.items())}
        if s.kind == "checkpoint":
            payload: dict[str, Any] = {"kind": s.kind, "file": file_digest(s.path), "weights": s.weights}
        else:
            cfg = chain.run_config(s.name)
            assert cfg is not None
            payload = {"kind": s.kind, "config": hashed_config(cfg), "options": s.options, "inputs": inputs,
                       "versions": code_versions()}
        keys[s.name] = _hash(payload)
    return keys


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, killed but not yet reaped by its parent, does not)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


@dataclasses.dataclass(frozen=True)
class StageCache:
    """The stage outputs under one ``root`` (``<storage>/stages``: a local folder or a pyarrow.fs URI)."""

    root: str

    @property
    def local(self) -> bool:
        return resolve(self.root)[0].type_name == "local"

    def entry_uri(self, name: str, key: str) -> str:
        return join(self.root, f"{name}-{key}")

    def lookup(self, name: str, key: str) -> str | None:
        """The published output of ``name`` with ``key``, or None."""
        uri = self.entry_uri(name, key)
        return uri if exists(join(uri, MANIFEST)) else None

    def manifest(self, uri: str) -> dict[str, Any]:
        return json.loads(read_bytes(join(uri, MANIFEST)))

    # -------------------------------------------------------------------------------------------- computing
    def staging_dir(self, name: str, key: str) -> Path:
        """An empty local folder to write an output into before ``publish`` (beside the entries when local, so the
        publishing rename stays on one file system)."""
        tag = f"{name}-{key}-{uuid.uuid4().hex[:8]}"
        if self.local:
            folder = Path(resolve(self.root)[1]) / TMP / tag
            folder.mkdir(parents=True)
            return folder
        return Path(tempfile.mkdtemp(prefix=f"uda-ray-{tag}-"))

    def work_dir(self, name: str, key: str) -> Path:
        """A train stage's folder for its checkpoints while it runs, kept across processes so that a killed
        computation resumes where it stopped; a folder another live process on this machine is using is not shared
        (that process gets it, this one a private folder)."""
        if self.local:
            base = Path(resolve(self.root)[1]) / WORK
        else:
            digest = hashlib.sha256(self.root.encode()).hexdigest()[:12]
            base = Path("~/.cache/uda-ray/stage-work").expanduser() / digest
        folder = base / f"{name}-{key}"
        folder.mkdir(parents=True, exist_ok=True)
        owner = folder / "owner.json"
        me = {"host": socket.gethostname(), "pid": os.getpid()}
        if owner.is_file():
            try:
                them = json.loads(owner.read_text())
            except (OSError, ValueError):
                them = {}
            if them != me and them.get("host") == me["host"] and _pid_alive(int(them.get("pid", -1))):
                private = base / f"{name}-{key}-{uuid.uuid4().hex[:8]}"
                private.mkdir(parents=True)
                (private / "owner.json").write_text(json.dumps(me))
                return private
        owner.write_text(json.dumps(me))
        return folder

    def publish(self, name: str, key: str, staging: Path, manifest: dict[str, Any], *,
                replace: bool = False) -> str:
        """Publish ``staging`` as the output of ``name``/``key`` (manifest last) and return its URI. An output
        already published by someone else wins unless ``replace``."""
        uri = self.entry_uri(name, key)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True, default=str))
        if self.local:
            final = Path(resolve(uri)[1])
            old = None
            if replace and final.exists():
                old = final.parent / TMP / f"{final.name}-old-{uuid.uuid4().hex[:8]}"
                os.rename(final, old)
            try:
                os.rename(staging, final)
            except OSError:
                if not (final / MANIFEST).is_file():
                    raise
                shutil.rmtree(staging, ignore_errors=True)  # another run published the same output first
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            return uri
        if self.lookup(name, key) is not None and not replace:
            shutil.rmtree(staging, ignore_errors=True)
            return uri
        fs, path = resolve(uri)
        if replace and fs.get_file_info(path).type == pafs.FileType.Directory:
            fs.delete_dir(path)
        fs.create_dir(path, recursive=True)
        files = sorted(p for p in staging.rglob("*") if p.is_file() and p.name != MANIFEST)
        for p in files:
            rel = p.relative_to(staging).as_posix()
            fs.create_dir(f"{path}/{Path(rel).parent.as_posix()}".rstrip("/."), recursive=True)
            pafs.copy_files(str(p), f"{path}/{rel}", destination_filesystem=fs)
        write_bytes((staging / MANIFEST).read_bytes(), join(uri, MANIFEST))
        shutil.rmtree(staging, ignore_errors=True)
        return uri

    def local_copy(self, uri: str) -> Path:
        """A local folder holding the output at ``uri``: the folder itself on a local file system, else a copy
        downloaded once to ``~/.cache/uda-ray/stage-cache/`` (published there by a rename, like the cache)."""
        fs, path = resolve(uri)
        if self.local:
            return Path(path)
        digest = hashlib.sha256(uri.encode()).hexdigest()[:12]
        base = Path("~/.cache/uda-ray/stage-cache").expanduser()
        final = base / f"{Path(path).name}-{digest}"
        if (final / MANIFEST).is_file():
            return final
        tmp = base / TMP / f"{final.name}-{uuid.uuid4().hex[:8]}"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(path, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        try:
            os.rename(tmp, final)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
        return final

    # ------------------------------------------------------------------------------------------- bookkeeping
    def note_use(self, uri: str, who: str) -> None:
        """Record that run or trial ``who`` used the output at ``uri`` (``uda-ray stages`` lists them)."""
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in who) or "unknown"
        write_bytes(json.dumps({"who": who, "at": time.time()}).encode(), join(uri, USED_BY, f"{safe}.json"))

    def record_run(self, name: str, key: str, run_id: str, **fields: Any) -> None:
        """Create or update the record of one computation of ``name``/``key`` (``status``: running, done, failed)."""
        uri = join(self.root, RUNS, f"{name}-{key}", f"{run_id}.json")
        record = json.loads(read_bytes(uri)) if exists(uri) else {
            "run": run_id, "host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        record.update(fields)
        write_bytes(json.dumps(record, sort_keys=True, default=str).encode(), uri)

    def runs(self, name: str, key: str) -> list[dict[str, Any]]:
        """Every recorded computation of ``name``/``key``, oldest first."""
        folder = join(self.root, RUNS, f"{name}-{key}")
        fs, path = resolve(folder)
        if fs.get_file_info(path).type != pafs.FileType.Directory:
            return []
        infos = fs.get_file_info(pafs.FileSelector(path))
        records = [json.loads(read_bytes(join(folder, i.base_name))) for i in infos if i.base_name.endswith(".json")]
        return sorted(records, key=lambda r: r.get("started", 0.0))

    def entries(self) -> list[dict[str, Any]]:
        """Every published output: its manifest plus ``uri``, ``size`` (bytes) and ``used_by``."""
        fs, path = resolve(self.root)
        if fs.get_file_info(path).type != pafs.FileType.Directory:
            return []
        out = []
        for info in fs.get_file_info(pafs.FileSelector(path)):
            if info.type != pafs.FileType.Directory or info.base_name.startswith("."):
                continue
            uri = join(self.root, info.base_name)
            if not exists(join(uri, MANIFEST)):
                continue
            files = fs.get_file_info(pafs.FileSelector(info.path, recursive=True))
            used = sorted(json.loads(read_bytes(join(uri, USED_BY, f.base_name)))["who"] for f in files
                          if f.type == pafs.FileType.File and Path(f.path).parent.name == USED_BY)
            out.append({**self.manifest(uri), "uri": uri, "used_by": used,
                        "size": sum(f.size or 0 for f in files if f.type == pafs.FileType.File)})
        return sorted(out, key=lambda e: (e.get("created", 0.0), e.get("name", "")))

    def remove(self, key: str) -> list[str]:
        """Delete every published output whose key (or ``<stage>-<key>`` folder name) is ``key``; returns their
        URIs (an empty list when nothing matches)."""
        removed = []
        fs, _ = resolve(self.root)
        for e in self.entries():
            if key in (e.get("key"), Path(resolve(e["uri"])[1]).name):
                fs.delete_dir(resolve(e["uri"])[1])
                removed.append(e["uri"])
        return removed
