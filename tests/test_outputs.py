"""Outputs under hostile conditions: a full disk, a read-only cache, one or no test vectors, nothing to predict."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pipeline.files
from conftest import make_images, run_cli, run_cli_process, tmpfs
from pipeline import plots
from pipeline.compare import compare
from pipeline.config import Settings
from pipeline.errors import UserError
from pipeline.head import HeadClassifier
from pipeline.predict import predict, render

LITE = ("--backbone", "efficientnet_lite0")
RUN = "runs/lr0.003-hidden256-dropout0.2-seed0"  # the run train-head names after the default settings
TRAIN_OUTPUTS = (f"{RUN}/head.pt", f"{RUN}/logreg.json", f"{RUN}/training.json")
REPORT_OUTPUTS = ("metrics.json", "report.md", "report.html", "learning_curves.png", "embedding.png", "confusion.png",
                  "top_losses_head.png", "top_losses_logreg.png")
PAGE = 4096


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """Features, head and report made from data whose test split holds a single image."""
    root = tmp_path_factory.mktemp("outputs")
    data = make_images(root / "data", {"train": 6, "test": 1}, seed=1)
    shutil.rmtree(data / "test/dog")
    cache = root / "cache"
    assert run_cli("features", "--data", data, "--cache", cache, *LITE) == 0
    assert run_cli("train-head", "--cache", cache, *LITE, "--epochs", "2") == 0
    assert run_cli("report", "--cache", cache, *LITE) == 0
    return data, cache / "efficientnet_lite0"


def _copy_cache(folder: Path, cache: Path) -> Path:
    """A copy of a trained backbone folder at ``cache/<backbone>``."""
    return Path(shutil.copytree(folder, cache / folder.name, dirs_exist_ok=True))


def _contents(folder: Path, names: tuple[str, ...]) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in names}


class _FillingFile:
    """A file that accepts the bytes left on its ``DiskFull``, then fails with ENOSPC having written part of them."""

    def __init__(self, file, disk: DiskFull):
        self._file, self._disk = file, disk

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        accepted = min(len(data), self._disk.room)
        self._file.write(data[:accepted])
        self._disk.room -= accepted
        if accepted < len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return accepted

    def __getattr__(self, name: str):
        return getattr(self._file, name)

    def __enter__(self) -> _FillingFile:
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()


class DiskFull:
    """Replaces ``open`` in pipeline.files: every file written there shares ``room`` bytes, like a filling disk."""

    def __init__(self, room: int):
        self.room = room

    def open(self, path, mode: str = "r", *args, **kwargs):
        return _FillingFile(open(path, mode, *args, **kwargs), self)


def _pages(folder: Path) -> int:
    return sum(math.ceil(p.stat().st_size / PAGE) * PAGE for p in folder.rglob("*"))


def _assert_unchanged(folder: Path, before: dict[str, bytes]) -> None:
    assert _contents(folder, tuple(before)) == before
    assert not list(folder.rglob("*.tmp"))


@pytest.mark.parametrize("command, flags, outputs", [("train-head", ("--epochs", "2"), TRAIN_OUTPUTS),
                                                     ("report", (), REPORT_OUTPUTS)])
def test_a_disk_filling_up_midway_leaves_the_previous_outputs(trained, tmp_path, monkeypatch, capsys, command, flags, outputs):
    folder = _copy_cache(trained[1], tmp_path / "cache")
    before = _contents(folder, outputs)
    disk = DiskFull(room=3000)
    monkeypatch.setattr(pipeline.files, "open", disk.open, raising=False)
    assert run_cli(command, "--cache", tmp_path / "cache", *LITE, *flags) == 2 and disk.room == 0
    assert f"disk full while writing {folder}" in capsys.readouterr().err
    _assert_unchanged(folder, before)
    head, _ = HeadClassifier.load(folder / RUN / "head.pt")
    assert head.n_classes_ == 2


@pytest.mark.slow  # fresh processes: the CLI as users run it
def test_a_full_tmpfs_is_one_line_and_keeps_the_previous_head_and_report(trained, tmp_path):
    outputs = TRAIN_OUTPUTS + REPORT_OUTPUTS
    size = _pages(trained[1]) + 2 * PAGE
    with tmpfs(tmp_path / "cache" / trained[1].name, size) as folder:
        _copy_cache(trained[1], tmp_path / "cache")
        before = _contents(folder, outputs)
        for command in ("train-head", "report"):
            result = run_cli_process(command, "--cache", tmp_path / "cache", *LITE)
            assert result.returncode == 2 and "Traceback" not in result.stderr
            assert result.stderr.strip().splitlines() == [
                f"error: disk full while writing {folder}; free space and run `make {command}` again"]
            _assert_unchanged(folder, before)
        head, checkpoint = HeadClassifier.load(folder / RUN / "head.pt")
        assert checkpoint["backbone"] == "efficientnet_lite0" and head.n_classes_ == 2


def test_a_read_only_cache_is_refused_before_any_training_or_plotting(trained, tmp_path, monkeypatch, capsys):
    def no_work(*args, **kwargs):
        raise AssertionError("work started on a read-only folder")

    monkeypatch.setattr(HeadClassifier, "fit", no_work)
    monkeypatch.setattr(plots, "learning_curves", no_work)
    with tmpfs(tmp_path / "cache" / trained[1].name, 64 * 1024 * 1024) as folder:
        _copy_cache(trained[1], tmp_path / "cache")
        before = _contents(folder, TRAIN_OUTPUTS + REPORT_OUTPUTS)
        subprocess.run(["mount", "-o", "remount,ro", folder], check=True)
        for command in ("train-head", "report"):
            assert run_cli(command, "--cache", tmp_path / "cache", *LITE) == 2
            assert f"cannot write to folder {folder}" in capsys.readouterr().err
        _assert_unchanged(folder, before)


def test_a_single_test_image_gets_a_full_report(trained):
    folder = trained[1]
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["n_test"] == 1 and metrics["head"]["per_class"]["cat"]["support"] == 1
    with Image.open(folder / metrics["figures"]["embedding"]) as image:
        assert image.format == "PNG" and image.width > 300


@pytest.mark.parametrize("n, dim", [(0, 16), (1, 16), (2, 16), (3, 16), (3, 1)])
def test_the_embedding_map_draws_what_it_can_from_few_vectors(tmp_path, n, dim):
    features = np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32)
    path = plots.embedding_map(features, np.arange(n) % 2, ["cat", "dog"], tmp_path / "embedding.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 300
    assert not list(tmp_path.glob("*.tmp"))


def test_a_report_without_test_vectors_is_refused(tmp_path, capsys):
    data = make_images(tmp_path / "data", {"train": 3}, seed=2)
    (data / "test/cat").mkdir(parents=True)
    (data / "test/cat/broken.png").write_bytes(b"")
    assert run_cli("features", "--data", data, "--cache", tmp_path / "cache", *LITE) == 0
    assert run_cli("report", "--cache", tmp_path / "cache", *LITE) == 2
    assert "no test vectors in " in capsys.readouterr().err
    assert not (tmp_path / "cache/efficientnet_lite0/metrics.json").exists()


def _never(*args, **kwargs):
    raise AssertionError("the backbone was loaded before the checks")


@pytest.fixture
def lite(trained, monkeypatch) -> Settings:
    """Settings for the trained cache, with loading the backbone forbidden."""
    monkeypatch.setattr(sys.modules["pipeline.predict"], "load_backbone", _never)
    return Settings(cache=trained[1].parent, backbone="efficientnet_lite0")


def test_predict_refuses_bad_choices_before_loading_the_backbone(trained, lite):
    image = trained[0] / "test/cat/cat0.png"
    with pytest.raises(UserError, match="--top-k must be a number at least 1"):
        predict(lite, [image], top_k=0)
    with pytest.raises(UserError, match="--model 'svm' is not one of"):
        predict(lite, [image], model="svm")
    with pytest.raises(UserError, match="--format 'xml' is not one of"):
        render([], "xml", 1)


def test_predict_refuses_inputs_without_images(lite, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes/readme.txt").write_text("x")
    for inputs in ([tmp_path / "empty"], [tmp_path / "empty", tmp_path / "notes"]):
        with pytest.raises(UserError, match="no images found in "):
            predict(lite, inputs)
    assert run_cli("predict", tmp_path / "empty", "--cache", lite.cache, *LITE) == 2
    assert capsys.readouterr().out == ""


def test_predict_refuses_a_damaged_head(trained, tmp_path, monkeypatch):
    folder = _copy_cache(trained[1], tmp_path / "cache")
    head = (folder / RUN / "head.pt").read_bytes()
    (folder / RUN / "head.pt").write_bytes(head[: len(head) // 2])
    monkeypatch.setattr(sys.modules["pipeline.predict"], "load_backbone", _never)
    with pytest.raises(UserError, match="head.pt is not the one the last completed train-head wrote .*; run `make train-head` again"):
        predict(Settings(cache=tmp_path / "cache", backbone="efficientnet_lite0"), [trained[0] / "test/cat/cat0.png"])


def test_compare_refuses_no_backbones_and_keeps_its_tables_when_the_disk_fills(tmp_path, monkeypatch):
    for name in ("compare.md", "compare.json"):
        (tmp_path / name).write_text("previous")
    with pytest.raises(UserError, match="--backbones is empty; pass BACKBONES="):
        compare(Settings(cache=tmp_path, backbones="  "))
    monkeypatch.setattr(pipeline.files, "open", DiskFull(room=10).open, raising=False)
    with pytest.raises(UserError, match="disk full while writing"):
        compare(Settings(cache=tmp_path, backbones="no_such_backbone"))
    assert [(tmp_path / n).read_text() for n in ("compare.md", "compare.json")] == ["previous", "previous"]
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.slow  # fresh process
def test_importing_the_plots_switches_no_matplotlib_backend():
    """A notebook's backend stays its own: the report draws on pyplot-free figures."""
    code = ("import matplotlib; matplotlib.use('svg'); import pipeline.plots, pipeline.report; "
            "print(matplotlib.get_backend())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "svg"
