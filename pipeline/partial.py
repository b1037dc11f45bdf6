"""The committed chunks of an unfinished extraction, in ``CACHE/<backbone>/features.partial/``.

Each chunk is one ``.npz`` written under a temporary name, fsynced and renamed, so a run killed
at any instant leaves only whole chunks behind; the next run reuses every vector in them.
A folder made for a different fingerprint (backbone, weights, transform, versions) is discarded.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

Key = tuple[str, str, int, int]  # split, relative path, size, mtime_ns


@dataclass(frozen=True)
class ChunkRow:
    """Where a finished image's result lies: its chunk file and row, or its skip reason."""

    chunk: Path
    row: int
    reason: str


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write) -> None:
    """Call ``write(file)`` on ``<path>.tmp``, fsync it and rename it to ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


class PartialRun:
    def __init__(self, folder: Path, fingerprint: dict):
        self.folder = Path(folder)
        stamp = self.folder / "fingerprint.json"
        if self.folder.exists() and (not stamp.is_file() or json.loads(stamp.read_text()) != fingerprint):
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        if not stamp.is_file():
            atomic_write(stamp, lambda f: f.write(json.dumps(fingerprint, sort_keys=True).encode()))
        self.done: dict[Key, ChunkRow] = {}
        self.chunks = sorted(self.folder.glob("chunk-*.npz"))
        for chunk in list(self.chunks):
            try:
                with np.load(chunk) as data:
                    keys = list(zip(data["splits"], data["paths"], data["sizes"].tolist(), data["mtimes"].tolist()))
                    reasons = data["reasons"].tolist()
            except (OSError, ValueError, KeyError, zipfile.BadZipFile):
                chunk.unlink()  # damaged outside our control (atomic writes never leave one): redo its images
                self.chunks.remove(chunk)
                continue
            for row, (key, reason) in enumerate(zip(keys, reasons)):
                self.done[(str(key[0]), str(key[1]), key[2], key[3])] = ChunkRow(chunk, row, reason)
        self._loaded: tuple[Path, np.ndarray] | None = None

    def save_chunk(self, keys: list[Key], features: np.ndarray, reasons: list[str]) -> None:
        """Commit one chunk: a row per key, zeros where ``reasons`` says the image was skipped."""
        chunk = self.folder / f"chunk-{self._next_number():06d}.npz"
        splits, paths, sizes, mtimes = zip(*keys)
        arrays = dict(
            splits=np.array(splits), paths=np.array(paths), sizes=np.array(sizes, dtype=np.int64),
            mtimes=np.array(mtimes, dtype=np.int64), reasons=np.array(reasons), features=features,
        )
        atomic_write(chunk, lambda f: np.savez(f, **arrays))
        self.chunks.append(chunk)
        for row, (key, reason) in enumerate(zip(keys, reasons)):
            self.done[key] = ChunkRow(chunk, row, reason)

    def _next_number(self) -> int:
        return int(self.chunks[-1].stem.split("-")[1]) + 1 if self.chunks else 0

    def vector(self, where: ChunkRow) -> np.ndarray:
        if self._loaded is None or self._loaded[0] != where.chunk:
            with np.load(where.chunk) as data:
                self._loaded = (where.chunk, data["features"])
        return self._loaded[1][where.row]

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
