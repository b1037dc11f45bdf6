"""Images in: decode each listed file safely to RGB, as a torch ``Dataset``; a file that cannot be decoded is a
skip reason, never an exception out of the loader.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from pipeline.listing import DIGEST_BYTES, NO_VIEW, BadImage, error_reason, not_regular_reason

_BIT_DEPTHS = range(8, 33, 2)  # 8, 10, 12, ..., 32 bits


def _to_8_bit(image: Image.Image) -> Image.Image:
    """A gray image deeper than 8 bits ("I;16*", "I", "F") as 8-bit "L", scaled by its real range, or ``BadImage``.

    Integers scale by the smallest even bit depth from 8 to 32 that holds their maximum (a 12-bit image in a 16-bit
    PNG fills 0..255, and the brightest pixel is never below a quarter of the range); floats within [0, 1] by 255, within [0, 255] as they are. NaN, infinity, negative values and
    floats above 255 are refused, never guessed into a black image."""
    values = np.asarray(image, dtype=np.float64)
    if not np.isfinite(values).all():
        raise BadImage("NaN or infinite pixel values; save the image with finite values in 0..1 or 0..255")
    low, high = float(values.min()), float(values.max())
    if low < 0 or (image.mode == "F" and high > 255):
        raise BadImage(f"pixel values from {low:g} to {high:g}, outside 0..1 and 0..255; save the image rescaled")
    if image.mode == "F":
        scale = 255.0 if high <= 1 else 1.0
    else:
        scale = 255 / (2 ** next(bits for bits in _BIT_DEPTHS if high < 2**bits) - 1)
    return Image.fromarray(np.rint(values * scale).astype(np.uint8))


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: deeper gray scaled by ``_to_8_bit`` (not clipped), transparency onto white."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        image = _to_8_bit(image)
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _read_file(path: str | os.PathLike) -> bytes:
    """All bytes of one regular file, or ``BadImage``.

    Opened without blocking and checked on the open descriptor, so a FIFO, socket or device put in a file's place
    after the scan is refused, never waited on."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as error:  # a socket cannot be opened at all: name its kind
        try:
            kind = not_regular_reason(os.stat(path).st_mode)
        except OSError:
            kind = None
        raise BadImage(kind or error_reason(path, error)) from None
    with open(fd, "rb") as file:
        info = os.fstat(fd)
        reason = not_regular_reason(info.st_mode) or ("empty file (0 bytes)" if info.st_size == 0 else None)
        if reason:
            raise BadImage(reason)
        try:
            return file.read()
        except OSError as error:
            raise BadImage(error_reason(path, error)) from None


@contextlib.contextmanager
def _pillow_errors() -> Iterator[None]:
    """Pillow's errors as ``BadImage`` with the reason."""
    try:
        yield
    except Image.DecompressionBombError as error:
        raise BadImage(f"too large for Pillow's decompression-bomb guard ({error}); downscale it") from None
    except UnidentifiedImageError:
        raise BadImage("not a readable image (Pillow cannot identify the format)") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise BadImage(f"truncated or corrupt image data ({error})") from None


def _pillow_rgb(image: Image.Image, min_side: int | None) -> Image.Image:
    if min_side is not None and image.format == "JPEG":
        image.draft("RGB", (min_side, min_side))
    image.load()
    return _to_rgb(ImageOps.exif_transpose(image))


def load_rgb(path: Path, min_side: int | None = None) -> Image.Image:
    """Decode one image fully (EXIF orientation applied) or raise ``BadImage`` with the reason.

    The file is read once, by ``_read_file``, and decoded from memory. With ``min_side``, a JPEG at least twice
    that size on its short side is decoded at 1/2, 1/4 or 1/8 scale in the DCT domain (Pillow's ``draft``), never
    below ``min_side``: much less work for large photos, and the resize that follows sees nearly the same pixels."""
    data = _read_file(path)
    with _pillow_errors(), Image.open(io.BytesIO(data)) as image:
        return _pillow_rgb(image, min_side)


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
    """Decode one image as ``load_rgb`` does, into a uint8 ``(3, H, W)`` tensor, or raise ``BadImage``."""
    return decode_image(_read_file(path), min_side)


def file_digest(path: Path) -> bytes:
    """The blake2b digest of a file's bytes, as stored beside its vector (``--verify`` compares them); ``BadImage`` if
    it cannot be read."""
    return _digest(_read_file(path))


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=DIGEST_BYTES).digest()


def decode_image(data: bytes, min_side: int | None = None) -> torch.Tensor:
    """One image file's bytes as a uint8 ``(3, H, W)`` tensor, as ``load_rgb`` decodes them, or ``BadImage``.

    Plain JPEGs (most photos) go to TorchCodec's faster decoder when it is installed; every other file, and every
    JPEG that needs more care, goes through Pillow."""
    decode = jpeg_decoder()
    with _pillow_errors(), Image.open(io.BytesIO(data)) as image:  # the header, and Pillow's decompression-bomb guard
        if decode is None or not _decodes_plainly(image, min_side):
            from torchvision.transforms.functional import pil_to_tensor  # not at the top: the report needs no torchvision

            return pil_to_tensor(_pillow_rgb(image, min_side))
    try:
        return decode(data, mode="RGB")
    except RuntimeError as error:
        raise BadImage(f"truncated or corrupt image data ({str(error).split(', ')[-1].strip()})") from None



def view_seed(path: str, view: int) -> int:
    """Each augmented view's own seed: the same view of the same image is always the same crop."""
    return zlib.crc32(os.fsencode(path) + b"\0" + str(view).encode())


class ImageFiles(torch.utils.data.Dataset):
    """Decoded, transformed uint8 images of ``(path, view)`` items, each with the digest of its file's bytes; a bad
    file yields its skip reason instead of a tensor. View ``NO_VIEW`` is the image through ``transform``, view k
    is augmented view k through ``augment``, seeded by ``view_seed``."""

    def __init__(self, root: Path, items: list[tuple[str, int]], transform, min_side: int | None = None, augment=None):
        self.root, self.items, self.transform, self.min_side, self.augment = Path(root), items, transform, min_side, augment

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, bytes, str]:
        path, view = self.items[index]
        try:
            data = _read_file(self.root / path)
            image = decode_image(data, self.min_side)
        except BadImage as bad:
            return index, None, bytes(DIGEST_BYTES), str(bad)
        if view == NO_VIEW:
            return index, self.transform(image), _digest(data), ""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(view_seed(path, view))
            return index, self.augment(image), _digest(data), ""


def collate_good(batch: list[tuple[int, torch.Tensor | None, bytes, str]]):
    """Stack the decoded images: ``(indices of the good ones, their tensor or None, {index: (digest, reason)})``."""
    good = [(i, x) for i, x, _, _ in batch if x is not None]
    tensor = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], tensor, {i: (digest, reason) for i, _, digest, reason in batch}
