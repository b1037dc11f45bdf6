"""Report: test accuracy of head and baseline side by side, per-class precision/recall, confusion
matrices, split sizes, timings and skipped images; written as ``metrics.json`` and ``report.md``.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from pipeline import plots
from pipeline.config import MODELS, Settings
from pipeline.errors import UserError
from pipeline.files import atomic_write_text, check_writable, disk_full_as_user_error
from pipeline.store import shown
from pipeline.train import AUGMENTED_HEAD_FILE, TRAINING_FILE, load_trained, open_features

TITLES = {"head": "Head", "logreg": "Logistic regression"}


def _load(folder: Path, model: str, created: str):
    classifier, saved = load_trained(folder, model)
    if saved.get("features_created") != created:
        raise UserError(f"the {model} in {folder} was trained on an older features.h5; run `make train-head` again")
    return classifier


def evaluate(proba: np.ndarray, y: np.ndarray, classes: list[str]) -> dict:
    labels = list(range(len(classes)))
    predicted = proba.argmax(1)
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
    """Metrics of head and baseline on the test split, and the report's pictures beside them.

    Refused before any work: a test split without vectors, and an output folder that cannot be written.
    """
    folder = settings.backbone_dir()
    with open_features(settings, data) as store:
        X, y, classes, paths = store.features("test"), store.labels("test"), store.classes, store.paths("test")
        attrs = store.attrs
        skipped = [{"split": s, "path": r.path, "reason": r.reason} for s in store.splits for r in store.index(s).skipped]
        n_test = len(y)
    if n_test == 0:
        raise UserError(f"no test vectors in {store.path}; add images to DATA/test and run `make features` again")
    check_writable(folder)
    created = str(attrs["created"])
    head = _load(folder, "head", created)
    baseline = _load(folder, "logreg", created)
    if not (folder / TRAINING_FILE).is_file():
        raise UserError(f"no {folder / TRAINING_FILE} beside the trained models; run `make train-head` again")
    training = json.loads((folder / TRAINING_FILE).read_text())
    data_root = Path(str(attrs["data_root"]))
    history = [vars(h) for h in head.history_]
    probas = {"head": head.predict_proba(X), "logreg": baseline.predict_proba(X)}
    figures = {
        "learning_curves": plots.learning_curves(history, head.best_epoch_, folder / "learning_curves.png"),
        "embedding": plots.embedding_map(X, y, classes, folder / "embedding.png", seed=training["seed"]),
    }
    wrong = {}
    for name, proba in probas.items():
        figures[f"top_losses_{name}"], wrong[name] = plots.top_losses(
            data_root, paths, y, proba, classes, f"{TITLES[name]}: most confidently wrong test images",
            folder / f"top_losses_{name}.png")
    metrics = {
        "backbone": settings.backbone,
        "feature_dim": int(attrs["feature_dim"]),
        "weights": str(attrs["weights"]),
        "classes": classes,
        "n_train": training["n_train"],
        "n_val": training["n_val"],
        "n_test": n_test,
        "head": {**evaluate(probas["head"], y, classes), "best_epoch": head.best_epoch_, "history": history,
                 "most_confidently_wrong": wrong["head"]},
        "logreg": {**evaluate(probas["logreg"], y, classes), "C": baseline.C_, "most_confidently_wrong": wrong["logreg"]},
        "timings": {
            "features_seconds": float(attrs["extraction_seconds"]),
            "images_extracted": int(attrs["images_extracted"]),
            "throughput_img_s": float(attrs["throughput_img_s"]),
            "head_seconds": training["head_seconds"],
            "logreg_seconds": training["logreg_seconds"],
        },
        "skipped": skipped,
    }
    if (folder / AUGMENTED_HEAD_FILE).is_file():
        augmented = _load(folder, "head_augmented", created)
        metrics["head_augmented"] = {**evaluate(augmented.predict_proba(X), y, classes), "best_epoch": augmented.best_epoch_,
                                     **training["augmented"], "views_extracted": int(attrs["views_extracted"]),
                                     "augment_seconds": float(attrs["augment_seconds"])}
    matrices = {TITLES[m]: metrics[m]["confusion_matrix"] for m in MODELS}
    figures["confusion"] = plots.confusion_matrices(matrices, classes, folder / "confusion.png")
    metrics["figures"] = {name: path.name for name, path in figures.items()}
    return metrics


def _rows(metrics: dict) -> list[tuple[str, float, float]]:
    head, logreg = metrics["head"], metrics["logreg"]
    rows = [("test accuracy", head["test_accuracy"], logreg["test_accuracy"])]
    for name in metrics["classes"]:
        for measure in ("precision", "recall"):
            rows.append((f"{name} {measure}", head["per_class"][name][measure], logreg["per_class"][name][measure]))
    return rows


def _table(metrics: dict) -> list[str]:
    return ["| | head | logreg |", "|---|---:|---:|"] + [f"| {label} | {a:.4f} | {b:.4f} |" for label, a, b in _rows(metrics)]


def _confusion(name: str, matrix: list[list[int]], classes: list[str]) -> list[str]:
    lines = [f"{name} confusion matrix (rows: true, columns: predicted)", "", "| true \\ predicted | " + " | ".join(classes) + " |",
             "|---|" + "---:|" * len(classes)]
    lines += [f"| {c} | " + " | ".join(str(v) for v in row) + " |" for c, row in zip(classes, matrix)]
    return lines + [""]


def _augmented_lines(metrics: dict) -> list[str]:
    if "head_augmented" not in metrics:
        return []
    a = metrics["head_augmented"]
    return [f"Augmentation: head trained with {a['views_per_image']} cached augmented views per train image: test accuracy "
            f"{a['test_accuracy']:.4f} (without: {metrics['head']['test_accuracy']:.4f}); the extra extraction of "
            f"{a['views_extracted']} views cost {a['augment_seconds']:.1f} s, training {a['seconds']:.1f} s.", ""]


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
        *_augmented_lines(metrics),
        f"Skipped images: {len(metrics['skipped'])}",
        *[f"- {shown(s['path'])}: {s['reason']}" for s in metrics["skipped"]],
    ]
    return "\n".join(lines) + "\n"


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


HTML_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }} th, td {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }} img {{ max-width: 100%; display: block; margin: 1em 0; }}
.big {{ font-size: 1.4em; }} code {{ background: #f3f3f3; padding: 1px 4px; }}
</style></head>
<body data-images-loaded="0">
{body}
<script>
window.addEventListener("load", () => {{
  const images = Array.from(document.images);
  document.body.dataset.imagesTotal = images.length;
  document.body.dataset.imagesLoaded = images.filter(i => i.complete && i.naturalWidth > 0).length;
}});
</script>
</body></html>
"""


def render_html(metrics: dict, folder: Path) -> str:
    """A self-contained page: every picture embedded as a data URI, so it opens from disk with no server."""
    t, esc = metrics["timings"], html.escape
    figure = lambda name, alt: f'<img src="{_data_uri(folder / metrics["figures"][name])}" alt="{esc(alt)}">'  # noqa: E731
    rows = "".join(f"<tr><td>{esc(label)}</td><td>{a:.4f}</td><td>{b:.4f}</td></tr>" for label, a, b in _rows(metrics))
    skipped = "".join(f"<li><code>{esc(shown(s['path']))}</code>: {esc(s['reason'])}</li>" for s in metrics["skipped"])
    extraction_rate = t["images_extracted"] / t["features_seconds"] if t["features_seconds"] else 0.0
    body = f"""
<h1>{esc(metrics['backbone'])} ({metrics['feature_dim']}-d) on {len(metrics['classes'])} classes</h1>
<p class="big">Test accuracy: head <b>{metrics['head']['test_accuracy']:.2%}</b>,
logistic regression <b>{metrics['logreg']['test_accuracy']:.2%}</b></p>
<table><tr><th></th><th>head</th><th>logreg</th></tr>{rows}</table>
<table><tr><th>split</th><th>images</th></tr><tr><td>train</td><td>{metrics['n_train']}</td></tr>
<tr><td>validation</td><td>{metrics['n_val']}</td></tr><tr><td>test</td><td>{metrics['n_test']}</td></tr></table>
<table><tr><th>stage</th><th>seconds</th></tr>
<tr><td>features ({t['images_extracted']} images, {extraction_rate:.1f} img/s)</td><td>{t['features_seconds']:.1f}</td></tr>
<tr><td>head (best epoch {metrics['head']['best_epoch']})</td><td>{t['head_seconds']:.2f}</td></tr>
<tr><td>logistic regression (C={metrics['logreg']['C']})</td><td>{t['logreg_seconds']:.2f}</td></tr></table>
<p>Weights: <code>{esc(metrics['weights'])}</code></p>
<h2>Learning curves</h2>{figure('learning_curves', 'learning curves of the head')}
<h2>Confusion matrices</h2>{figure('confusion', 'confusion matrices of head and baseline')}
<h2>Most confidently wrong</h2>{figure('top_losses_head', 'top losses of the head')}
{figure('top_losses_logreg', 'top losses of the baseline')}
<h2>Map of the cached vectors</h2>{figure('embedding', 'PCA and t-SNE of the test vectors')}
{"".join(f"<p>{esc(line)}</p>" for line in _augmented_lines(metrics) if line)}
<h2>Skipped images: {len(metrics['skipped'])}</h2><ul>{skipped}</ul>
"""
    return HTML_PAGE.format(title=esc(f"report: {metrics['backbone']}"), body=body)


def report(settings: Settings, data: Path | None = None) -> dict:
    """Write metrics.json, report.md, report.html and the PNGs, each atomically; a full disk is a UserError."""
    folder = settings.backbone_dir()
    with disk_full_as_user_error(folder, "report"):
        metrics = build_metrics(settings, data)
        atomic_write_text(folder / "metrics.json", json.dumps(metrics, indent=2))
        markdown = render_markdown(metrics)
        atomic_write_text(folder / "report.md", markdown)
        atomic_write_text(folder / "report.html", render_html(metrics, folder))
    print(markdown, end="")
    print(f"report: wrote metrics.json, report.md, report.html and {len(metrics['figures'])} PNGs to {folder}")
    return metrics
