"""Stage one across processes, GPUs and nodes with ``torchrun`` (``torch.distributed``).

Each rank takes a contiguous shard of every split (no padding, no duplicates), writes its own
part file ``features.part-<rank>-of-<world>.h5`` by the same rules as the single-process file
(fingerprint, chunks, resume), and rank 0, after a barrier, joins the parts into ``features.h5``:
an h5py virtual dataset over the parts' vectors (no copy), or one plain file with ``--merge``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pipeline import faults
from pipeline.errors import UserError
from pipeline.listing import DatasetListing, SplitListing
from pipeline.store import (BLOCK_ROWS, FeatureFiles, FeatureStore, Placement, Source, SplitIndex, StoreWriter, relabelled,
                            reserve_bytes)


@dataclass(frozen=True)
class Rank:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def current() -> Rank:
    """This process's place, from the variables torchrun sets (one process without them)."""
    return Rank(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))


def local_device(name: str, rank: Rank) -> str:
    """Under torchrun, 'auto' and 'cuda' mean this rank's own GPU (``LOCAL_RANK``)."""
    if rank.distributed and name in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{rank.local_rank}"
    return name


def start(device: torch.device) -> None:
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=2))


def barrier() -> None:
    dist.barrier()


def gather(value) -> list:
    """Every rank's ``value``, in rank order (a barrier too)."""
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(listing: DatasetListing, rank: Rank) -> DatasetListing:
    """Rank r's contiguous slice of every split; the listing-level skips are reported by rank 0 only."""
    splits = {}
    for name, split in listing.splits.items():
        n = len(split.paths)
        lo, hi = rank.rank * n // rank.world, (rank.rank + 1) * n // rank.world
        splits[name] = split.rows(lo, hi, split.skipped if rank.rank == 0 else [])
    return DatasetListing(listing.root, listing.classes, splits)


def part_file(folder: Path, rank: Rank) -> Path:
    """The name a rank's part versions are derived from (also of its lock and its partial-run folder)."""
    return folder / f"features.part-{rank.rank}-of-{rank.world}.h5"


def join(target: Path, parts: list[Path], classes: list[str], merge: bool = False) -> bool:
    """Join the parts (one per rank, in rank order) into ``target``, labelled by ``classes`` (the listing's: a part
    left unchanged since a class was added keeps its own), then remove other versions of the parts; False when
    ``target`` already joins exactly these versions."""
    stores = [FeatureStore(p) for p in parts]
    try:
        sources = [Source(p.name, s.attrs["content_sha256"], {split: len(s.paths(split)) for split in s.splits})
                   for p, s in zip(parts, stores)]
        stamp = json.dumps([[s.name, s.digest] for s in sources])
        if _already_joined(target, stamp, merge):
            return False
        first = stores[0]
        if any(s.fingerprint != first.fingerprint for s in stores):
            raise UserError("the part files were made with different settings; run `make features FORCE=1 NPROC=...`")
        attrs = {k: v for k, v in first.attrs.items() if k not in ("format", "format_version", "complete", "content_sha256",
                                                                   "sources")}
        attrs.update(
            created=max(str(s.attrs["created"]) for s in stores),
            images_extracted=sum(int(s.attrs["images_extracted"]) for s in stores),
            views_extracted=sum(int(s.attrs["views_extracted"]) for s in stores),
            extraction_seconds=max(float(s.attrs["extraction_seconds"]) for s in stores),
            augment_seconds=max(float(s.attrs["augment_seconds"]) for s in stores),
            throughput_img_s=sum(float(s.attrs["throughput_img_s"]) for s in stores),
            joined_from=stamp,
            merged=merge,
            classes=list(classes),
        )
        rows = sum(len(s.paths(split)) for s in stores for split in s.splits)
        path_bytes = len(os.fsencode("".join(p for s in stores for split in s.splits for p in s.paths(split))))
        reserve = reserve_bytes(rows if merge else 0, path_bytes, first.feature_dim, np.float32)
        with StoreWriter(target, attrs, sources=[] if merge else sources, reserve=reserve) as writer:
            for split in first.splits:
                indexes = [s.index(split) for s in stores]
                index = SplitIndex(
                    [p for i in indexes for p in i.paths], np.concatenate([i.views for i in indexes]),
                    np.concatenate([_relabelled(i.labels, s.classes, classes) for i, s in zip(indexes, stores)]),
                    *[np.concatenate([getattr(i, a) for i in indexes]) for a in ("sizes", "mtimes", "digests")],
                    [r for i in indexes for r in i.skipped],
                )
                dtype = first.file[split]["features"].dtype
                if merge:
                    rows = writer.add_split(split, index, first.feature_dim, dtype)
                    start = 0
                    for s, part_index in zip(stores, indexes):
                        n = len(part_index.paths)
                        for block in range(0, n, BLOCK_ROWS):
                            chunk = s.features(split, slice(block, block + BLOCK_ROWS))
                            rows[start + block:start + block + len(chunk)] = chunk
                        start += n
                else:
                    placement = Placement(np.concatenate([np.full(len(i.paths), r) for r, i in enumerate(indexes)]),
                                          np.concatenate([np.arange(len(i.paths)) for i in indexes]))
                    writer.add_mapped_split(split, index, placement, first.feature_dim, dtype)
            faults.reached("join-before-rename")
            writer.commit()
    finally:
        for s in stores:
            s.close()
    _remove_other_versions(parts)
    return True


def _relabelled(labels: np.ndarray, own: list[str], classes: list[str]) -> np.ndarray:
    """A part's labels (into its ``own`` classes) as labels into ``classes``, all of which must be there."""
    labels = relabelled(labels, own, classes)
    if (labels < 0).any():
        raise UserError("a part file holds images of a class the dataset no longer has; run `make features FORCE=1 NPROC=...`")
    return labels


def _remove_other_versions(parts: list[Path]) -> None:
    """Versions of these ranks' parts that the new join does not read."""
    keep = set(parts)
    world = len(parts)
    for rank in range(world):
        for version in FeatureFiles(part_file(parts[0].parent, Rank(rank, world)), versioned=True).versions():
            if version not in keep:
                version.unlink(missing_ok=True)


def _already_joined(target: Path, stamp: str, merge: bool) -> bool:
    try:
        with FeatureStore(target) as joined:
            return joined.attrs.get("joined_from") == stamp and joined.attrs.get("merged") == merge
    except UserError:
        return False
