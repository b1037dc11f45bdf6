"""The committed chunks of unfinished extractions, in ``CACHE/<backbone>/features.partial/<fingerprint>/``.

Each chunk is one ``.npz`` written under a temporary name, fsynced and renamed, so a run killed at any
instant leaves only whole chunks behind; the next run with the same fingerprint (backbone, weights,
transform, precision, versions) reuses every vector in them. Chunks of other fingerprints sit in folders
of their own and are kept until a run completes, so a run with other settings never costs the work of
an interrupted one. A chunk that fails to read back whole (its zip CRC included) is deleted and redone.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import faults
from pipeline.errors import UserError
from pipeline.files import atomic_write, atomic_write_text
from pipeline.listing import DIGEST_BYTES
from pipeline.store import ImageKey


@dataclass(frozen=True)
class ChunkRow:
    """Where a finished image's result lies: its chunk file and row, its file digest, or its skip reason."""

    chunk: Path
    row: int
    digest: bytes
    reason: str


_ARRAYS = ("splits", "paths", "views", "sizes", "mtimes", "digests", "reasons", "features")


def _read_chunk(chunk: Path) -> dict[str, np.ndarray]:
    """Every array of a chunk, read whole (so its CRC is checked); raises on any damage."""
    with np.load(chunk) as data:
        arrays = {name: data[name] for name in _ARRAYS}
    if len({len(a) for a in arrays.values()}) != 1 or arrays["digests"].shape[1:] != (DIGEST_BYTES,):
        raise ValueError("arrays of different lengths")
    return arrays


class PartialRun:
    def __init__(self, root: Path, fingerprint: dict):
        self.root = Path(root)
        self.fingerprint = fingerprint
        self.folder = self.root / hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
        self.done: dict[ImageKey, ChunkRow] = {}
        self.chunks = sorted(self.folder.glob("chunk-*.npz")) if self.folder.is_dir() else []
        for chunk in list(self.chunks):
            try:
                arrays = _read_chunk(chunk)
            except Exception:  # noqa: BLE001 - damaged outside our control (atomic writes never leave one): redo it
                chunk.unlink()
                self.chunks.remove(chunk)
                continue
            keys = zip(arrays["splits"].tolist(), arrays["paths"].tolist(), arrays["views"].tolist(),
                       arrays["sizes"].tolist(), arrays["mtimes"].tolist())
            for row, (key, digest, reason) in enumerate(zip(keys, arrays["digests"], arrays["reasons"].tolist())):
                self.done[ImageKey(*key)] = ChunkRow(chunk, row, digest.tobytes(), reason)
        self._loaded: tuple[Path, np.ndarray] | None = None

    def save_chunk(self, keys: list[ImageKey], features: np.ndarray, digests: list[bytes], reasons: list[str]) -> None:
        """Commit one chunk: a row per key, zeros where ``reasons`` says the image was skipped."""
        if not self.chunks:
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.folder / "fingerprint.json", json.dumps(self.fingerprint, sort_keys=True, indent=1))
        chunk = self.folder / f"chunk-{self._next_number():06d}.npz"
        splits, paths, views, sizes, mtimes = zip(*keys)
        arrays = dict(
            splits=np.array(splits), paths=np.array(paths), views=np.array(views, dtype=np.int64),
            sizes=np.array(sizes, dtype=np.int64), mtimes=np.array(mtimes, dtype=np.int64),
            digests=np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(len(keys), DIGEST_BYTES),
            reasons=np.array(reasons), features=features,
        )
        atomic_write(chunk, lambda f: np.savez(f, **arrays), point="chunk")
        self.chunks.append(chunk)
        for row, (key, digest, reason) in enumerate(zip(keys, digests, reasons)):
            self.done[key] = ChunkRow(chunk, row, digest, reason)

    def _next_number(self) -> int:
        return int(self.chunks[-1].stem.split("-")[1]) + 1 if self.chunks else 0

    def vector(self, where: ChunkRow) -> np.ndarray:
        if self._loaded is None or self._loaded[0] != where.chunk:
            try:
                self._loaded = (where.chunk, _read_chunk(where.chunk)["features"])
            except Exception as error:  # noqa: BLE001 - changed under us since it was checked at the start
                where.chunk.unlink(missing_ok=True)
                raise UserError(f"chunk {where.chunk} was damaged during this run ({error}); it is removed: "
                                f"run `make features` again to redo its images") from None
        return self._loaded[1][where.row]

    def remove(self) -> None:
        """Delete every partial run of this file, any fingerprint: the complete file now holds what they did."""
        for chunk in sorted(self.root.glob("*/chunk-*.npz")):
            chunk.unlink()
            faults.reached("partial-removal")
        shutil.rmtree(self.root, ignore_errors=True)
