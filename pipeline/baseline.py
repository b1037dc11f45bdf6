"""The baseline: standardised logistic regression (scikit-learn), C chosen on the validation split.

Saved as JSON coefficients, not a pickle: readable anywhere, safe to load, exact float round trip.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, log_loss
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_X_y

from pipeline.files import atomic_write_text

C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)
MAX_ITER = 2000


class LogisticBaseline:
    def __init__(self, Cs: tuple[float, ...] = C_GRID, seed: int = 0):
        self.Cs, self.seed = Cs, seed

    def fit(self, X, y, X_val, y_val, n_classes: int | None = None) -> LogisticBaseline:
        """Fit one model per C on (X, y); keep the best validation accuracy (ties: lower log loss)."""
        X, y = check_X_y(X, y, dtype=np.float64)
        X_val, y_val = check_X_y(X_val, y_val, dtype=np.float64)
        labels = np.arange(n_classes or max(y.max(), y_val.max()) + 1)
        self.val_scores_: dict[float, dict[str, float]] = {}
        best_key = None
        for C in self.Cs:
            model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=MAX_ITER, random_state=self.seed)).fit(X, y)
            proba = model.predict_proba(X_val)
            accuracy = accuracy_score(y_val, model.classes_[proba.argmax(1)])
            loss = log_loss(y_val, proba, labels=model.classes_)
            self.val_scores_[C] = {"val_accuracy": float(accuracy), "val_log_loss": float(loss)}
            if best_key is None or (accuracy, -loss) > best_key:
                best_key, self.C_, self.pipeline_ = (accuracy, -loss), C, model
        self.classes_ = labels
        return self

    def predict_proba(self, X) -> np.ndarray:
        """Probabilities over all classes (zero for a class absent from the training labels)."""
        proba = np.zeros((len(X), len(self.classes_)))
        proba[:, self.pipeline_.classes_] = self.pipeline_.predict_proba(np.asarray(X, dtype=np.float64))
        return proba

    def predict(self, X) -> np.ndarray:
        return self.predict_proba(X).argmax(1)

    def score(self, X, y) -> float:
        return float(accuracy_score(y, self.predict(X)))

    def save(self, path: Path, **metadata) -> None:
        """The coefficients and ``metadata`` as JSON, written atomically."""
        scaler, logreg = self.pipeline_.named_steps["standardscaler"], self.pipeline_.named_steps["logisticregression"]
        atomic_write_text(path, json.dumps({
            "C": self.C_,
            "classes": self.classes_.tolist(),
            "fitted_classes": logreg.classes_.tolist(),
            "mean": scaler.mean_.tolist(),
            "scale": scaler.scale_.tolist(),
            "coef": logreg.coef_.tolist(),
            "intercept": logreg.intercept_.tolist(),
            "val_scores": {str(C): s for C, s in self.val_scores_.items()},
            **metadata,
        }))

    @classmethod
    def load(cls, path: Path) -> tuple[LogisticBaseline, dict]:
        """The fitted baseline, rebuilt as a scikit-learn pipeline from its coefficients, and the file's content."""
        saved = json.loads(Path(path).read_text())
        scaler = StandardScaler()
        scaler.mean_, scaler.scale_ = np.array(saved["mean"]), np.array(saved["scale"])
        scaler.var_, scaler.n_features_in_, scaler.n_samples_seen_ = scaler.scale_ ** 2, len(scaler.mean_), 0
        logreg = LogisticRegression(C=saved["C"])
        logreg.coef_, logreg.intercept_ = np.array(saved["coef"]), np.array(saved["intercept"])
        logreg.classes_, logreg.n_features_in_ = np.array(saved["fitted_classes"]), len(scaler.mean_)
        baseline = cls()
        baseline.C_, baseline.classes_ = saved["C"], np.array(saved["classes"])
        baseline.val_scores_ = {float(C): s for C, s in saved["val_scores"].items()}
        baseline.pipeline_ = Pipeline([("standardscaler", scaler), ("logisticregression", logreg)])
        return baseline, saved
