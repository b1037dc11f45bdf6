"""Stage two: train the head and the logistic baseline on the cached vectors alone (no images, no backbone)."""

from __future__ import annotations

import hashlib
import json
import pickle
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from pipeline.baseline import LogisticBaseline
from pipeline.config import Settings
from pipeline.errors import UserError
from pipeline.files import atomic_write_text, check_writable, disk_full_as_user_error, file_sha256
from pipeline.head import HeadClassifier, normalise_in_place
from pipeline.listing import AUGMENTED
from pipeline.store import FeatureStore, features_file

HEAD_FILE = "head.pt"
AUGMENTED_HEAD_FILE = "head_augmented.pt"
BASELINE_FILE = "logreg.json"
TRAINING_FILE = "training.json"


def _seal(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def read_training_record(folder: Path) -> dict:
    """``training.json``: what the last completed ``train-head`` wrote (written last, after the model files): its
    settings and the sha256 of every model file. Missing, damaged or edited, it is a UserError."""
    path = folder / TRAINING_FILE
    if not path.is_file():
        raise UserError(f"no {path}; run `make train-head` with the same BACKBONE and CACHE first")
    try:
        record = json.loads(path.read_text())
        intact = record.pop("sha256") == _seal(record)
    except (ValueError, KeyError, TypeError, AttributeError):
        intact = False
    if not intact:
        raise UserError(f"{path} is damaged; run `make train-head` again")
    return record


def load_trained(folder: Path, model: str) -> tuple:
    """A trained classifier saved by ``train``, and its saved metadata: model is head, logreg or head_augmented.

    The file must be the one the last completed ``train-head`` recorded in ``training.json`` (same sha256), so a
    damaged file, or one left by an interrupted run beside another run's files, is a UserError, never other numbers.
    """
    file, kind = {"head": (HEAD_FILE, HeadClassifier), "logreg": (BASELINE_FILE, LogisticBaseline),
                  "head_augmented": (AUGMENTED_HEAD_FILE, HeadClassifier)}[model]
    if not (folder / file).is_file():
        raise UserError(f"no trained {model} at {folder / file}; run `make train-head` with the same BACKBONE and CACHE first")
    if read_training_record(folder)["files"].get(file) != file_sha256(folder / file):
        raise UserError(f"{folder / file} is not the one the last completed train-head wrote (damaged, or left by an "
                        f"interrupted run); run `make train-head` again")
    try:
        return kind.load(folder / file)
    except (OSError, RuntimeError, EOFError, ValueError, KeyError, TypeError, pickle.UnpicklingError) as error:
        raise UserError(f"cannot read the trained {model} at {folder / file} ({type(error).__name__}); "
                        f"run `make train-head` again") from None


def _new_head(settings: Settings) -> HeadClassifier:
    return HeadClassifier(settings.hidden, settings.dropout, settings.lr, settings.epochs, settings.head_batch_size,
                          settings.patience, settings.seed, verbose=True, normalisation=settings.normalisation,
                          class_weight=settings.class_weight, final_fit=settings.final_fit)


def open_features(settings: Settings, data: Path | None = None) -> FeatureStore:
    """The backbone's feature file, checked to be made by that backbone (and from ``data``, when given)."""
    store = FeatureStore(features_file(settings.backbone_dir()))
    if store.backbone != settings.backbone:
        store.file.close()
        raise UserError(f"{store.path} was made by backbone {store.backbone}, not {settings.backbone}; "
                        f"pass BACKBONE={store.backbone} or run `make features BACKBONE={settings.backbone}`")
    if data is not None and Path(store.attrs["data_root"]) != Path(data).resolve():
        store.file.close()
        raise UserError(f"{store.path} was made from {store.attrs['data_root']}, not {Path(data).resolve()}; "
                        f"run `make features DATA={data}` first")
    return store


def _train_on_views(settings: Settings, X, y, paths, train_rows, val_rows, views, n_classes: int, path: Path,
                    source: dict) -> dict:
    """A second head on the training images plus their cached augmented views (never those of validation images);
    X is already normalised, the views are not."""
    X_views, y_views, view_paths = views
    training_images = {paths[i] for i in train_rows}
    keep = np.array([p in training_images for p in view_paths], dtype=bool)
    start = time.perf_counter()
    print(f"train-head: head on {len(train_rows)} images + {keep.sum()} augmented views")
    head = _new_head(settings)
    head.fit(np.concatenate([X[train_rows], normalise_in_place(X_views[keep], settings.normalisation)]),
             np.concatenate([y[train_rows], y_views[keep]]), X[val_rows], y[val_rows], n_classes=n_classes, normalised=True)
    head.save(path, **source)
    return {"n_views": int(keep.sum()), "views_per_image": len(view_paths) // max(1, len(paths)),
            "seconds": time.perf_counter() - start}


def choices_record(settings: Settings, head: HeadClassifier, baseline: LogisticBaseline) -> dict:
    """What stage two chose and how, for training.json and the report: the settings that shape the models, the head's
    epoch and the baseline's C, how each was chosen and how many vectors the final models were fitted on."""
    return {
        "normalisation": settings.normalisation,
        "class_weight": settings.class_weight,
        "final_fit": settings.final_fit,
        "head_epoch": head.best_epoch_,
        "head_epoch_chosen_by": "validation split",
        "head_fitted_on": head.n_fitted_,
        "logreg_C": baseline.C_,
        "logreg_C_grid": list(baseline.Cs_),
        "logreg_C_chosen_by": baseline.selection_,
        "logreg_fitted_on": baseline.n_fitted_,
    }


@dataclass
class TrainResult:
    head: HeadClassifier
    baseline: LogisticBaseline
    n_train: int
    n_val: int
    head_seconds: float
    baseline_seconds: float


READ_ROWS = 8192  # vectors per block when reading the train split into place


def _read_in_order(store: FeatureStore, split: str, order: np.ndarray) -> np.ndarray:
    """``store.features(split)[order]``, read block by block straight into its place: one array, never a second copy."""
    position = np.empty_like(order)
    position[order] = np.arange(len(order))
    X = np.empty((len(order), store.feature_dim), dtype=np.float32)
    for start in range(0, len(order), READ_ROWS):
        X[position[start:start + READ_ROWS]] = store.features(split, slice(start, start + READ_ROWS))
    return X


def train(settings: Settings, data: Path | None = None) -> TrainResult:
    """Train head, baseline (and the augmented head when views are cached); the output folder is checked writable first.

    The train vectors are held once, training rows first and validation rows after (as ``train_test_split``
    ordered them), so both parts are views of one float32 array: no copy of the train matrix is made. That array is
    normalised in place once, and head and baseline are fitted on it as already normalised.
    """
    folder = settings.backbone_dir()
    with open_features(settings, data) as store:
        y, classes, paths = store.labels("train"), store.classes, store.paths("train")
        counts = np.bincount(y, minlength=len(classes))
        if counts.min() < 2:
            raise UserError(f"class '{classes[counts.argmin()]}' has {counts.min()} usable train images; "
                            f"the stratified validation split needs at least 2 per class")
        try:
            train_rows, val_rows = train_test_split(np.arange(len(y)), test_size=settings.val_fraction, stratify=y,
                                                    random_state=settings.seed)
        except ValueError as error:
            raise UserError(f"cannot carve a stratified validation split ({error}); change --val-fraction") from None
        order = np.concatenate([train_rows, val_rows])
        X = _read_in_order(store, "train", order)
        views = (store.features(AUGMENTED), store.labels(AUGMENTED), store.paths(AUGMENTED)) if AUGMENTED in store.splits else None
        source = {"features_created": str(store.attrs["created"]), "backbone": store.backbone, "classes": classes,
                  "weights": store.fingerprint["weights"]}
    y, paths, n_train = y[order], [paths[i] for i in order], len(train_rows)
    train_rows, val_rows = np.arange(n_train), np.arange(n_train, len(y))
    normalise_in_place(X, settings.normalisation)
    X_train, y_train, X_val, y_val = X[:n_train], y[:n_train], X[n_train:], y[n_train:]  # views
    check_writable(folder)
    start = time.perf_counter()
    head = _new_head(settings)
    head.fit(X_train, y_train, X_val, y_val, n_classes=len(classes), normalised=True)
    head_seconds = time.perf_counter() - start
    start = time.perf_counter()
    baseline = LogisticBaseline(seed=settings.seed, cv_folds=settings.cv_folds, final_fit=settings.final_fit,
                                normalisation=settings.normalisation, class_weight=settings.class_weight)
    baseline.fit(X_train, y_train, X_val, y_val, n_classes=len(classes), normalised=True)
    baseline_seconds = time.perf_counter() - start
    augmented = {}
    with disk_full_as_user_error(folder, "train-head"):
        (folder / AUGMENTED_HEAD_FILE).unlink(missing_ok=True)
        if views is not None and len(views[1]):
            augmented = _train_on_views(settings, X, y, paths, train_rows, val_rows, views, len(classes),
                                        folder / AUGMENTED_HEAD_FILE, source)
        head.save(folder / HEAD_FILE, **source)
        baseline.save(folder / BASELINE_FILE, **source)
        record = {
            **source,
            "n_train": len(train_rows),
            "n_val": len(val_rows),
            "seed": settings.seed,
            "head_seconds": head_seconds,
            "logreg_seconds": baseline_seconds,
            "augmented": augmented,
            "choices": choices_record(settings, head, baseline),
            "files": {f: file_sha256(folder / f) for f in (HEAD_FILE, BASELINE_FILE, AUGMENTED_HEAD_FILE) if (folder / f).is_file()},
        }
        atomic_write_text(folder / TRAINING_FILE, json.dumps({**record, "sha256": _seal(record)}, indent=2))
    print(f"train-head: head best epoch {head.best_epoch_} (val accuracy {head.history_[head.best_epoch_ - 1].val_accuracy:.1%}), "
          f"fitted on {head.n_fitted_}, {head_seconds:.1f} s | logreg C={baseline.C_:.3g} by {baseline.selection_} "
          f"(val accuracy {baseline.val_scores_[baseline.C_]['val_accuracy']:.1%}), fitted on {baseline.n_fitted_}, "
          f"{baseline_seconds:.1f} s | saved to {folder}")
    return TrainResult(head, baseline, len(train_rows), len(val_rows), head_seconds, baseline_seconds)
