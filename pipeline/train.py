"""Stage two: train the head and the logistic baseline on the cached vectors alone (no images, no backbone)."""

from __future__ import annotations

import json
import logging
import pickle
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from pipeline.baseline import LogisticBaseline
from pipeline.config import Settings
from pipeline.errors import UserError
from pipeline.files import atomic_write_text, check_writable, disk_full_as_user_error, file_sha256
from pipeline.head import HeadClassifier, normalise_in_place
from pipeline.listing import AUGMENTED
from pipeline.memory import mapped_matrix
from pipeline.runs import TRAINING_FILE, read_training_record, seal, training_dir
from pipeline.store import FeatureStore, features_file

log = logging.getLogger(__name__)


HEAD_FILE = "head.pt"
AUGMENTED_HEAD_FILE = "head_augmented.pt"
BASELINE_FILE = "logreg.json"


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
    folder: Path


READ_ROWS = 8192  # vectors per block when reading the train split into place
STAGE_TWO_SETTINGS = ("lr", "hidden", "dropout", "seed", "epochs", "patience", "head_batch_size", "val_fraction",
                      "cv_folds", "final_fit", "normalisation", "class_weight")  # recorded in training.json


def _compress_rows(keep: np.ndarray, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``np.compress(keep, rows, axis=0, out=out)`` for float32 rows, by torch's ``index_select``, which copies rows on
    every core where numpy's compress is the slower (``make bench``, stage two); returns ``out``."""
    torch.index_select(torch.from_numpy(rows), 0, torch.from_numpy(np.flatnonzero(keep)), out=torch.from_numpy(out))
    return out


def _read_partitioned(store: FeatureStore, split: str, last: np.ndarray, normalisation: str) -> np.ndarray:
    """The split's vectors normalised by ``normalisation``, the rows where ``last`` is False first and those where it
    is True after, each part in store order: read block by block into one buffer, normalised there and compressed
    into place, so the only array of the split's size is the one returned."""
    X = mapped_matrix(len(last), store.feature_dim)
    buffer = mapped_matrix(min(READ_ROWS, len(last)), store.feature_dim)
    free = [0, len(last) - int(last.sum())]  # the next row to fill in each part
    for start in range(0, len(last), READ_ROWS):
        block = normalise_in_place(store.features(split, slice(start, start + READ_ROWS),
                                                  out=buffer[:min(READ_ROWS, len(last) - start)]), normalisation)
        for part, keep in enumerate((~last[start:start + len(block)], last[start:start + len(block)])):
            count = int(keep.sum())
            _compress_rows(keep, block, X[free[part]:free[part] + count])
            free[part] += count
    return X


@dataclass
class TrainingSet:
    """The train split's vectors, read once and normalised: training rows first, then the validation rows (those
    ``train_test_split`` drew, seeded by ``split_seed``), each part in store order, so both are views of one float32
    array."""
    X: np.ndarray
    y: np.ndarray
    paths: list[str]
    n_train: int
    n_classes: int
    split_seed: int
    views: tuple | None  # the cached augmented views (vectors, labels, paths), not normalised
    source: dict  # what the models were trained on, saved with each

    @property
    def train(self) -> tuple[np.ndarray, np.ndarray]:
        return self.X[:self.n_train], self.y[:self.n_train]

    @property
    def validation(self) -> tuple[np.ndarray, np.ndarray]:
        return self.X[self.n_train:], self.y[self.n_train:]


def read_training_set(settings: Settings, data: Path | None = None) -> TrainingSet:
    """The train split of the backbone's feature file, split (stratified, seeded by SEED) into training and
    validation rows and normalised as it is read; no copy of the train matrix is made."""
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
        validation = np.zeros(len(y), dtype=bool)
        validation[val_rows] = True
        order = np.concatenate([np.flatnonzero(~validation), np.flatnonzero(validation)])
        X = _read_partitioned(store, "train", validation, settings.normalisation)
        views = (store.features(AUGMENTED), store.labels(AUGMENTED), store.paths(AUGMENTED)) \
            if AUGMENTED in store.splits else None
        source = {"features_created": str(store.attrs["created"]), "backbone": store.backbone, "classes": classes,
                  "weights": store.fingerprint["weights"]}
    return TrainingSet(X, y[order], [paths[i] for i in order], len(train_rows), len(classes), settings.seed, views, source)


def fit_head(settings: Settings, data: TrainingSet) -> tuple[HeadClassifier, float]:
    """The head fitted on the training rows with the epoch chosen on the validation rows, and its seconds."""
    start = time.perf_counter()
    head = _new_head(settings).fit(*data.train, *data.validation, n_classes=data.n_classes, normalised=True)
    return head, time.perf_counter() - start


def fit_baseline(settings: Settings, data: TrainingSet) -> tuple[LogisticBaseline, float]:
    """The logistic baseline with C chosen on the validation rows (or by cross-validation), and its seconds."""
    start = time.perf_counter()
    baseline = LogisticBaseline(seed=settings.seed, cv_folds=settings.cv_folds, final_fit=settings.final_fit,
                                normalisation=settings.normalisation, class_weight=settings.class_weight)
    baseline.fit(*data.train, *data.validation, n_classes=data.n_classes, normalised=True)
    return baseline, time.perf_counter() - start


def _fit_on_views(settings: Settings, data: TrainingSet, path: Path) -> dict:
    """A second head on the training images plus their cached augmented views (never those of validation images)."""
    X_views, y_views, view_paths = data.views
    training_images = set(data.paths[:data.n_train])
    keep = np.array([p in training_images for p in view_paths], dtype=bool)
    start = time.perf_counter()
    log.info(f"train-head: head on {data.n_train} images + {keep.sum()} augmented views")
    X, y = data.train
    joined = mapped_matrix(len(X) + int(keep.sum()), X.shape[1])
    joined[:len(X)] = X
    normalise_in_place(_compress_rows(keep, X_views, joined[len(X):]), settings.normalisation)
    head = _new_head(settings)
    head.fit(joined, np.concatenate([y, y_views[keep]]), *data.validation, n_classes=data.n_classes, normalised=True)
    head.save(path, **data.source)
    return {"n_views": int(keep.sum()), "views_per_image": len(view_paths) // max(1, len(data.paths)),
            "seconds": time.perf_counter() - start}


def save_run(settings: Settings, data: TrainingSet, head: HeadClassifier, head_seconds: float,
             baseline: LogisticBaseline, baseline_seconds: float) -> Path:
    """Write the run's models (and the augmented head when views are cached), then ``training.json`` last, into
    ``training_dir(settings)``; returns that folder. A model file not matching training.json is never read."""
    folder = training_dir(settings)
    with disk_full_as_user_error(settings.backbone_dir(), "train-head"):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / AUGMENTED_HEAD_FILE).unlink(missing_ok=True)
        augmented = _fit_on_views(settings, data, folder / AUGMENTED_HEAD_FILE) \
            if data.views is not None and len(data.views[1]) else {}
        head.save(folder / HEAD_FILE, **data.source)
        baseline.save(folder / BASELINE_FILE, **data.source)
        best = head.history_[head.best_epoch_ - 1]
        record = {
            **data.source,
            "run": folder.name,
            "n_train": data.n_train,
            "n_val": len(data.y) - data.n_train,
            "seed": settings.seed,
            "split_seed": data.split_seed,
            "settings": {name: getattr(settings, name) for name in STAGE_TWO_SETTINGS},
            "validation": {"head_accuracy": best.val_accuracy, "head_loss": best.val_loss,
                           "logreg_accuracy": baseline.val_scores_[baseline.C_]["val_accuracy"],
                           "logreg_loss": baseline.val_scores_[baseline.C_]["val_log_loss"]},
            "head_seconds": head_seconds,
            "logreg_seconds": baseline_seconds,
            "augmented": augmented,
            "choices": choices_record(settings, head, baseline),
            "files": {f: file_sha256(folder / f) for f in (HEAD_FILE, BASELINE_FILE, AUGMENTED_HEAD_FILE)
                      if (folder / f).is_file()},
        }
        atomic_write_text(folder / TRAINING_FILE, json.dumps({**record, "sha256": seal(record)}, indent=2))
    return folder


def train(settings: Settings, data: Path | None = None) -> TrainResult:
    """Train head and baseline (and the augmented head when views are cached) and keep them as one run (see
    ``pipeline.runs``); the cache folder is checked writable before any fitting."""
    training = read_training_set(settings, data)
    check_writable(settings.backbone_dir())
    head, head_seconds = fit_head(settings, training)
    baseline, baseline_seconds = fit_baseline(settings, training)
    folder = save_run(settings, training, head, head_seconds, baseline, baseline_seconds)
    log.info(f"train-head: head best epoch {head.best_epoch_} (val accuracy {head.history_[head.best_epoch_ - 1].val_accuracy:.1%}), "
          f"fitted on {head.n_fitted_}, {head_seconds:.1f} s | logreg C={baseline.C_:.3g} by {baseline.selection_} "
          f"(val accuracy {baseline.val_scores_[baseline.C_]['val_accuracy']:.1%}), fitted on {baseline.n_fitted_}, "
          f"{baseline_seconds:.1f} s | saved as run {folder.name} in {folder.parent}")
    return TrainResult(head, baseline, training.n_train, len(training.y) - training.n_train, head_seconds,
                       baseline_seconds, folder)
