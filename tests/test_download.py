"""``make data`` against a loopback HTTP server serving a small zip shaped like the seed's (the real URL is not
reachable here): download, resume, check, unpack, refuse."""

from __future__ import annotations

import io
import threading
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import make_images
from pipeline.cli import main
from pipeline.download import fetch_dataset
from pipeline.errors import UserError
from pipeline.listing import scan_dataset


def seed_shaped_zip(tmp_path: Path) -> bytes:
    """``Cat_Dog_data/{train,test}/{cat,dog}/*.png`` plus the macOS debris the seed's archive carries."""
    images = make_images(tmp_path / "images", {"train": 3, "test": 2})
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for path in sorted(images.rglob("*.png")):
            z.write(path, f"Cat_Dog_data/{path.relative_to(images).as_posix()}")
        z.writestr("Cat_Dog_data/.DS_Store", b"\0\0\0\1Bud1")
        z.writestr("__MACOSX/Cat_Dog_data/train/._cat", b"junk")
    return out.getvalue()


@contextmanager
def serving(body: bytes) -> Iterator[tuple[str, list[str]]]:
    """A loopback server of ``body`` that honours ``Range: bytes=N-``; yields its URL and the Range headers it saw."""
    ranges: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            start = 0
            if asked := self.headers.get("Range"):
                ranges.append(asked)
                start = int(asked.removeprefix("bytes=").rstrip("-"))
            self.send_response(206 if asked else 200)
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            self.wfile.write(body[start:])

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/Cat_Dog_data.zip", ranges
    finally:
        server.shutdown()
        server.server_close()


def test_the_archive_is_downloaded_checked_and_unpacked_without_debris(tmp_path):
    body = seed_shaped_zip(tmp_path)
    root = tmp_path / "Cat_Dog_data"
    with serving(body) as (url, ranges):
        assert fetch_dataset(root, url) is True
        assert fetch_dataset(root, url) is False  # already there: nothing fetched
    listing = scan_dataset(root)
    assert listing.classes == ["cat", "dog"] and not ranges
    assert [len(listing.splits[s].entries) for s in ("train", "test")] == [6, 4]
    assert not any(s.skipped for s in listing.splits.values())  # no .DS_Store, no __MACOSX
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Cat_Dog_data", "images"]  # no zip, part or staging left


def test_an_interrupted_download_resumes_from_where_it_stopped(tmp_path):
    body = seed_shaped_zip(tmp_path)
    root = tmp_path / "Cat_Dog_data"
    (tmp_path / "Cat_Dog_data.zip.part").write_bytes(body[:1000])
    with serving(body) as (url, ranges):
        assert fetch_dataset(root, url) is True
    assert ranges == ["bytes=1000-"]
    assert len(scan_dataset(root).splits["train"].entries) == 6


def test_a_damaged_archive_is_deleted_and_named(tmp_path):
    body = bytearray(seed_shaped_zip(tmp_path))
    body[200] ^= 0xFF  # inside the first member's data: its CRC fails
    root = tmp_path / "Cat_Dog_data"
    with serving(bytes(body)) as (url, _), pytest.raises(UserError, match="is damaged"):
        fetch_dataset(root, url)
    assert not root.exists() and not (tmp_path / "Cat_Dog_data.zip").exists()


def test_offline_is_one_line_naming_the_url_and_the_manual_route(tmp_path):
    with serving(b"") as (url, _):
        pass  # the server is gone: its port refuses connections
    with pytest.raises(UserError, match=r"cannot download http://127\.0\.0\.1:\d+/Cat_Dog_data\.zip .*by hand"):
        fetch_dataset(tmp_path / "Cat_Dog_data", url, timeout=5)


def test_an_occupied_folder_without_the_layout_is_refused_untouched(tmp_path):
    root = tmp_path / "Cat_Dog_data"
    root.mkdir()
    (root / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds no train/ and test/"):
        fetch_dataset(root, "http://127.0.0.1:9/unused.zip")
    assert (root / "notes.txt").read_text() == "mine"
    assert main(["data", "--data", str(root)]) == 2
