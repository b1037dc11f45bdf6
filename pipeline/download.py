"""``make data``: the seed notebook's Cats-vs-Dogs data set, downloaded (resumed after an interruption), checked and
unpacked into the ImageFolder layout ``DATA/{train,test}/<class>/*``.

torchvision's ``download_url`` writes straight to the final name and cannot resume, so the download itself is a
ranged HTTP GET into ``<archive>.part``, renamed when complete; checking and unpacking are torchvision's and
``zipfile``'s.
"""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

from torchvision.datasets.utils import USER_AGENT, extract_archive

from pipeline.errors import UserError
from pipeline.files import fsync_dir
from pipeline.progress import progress

SEED_DATA_URL = "https://s3.amazonaws.com/content.udacity-data.com/nd089/Cat_Dog_data.zip"
JUNK = ("__MACOSX", ".DS_Store")  # macOS archive debris in the seed's zip
BLOCK_BYTES = 1 << 20


def has_layout(root: Path) -> bool:
    return (root / "train").is_dir() and (root / "test").is_dir()


def fetch_dataset(root: Path | str, url: str = SEED_DATA_URL, timeout: float = 30.0) -> bool:
    """Download the zip at ``url`` and unpack it into ``root`` unless ``root`` already holds train/ and test/; return
    whether it did. The zip holds ``train/`` and ``test/``, at its top or under one folder."""
    root = Path(root)
    if has_layout(root):
        return False
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise UserError(f"'{root}' exists but holds no train/ and test/ folders; move it away or pass DATA=/path/to/dataset")
    archive = root.with_name(root.name + ".zip")
    if not archive.is_file():
        _download(url, archive, root, timeout)
    _unpack(archive, root)
    archive.unlink()
    return True


def _download(url: str, archive: Path, root: Path, timeout: float) -> None:
    part = archive.with_name(archive.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": USER_AGENT, **({"Range": f"bytes={have}-"} if have else {})}
    manual = (f"rerun `make data` to resume, or download it by hand and unzip it so that {root}/train/<class>/ and "
              f"{root}/test/<class>/ exist")
    try:
        with urlopen(Request(url, headers=headers), timeout=timeout) as response:
            if response.status != 206:
                have = 0  # no range asked, or the server ignored it: from the start
            total = have + response.length if response.length is not None else None
            with open(part, "ab" if have else "wb") as out, \
                    progress(total=total, initial=have, unit="B", unit_scale=True, desc=f"download {archive.name}") as bar:
                while block := response.read(BLOCK_BYTES):
                    out.write(block)
                    bar.update(len(block))
                out.flush()
                os.fsync(out.fileno())
    except HTTPError as error:
        if error.code != 416:  # 416: nothing left after the bytes we have
            raise UserError(f"cannot download {url} (HTTP {error.code} {error.reason}); {manual}") from None
    except (URLError, OSError) as error:
        reason = getattr(error, "reason", None) or error
        raise UserError(f"cannot download {url} ({reason}); {manual}") from None
    if total is not None and part.stat().st_size != total:
        raise UserError(f"the download of {url} stopped at {part.stat().st_size} of {total} bytes; {manual}")
    os.replace(part, archive)
    fsync_dir(archive.parent)


def _unpack(archive: Path, root: Path) -> None:
    """Check every member's CRC, unpack beside ``root``, drop macOS debris, rename the dataset folder to ``root``."""
    try:
        with zipfile.ZipFile(archive) as z:
            damaged = z.testzip()
    except zipfile.BadZipFile:
        damaged = "the archive itself"
    if damaged is not None:
        archive.unlink()
        raise UserError(f"{archive}: {damaged} is damaged (deleted it); run `make data` again to download it anew")
    staging = root.with_name(f".{root.name}.unpacking")
    shutil.rmtree(staging, ignore_errors=True)
    extract_archive(archive, staging)
    for junk in [p for p in staging.rglob("*") if p.name in JUNK]:
        if junk.is_dir():
            shutil.rmtree(junk, ignore_errors=True)
        else:
            junk.unlink(missing_ok=True)
    found = [staging, *(p for p in staging.iterdir() if p.is_dir())]
    top = next((p for p in found if has_layout(p)), None)
    if top is None:
        shutil.rmtree(staging)
        raise UserError(f"{archive} holds no train/ and test/ folders; unzip it by hand and pass DATA=/path/to/dataset")
    if root.is_dir():
        root.rmdir()  # empty (checked before the download)
    os.replace(top, root)
    fsync_dir(root.parent)
    shutil.rmtree(staging, ignore_errors=True)
