"""The feature store: one HDF5 file per backbone, ``CACHE/<backbone>/features.h5``.

Layout: one group per split (``train``, ``test``) with ``features`` [N, D] (chunked), ``labels`` [N],
``paths`` [N] (relative to DATA), ``sizes``/``mtimes`` [N] (the file stamp each vector was made
from) and ``skipped`` (path, reason, size, mtime of every file not turned into a vector). File
attributes say what produced it (backbone, weights, transform, library versions) and that it is
complete. A file is only ever written under a temporary name and renamed when complete, so
``features.h5`` is either whole or absent.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from pipeline.errors import UserError

FORMAT = "pipeline-features"
FORMAT_VERSION = 1
ROWS_PER_CHUNK = 1024
BLOCK_ROWS = 4096  # rows read or written at a time when copying vectors between files
_STR = h5py.string_dtype("utf-8")


def features_file(backbone_dir: Path) -> Path:
    return Path(backbone_dir) / "features.h5"


@dataclass(frozen=True)
class SkipRecord:
    """A file that produced no vector; size and mtime are -1 when it was never decoded."""

    path: str
    reason: str
    size: int = -1
    mtime_ns: int = -1


@dataclass
class SplitIndex:
    """Everything about a stored split except the vectors themselves."""

    paths: list[str]
    labels: np.ndarray
    sizes: np.ndarray
    mtimes: np.ndarray
    skipped: list[SkipRecord]


def _strings(dataset: h5py.Dataset) -> list[str]:
    return [s.decode("utf-8") if isinstance(s, bytes) else s for s in dataset[()]]


class FeatureStore:
    """A complete, validated feature file opened for reading."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"no feature cache at {self.path}; run `make features` with the same BACKBONE and CACHE first")
        try:
            self.file = h5py.File(self.path, "r")
            attrs = dict(self.file.attrs)
        except OSError as error:
            raise UserError(
                f"{self.path} is not a readable HDF5 file ({error}); it is corrupted or truncated: delete it and run `make features` again"
            ) from None
        if attrs.get("format") != FORMAT:
            self.file.close()
            raise UserError(f"{self.path} is not a feature cache written by this pipeline; delete it or point CACHE elsewhere")
        if not attrs.get("complete", False):
            self.file.close()
            raise UserError(f"{self.path} is incomplete; run `make features` to finish it")
        self.attrs = attrs
        self._check_virtual_sources()

    def _check_virtual_sources(self) -> None:
        """A joined file reads its vectors from part files; a missing part would read as NaN, so refuse it."""
        for split in self.file:
            features = self.file[split].get("features")
            if features is not None and features.is_virtual:
                for source in features.virtual_sources():
                    if not (self.path.parent / source.file_name).is_file():
                        self.file.close()
                        raise UserError(f"{self.path} joins part files and {source.file_name} is missing beside it; "
                                        f"run `make features` again (with NPROC, or --merge to make one plain file)")

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc) -> None:
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
    def fingerprint(self) -> dict:
        return json.loads(self.attrs["fingerprint"])

    @property
    def splits(self) -> list[str]:
        return list(self.file.keys())

    def _read(self, split: str, name: str):
        try:
            return self.file[split][name]
        except (KeyError, OSError) as error:
            raise UserError(f"{self.path} is damaged: cannot read {split}/{name} ({error}); delete it and run `make features` again") from None

    def index(self, split: str) -> SplitIndex:
        skipped = self._read(split, "skipped")
        try:
            return SplitIndex(
                paths=_strings(self._read(split, "paths")),
                labels=self._read(split, "labels")[()],
                sizes=self._read(split, "sizes")[()],
                mtimes=self._read(split, "mtimes")[()],
                skipped=[
                    SkipRecord(p, r, int(s), int(m))
                    for p, r, s, m in zip(_strings(skipped["paths"]), _strings(skipped["reasons"]), skipped["sizes"][()], skipped["mtimes"][()])
                ],
            )
        except OSError as error:
            raise UserError(f"{self.path} is damaged ({error}); delete it and run `make features` again") from None

    def features(self, split: str, rows: slice = slice(None)) -> np.ndarray:
        try:
            return np.asarray(self._read(split, "features")[rows], dtype=np.float32)
        except OSError as error:
            raise UserError(f"{self.path} is damaged ({error}); delete it and run `make features` again") from None

    def labels(self, split: str) -> np.ndarray:
        return self._read(split, "labels")[()]

    def paths(self, split: str) -> list[str]:
        return _strings(self._read(split, "paths"))


class StoreWriter:
    """Writes a feature file under ``<name>.tmp``; ``commit()`` marks it complete and renames it into place."""

    def __init__(self, path: Path, attrs: dict):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.file = h5py.File(self.tmp, "w")
        self.file.attrs.update({"format": FORMAT, "format_version": FORMAT_VERSION, "complete": False, **attrs})

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            self.abort()

    def add_split(self, name: str, index: SplitIndex, feature_dim: int, dtype=np.float32) -> h5py.Dataset:
        """Create a split's datasets from its index; returns the empty ``features`` dataset to fill."""
        group = self._add_index(name, index)
        n = len(index.paths)
        chunks = (max(1, min(n, ROWS_PER_CHUNK)), feature_dim)
        return group.create_dataset("features", shape=(n, feature_dim), dtype=dtype, chunks=chunks)

    def add_virtual_split(self, name: str, index: SplitIndex, feature_dim: int, dtype, sources: list[tuple[str, int]]) -> None:
        """A split whose ``features`` are a virtual dataset over other files' (name relative to this file, rows)."""
        group = self._add_index(name, index)
        layout = h5py.VirtualLayout(shape=(len(index.paths), feature_dim), dtype=dtype)
        start = 0
        for file_name, rows in sources:
            if rows:
                layout[start:start + rows] = h5py.VirtualSource(file_name, f"{name}/features", shape=(rows, feature_dim))
            start += rows
        group.create_virtual_dataset("features", layout, fillvalue=np.nan)

    def _add_index(self, name: str, index: SplitIndex) -> h5py.Group:
        group = self.file.create_group(name)
        group.create_dataset("paths", data=np.array(index.paths, dtype=object), dtype=_STR)
        group.create_dataset("labels", data=np.asarray(index.labels, dtype=np.int64))
        group.create_dataset("sizes", data=np.asarray(index.sizes, dtype=np.int64))
        group.create_dataset("mtimes", data=np.asarray(index.mtimes, dtype=np.int64))
        skipped = group.create_group("skipped")
        skipped.create_dataset("paths", data=np.array([s.path for s in index.skipped], dtype=object), dtype=_STR)
        skipped.create_dataset("reasons", data=np.array([s.reason for s in index.skipped], dtype=object), dtype=_STR)
        skipped.create_dataset("sizes", data=np.array([s.size for s in index.skipped], dtype=np.int64))
        skipped.create_dataset("mtimes", data=np.array([s.mtime_ns for s in index.skipped], dtype=np.int64))
        return group

    def commit(self) -> None:
        self.file.attrs["complete"] = True
        self.file.close()
        with open(self.tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if self.file.id.valid:
            self.file.close()
        self.tmp.unlink(missing_ok=True)
