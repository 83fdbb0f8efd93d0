"""Rare Class Sampling (RCS; DAFormer, Hoyer et al., CVPR 2022, §3.3; METHODS.md §9): source images are drawn so
that rare classes are seen more often.

Class statistics. Per source image, the pixel count of each train id at full resolution, in DAFormer's json files
(written by its ``tools/convert_datasets/{gta,synthia,cityscapes}.py``): ``sample_class_stats.json``, a list with one
``{"<trainId>": n, ..., "file": <label path>}`` per label (ids ascending, only n > 0; DAFormer writes the path of the
``_labelTrainIds.png`` it created, here the label file read), and ``samples_with_class.json``, ``{"<trainId>":
[[file, n], ...]}``. Files are matched to dataset items by the label file's base name, as DAFormer does
(``file.split('/')[-1]``), with the format suffix removed (``_labelTrainIds.png``, ``_labelIds.png``, ``.png``) so the
same files serve ``ids`` and ``train_ids`` datasets. ``load_class_stats`` reads them from the source root when they
sit there (prepared for DAFormer); otherwise it computes them once and writes them into the root or, when the root is
not writable, into ``~/.cache/uda-ray/rcs/<hash of root and label format>/``, saying which.

Fingerprint. Statistics that uda-ray writes carry, in ``rcs_fingerprint.json`` beside them, a fingerprint of the
label files they describe (``label_fingerprint``: the SHA-256 of every label file's name, byte size and
modification time, in the dataset's order). When the labels change (files added, removed, regenerated, another
label format) the fingerprint no longer matches and the statistics are computed again and rewritten; the run says
which files it read or wrote and why. DAFormer's own files have no fingerprint: they are read as they are and
checked against the dataset's labels by name (``rcs_spec_from_stats``: a file the dataset lacks, or a label the
file lacks, is an error).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import Sampler

from uda_ray.data.labels import CLASSES, NUM_CLASSES
from uda_ray.data.readers import TRAIN_IDS_SUFFIX, DatasetError, SegmentationDataset, label_format_of
from uda_ray.data.stream import check_stream_args, global_position

STATS_FILE = "sample_class_stats.json"
SAMPLES_FILE = "samples_with_class.json"
FINGERPRINT_FILE = "rcs_fingerprint.json"
Stats = list[dict[str, int | str]]


# ------------------------------------------------------------------------------------------------ statistics
def class_pixel_counts(label: np.ndarray, num_classes: int = NUM_CLASSES) -> dict[int, int]:
    """{train id: pixel count} of one (H, W) label of train ids, classes with n > 0 only (255 ignored)."""
    counts = np.bincount(label.ravel(), minlength=256)[:num_classes]
    return {int(c): int(n) for c, n in enumerate(counts) if n > 0}


def _entry(path: Path, decode_label: Callable[[Path], np.ndarray]) -> dict[str, int | str]:
    return {**{str(c): n for c, n in class_pixel_counts(decode_label(path)).items()}, "file": str(path)}


def compute_class_stats(label_paths: Sequence[Path], decode_label: Callable[[Path], np.ndarray], *, workers: int = 4,
                        progress: bool = True) -> Stats:
    """DAFormer's ``sample_class_stats`` list for ``label_paths`` (in that order), decoded with ``workers`` threads
    (PNG decoding and counting release the GIL)."""
    from tqdm import tqdm

    with ThreadPoolExecutor(max(1, workers)) as pool:
        it = pool.map(lambda p: _entry(Path(p), decode_label), label_paths)
        return list(tqdm(it, total=len(label_paths), desc="RCS class statistics", unit="label", disable=not progress))


def samples_with_class(stats: Stats) -> dict[str, list[list[str | int]]]:
    """DAFormer's ``samples_with_class``: {"<trainId>": [[file, n], ...]} in the order of ``stats``."""
    out: dict[str, list[list[str | int]]] = {}
    for entry in stats:
        for c, n in entry.items():
            if c != "file":
                out.setdefault(c, []).append([entry["file"], n])
    return out


def label_key(file: str | Path) -> str:
    """The matching key of a label file: its base name without ``_labelTrainIds.png`` / ``_labelIds.png`` / ``.png``."""
    name = str(file).replace("\\", "/").split("/")[-1]
    for suffix in (TRAIN_IDS_SUFFIX, "_labelIds.png", ".png"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _write_json(path: Path, obj: object) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)  # readers never see a partial file; concurrent writers write the same content


def label_fingerprint(label_paths: Sequence[Path]) -> str:
    """SHA-256 over every label file's name, byte size and modification time (whole seconds), in order: it changes
    when a label is added, removed or rewritten, or the label format changes the names. Reading every label to hash
    its pixels would cost as much as computing the statistics; a copy that does not keep modification times
    (``cp`` without ``-p``) makes them be computed once more."""
    h = hashlib.sha256()
    for p in label_paths:
        st = Path(p).stat()
        h.update(f"{Path(p).name}\t{st.st_size}\t{int(st.st_mtime)}\n".encode())
    return h.hexdigest()


def write_class_stats(folder: Path, stats: Stats, fingerprint: str | None = None) -> None:
    """``sample_class_stats.json`` and ``samples_with_class.json`` in DAFormer's format, each written atomically,
    and with ``fingerprint`` the ``rcs_fingerprint.json`` of the labels they describe (written last)."""
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / STATS_FILE, stats)
    _write_json(folder / SAMPLES_FILE, samples_with_class(stats))
    if fingerprint is not None:
        _write_json(folder / FINGERPRINT_FILE, {"fingerprint": fingerprint, "labels": len(stats),
                                                "of": "sha256 of every label file's name, byte size and mtime (s)"})


def stored_fingerprint(folder: Path) -> dict | None:
    """``rcs_fingerprint.json`` of ``folder`` (None: statistics without one, e.g. DAFormer's own)."""
    path = folder / FINGERPRINT_FILE
    if not path.is_file():
        return None
    record = _read_json(path, dict)
    if not isinstance(record.get("fingerprint"), str):
        raise DatasetError(f"{path}: expected {{\"fingerprint\": <sha256>, ...}}, got {str(record)[:200]}")
    return record


def _read_json(path: Path, kind: type) -> object:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: unreadable RCS statistics ({e})") from e
    if not isinstance(obj, kind):
        raise DatasetError(f"{path}: expected a json {kind.__name__} in DAFormer's format, got {type(obj).__name__}")
    return obj


def read_class_stats(folder: Path) -> tuple[Stats, dict[str, list] | None]:
    """The statistics in ``folder`` (``samples_with_class.json`` may be absent: None), entries checked."""
    path = folder / STATS_FILE
    stats = _read_json(path, list)
    for i, entry in enumerate(stats):
        ok = isinstance(entry, dict) and isinstance(entry.get("file"), str) and all(
            k == "file" or (k.isdigit() and int(k) < NUM_CLASSES and isinstance(n, int) and n >= 0)
            for k, n in entry.items())
        if not ok:
            raise DatasetError(f"{path}: entry {i} = {str(entry)[:200]}: expected "
                               f"{{\"<trainId 0..{NUM_CLASSES - 1}>\": pixel count, ..., \"file\": label path}}")
    samples = _read_json(folder / SAMPLES_FILE, dict) if (folder / SAMPLES_FILE).is_file() else None
    for c, lst in (samples or {}).items():
        ok = isinstance(lst, list) and all(isinstance(x, list) and len(x) == 2 and isinstance(x[0], str)
                                           and isinstance(x[1], int) for x in lst)
        if not ok:
            raise DatasetError(f"{folder / SAMPLES_FILE}: class {c!r} = {str(lst)[:200]}: expected a list of "
                               "[label path, pixel count] pairs")
    return stats, samples  # type: ignore[return-value]


def default_cache_dir(root: Path, label_format: str) -> Path:
    """``$XDG_CACHE_HOME/uda-ray/rcs/<sha256(resolved root, label format)[:16]>`` (``~/.cache`` by default)."""
    digest = hashlib.sha256(f"{root.resolve()}\n{label_format}".encode()).hexdigest()[:16]
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "uda-ray" / "rcs" / digest


def _writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK)


def load_class_stats(dataset: SegmentationDataset, root: str | Path, *, workers: int = 4,
                     cache_dir: str | Path | None = None,
                     progress: bool = True) -> tuple[Stats, dict[str, list] | None, Path]:
    """The source's class statistics, their folder, and ``samples_with_class`` when read from a file (else None).

    Order of preference: the files in ``root`` (DAFormer's, or uda-ray's whose fingerprint matches the dataset's
    labels); a previous computation in ``cache_dir`` (default ``default_cache_dir``) whose fingerprint matches;
    else computed from the dataset's labels and written, with their fingerprint, into ``root`` when writable,
    else into ``cache_dir``. Statistics whose fingerprint does not match are passed over (and overwritten where
    they are rewritten). One line says what was read or written, and why.
    """
    root = Path(root).expanduser()
    fmt = label_format_of(dataset.pairs)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir(root, fmt)
    labels = [lab for _, lab in dataset.pairs]
    try:
        current = label_fingerprint(labels)
    except OSError:
        current = None  # a missing label: no statistics of ours can match, and computing them names the file
    stale = []
    for folder in (root, cache):
        if not (folder / STATS_FILE).is_file():
            continue
        record = stored_fingerprint(folder)
        if record is not None and record["fingerprint"] != current:
            stale.append(f"{folder / STATS_FILE} (written for {record.get('labels', '?')} labels)")
            continue
        stats, samples = read_class_stats(folder)
        why = ("their fingerprint matches the dataset's labels" if record is not None else
               "DAFormer's files carry no fingerprint: checked against the dataset's labels by name")
        print(f"[uda-ray] RCS: class statistics read from {folder / STATS_FILE} ({why})", flush=True)
        return stats, samples, folder
    try:
        stats = compute_class_stats(labels, dataset.decode_label, workers=workers, progress=progress)
    except DatasetError as e:
        raise DatasetError(f"RCS: {root} holds no {STATS_FILE} and its labels cannot be read to compute one: "
                           f"{e}") from e
    folder = root if _writable(root) else cache
    write_class_stats(folder, stats, current)
    where = "the source root" if folder == root else "the cache (the source root is not writable)"
    because = (f"; the labels changed since {', '.join(stale)} was computed (its fingerprint differs)"
               if stale else "")
    print(f"[uda-ray] RCS: class statistics computed from {len(stats)} labels and written to {folder} ({where})"
          f"{because}", flush=True)
    return stats, None, folder


# ------------------------------------------------------------------------------------------------ probabilities
def class_probabilities(stats: Stats, temperature: float) -> tuple[list[int], np.ndarray]:
    """DAFormer's ``get_rcs_class_probs``: the classes (stable-sorted by total count ascending) and
    ``softmax((1 − f_c) / T)`` over them, (C,) float64."""
    if temperature <= 0:
        raise ValueError(f"RCS temperature {temperature}: expected > 0")
    totals: dict[int, int] = {}
    for entry in stats:
        for c, n in entry.items():
            if c != "file":
                totals[int(c)] = totals.get(int(c), 0) + int(n)
    if not totals or sum(totals.values()) == 0:
        raise DatasetError("RCS: the class statistics hold no labelled pixel")
    ordered = sorted(totals.items(), key=lambda kv: kv[1])  # stable: ties keep their first appearance
    freq = np.array([n for _, n in ordered], dtype=np.float64)
    logits = (1.0 - freq / freq.sum()) / temperature
    p = np.exp(logits - logits.max())
    return [c for c, _ in ordered], p / p.sum()


@dataclass(frozen=True)
class RareClassSpec:
    """What the sampler needs: classes, their probabilities, the dataset indices eligible for each (more than
    ``min_pixels`` pixels of the class; sorted), and the crop requirement's ``min_pixels · min_crop_ratio``."""

    classes: tuple[int, ...]
    probabilities: tuple[float, ...]
    eligible: tuple[tuple[int, ...], ...]
    min_pixels: int
    min_crop_ratio: float

    def __post_init__(self) -> None:
        if not (len(self.classes) == len(self.probabilities) == len(self.eligible) > 0):
            raise ValueError(f"RareClassSpec: {len(self.classes)} classes, {len(self.probabilities)} probabilities, "
                             f"{len(self.eligible)} eligible lists: expected the same positive number")
        if any(not e for e in self.eligible) or abs(sum(self.probabilities) - 1.0) > 1e-6:
            raise ValueError("RareClassSpec: expected a non-empty eligible list per class and probabilities summing "
                             f"to 1, got sizes {[len(e) for e in self.eligible]} and sum {sum(self.probabilities)}")

    @property
    def min_crop_pixels(self) -> float | None:
        """The crop must hold more pixels of the class than this; None: no re-draws (DAFormer: min_crop_ratio 0)."""
        return self.min_pixels * self.min_crop_ratio if self.min_crop_ratio > 0 else None

    def check_dataset(self, dataset: object) -> None:
        """The indices fit ``dataset`` and its transform carries the same crop requirement."""
        n = len(dataset)  # type: ignore[arg-type]
        if max(max(e) for e in self.eligible) >= n:
            raise ValueError(f"RareClassSpec: eligible indices reach {max(max(e) for e in self.eligible)} but the "
                             f"dataset has {n} items: the spec was built for another dataset")
        tf = getattr(dataset, "transform", None)
        if hasattr(tf, "rcs_min_crop_pixels") and tf.rcs_min_crop_pixels != self.min_crop_pixels:
            raise ValueError(f"RCS: the dataset's transform has rcs_min_crop_pixels = {tf.rcs_min_crop_pixels}, the "
                             f"sampler expects min_pixels · min_crop_ratio = {self.min_crop_pixels}: build the "
                             "transform with TrainTransform(..., rcs_min_crop_pixels=spec.min_crop_pixels)")


def _match(files: list[str], keys: dict[str, int], path: Path, complete: bool) -> None:
    """Every file of ``path`` names a dataset label; with ``complete``, every dataset label is named."""
    listed = [label_key(f) for f in files]
    extra = sorted(set(listed) - set(keys))
    missing = sorted(set(keys) - set(listed)) if complete else []
    dup = len(listed) != len(set(listed)) and complete
    if extra or missing or dup:
        raise DatasetError(f"{path} does not match the dataset ({len(keys)} labels): it lists {len(extra)} files the "
                           f"dataset lacks {extra[:5]}, lacks {len(missing)} dataset labels {missing[:5]}"
                           + (", and lists some labels twice" if dup else "")
                           + "; delete it (or regenerate it) so that it is recomputed")


def counts_by_index(stats: Stats, label_paths: Sequence[Path], *,
                    stats_path: Path = Path(STATS_FILE)) -> list[dict[int, int]]:
    """``{train id: pixel count}`` (n > 0 only) of every dataset label, in the order of ``label_paths``; the
    statistics must name exactly the dataset's labels (matched by base name, as ``rcs_spec_from_stats``)."""
    keys = {label_key(p): i for i, p in enumerate(label_paths)}
    if len(keys) != len(label_paths):
        raise DatasetError(f"{stats_path}: the dataset's label base names are not unique ({len(label_paths)} "
                           f"labels, {len(keys)} names): statistics cannot be matched to them")
    _match([str(e["file"]) for e in stats], keys, stats_path, complete=True)
    out: list[dict[int, int]] = [{} for _ in label_paths]
    for entry in stats:
        out[keys[label_key(str(entry["file"]))]] = {int(c): int(n) for c, n in entry.items() if c != "file" and n}
    return out


def rcs_spec_from_stats(stats: Stats, samples: dict[str, list] | None, label_paths: Sequence[Path], *,
                        temperature: float, min_pixels: int, min_crop_ratio: float,
                        stats_path: Path = Path(STATS_FILE)) -> RareClassSpec:
    """The sampler's inputs from the statistics of the labels ``label_paths`` (the dataset's order)."""
    keys = {label_key(p): i for i, p in enumerate(label_paths)}
    if len(keys) != len(label_paths):
        raise DatasetError(f"RCS: the dataset's label base names are not unique ({len(label_paths)} labels, "
                           f"{len(keys)} names): statistics cannot be matched to them")
    _match([str(e["file"]) for e in stats], keys, stats_path, complete=True)
    if samples is None:
        samples = samples_with_class(stats)
    else:
        _match([str(f) for lst in samples.values() for f, _ in lst], keys, stats_path.with_name(SAMPLES_FILE),
               complete=False)
    classes, probs = class_probabilities(stats, temperature)
    kept: list[tuple[int, float, tuple[int, ...]]] = []
    for c, p in zip(classes, probs):
        eligible = tuple(sorted(keys[label_key(f)] for f, n in samples.get(str(c), []) if n > min_pixels))
        if eligible:
            kept.append((c, float(p), eligible))
        else:
            warnings.warn(f"RCS: no source image has more than {min_pixels} pixels of class {c} "
                          f"({CLASSES[c]}); it is left out of the rare-class sampling (DAFormer would stop here)",
                          UserWarning, stacklevel=2)
    if not kept:
        raise DatasetError(f"RCS: no class has an image with more than {min_pixels} pixels ({stats_path})")
    total = sum(p for _, p, _ in kept)
    return RareClassSpec(classes=tuple(c for c, _, _ in kept), probabilities=tuple(p / total for _, p, _ in kept),
                         eligible=tuple(e for _, _, e in kept), min_pixels=min_pixels, min_crop_ratio=min_crop_ratio)


def build_rcs(dataset: SegmentationDataset, root: str | Path, *, temperature: float = 0.01, min_pixels: int = 3000,
              min_crop_ratio: float = 0.5, workers: int = 4, cache_dir: str | Path | None = None,
              progress: bool = True) -> RareClassSpec:
    """The RCS sampler's inputs for a source dataset whose files sit in ``root`` (statistics read or computed:
    ``load_class_stats``). DAFormer: T = 0.01, min_pixels 3000, min_crop_ratio 0.5 (HRDA's 1024² crops: 2.0)."""
    stats, samples, folder = load_class_stats(dataset, root, workers=workers, cache_dir=cache_dir, progress=progress)
    return rcs_spec_from_stats(stats, samples, [lab for _, lab in dataset.pairs], temperature=temperature,
                               min_pixels=min_pixels, min_crop_ratio=min_crop_ratio, stats_path=folder / STATS_FILE)


# ------------------------------------------------------------------------------------------------------ sampler
class RareClassSampler(Sampler):
    """Yields ``(index, sample_seed, rcs_class)`` forever for one rank; global position g is drawn from
    ``default_rng([seed, g, 2])`` alone (module docstring), ranks and ``start`` as in ``stream.py``."""

    def __init__(self, spec: RareClassSpec, *, seed: int, rank: int = 0, world_size: int = 1, start: int = 0,
                 batch_size: int = 1) -> None:
        check_stream_args("RareClassSampler", seed=seed, rank=rank, world_size=world_size, start=start,
                          batch_size=batch_size)
        self.spec, self.seed, self.rank, self.world_size = spec, seed, rank, world_size
        self.start, self.batch_size = start, batch_size
        self._p = np.asarray(spec.probabilities, dtype=np.float64)

    def draw(self, g: int) -> tuple[int, int, int]:
        """(index, sample_seed, class) at global stream position ``g``."""
        rng = np.random.default_rng([self.seed, g, 2])
        k = int(rng.choice(len(self._p), p=self._p))
        eligible = self.spec.eligible[k]
        index = eligible[int(rng.integers(len(eligible)))]
        return index, int(rng.integers(0, 2**62, dtype=np.int64)), self.spec.classes[k]

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        s = self.start
        while True:
            yield self.draw(global_position(s, rank=self.rank, world_size=self.world_size,
                                            batch_size=self.batch_size))
            s += 1
