"""The report at 2, 17 and 103 classes, from feature stores written directly (Gaussian clusters, no backbone)."""

from __future__ import annotations

import contextlib
import csv
import importlib
import io
import json
import os
import subprocess
import warnings
from datetime import datetime, timezone
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binomtest
from PIL import Image
from sklearn.metrics import balanced_accuracy_score

from pipeline import plots
from pipeline.config import Settings
from pipeline.listing import NO_VIEW
from pipeline.report import BOOTSTRAP_RESAMPLES, MOST_CONFUSED, bootstrap_balanced_accuracy, report, wilson_interval
from pipeline.store import ImageKey, SplitIndex, StoreWriter, features_file
from pipeline.train import train
from test_report_and_predict import headless_chromium

pytestmark = pytest.mark.slow  # `make test-fast` leaves it out

BACKBONE = "efficientnet_lite0"
DIM = 64
SUMMARY_LINES_MAX = 15
FIGURE_PIXELS_MAX = (1300, 2000)  # width, height
CLASS_COUNTS = {2: (20, 25), 17: (8, 4), 103: (5, 2)}  # classes: train and test images per class


def class_names(n: int) -> list[str]:
    """Names of varied length, some long, as real data sets have."""
    return [f"c{i:03d}" + (" giant white arum lily" if i % 7 == 3 else "") for i in range(n)]


def write_store(root: Path, n_classes: int, train_per_class: int, test_per_class: int, images: bool = True) -> Settings:
    """A complete feature store of Gaussian clusters; classes come in pairs with nearby centres, so there are errors.

    The first test image's name is not UTF-8. With ``images``, tiny PNGs lie at every test path under the data root;
    without, no thumbnail can be shown."""
    rng = np.random.default_rng(n_classes)
    classes = class_names(n_classes)
    centres = rng.normal(0, 1.5, (n_classes, DIM))
    centres[1::2] = centres[0:n_classes - 1:2] + rng.normal(0, 0.35, centres[1::2].shape)
    data, folder = root / "data", root / "cache" / BACKBONE
    folder.mkdir(parents=True)
    versions = {"torch": "2.0-test", "torchvision": "0.1-test", "pillow": "1.0-test"}
    fingerprint = {"backbone": BACKBONE, "weights": "packaged", "precision": "fp32", "runtime": "torch",
                   "storage": "float32", "versions": versions}
    attrs = {**{k: v for k, v in fingerprint.items() if k != "versions"}, "versions": json.dumps(versions),
             "fingerprint": json.dumps(fingerprint, sort_keys=True), "feature_dim": DIM, "classes": classes,
             "data_root": str(data), "created": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
             "images_extracted": 0, "extraction_seconds": 1.0, "throughput_img_s": 10.0, "views_extracted": 0,
             "augment_seconds": 0.0}
    with StoreWriter(features_file(folder), attrs) as writer:
        for split, per_class in (("train", train_per_class), ("test", test_per_class)):
            paths = [(label, f"{split}/{name}/{i}.png") for label, name in enumerate(classes) for i in range(per_class)]
            if split == "test":
                paths[0] = (0, f"test/{classes[0]}/caf\udce9.png")
            rows = [(ImageKey(split, path, NO_VIEW, 1, 1), label, bytes(16)) for label, path in paths]
            vectors = centres[[label for label, _ in paths]] + rng.normal(0, 1, (len(paths), DIM))
            writer.add_split(split, SplitIndex.build(rows, []), DIM)[:] = vectors.astype(np.float32)
        writer.commit()
    for _, path in paths if images else []:
        file = Path(os.fsdecode(os.fsencode(data / path)))
        file.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(file, format="PNG")
    return Settings(cache=root / "cache", backbone=BACKBONE, epochs=3, val_fraction=0.2)


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> Callable[[int], tuple[Path, dict, list[str]]]:
    """Store, train-head and report at a class count, made once per count (the 17-class data without image files;
    no t-SNE, which is slow): the folder, the metrics ``report`` returned and the lines it printed."""
    made = {}

    def made_for(n: int) -> tuple[Path, dict, list[str]]:
        if n not in made:
            settings = write_store(tmp_path_factory.mktemp(f"classes{n}"), n, *CLASS_COUNTS[n], images=n != 17)
            train(settings)
            printed = io.StringIO()
            with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
                patch.setattr(plots, "TSNE_MAX_POINTS", 0)
                made[n] = settings.backbone_dir(), report(settings), printed.getvalue().splitlines()
        return made[n]

    return made_for


@pytest.fixture(params=sorted(CLASS_COUNTS))
def reported(request, reports) -> tuple[Path, dict, list[str]]:
    return reports(request.param)


def _predictions(folder: Path, metrics: dict) -> list[dict]:
    return list(csv.DictReader(io.StringIO((folder / metrics["test_predictions"]).read_text())))


def test_metrics_hold_intervals_balanced_and_top5_accuracy_at_every_class_count(reported):
    folder, metrics, _ = reported
    n, classes = len(metrics["classes"]), metrics["classes"]
    assert json.loads((folder / "metrics.json").read_text()) == metrics
    rows = _predictions(folder, metrics)
    truth = np.array([classes.index(r["true"]) for r in rows])
    for model in ("head", "logreg"):
        m = metrics[model]
        predicted = np.array([classes.index(r[f"{model}_prediction"]) for r in rows])
        assert m["test_accuracy"] == pytest.approx(np.mean(predicted == truth))
        assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(truth, predicted))
        for key in ("test_accuracy", "balanced_accuracy", "top5_accuracy") if n > 5 else ("test_accuracy", "balanced_accuracy"):
            low, high = m[f"{key}_ci95"]
            assert 0 <= low <= m[key] <= high <= 1
        assert ("top5_accuracy" in m) == (n > 5) and m.get("top5_accuracy", 1) >= m["test_accuracy"]
        assert set(m["macro_avg"]) == {"precision", "recall", "f1"} and len(m["per_class"]) == n
        matrix = np.array(m["confusion_matrix"])
        off = matrix - np.diag(np.diag(matrix))
        pairs = m["most_confused"]
        assert 0 < len(pairs) <= MOST_CONFUSED and pairs[0]["count"] == off.max()
        assert [p["count"] for p in pairs] == sorted((p["count"] for p in pairs), reverse=True)
        assert all(p["true"] != p["predicted"] and matrix[classes.index(p["true"]), classes.index(p["predicted"])] == p["count"]
                   for p in pairs)
        assert m["most_confidently_wrong"]
    run = metrics["run"]
    assert (run["precision"], run["runtime"], run["storage"]) == ("fp32", "torch", "float32")
    assert run["versions"]["torch"] == "2.0-test"
    assert run["data_root"] == str(folder.parents[1] / "data") and run["training"]["seed"] == 0
    assert run["head"]["lr"] == 0.003 and datetime.fromisoformat(run["report_created"]).tzinfo is not None


def test_outputs_stay_bounded_and_complete_at_every_class_count(reported):
    folder, metrics, printed = reported
    n = len(metrics["classes"])
    assert len(printed) <= SUMMARY_LINES_MAX
    assert set(metrics["figures"]) == {"learning_curves", "embedding", "top_losses_head", "top_losses_logreg", "confusion"}
    for name in metrics["figures"].values():
        with Image.open(folder / name) as image:
            assert image.format == "PNG" and 300 < image.width <= FIGURE_PIXELS_MAX[0] and image.height <= FIGURE_PIXELS_MAX[1]
    rows = _predictions(folder, metrics)
    assert len(rows) == metrics["n_test"] and list(rows[0]) == [
        "path", "true", "head_prediction", "head_probability", "logreg_prediction", "logreg_probability"]
    assert rows[0]["path"] == f"test/{metrics['classes'][0]}/caf\\xe9.png"
    assert all(0 < float(r["head_probability"]) <= 1 for r in rows)
    per_class = (folder / "report.md").read_text().split("## Per class")[1].split("\n\n")[1].splitlines()
    table = [line.split(" | ") for line in per_class[2:-1]]  # below the header, above the macro averages
    assert sorted(line[0][2:] for line in table) == metrics["classes"] and per_class[-1].startswith("| macro average |")
    head_f1 = [float(line[4]) for line in table]
    assert head_f1 == sorted(head_f1)  # worst first
    page = (folder / "report.html").read_text()
    body = page.index("<tbody>", page.index('id="per-class"'))
    assert page.count("<tr>", body, page.index("</tbody>", body)) == n
    assert not list(folder.glob("*.tmp"))


def test_the_intervals_are_wilson_and_a_seeded_paired_bootstrap(monkeypatch):
    z = 1.959963984540054
    n, hits = 500, 493
    p = hits / n
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert wilson_interval(hits, n) == pytest.approx([centre - half, centre + half])
    assert wilson_interval(1, 1)[1] == 1.0
    for hits, n in [(0, 1), (1, 1), (0, 7), (3, 7), (7, 7), (493, 500), (9_990, 10_000)]:
        scipys = binomtest(hits, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson_interval(hits, n) == pytest.approx([scipys.low, scipys.high], abs=1e-12)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 400)
    predicted = np.where(rng.random(400) < 0.8, y, rng.integers(0, 10, 400))
    interval = bootstrap_balanced_accuracy(y, predicted, 10, seed=3)
    assert interval == bootstrap_balanced_accuracy(y, predicted, 10, seed=3)
    assert interval != bootstrap_balanced_accuracy(y, predicted, 10, seed=4)
    assert interval[0] < balanced_accuracy_score(y, predicted) < interval[1]
    narrower = bootstrap_balanced_accuracy(np.tile(y, 4), np.tile(predicted, 4), 10, seed=3)
    assert narrower[1] - narrower[0] < interval[1] - interval[0]
    assert bootstrap_balanced_accuracy(np.array([2]), np.array([2]), 3, seed=0) == [1.0, 1.0]
    with pytest.raises(ValueError, match="no test images"):
        bootstrap_balanced_accuracy(np.zeros(0, dtype=int), np.zeros(0, dtype=int), 3, seed=0)
    assert BOOTSTRAP_RESAMPLES >= 1000
    with warnings.catch_warnings():  # a resample without some predicted class: scikit-learn says so, and skips it
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        resampled = [balanced_accuracy_score(y[draw], predicted[draw])
                     for draw in np.random.default_rng(3).integers(0, len(y), size=(BOOTSTRAP_RESAMPLES, len(y)))]
    assert interval == pytest.approx(np.percentile(resampled, [2.5, 97.5]).tolist(), abs=1e-12)
    monkeypatch.setattr(importlib.import_module("pipeline.report"), "BOOTSTRAP_DRAWS", 1)  # one resample per block: the same draws
    assert bootstrap_balanced_accuracy(y, predicted, 10, seed=3) == interval


def test_the_103_class_page_is_sortable_and_loads_in_headless_chromium(reports, tmp_path):
    folder, metrics, _ = reports(max(CLASS_COUNTS))
    flags = headless_chromium(tmp_path / "profile")
    page = (folder / "report.html").read_text()
    click = """<script>window.addEventListener("load", () => {
      const headers = document.querySelectorAll("#per-class thead th");
      const first = () => document.querySelector("#per-class tbody tr").cells[0].textContent;
      document.body.dataset.worstFirst = first();
      headers[0].click(); document.body.dataset.byName = first();
      headers[0].click(); document.body.dataset.byNameReversed = first();
    });</script></body>"""
    (tmp_path / "sorted.html").write_text(page.replace("</body>", click))
    dom = subprocess.run([*flags, "--virtual-time-budget=5000", "--dump-dom", (tmp_path / "sorted.html").as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    worst = min(metrics["classes"], key=lambda c: (metrics["head"]["per_class"][c]["f1"], c))
    assert 'data-images-total="5"' in dom and 'data-images-loaded="5"' in dom
    assert f'data-worst-first="{worst}"' in dom and 'data-by-name="c000"' in dom and 'data-by-name-reversed="c102"' in dom
    shot = tmp_path / "report.png"
    subprocess.run([*flags, "--window-size=1200,4000", f"--screenshot={shot}", (folder / "report.html").as_uri()],
                   capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.shape == (4000, 1200) and pixels.std() > 20
