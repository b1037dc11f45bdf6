"""The feature store: per backbone, ``CACHE/<backbone>/features.h5`` and the segment files it reads its vectors from.

Layout: one group per split (``train``, ``test``, ``train_aug``) with ``features`` [N, D], and the index.
In a plain file (a segment, a torchrun part, a merged file) ``features`` is chunked and each chunk checksummed
by HDF5's fletcher32 filter, and beside it lies the split's index: ``paths`` [N] (relative to DATA, the file
name's bytes as the file system gives them), ``views`` [N] (-1 for the image itself, k for augmented view k),
``labels``, ``sizes``/``mtimes`` (the file stamp each vector was made from) and ``digests`` [N, 16] (blake2b of
the file's bytes). A mapped file (``features.h5``, a torchrun join) holds no per-row array: ``runs`` [R, 4]
says that its rows ``start:stop`` are rows ``source_start:`` of source ``source`` (into the ``sources``
attribute: name, content digest and rows of each), ``features`` is the virtual dataset over those runs (for
other HDF5 readers), and ``FeatureStore`` reads index and vectors from the sources through the same runs, keeping
the sources it opened open; so the file's size grows with its runs, not its rows.
Every file has ``skipped`` (path, reason, size, mtime of every file not turned into a vector). File
attributes say what produced it (backbone, weights, transform, library versions), that it is complete, and
``content_sha256``: a digest of every attribute and of the whole index (a mapped file's as read through its
runs), checked at open, as is each source's digest.

So a damaged file is refused (readers) or rebuilt (``features``), never read as other numbers: damage to
the index or attributes fails the digest at open; damage to the vectors fails a chunk's checksum when it
is read. A file is only ever written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np

from pipeline import faults
from pipeline.bulk import per_image
from pipeline.errors import UserError
from pipeline.listing import DIGEST_BYTES, NO_VIEW
from pipeline.memory import mapped_matrix
from pipeline.files import fsync_dir

FORMAT = "pipeline-features"
FORMAT_VERSION = 3  # written; 2 (a mapped file's index stored row by row in it) is still read
READABLE_VERSIONS = (2, FORMAT_VERSION)
INDEX_ARRAYS = ("views", "labels", "sizes", "mtimes", "digests")  # with ``paths``, the per-row index of a plain file
ROWS_PER_CHUNK = 1024  # HDF5 chunk of the vectors: the unit of checksumming and of repair
BLOCK_ROWS = 4 * ROWS_PER_CHUNK  # rows read or written at a time when copying vectors between files
_LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if ctypes.util.find_library("c") else None
_BYTES = h5py.string_dtype("ascii")  # stores any bytes: file names are bytes, not always valid UTF-8


def features_file(backbone_dir: Path) -> Path:
    return Path(backbone_dir) / "features.h5"


def backbones_with(cache: Path, pattern: str) -> list[str]:
    """The backbones whose folder in ``cache`` holds a file matching ``pattern`` (``features.h5``,
    ``runs/*/training.json``), sorted."""
    try:
        return sorted(d.name for d in Path(cache).iterdir() if any(p.is_file() for p in d.glob(pattern)))
    except OSError:
        return []


def stated_fingerprint(path: Path) -> dict | None:
    """The fingerprint a feature file states, read without checking the file (None when it states none readable):
    for a choice that opening the file, which checks everything, later confirms or refuses."""
    try:
        with h5py.File(path, "r") as file:
            return json.loads(_plain(file.attrs["fingerprint"]))
    except Exception:  # noqa: BLE001 - a missing or damaged file states nothing
        return None


@dataclass(frozen=True)
class FeatureFiles:
    """The files of one feature file on disk. Single process, ``features.h5`` maps its vectors from segment files
    (``features.seg-<time>.h5``), so an update writes only its new vectors plus the index. Under torchrun, each rank's
    part is one plain file written under a new version name each time (``features.part-0-of-2.<time>.h5``), so a join
    only ever reads the exact versions it was built from. Nothing is ever overwritten in place."""

    base: Path
    versioned: bool = False

    @property
    def segmented(self) -> bool:
        return not self.versioned

    def versions(self) -> list[Path]:
        """The versions on disk, oldest first."""
        if not self.versioned:
            return [self.base] if self.base.exists() else []
        found = self.base.parent.glob(f"{self.base.stem}.*{self.base.suffix}")
        return sorted(p for p in found if p.is_file())  # version names sort by time

    def current(self) -> Path | None:
        return (self.versions() or [None])[-1]

    def new(self) -> Path:
        return self.base if not self.versioned else self._stamped("")

    def new_segment(self) -> Path:
        return self._stamped("seg-")

    def segments(self) -> list[Path]:
        return sorted(self.base.parent.glob(f"{self.base.stem}.seg-*{self.base.suffix}"))

    def remove_leftovers(self) -> None:
        """Temporary files of this file's versions and segments that a killed writer left (call with the lock held)."""
        for tmp in [*self.base.parent.glob(f"{self.base.stem}.*{self.base.suffix}.tmp"), self.base.with_name(self.base.name + ".tmp")]:
            tmp.unlink(missing_ok=True)

    def _stamped(self, kind: str) -> Path:
        return self.base.with_name(f"{self.base.stem}.{kind}{datetime.now(timezone.utc):%Y%m%dT%H%M%S%f}{self.base.suffix}")


class ImageKey(NamedTuple):
    """One version of one image (or of one augmented view of it): what a stored vector was made from."""

    split: str
    path: str
    view: int
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class SkipRecord:
    """A file (or one augmented view of it) that produced no vector; size and mtime are -1 when it was never decoded."""

    path: str
    reason: str
    size: int = -1
    mtime_ns: int = -1
    view: int = NO_VIEW


@dataclass
class SplitIndex:
    """Everything about a stored split except the vectors themselves; row i describes vector i."""

    paths: list[str]
    views: np.ndarray
    labels: np.ndarray
    sizes: np.ndarray
    mtimes: np.ndarray
    digests: np.ndarray
    skipped: list[SkipRecord]
    _keys: dict[str, list[ImageKey]] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def build(cls, rows: list[tuple[ImageKey, int, bytes]], skipped: list[SkipRecord]) -> SplitIndex:
        """From ``(key, label, digest)`` rows, in order."""
        return cls(
            [k.path for k, _, _ in rows], np.array([k.view for k, _, _ in rows], dtype=np.int64),
            np.array([label for _, label, _ in rows], dtype=np.int64), np.array([k.size for k, _, _ in rows], dtype=np.int64),
            np.array([k.mtime_ns for k, _, _ in rows], dtype=np.int64),
            np.frombuffer(b"".join(d for _, _, d in rows), dtype=np.uint8).reshape(len(rows), DIGEST_BYTES), skipped,
        )

    @per_image
    def keys(self, split: str) -> list[ImageKey]:
        """Row i's key, made once (an update asks for them several times)."""
        if split not in self._keys:
            self._keys[split] = [ImageKey(split, p, v, s, m) for p, v, s, m in
                                 zip(self.paths, self.views.tolist(), self.sizes.tolist(), self.mtimes.tolist())]
        return self._keys[split]

    def digest(self, split: str) -> bytes:
        """A sha256 of this index, row by row, as the content digest's part for ``split``."""
        h = hashlib.sha256(split.encode() + b"\0")
        h.update(os.fsencode("\0".join(self.paths)) + b"\1")  # the paths' bytes joined by NUL, in one call
        for array in (self.views, self.labels, self.sizes, self.mtimes, self.digests):
            h.update(np.ascontiguousarray(array).tobytes() + b"\1")
        for s in self.skipped:
            h.update(os.fsencode(s.path) + b"\0" + os.fsencode(s.reason) + f"\0{s.size}\0{s.mtime_ns}\0{s.view}\1".encode())
        return h.digest()


@dataclass
class Placement:
    """Where each row of a split lies when its vectors live in other feature files (segments, or torchrun parts):
    the number of its source (into the file's ``sources``) and its row in that source's split."""

    sources: np.ndarray
    rows: np.ndarray

    def run_array(self) -> np.ndarray:
        """``(start, stop, source, source_start)`` of each run of rows that are consecutive in one source, as an int64
        array [R, 4]: what a mapped file stores."""
        if not len(self.sources):
            return np.zeros((0, 4), dtype=np.int64)
        breaks = np.flatnonzero((np.diff(self.sources) != 0) | (np.diff(self.rows) != 1)) + 1
        starts = np.concatenate([[0], breaks])
        stops = np.concatenate([breaks, [len(self.sources)]])
        return np.stack([starts, stops, self.sources[starts], self.rows[starts]], axis=1).astype(np.int64)

    @classmethod
    def from_runs(cls, runs: np.ndarray, rows: int, sources: int) -> Placement:
        """The placement of ``rows`` rows over ``sources`` sources described by ``run_array()``: the runs must tile
        ``0:rows`` in order."""
        runs = np.asarray(runs, dtype=np.int64).reshape(-1, 4)
        lengths = runs[:, 1] - runs[:, 0]
        if ((lengths <= 0).any() or (runs[1:, 0] != runs[:-1, 1]).any() or (runs[:, 2:] < 0).any()
                or (runs[:, 2] >= sources).any() or (runs[0, 0] if len(runs) else 0) != 0
                or (runs[-1, 1] if len(runs) else 0) != rows):
            raise ValueError("its runs do not tile its rows")
        offsets = np.arange(int(lengths.sum())) - np.repeat(runs[:, 0], lengths)
        return cls(np.repeat(runs[:, 2], lengths), np.repeat(runs[:, 3], lengths) + offsets)


@dataclass(frozen=True)
class Source:
    """A feature file whose vectors another file maps: its name (beside it), its ``content_sha256``, rows per split."""

    name: str
    digest: str
    rows: dict[str, int]


def _plain(value):
    """An attribute as h5py returns it, as a JSON value."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return value


def content_digest(attrs: h5py.AttributeManager, indexes: dict[str, SplitIndex], shapes: dict[str, tuple],
                   placements: dict[str, Placement]) -> str:
    """The digest over every attribute (but itself), and every split's index, placement and vector shape and dtype."""
    h = hashlib.sha256(json.dumps({k: _plain(v) for k, v in attrs.items() if k != "content_sha256"}, sort_keys=True).encode())
    for split in sorted(indexes):
        h.update(indexes[split].digest(split) + json.dumps(shapes[split]).encode())
        if split in placements:
            h.update(np.ascontiguousarray(placements[split].sources).tobytes() + np.ascontiguousarray(placements[split].rows).tobytes())
    return h.hexdigest()


def relabelled(labels: np.ndarray, own: list[str], classes: list[str]) -> np.ndarray:
    """``labels`` into the class names ``own`` as labels into ``classes``; -1 for a class ``classes`` lacks."""
    numbers = {name: number for number, name in enumerate(classes)}
    return np.array([numbers.get(name, -1) for name in own], dtype=np.int64)[labels]


def encoded(names: list[str]) -> list[bytes]:
    """``os.fsencode`` of each name, in one call over the names joined by NUL (no file name holds one; the encoding
    is per character, so the pieces are the same bytes): a Python call per name is most of an index's cost at 10^6."""
    pieces = os.fsencode("\0".join(names)).split(b"\0") if names else []
    return pieces if len(pieces) == len(names) else [os.fsencode(n) for n in names]


def _strings(dataset: h5py.Dataset) -> list[str]:
    """A stored string array as str, decoded like ``encoded`` (in one call when every item is bytes without NUL)."""
    values = dataset[()].tolist()
    if values and all(isinstance(v, bytes) for v in values):
        names = os.fsdecode(b"\0".join(values)).split("\0")
        if len(names) == len(values):
            return names
    return [os.fsdecode(v) if isinstance(v, bytes) else v for v in values]


def _damaged(path: Path, detail: object) -> UserError:
    return UserError(f"{path} is damaged ({detail}); run `make features` to rebuild it (readers never use a damaged cache)")


def _read_rows(dataset: h5py.Dataset, start: int, out: np.ndarray) -> None:
    """Rows ``start:start + len(out)`` of ``dataset`` into ``out``: by HDF5 straight into it when the dtypes match
    (h5py's slicing makes a temporary array and is slower on a large selection), else converted."""
    if len(out) == 0:
        return
    if dataset.dtype == out.dtype:
        dataset.read_direct(out, np.s_[start:start + len(out)])
    else:
        out[...] = dataset[start:start + len(out)]


class FeatureStore:
    """A complete feature file, opened for reading and checked whole: attributes and index against their digest,
    and, for a joined file, each part against the version it was joined from."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            if self.path.exists():
                raise UserError(f"{self.path} is not a regular file; remove it, then run `make features`")
            raise UserError(f"no feature cache at {self.path}; run `make features` with the same BACKBONE and CACHE first")
        try:
            self.file = h5py.File(self.path, "r")
        except Exception as error:  # noqa: BLE001 - HDF5 reports damage as many exception types
            raise UserError(f"{self.path} is not a readable HDF5 file ({error}); it is corrupted or truncated: "
                            f"delete it and run `make features` again") from None
        self._source_files: list[h5py.File | None] = []
        try:
            self._open()
        except UserError:
            self.close()
            raise
        except Exception as error:  # noqa: BLE001 - any damage to structure or content is one message
            self.close()
            raise _damaged(self.path, f"{type(error).__name__}: {error}") from None

    @per_image
    def _open(self) -> None:
        attrs = {k: _plain(v) for k, v in self.file.attrs.items()}
        if attrs.get("format") != FORMAT:
            raise UserError(f"{self.path} is not a feature cache written by this pipeline; delete it or point CACHE elsewhere")
        if attrs.get("format_version") not in READABLE_VERSIONS:
            raise UserError(f"{self.path} was written in format {attrs.get('format_version')}, this version reads "
                            f"{', '.join(map(str, READABLE_VERSIONS))}; run `make features` to rebuild it")
        if not attrs.get("complete", False):
            raise UserError(f"{self.path} is incomplete; run `make features` to finish it")
        self.attrs = attrs
        self.fingerprint = json.loads(attrs["fingerprint"])
        self.sources = [Source(**source) for source in json.loads(attrs.get("sources", "[]"))]
        self._open_sources()
        self._placements = {split: Placement.from_runs(self.file[split]["runs"][()], len(self.file[split]["features"]),
                                                       len(self.sources)) for split in self.file if "runs" in self.file[split]}
        self._placements |= {split: Placement(self.file[split]["source"][()], self.file[split]["source_row"][()])
                             for split in self.file if "source" in self.file[split]}  # format 2
        self._runs = {split: placement.run_array() for split, placement in self._placements.items()}
        self._indexes = {split: self._read_index(split) for split in self.file}
        shapes = {split: [*self.file[split]["features"].shape, str(self.file[split]["features"].dtype)] for split in self.file}
        if content_digest(self.file.attrs, self._indexes, shapes, self._placements) != attrs.get("content_sha256"):
            raise _damaged(self.path, "its index or attributes do not match their digest")
        if any(len(i.paths) != shapes[s][0] for s, i in self._indexes.items()):
            raise _damaged(self.path, "index and vectors differ in length")

    def _read_index(self, split: str) -> SplitIndex:
        group, skipped = self.file[split], self.file[split]["skipped"]
        rows = (self._gathered_rows(split) if "runs" in group else
                (_strings(group["paths"]), *(group[array][()] for array in INDEX_ARRAYS)))
        return SplitIndex(*rows, [SkipRecord(p, r, int(s), int(m), int(v)) for p, r, s, m, v in zip(
            _strings(skipped["paths"]), _strings(skipped["reasons"]), skipped["sizes"][()], skipped["mtimes"][()],
            skipped["views"][()])])

    def _gathered_rows(self, split: str) -> tuple:
        """A mapped split's paths and index arrays, read from its sources through its runs. A label indexes its own
        file's ``classes``, so a source written before a class was added is relabelled into this file's classes."""
        placement = self._placements[split]
        paths = np.empty(len(placement.rows), dtype=object)
        arrays: dict[str, np.ndarray] = {}
        for number in np.unique(placement.sources).tolist():
            mine = placement.sources == number
            rows = placement.rows[mine]
            source = self._source_files[number]
            group = source[split]
            paths[mine] = np.array(_strings(group["paths"]), dtype=object)[rows]
            for name in INDEX_ARRAYS:
                values = group[name][()][rows]
                if name == "labels":
                    values = relabelled(values, [str(c) for c in _plain(source.attrs["classes"])], self.classes)
                arrays.setdefault(name, np.zeros((len(paths), *values.shape[1:]), dtype=values.dtype))[mine] = values
        empty = {"digests": np.zeros((0, DIGEST_BYTES), dtype=np.uint8)}
        return paths.tolist(), *(arrays.get(name, empty.get(name, np.zeros(0, dtype=np.int64))) for name in INDEX_ARRAYS)

    def _open_sources(self) -> None:
        """A file that maps its vectors from other files (segments, parts): each must be the very version it maps. They
        stay open until ``close``, and the vectors are read through them: a writer that removes one after this open
        (a compaction, a new torchrun join) does not change what this store reads."""
        self._source_files = []
        for source in self.sources:
            try:
                opened = h5py.File(self.path.parent / source.name, "r")
            except (OSError, ValueError):
                opened = None
            self._source_files.append(opened)
            if opened is None or _plain(opened.attrs.get("content_sha256")) != source.digest:
                raise UserError(f"{self.path} reads its vectors from {source.name}, which is missing or has changed since; "
                                f"run `make features` again (under torchrun with the same NPROC)")

    def skipped_files(self) -> list[tuple[str, SkipRecord]]:
        """Every file that produced no vector, once: an augmented view fails only when its image does, and the image
        is listed in its own split."""
        return [(split, record) for split in self.splits for record in self.index(split).skipped if record.view == NO_VIEW]

    def placement(self, split: str) -> Placement | None:
        """Where the split's vectors lie, for a file that maps them from its ``sources``; None for a plain file."""
        return self._placements.get(split)

    def files(self) -> list[Path]:
        """This file and every file it reads vectors from."""
        return [self.path, *(self.path.parent / s.name for s in self.sources)]

    def size_bytes(self) -> int:
        return sum(path.stat().st_size for path in self.files())

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for source in self._source_files:
            if source is not None:
                source.close()
        self.file.close()

    @property
    def backbone(self) -> str:
        return str(self.attrs["backbone"])

    @property
    def classes(self) -> list[str]:
        return [str(c) for c in self.attrs["classes"]]

    @property
    def feature_dim(self) -> int:
        return int(self.attrs["feature_dim"])

    @property
    def splits(self) -> list[str]:
        """Train, test, then the augmented views."""
        return sorted(self._indexes, key=lambda split: (split != "train", split != "test", split))

    def index(self, split: str) -> SplitIndex:
        return self._indexes[split]

    def features(self, split: str, rows: slice = slice(None), out: np.ndarray | None = None) -> np.ndarray:
        """Vectors as float32 (a mapped split's read from its sources run by run), into ``out`` when given (float32,
        C-contiguous, one row per selected vector; ``rows`` then has step 1; with a step, ``start:stop`` is read and
        then strided), else into a new array (a ``mapped_matrix`` for the whole split); a chunk whose checksum fails is
        a ``UserError``."""
        if rows.step is not None and rows.step < 1:
            raise ValueError(f"rows must have a positive step, not {rows.step}")
        n = len(self._indexes[split].paths)
        start, stop, step = rows.indices(n)
        shape = (max(0, stop - start), self.feature_dim)
        if out is not None and (step != 1 or out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous
                                or not out.flags.writeable):
            raise ValueError(f"out must be a writable C-contiguous float32 array of shape {shape} for rows {start}:{stop} "
                             f"(step 1)")
        whole = shape[0] == n
        vectors = out if out is not None else mapped_matrix(*shape) if whole else np.empty(shape, dtype=np.float32)
        try:
            if split not in self._placements:
                _read_rows(self.file[split]["features"], start, vectors)
            else:
                runs = self._runs[split]
                first_run = max(0, int(np.searchsorted(runs[:, 0], start, side="right")) - 1)
                for run_start, run_stop, source, source_start in runs[first_run:].tolist():
                    if run_start >= stop:
                        break
                    a, b = max(run_start, start), min(run_stop, stop)
                    if a < b:
                        _read_rows(self._source_files[source][split]["features"], source_start + a - run_start,
                                   vectors[a - start:b - start])
            return vectors if step == 1 else vectors[::step]
        except Exception as error:  # noqa: BLE001 - h5py reports a failed checksum as OSError, damage as others
            raise UserError(f"{self.path} is damaged ({split} vectors: {error}); run `make features VERIFY=1` to redo the "
                            f"damaged rows") from None

    def labels(self, split: str) -> np.ndarray:
        return self._indexes[split].labels

    def identical_files(self, examples: int = 3) -> tuple[int, int, list[str]]:
        """Byte-identical images, found by their stored digests: test images identical to a train image (they
        inflate the test accuracy), train files identical to one filed under another class (a label that
        contradicts another), and up to ``examples`` lines naming both files of each kind."""
        def keyed(split: str) -> np.ndarray:
            return np.ascontiguousarray(self._indexes[split].digests).view(f"V{DIGEST_BYTES}").ravel()

        if not {"train", "test"} <= set(self.splits):
            return 0, 0, []
        train, test = keyed("train"), keyed("test")
        train_paths, test_paths = self.paths("train"), self.paths("test")
        order = np.argsort(train, kind="stable")
        sorted_train = train[order]
        found = np.searchsorted(sorted_train, test).clip(max=len(train) - 1) if len(train) else np.zeros(0, dtype=int)
        leaked = np.flatnonzero(sorted_train[found] == test) if len(train) else np.zeros(0, dtype=int)
        lines = [f"{test_paths[i]} = {train_paths[order[found[i]]]}" for i in leaked[:examples]]
        labels = self.labels("train")[order]
        conflict = np.flatnonzero((sorted_train[1:] == sorted_train[:-1]) & (labels[1:] != labels[:-1]))
        lines += [f"{train_paths[order[i]]} = {train_paths[order[i + 1]]}" for i in conflict[:examples]]
        return len(leaked), len(np.unique(sorted_train[conflict])), lines

    def paths(self, split: str) -> list[str]:
        return self._indexes[split].paths


def _reserve(fd: int, size: int) -> None:
    """Allocate ``size`` bytes of disk to ``fd`` without changing its length (Linux ``fallocate`` with
    ``FALLOC_FL_KEEP_SIZE``); a full disk raises ``OSError(ENOSPC)``. A no-op where the call is missing."""
    if _LIBC is None or not hasattr(_LIBC, "fallocate"):
        return
    keep_size = 1
    if _LIBC.fallocate(fd, keep_size, ctypes.c_int64(0), ctypes.c_int64(size)) != 0:
        code = ctypes.get_errno()
        if code == errno.ENOSPC:
            raise OSError(code, os.strerror(code))


class _WriteGuard:
    """The file HDF5 writes through (h5py's ``fileobj`` driver). The first failed write (a full disk) is kept and
    the writes after it are dropped, so HDF5 finishes its file cleanly and ``StoreWriter`` raises the error itself:
    HDF5's own write-error path leaves the library in a state that crashes the process later."""

    def __init__(self, path: Path, reserve: int):
        self.raw = open(path, "w+b")
        self.error: OSError | None = None
        try:
            _reserve(self.raw.fileno(), reserve)
        except OSError:
            self.raw.close()
            Path(path).unlink(missing_ok=True)
            raise

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        if self.error is None:
            try:
                self.raw.write(data)
            except OSError as error:
                self.error = error
        return size

    def truncate(self, size: int | None = None) -> int:
        if self.error is None:
            try:
                return self.raw.truncate(size)
            except OSError as error:
                self.error = error
        return size if size is not None else self.raw.tell()

    def flush(self) -> None:
        if self.error is None:
            try:
                self.raw.flush()
            except OSError as error:
                self.error = error

    def read(self, size: int = -1) -> bytes:
        return self.raw.read(size)

    def readinto(self, buffer) -> int:
        return self.raw.readinto(buffer)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def close(self) -> None:
        """Flush and fsync; the first write error, if any, is raised here."""
        try:
            self.flush()
            if self.error is None:
                os.fsync(self.raw.fileno())
        finally:
            self.raw.close()
        if self.error is not None:
            raise self.error


def reserve_bytes(rows: int, path_bytes: int, feature_dim: int, dtype) -> int:
    """An upper bound of a feature file's size: its vectors (``rows`` of them, 0 for a mapped file), index and HDF5's
    own structures."""
    return rows * feature_dim * np.dtype(dtype).itemsize + 2 * path_bytes + 160 * rows + 4 * 2**20


class StoreWriter:
    """Writes a feature file under ``<name>.tmp``; ``commit()`` marks it complete, seals its digest and renames it
    into place. Leaving the ``with`` block on an error (a full disk included) removes the temporary file.

    ``reserve`` bytes (``reserve_bytes``) are allocated before HDF5 writes anything, so a disk without room for the
    file fails at once, cleanly; the file shrinks to its real size when closed."""

    def __init__(self, path: Path, attrs: dict, sources: list[Source] = (), reserve: int = 4 * 2**20):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.guard = _WriteGuard(self.tmp, reserve)
        self.file = h5py.File(self.guard, "w")
        self.file.attrs.update({"format": FORMAT, "format_version": FORMAT_VERSION, "complete": False, **attrs,
                                "sources": json.dumps([asdict(s) for s in sources])})
        self.sources = list(sources)
        self.indexes: dict[str, SplitIndex] = {}
        self.placements: dict[str, Placement] = {}

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            self.abort()

    def add_split(self, name: str, index: SplitIndex, feature_dim: int, dtype=np.float32) -> h5py.Dataset:
        """Create a split's datasets from its index; returns the empty ``features`` dataset to fill."""
        group = self._add_index(name, index)
        n = len(index.paths)
        return group.create_dataset("features", shape=(n, feature_dim), maxshape=(None, feature_dim), dtype=dtype,
                                    chunks=(max(1, min(n, ROWS_PER_CHUNK)), feature_dim), fletcher32=True)

    def add_mapped_split(self, name: str, index: SplitIndex, placement: Placement, feature_dim: int, dtype) -> None:
        """A split whose ``features`` are an HDF5 virtual dataset over the writer's ``sources``: row i is row
        ``placement.rows[i]`` of source ``placement.sources[i]``. Only the runs are written (no vector, no index row:
        readers gather ``index``, which must be what the sources hold, through them); the digest covers it whole."""
        self.indexes[name] = index
        self.placements[name] = placement
        group = self.file.create_group(name)
        runs = placement.run_array()
        group.create_dataset("runs", data=runs)
        self._add_skipped(group, index)
        layout = h5py.VirtualLayout(shape=(len(index.paths), feature_dim), dtype=dtype)
        for start, stop, source, source_start in runs.tolist():
            vectors = h5py.VirtualSource(self.sources[source].name, f"{name}/features",
                                         shape=(self.sources[source].rows[name], feature_dim))
            layout[start:stop] = vectors[source_start:source_start + stop - start]
        group.create_virtual_dataset("features", layout, fillvalue=np.nan)

    def _add_index(self, name: str, index: SplitIndex) -> h5py.Group:
        self.indexes[name] = index
        group = self.file.create_group(name)
        group.create_dataset("paths", data=np.array(encoded(index.paths), dtype=object), dtype=_BYTES)
        for array in ("views", "labels", "sizes", "mtimes"):
            group.create_dataset(array, data=np.asarray(getattr(index, array), dtype=np.int64))
        group.create_dataset("digests", data=np.asarray(index.digests, dtype=np.uint8).reshape(-1, DIGEST_BYTES))
        self._add_skipped(group, index)
        return group

    @staticmethod
    def _add_skipped(group: h5py.Group, index: SplitIndex) -> None:
        skipped = group.create_group("skipped")
        for name, texts in (("paths", [s.path for s in index.skipped]), ("reasons", [s.reason for s in index.skipped])):
            skipped.create_dataset(name, data=np.array(encoded(texts), dtype=object), dtype=_BYTES)
        skipped.create_dataset("sizes", data=np.array([s.size for s in index.skipped], dtype=np.int64))
        skipped.create_dataset("mtimes", data=np.array([s.mtime_ns for s in index.skipped], dtype=np.int64))
        skipped.create_dataset("views", data=np.array([s.view for s in index.skipped], dtype=np.int64))

    def commit(self) -> None:
        self.file.attrs["complete"] = True
        shapes = {s: [*self.file[s]["features"].shape, str(self.file[s]["features"].dtype)] for s in self.indexes}
        self.digest = content_digest(self.file.attrs, self.indexes, shapes, self.placements)
        self.file.attrs["content_sha256"] = self.digest
        self.file.close()
        self.guard.close()
        faults.reached("store-before-rename")
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)
        faults.reached("store-after-rename")

    def abort(self) -> None:
        if self.file.id.valid:
            self.file.close()
        self.guard.raw.close()
        self.tmp.unlink(missing_ok=True)
