"""The no-op record: an unchanged dataset is answered from a stat per file, and any change goes the full way."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, make_images, run_cli_process
from pipeline.config import Settings
from pipeline.extract import extract
from pipeline.freshness import RECORD_NAME, Duplicates, ExtractSummary, bring_up_to_date, fresh_summary, record_file
from pipeline.listing import scan_dataset


@pytest.fixture
def cached(tmp_path, tiny_data) -> Settings:
    """Settings whose feature file is complete, with its record."""
    settings = Settings(data=tiny_data, cache=tmp_path / "cache", backbone="efficientnet_lite0")
    extract(settings)
    return settings


def fields(summary) -> tuple:
    return summary.path, summary.images, summary.reused, summary.skipped, summary.size_bytes, summary.up_to_date


def test_an_unchanged_dataset_is_answered_by_the_record_with_the_full_summary(cached):
    (cached.data / "train/cat/broken.png").write_bytes(b"not a png")
    full = extract(cached)  # the broken file is recorded as skipped, then the record describes the result
    assert not full.up_to_date and [s.path for s in full.skipped] == ["train/cat/broken.png"]
    again = extract(cached)  # the store's own no-op path
    fresh = fresh_summary(cached, scan_dataset(cached.data))
    assert fresh is not None and fields(fresh) == fields(again)
    assert fresh.images == {"train": 20, "test": 8} and fresh.reused == 29


def _touch(settings: Settings) -> None:
    image = settings.data / "train/cat/cat0.png"
    st = image.stat()
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 1))


def _rename(settings: Settings) -> None:
    (settings.data / "test/dog/dog0.png").rename(settings.data / "test/dog/moved.png")


def _new_class(settings: Settings) -> None:
    make_images(settings.data, {"train": 1, "test": 1}, classes=("bird",))


def _replace_store(settings: Settings) -> None:
    store = settings.backbone_dir() / "features.h5"
    store.write_bytes(store.read_bytes())  # same bytes, another inode and mtime


def _damage_record(settings: Settings) -> None:
    record = record_file(settings)
    record.write_text(record.read_text()[:-5])


def _other_record(settings: Settings) -> None:
    record = record_file(settings)
    raw = json.loads(record.read_text())
    raw["key"]["listing"] = "0" * 32
    record.write_text(json.dumps(raw))


@pytest.mark.parametrize("change", [_touch, _rename, _new_class, _replace_store, _damage_record, _other_record])
def test_any_change_to_the_images_the_store_or_the_record_goes_the_full_way(cached, change):
    assert fresh_summary(cached, scan_dataset(cached.data)) is not None
    change(cached)
    assert fresh_summary(cached, scan_dataset(cached.data)) is None


@pytest.mark.parametrize("setting", [{"precision": "bf16"}, {"storage": "float16"}, {"augment": 1}, {"force": True},
                                     {"verify": True}, {"device": "cpu"}])
def test_other_settings_go_the_full_way(cached, setting):
    assert fresh_summary(dataclasses.replace(cached, **setting), scan_dataset(cached.data)) is None


def test_settings_that_cannot_change_a_vector_keep_the_record(cached):
    other = dataclasses.replace(cached, batch_size=3, workers=0, chunk_size=5, seed=7, epochs=2)
    assert fresh_summary(other, scan_dataset(cached.data)) is not None


def test_a_weights_file_is_judged_by_its_stamp(tmp_path, cached):
    import torch

    from pipeline.backbones import get_backbone

    weights = tmp_path / "lite0.pth"
    torch.save(get_backbone("efficientnet_lite0").build().state_dict(), weights)
    with_weights = dataclasses.replace(cached, weights=weights)
    assert fresh_summary(with_weights, scan_dataset(cached.data)) is None
    extract(with_weights)
    assert fresh_summary(with_weights, scan_dataset(cached.data)) is not None
    weights.write_bytes(weights.read_bytes())
    assert fresh_summary(with_weights, scan_dataset(cached.data)) is None


def test_under_torchrun_the_record_is_not_used(cached, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert fresh_summary(cached, scan_dataset(cached.data)) is None


@pytest.mark.slow  # fault injection
def test_a_killed_update_leaves_no_record(cached):
    _new_class(cached)
    result = run_cli_process("features", "--data", cached.data, "--cache", cached.cache, "--backbone", cached.backbone,
                             env={"PIPELINE_KILL_AT": "assembly"})
    assert result.returncode == -9
    assert not record_file(cached).exists()
    summary = bring_up_to_date(cached)  # the full way, which finishes the job and writes the record again
    assert not summary.up_to_date and summary.images == {"train": 21, "test": 9}
    assert (cached.backbone_dir() / RECORD_NAME).exists() and bring_up_to_date(cached).up_to_date


def test_an_up_to_date_command_never_imports_torch(cached):
    code = ("import sys; from pipeline.cli import main; "
            f"code = main(['features', '--data', {str(cached.data)!r}, '--cache', {str(cached.cache)!r}, "
            f"'--backbone', {cached.backbone!r}]); "
            "print(sorted(m for m in ('torch', 'torchvision', 'h5py', 'sklearn', 'matplotlib') if m in sys.modules)); "
            "sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "features: up to date" in result.stdout and result.stdout.strip().endswith("[]")


@pytest.mark.slow  # a fresh process: the import is counted only where it happens
def test_a_run_with_work_counts_its_import_of_torch_in_its_seconds_and_leaves_the_collector_on(cached):
    (cached.data / "train/cat/added.png").write_bytes((cached.data / "train/dog/dog0.png").read_bytes())
    code = ("import gc, json; from pathlib import Path; from pipeline.config import Settings; "
            "from pipeline.freshness import bring_up_to_date; "
            f"s = bring_up_to_date(Settings(data=Path({str(cached.data)!r}), cache=Path({str(cached.cache)!r}), "
            f"backbone={cached.backbone!r})); "
            "print(json.dumps([s.extracted, s.import_seconds, s.seconds, gc.isenabled()]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    extracted, imported, seconds, collecting = json.loads(result.stdout.splitlines()[-1])
    assert extracted == 1 and 0 < imported < seconds and collecting


def test_the_bench_reads_back_the_seconds_and_the_import_from_the_summary_line(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    from scale import in_run_seconds

    summary = ExtractSummary(tmp_path / "features.h5", {"train": 3}, extracted=3, seconds=4.31, backbone_seconds=0.2,
                             import_seconds=2.64)
    assert in_run_seconds(summary.line()) == (4.3, 2.6)
    assert in_run_seconds(dataclasses.replace(summary, import_seconds=0.0).line()) == (4.3, 0.0)
    up_to_date = ExtractSummary(tmp_path / "features.h5", {"train": 3}, reused=3, seconds=0.4349, up_to_date=True)
    assert in_run_seconds(up_to_date.line()) == (0.43, 0.0)  # below a second, hundredths


def test_identical_files_across_splits_and_classes_are_found_and_remembered(cached):
    import shutil

    shutil.copy(cached.data / "train/cat/cat1.png", cached.data / "test/cat/copy.png")
    shutil.copy(cached.data / "train/cat/cat2.png", cached.data / "train/dog/mislabelled.png")
    summary = extract(cached)
    assert (summary.duplicates.test_in_train, summary.duplicates.across_classes) == (1, 1)
    assert set(summary.duplicates.examples) == {"test/cat/copy.png = train/cat/cat1.png",
                                                "train/cat/cat2.png = train/dog/mislabelled.png"}
    fresh = fresh_summary(cached, scan_dataset(cached.data))
    assert fresh is not None and fresh.duplicates == summary.duplicates


def test_distinct_images_have_no_duplicates(cached):
    assert extract(cached).duplicates == Duplicates() and Duplicates().lines() == []
