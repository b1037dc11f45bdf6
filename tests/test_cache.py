"""The feature cache: incremental, fingerprinted, resumable after SIGKILL, locked, and honest about bad input."""

from __future__ import annotations

import io
import re
import shutil

import h5py
import numpy as np
import pytest
import torch
from filelock import FileLock
from PIL import Image

from conftest import make_images, run_cli, run_cli_process, tmpfs
from pipeline.store import FeatureStore

LITE = ("--backbone", "efficientnet_lite0")


def features(data, cache, *extra) -> int:
    return run_cli("features", "--data", data, "--cache", cache, *LITE, *extra)


def stored(cache, split="train") -> dict[str, np.ndarray]:
    with FeatureStore(cache / "efficientnet_lite0" / "features.h5") as store:
        return dict(zip(store.paths(split), store.features(split)))


def leftovers(cache) -> list[str]:
    return sorted(p.name for p in (cache / "efficientnet_lite0").glob("*.tmp"))


def test_unchanged_dataset_is_a_no_op(tmp_path, tiny_data, capsys):
    cache = tmp_path / "cache"
    assert features(tiny_data, cache) == 0
    file = cache / "efficientnet_lite0" / "features.h5"
    before = file.stat()
    assert features(tiny_data, cache) == 0
    assert "features: up to date" in capsys.readouterr().out
    after = file.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_the_summary_says_how_much_of_the_time_the_backbone_was_busy(tmp_path, tiny_data, capsys):
    """The share of stage one spent in the forward: a low one means decoding is the bottleneck."""
    cache = tmp_path / "cache"
    assert features(tiny_data, cache) == 0
    busy = re.search(r"backbone busy (\d+)% of it", capsys.readouterr().out)
    assert busy and 0 < int(busy.group(1)) < 100
    assert features(tiny_data, cache) == 0
    assert "busy" not in capsys.readouterr().out  # nothing ran


def test_added_removed_and_changed_images_are_the_only_work(tmp_path, tiny_data, capsys):
    cache = tmp_path / "cache"
    features(tiny_data, cache)
    first = stored(cache)
    capsys.readouterr()
    make_images(tmp_path / "more", {"train": 1})
    shutil.copy(tmp_path / "more/train/cat/cat0.png", tiny_data / "train/cat/new.png")
    (tiny_data / "train/dog/dog3.png").unlink()
    Image.new("RGB", (40, 32), (250, 250, 250)).save(tiny_data / "train/cat/cat5.png")
    assert features(tiny_data, cache) == 0
    line = capsys.readouterr().out
    assert "extracted 2 " in line and "removed 1," in line and "reused 26," in line
    second = stored(cache)
    assert "train/cat/new.png" in second and "train/dog/dog3.png" not in second
    assert not np.allclose(second["train/cat/cat5.png"], first["train/cat/cat5.png"])
    for path in set(first) & set(second) - {"train/cat/cat5.png"}:
        np.testing.assert_array_equal(first[path], second[path])
    assert list(second) == sorted(second)


def test_other_weights_or_force_rebuild_everything(tmp_path, tiny_data, capsys):
    cache = tmp_path / "cache"
    features(tiny_data, cache)
    capsys.readouterr()
    assert features(tiny_data, cache, "--force") == 0
    assert "extracted 28 " in capsys.readouterr().out
    weights = tmp_path / "random-lite0.pth"
    from pipeline.backbones import get_backbone
    torch.save(get_backbone("efficientnet_lite0").build().state_dict(), weights)
    assert features(tiny_data, cache, "--weights", weights) == 0
    out = capsys.readouterr().out
    assert "weights changed" in out and "extracted 28 " in out


@pytest.mark.slow  # a second process
def test_a_second_run_on_the_same_cache_stops_with_a_clear_message(tmp_path, tiny_data):
    folder = tmp_path / "cache" / "efficientnet_lite0"
    folder.mkdir(parents=True)
    with FileLock(folder / "features.lock"):
        result = run_cli_process("features", "--data", tiny_data, "--cache", tmp_path / "cache", *LITE)
    assert result.returncode == 2 and "another `features` run" in result.stderr
    assert not (folder / "features.h5").exists()


def test_broken_images_are_skipped_recorded_and_reported_never_fatal(tmp_path, tiny_data, capsys):
    cat = tiny_data / "train" / "cat"
    good = io.BytesIO()
    Image.new("RGB", (300, 200), (1, 2, 3)).save(good, "JPEG")
    (cat / "truncated.jpg").write_bytes(good.getvalue()[:400])
    (cat / "empty.jpg").write_bytes(b"")
    (cat / "text.jpg").write_text("hello")
    (cat / "readme.txt").write_text("notes")
    (cat / ".DS_Store").write_bytes(b"\0\1")
    Image.new("1", (20_000, 10_000)).save(cat / "bomb.png")
    Image.new("RGB", (50, 40), (200, 60, 40)).convert("CMYK").save(cat / "cmyk.jpg")
    Image.new("RGBA", (50, 40), (200, 60, 40, 128)).save(cat / "rgba.png")
    Image.fromarray(np.full((40, 50), 40000, dtype=np.uint16)).save(cat / "deep.png")
    Image.new("RGB", (50, 40), (200, 60, 40)).convert("P").save(cat / "palette.png")
    cache = tmp_path / "cache"
    assert features(tiny_data, cache) == 0
    out = capsys.readouterr().out
    assert "skipped 6 " in out and "  skipped train/cat/empty.jpg: empty file (0 bytes)" in out
    assert "  skipped train/cat/bomb.png: too large" in out
    with FeatureStore(cache / "efficientnet_lite0" / "features.h5") as store:
        reasons = {record.path: record.reason for record in store.index("train").skipped}
        paths = set(store.paths("train"))
    assert set(reasons) == {f"train/cat/{n}" for n in ("truncated.jpg", "empty.jpg", "text.jpg", "readme.txt", ".DS_Store", "bomb.png")}
    assert "truncated" in reasons["train/cat/truncated.jpg"] and "decompression-bomb" in reasons["train/cat/bomb.png"]
    assert {f"train/cat/{n}" for n in ("cmyk.jpg", "rgba.png", "deep.png", "palette.png")} <= paths
    assert features(tiny_data, cache) == 0
    assert "up to date" in capsys.readouterr().out  # known-bad files are not retried until they change
    assert run_cli("train-head", "--cache", cache, *LITE, "--epochs", "2") == 0
    assert run_cli("report", "--cache", cache, *LITE) == 0
    report = (cache / "efficientnet_lite0" / "report.md").read_text()
    assert "Skipped images: 6" in report and "train/cat/empty.jpg: empty file" in report


def _damage(path, how: str) -> None:
    if how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3])
    elif how == "garbage":
        path.write_bytes(b"not hdf5 at all" * 100)
    elif how == "incomplete":
        with h5py.File(path, "a") as f:
            f.attrs["complete"] = False


@pytest.mark.slow  # fault injection
@pytest.mark.parametrize("how, message", [("truncated", "corrupted or truncated"), ("garbage", "corrupted or truncated"),
                                          ("incomplete", "incomplete")])
def test_damaged_caches_are_refused_by_stage_two_and_rebuilt_by_stage_one(tmp_path, tiny_data, how, message, capsys):
    cache = tmp_path / "cache"
    features(tiny_data, cache)
    _damage(cache / "efficientnet_lite0" / "features.h5", how)
    result = run_cli_process("train-head", "--cache", cache, *LITE)
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    capsys.readouterr()
    assert features(tiny_data, cache) == 0
    assert "rebuilding" in capsys.readouterr().out
    assert run_cli("train-head", "--cache", cache, *LITE, "--epochs", "1") == 0


def test_a_cache_from_another_backbone_or_dataset_is_refused(tmp_path, tiny_data):
    cache = tmp_path / "cache"
    features(tiny_data, cache)
    shutil.copytree(cache / "efficientnet_lite0", cache / "densenet121")
    other = run_cli_process("train-head", "--cache", cache, "--backbone", "densenet121")
    assert other.returncode == 2 and "made by backbone efficientnet_lite0" in other.stderr
    elsewhere = make_images(tmp_path / "elsewhere", {"train": 2, "test": 1})
    wrong_data = run_cli_process("train-head", "--cache", cache, *LITE, "--data", elsewhere)
    assert wrong_data.returncode == 2 and "was made from" in wrong_data.stderr


def test_weights_for_another_architecture_through_the_cli(tmp_path, tiny_data):
    weights = tmp_path / "resnet.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, weights)
    result = run_cli_process("features", "--data", tiny_data, "--cache", tmp_path / "c", *LITE, "--weights", weights)
    assert result.returncode == 2 and "do not fit efficientnet_lite0" in result.stderr


def test_an_unwritable_cache_is_refused(tmp_path, tiny_data):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")
    result = run_cli_process("features", "--data", tiny_data, "--cache", blocker, *LITE)
    assert result.returncode == 2 and "cannot write to folder" in result.stderr


@pytest.fixture
def tiny_disk(tmp_path):
    """A 96 KiB tmpfs: the disk fills up part-way through extraction."""
    with tmpfs(tmp_path / "small-disk", 96 * 1024) as mount:
        yield mount


@pytest.mark.slow  # fault injection
def test_a_full_disk_is_a_clear_error_and_leaves_nothing_half_written(tiny_data, tiny_disk):
    result = run_cli_process("features", "--data", tiny_data, "--cache", tiny_disk, *LITE, "--chunk-size", "4",
                             "--batch-size", "4")
    assert result.returncode == 2 and "disk full" in result.stderr and "Traceback" not in result.stderr
    folder = tiny_disk / "efficientnet_lite0"
    assert not (folder / "features.h5").exists() and leftovers(tiny_disk) == []
    assert not list((folder / "features.partial").rglob("*.tmp"))
    assert list((folder / "features.partial").glob("*/chunk-*.npz"))  # the chunks that fitted are kept for the resume
