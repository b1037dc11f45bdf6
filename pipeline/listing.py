"""The dataset as a listing: every file under ``DATA/<split>/<class>/`` becomes an ``ImageEntry`` or a
``Skipped`` record with its reason; nothing is dropped silently. A stat per file, no decoding, no torch import
(an unchanged dataset is judged from this listing alone).
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from functools import cached_property
from pathlib import Path
from dataclasses import dataclass
from typing import NamedTuple

from pipeline.bulk import per_image
from pipeline.errors import UserError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision ImageFolder's (a test keeps them equal)
SPLITS = ("train", "test")
AUGMENTED = "train_aug"  # the pseudo-split of augmented views of train images
NO_VIEW = -1  # an entry that is the image itself, not one of its augmented views
DIGEST_BYTES = 16  # the blake2b digest of each image file's bytes, kept beside its vector


def shown(path: str) -> str:
    """A path as one line of text anyone can print: bytes that are not UTF-8 appear as \\xNN escapes, control
    characters (a newline in a file name) as their escapes."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class ImageEntry(NamedTuple):
    """One image file (or its augmented view ``view``): path relative to the dataset root, class index, file stamp."""

    path: str
    label: int
    size: int
    mtime_ns: int
    view: int = NO_VIEW


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


@dataclass
class SplitListing:
    entries: list[ImageEntry]
    skipped: list[Skipped]


def digest(parts: Iterable) -> str:
    """blake2b over NUL-separated fields (no path holds a NUL); odd bytes in names hash as the bytes they are."""
    return hashlib.blake2b("\0".join(map(str, parts)).encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


@dataclass
class DatasetListing:
    root: Path
    classes: list[str]
    splits: dict[str, SplitListing]

    @cached_property
    def digest(self) -> str:
        """A digest of what was listed in train and test: root, classes, each file's path, class, size and mtime, each
        skipped file and its reason (made once per listing: the no-op check and the writer's record share it)."""
        fields = [self.root.resolve(), len(self.classes), *self.classes]
        for split in SPLITS:
            part = self.splits[split]
            fields += [split, len(part.entries), len(part.skipped)]
            fields += [f"{e.path}\0{e.label}\0{e.size}\0{e.mtime_ns}" for e in part.entries]  # one string per file
            fields += [f"{s.path}\0{s.reason}" for s in part.skipped]
        return digest(fields)


class BadImage(Exception):
    """A file that cannot be used as an image; the message is the skip reason."""


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


_KINDS = {stat.S_IFDIR: "folder", stat.S_IFIFO: "FIFO", stat.S_IFSOCK: "socket", stat.S_IFCHR: "character device",
          stat.S_IFBLK: "block device"}


def not_regular_reason(mode: int) -> str | None:
    """The skip reason for anything but a regular file (reading a FIFO or a device can block forever), or None."""
    if stat.S_ISREG(mode):
        return None
    return f"not a regular file ({_KINDS.get(stat.S_IFMT(mode), 'unknown kind')})"


def error_reason(path: str | os.PathLike, error: OSError) -> str:
    """An ``OSError`` on one path as a skip reason: broken and looping symbolic links by name, the rest by message."""
    if error.errno == errno.ELOOP:
        return "symbolic link loop"
    if error.errno == errno.ENOENT and os.path.islink(path):
        return "broken symbolic link"
    return error.strerror or str(error)


def _judge(name: str, path: str | os.PathLike, stat_of: Callable[[], os.stat_result]) -> os.stat_result:
    """``image_stat``'s rule for the file ``name`` at ``path``, stat taken by ``stat_of()`` (``DirEntry.stat`` saves a syscall)."""
    if _is_hidden(name):
        raise BadImage("hidden file")
    if not name.lower().endswith(IMG_EXTENSIONS):
        raise BadImage(f"not an image file extension ({', '.join(IMG_EXTENSIONS)})")
    try:
        info = stat_of()
    except OSError as error:
        raise BadImage(error_reason(path, error)) from None
    reason = not_regular_reason(info.st_mode)
    if reason:
        raise BadImage(reason)
    return info


def image_stat(path: str | os.PathLike) -> os.stat_result:
    """The stat of a file to read as an image, or ``BadImage`` with the reason it is not one.

    The one rule for dataset scans and ``predict``, in order: a hidden name, an extension not in
    ``IMG_EXTENSIONS``, a broken or looping symbolic link or any other error, then anything but a regular file
    (FIFO, socket, device)."""
    return _judge(os.path.basename(path), path, lambda: os.stat(path))


def _is_folder(entry: os.DirEntry) -> bool:
    """Whether ``entry`` is a folder or a symbolic link to one (no syscall unless it is a link)."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def walk_folder(folder: str | os.PathLike) -> Iterator[tuple[str, os.stat_result] | Skipped]:
    """Every file under ``folder``, depth first in name order: ``(path, stat)`` for an image, else a ``Skipped``.

    Paths are relative to ``folder``; a skipped folder's ends in "/" ("" is ``folder`` itself). Files are judged by
    ``image_stat``. Hidden folders are not entered, and each real folder (by device and inode, ``folder`` included)
    is entered once: a symbolic link to an enclosing folder (a loop) or to a folder already walked is skipped."""
    visited: set[tuple[int, int]] = set()
    stack: list[tuple[str, frozenset[tuple[int, int]], Iterator[os.DirEntry]]] = []

    def enter(path: str, rel: str, ancestors: frozenset[tuple[int, int]]) -> Skipped | None:
        try:
            info = os.stat(path)
            key = (info.st_dev, info.st_ino)
            if key in ancestors:
                return Skipped(rel, "symbolic link to a folder already scanned (loop)")
            if key in visited:
                return Skipped(rel, "folder already scanned through another path (symbolic link)")
            entries = sorted(os.scandir(path), key=lambda entry: entry.name)
        except OSError as error:
            return Skipped(rel, error_reason(path, error))
        visited.add(key)
        stack.append((rel, ancestors | {key}, iter(entries)))
        return None

    skipped = enter(os.fspath(folder), "", frozenset())
    if skipped:
        yield skipped
    while stack:
        rel, ancestors, entries = stack[-1]
        entry = next(entries, None)
        if entry is None:
            stack.pop()
            continue
        path = rel + entry.name
        if not _is_folder(entry):
            try:
                info = _judge(entry.name, entry.path, entry.stat)
            except BadImage as bad:
                yield Skipped(path, str(bad))
            else:
                yield path, info
        elif _is_hidden(entry.name):
            yield Skipped(path + "/", "hidden folder")
        elif skipped := enter(entry.path, path + "/", ancestors):
            yield skipped


def _class_folders(split_dir: Path) -> tuple[list[str], list[Skipped]]:
    classes, skipped = [], []
    try:
        entries = sorted(os.scandir(split_dir), key=lambda e: e.name)
    except OSError as error:
        raise UserError(f"cannot read {split_dir} ({error.strerror}); make it readable") from None
    for entry in entries:
        rel = f"{split_dir.name}/{entry.name}"
        try:
            is_folder = stat.S_ISDIR(os.stat(entry.path).st_mode)
        except OSError as error:
            skipped.append(Skipped(rel, error_reason(entry.path, error)))
            continue
        if not is_folder:
            skipped.append(Skipped(rel, "file outside any class folder"))
        elif _is_hidden(entry.name):
            skipped.append(Skipped(rel + "/", "hidden folder, not a class"))
        elif not entry.name.isprintable() or not _is_utf8(entry.name):
            raise UserError(f"class folder {os.fsencode(split_dir / entry.name)!r} is not a printable UTF-8 name; rename it "
                            f"(class names appear in heads, reports and predictions)")
        else:
            classes.append(entry.name)
    return classes, skipped


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _scan_class(root: Path, split: str, name: str, label: int) -> tuple[list[ImageEntry], list[Skipped]]:
    entries, skipped = [], []
    class_dir = root / split / name
    prefix = f"{split}/{name}/"
    for found in walk_folder(class_dir):
        if isinstance(found, Skipped):
            skipped.append(Skipped(prefix + found.path, found.reason))
        else:
            path, info = found
            entries.append(ImageEntry(prefix + path, label, info.st_size, info.st_mtime_ns))
    if not entries:
        raise UserError(f"class folder {class_dir} has no images; add images to it or remove the folder")
    return entries, skipped


@per_image
def scan_dataset(root: Path) -> DatasetListing:
    """List ``root/{train,test}/<class>/*`` in sorted order; classes come from train."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(
            f"data folder '{root}' not found; pass DATA=/path/to/dataset (or --data) holding train/<class>/* and test/<class>/*"
        )
    for split in SPLITS:
        if not (root / split).is_dir():
            raise UserError(f"'{root}' has no {split}/ folder; expected {root}/train/<class>/* and {root}/test/<class>/*")
    classes, train_skipped = _class_folders(root / "train")
    if len(classes) < 2:
        found = f"only '{classes[0]}'" if classes else "no class folders"
        raise UserError(f"{root}/train has {found}; a classifier needs at least two class folders (train/<class>/*)")
    test_classes, test_skipped = _class_folders(root / "test")
    for name in test_classes:
        if name not in classes:
            raise UserError(
                f"test class '{name}' has no folder in {root}/train; every test class must also be a train class"
            )
    splits = {}
    for split, names, skipped in (("train", classes, train_skipped), ("test", test_classes, test_skipped)):
        entries: list[ImageEntry] = []
        for name in names:
            class_entries, class_skipped = _scan_class(root, split, name, classes.index(name))
            entries += class_entries
            skipped += class_skipped
        splits[split] = SplitListing(entries, skipped)
    return DatasetListing(root, classes, splits)




def augmented_views(listing: SplitListing, views: int) -> SplitListing:
    """``views`` augmented views of every train image, each an entry of its own (same path, view 0..views-1)."""
    return SplitListing([e._replace(view=k) for e in listing.entries for k in range(views)], [])

