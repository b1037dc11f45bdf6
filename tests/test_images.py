"""Scanning an ImageFolder dataset and decoding every kind of file a user's folder holds."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from conftest import make_images
from pipeline.errors import UserError
from pipeline import images
from pipeline.images import BadImage, load_image, load_rgb, scan_dataset


def test_scan_lists_sorted_entries_with_labels_from_train(tmp_path):
    root = make_images(tmp_path, {"train": 3, "test": 2})
    listing = scan_dataset(root)
    assert listing.classes == ["cat", "dog"]
    train = listing.splits["train"].entries
    assert [e.path for e in train] == sorted(e.path for e in train)
    assert [e.label for e in train] == [0, 0, 0, 1, 1, 1]
    assert all(e.size > 0 and e.mtime_ns > 0 for e in train)
    assert len(listing.splits["test"].entries) == 4


def test_scan_reports_hidden_and_non_image_files_instead_of_dropping_them(tmp_path):
    root = make_images(tmp_path, {"train": 2, "test": 1})
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"\0")
    (root / "train" / ".ipynb_checkpoints").mkdir()
    (root / "test" / "dog" / ".hidden").mkdir()
    listing = scan_dataset(root)
    assert listing.classes == ["cat", "dog"]
    skipped = {s.path: s.reason for s in listing.splits["train"].skipped + listing.splits["test"].skipped}
    assert "not an image file extension" in skipped["train/cat/notes.txt"]
    assert skipped["train/cat/.DS_Store"] == "hidden file"
    assert "hidden folder" in skipped["train/.ipynb_checkpoints/"]
    assert "hidden folder" in skipped["test/dog/.hidden/"]


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda root: root.rename(root.with_name("elsewhere")), "not found"),
        (lambda root: (root / "test").rename(root / "tests"), "has no test/ folder"),
        (lambda root: (root / "test" / "cat").rename(root / "test" / "bird"), "test class 'bird'"),
        (lambda root: [p.unlink() for p in (root / "train" / "dog").iterdir()], "has no images"),
        (lambda root: __import__("shutil").rmtree(root / "train" / "dog"), "only 'cat'"),
    ],
    ids=["missing", "no-test", "test-class-not-in-train", "empty-class", "single-class"],
)
def test_scan_rejects_bad_layouts_with_the_fix(tmp_path, breakage, message):
    root = make_images(tmp_path / "data", {"train": 2, "test": 1})
    breakage(root)
    with pytest.raises(UserError, match=message):
        scan_dataset(root)


def _save(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def test_load_rgb_converts_every_mode_to_rgb(tmp_path):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8))
    files = {
        "cmyk": _save(rgb.convert("CMYK"), tmp_path / "cmyk.jpg"),
        "gray": _save(rgb.convert("L"), tmp_path / "gray.png"),
        "palette": _save(rgb.convert("P"), tmp_path / "palette.png"),
        "rgba": _save(rgb.convert("RGBA"), tmp_path / "rgba.png"),
    }
    for name, path in files.items():
        image = load_rgb(path)
        assert image.mode == "RGB" and image.size == (30, 20), name


def test_load_rgb_scales_16_bit_instead_of_clipping(tmp_path):
    ramp = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)
    path = _save(Image.fromarray(ramp), tmp_path / "deep.png")
    pixels = np.asarray(load_rgb(path))[..., 0]
    np.testing.assert_array_equal(pixels, (ramp >> 8).astype(np.uint8))


def test_load_rgb_puts_transparent_pixels_on_white(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.asarray(load_rgb(_save(rgba, tmp_path / "clear.png"))).min() == 255


@pytest.fixture(params=["torchcodec", "pillow"])
def decoder(request, monkeypatch):
    """Run a test with each JPEG decoder ``load_image`` may use."""
    if request.param == "pillow":
        monkeypatch.setattr(images, "jpeg_decoder", lambda: None)
    elif images.jpeg_decoder() is None:
        pytest.skip("torchcodec is not installed (pip install 'pipeline[fast-decode]')")
    return request.param


def test_load_image_gives_pillows_pixels_with_either_decoder(tmp_path, decoder):
    rng = np.random.default_rng(2)
    photo = Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).resize((500, 375), Image.BICUBIC)
    for mode in ("RGB", "L"):
        path = _save(photo.convert(mode), tmp_path / f"{mode}.jpg", quality=90)
        expected = pil_to_tensor(load_rgb(path))
        got = load_image(path, min_side=256)
        assert got.dtype == torch.uint8 and got.shape == (3, 375, 500)
        assert (got.int() - expected.int()).abs().max() <= 2, mode


def test_load_image_applies_exif_orientation(tmp_path, decoder):
    wide = Image.new("RGB", (40, 20), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = _save(wide, tmp_path / "rotated.jpg", exif=exif)
    assert load_rgb(path).size == (20, 40)
    assert load_image(path).shape == (3, 40, 20)


def test_load_image_rejects_broken_files_with_reasons(tmp_path, decoder):
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good, "JPEG")
    (tmp_path / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("this is not a JPEG")
    reasons = {}
    for name in ("truncated.jpg", "empty.jpg", "text.jpg"):
        with pytest.raises(BadImage) as bad:
            load_image(tmp_path / name)
        reasons[name] = str(bad.value)
    assert "truncated" in reasons["truncated.jpg"]
    assert "empty file" in reasons["empty.jpg"]
    assert "not a readable image" in reasons["text.jpg"]


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_load_image_skips_decompression_bombs_with_a_reason(tmp_path, decoder, suffix):
    bomb = tmp_path / f"huge.{suffix}"
    Image.new("L", (20_000, 10_000)).save(bomb)  # 200 MP: over twice Pillow's limit, small on disk
    assert bomb.stat().st_size < 5_000_000
    with pytest.raises(BadImage, match="decompression-bomb"):
        load_image(bomb)
