"""What a practitioner looks at and uses: report.html in a real browser, and `predict` on new images."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli, run_cli_process
from pipeline.report import evaluate

LITE = ("--backbone", "efficientnet_lite0")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Tiny data through all three stages, with a few mislabelled test images so there are errors to show."""
    from conftest import make_images

    root = tmp_path_factory.mktemp("trained")
    data = make_images(root / "data", {"train": 12, "test": 5})
    for i in (0, 1):
        shutil.move(data / f"test/cat/cat{i}.png", data / f"test/dog/moved-cat{i}.png")
    cache = root / "cache"
    assert run_cli("features", "--data", data, "--cache", cache, *LITE) == 0
    assert run_cli("train-head", "--cache", cache, *LITE, "--epochs", "5") == 0
    assert run_cli("report", "--cache", cache, *LITE) == 0
    return data, cache, cache / "efficientnet_lite0"


def test_report_writes_pictures_and_lists_the_confidently_wrong(trained):
    _, _, folder = trained
    metrics = json.loads((folder / "metrics.json").read_text())
    assert set(metrics["figures"]) == {"learning_curves", "embedding", "top_losses_head", "top_losses_logreg", "confusion"}
    for name in metrics["figures"].values():
        with Image.open(folder / name) as image:
            assert image.format == "PNG" and image.width > 300
    wrong = metrics["head"]["most_confidently_wrong"]
    assert {w["path"] for w in wrong} == {"test/dog/moved-cat0.png", "test/dog/moved-cat1.png"}
    assert all(w["true"] == "dog" and w["predicted"] == "cat" for w in wrong)
    page = (folder / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 5 and "file://" not in page and "http" not in page.split("<style>")[0]
    rows = {r["path"]: r for r in csv.DictReader(io.StringIO((folder / metrics["test_predictions"]).read_text()))}
    assert len(rows) == metrics["n_test"] == 10
    assert rows["test/dog/moved-cat0.png"]["true"] == "dog" and rows["test/dog/moved-cat0.png"]["head_prediction"] == "cat"


def headless_chromium(profile: Path) -> list[str]:
    """The command line of a headless Chromium that reaches no network; skips without one (fails under CI=true)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is missing; .ci/run installs Debian's chromium package")
        pytest.skip("chromium not installed (apt-get install chromium)")
    return [found, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}"]


def test_report_html_loads_with_all_its_images_in_headless_chromium(trained, tmp_path):
    flags = headless_chromium(tmp_path / "profile")
    page = (trained[2] / "report.html").as_uri()
    dom = subprocess.run([*flags, "--virtual-time-budget=5000", "--dump-dom", page], capture_output=True, text=True, timeout=120)
    assert 'data-images-total="5"' in dom.stdout and 'data-images-loaded="5"' in dom.stdout, dom.stderr[-2000:]
    shot = tmp_path / "report.png"
    subprocess.run([*flags, "--window-size=1200,3000", f"--screenshot={shot}", page], capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.shape == (3000, 1200) and pixels.std() > 20  # a rendered page, not a blank one


@pytest.mark.slow  # fresh processes: the CLI as users run it
def test_predict_classifies_files_and_folders_in_every_format(trained):
    data, cache, _ = trained
    common = ["--cache", cache, *LITE]
    text = run_cli_process("predict", data / "test/cat", data / "test/dog/dog0.png", *common)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.strip().splitlines()
    assert len(lines) == 4 and all(" cat " in line for line in lines[:3]) and " dog " in lines[3]
    table = run_cli_process("predict", data / "test", *common, "--format", "csv", "--top-k", "2", "--model", "logreg")
    rows = list(csv.DictReader(io.StringIO(table.stdout)))
    assert list(rows[0])[:3] == ["path", "prediction", "probability"] and len(rows) == 10
    assert all(abs(float(r["probability"]) + float(r["probability2"]) - 1) < 1e-6 for r in rows)
    listed = json.loads(run_cli_process("predict", data / "test/dog", *common, "--format", "json").stdout)
    assert [(p["path"].rsplit("/", 1)[1], p["prediction"]) for p in listed][-3:] == [
        ("dog4.png", "dog"), ("moved-cat0.png", "cat"), ("moved-cat1.png", "cat")]


@pytest.mark.slow  # fresh processes: the CLI as users run it
def test_predict_reports_bad_images_and_refuses_a_foreign_head(trained, tmp_path):
    data, cache, _ = trained
    (tmp_path / "broken.jpg").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    Image.new("RGB", (40, 30), (200, 60, 40)).save(tmp_path / "ok.png")
    result = run_cli_process("predict", tmp_path, "--cache", cache, *LITE, "--format", "csv")
    assert result.returncode == 0
    rows = {r["path"].rsplit("/", 1)[1]: r for r in csv.DictReader(io.StringIO(result.stdout))}
    assert rows["broken.jpg"]["skipped"].startswith("empty file") and rows["notes.txt"]["skipped"]
    assert rows["ok.png"]["prediction"] == "cat"
    assert "skipped" in result.stderr
    foreign = run_cli_process("predict", tmp_path / "ok.png", "--cache", cache, "--backbone", "densenet121")
    assert foreign.returncode == 2 and "no trained head" in foreign.stderr
    weights = tmp_path / "other.pth"
    from pipeline.backbones import get_backbone
    import torch
    torch.save(get_backbone("efficientnet_lite0").build().state_dict(), weights)
    other = run_cli_process("predict", tmp_path / "ok.png", "--cache", cache, *LITE, "--weights", weights)
    assert other.returncode == 2 and "trained on vectors from weights" in other.stderr


def test_augmented_views_are_cached_incrementally_and_reported(tmp_path, tiny_data, capsys):
    cache = tmp_path / "cache"
    assert run_cli("features", "--data", tiny_data, "--cache", cache, *LITE, "--augment", "2") == 0
    assert "68 vectors (20 train, 8 test, 40 train_aug)" in capsys.readouterr().out
    from pipeline.store import FeatureStore
    with FeatureStore(cache / "efficientnet_lite0/features.h5") as store:
        views = list(zip(store.paths("train_aug"), store.index("train_aug").views.tolist()))
        plain = store.features("train")[0]
        first_views = store.features("train_aug")[:2]
        assert views[:2] == [("train/cat/cat0.png", 0), ("train/cat/cat0.png", 1)] and store.splits == ["train", "test", "train_aug"]
    assert not np.allclose(first_views[0], plain) and not np.allclose(first_views[0], first_views[1])
    assert run_cli("features", "--data", tiny_data, "--cache", cache, *LITE, "--augment", "3") == 0
    assert "extracted 20 " in capsys.readouterr().out  # only the third view of each train image
    with FeatureStore(cache / "efficientnet_lite0/features.h5") as store:
        np.testing.assert_array_equal(store.features("train_aug")[0], first_views[0])  # views are seeded: same crop again
    assert run_cli("train-head", "--cache", cache, *LITE, "--epochs", "2") == 0
    assert run_cli("report", "--cache", cache, *LITE) == 0
    metrics = json.loads((cache / "efficientnet_lite0/metrics.json").read_text())
    augmented = metrics["head_augmented"]
    assert augmented["views_per_image"] == 3 and augmented["n_views"] == 3 * metrics["n_train"]
    assert 0 <= augmented["test_accuracy"] <= 1 and augmented["augment_seconds"] > 0
    assert "Augmentation: head trained with 3 cached augmented views" in (cache / "efficientnet_lite0/report.md").read_text()


@pytest.mark.slow  # fresh processes: the CLI as users run it
def test_compare_runs_each_backbone_and_reports_unavailable_ones(tmp_path, tiny_data):
    result = run_cli_process("compare", "--data", tiny_data, "--cache", tmp_path / "cache", "--epochs", "2",
                             "--backbones", "efficientnet_lite0 efficientnet_lite1 densenet121",
                             env={"TORCH_HOME": str(tmp_path / "torch"), "HTTPS_PROXY": "http://127.0.0.1:9",
                                  "https_proxy": "http://127.0.0.1:9"})
    assert result.returncode == 0, result.stderr
    rows = {r["backbone"]: r for r in json.loads((tmp_path / "cache/compare.json").read_text())}
    for name in ("efficientnet_lite0", "efficientnet_lite1"):
        assert rows[name]["feature_dim"] == 1280 and rows[name]["head_test_accuracy"] == 1.0 and rows[name]["extraction_img_s"] > 0
    assert "cannot download densenet121 weights" in rows["densenet121"]["error"]
    table = (tmp_path / "cache/compare.md").read_text()
    assert "| efficientnet_lite1 | 1280 |" in table and "| densenet121 | | | unavailable" in table
    again = run_cli_process("compare", "--data", tiny_data, "--cache", tmp_path / "cache", "--epochs", "2",
                            "--backbones", "efficientnet_lite0")
    assert "features: up to date" in again.stdout
    cached = json.loads((tmp_path / "cache/compare.json").read_text())[0]
    assert cached["extraction_img_s"] == rows["efficientnet_lite0"]["extraction_img_s"]  # the rate of the run that made it


def test_evaluating_a_test_split_of_one_class_warns_of_nothing():
    """A small test split may hold one class, or predictions of classes it lacks: expected, not worth a warning."""
    proba = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.8, 0.1, 0.1]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores = evaluate(proba[[0, 2]], np.array([0, 0]), ["a", "b", "c"], seed=0)
        assert scores["balanced_accuracy"] == 1.0
        assert evaluate(proba, np.array([0, 0, 0]), ["a", "b", "c"], seed=0)["balanced_accuracy"] == pytest.approx(2 / 3)
