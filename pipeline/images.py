"""Images in: scan an ImageFolder-style dataset and decode each file safely to RGB.

Every file under ``DATA/<split>/<class>/`` is accounted for: it becomes an ``ImageEntry`` or a
``Skipped`` record with its reason. Nothing is dropped silently.
"""

from __future__ import annotations

import functools
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms.functional import pil_to_tensor

from pipeline.errors import UserError

SPLITS = ("train", "test")
AUGMENTED = "train_aug"  # the pseudo-split of augmented views of train images: paths "<image path>#aug<k>"


@dataclass(frozen=True)
class ImageEntry:
    """One image file: its path relative to the dataset root, class index and file stamp."""

    path: str
    label: int
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


@dataclass
class SplitListing:
    entries: list[ImageEntry]
    skipped: list[Skipped]


@dataclass
class DatasetListing:
    root: Path
    classes: list[str]
    splits: dict[str, SplitListing]


class BadImage(Exception):
    """A file that cannot be used as an image; the message is the skip reason."""


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def file_skip_reason(filename: str) -> str | None:
    """Why a file in an image folder is not read as an image, or None if it is one."""
    if _is_hidden(filename):
        return "hidden file"
    if not filename.lower().endswith(IMG_EXTENSIONS):
        return f"not an image file extension ({', '.join(IMG_EXTENSIONS)})"
    return None


def _class_folders(split_dir: Path) -> tuple[list[str], list[Skipped]]:
    classes, skipped = [], []
    for entry in sorted(os.scandir(split_dir), key=lambda e: e.name):
        rel = f"{split_dir.name}/{entry.name}"
        if not entry.is_dir():
            skipped.append(Skipped(rel, "file outside any class folder"))
        elif _is_hidden(entry.name):
            skipped.append(Skipped(rel + "/", "hidden folder, not a class"))
        else:
            classes.append(entry.name)
    return classes, skipped


def _scan_class(root: Path, split: str, name: str, label: int) -> tuple[list[ImageEntry], list[Skipped]]:
    entries, skipped = [], []
    class_dir = root / split / name
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        hidden_dirs = [d for d in dirnames if _is_hidden(d)]
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        skipped += [Skipped(f"{rel_dir}/{d}/", "hidden folder") for d in sorted(hidden_dirs)]
        for filename in sorted(filenames):
            rel = f"{rel_dir}/{filename}"
            reason = file_skip_reason(filename)
            if reason:
                skipped.append(Skipped(rel, reason))
            else:
                stat = os.stat(os.path.join(dirpath, filename))
                entries.append(ImageEntry(rel, label, stat.st_size, stat.st_mtime_ns))
    if not entries:
        raise UserError(f"class folder {class_dir} has no images; add images to it or remove the folder")
    return entries, skipped


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


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: 16-bit scaled (not clipped), transparency onto white."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(image, dtype=np.int64)
        shift = 8 if image.mode != "I" or values.max() > 255 else 0
        image = Image.fromarray((np.clip(values, 0, 65535) >> shift).astype(np.uint8), mode="L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_rgb(path: Path, min_side: int | None = None) -> Image.Image:
    """Decode one image fully (EXIF orientation applied) or raise ``BadImage`` with the reason.

    With ``min_side``, a JPEG at least twice that size on its short side is decoded at 1/2, 1/4 or
    1/8 scale in the DCT domain (Pillow's ``draft``), never below ``min_side``: much less work for
    large photos, and the resize that follows sees nearly the same pixels."""
    try:
        if os.path.getsize(path) == 0:
            raise BadImage("empty file (0 bytes)")
        with Image.open(path) as image:
            if min_side is not None and image.format == "JPEG":
                image.draft("RGB", (min_side, min_side))
            image.load()
            image = ImageOps.exif_transpose(image)
            return _to_rgb(image)
    except BadImage:
        raise
    except Image.DecompressionBombError as error:
        raise BadImage(f"too large for Pillow's decompression-bomb guard ({error}); downscale it") from None
    except UnidentifiedImageError:
        raise BadImage("not a readable image (Pillow cannot identify the format)") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise BadImage(f"truncated or corrupt image data ({error})") from None


@functools.cache
def jpeg_decoder() -> Callable[[bytes], torch.Tensor] | None:
    """TorchCodec's libjpeg-turbo decoder (``pip install 'pipeline[fast-decode]'``), or None where it is missing or
    does not load against this torch; Pillow then decodes everything."""
    try:
        from torchcodec.decoders import decode_jpeg
    except (ImportError, OSError, RuntimeError):
        return None
    return decode_jpeg


def _decodes_plainly(image: Image.Image, min_side: int | None) -> bool:
    """A JPEG the fast decoder reads to the same pixels as ``load_rgb``: RGB or gray, upright, and too small for
    a draft (large photos decode faster in Pillow's DCT domain)."""
    return (image.format == "JPEG" and image.mode in ("RGB", "L")
            and image.getexif().get(ExifTags.Base.Orientation, 1) == 1
            and (min_side is None or min(image.size) < 2 * min_side))


def load_image(path: Path, min_side: int | None = None) -> torch.Tensor:
    """Decode one image as ``load_rgb`` does, into a uint8 ``(3, H, W)`` tensor, or raise ``BadImage``.

    Plain JPEGs (most photos) go to TorchCodec's decoder when it is installed: about 1.0 ms against Pillow's
    1.7 ms for a 500x375 photo; every other file, and every JPEG that needs more care, goes through Pillow."""
    decode = jpeg_decoder()
    if decode is not None:
        try:
            with Image.open(path) as header:  # reads the header only; also Pillow's decompression-bomb guard
                plain = _decodes_plainly(header, min_side)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            plain = False  # load_rgb gives the reason
        if plain:
            try:
                return decode(Path(path).read_bytes(), mode="RGB")
            except RuntimeError as error:
                raise BadImage(f"truncated or corrupt image data ({str(error).split(', ')[-1].strip()})") from None
    return pil_to_tensor(load_rgb(path, min_side))


def augmented_views(listing: SplitListing, views: int) -> SplitListing:
    """``views`` augmented views of every train image, as entries of their own."""
    return SplitListing([ImageEntry(f"{e.path}#aug{k}", e.label, e.size, e.mtime_ns) for e in listing.entries for k in range(views)], [])


def view_seed(path: str) -> int:
    """Each augmented view's own seed: the same view of the same image is always the same crop."""
    return zlib.crc32(path.encode("utf-8"))


class ImageFiles(torch.utils.data.Dataset):
    """Decoded (``load_image``), transformed uint8 images; a bad file yields its skip reason instead of a tensor.

    A path ``<image>#aug<k>`` is view k of the image through ``augment``, seeded by ``view_seed``."""

    def __init__(self, root: Path, paths: list[str], transform, min_side: int | None = None, augment=None):
        self.root, self.paths, self.transform, self.min_side, self.augment = Path(root), paths, transform, min_side, augment

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str]:
        path = self.paths[index]
        image_path, _, view = path.partition("#aug")
        try:
            image = load_image(self.root / image_path, self.min_side)
        except BadImage as bad:
            return index, None, str(bad)
        if not view:
            return index, self.transform(image), ""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(view_seed(path))
            return index, self.augment(image), ""


def collate_good(batch: list[tuple[int, torch.Tensor | None, str]]):
    """Stack the decoded images; return ``(indices, tensor or None, [(index, reason), ...])``."""
    good = [(i, x) for i, x, _ in batch if x is not None]
    bad = [(i, reason) for i, x, reason in batch if x is None]
    tensor = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], tensor, bad
