"""The dataset as a listing: every file under ``DATA/<split>/<class>/`` becomes an ``ImageEntry`` or a
``Skipped`` record with its reason; nothing is dropped silently. A stat per file, no decoding, no torch import
(an unchanged dataset is judged from this listing alone).
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
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
    """A split's image files as columns, one value per file (a scan appends to them: no object per file unless
    ``entries`` is asked for), and its skipped files."""

    paths: list[str]
    labels: list[int]
    sizes: list[int]
    mtimes_ns: list[int]
    views: list[int]
    skipped: list[Skipped]

    @classmethod
    def of(cls, entries: list[ImageEntry], skipped: list[Skipped]) -> SplitListing:
        """The listing of ``entries`` (rows) and ``skipped``."""
        columns = [list(column) for column in zip(*entries)] or [[] for _ in ImageEntry._fields]
        return cls(*columns, skipped)

    @property
    def entries(self) -> list[ImageEntry]:
        """The files as rows, made anew from the columns on each access."""
        return list(map(ImageEntry, self.paths, self.labels, self.sizes, self.mtimes_ns, self.views))

    def rows(self, start: int, stop: int, skipped: list[Skipped]) -> SplitListing:
        """Files ``start:stop`` (a slice of each column) with ``skipped``."""
        return SplitListing(self.paths[start:stop], self.labels[start:stop], self.sizes[start:stop],
                            self.mtimes_ns[start:stop], self.views[start:stop], skipped)


def _hashed(parts: Iterable) -> hashlib.blake2b:
    """blake2b over NUL-separated fields (no path holds a NUL); odd bytes in names hash as the bytes they are."""
    return hashlib.blake2b("\0".join(map(str, parts)).encode("utf-8", "surrogatepass"), digest_size=16)


def digest(parts: Iterable) -> str:
    """The hex digest of ``parts`` as NUL-separated text (see ``_hashed``)."""
    return _hashed(parts).hexdigest()


@dataclass
class DatasetListing:
    root: Path
    classes: list[str]
    splits: dict[str, SplitListing]

    @cached_property
    def digest(self) -> str:
        """A digest of what was listed in train and test: root, classes, each file's path, class, size and mtime, each
        skipped file and its reason (made once per listing: the no-op check and the writer's record share it): the
        text fields, then the numbers as int64 columns."""
        text = [self.root.resolve(), len(self.classes), *self.classes]
        for split in SPLITS:
            part = self.splits[split]
            text += [split, len(part.paths), len(part.skipped), *part.paths]
            text += [f"{s.path}\0{s.reason}" for s in part.skipped]
        hashed = _hashed(text)
        for split in SPLITS:
            for column in (self.splits[split].labels, self.splits[split].sizes, self.splits[split].mtimes_ns):
                hashed.update(array("q", column).tobytes())
        return hashed.hexdigest()


class BadImage(Exception):
    """A file that cannot be used as an image; the message is the skip reason."""


_KINDS = {stat.S_IFDIR: "folder", stat.S_IFIFO: "FIFO", stat.S_IFSOCK: "socket", stat.S_IFCHR: "character device",
          stat.S_IFBLK: "block device"}


def not_regular_reason(mode: int) -> str | None:
    """The skip reason for anything but a regular file (reading a FIFO or a device can block forever), or None."""
    if stat.S_ISREG(mode):
        return None
    return f"not a regular file ({_KINDS.get(stat.S_IFMT(mode), 'unknown kind')})"


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def error_reason(path: str | os.PathLike, error: OSError, dir_fd: int | None = None) -> str:
    """An ``OSError`` on one path (relative to folder ``dir_fd`` when given) as a skip reason: broken and looping
    symbolic links by name, the rest by message."""
    if error.errno == errno.ELOOP:
        return "symbolic link loop"
    if error.errno == errno.ENOENT and _is_link(path, dir_fd):
        return "broken symbolic link"
    return error.strerror or str(error)


def _is_link(path: str | os.PathLike, dir_fd: int | None) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(path, dir_fd=dir_fd).st_mode)
    except OSError:
        return False


def _judge(name: str, path: str, stat_of: Callable[[], os.stat_result], dir_fd: int | None = None) -> os.stat_result:
    """``image_stat``'s rule for the file ``name`` at ``path`` (relative to folder ``dir_fd`` when given), its stat
    taken by ``stat_of()`` (``DirEntry.stat`` saves a syscall)."""
    if _is_hidden(name):
        raise BadImage("hidden file")
    if not name.lower().endswith(IMG_EXTENSIONS):
        raise BadImage(f"not an image file extension ({', '.join(IMG_EXTENSIONS)})")
    try:
        info = stat_of()
    except OSError as error:
        raise BadImage(error_reason(path, error, dir_fd)) from None
    reason = not_regular_reason(info.st_mode)
    if reason:
        raise BadImage(reason)
    return info


def image_stat(path: str | os.PathLike) -> os.stat_result:
    """The stat of a file to read as an image, or ``BadImage`` with the reason it is not one.

    The one rule for dataset scans and ``predict``, in order: a hidden name, an extension not in
    ``IMG_EXTENSIONS``, a broken or looping symbolic link or any other error, then anything but a regular file
    (FIFO, socket, device)."""
    return _judge(os.path.basename(path), os.fspath(path), lambda: os.stat(path))


def _is_folder(entry: os.DirEntry) -> bool:
    """Whether ``entry`` is a folder or a symbolic link to one (no syscall unless it is a link)."""
    try:
        return entry.is_dir()
    except OSError:
        return False


DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def walk_folder(folder: str | os.PathLike, prefix: str = "") -> Iterator[tuple[str, os.stat_result] | Skipped]:
    """Every file under ``folder``, depth first in name order: ``(path, stat)`` for an image, else a ``Skipped``.

    Paths are ``prefix`` + the path relative to ``folder``; a skipped folder's ends in "/" (``prefix`` alone is
    ``folder`` itself). Files are judged by ``image_stat``. Hidden folders are not entered, and each real folder (by
    device and inode, ``folder`` included) is entered once: a symbolic link to an enclosing folder (a loop) or to a
    folder already walked is skipped. Each folder is held open while it is walked and its files are stat'ed relative
    to it (no path lookup per file)."""
    visited: set[tuple[int, int]] = set()
    stack: list[tuple[str, int, frozenset[tuple[int, int]], Iterator[os.DirEntry]]] = []

    def enter(name: str | os.PathLike, rel: str, parent: int | None, ancestors: frozenset[tuple[int, int]]) -> Skipped | None:
        try:
            fd = os.open(name, DIRECTORY_FLAGS, dir_fd=parent)
        except OSError as error:
            return Skipped(rel, error_reason(name, error, parent))
        try:
            info = os.fstat(fd)
            key = (info.st_dev, info.st_ino)
            if key in ancestors:
                reason = "symbolic link to a folder already scanned (loop)"
            elif key in visited:
                reason = "folder already scanned through another path (symbolic link)"
            else:
                entries = sorted(os.scandir(fd), key=lambda entry: entry.name)
                visited.add(key)
                stack.append((rel, fd, ancestors | {key}, iter(entries)))  # closed when the walk leaves it
                return None
        except OSError as error:
            reason = error_reason(name, error, parent)
        except BaseException:  # an interrupt while the folder is read: nothing holds its descriptor yet
            os.close(fd)
            raise
        os.close(fd)
        return Skipped(rel, reason)

    try:
        skipped = enter(folder, prefix, None, frozenset())
        if skipped:
            yield skipped
        while stack:
            rel, fd, ancestors, entries = stack[-1]
            for entry in entries:
                name = entry.name
                if not _is_folder(entry):
                    try:
                        info = _judge(name, name, entry.stat, fd)
                    except BadImage as bad:
                        yield Skipped(rel + name, str(bad))
                    else:
                        yield rel + name, info
                elif _is_hidden(name):
                    yield Skipped(rel + name + "/", "hidden folder")
                elif skipped := enter(name, rel + name + "/", fd, ancestors):
                    yield skipped
                else:
                    break  # walk the folder just entered first
            else:
                os.close(stack.pop()[1])
    finally:
        for _, fd, _, _ in stack:
            os.close(fd)


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


def _scan_class(root: Path, split: str, name: str, label: int, into: SplitListing) -> None:
    """Append the files under class folder ``root/split/name`` to ``into``."""
    class_dir = root / split / name
    first = len(into.paths)
    for found in walk_folder(class_dir, f"{split}/{name}/"):
        if isinstance(found, Skipped):
            into.skipped.append(found)
        else:
            path, info = found
            into.paths.append(path)
            into.sizes.append(info.st_size)
            into.mtimes_ns.append(info.st_mtime_ns)
    if len(into.paths) == first:
        raise UserError(f"class folder {class_dir} has no images; add images to it or remove the folder")
    into.labels += [label] * (len(into.paths) - first)
    into.views += [NO_VIEW] * (len(into.paths) - first)


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
        splits[split] = SplitListing([], [], [], [], [], skipped)
        for name in names:
            _scan_class(root, split, name, classes.index(name), splits[split])
    return DatasetListing(root, classes, splits)


def augmented_views(listing: SplitListing, views: int) -> SplitListing:
    """``views`` augmented views of every train image, each an entry of its own (same path, view 0..views-1)."""
    return SplitListing.of([e._replace(view=k) for e in listing.entries for k in range(views)], [])

