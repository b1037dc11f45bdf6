"""The cache under attack: bad settings never cost work, damaged bytes are never read as numbers, odd names and
moved data work, and a process killed at any named point resumes to the file an uninterrupted run makes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import EXACT, REPO, make_images, run_cli, run_cli_process, run_folder, tmpfs
from pipeline import extract as extract_module
from pipeline.config import Settings
from pipeline.errors import UserError
from pipeline.extract import extract
from pipeline.listing import scan_dataset, shown
from pipeline.predict import Prediction, render
from pipeline.store import FeatureStore, features_file

pytestmark = pytest.mark.slow  # `make test-fast` leaves it out

LITE = ("--backbone", "efficientnet_lite0")


def settings(data, cache, **kwargs) -> Settings:
    return Settings(cache=cache, backbone="efficientnet_lite0", **({"data": data} if data is not None else {}), **kwargs)


def snapshot(cache) -> dict[str, dict[tuple[str, int], np.ndarray]]:
    """Every stored vector by split, (path, view), read through the store (so checked)."""
    with FeatureStore(features_file(cache / "efficientnet_lite0")) as store:
        return {split: {(p, int(v)): x for p, v, x in zip(store.paths(split), store.index(split).views, store.features(split))}
                for split in store.splits}


def assert_same_vectors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for split in a:
        assert list(a[split]) == list(b[split])
        np.testing.assert_allclose(np.stack(list(a[split].values())), np.stack(list(b[split].values())), rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """Data with 40 + 10 images per class and its uninterrupted cache, to compare every resumed run against."""
    root = tmp_path_factory.mktemp("attacks")
    data = make_images(root / "data", {"train": 40, "test": 10})
    cache = root / "clean"
    extract(settings(data, cache, chunk_size=8, batch_size=4, workers=0))
    return data, cache


# -- settings: one place checks them all, before anything on disk is touched -------------------------------------

@pytest.mark.parametrize("name, value, problem", [
    ("lr", 0.0, "--lr must be a number above 0"), ("lr", float("nan"), "--lr must be a number above 0"),
    ("lr", -1.0, "--lr must be a number above 0"), ("seed", -1, "--seed must be a number at least 0"),
    ("precision", "fp322", "--precision 'fp322' is not one of"), ("runtime", "torchh", "--runtime 'torchh' is not one of"),
    ("format", "xml", "--format 'xml' is not one of"), ("dropout", 1.0, "--dropout must be"), ("backbones", " ", "--backbones is empty"),
    ("val_fraction", 1.5, "--val-fraction must be"), ("workers", -2, "--workers must be"), ("workers", 1000, "at most 256"),
    ("hidden", 10**20, "--hidden must be a number at least 1 and at most"), ("batch_size", 10**20, "--batch-size must be"),
])
def test_an_invalid_setting_cannot_exist(name, value, problem):
    with pytest.raises(UserError, match=problem):
        Settings(**{name: value})


def test_a_bad_flag_is_one_line_and_exit_2_before_any_work(tmp_path, tiny_data):
    for flags in (["--precision", "fp322"], ["--lr", "0"], ["--seed", "-1"], ["--weights", tmp_path]):
        command = "train-head" if flags[0] in ("--lr", "--seed") else "features"
        result = run_cli_process(command, "--data", tiny_data, "--cache", tmp_path / "cache", *LITE, *flags)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "Traceback" not in result.stderr and not (tmp_path / "cache").exists()


def _kill_at(point: str, args, env=None) -> subprocess.CompletedProcess:
    result = run_cli_process(*args, env={"PIPELINE_KILL_AT": point, **(env or {})})
    assert result.returncode == -9, f"not killed at {point}: {result.stdout} {result.stderr}"
    return result


def _chunk_files(cache) -> list[str]:
    return sorted(p.name for p in (cache / "efficientnet_lite0" / "features.partial").glob("*/chunk-*.npz"))


def test_bad_settings_after_an_interrupted_run_keep_its_chunks(clean, tmp_path):
    data, clean_cache = clean
    cache = tmp_path / "cache"
    args = ["features", "--data", data, "--cache", cache, *LITE, "--batch-size", "4", "--chunk-size", "8", "--workers", "0"]
    _kill_at("chunk-after-rename:5", args)
    assert len(_chunk_files(cache)) == 5
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a state dict")
    wrong = tmp_path / "resnet.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, wrong)
    for flags in (["--precision", "fp322"], ["--runtime", "torchh"], ["--weights", garbage], ["--weights", wrong],
                  ["--runtime", "openvino", "--device", "cuda"], ["--device", "cuda:7"]):
        result = run_cli_process(*args, *flags)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, (flags, result.stderr)
        assert "changed" not in result.stdout and len(_chunk_files(cache)) == 5, flags
    summary = extract(settings(data, cache, chunk_size=8, batch_size=4, workers=0))
    assert summary.resumed == 40 and summary.extracted == 60
    assert_same_vectors(snapshot(cache), snapshot(clean_cache))


def test_a_run_with_other_settings_does_not_delete_an_interrupted_runs_chunks(clean, tmp_path):
    data, _ = clean
    cache = tmp_path / "cache"
    args = ["features", "--data", data, "--cache", cache, *LITE, "--batch-size", "4", "--chunk-size", "8", "--workers", "0"]
    _kill_at("chunk-after-rename:3", args)
    _kill_at("chunk-after-rename:2", [*args, "--storage", "float16"])  # another fingerprint, interrupted too
    assert len(_chunk_files(cache)) == 5  # both runs' chunks, each under its own fingerprint
    assert extract(settings(data, cache, chunk_size=8, batch_size=4, workers=0)).resumed == 24


# -- SIGKILL at every named point, then resume: the file an uninterrupted run makes -------------------------------

@pytest.mark.parametrize("point", ["chunk-before-rename:2", "chunk-after-rename:2", "assembly", "store-before-rename",
                                   "store-after-rename", "partial-removal:2"])
def test_killed_at_any_point_a_rerun_gives_the_uninterrupted_file(clean, tmp_path, point):
    data, clean_cache = clean
    cache = tmp_path / "cache"
    args = ["features", "--data", data, "--cache", cache, *LITE, "--batch-size", "4", "--chunk-size", "8", "--workers", "0"]
    _kill_at(point, args)
    target = features_file(cache / "efficientnet_lite0")
    if target.exists():  # killed after the rename: the file is whole already
        assert_same_vectors(snapshot(cache), snapshot(clean_cache))
    resumed = run_cli_process(*args)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_vectors(snapshot(cache), snapshot(clean_cache))
    assert not (cache / "efficientnet_lite0" / "features.partial").exists()
    assert not list((cache / "efficientnet_lite0").glob("*.tmp"))


# -- flipped bits: a rebuild, a repair or a one-line refusal, never other numbers and never a traceback -----------

def _flip(path, offset: int, bit: int = 0) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))


def _vectors_at(cache, split="train") -> tuple[Path, int]:
    """The segment file holding a split's first stored vectors, and their byte offset in it."""
    with FeatureStore(features_file(cache / "efficientnet_lite0")) as store:
        segment = store.path.parent / store.sources[int(store.placement(split).sources[0])].name
    with h5py.File(segment) as f:
        return segment, f[split]["features"].id.get_chunk_info(0).byte_offset


def test_a_flipped_vector_is_refused_by_readers_and_repaired_by_verify(clean, tmp_path, capsys):
    data, clean_cache = clean
    cache = tmp_path / "cache"
    shutil.copytree(clean_cache, cache)
    segment, offset = _vectors_at(cache)
    _flip(segment, offset + 4 * 1280 * 3 + 2, bit=6)
    result = run_cli_process("train-head", "--cache", cache, *LITE)
    assert result.returncode == 2 and "damaged" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert extract(settings(data, cache)).up_to_date  # a no-op reads no vectors: only --verify reads them all
    repaired = extract(settings(data, cache, verify=True))
    assert repaired.repaired == 80 and repaired.extracted == 80  # the damaged HDF5 chunk: every train row in it
    assert_same_vectors(snapshot(cache), snapshot(clean_cache))
    assert run_cli("train-head", "--cache", cache, *LITE, "--epochs", "1") == 0


def test_a_stored_vector_that_fails_its_checksum_while_compacted_is_redone(clean, tmp_path, monkeypatch):
    """An append leaves stored vectors where they are; compaction copies them, and a damaged one is extracted again."""
    data, clean_cache = clean
    cache = tmp_path / "cache"
    shutil.copytree(clean_cache, cache)
    _flip(*(lambda segment, offset: (segment, offset + 7))(*_vectors_at(cache, "test")), bit=3)
    monkeypatch.setattr(extract_module, "MAX_SEGMENTS", 1)  # compact at every update
    Image.new("RGB", (40, 32), (250, 250, 250)).save(data / "train" / "cat" / "added.png")
    try:
        summary = extract(settings(data, cache))
    finally:
        (data / "train" / "cat" / "added.png").unlink()
    assert summary.repaired == 20 and summary.extracted == 21
    with FeatureStore(features_file(cache / "efficientnet_lite0")) as store:
        assert len(store.sources) == 1  # compacted into one segment
    clean_vectors, vectors = snapshot(clean_cache), snapshot(cache)
    assert_same_vectors({"test": vectors["test"]}, {"test": clean_vectors["test"]})


def test_an_append_writes_only_the_new_vectors_and_compaction_keeps_the_segments_few(tmp_path, monkeypatch):
    data = make_images(tmp_path / "data", {"train": 6, "test": 2})
    cache = tmp_path / "cache"
    extract(settings(data, cache))
    folder = cache / "efficientnet_lite0"
    first = {p.name: p.stat().st_mtime_ns for p in folder.glob("features.seg-*.h5")}
    shutil.copy(data / "train" / "cat" / "cat0.png", data / "train" / "cat" / "added.png")
    assert extract(settings(data, cache)).extracted == 1
    segments = {p.name: p.stat().st_mtime_ns for p in folder.glob("features.seg-*.h5")}
    assert len(segments) == 2 and all(segments[name] == stamp for name, stamp in first.items())  # old segment untouched
    with FeatureStore(features_file(folder)) as store:
        new = store.sources[-1]
        assert new.rows == {"train": 1, "test": 0}
    reference = snapshot(cache)
    (data / "train" / "cat" / "added.png").unlink()
    extract(settings(data, cache))
    assert len(list(folder.glob("features.seg-*.h5"))) == 1  # a segment no row reads is removed
    monkeypatch.setattr(extract_module, "MAX_SEGMENTS", 2)
    for i in range(3):
        shutil.copy(data / "train" / "dog" / "dog0.png", data / "train" / "dog" / f"more{i}.png")
        extract(settings(data, cache))
    segments = {p.name: p.stat().st_mtime_ns for p in folder.glob("features.seg-*.h5")}
    assert len(segments) == 2 and all(segments[name] == stamp for name, stamp in first.items())  # the small ones merged
    with FeatureStore(features_file(folder)) as store:
        assert store.sources[-1].rows == {"train": 3, "test": 0}
    vectors = snapshot(cache)
    for key, vector in reference["train"].items():
        if key[0] != "train/cat/added.png":
            np.testing.assert_array_equal(vectors["train"][key], vector)


def test_random_byte_flips_are_refused_or_harmless_never_silent(clean, tmp_path):
    """300 flips anywhere in the index file or its segment: opening and reading everything either raises UserError or
    gives the original content exactly."""
    _, clean_cache = clean
    reference = snapshot(clean_cache)
    files = sorted((clean_cache / "efficientnet_lite0").glob("features*.h5"))  # the index and its segment
    rng = np.random.default_rng(0)
    outcomes = {"refused": 0, "same": 0}
    for trial in range(300):
        shutil.rmtree(tmp_path / "efficientnet_lite0", ignore_errors=True)
        shutil.copytree(clean_cache / "efficientnet_lite0", tmp_path / "efficientnet_lite0")
        original = files[trial % len(files)]
        offset, bit = int(rng.integers(0, original.stat().st_size)), int(rng.integers(0, 8))
        _flip(tmp_path / "efficientnet_lite0" / original.name, offset, bit)
        try:
            content = snapshot(tmp_path)
        except UserError:
            outcomes["refused"] += 1
            continue
        assert content.keys() == reference.keys(), offset
        for split in content:
            assert list(content[split]) == list(reference[split]), offset
            np.testing.assert_array_equal(np.stack(list(content[split].values())), np.stack(list(reference[split].values())))
        outcomes["same"] += 1
    assert outcomes["refused"] > 0 and sum(outcomes.values()) == 300


def test_after_random_flips_features_rebuilds_and_stage_two_refuses_in_one_line(clean, tmp_path):
    data, clean_cache = clean
    rng = np.random.default_rng(1)
    for trial in range(4):
        cache = tmp_path / f"cache{trial}"
        shutil.copytree(clean_cache, cache)
        target = features_file(cache / "efficientnet_lite0")
        _flip(target, int(rng.integers(0, 4096)), int(rng.integers(0, 8)))  # the superblock and the index
        stage_two = run_cli_process("train-head", "--cache", cache, *LITE, "--epochs", "1")
        assert stage_two.returncode in (0, 2) and "Traceback" not in stage_two.stderr
        assert stage_two.returncode == 0 or len(stage_two.stderr.strip().splitlines()) == 1
        summary = extract(settings(data, cache))
        assert_same_vectors(snapshot(cache), snapshot(clean_cache))
        assert summary.up_to_date or summary.extracted in (0, 100), summary


def test_a_chunk_with_a_bad_crc_is_redone(clean, tmp_path):
    data, clean_cache = clean
    cache = tmp_path / "cache"
    args = ["features", "--data", data, "--cache", cache, *LITE, "--batch-size", "4", "--chunk-size", "8", "--workers", "0"]
    _kill_at("chunk-after-rename:3", args)
    chunk = sorted((cache / "efficientnet_lite0" / "features.partial").glob("*/chunk-000001.npz"))[0]
    _flip(chunk, chunk.stat().st_size // 2)
    summary = extract(settings(data, cache, chunk_size=8, batch_size=4, workers=0))
    assert summary.resumed == 16 and summary.extracted == 84
    assert_same_vectors(snapshot(cache), snapshot(clean_cache))


# -- odd inputs: names, moved data, in-place edits, empty splits, a folder where the file should be ---------------

def test_names_with_invalid_utf8_and_hash_signs_are_stored_as_they_are(tmp_path):
    data = make_images(tmp_path / "data", {"train": 3, "test": 1})
    cat = data / "train" / "cat"
    odd = [os.fsencode(cat) + b"/caf\xe9.png", os.fsencode(cat / "cat0.png#aug0.png"), os.fsencode(cat / "photo #august.png")]
    for name in odd:
        shutil.copy(cat / "cat0.png", os.fsdecode(name))
    (cat / "trip#aug").mkdir()
    shutil.copy(cat / "cat1.png", cat / "trip#aug" / "x.png")
    summary = extract(settings(data, tmp_path / "cache"))
    assert summary.skipped == [] and summary.images["train"] == 10
    paths = snapshot(tmp_path / "cache")["train"]
    expected = {os.fsdecode(n).split("/data/", 1)[1] for n in odd} | {"train/cat/trip#aug/x.png"}
    assert {(p, -1) for p in expected} <= set(paths)
    np.testing.assert_allclose(paths[("train/cat/cat0.png#aug0.png", -1)], paths[("train/cat/cat0.png", -1)], rtol=1e-5, atol=1e-6)
    assert shown("train/cat/caf\udce9.png") == "train/cat/caf\\xe9.png"  # how summaries and reports print it
    assert extract(settings(data, tmp_path / "cache")).up_to_date


def test_a_moved_dataset_keeps_its_vectors_and_records_the_new_root(clean, tmp_path):
    data, clean_cache = clean
    cache = tmp_path / "cache"
    shutil.copytree(clean_cache, cache)
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)  # copy2: same sizes and mtimes, like cp -a
    summary = extract(settings(moved, cache))
    assert summary.extracted == 0 and summary.reused == 100 and not summary.up_to_date
    with FeatureStore(features_file(cache / "efficientnet_lite0")) as store:
        assert store.attrs["data_root"] == str(moved.resolve())
    assert run_cli("train-head", "--data", moved, "--cache", cache, *LITE, "--epochs", "1") == 0
    assert extract(settings(moved, cache)).up_to_date


def test_an_edit_that_keeps_size_and_mtime_is_found_by_verify(tmp_path, tiny_data):
    cache = tmp_path / "cache"
    image = tiny_data / "train" / "dog" / "fixed.bmp"  # uncompressed: new pixels, same size
    Image.new("RGB", (40, 32), (40, 60, 200)).save(image)
    extract(settings(tiny_data, cache))
    stamp = image.stat()
    Image.new("RGB", (40, 32), (200, 60, 40)).save(image)
    os.utime(image, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert image.stat().st_size == stamp.st_size
    before = snapshot(cache)["train"][("train/dog/fixed.bmp", -1)]
    assert extract(settings(tiny_data, cache)).up_to_date  # documented: size and mtime alone cannot see it
    verified = extract(settings(tiny_data, cache, verify=True))
    assert verified.repaired == 1 and verified.extracted == 1
    assert not np.allclose(snapshot(cache)["train"][("train/dog/fixed.bmp", -1)], before)


def test_a_split_whose_images_are_all_bad_is_stored_empty(tmp_path):
    data = make_images(tmp_path / "data", {"train": 3})
    (data / "test" / "cat").mkdir(parents=True)
    (data / "test" / "cat" / "bad.jpg").write_bytes(b"not a jpeg")
    summary = extract(settings(data, tmp_path / "cache"))
    assert summary.images == {"train": 6, "test": 0} and [s.path for s in summary.skipped] == ["test/cat/bad.jpg"]
    assert extract(settings(data, tmp_path / "cache")).up_to_date


def test_a_test_split_without_class_folders_is_refused_before_any_work(tmp_path):
    data = make_images(tmp_path / "data", {"train": 3})
    (data / "test").mkdir()
    with pytest.raises(UserError, match="test has no images"):
        extract(settings(data, tmp_path / "cache"))
    assert not (tmp_path / "cache").exists()


def test_a_folder_where_the_feature_file_should_be_is_refused_before_any_work(tmp_path, tiny_data):
    features_file(tmp_path / "cache" / "efficientnet_lite0").mkdir(parents=True)
    with pytest.raises(UserError, match="is not a regular file"):
        extract(settings(tiny_data, tmp_path / "cache"))
    assert not (tmp_path / "cache" / "efficientnet_lite0" / "features.partial").exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 700 KiB tmpfs: big enough for the chunks, too small for the assembled file beside them."""
    with tmpfs(tmp_path / "small-disk", 700 * 1024) as mount:
        yield mount


def test_a_disk_that_fills_during_assembly_is_one_line_and_leaves_no_temporary(clean, small_disk):
    data, _ = clean
    result = subprocess.run([sys.executable, "-m", "pipeline", "features", "--data", str(data), "--cache", str(small_disk),
                             *LITE, "--chunk-size", "8", *EXACT], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "disk full" in result.stderr and "Traceback" not in result.stderr
    assert not list(small_disk.rglob("*.tmp")) and not (small_disk / "efficientnet_lite0" / "features.h5").exists()


def test_a_class_folder_whose_name_is_not_utf8_is_refused_up_front(tmp_path):
    data = make_images(tmp_path / "data", {"train": 2, "test": 1})
    os.rename(os.fsencode(data / "train" / "cat"), os.fsencode(data / "train") + b"/ch\xe2t")
    with pytest.raises(UserError, match="not a printable UTF-8 name"):
        scan_dataset(data)


def test_predictions_of_files_named_in_other_encodings_print_as_escapes_in_every_format():
    predictions = [Prediction("photos/caf\udce9.png", [("cat", 0.9)]), Prediction("photos/\udcff\n.jpg", skipped="empty file")]
    assert render(predictions, "csv", 1).splitlines()[1:] == ["photos/caf\\xe9.png,cat,0.900000,", "photos/\\xff\\n.jpg,,,empty file"]
    assert render(predictions, "text", 1).splitlines()[0].startswith("photos/caf\\xe9.png")
    assert [p["path"] for p in json.loads(render(predictions, "json", 1))] == ["photos/caf\\xe9.png", "photos/\\xff\\n.jpg"]


def test_a_bad_image_is_listed_once_however_many_views_are_cached(tmp_path):
    data = make_images(tmp_path / "data", {"train": 3, "test": 1})
    (data / "train" / "cat" / "zz.png").write_bytes(b"junk")
    summary = extract(settings(data, tmp_path / "cache", augment=3))
    assert [record.path for record in summary.skipped] == ["train/cat/zz.png"]
    assert summary.images == {"train": 6, "test": 2, "train_aug": 18}
    assert extract(settings(data, tmp_path / "cache", augment=3)).up_to_date  # its views are not retried either


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    data = make_images(root / "data", {"train": 6, "test": 2})
    extract(settings(data, root / "cache"))
    assert run_cli("train-head", "--cache", root / "cache", *LITE, "--epochs", "2") == 0
    return root / "cache"


def test_an_edited_model_file_is_refused_not_read_as_other_numbers(trained, tmp_path):
    from pipeline.report import build_metrics

    for name, edit in (("logreg.json", lambda text: text.replace('"coef": [[', '"coef": [[9', 1)),
                       ("training.json", lambda text: text.replace('"seed": 0', '"seed": 1', 1))):
        cache = tmp_path / name
        shutil.copytree(trained, cache)
        file = run_folder(cache) / name
        file.write_text(edit(file.read_text()))
        with pytest.raises(UserError, match="run `make train-head.*` again"):
            build_metrics(settings(None, cache))


def test_a_killed_train_head_never_leaves_a_mix_of_two_runs(trained, tmp_path):
    from pipeline.report import build_metrics

    cache = tmp_path / "cache"
    shutil.copytree(trained, cache)
    run = run_folder(cache).name
    # a new run killed while writing is never read: the complete one is still the one chosen
    _kill_at("file-after-rename:1", ["train-head", "--cache", cache, *LITE, "--epochs", "2", "--seed", "3"])
    assert (run_folder(cache).name, build_metrics(settings(None, cache))["run"]["name"]) == (run, run)
    # the same run retrained (other settings) and killed between its files: refused, never mixed
    _kill_at("file-after-rename:1", ["train-head", "--cache", cache, *LITE, "--epochs", "2", "--seed", "3", "--run", run])
    with pytest.raises(UserError, match="not the one the last completed train-head wrote"):
        build_metrics(settings(None, cache))
    assert run_cli("train-head", "--cache", cache, *LITE, "--epochs", "2") == 0
    assert build_metrics(settings(None, cache))["n_test"] == 4
