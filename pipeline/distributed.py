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

from pipeline.errors import UserError
from pipeline.images import DatasetListing, SplitListing
from pipeline.store import BLOCK_ROWS, FeatureStore, SplitIndex, StoreWriter


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


def start(device: str) -> None:
    if not dist.is_initialized():
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=timedelta(hours=2))


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
        n = len(split.entries)
        lo, hi = rank.rank * n // rank.world, (rank.rank + 1) * n // rank.world
        splits[name] = SplitListing(split.entries[lo:hi], split.skipped if rank.rank == 0 else [])
    return DatasetListing(listing.root, listing.classes, splits)


def part_file(folder: Path, rank: Rank) -> Path:
    return folder / f"features.part-{rank.rank}-of-{rank.world}.h5"


def join(target: Path, world: int, merge: bool = False) -> bool:
    """Join the parts into ``target``; False when it already joins exactly these parts."""
    parts = [part_file(target.parent, Rank(r, world)) for r in range(world)]
    stores = [FeatureStore(p) for p in parts]
    try:
        stamp = json.dumps([[p.name, str(s.attrs["created"])] for p, s in zip(parts, stores)] + [["merge", merge]])
        if _already_joined(target, stamp):
            return False
        first = stores[0]
        if any(s.fingerprint != first.fingerprint for s in stores):
            raise UserError("the part files were made with different settings; run `make features FORCE=1 NPROC=...`")
        attrs = {k: v for k, v in first.attrs.items() if k not in ("format", "format_version", "complete")}
        attrs.update(
            created=max(str(s.attrs["created"]) for s in stores),
            images_extracted=sum(int(s.attrs["images_extracted"]) for s in stores),
            views_extracted=sum(int(s.attrs["views_extracted"]) for s in stores),
            extraction_seconds=max(float(s.attrs["extraction_seconds"]) for s in stores),
            augment_seconds=max(float(s.attrs["augment_seconds"]) for s in stores),
            throughput_img_s=sum(float(s.attrs["throughput_img_s"]) for s in stores),
            parts=stamp,
        )
        with StoreWriter(target, attrs) as writer:
            for split in first.splits:
                indexes = [s.index(split) for s in stores]
                index = SplitIndex(
                    [p for i in indexes for p in i.paths], np.concatenate([i.labels for i in indexes]),
                    np.concatenate([i.sizes for i in indexes]), np.concatenate([i.mtimes for i in indexes]),
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
                    sources = [(p.name, len(i.paths)) for p, i in zip(parts, indexes)]
                    writer.add_virtual_split(split, index, first.feature_dim, dtype, sources)
            writer.commit()
        return True
    finally:
        for s in stores:
            s.file.close()


def _already_joined(target: Path, stamp: str) -> bool:
    try:
        with FeatureStore(target) as joined:
            return joined.attrs.get("parts") == stamp
    except UserError:
        return False
