"""Report: test accuracy of head and baseline side by side, per-class precision/recall, confusion
matrices, split sizes, timings and skipped images; written as ``metrics.json`` and ``report.md``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from pipeline.baseline import LogisticBaseline
from pipeline.config import Settings
from pipeline.errors import UserError
from pipeline.head import HeadClassifier
from pipeline.images import SPLITS
from pipeline.train import BASELINE_FILE, HEAD_FILE, TRAINING_FILE, open_features

MODELS = ("head", "logreg")


def _load(path: Path, loader, created: str):
    if not path.is_file():
        raise UserError(f"no trained model at {path}; run `make train-head` with the same BACKBONE and CACHE first")
    model, saved = loader(path)
    if saved.get("features_created") != created:
        raise UserError(f"{path} was trained on an older features.h5; run `make train-head` again")
    return model


def evaluate(model, X: np.ndarray, y: np.ndarray, classes: list[str]) -> dict:
    labels = list(range(len(classes)))
    predicted = model.predict(X)
    precision, recall, f1, support = precision_recall_fscore_support(y, predicted, labels=labels, zero_division=0)
    return {
        "test_accuracy": float(accuracy_score(y, predicted)),
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(classes, precision, recall, f1, support)
        },
        "confusion_matrix": confusion_matrix(y, predicted, labels=labels).tolist(),
    }


def build_metrics(settings: Settings, data: Path | None = None) -> dict:
    folder = settings.backbone_dir()
    with open_features(settings, data) as store:
        X, y, classes = store.features("test"), store.labels("test"), store.classes
        attrs = store.attrs
        skipped = [{"split": s, "path": r.path, "reason": r.reason} for s in SPLITS for r in store.index(s).skipped]
        n_test = len(y)
    created = str(attrs["created"])
    head = _load(folder / HEAD_FILE, HeadClassifier.load, created)
    baseline = _load(folder / BASELINE_FILE, LogisticBaseline.load, created)
    training = json.loads((folder / TRAINING_FILE).read_text())
    metrics = {
        "backbone": settings.backbone,
        "feature_dim": int(attrs["feature_dim"]),
        "weights": str(attrs["weights"]),
        "classes": classes,
        "n_train": training["n_train"],
        "n_val": training["n_val"],
        "n_test": n_test,
        "head": {**evaluate(head, X, y, classes), "best_epoch": head.best_epoch_,
                 "history": [vars(h) for h in head.history_]},
        "logreg": {**evaluate(baseline, X, y, classes), "C": baseline.C_},
        "timings": {
            "features_seconds": float(attrs["extraction_seconds"]),
            "images_extracted": int(attrs["images_extracted"]),
            "head_seconds": training["head_seconds"],
            "logreg_seconds": training["logreg_seconds"],
        },
        "skipped": skipped,
    }
    return metrics


def _table(metrics: dict) -> list[str]:
    head, logreg = metrics["head"], metrics["logreg"]
    rows = [("test accuracy", head["test_accuracy"], logreg["test_accuracy"])]
    for name in metrics["classes"]:
        for measure in ("precision", "recall"):
            rows.append((f"{name} {measure}", head["per_class"][name][measure], logreg["per_class"][name][measure]))
    lines = ["| | head | logreg |", "|---|---:|---:|"]
    lines += [f"| {label} | {a:.4f} | {b:.4f} |" for label, a, b in rows]
    return lines


def _confusion(name: str, matrix: list[list[int]], classes: list[str]) -> list[str]:
    lines = [f"{name} confusion matrix (rows: true, columns: predicted)", "", "| true \\ predicted | " + " | ".join(classes) + " |",
             "|---|" + "---:|" * len(classes)]
    lines += [f"| {c} | " + " | ".join(str(v) for v in row) + " |" for c, row in zip(classes, matrix)]
    return lines + [""]


def render_markdown(metrics: dict) -> str:
    t = metrics["timings"]
    rate = t["images_extracted"] / t["features_seconds"] if t["features_seconds"] else 0.0
    lines = [
        f"# {metrics['backbone']} ({metrics['feature_dim']}-d) on {len(metrics['classes'])} classes",
        "",
        f"Splits: train {metrics['n_train']}, validation {metrics['n_val']}, test {metrics['n_test']}. "
        f"Weights: `{metrics['weights']}`.",
        "",
        *_table(metrics),
        "",
        *_confusion("Head", metrics["head"]["confusion_matrix"], metrics["classes"]),
        *_confusion("Logistic regression", metrics["logreg"]["confusion_matrix"], metrics["classes"]),
        f"Timings: features {t['features_seconds']:.1f} s ({t['images_extracted']} images extracted, {rate:.1f} img/s), "
        f"head {t['head_seconds']:.1f} s (best epoch {metrics['head']['best_epoch']}), "
        f"logreg {t['logreg_seconds']:.1f} s (C={metrics['logreg']['C']}).",
        "",
        f"Skipped images: {len(metrics['skipped'])}",
        *[f"- {s['path']}: {s['reason']}" for s in metrics["skipped"]],
    ]
    return "\n".join(lines) + "\n"


def report(settings: Settings, data: Path | None = None) -> dict:
    metrics = build_metrics(settings, data)
    folder = settings.backbone_dir()
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
    markdown = render_markdown(metrics)
    (folder / "report.md").write_text(markdown)
    print(markdown, end="")
    print(f"report: wrote {folder / 'metrics.json'} and {folder / 'report.md'}")
    return metrics
