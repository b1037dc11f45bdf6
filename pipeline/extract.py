"""Stage one: run the frozen backbone over every new or changed image, once, into the feature store.

An unchanged dataset is a no-op. Otherwise vectors are reused from the previous ``features.h5``
(same fingerprint, same file size and mtime) and from the committed chunks of an interrupted run;
only the rest go through the backbone, chunk by chunk; then a new ``features.h5`` is assembled
under a temporary name and renamed into place.
"""

from __future__ import annotations

import errno
import importlib.metadata
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import PIL
import torch
import torchvision
from filelock import FileLock, Timeout
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline import distributed
from pipeline.backbones import Backbone, get_backbone, load_backbone, weights_identity
from pipeline.config import Settings
from pipeline.errors import UserError
from pipeline.images import (AUGMENTED, DatasetListing, ImageFiles, augmented_views, collate_good, jpeg_decoder,
                             scan_dataset)
from pipeline.inference import RUNTIMES, prepare, resolve_device, runtime_installed
from pipeline.partial import ChunkRow, Key, PartialRun
from pipeline.store import BLOCK_ROWS, FeatureStore, SkipRecord, SplitIndex, StoreWriter, features_file

SKIPS_LISTED = 50  # skipped files listed under the summary line; all of them are in the file and the report


def library_versions(runtime: str = "torch") -> dict[str, str]:
    """The libraries whose version can change the numbers of a feature vector."""
    versions = {"torch": torch.__version__, "torchvision": torchvision.__version__, "pillow": PIL.__version__}
    if jpeg_decoder() is not None:
        versions["torchcodec"] = importlib.metadata.version("torchcodec")
    if package := RUNTIMES.get(runtime):
        versions[package] = importlib.metadata.version(package) if runtime_installed(runtime) else "missing"
    return versions


STORAGE_DTYPES = {"float32": np.float32, "float16": np.float16}


def fingerprint(backbone: Backbone, settings: Settings) -> dict:
    """What produced the vectors; a cache whose fingerprint differs is rebuilt, never reused."""
    if settings.storage not in STORAGE_DTYPES:
        raise UserError(f"unknown storage dtype '{settings.storage}'; choose float32 or float16")
    return {
        "backbone": backbone.name,
        "weights": weights_identity(backbone, settings.weights),
        "transform": f"{backbone.transform()!r} then {backbone.normalize()!r}",
        "decode": f"RGB, EXIF-rotated, JPEG draft to >= {backbone.resize}px, plain JPEGs by "
                  f"{'torchcodec' if jpeg_decoder() is not None else 'Pillow'}",
        "augment": f"{backbone.augment_transform()!r} seeded by crc32 of '<path>#aug<k>'",
        "precision": settings.precision,
        "runtime": settings.runtime,
        "storage": settings.storage,
        "versions": library_versions(settings.runtime),
    }


@dataclass
class ExtractSummary:
    path: Path
    images: dict[str, int] = field(default_factory=dict)
    reused: int = 0
    resumed: int = 0
    extracted: int = 0
    removed: int = 0
    skipped: list[tuple[str, SkipRecord]] = field(default_factory=list)
    seconds: float = 0.0
    backbone_seconds: float = 0.0  # inside the forward (device copies included); the rest is decoding and writing
    up_to_date: bool = False

    def describe_file(self) -> None:
        """Fill in the vector counts and skipped files from the finished file itself."""
        with FeatureStore(self.path) as store:
            self.images = {s: len(store.paths(s)) for s in store.splits}
            self.skipped = [(s, r) for s in store.splits for r in store.index(s).skipped]

    def line(self) -> str:
        size = self.path.stat().st_size / 1e6 if self.path.exists() else 0.0
        split_counts = ", ".join(f"{n} {s}" for s, n in self.images.items())
        rate = f", {self.extracted / self.seconds:.1f} img/s" if self.extracted and self.seconds else ""
        if rate and self.backbone_seconds:
            rate += f", backbone busy {self.backbone_seconds / self.seconds:.0%} of it"
        state = "up to date" if self.up_to_date else f"extracted {self.extracted}"
        skipped = [f"  skipped {record.path}: {record.reason}" for _, record in self.skipped[:SKIPS_LISTED]]
        if len(self.skipped) > SKIPS_LISTED:
            skipped.append(f"  ... and {len(self.skipped) - SKIPS_LISTED} more, all listed in report.md and {self.path.name}")
        return "\n".join([
            f"features: {state} | {sum(self.images.values())} vectors ({split_counts}) in {self.path} ({size:.1f} MB) | "
            f"reused {self.reused}, resumed {self.resumed}, removed {self.removed}, skipped {len(self.skipped)} | "
            f"{self.seconds:.1f} s{rate}",
            *skipped,
        ])


def _previous(target: Path, expected: dict, force: bool) -> FeatureStore | None:
    """The existing feature file if it may be reused; anything else is rebuilt."""
    if force or not target.exists():
        return None
    try:
        store = FeatureStore(target)
    except UserError as error:
        print(f"features: existing cache not reusable ({error}); rebuilding")
        return None
    if store.fingerprint != expected:
        changed = [k for k in expected if store.fingerprint.get(k) != expected[k]]
        print(f"features: {', '.join(changed)} changed since {target} was made; rebuilding")
        store.file.close()
        return None
    return store


@dataclass
class Plan:
    """For every listed image, where its vector comes from: the old file, a chunk, or the backbone."""

    old_rows: dict[Key, int] = field(default_factory=dict)
    old_skips: dict[Key, str] = field(default_factory=dict)
    todo: list[Key] = field(default_factory=list)
    resumed: int = 0
    removed: int = 0
    listing_changed: bool = False


def _plan(listing: DatasetListing, previous: FeatureStore | None, partial_done: dict[Key, ChunkRow]) -> Plan:
    plan = Plan(listing_changed=previous is None)
    old_splits = previous.splits if previous is not None else []
    for split in dict.fromkeys([*listing.splits, *old_splits]):
        stored: dict[Key, int | str] = {}
        if previous is not None and split in previous.splits:
            index = previous.index(split)
            stored = {(split, p, int(s), int(m)): row for row, (p, s, m) in enumerate(zip(index.paths, index.sizes, index.mtimes))}
            stored |= {(split, s.path, s.size, s.mtime_ns): s.reason for s in index.skipped if s.size >= 0}
            old_listing_skips = {(s.path, s.reason) for s in index.skipped if s.size < 0}
            new_listing_skips = {(s.path, s.reason) for s in listing.splits[split].skipped} if split in listing.splits else set()
            plan.listing_changed |= old_listing_skips != new_listing_skips
        current = set()
        for entry in listing.splits[split].entries if split in listing.splits else []:
            key = (split, entry.path, entry.size, entry.mtime_ns)
            current.add(key)
            found = stored.get(key)
            if isinstance(found, int):
                plan.old_rows[key] = found
            elif isinstance(found, str):
                plan.old_skips[key] = found
            elif key in partial_done:
                plan.resumed += 1
            else:
                plan.todo.append(key)
        plan.removed += len({key[1] for key in stored} - {key[1] for key in current})
    return plan


def decode_workers(settings: Settings, device: torch.device, n_images: int) -> int:
    """Decoding workers: on an accelerator, enough to keep it busy; on a CPU they compete with the model for the
    same cores (2 cores, `make bench`: 0 workers 61 img/s, 1 worker 38, 2 workers 38), so only many-core CPUs get some."""
    if settings.workers >= 0:
        return settings.workers
    cores = os.cpu_count() or 1
    if n_images <= 2 * settings.batch_size:
        return 0
    return min(8, cores) if device.type != "cpu" else min(4, cores // 8)


def _run_backbone(settings: Settings, backbone: Backbone, listing: DatasetListing, todo: list[Key], partial: PartialRun,
                  forward, device: torch.device) -> float:
    """Extract ``todo`` into ``partial``, chunk by chunk; return the seconds spent in ``forward``."""
    dataset = ImageFiles(listing.root, [key[1] for key in todo], backbone.transform(), min_side=backbone.resize,
                         augment=backbone.augment_transform())
    workers = decode_workers(settings, device, len(todo))
    loader = DataLoader(dataset, batch_size=settings.batch_size, num_workers=workers, collate_fn=collate_good,
                        pin_memory=device.type == "cuda")
    keys: list[Key] = []
    rows: list[np.ndarray] = []
    reasons: list[str] = []
    zeros = np.zeros(backbone.feature_dim, dtype=np.float32)
    busy = 0.0

    def commit() -> None:
        partial.save_chunk(keys[:], np.stack(rows), reasons[:])
        keys.clear(), rows.clear(), reasons.clear()

    with tqdm(total=len(todo), unit="img", desc=f"features {backbone.name} on {device}", disable=None) as bar:
        for indices, images, bad in loader:
            started = time.perf_counter()
            vectors = forward(images).numpy() if images is not None else []
            busy += time.perf_counter() - started
            results = {i: (v, "") for i, v in zip(indices, vectors)} | {i: (zeros, reason) for i, reason in bad}
            for i in sorted(results):
                keys.append(todo[i])
                rows.append(results[i][0])
                reasons.append(results[i][1])
            if len(keys) >= settings.chunk_size:
                commit()
            bar.update(len(results))
    if keys:
        commit()
    return busy


def _assemble(target: Path, attrs: dict, listing: DatasetListing, plan: Plan, previous: FeatureStore | None,
              partial: PartialRun, feature_dim: int, dtype: type, summary: ExtractSummary) -> None:
    with StoreWriter(target, attrs) as writer:
        for split in listing.splits:
            sources, index = [], SplitIndex([], [], [], [], [SkipRecord(s.path, s.reason) for s in listing.splits[split].skipped])
            for entry in listing.splits[split].entries:
                key = (split, entry.path, entry.size, entry.mtime_ns)
                if key in plan.old_rows:
                    source, reason = plan.old_rows[key], ""
                elif key in plan.old_skips:
                    source, reason = None, plan.old_skips[key]
                else:
                    source = partial.done[key]
                    reason = source.reason
                if reason:
                    index.skipped.append(SkipRecord(entry.path, reason, entry.size, entry.mtime_ns))
                    continue
                sources.append(source)
                index.paths.append(entry.path)
                index.labels.append(entry.label)
                index.sizes.append(entry.size)
                index.mtimes.append(entry.mtime_ns)
            dataset = writer.add_split(split, index, feature_dim, dtype)
            for start in range(0, len(sources), BLOCK_ROWS):
                block = sources[start:start + BLOCK_ROWS]
                old = [s for s in block if isinstance(s, int)]
                old_block = previous.features(split, slice(min(old), max(old) + 1)) if old else None
                dataset[start:start + len(block)] = np.stack(
                    [old_block[s - min(old)] if isinstance(s, int) else partial.vector(s) for s in block]
                )
            summary.images[split] = len(sources)
            summary.skipped += [(split, s) for s in index.skipped]
        writer.commit()


def _throughput(images: int, seconds: float, previous: FeatureStore | None) -> float:
    """img/s of the backbone pass that made most of these vectors: this run's, or kept from the file it updates."""
    if images and seconds:
        return images / seconds
    return float(previous.attrs.get("throughput_img_s", 0.0)) if previous is not None else 0.0


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise UserError(f"cannot write to cache folder {folder} ({error.strerror}); pass CACHE=/a/writable/folder") from None


def extract(settings: Settings) -> ExtractSummary:
    """Bring ``CACHE/<backbone>/features.h5`` up to date with ``DATA``; see the module docstring.

    Under torchrun each rank brings its own part file up to date and rank 0 joins the parts."""
    start = time.perf_counter()
    listing = scan_dataset(settings.data)
    if settings.augment > 0:
        listing.splits[AUGMENTED] = augmented_views(listing.splits["train"], settings.augment)
    backbone = get_backbone(settings.backbone)
    expected = fingerprint(backbone, settings)
    folder = settings.backbone_dir()
    _check_writable(folder)
    rank = distributed.current()
    device = distributed.local_device(settings.device, rank)
    if not rank.distributed:
        summary = _update(settings, listing, backbone, expected, features_file(folder), device, start)
    else:
        distributed.start(device)
        try:
            part = distributed.part_file(folder, rank)
            summary = _update(settings, distributed.shard(listing, rank), backbone, expected, part, device, start)
            summary.seconds = time.perf_counter() - start
            print(f"rank {rank.rank}/{rank.world}: {summary.line()}")
            extracted = sum(distributed.gather(summary.extracted))
            if rank.rank == 0:
                joined = distributed.join(features_file(folder), rank.world, settings.merge)
                summary = ExtractSummary(features_file(folder), extracted=extracted, up_to_date=not joined)
                summary.describe_file()
            distributed.barrier()
        finally:
            distributed.stop()
    summary.seconds = time.perf_counter() - start
    return summary


def _update(settings: Settings, listing: DatasetListing, backbone: Backbone, expected: dict, target: Path, device: str,
            start: float) -> ExtractSummary:
    """Bring one feature file (``features.h5`` or a rank's part) up to date with ``listing``."""
    summary = ExtractSummary(target)
    lock = target.with_suffix(".lock")
    try:
        with FileLock(lock, timeout=0):
            previous = _previous(target, expected, settings.force)
            partial = PartialRun(target.with_suffix(".partial"), expected)
            plan = _plan(listing, previous, partial.done)
            summary.removed = plan.removed
            summary.reused = len(plan.old_rows) + len(plan.old_skips)
            summary.resumed = plan.resumed
            if previous is not None and not (plan.todo or plan.removed or plan.resumed or plan.listing_changed):
                previous.file.close()
                partial.remove()
                summary.up_to_date = True
                summary.describe_file()
                return summary
            plain = [key for key in plan.todo if key[0] != AUGMENTED]
            views = [key for key in plan.todo if key[0] == AUGMENTED]
            seconds = {}
            if plan.todo:
                torch_device = resolve_device(device)
                forward = prepare(backbone, load_backbone(backbone, settings.weights), torch_device, settings.precision,
                                  settings.runtime)
                for name, keys in (("images", plain), ("views", views)):
                    started = time.perf_counter()
                    if keys:
                        summary.backbone_seconds += _run_backbone(settings, backbone, listing, keys, partial, forward,
                                                                  torch_device)
                    seconds[name] = time.perf_counter() - started
            summary.extracted = len(plan.todo)
            attrs = {
                **{k: v for k, v in expected.items() if k != "versions"},
                "feature_dim": backbone.feature_dim,
                "classes": listing.classes,
                "versions": json.dumps(expected["versions"]),
                "fingerprint": json.dumps(expected, sort_keys=True),
                "data_root": str(listing.root.resolve()),
                "created": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
                "images_extracted": len(plain),
                "extraction_seconds": time.perf_counter() - start - seconds.get("views", 0.0),
                "throughput_img_s": _throughput(len(plain), seconds.get("images", 0.0), previous),
                "views_extracted": len(views),
                "augment_seconds": seconds.get("views", 0.0),
            }
            _assemble(target, attrs, listing, plan, previous, partial, backbone.feature_dim,
                      STORAGE_DTYPES[settings.storage], summary)
            if previous is not None:
                previous.file.close()
            partial.remove()
    except Timeout:
        raise UserError(f"another `features` run is writing {target} (lock {lock}); wait for it to finish") from None
    except OSError as error:
        if error.errno == errno.ENOSPC or "No space left" in str(error):
            raise UserError(
                f"disk full while writing {target.parent}; free space and run `make features` again (finished chunks are kept)"
            ) from None
        raise
    return summary
