"""Writing files safely: every file the pipeline writes goes to a temporary name, is fsynced, then renamed.

A reader therefore sees the old file or the new one, never half of either; a crash or a full disk leaves
the old file in place and no temporary behind.
"""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from pipeline import faults
from pipeline.errors import UserError


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[BinaryIO], object], point: str = "file") -> Path:
    """Call ``write(file)`` on ``<path>.tmp``, fsync it and rename it to ``path``; on any error remove the temporary.

    ``point`` names the fault-injection points ``<point>-before-rename`` and ``<point>-after-rename``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        faults.reached(f"{point}-before-rename")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    faults.reached(f"{point}-after-rename")
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


@contextmanager
def disk_full_as_user_error(folder: Path, command: str, after: str = "") -> Iterator[None]:
    """A full disk (or quota) while writing into ``folder`` becomes a one-line UserError naming ``make <command>``."""
    try:
        yield
    except OSError as error:
        if error.errno not in DISK_FULL:
            raise
        raise UserError(f"disk full while writing {folder}; free space and run `make {command}` again{after}") from None


def check_writable(folder: Path, setting: str = "CACHE") -> None:
    """Refuse, before any work, a folder that cannot be created or written to."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise UserError(f"cannot write to folder {folder} ({error.strerror}); pass {setting}=/a/writable/folder") from None
