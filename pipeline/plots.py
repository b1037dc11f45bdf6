"""The report's pictures (matplotlib, written as PNG): learning curves, confusion matrices, most
confidently wrong test images, and a 2-D map of the cached vectors."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402
from sklearn.manifold import TSNE  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay  # noqa: E402

from pipeline.files import atomic_write  # noqa: E402
from pipeline.images import BadImage, load_rgb  # noqa: E402

TSNE_MAX_POINTS = 1500
MAP_MINIMUM = 2  # vectors, and dimensions, that a 2-D map needs


def _save(figure: plt.Figure, path: Path) -> Path:
    """Write the figure as PNG atomically; it is closed either way."""
    try:
        figure.tight_layout()
        atomic_write(path, lambda f: figure.savefig(f, format="png", dpi=100))
    finally:
        plt.close(figure)
    return path


def learning_curves(history: list[dict], best_epoch: int, path: Path) -> Path:
    epochs = [h["epoch"] for h in history]
    figure, (loss, accuracy) = plt.subplots(1, 2, figsize=(10, 3.6))
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
    figure, axes = plt.subplots(1, len(matrices), figsize=(4.5 * len(matrices), 4))
    for axis, (name, matrix) in zip(np.atleast_1d(axes), matrices.items()):
        ConfusionMatrixDisplay(np.array(matrix), display_labels=classes).plot(ax=axis, colorbar=False, cmap="Blues")
        axis.set_title(name)
    return _save(figure, path)


def top_losses(data_root: Path, paths: list[str], labels: np.ndarray, proba: np.ndarray, classes: list[str],
               title: str, path: Path, count: int = 8) -> tuple[Path, list[dict]]:
    """The most confidently wrong test images, like fastai's ``plot_top_losses``."""
    predicted = proba.argmax(1)
    wrong = np.flatnonzero(predicted != labels)
    wrong = wrong[np.argsort(-proba[wrong, predicted[wrong]])][:count]
    rows = [{"path": paths[i], "true": classes[labels[i]], "predicted": classes[predicted[i]],
             "probability": float(proba[i, predicted[i]])} for i in wrong]
    columns = max(1, min(4, len(rows)))
    figure, axes = plt.subplots(max(1, -(-len(rows) // 4)), columns, figsize=(3 * columns, 3.3 * max(1, -(-len(rows) // 4))),
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
        axis.set_title(f"true {row['true']}\npredicted {row['predicted']} ({row['probability']:.0%})", fontsize=9)
    figure.suptitle(title)
    return _save(figure, path), rows


def embedding_map(features: np.ndarray, labels: np.ndarray, classes: list[str], path: Path, seed: int = 0) -> Path:
    """PCA of the vectors, and t-SNE beside it where the set is small enough to embed quickly.

    A 2-D map needs at least two vectors of at least two dimensions; with fewer the picture is a panel saying so.
    """
    if min(features.shape) < MAP_MINIMUM:
        figure, axis = plt.subplots(figsize=(5.5, 4.5))
        axis.axis("off")
        axis.text(0.5, 0.5, f"no map: {features.shape[0]} test vector(s) of {features.shape[1]} dimension(s);\n"
                            f"a 2-D map needs at least {MAP_MINIMUM} of each", ha="center", va="center")
        return _save(figure, path)
    use_tsne = len(features) <= TSNE_MAX_POINTS
    figure, axes = plt.subplots(1, 2 if use_tsne else 1, figsize=(10 if use_tsne else 5.5, 4.5), squeeze=False)
    maps = [("PCA", PCA(n_components=2, random_state=seed).fit_transform(features))]
    if use_tsne:
        perplexity = min(30.0, (len(features) - 1) / 3)
        maps.append(("t-SNE", TSNE(n_components=2, perplexity=perplexity, random_state=seed, init="pca").fit_transform(features)))
    for axis, (name, points) in zip(axes.flat, maps):
        for index, name_of_class in enumerate(classes):
            mask = labels == index
            axis.scatter(points[mask, 0], points[mask, 1], s=8, alpha=0.7, label=name_of_class)
        axis.set_title(f"{name} of the cached test vectors")
        axis.set_xticks([]), axis.set_yticks([])
        axis.legend(markerscale=2)
    return _save(figure, path)
