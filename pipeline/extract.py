"""Stage one: run the frozen backbone over every new or changed image, once, into the feature store.

Every setting, the device, the runtime and the weights are checked before anything on disk is touched.
An unchanged dataset is a no-op. Otherwise vectors are reused from the previous ``features.h5`` (same
fingerprint, same file size and mtime) and from the committed chunks of an interrupted run; only the
rest go through the backbone, chunk by chunk. Then the new vectors are written to a new segment file and
a new ``features.h5`` (the map of every row to its segment, by runs) is written; each under a temporary name
and renamed into place. Old vectors stay where they are, so an update writes what it adds plus the map;
segments mostly dead, or the smallest when there are too many, are copied into the new one (``_rewritten``).
A stored vector whose checksum fails
while it is copied is redone, not copied; ``--verify`` also re-reads every image and every stored vector
and redoes what changed.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import os
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

from pipeline import distributed, fastpath, faults, freshness
from pipeline.backbones import Backbone, check_weights, get_backbone, load_backbone, weights_identity
from pipeline.bulk import per_image
from pipeline.config import Settings
from pipeline.errors import UserError
from pipeline.files import check_writable, disk_full_as_user_error
from pipeline.freshness import ExtractSummary
from pipeline.images import ImageFiles, collate_good, file_digest, jpeg_decoder
from pipeline.listing import AUGMENTED, DIGEST_BYTES, NO_VIEW, BadImage, DatasetListing, augmented_views, scan_dataset
from pipeline.inference import RUNTIME_PACKAGES, check_runtime, kept_model, package_version, prepare, resolve_device
from pipeline.partial import ChunkRow, PartialRun
from pipeline.progress import progress
from pipeline.store import (BLOCK_ROWS, ROWS_PER_CHUNK, FeatureFiles, FeatureStore, ImageKey, Placement, SkipRecord, Source,
                            SplitIndex, StoreWriter, features_file, reserve_bytes, stated_fingerprint)

log = logging.getLogger(__name__)


STORAGE_DTYPES = {"float32": np.float32, "float16": np.float16}


def library_versions(runtime: str = "torch") -> dict[str, str]:
    """The libraries whose version can change the numbers of a feature vector."""
    versions = {"torch": torch.__version__, "torchvision": torchvision.__version__, "pillow": PIL.__version__}
    if jpeg_decoder() is not None:
        versions["torchcodec"] = package_version("torchcodec")
    if package := RUNTIME_PACKAGES.get(runtime):
        versions[package] = package_version(package)
    return versions


def fingerprint(backbone: Backbone, settings: Settings, weights: str) -> dict:
    """What produced the vectors (``weights``: their ``weights_identity``); a cache whose fingerprint differs is
    rebuilt, never reused."""
    return {
        "backbone": backbone.name,
        "weights": weights,
        "transform": f"{backbone.transform()!r} then {backbone.normalize()!r}",
        "decode": f"RGB, EXIF-rotated, JPEG draft to >= {backbone.resize}px, plain JPEGs by "
                  f"{'torchcodec' if jpeg_decoder() is not None else 'Pillow'}",
        "augment": f"{backbone.augment_transform()!r} seeded by view_seed(path, view)",
        "precision": settings.precision,
        "runtime": settings.runtime,
        "storage": settings.storage,
        "versions": library_versions(settings.runtime),
    }


def _previous(path: Path | None, expected: dict, force: bool) -> FeatureStore | None:
    """The existing feature file if it may be reused; anything else is rebuilt."""
    if force or path is None or not path.exists():
        return None
    try:
        store = FeatureStore(path)
    except UserError as error:
        log.warning(f"features: existing cache not reusable ({error}); rebuilding")
        return None
    if store.fingerprint != expected:
        changed = [k for k in expected if store.fingerprint.get(k) != expected[k]]
        log.warning(f"features: {', '.join(changed)} changed since {path} was made; rebuilding")
        store.close()
        return None
    return store


def listed_keys(listing: DatasetListing, split: str) -> list[tuple[ImageKey, int]]:
    """Each listed image of ``split`` (each of its views, in the augmented split) with its label, in order."""
    part = listing.splits[split]
    return list(zip(map(ImageKey, itertools.repeat(split), part.paths, part.views, part.sizes, part.mtimes_ns), part.labels))


@dataclass
class Plan:
    """For every listed image, where its vector comes from: the old file, a chunk, or the backbone."""

    old_rows: dict[ImageKey, int] = field(default_factory=dict)
    old_skips: dict[ImageKey, str] = field(default_factory=dict)
    todo: list[ImageKey] = field(default_factory=list)
    resumed: int = 0
    removed: int = 0
    repaired: int = 0
    listing_changed: bool = False
    listed: dict[str, list[tuple[ImageKey, int]]] = field(default_factory=dict)  # listed_keys of each split

    def redo(self, keys: list[ImageKey]) -> None:
        """Stored vectors that must not be copied: extract them again."""
        for key in keys:
            if self.old_rows.pop(key, None) is not None:
                self.todo.append(key)
                self.repaired += 1


@per_image
def _plan(listing: DatasetListing, previous: FeatureStore | None, partial_done: dict[ImageKey, ChunkRow]) -> Plan:
    plan = Plan(listing_changed=previous is None or previous.attrs.get("data_root") != str(listing.root.resolve()),
                listed={split: listed_keys(listing, split) for split in listing.splits})
    old_splits = previous.splits if previous is not None else []
    for split in dict.fromkeys([*listing.splits, *old_splits]):
        stored: dict[ImageKey, int | str] = {}
        if previous is not None and split in previous.splits:
            index = previous.index(split)
            stored = {key: row for row, key in enumerate(index.keys(split))}
            stored |= {ImageKey(split, s.path, s.view, s.size, s.mtime_ns): s.reason for s in index.skipped if s.size >= 0}
            old_listing_skips = {(s.path, s.reason) for s in index.skipped if s.size < 0}
            new_listing_skips = {(s.path, s.reason) for s in listing.splits[split].skipped} if split in listing.splits else set()
            plan.listing_changed |= old_listing_skips != new_listing_skips
        listed, found_stored = plan.listed.get(split, []), 0
        for key, _ in listed:
            found = stored.get(key)
            if isinstance(found, int):
                plan.old_rows[key] = found
            elif isinstance(found, str):
                plan.old_skips[key] = found
            elif key in partial_done:
                plan.resumed += 1
            else:
                plan.todo.append(key)
            found_stored += found is not None
        if found_stored < len(stored):  # some stored image is not listed as it was: removed, or changed in place
            plan.removed += len({(k.path, k.view) for k in stored} - {(k.path, k.view) for k, _ in listed})
    return plan


def _stored_digests(store: FeatureStore) -> dict[ImageKey, bytes]:
    return {key: bytes(d) for split in store.splits for key, d in zip(store.index(split).keys(split), store.index(split).digests)}


def _verify(listing: DatasetListing, previous: FeatureStore, plan: Plan) -> None:
    """``--verify``: redo every stored vector whose image bytes changed (same size and mtime) or whose chunk checksum fails."""
    stored = _stored_digests(previous)
    current: dict[str, bytes | None] = {}
    changed = []
    for key in progress(list(plan.old_rows), unit="img", desc="verify images"):
        if key.path not in current:
            try:
                current[key.path] = file_digest(listing.root / key.path)
            except BadImage:
                current[key.path] = None
        if current[key.path] != stored[key]:
            changed.append(key)
    for split in previous.splits:
        rows = len(previous.paths(split))
        for start in range(0, rows, ROWS_PER_CHUNK):
            try:
                previous.features(split, slice(start, start + ROWS_PER_CHUNK))
            except UserError:
                bad = set(range(start, min(rows, start + ROWS_PER_CHUNK)))
                changed += [key for key, row in plan.old_rows.items() if key.split == split and row in bad]
    plan.redo(list(dict.fromkeys(changed)))


def decode_workers(settings: Settings, device: torch.device, n_images: int) -> int:
    """Decoding workers: on an accelerator, enough to keep it busy; on a CPU they compete with the model for the
    same cores, so only many-core CPUs get some (``make bench`` measures both)."""
    if settings.workers >= 0:
        return settings.workers
    cores = os.cpu_count() or 1
    if n_images <= 2 * settings.batch_size:
        return 0
    return min(8, cores) if device.type != "cpu" else min(4, cores // 8)


def _run_backbone(settings: Settings, backbone: Backbone, root: Path, todo: list[ImageKey], partial: PartialRun,
                  forward, device: torch.device) -> float:
    """Extract ``todo`` into ``partial``, chunk by chunk; return the seconds spent in ``forward``."""
    dataset = ImageFiles(root, [(key.path, key.view) for key in todo], backbone.transform(), min_side=backbone.resize,
                         augment=backbone.augment_transform())
    workers = decode_workers(settings, device, len(todo))
    loader = DataLoader(dataset, batch_size=settings.batch_size, num_workers=workers, collate_fn=collate_good,
                        pin_memory=device.type == "cuda")
    keys: list[ImageKey] = []
    rows: list[np.ndarray] = []
    digests: list[bytes] = []
    reasons: list[str] = []
    zeros = np.zeros(backbone.feature_dim, dtype=np.float32)
    busy = 0.0

    def commit() -> None:
        partial.save_chunk(keys[:], np.stack(rows), digests[:], reasons[:])
        keys.clear(), rows.clear(), digests.clear(), reasons.clear()

    with progress(total=len(todo), unit="img", desc=f"features {backbone.name} on {device}") as bar:
        for indices, images, outcomes in loader:
            started = time.perf_counter()
            vectors = dict(zip(indices, forward(images).numpy())) if images is not None else {}
            busy += time.perf_counter() - started
            for i in sorted(outcomes):
                digest, reason = outcomes[i]
                keys.append(todo[i])
                rows.append(vectors.get(i, zeros))
                digests.append(digest)
                reasons.append(reason)
            if len(keys) >= settings.chunk_size:
                commit()
            bar.update(len(outcomes))
    if keys:
        commit()
    return busy


class DamagedRows(Exception):
    """Stored vectors whose checksum failed while being copied: they are extracted again."""

    def __init__(self, keys: list[ImageKey]):
        super().__init__(f"{len(keys)} stored vectors failed their checksum")
        self.keys = keys


@dataclass
class SplitRows:
    """A split of the file being written: its index rows, where each row's vector comes from, its skip records."""

    rows: list[tuple[ImageKey, int, bytes]] = field(default_factory=list)
    sources: list[tuple[ImageKey, int | ChunkRow]] = field(default_factory=list)
    skipped: list[SkipRecord] = field(default_factory=list)

    def index(self, keep: np.ndarray | slice = slice(None)) -> SplitIndex:
        rows = self.rows if isinstance(keep, slice) else [self.rows[i] for i in keep]
        return SplitIndex.build(rows, self.skipped if isinstance(keep, slice) else [])


def _split_rows(split: str, listing: DatasetListing, plan: Plan, previous: FeatureStore | None,
                partial: PartialRun) -> SplitRows:
    out = SplitRows(skipped=[SkipRecord(s.path, s.reason) for s in listing.splits[split].skipped])
    stored = previous.index(split).digests.tobytes() if previous is not None and split in previous.splits else b""
    old_rows, old_skips = plan.old_rows, plan.old_skips
    for key, label in plan.listed[split]:
        if (row := old_rows.get(key)) is not None:
            source, digest = row, stored[DIGEST_BYTES * row:DIGEST_BYTES * (row + 1)]
        elif (reason := old_skips.get(key)) is not None:
            out.skipped.append(SkipRecord(key.path, reason, key.size, key.mtime_ns, key.view))
            continue
        else:
            source = partial.done[key]
            if source.reason:
                out.skipped.append(SkipRecord(key.path, source.reason, key.size, key.mtime_ns, key.view))
                continue
            digest = source.digest
        out.sources.append((key, source))
        out.rows.append((key, label, digest))
    return out


MAX_SEGMENTS = 16  # an update that would leave more copies the smallest into its new one (see _rewritten)
MAX_RUNS = 4096  # a mapping broken into more runs (each a mapping of the virtual dataset) is compacted into one segment


@per_image
def _assemble(location: FeatureFiles, attrs: dict, listing: DatasetListing, plan: Plan, previous: FeatureStore | None,
              partial: PartialRun, feature_dim: int, dtype: type) -> Path:
    """Write the updated file and return its path: a plain file, or (segmented) a new segment holding the new vectors
    (and those of the old segments it replaces, see ``_rewritten``) and a new ``features.h5`` mapping every row from
    the segments by runs."""
    splits = {split: _split_rows(split, listing, plan, previous, partial) for split in listing.splits}
    path_bytes = len(os.fsencode("".join(key.path for rows in splits.values() for key, _, _ in rows.rows)))
    n_rows = sum(len(rows.rows) for rows in splits.values())
    if not location.segmented:
        target = location.new()
        with StoreWriter(target, attrs, reserve=reserve_bytes(n_rows, path_bytes, feature_dim, dtype)) as writer:
            for split, rows in splits.items():
                _write_vectors(writer.add_split(split, rows.index(), feature_dim, dtype), split, rows.sources, previous, partial)
            writer.commit()
        return target
    own_segments = {p.name for p in location.segments()}
    mapped = (previous is not None and previous.sources and all(s.name in own_segments for s in previous.sources)
              and all(previous.placement(s) is not None for s in previous.splits))
    kept = previous if mapped else None
    layout = _layout(splits, kept, set())  # every row left where it is: the common append needs nothing more
    if (rewrite := _rewritten(splits, kept, layout[2])) != set():
        layout = _layout(splits, kept, rewrite)
    new_rows, sources, placements = layout
    if any(len(rows) for rows in new_rows.values()):
        segment = location.new_segment()
        n_new = sum(len(picked) for picked in new_rows.values())
        new_bytes = len(os.fsencode("".join(rows.rows[i][0].path for split, rows in splits.items()
                                            for i in new_rows[split])))
        with StoreWriter(segment, attrs, reserve=reserve_bytes(n_new, new_bytes, feature_dim, dtype)) as writer:
            for split, rows in splits.items():
                picked = new_rows[split]
                _write_vectors(writer.add_split(split, rows.index(picked), feature_dim, dtype), split,
                               [rows.sources[i] for i in picked], previous, partial)
            writer.commit()
        sources.append(Source(segment.name, writer.digest, {split: len(picked) for split, picked in new_rows.items()}))
    runs = sum(len(p.run_array()) for p in placements.values())
    skipped_bytes = sum(len(os.fsencode(s.path + s.reason)) for rows in splits.values() for s in rows.skipped)
    with StoreWriter(location.base, attrs, sources=sources, reserve=reserve_bytes(0, skipped_bytes, feature_dim, dtype) +
                     256 * runs) as index:
        for split, rows in splits.items():
            index.add_mapped_split(split, rows.index(), placements[split], feature_dim, dtype)
        faults.reached("assembly")
        index.commit()
    for stale in set(location.segments()) - {location.base.parent / s.name for s in sources}:
        stale.unlink(missing_ok=True)
    return location.base


def _rewritten(splits: dict[str, SplitRows], previous: FeatureStore | None, kept: dict[str, Placement]
               ) -> set[int] | None:
    """Which of ``previous``'s segments the update copies into its new segment (None: all of them, or no previous):
    those holding more dead rows than live ones; then, newest first, each whose live rows are at most twice what the
    new segment holds by then (so segments shrink geometrically from oldest to newest: their number grows with the
    log of the updates, and each vector is copied about that many times, never a big segment for a small append);
    then the smallest while more than ``MAX_SEGMENTS`` would remain; all when the mapping would break into more than
    ``MAX_RUNS`` runs. ``kept``: the placements with every row left where it is."""
    if previous is None:
        return None
    if sum(len(p.run_array()) for p in kept.values()) > MAX_RUNS:
        return None
    live = np.zeros(len(previous.sources), dtype=np.int64)  # rows each old segment keeps
    written = 0  # rows the new segment gets
    for split, rows in splits.items():
        old_rows = [source for _, source in rows.sources if isinstance(source, int)]
        written += len(rows.sources) - len(old_rows)
        if old_rows and split in previous.splits:
            live += np.bincount(previous.placement(split).sources[old_rows], minlength=len(live))
    stored = [sum(source.rows.values()) for source in previous.sources]
    alive = np.flatnonzero(live).tolist()  # oldest first: a new segment is numbered last
    rewrite = {n for n in alive if 2 * live[n] < stored[n]}
    written += sum(int(live[n]) for n in rewrite)
    rest = [n for n in alive if n not in rewrite]
    while written and rest and live[rest[-1]] <= 2 * written:  # the newest, while not much bigger than what is written
        written += int(live[rest[-1]])
        rewrite.add(rest.pop())
    excess = len(rest) + 1 - MAX_SEGMENTS if written or len(rest) > MAX_SEGMENTS else 0  # +1: the new segment
    return rewrite | set(sorted(rest, key=lambda n: (live[n], n))[:max(0, excess)])


def _layout(splits: dict[str, SplitRows], previous: FeatureStore | None, rewrite: set[int] | None
            ) -> tuple[dict[str, np.ndarray], list[Source], dict[str, Placement]]:
    """Where each row's vector will lie: rows kept where they are in ``previous``'s segments but those in ``rewrite``
    (None: every row goes to the new segment), as (rows for the new segment, the kept sources, placements with the new
    segment numbered last)."""
    old_sources = previous.sources if previous is not None else []
    placements, new_rows, used = {}, {}, set()
    for split, rows in splits.items():
        old = previous.placement(split) if previous is not None and rewrite is not None and split in previous.splits else None
        where = np.array([s if isinstance(s, int) and old is not None else -1 for _, s in rows.sources], dtype=np.int64)
        kept = where >= 0
        source = np.full(len(where), len(old_sources), dtype=np.int64)
        row = np.zeros(len(where), dtype=np.int64)
        if old is not None:
            source[kept], row[kept] = old.sources[where[kept]], old.rows[where[kept]]
            if rewrite:
                kept &= ~np.isin(source, list(rewrite))
                source[~kept] = len(old_sources)
        row[~kept] = np.arange(int((~kept).sum()))
        new_rows[split] = np.flatnonzero(~kept)
        placements[split] = Placement(source, row)
        used |= set(source[kept].tolist())
    renumber = np.zeros(len(old_sources) + 1, dtype=np.int64)
    renumber[sorted(used)] = np.arange(len(used))
    renumber[len(old_sources)] = len(used)
    for placement in placements.values():
        placement.sources = renumber[placement.sources]
    return new_rows, [old_sources[s] for s in sorted(used)], placements


def _write_vectors(dataset, split: str, sources: list[tuple[ImageKey, int | ChunkRow]], previous: FeatureStore | None,
                   partial: PartialRun) -> None:
    for start in range(0, len(sources), BLOCK_ROWS):
        block = sources[start:start + BLOCK_ROWS]
        dataset[start:start + len(block)] = _block_vectors(split, block, previous, partial)
        faults.reached("assembly")


def _block_vectors(split: str, block: list[tuple[ImageKey, int | ChunkRow]], previous: FeatureStore | None,
                   partial: PartialRun) -> np.ndarray:
    """The vectors of one block of rows, from the old file (read chunk by chunk, checksums verified) and from chunks."""
    old_vectors: dict[int, np.ndarray] = {}
    damaged: list[ImageKey] = []
    old_rows = sorted({s for _, s in block if isinstance(s, int)})
    for chunk, members in itertools.groupby(old_rows, key=lambda row: row // ROWS_PER_CHUNK):
        rows = list(members)
        try:
            vectors = previous.features(split, slice(rows[0], rows[-1] + 1))
        except UserError:
            damaged += [key for key, s in block if isinstance(s, int) and s // ROWS_PER_CHUNK == chunk]
            continue
        old_vectors |= {row: vectors[row - rows[0]] for row in rows}
    if damaged:
        raise DamagedRows(damaged)
    return np.stack([old_vectors[s] if isinstance(s, int) else partial.vector(s) for _, s in block])


def _throughput(images: int, seconds: float, previous: FeatureStore | None) -> float:
    """img/s of the backbone pass that made most of these vectors: this run's, or kept from the file it updates."""
    if images and seconds:
        return images / seconds
    return float(previous.attrs.get("throughput_img_s", 0.0)) if previous is not None else 0.0


def extract(settings: Settings, listing: DatasetListing | None = None) -> ExtractSummary:
    """Bring ``CACHE/<backbone>/features.h5`` up to date with ``DATA`` (``listing``: its scan, when already made); see
    the module docstring. Under torchrun each rank brings its own part file up to date and rank 0 joins the parts."""
    start = time.perf_counter()
    backbone = get_backbone(settings.backbone)
    rank = distributed.current()
    device = resolve_device(distributed.local_device(settings.device, rank))
    check_runtime(settings.runtime, device, settings.precision)
    if settings.weights is not None:
        check_weights(backbone, settings.weights)
    listing = listing if listing is not None else scan_dataset(settings.data)
    if not listing.splits["test"].paths:
        raise UserError(f"{settings.data}/test has no images in class folders; put test images in test/<class>/ "
                        f"(the report scores them)")
    if settings.augment > 0:
        listing.splits[AUGMENTED] = augmented_views(listing.splits["train"], settings.augment)
    folder = settings.backbone_dir()
    target = features_file(folder)
    if target.exists() and not target.is_file():
        raise UserError(f"{target} is not a regular file; remove it, then run `make features` again")
    check_writable(folder)
    record = (freshness.record_file(settings), freshness.run_key(settings, listing))  # keyed by the settings as given
    weights = weights_identity(backbone, settings.weights)  # a file's sha256: computed once
    settings, choice = fastpath.resolve(settings, backbone, device, listing, weights, stated_fingerprint(target),
                                        rank.distributed)
    expected = fingerprint(backbone, settings, weights)
    if not rank.distributed:
        summary = _update(settings, listing, backbone, expected, FeatureFiles(target), device, record)
    else:
        distributed.start(device)
        try:
            part = FeatureFiles(distributed.part_file(folder, rank), versioned=True)
            summary = _update(settings, distributed.shard(listing, rank), backbone, expected, part, device)
            summary.seconds = time.perf_counter() - start
            log.info(f"rank {rank.rank}/{rank.world}: {summary.line()}")
            gathered = distributed.gather((summary.extracted, summary.path.name))
            if rank.rank == 0:
                joined = distributed.join(target, [folder / name for _, name in gathered], listing.classes, settings.merge)
                summary = ExtractSummary(target, extracted=sum(n for n, _ in gathered), up_to_date=not joined)
                with FeatureStore(target) as store:
                    summary.describe(store)
            distributed.barrier()
        finally:
            distributed.stop()
    summary.seconds = time.perf_counter() - start
    summary.ran_as = choice.line() if choice is not None else f"PRECISION={settings.precision} RUNTIME={settings.runtime}"
    return summary


def _update(settings: Settings, listing: DatasetListing, backbone: Backbone, expected: dict, location: FeatureFiles,
            device: torch.device, record: tuple[Path, freshness.RunKey] | None = None) -> ExtractSummary:
    """Bring one feature file (``features.h5``, or a rank's part) up to date; ``record``: where its freshness record
    goes, and the run's key (see ``pipeline.freshness``)."""
    start = time.perf_counter()
    base = location.base
    lock = base.with_suffix(".lock")
    try:
        with (FileLock(lock, timeout=0), disk_full_as_user_error(base.parent, "features", " (finished chunks are kept)"),
              contextlib.ExitStack() as opened):
            if record is not None:
                freshness.forget(record[0])
            location.remove_leftovers()
            summary = ExtractSummary(location.current() or base)
            previous = _previous(location.current(), expected, settings.force)
            if previous is not None:
                opened.callback(previous.close)  # also when the update fails (closing twice is harmless)
            partial = PartialRun(base.with_suffix(".partial"), expected)
            plan = _plan(listing, previous, partial.done)
            if previous is not None and settings.verify:
                _verify(listing, previous, plan)
            summary.removed, summary.resumed = plan.removed, plan.resumed
            summary.reused = len(plan.old_rows) + len(plan.old_skips)
            if previous is not None and not (plan.todo or plan.removed or plan.resumed or plan.listing_changed):
                summary.up_to_date = True
                summary.describe(previous)
                if record is not None:
                    freshness.remember(*record, summary, previous.files())
                previous.close()
                partial.remove()
                return summary
            if previous is not None and previous.attrs.get("data_root") != str(listing.root.resolve()):
                log.warning(f"features: DATA is now {listing.root.resolve()} (was {previous.attrs.get('data_root')}); "
                      f"unchanged images keep their vectors")
            forward, seconds, extracted = None, {"images": 0.0, "views": 0.0}, {"images": 0, "views": 0}
            while True:
                if plan.todo and forward is None:
                    forward = prepare(backbone, functools.partial(load_backbone, backbone, settings.weights), device,
                                      settings.precision, settings.runtime,
                                      kept_model(base.parent, backbone, expected["weights"]))
                for name, keys in (("images", [k for k in plan.todo if k.view == NO_VIEW]),
                                   ("views", [k for k in plan.todo if k.view != NO_VIEW])):
                    started = time.perf_counter()
                    if keys:
                        summary.backbone_seconds += _run_backbone(settings, backbone, listing.root, keys, partial,
                                                                  forward, device)
                    seconds[name] += time.perf_counter() - started
                    extracted[name] += len(keys)
                summary.extracted += len(plan.todo)
                plan.todo = []
                attrs = {
                    **{k: v for k, v in expected.items() if k != "versions"},
                    "feature_dim": backbone.feature_dim,
                    "classes": listing.classes,
                    "versions": json.dumps(expected["versions"]),
                    "fingerprint": json.dumps(expected, sort_keys=True),
                    "data_root": str(listing.root.resolve()),
                    "created": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
                    "images_extracted": extracted["images"],
                    "extraction_seconds": time.perf_counter() - start - seconds["views"],
                    "throughput_img_s": _throughput(extracted["images"], seconds["images"], previous),
                    "views_extracted": extracted["views"],
                    "augment_seconds": seconds["views"],
                }
                try:
                    target = _assemble(location, attrs, listing, plan, previous, partial, backbone.feature_dim,
                                       STORAGE_DTYPES[settings.storage])
                    break
                except DamagedRows as damaged:
                    log.warning(f"features: {damaged}; extracting them again")
                    plan.redo(damaged.keys)
            summary.path, summary.repaired = target, plan.repaired
            summary.reused = len(plan.old_rows) + len(plan.old_skips)
            if previous is not None:
                previous.close()
            partial.remove()
            with FeatureStore(target) as written:
                summary.describe(written)
                if record is not None:
                    freshness.remember(*record, summary, written.files())
    except Timeout:
        raise UserError(f"another `features` run is writing {base} (lock {lock}); wait for it to finish") from None
    return summary
