"""The report's pictures (matplotlib, written as PNG): learning curves, confusion matrices, most
confidently wrong test images, and a 2-D map of the cached vectors. Each stays legible, and bounded in
size, from two classes to hundreds."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import Colormap, ListedColormap
from matplotlib.figure import Figure
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE
from sklearn.metrics import ConfusionMatrixDisplay

from pipeline.files import atomic_write
from pipeline.images import load_rgb
from pipeline.listing import BadImage, shown

TSNE_MAX_POINTS = 1500
MAP_MINIMUM = 2  # vectors, and dimensions, that a 2-D map needs
TICK_LABELS_MAX = 30  # confusion matrix: at most this many class names per axis (every k-th class beyond)
STACKED_SIDE = 9.0  # confusion matrix: inches a side of each panel when the panels are stacked
CELL_COUNTS_MAX = 12  # confusion matrix: classes up to which every cell shows its count
LEGEND_MAX = 20  # map: classes up to which it has a legend (colour by class always)
CLASS_CHARS = 20  # a class name on an axis or in a legend is cut to this many characters
FILE_CHARS = 38  # a file name under a thumbnail is cut to this many characters (its end kept)


def _figure(rows: int = 1, columns: int = 1, *, figsize: tuple[float, float], squeeze: bool = True):
    """A figure and its axes, made without pyplot: no global figure list, no backend switched in a notebook."""
    figure = Figure(figsize=figsize)
    return figure, figure.subplots(rows, columns, squeeze=squeeze)


def _save(figure: Figure, path: Path) -> Path:
    """Write the figure as PNG atomically."""
    figure.tight_layout()
    atomic_write(path, lambda f: figure.savefig(f, format="png", dpi=100, bbox_inches="tight"))
    return path


def _short(text: str, limit: int, keep_end: bool = False) -> str:
    """``text`` cut to ``limit`` characters, the cut marked by an ellipsis; ``keep_end`` keeps the end (file names)."""
    if len(text) <= limit:
        return text
    return "\u2026" + text[1 - limit:] if keep_end else text[:limit - 1] + "\u2026"


def _class_colours(n: int) -> Colormap:
    """One colour per class index: distinct (tab10, tab20) up to 20 classes, a continuous ramp beyond."""
    if n <= 20:
        return ListedColormap(colormaps["tab10" if n <= 10 else "tab20"].colors[:max(1, n)])
    return colormaps["turbo"].resampled(n)


def learning_curves(history: list[dict], best_epoch: int, path: Path) -> Path:
    epochs = [h["epoch"] for h in history]
    figure, (loss, accuracy) = _figure(1, 2, figsize=(10, 3.6))
    loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train loss")
    loss.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation loss")
    accuracy.plot(epochs, [h["val_accuracy"] for h in history], "o-", color="tab:green", label="validation accuracy")
    for axis in (loss, accuracy):
        axis.axvline(best_epoch, color="grey", linestyle="--", label=f"kept: epoch {best_epoch}")
        axis.set_xlabel("epoch")
        axis.legend()
    loss.set_title("Head: loss")
    accuracy.set_title("Head: validation accuracy")
    return _save(figure, path)


def confusion_matrices(matrices: dict[str, list[list[int]]], classes: list[str], path: Path) -> Path:
    """One heatmap per model, rows normalised (colour: share of the true class's test images), with a colorbar.

    Every class is named up to ``TICK_LABELS_MAX`` classes, every k-th beyond; cells show their counts up to
    ``CELL_COUNTS_MAX`` classes. Side by side up to ``TICK_LABELS_MAX`` classes, stacked beyond; a panel's side is
    bounded, so the figure is too.
    """
    n = len(classes)
    stacked = n > TICK_LABELS_MAX
    side = STACKED_SIDE if stacked else float(np.clip(3 + 0.065 * n, 4.5, 5))
    rows, columns = (len(matrices), 1) if stacked else (1, len(matrices))
    figure, axes = _figure(rows, columns, figsize=(columns * (side + 0.8), rows * side), squeeze=False)
    ticks = np.arange(0, n, math.ceil(n / TICK_LABELS_MAX))
    names = [_short(classes[i], CLASS_CHARS) for i in ticks]
    fontsize = 10 if n <= CELL_COUNTS_MAX else 7
    for axis, (name, matrix) in zip(axes.flat, matrices.items()):
        counts = np.asarray(matrix)
        totals = counts.sum(axis=1, keepdims=True)
        shares = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
        display = ConfusionMatrixDisplay(shares, display_labels=classes).plot(
            ax=axis, cmap="Blues", include_values=n <= CELL_COUNTS_MAX, xticks_rotation="vertical", colorbar=False,
            im_kw={"vmin": 0, "vmax": 1})
        if display.text_ is not None:
            for text, count in zip(display.text_.flat, counts.flat):
                text.set_text(str(count))
        figure.colorbar(display.im_, ax=axis, fraction=0.046, pad=0.04, label="share of the true class")
        axis.set_xticks(ticks, names, rotation="vertical", fontsize=fontsize)
        axis.set_yticks(ticks, names, fontsize=fontsize)
        axis.set_title(f"{name}: rows are true classes" + ("" if len(ticks) == n else f" (one class named in {ticks[1]})"))
    return _save(figure, path)


def top_losses(data_root: Path, paths: list[str], labels: np.ndarray, proba: np.ndarray, classes: list[str],
               title: str, path: Path, count: int = 8) -> tuple[Path, list[dict]]:
    """The most confidently wrong test images, like fastai's ``plot_top_losses``, each with its file name beneath;
    an image that cannot be read is a panel saying why."""
    predicted = proba.argmax(1)
    wrong = np.flatnonzero(predicted != labels)
    wrong = wrong[np.argsort(-proba[wrong, predicted[wrong]])][:count]
    rows = [{"path": paths[i], "true": classes[labels[i]], "predicted": classes[predicted[i]],
             "probability": float(proba[i, predicted[i]])} for i in wrong]
    columns = max(1, min(4, len(rows)))
    figure, axes = _figure(max(1, -(-len(rows) // 4)), columns, figsize=(3 * columns, 3.6 * max(1, -(-len(rows) // 4))),
                           squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    if not rows:
        axes[0, 0].text(0.5, 0.5, "no misclassified test images", ha="center", va="center")
    for axis, row in zip(axes.flat, rows):
        try:
            image = load_rgb(data_root / row["path"])
            image.thumbnail((256, 256))
            axis.imshow(image)
        except (BadImage, OSError) as error:
            axis.text(0.5, 0.5, f"cannot show: {error}", ha="center", va="center", wrap=True)
        axis.set_title(f"true {_short(row['true'], CLASS_CHARS)}\npredicted {_short(row['predicted'], CLASS_CHARS)} "
                       f"({row['probability']:.0%})", fontsize=9)
        axis.text(0.5, -0.02, _short(shown(row["path"]), FILE_CHARS, keep_end=True), transform=axis.transAxes,
                  ha="center", va="top", fontsize=8)
    figure.suptitle(title)
    return _save(figure, path), rows


def embedding_map(features: np.ndarray, labels: np.ndarray, classes: list[str], path: Path, seed: int = 0) -> Path:
    """PCA of the vectors, and t-SNE beside it where the set is small enough to embed quickly; colour by class,
    with a legend outside the axes up to ``LEGEND_MAX`` classes and none beyond.

    A 2-D map needs at least two vectors of at least two dimensions; with fewer the picture is a panel saying so.
    """
    if min(features.shape) < MAP_MINIMUM:
        figure, axis = _figure(figsize=(5.5, 4.5))
        axis.axis("off")
        axis.text(0.5, 0.5, f"no map: {features.shape[0]} test vector(s) of {features.shape[1]} dimension(s);\n"
                            f"a 2-D map needs at least {MAP_MINIMUM} of each", ha="center", va="center")
        return _save(figure, path)
    use_tsne = len(features) <= TSNE_MAX_POINTS
    legend = len(classes) <= LEGEND_MAX
    width = (10 if use_tsne else 5.5) + (2 if legend else 0)
    figure, axes = _figure(1, 2 if use_tsne else 1, figsize=(width, 4.5), squeeze=False)
    maps = [("PCA", PCA(n_components=2, random_state=seed).fit_transform(features))]
    if use_tsne:
        perplexity = min(30.0, (len(features) - 1) / 3)
        maps.append(("t-SNE", TSNE(n_components=2, perplexity=perplexity, random_state=seed, init="pca").fit_transform(features)))
    colours = _class_colours(len(classes))
    for axis, (name, points) in zip(axes.flat, maps):
        dots = axis.scatter(points[:, 0], points[:, 1], c=labels, cmap=colours, vmin=-0.5, vmax=len(classes) - 0.5,
                            s=8, alpha=0.7)
        axis.set_title(f"{name} of the cached test vectors" + ("" if legend else f"\n(colour: class, {len(classes)} classes)"))
        axis.set_xticks([]), axis.set_yticks([])
    if legend:
        handles, _ = dots.legend_elements(num=None)
        axis.legend(handles, [_short(classes[i], CLASS_CHARS) for i in np.unique(labels)], loc="upper left",
                    bbox_to_anchor=(1.02, 1), fontsize="small", title="class")
    return _save(figure, path)


SWEEP_BARS_MAX = 40  # sweep: runs shown (best first); the rest are in sweep.json


def sweep_scores(scores: list, path: Path) -> Path:
    """Validation accuracy of each run of a sweep (``RunScore``s, best first) as horizontal bars, the baseline's as a
    dashed line; at most ``SWEEP_BARS_MAX`` runs."""
    shown_runs = scores[:SWEEP_BARS_MAX]
    figure, axis = _figure(figsize=(8, 1.2 + 0.28 * len(shown_runs)))
    accuracies = [s.head_val_accuracy for s in shown_runs]
    axis.barh(range(len(shown_runs)), accuracies, color="tab:blue")
    axis.set_yticks(range(len(shown_runs)), [_short(s.name, 48) for s in shown_runs], fontsize=8)
    axis.invert_yaxis()
    axis.axvline(scores[0].logreg_val_accuracy, color="tab:orange", linestyle="--", label="logistic baseline")
    low = min([*accuracies, scores[0].logreg_val_accuracy])
    axis.set_xlim(max(0.0, low - 0.05), 1.0)
    axis.set_xlabel("validation accuracy of the head")
    axis.set_title(f"Sweep: {len(scores)} runs, best first" + (f" (top {len(shown_runs)})" if len(scores) > len(shown_runs) else ""))
    axis.legend(loc="lower right")
    return _save(figure, path)
