"""Stage one's front door: whether ``features`` has anything to do, judged from a stat per file, without torch.

Every run that brings ``features.h5`` up to date ends, still holding the writer's lock, by writing a record beside
it (``features.fresh.json``); every run that may change the file removes the record first, so a killed run leaves
none. The record holds a digest of what the run was given (the stage-one settings, the weights file's stamp, the
stamp of each site-packages folder, which any install, upgrade or removal of a package changes, and a hash of the
pipeline's own source), a digest of the dataset listing (each file's path, class, size and mtime; each skipped
file's reason), the stamps (size, mtime, inode) of the feature files it wrote, and its summary. A later run whose
digests and stamps all match has nothing to do, and its answer is the record's summary; anything else (no record,
an unreadable one, any difference, ``--force``, ``--verify``, torchrun) goes through ``extract``, which is always
correct, only slower to start.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.bulk import collector_paused
from pipeline.config import Settings
from pipeline.files import atomic_write_text
from pipeline.listing import DatasetListing, Skipped, digest, scan_dataset, shown

RECORD_NAME = "features.fresh.json"
RECORDED_SETTINGS = ("backbone", "device", "precision", "runtime", "storage", "augment")  # the rest cannot change a vector
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
SKIPS_LISTED = 50  # skipped files listed under the summary line; all of them are in the file and the report


def seconds_text(seconds: float) -> str:
    """Seconds as the summary line shows them: two decimals below one second (a no-op's), else one."""
    return f"{seconds:.2f}" if seconds < 1 else f"{seconds:.1f}"


@dataclass(frozen=True)
class Duplicates:
    """Byte-identical image files in the store: test images identical to a train image, groups of identical train
    files filed under different classes, and example lines naming both files."""

    test_in_train: int = 0
    across_classes: int = 0
    examples: tuple[str, ...] = ()

    def lines(self) -> list[str]:
        found = []
        if self.test_in_train:
            found.append(f"{self.test_in_train} test images are byte-identical to train images: the test accuracy "
                         f"counts them as unseen")
        if self.across_classes:
            found.append(f"{self.across_classes} train images appear, byte-identical, in two or more classes")
        if not found:
            return []
        return [f"  warning: {'; '.join(found)} (e.g. {', '.join(shown(e) for e in self.examples)})"]


@dataclass
class ExtractSummary:
    path: Path
    images: dict[str, int] = field(default_factory=dict)
    reused: int = 0
    resumed: int = 0
    extracted: int = 0
    removed: int = 0
    repaired: int = 0  # stored vectors redone because their image changed in place or their checksum failed
    skipped: list[Skipped] = field(default_factory=list)
    seconds: float = 0.0
    backbone_seconds: float = 0.0  # inside the forward (device copies included); the rest is decoding and writing
    import_seconds: float = 0.0  # of ``seconds``, importing torch and the rest of stage one's libraries
    up_to_date: bool = False
    size_bytes: int = 0  # the file and the segments or parts it reads
    duplicates: Duplicates = Duplicates()
    ran_as: str = ""  # how the backbone ran when vectors were extracted: precision, runtime (and for auto, why)

    def describe(self, store) -> None:
        """Fill in the vector counts, skipped files and duplicates from a ``FeatureStore``."""
        self.images = {s: len(store.paths(s)) for s in store.splits}
        self.skipped = [Skipped(record.path, record.reason) for _, record in store.skipped_files()]
        self.size_bytes = store.size_bytes()
        test_in_train, across_classes, examples = store.identical_files()
        self.duplicates = Duplicates(test_in_train, across_classes, tuple(examples))

    def line(self) -> str:
        size = self.size_bytes / 1e6
        split_counts = ", ".join(f"{n} {s}" for s, n in self.images.items())
        rate = f", {self.extracted / self.seconds:.1f} img/s" if self.extracted and self.seconds else ""
        if rate and self.backbone_seconds:
            rate += f", backbone busy {self.backbone_seconds / self.seconds:.0%} of it"
        started = f", {seconds_text(self.import_seconds)} s of it importing torch" if self.import_seconds >= 0.05 else ""
        state = "up to date" if self.up_to_date else f"extracted {self.extracted}"
        repaired = f", repaired {self.repaired}" if self.repaired else ""
        skipped = [f"  skipped {shown(record.path)}: {record.reason}" for record in self.skipped[:SKIPS_LISTED]]
        if len(self.skipped) > SKIPS_LISTED:
            skipped.append(f"  ... and {len(self.skipped) - SKIPS_LISTED} more, all listed in report.md and {self.path.name}")
        return "\n".join([
            f"features: {state} | {sum(self.images.values())} vectors ({split_counts}) in {self.path} ({size:.1f} MB) | "
            f"reused {self.reused}, resumed {self.resumed}, removed {self.removed}{repaired}, skipped {len(self.skipped)} | "
            f"{seconds_text(self.seconds)} s{rate}{started}" + (f" | {self.ran_as}" if self.extracted and self.ran_as else ""),
            *skipped,
            *self.duplicates.lines(),
        ])


@dataclass(frozen=True)
class FileStamp:
    """What changes when a file is replaced or written: a feature file's name (beside the record), size, mtime, inode."""

    name: str
    size: int
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, path: Path) -> FileStamp:
        st = path.stat()
        return cls(path.name, st.st_size, st.st_mtime_ns, st.st_ino)


@dataclass(frozen=True)
class RunKey:
    """Digests of what a stage-one run was given: its inputs (settings, weights, libraries, code) and its listing."""

    inputs: str
    listing: str


@dataclass(frozen=True)
class FreshRecord:
    """``features.fresh.json``: the run it describes, the files it left, and its summary."""

    key: RunKey
    files: list[FileStamp]
    path: str
    images: dict[str, int]
    reused: int
    skipped: list[Skipped]
    size_bytes: int
    duplicates: Duplicates

    @classmethod
    def parse(cls, text: str) -> FreshRecord:
        raw = json.loads(text)
        duplicates = raw["duplicates"]
        return cls(RunKey(**raw["key"]), [FileStamp(**f) for f in raw["files"]], raw["path"], dict(raw["images"]),
                   int(raw["reused"]), [Skipped(**s) for s in raw["skipped"]], int(raw["size_bytes"]),
                   Duplicates(duplicates["test_in_train"], duplicates["across_classes"], tuple(duplicates["examples"])))


def _stamp(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns, st.st_ino


def _inputs(settings: Settings) -> list:
    code = sorted(Path(__file__).parent.glob("*.py"))
    libraries = sorted(p for p in map(Path, sys.path) if p.name in ("site-packages", "dist-packages") and p.is_dir())
    weights = settings.weights
    return [
        sys.version, *(getattr(settings, name) for name in RECORDED_SETTINGS),
        weights.resolve() if weights is not None else None, _stamp(weights) if weights is not None else None,
        *((p, p.stat().st_mtime_ns) for p in libraries),
        *((p.name, hashlib.sha256(p.read_bytes()).hexdigest()) for p in code),
    ]


def run_key(settings: Settings, listing: DatasetListing) -> RunKey:
    return RunKey(digest(_inputs(settings)), listing.digest)


def record_file(settings: Settings) -> Path:
    return settings.backbone_dir() / RECORD_NAME


def forget(record: Path) -> None:
    """Before a run may change the feature file (call with the writer's lock held)."""
    record.unlink(missing_ok=True)


def remember(record: Path, key: RunKey, summary: ExtractSummary, files: list[Path]) -> None:
    """After a run left the feature file complete (call with the writer's lock held, ``files`` the file and its sources)."""
    fresh = FreshRecord(key, [FileStamp.of(f) for f in files], summary.path.name, summary.images,
                        summary.reused + summary.extracted + summary.resumed, summary.skipped, summary.size_bytes,
                        summary.duplicates)
    atomic_write_text(record, json.dumps(asdict(fresh)))


def fresh_summary(settings: Settings, listing: DatasetListing) -> ExtractSummary | None:
    """The summary of an up-to-date feature file, or None when ``extract`` has to look (see the module docstring)."""
    if settings.force or settings.verify or any(v in os.environ for v in TORCHRUN_VARIABLES):
        return None
    folder = settings.backbone_dir()
    try:
        fresh = FreshRecord.parse((folder / RECORD_NAME).read_text(encoding="utf-8"))
        if fresh.key != run_key(settings, listing) or any(FileStamp.of(folder / f.name) != f for f in fresh.files):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return ExtractSummary(folder / fresh.path, fresh.images, reused=fresh.reused, skipped=fresh.skipped,
                          up_to_date=True, size_bytes=fresh.size_bytes, duplicates=fresh.duplicates)


def bring_up_to_date(settings: Settings) -> ExtractSummary:
    """Stage one: the record's summary when nothing changed; otherwise ``extract``, which loads torch and the backbone."""
    start = time.perf_counter()
    listing = scan_dataset(settings.data)
    summary = fresh_summary(settings, listing)
    if summary is None:
        importing = time.perf_counter()
        with collector_paused():
            from pipeline.extract import extract  # torch loads only when there may be work
        imported = time.perf_counter() - importing
        summary = extract(settings, listing)
        summary.import_seconds = imported
    summary.seconds = time.perf_counter() - start
    return summary
