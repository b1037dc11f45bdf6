"""Scanning an ImageFolder dataset and decoding every kind of file a user's folder holds."""

from __future__ import annotations

import errno
import io
import os
import socket
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from conftest import make_images
from pipeline.errors import UserError
from pipeline import images
from pipeline.images import load_image, load_rgb
from pipeline.listing import IMG_EXTENSIONS, NO_VIEW, BadImage, Skipped, SplitListing, scan_dataset, walk_folder
from pipeline.predict import image_files


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
    np.testing.assert_array_equal(pixels, np.rint(ramp / 65535 * 255).astype(np.uint8))


@pytest.mark.parametrize("pixels, brightest", [
    (np.linspace(0, 1, 64 * 64, dtype=np.float32), 255),  # float TIFF in 0..1
    (np.linspace(0, 200, 64 * 64, dtype=np.float32), 200),  # float TIFF in 0..255
    (np.arange(64 * 64, dtype=np.uint16) % 4096, 255),  # 12-bit values in a 16-bit PNG
    (np.arange(64 * 64, dtype=np.uint16) % 1024 // 2, 128),  # 10 bits, half range
    (np.arange(64 * 64, dtype=np.int32) * 1000, 249),  # 32-bit integers: 4095000 of 22 bits
], ids=["float-0-1", "float-0-255", "12-bit-png", "10-bit-png", "int32-tiff"])
def test_load_image_scales_deep_images_by_their_real_range(tmp_path, pixels, brightest):
    suffix = "png" if pixels.dtype == np.uint16 else "tif"
    path = _save(Image.fromarray(pixels.reshape(64, 64)), tmp_path / f"deep.{suffix}")
    assert Image.open(path).mode in ("F", "I", "I;16")
    decoded = load_image(path)
    assert decoded.shape == (3, 64, 64) and abs(int(decoded.max()) - brightest) <= 1


@pytest.mark.parametrize("value, message", [(np.nan, "NaN or infinite"), (np.inf, "NaN or infinite"),
                                            (300.0, "outside 0..1 and 0..255"), (-0.5, "outside 0..1 and 0..255")])
def test_load_image_refuses_float_images_it_cannot_scale(tmp_path, value, message):
    pixels = np.full((8, 8), 0.5, dtype=np.float32)
    pixels[0, 0] = value
    path = _save(Image.fromarray(pixels), tmp_path / "odd.tif")
    with pytest.raises(BadImage, match=message):
        load_image(path)


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


def _skips(listing) -> dict[str, str]:
    return {s.path: s.reason for split in listing.splits.values() for s in split.skipped}


def test_scan_enters_each_real_folder_once(tmp_path):
    root = make_images(tmp_path / "data", {"train": 2, "test": 1})
    cat = root / "train" / "cat"
    (cat / "deeper").mkdir()
    Image.new("RGB", (8, 8)).save(cat / "deeper" / "x.png")
    (cat / "loop").symlink_to(".")
    (cat / "deeper" / "up").symlink_to("..")
    (cat / "twin").symlink_to("deeper")
    listing = scan_dataset(root)
    assert [e.path for e in listing.splits["train"].entries if e.label == 0] == [
        "train/cat/cat0.png", "train/cat/cat1.png", "train/cat/deeper/x.png"]
    skipped = _skips(listing)
    assert skipped["train/cat/loop/"] == skipped["train/cat/deeper/up/"] == "symbolic link to a folder already scanned (loop)"
    assert "already scanned" in skipped["train/cat/twin/"]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open descriptors in /proc/self/fd")
def test_a_walk_closes_every_folder_it_opened_also_when_stopped_early(tmp_path):
    root = make_images(tmp_path / "data", {"train": 2, "test": 1})
    for depth in ("a", "a/b", "a/b/c"):
        (root / "train" / "cat" / depth).mkdir()
        Image.new("RGB", (8, 8)).save(root / "train" / "cat" / depth / "x.png")
    before = set(os.listdir("/proc/self/fd"))
    assert len(list(walk_folder(root))) == 9  # the six images, then three nested
    walk = walk_folder(root)
    while next(walk) != ("train/cat/a/b/c/x.png", os.stat(root / "train/cat/a/b/c/x.png")):
        pass  # four folders deep, all held open
    assert len(set(os.listdir("/proc/self/fd")) - before) >= 4
    walk.close()
    assert set(os.listdir("/proc/self/fd")) == before


def test_a_listing_s_columns_are_its_entries_and_each_changes_the_digest(tmp_path):
    root = make_images(tmp_path / "data", {"train": 2, "test": 1})
    listing = scan_dataset(root)
    train = listing.splits["train"]
    assert SplitListing.of(train.entries, train.skipped) == train
    assert [e.path for e in train.entries] == train.paths and {e.view for e in train.entries} == {NO_VIEW}
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    listing = scan_dataset(root)
    digests = {listing.digest}
    for split in ("train", "test"):
        for column in ("paths", "labels", "sizes", "mtimes_ns"):
            changed = scan_dataset(root)
            values = getattr(changed.splits[split], column)
            values[-1] = values[-1] + "x" if column == "paths" else values[-1] + 1
            digests.add(changed.digest)
    for field in ("path", "reason"):
        changed = scan_dataset(root)
        [skip] = changed.splits["train"].skipped
        changed.splits["train"].skipped = [Skipped(**{**vars(skip), field: getattr(skip, field) + "x"})]
        digests.add(changed.digest)
    moved = scan_dataset(root)  # the last train file listed under test instead: the same files, in other splits
    for column in ("paths", "labels", "sizes", "mtimes_ns", "views"):
        getattr(moved.splits["test"], column).append(getattr(moved.splits["train"], column).pop())
    digests.add(moved.digest)
    assert len(digests) == 12 and scan_dataset(root).digest == listing.digest


def _special_files(folder: Path, monkeypatch) -> None:
    """A FIFO and a socket named like images in ``folder``, a broken and a self-pointing symbolic link."""
    os.mkfifo(folder / "pipe.jpg")
    monkeypatch.chdir(folder)  # a socket's path must be short
    server = socket.socket(socket.AF_UNIX)
    server.bind("sock.png")
    server.close()
    (folder / "gone.png").symlink_to("missing.png")
    (folder / "self.png").symlink_to("self.png")


SPECIAL_REASONS = {"pipe.jpg": "not a regular file (FIFO)", "sock.png": "not a regular file (socket)",
                   "gone.png": "broken symbolic link", "self.png": "symbolic link loop"}


def test_scan_skips_special_files_and_bad_links_with_reasons(tmp_path, monkeypatch):
    root = make_images(tmp_path / "data", {"train": 2, "test": 1})
    _special_files(root / "train" / "cat", monkeypatch)
    (root / "train" / "loop").symlink_to("loop")
    listing = scan_dataset(root)
    assert len(listing.splits["train"].entries) == 4
    skipped = _skips(listing)
    assert {name: skipped[f"train/cat/{name}"] for name in SPECIAL_REASONS} == SPECIAL_REASONS
    assert skipped["train/loop"] == "symbolic link loop"


def test_scan_skips_an_entry_it_cannot_read_with_the_error(tmp_path, monkeypatch):
    root = make_images(tmp_path / "data", {"train": 2, "test": 1})
    locked_folder = os.stat(root / "train" / "cat").st_ino
    real_scandir = os.scandir

    class Entry:  # a directory entry whose stat fails, as on a file this user may not read the metadata of
        def __init__(self, entry: os.DirEntry, folder: int):
            self.entry, self.name, self.path, self.folder = entry, entry.name, entry.path, folder

        def is_dir(self) -> bool:
            return self.entry.is_dir()

        def stat(self) -> os.stat_result:
            if (self.folder, self.name) == (locked_folder, "cat0.png"):
                raise PermissionError(errno.EACCES, "Permission denied", self.path)
            return self.entry.stat()

    monkeypatch.setattr(os, "scandir", lambda where: [Entry(e, os.stat(where).st_ino) for e in real_scandir(where)])
    listing = scan_dataset(root)
    assert _skips(listing)["train/cat/cat0.png"] == "Permission denied"
    assert len(listing.splits["train"].entries) == 3


@pytest.mark.skipif(os.geteuid() != 0, reason="creating a device file needs root")
def test_scan_skips_device_files(tmp_path):
    root = make_images(tmp_path / "data", {"train": 2, "test": 1})
    os.mknod(root / "train" / "cat" / "null.png", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    assert _skips(scan_dataset(root))["train/cat/null.png"] == "not a regular file (character device)"


def test_load_image_refuses_a_fifo_or_socket_instead_of_blocking(tmp_path, monkeypatch, decoder):
    _special_files(tmp_path, monkeypatch)  # as if swapped in after the scan
    for name, reason in SPECIAL_REASONS.items():
        with pytest.raises(BadImage) as bad:
            load_image(tmp_path / name)
        assert str(bad.value) == reason, name


def test_scan_and_load_keep_file_names_that_are_not_utf8(tmp_path):
    root = make_images(tmp_path / "data", {"train": 2, "test": 1})
    png = io.BytesIO()
    Image.new("RGB", (8, 6), (1, 2, 3)).save(png, "PNG")
    fd = os.open(os.fsencode(root / "train" / "cat") + b"/caf\xe9.png", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, png.getvalue())
    os.close(fd)
    listing = scan_dataset(root)
    assert "train/cat/caf\udce9.png" in [e.path for e in listing.splits["train"].entries]
    assert load_image(root / "train/cat/caf\udce9.png").shape == (3, 6, 8)
    files, _ = image_files([root / "train" / "cat"])
    assert root / "train/cat/caf\udce9.png" in files


def test_predict_lists_with_the_scans_rules(tmp_path, monkeypatch):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(folder / "sub" / "a.png")
    Image.new("RGB", (8, 8)).save(folder / "b.png")
    (folder / "sub" / "loop").symlink_to("..")
    (folder / ".thumbs").mkdir()
    _special_files(folder, monkeypatch)
    files, skipped = image_files([folder, folder / "pipe.jpg", folder / "gone.png"])
    assert files == [folder / "b.png", folder / "sub" / "a.png"]
    reasons = {Path(p.path).relative_to(tmp_path).as_posix() + ("/" if p.path.endswith("/") else ""): p.skipped
               for p in skipped}
    assert reasons == {**{f"photos/{name}": reason for name, reason in SPECIAL_REASONS.items()},
                       "photos/.thumbs/": "hidden folder",
                       "photos/sub/loop/": "symbolic link to a folder already scanned (loop)"}
    assert [p.skipped for p in skipped[-2:]] == ["not a regular file (FIFO)", "broken symbolic link"]
    with pytest.raises(UserError, match="does not exist"):
        image_files([folder / "nothing.png"])


def test_the_extensions_are_torchvisions():
    """Kept as a copy so that listing a dataset never imports torch; ImageFolder's list is the reference."""
    from torchvision.datasets.folder import IMG_EXTENSIONS as TORCHVISION

    assert set(IMG_EXTENSIONS) == set(TORCHVISION)
