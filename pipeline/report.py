"""Report: head and baseline on the test split, side by side, legible from two classes to hundreds.

Written as ``metrics.json``, ``report.md``, a self-contained ``report.html`` (pictures embedded, a per-class
table sortable by clicking its headers), ``test_predictions.csv`` and the PNGs, each atomically. The terminal
gets a short summary only; the full tables are in the files.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import logging
import math
import warnings
from datetime import datetime, timezone
from pathlib import Path
from statistics import NormalDist

import numpy as np
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix, precision_recall_fscore_support,
                             top_k_accuracy_score)

from pipeline import plots
from pipeline.config import MODELS, Settings
from pipeline.errors import UserError
from pipeline.files import atomic_write_text, check_writable, disk_full_as_user_error
from pipeline.listing import shown
from pipeline.runs import chosen_run, read_training_record
from pipeline.train import AUGMENTED_HEAD_FILE, load_trained, open_features

log = logging.getLogger(__name__)


TITLES = {"head": "Head", "logreg": "Logistic regression"}
CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_DRAWS = 1 << 19  # test images drawn per block of resamples
TOP_K = 5  # top-k accuracy is reported where there are more classes than this
TOP_KEY = f"top{TOP_K}_accuracy"
MOST_CONFUSED = 10  # class pairs listed per model
COUNT_TABLE_MAX = 12  # classes up to which report.md holds the confusion matrices as tables
SUMMARY_NAMES = 3  # worst classes and confused pairs named in the terminal summary
PREDICTIONS_FILE = "test_predictions.csv"


def _load(folder: Path, model: str, created: str):
    classifier, saved = load_trained(folder, model)
    if saved.get("features_created") != created:
        raise UserError(f"the {model} in {folder} was trained on an older features.h5; run `make train-head` again")
    return classifier


def wilson_interval(successes: int, n: int) -> list[float]:
    """The Wilson score interval of a proportion (``CONFIDENCE``); n must be at least 1. It is
    ``scipy.stats.binomtest(successes, n).proportion_ci(method="wilson")`` (a test keeps them equal), in closed form:
    importing scipy.stats would cost the report a second."""
    z = NormalDist().inv_cdf(0.5 + CONFIDENCE / 2)
    centre, spread = (successes + z * z / 2) / (n + z * z), z / (n + z * z) * math.sqrt(successes * (n - successes) / n + z * z / 4)
    return [max(0.0, centre - spread), min(1.0, centre + spread)]


def bootstrap_balanced_accuracy(y: np.ndarray, predicted: np.ndarray, n_classes: int, seed: int) -> list[float]:
    """Percentile interval (``CONFIDENCE``) of the balanced accuracy over ``BOOTSTRAP_RESAMPLES`` resamples of the
    test images, drawn from one generator in blocks of about ``BOOTSTRAP_DRAWS`` images (the same draws as one call
    for all; above that many test images, one resample per block); the same seed draws the same resamples for every
    model (a paired comparison). Each resample's balanced accuracy is, as in scikit-learn, the mean recall over the
    classes it holds. A model right on every test image gets [1, 1]: read it beside the Wilson interval of the
    accuracy."""
    if len(y) == 0:
        raise ValueError("no test images to resample")
    rng, right = np.random.default_rng(seed), predicted == y
    per_block = max(1, BOOTSTRAP_DRAWS // len(y))
    scores = np.empty(BOOTSTRAP_RESAMPLES)
    for start in range(0, BOOTSTRAP_RESAMPLES, per_block):
        count = min(per_block, BOOTSTRAP_RESAMPLES - start)
        draws = rng.integers(0, len(y), size=(count, len(y)))
        cells = (np.arange(count)[:, None] * n_classes + y[draws]).ravel()
        totals = np.bincount(cells, minlength=count * n_classes).reshape(count, n_classes)
        hits = np.bincount(cells, weights=right[draws].ravel(), minlength=count * n_classes).reshape(totals.shape)
        held = totals > 0
        scores[start:start + count] = (hits / np.where(held, totals, 1)).sum(axis=1) / held.sum(axis=1)
    tail = (1 - CONFIDENCE) / 2 * 100
    return np.percentile(scores, [tail, 100 - tail]).tolist()


def most_confused(matrix: np.ndarray, classes: list[str], count: int = MOST_CONFUSED) -> list[dict]:
    """The largest off-diagonal cells of a confusion matrix, largest first (ties: in matrix order)."""
    off = matrix.copy()
    np.fill_diagonal(off, 0)
    cells = np.argsort(-off, axis=None, kind="stable")[:count]
    return [{"true": classes[i], "predicted": classes[j], "count": int(off[i, j])}
            for i, j in zip(*np.unravel_index(cells, off.shape)) if off[i, j] > 0]


def evaluate(proba: np.ndarray, y: np.ndarray, classes: list[str], seed: int) -> dict:
    """Accuracy (Wilson interval), balanced accuracy (bootstrap interval, seeded), top-5 accuracy (with more than
    ``TOP_K`` classes), macro averages over the classes the test split holds, per-class scores, the confusion
    matrix and its most confused pairs."""
    labels = np.arange(len(classes))
    predicted = proba.argmax(1)
    precision, recall, f1, support = precision_recall_fscore_support(y, predicted, labels=labels, zero_division=0)
    macro = precision_recall_fscore_support(y, predicted, labels=np.unique(y), average="macro", zero_division=0)
    matrix = confusion_matrix(y, predicted, labels=labels)
    with warnings.catch_warnings():  # both are expected: a class may be absent from a small test split
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        warnings.filterwarnings("ignore", message="A single label was found in 'y_true' and 'y_pred'")
        balanced = balanced_accuracy_score(y, predicted)
    result = {
        "test_accuracy": float(accuracy_score(y, predicted)),
        "test_accuracy_ci95": wilson_interval(int(accuracy_score(y, predicted, normalize=False)), len(y)),
        "balanced_accuracy": float(balanced),
        "balanced_accuracy_ci95": bootstrap_balanced_accuracy(y, predicted, len(classes), seed),
    }
    if len(classes) > TOP_K:
        hits = int(top_k_accuracy_score(y, proba, k=TOP_K, labels=labels, normalize=False))
        result |= {TOP_KEY: hits / len(y), f"{TOP_KEY}_ci95": wilson_interval(hits, len(y))}
    return result | {
        "macro_avg": dict(zip(("precision", "recall", "f1"), map(float, macro[:3]))),
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(classes, precision, recall, f1, support)
        },
        "confusion_matrix": matrix.tolist(),
        "most_confused": most_confused(matrix, classes),
    }


def _predictions_csv(paths: list[str], y: np.ndarray, probas: dict[str, np.ndarray], classes: list[str]) -> str:
    """One row per test image: path (shown), true class, and each model's prediction and its probability."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["path", "true", *[f"{m}_{what}" for m in MODELS for what in ("prediction", "probability")]])
    predicted = {m: probas[m].argmax(1) for m in MODELS}
    for i, path in enumerate(paths):
        writer.writerow([shown(path), classes[y[i]],
                         *[v for m in MODELS for v in (classes[predicted[m][i]], f"{probas[m][i, predicted[m][i]]:.6f}")]])
    return out.getvalue()


def build_metrics(settings: Settings, data: Path | None = None) -> dict:
    """Metrics of head and baseline on the test split, and the report's pictures and test_predictions.csv beside them.

    Refused before any work: a test split without vectors, and an output folder that cannot be written.
    """
    folder = settings.backbone_dir()
    with open_features(settings, data) as store:
        X, y, classes, paths = store.features("test"), store.labels("test"), store.classes, store.paths("test")
        attrs = store.attrs
        skipped = [{"split": s, "path": r.path, "reason": r.reason} for s, r in store.skipped_files()]
        n_test = len(y)
    if n_test == 0:
        raise UserError(f"no test vectors in {store.path}; add images to DATA/test and run `make features` again")
    check_writable(folder)
    created = str(attrs["created"])
    run_folder = chosen_run(settings)
    head = _load(run_folder, "head", created)
    baseline = _load(run_folder, "logreg", created)
    training = read_training_record(run_folder)
    seed = training["seed"]
    data_root = Path(str(attrs["data_root"]))
    history = [vars(h) for h in head.history_]
    probas = {"head": head.predict_proba(X), "logreg": baseline.predict_proba(X)}
    figures = {
        "learning_curves": plots.learning_curves(history, head.best_epoch_, folder / "learning_curves.png"),
        "embedding": plots.embedding_map(X, y, classes, folder / "embedding.png", seed=seed),
    }
    wrong = {}
    for name, proba in probas.items():
        figures[f"top_losses_{name}"], wrong[name] = plots.top_losses(
            data_root, paths, y, proba, classes, f"{TITLES[name]}: most confidently wrong test images",
            folder / f"top_losses_{name}.png")
    atomic_write_text(folder / PREDICTIONS_FILE, _predictions_csv(paths, y, probas, classes))
    metrics = {
        "backbone": settings.backbone,
        "feature_dim": int(attrs["feature_dim"]),
        "weights": str(attrs["weights"]),
        "classes": classes,
        "n_train": training["n_train"],
        "n_val": training["n_val"],
        "n_test": n_test,
        "head": {**evaluate(probas["head"], y, classes, seed), "best_epoch": head.best_epoch_, "history": history,
                 "fitted_on": head.n_fitted_ or training["n_train"], "most_confidently_wrong": wrong["head"]},
        "logreg": {**evaluate(probas["logreg"], y, classes, seed), "C": baseline.C_, "C_chosen_by": baseline.selection_,
                   "fitted_on": baseline.n_fitted_ or training["n_train"],
                   "most_confidently_wrong": wrong["logreg"]},
        "timings": {
            "features_seconds": float(attrs["extraction_seconds"]),
            "images_extracted": int(attrs["images_extracted"]),
            "throughput_img_s": float(attrs["throughput_img_s"]),
            "head_seconds": training["head_seconds"],
            "logreg_seconds": training["logreg_seconds"],
        },
        "run": {
            "name": run_folder.name,
            "data_root": str(attrs["data_root"]),
            "features_created": created,
            **{key: str(attrs[key]) for key in ("precision", "runtime", "storage")},
            "versions": json.loads(attrs["versions"]),
            "head": head.get_params(),
            "training": {k: v for k, v in training.items() if k != "classes"},
            "report_created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
        "skipped": skipped,
        "test_predictions": PREDICTIONS_FILE,
    }
    if (run_folder / AUGMENTED_HEAD_FILE).is_file():
        augmented = _load(run_folder, "head_augmented", created)
        metrics["head_augmented"] = {**evaluate(augmented.predict_proba(X), y, classes, seed),
                                     "best_epoch": augmented.best_epoch_, **training["augmented"],
                                     "views_extracted": int(attrs["views_extracted"]),
                                     "augment_seconds": float(attrs["augment_seconds"])}
    matrices = {TITLES[m]: metrics[m]["confusion_matrix"] for m in MODELS}
    figures["confusion"] = plots.confusion_matrices(matrices, classes, folder / "confusion.png")
    metrics["figures"] = {name: path.name for name, path in figures.items()}
    return metrics


# -- the rows every rendering shares: (label, cells) as text, numbers kept for sorting ----------------------------

def _with_interval(result: dict, key: str) -> str:
    low, high = result[f"{key}_ci95"]
    return f"{result[key]:.4f} [{low:.3f}, {high:.3f}]"


def _accuracy_rows(metrics: dict) -> list[list[str]]:
    """Accuracies with their 95% intervals and macro averages, one column per model."""
    models = [metrics[m] for m in MODELS]
    rows = [["test accuracy [95% Wilson interval]", *[_with_interval(m, "test_accuracy") for m in models]],
            ["balanced accuracy [95% bootstrap interval]", *[_with_interval(m, "balanced_accuracy") for m in models]]]
    if TOP_KEY in models[0]:
        rows.append([f"top-{TOP_K} accuracy [95% Wilson interval]", *[_with_interval(m, TOP_KEY) for m in models]])
    return rows + [[f"macro {name}", *[f"{m['macro_avg'][measure]:.4f}" for m in models]]
                   for name, measure in (("precision", "precision"), ("recall", "recall"), ("F1", "f1"))]


CLASS_HEADER = ["class", "support", *[f"{m} {measure}" for m in MODELS for measure in ("precision", "recall", "F1")]]


def _class_rows(metrics: dict) -> list[list[str | int | float]]:
    """One row per class (name, support, precision/recall/F1 of each model), worst head F1 first (then by name);
    classes without test images last."""
    rows = [[name, metrics["head"]["per_class"][name]["support"],
             *[metrics[m]["per_class"][name][measure] for m in MODELS for measure in ("precision", "recall", "f1")]]
            for name in metrics["classes"]]
    return sorted(rows, key=lambda row: (row[1] == 0, row[4], row[0]))


def _macro_row(metrics: dict) -> list[str | int | float]:
    return ["macro average", metrics["n_test"],
            *[metrics[m]["macro_avg"][measure] for m in MODELS for measure in ("precision", "recall", "f1")]]


def _text(value: str | int | float) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _confused_rows(metrics: dict) -> list[list[str]]:
    """The most confused pairs of head and baseline, side by side: rank, then true -> predicted (count) per model."""
    lists = [metrics[m]["most_confused"] for m in MODELS]
    return [[str(rank + 1), *[f"{p[rank]['true']} \u2192 {p[rank]['predicted']} ({p[rank]['count']})" if rank < len(p) else ""
                              for p in lists]]
            for rank in range(max(map(len, lists)))] or [["", *["no misclassified test images"] * len(MODELS)]]


def _run_rows(metrics: dict) -> list[list[str]]:
    """The settings and provenance of the run: data, features, training, libraries, dates."""
    run, t, params = metrics["run"], metrics["timings"], metrics["run"]["head"]
    rate = t["images_extracted"] / t["features_seconds"] if t["features_seconds"] else 0.0
    return [
        ["Run", f"{run['name']} (CACHE/{metrics['backbone']}/runs/{run['name']}; RUN= for another run)"],
        ["Data root", shown(run["data_root"])],
        ["Splits", f"train {metrics['n_train']}, validation {metrics['n_val']}, test {metrics['n_test']}"],
        ["Backbone", f"{metrics['backbone']} ({metrics['feature_dim']}-d), weights {metrics['weights']}"],
        ["Features", f"precision {run['precision']}, runtime {run['runtime']}, storage {run['storage']}; "
                     f"made {run['features_created']}"],
        ["Libraries (stage one)", ", ".join(f"{k} {v}" for k, v in run["versions"].items())],
        ["Head", f"hidden {params['hidden']}, dropout {params['dropout']}, lr {params['lr']}, batch {params['batch_size']}, "
                 f"up to {params['epochs']} epochs (patience {params['patience']}), epoch {metrics['head']['best_epoch']} "
                 f"chosen on validation, {_fitted_on(metrics, 'head')}"],
        ["Logistic regression", f"C={metrics['logreg']['C']:.4g} chosen by {metrics['logreg']['C_chosen_by']} "
                                f"(best mean validation accuracy), {_fitted_on(metrics, 'logreg')}"],
        ["Vectors", f"normalisation {params['normalisation']}, class weights {params['class_weight']} "
                    f"(head and logistic regression)"],
        ["Seed", str(run["training"]["seed"])],
        ["Timings", f"features {t['features_seconds']:.1f} s ({t['images_extracted']} images, {rate:.1f} img/s), "
                    f"head {t['head_seconds']:.2f} s, logreg {t['logreg_seconds']:.2f} s"],
        ["Report made", run["report_created"]],
    ]


def _fitted_on(metrics: dict, model: str) -> str:
    """How many vectors the final model was fitted on, and whether that is train+validation or train alone."""
    n, n_train = metrics[model]["fitted_on"], metrics["n_train"]
    return f"fitted on {n} vectors ({'train+validation' if n > n_train else 'train without validation'})"


def _augmented_lines(metrics: dict) -> list[str]:
    if "head_augmented" not in metrics:
        return []
    a = metrics["head_augmented"]
    return [f"Augmentation: head trained with {a['views_per_image']} cached augmented views per train image: test accuracy "
            f"{_with_interval(a, 'test_accuracy')} (without: {metrics['head']['test_accuracy']:.4f}); the extra extraction "
            f"of {a['views_extracted']} views cost {a['augment_seconds']:.1f} s, training {a['seconds']:.1f} s.", ""]


def _title(metrics: dict) -> str:
    return f"{metrics['backbone']} ({metrics['feature_dim']}-d) on {len(metrics['classes'])} classes"


# -- report.md ----------------------------------------------------------------------------------------------------

def _md_table(header: list[str], rows: list[list], text: bool = False) -> list[str]:
    """A Markdown table; the first column aligned left, the others too when ``text`` (else right, for numbers)."""
    cell = lambda value: _text(value).replace("|", "\\|")  # noqa: E731
    align = ["---" if i == 0 or text else "---:" for i in range(len(header))]
    return [f"| {' | '.join(map(cell, header))} |", f"|{'|'.join(align)}|"] + [f"| {' | '.join(map(cell, r))} |" for r in rows]


def _md_confusion(metrics: dict) -> list[str]:
    """The confusion matrices as count tables up to ``COUNT_TABLE_MAX`` classes; beyond, where to find them."""
    classes = metrics["classes"]
    if len(classes) > COUNT_TABLE_MAX:
        return [f"The {len(classes)}-class confusion matrices are in metrics.json and, row-normalised, in "
                f"{metrics['figures']['confusion']}.", ""]
    lines = []
    for model in MODELS:
        lines += [f"{TITLES[model]} confusion matrix (rows: true, columns: predicted)", "",
                  *_md_table(["true \\ predicted", *classes],
                             [[c, *row] for c, row in zip(classes, metrics[model]["confusion_matrix"])]), ""]
    return lines


def render_markdown(metrics: dict) -> str:
    """The whole report as Markdown: every table in full."""
    lines = [
        f"# {_title(metrics)}", "",
        f"Splits: train {metrics['n_train']}, validation {metrics['n_val']}, test {metrics['n_test']}. "
        f"Weights: `{metrics['weights']}`.", "",
        *_md_table(["", *MODELS], _accuracy_rows(metrics)), "",
        "## Most confused class pairs (true \u2192 predicted, test images)", "",
        *_md_table(["rank", *MODELS], _confused_rows(metrics), text=True), "",
        *_md_confusion(metrics),
        "## Per class, worst head F1 first", "",
        *_md_table(CLASS_HEADER, [*_class_rows(metrics), _macro_row(metrics)]), "",
        *_augmented_lines(metrics),
        "## Run", "",
        *_md_table(["setting", "value"], _run_rows(metrics), text=True), "",
        f"Per-image test predictions: {metrics['test_predictions']}.", "",
        f"Skipped images: {len(metrics['skipped'])}",
        *[f"- {shown(s['path'])}: {s['reason']}" for s in metrics["skipped"]],
    ]
    return "\n".join(lines) + "\n"


# -- report.html --------------------------------------------------------------------------------------------------

def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


HTML_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }} th, td {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }} img {{ max-width: 100%; display: block; margin: 1em 0; }}
.big {{ font-size: 1.4em; }} code {{ background: #f3f3f3; padding: 1px 4px; }}
.scroll {{ max-height: 34em; overflow-y: auto; display: inline-block; border: 1px solid #ccc; }}
.scroll table {{ margin: 0; }} thead th {{ position: sticky; top: 0; background: #f3f3f3; }}
table.sortable thead th {{ cursor: pointer; user-select: none; }}
th[aria-sort=ascending]::after {{ content: " \\25B2"; }} th[aria-sort=descending]::after {{ content: " \\25BC"; }}
tfoot td {{ font-weight: bold; background: #fafafa; }} table.text th, table.text td {{ text-align: left; }}
#per-class td:first-child {{ white-space: nowrap; }}
</style></head>
<body data-images-loaded="0">
{body}
<script>
window.addEventListener("load", () => {{
  const images = Array.from(document.images);
  document.body.dataset.imagesTotal = images.length;
  document.body.dataset.imagesLoaded = images.filter(i => i.complete && i.naturalWidth > 0).length;
}});
// Click a header of a sortable table to sort its body by that column; click again to reverse.
const sortKey = cell => cell.dataset.value === undefined ? cell.textContent : Number(cell.dataset.value);
document.querySelectorAll("table.sortable").forEach(table => table.querySelectorAll("thead th").forEach((th, column) => {{
  th.addEventListener("click", () => {{
    const direction = th.getAttribute("aria-sort") === "ascending" ? -1 : 1;
    const rows = Array.from(table.tBodies[0].rows);
    rows.sort((a, b) => {{
      const x = sortKey(a.cells[column]), y = sortKey(b.cells[column]);
      return direction * (x < y ? -1 : x > y ? 1 : 0);
    }});
    table.tBodies[0].append(...rows);
    table.querySelectorAll("thead th").forEach(other => other.removeAttribute("aria-sort"));
    th.setAttribute("aria-sort", direction === 1 ? "ascending" : "descending");
  }});
}}));
</script>
</body></html>
"""


def _html_table(header: list[str], rows: list[list[str]], text: bool = False) -> str:
    """A plain table; ``text``: its cells are words, aligned left (else numbers, aligned right)."""
    esc = html.escape
    return (f"<table{' class=text' if text else ''}><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header)
            + "</tr></thead><tbody>"
            + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows) + "</tbody></table>")


def _html_class_table(metrics: dict) -> str:
    """The per-class table, sortable by any column (numbers by value), worst head F1 first; macro averages below."""
    def cells(row: list) -> str:  # numbers carry their exact value, to sort by
        return "".join(f"<td>{html.escape(v)}</td>" if isinstance(v, str) else f'<td data-value="{v!r}">{_text(v)}</td>'
                       for v in row)

    header = "".join(f'<th{" aria-sort=ascending" if h == "head F1" else ""}>{html.escape(h)}</th>' for h in CLASS_HEADER)
    body = "".join(f"<tr>{cells(row)}</tr>" for row in _class_rows(metrics))
    return (f'<div class="scroll"><table class="sortable" id="per-class"><thead><tr>{header}</tr></thead>'
            f"<tbody>{body}</tbody><tfoot><tr>{cells(_macro_row(metrics))}</tr></tfoot></table></div>")


def render_html(metrics: dict, folder: Path) -> str:
    """A self-contained page: every picture embedded as a data URI, so it opens from disk with no server.

    Order: headline numbers, confusions (pairs, then the matrices), the per-class table (scrolls), the wrong
    images, the map, the learning curves, the run's settings, skipped images."""
    esc = html.escape
    figure = lambda name, alt: f'<img src="{_data_uri(folder / metrics["figures"][name])}" alt="{esc(alt)}">'  # noqa: E731
    skipped = "".join(f"<li><code>{esc(shown(s['path']))}</code>: {esc(s['reason'])}</li>" for s in metrics["skipped"])
    body = f"""
<h1>{esc(_title(metrics))}</h1>
<p class="big">Test accuracy: head <b>{metrics['head']['test_accuracy']:.2%}</b>,
logistic regression <b>{metrics['logreg']['test_accuracy']:.2%}</b> ({metrics['n_test']} test images)</p>
{_html_table(["", *MODELS], _accuracy_rows(metrics))}
{"".join(f"<p>{esc(line)}</p>" for line in _augmented_lines(metrics) if line)}
<h2>Most confused class pairs</h2><p>true &rarr; predicted (test images)</p>
{_html_table(["rank", *MODELS], _confused_rows(metrics), text=True)}
<h2>Confusion matrices</h2>{figure('confusion', 'confusion matrices of head and baseline, rows normalised')}
<h2>Per class</h2><p>Worst head F1 first; click a column header to sort by it.</p>
{_html_class_table(metrics)}
<h2>Most confidently wrong</h2>{figure('top_losses_head', 'top losses of the head')}
{figure('top_losses_logreg', 'top losses of the baseline')}
<h2>Map of the cached vectors</h2>{figure('embedding', 'PCA and t-SNE of the test vectors')}
<h2>Learning curves</h2>{figure('learning_curves', 'learning curves of the head')}
<h2>Run</h2>{_html_table(["setting", "value"], _run_rows(metrics), text=True)}
<p>Per-image test predictions: <code>{esc(metrics['test_predictions'])}</code></p>
<h2>Skipped images: {len(metrics['skipped'])}</h2><ul>{skipped}</ul>
"""
    return HTML_PAGE.format(title=esc(f"report: {metrics['backbone']}"), body=body)


# -- the terminal ----------------------------------------------------------------------------------------------------

def summary_lines(metrics: dict, folder: Path) -> list[str]:
    """What `report` prints: accuracies with intervals, the worst classes and most confused pairs of the head (a few,
    by name), skipped images, and where the files are; never a whole table, at any class count."""
    lines = [f"report: {_title(metrics)}, run {metrics['run']['name']}, {metrics['n_test']} test images"]
    for model in (*MODELS, "head_augmented"):
        if model in metrics:
            m = metrics[model]
            top = f", top-{TOP_K} {_with_interval(m, TOP_KEY)}" if TOP_KEY in m else ""
            lines.append(f"  {model}: accuracy {_with_interval(m, 'test_accuracy')}, "
                         f"balanced {_with_interval(m, 'balanced_accuracy')}{top}")
    worst = [row for row in _class_rows(metrics) if row[1]][:SUMMARY_NAMES]
    lines.append("  worst head F1: " + ", ".join(f"{row[0]} {row[4]:.2f}" for row in worst))
    confused = metrics["head"]["most_confused"][:SUMMARY_NAMES]
    if confused:
        lines.append("  most confused by the head: " + ", ".join(f"{p['true']} \u2192 {p['predicted']} ({p['count']})"
                                                                 for p in confused))
    if metrics["skipped"]:
        lines.append(f"  skipped images: {len(metrics['skipped'])} (listed in report.md)")
    lines.append(f"report: wrote metrics.json, report.md, report.html, {metrics['test_predictions']} and "
                 f"{len(metrics['figures'])} PNGs to {folder}")
    return lines


def report(settings: Settings, data: Path | None = None) -> dict:
    """Write metrics.json, report.md, report.html, the predictions and the PNGs, each atomically (a full disk is a
    UserError), and print a short summary."""
    folder = settings.backbone_dir()
    with disk_full_as_user_error(folder, "report"):
        metrics = build_metrics(settings, data)
        atomic_write_text(folder / "metrics.json", json.dumps(metrics, indent=2))
        atomic_write_text(folder / "report.md", render_markdown(metrics))
        atomic_write_text(folder / "report.html", render_html(metrics, folder))
    log.info("\n".join(summary_lines(metrics, folder)))
    return metrics
