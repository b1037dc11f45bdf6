"""The baseline: L2-regularised multinomial logistic regression on standardised (by default power-normalised) vectors.

C is chosen from ``C_GRID`` (10^-2 to 10^3, two per decade; one per decade above ``SMALL_FIT`` train vectors, where
the validation score is flat between neighbours) on the validation split, the path stopping once ``PATH_PATIENCE``
Cs in a row score no better than the best so far (it takes the validation score to have one peak along C; the Cs
past it, so skipped, are the costliest fits when classes overlap), or, with ``cv_folds`` k >= 2, by
stratified k-fold cross-validation over train and validation together when they hold at most ``CV_MAX_VECTORS``
vectors (with 30 images per class a 10% validation split is 3 images per class); then the model is refitted at
that C on train and validation together (``final_fit``, see ``head.refits``), as scikit-learn's
``LogisticRegressionCV(refit=True)``.
``class_weight`` "balanced" weighs each vector's log loss as scikit-learn's ``class_weight="balanced"``.

It is scikit-learn's ``make_pipeline(StandardScaler(), LogisticRegression(C=C))`` (lbfgs), preceded by the
normalisation (a ``FunctionTransformer``), fitted by a path over the C grid instead of one cold fit per C:

- the same objective: C * (sum of log losses) + 0.5 * ||W||^2 on standardised vectors, intercept unpenalised
  (binary: one weight vector, as scikit-learn does), minimised by the same optimiser (SciPy's L-BFGS-B) with
  scikit-learn's stopping rule (``gtol`` TOL on the mean-scaled objective, ``maxls`` 50, at most MAX_ITER);
- the C grid is walked in increasing order, each fit starting from the previous solution (a warm start: most
  of the work of a weakly regularised fit is already done by the more regularised one before it), or from
  one more step along the line through the last two solutions when that has the lower objective. A warm
  start must also cut the gradient that the change of C adds 100-fold (WARM_REDUCTION, WARM_FLOOR): with
  TOL alone, at 10^5 vectors the larger Cs would keep the previous solution unchanged;
- loss and gradient are computed by torch in float32, in row blocks, on the vectors as given: the normalisation is
  applied block by block and the standardisation is folded into the weights (X/s @ W = X @ (W/s)), so there is no
  float64 copy, no normalised or scaled copy of X, no copy of train and validation joined, and no N x C matrix
  larger than a block. On CUDA when ``torch.cuda.is_available()``. Only the cross-validation, at most
  ``CV_MAX_VECTORS`` vectors, copies its folds.

The fitted model is then the scikit-learn pipeline built from those coefficients, so prediction, and the
JSON file (coefficients, not a pickle: readable anywhere, safe to load, exact float round trip), are as before.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import minimize
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, log_loss
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler
from sklearn.utils.validation import check_X_y
from threadpoolctl import ThreadpoolController

from pipeline.files import atomic_write_text
from pipeline.head import (PRE_ACCURACY_PARAMS, SMALL_FIT, ValidatedClassifier, balanced_class_weights, normalise,
                           normalise_in_place, refits, training_device)
from pipeline.memory import mapped_matrix

C_GRID = tuple(float(10.0 ** (e / 2)) for e in range(-4, 7))  # 10^-2 .. 10^3, two per decade
PATH_PATIENCE = 2  # the validation path stops after this many Cs in a row no better than the best
CV_MAX_VECTORS = 20_000  # up to this many train + validation vectors C is chosen by cross-validation
MAX_ITER = 2000
PREDICT_ROWS = 1024  # vectors per block of predict_proba
TOL = 1e-4  # scikit-learn's default
# A warm start must also cut the gradient that the change of C adds at its start WARM_REDUCTION-fold (but need
# not go below WARM_FLOOR): the objective is scaled by 1/N, so at 10^5 vectors that gradient is already below
# TOL, and TOL alone would leave the previous C's solution unchanged (a cold start begins far from any optimum).
WARM_REDUCTION = 1e-2
WARM_FLOOR = 1e-5
BLOCK_ROWS = 8192  # rows per block of the loss and gradient: bounds the N x C temporaries


@functools.cache
def _bundled_files() -> frozenset[Path]:
    """The files of numpy's and SciPy's own distributions whose names mention BLAS, resolved (a pip wheel of either
    bundles its own OpenBLAS)."""
    return frozenset(Path(file.locate()).resolve() for dist in ("numpy", "scipy")
                     for file in importlib.metadata.files(dist) or () if "blas" in file.name)


def sequential_numpy_blas() -> AbstractContextManager:
    """A context in which the BLAS libraries that numpy and SciPy bundle run on one thread.

    A fit alternates torch's loss and gradient with L-BFGS-B's steps and small numpy products; an idle OpenBLAS
    thread keeps spinning for a while after each of those, on the cores torch's threads need next (``make bench``,
    stage two: the baseline's fit). The BLAS work outside torch is a few vectors of the parameters' size per step, too
    little to gain from threads. A BLAS that numpy shares with torch (a conda or system library) is left alone: torch's
    matmuls run on it. The limit is process-wide: two fits in threads of one process would end with one thread.
    """
    controller = ThreadpoolController()
    bundled = [lib.filepath for lib in controller.select(user_api="blas").lib_controllers
               if Path(lib.filepath).resolve() in _bundled_files()]
    return controller.select(filepath=bundled).limit(limits=1)


def _blocks(parts: Sequence, block: int, normalisation: str) -> Iterator[tuple[int, np.ndarray | torch.Tensor]]:
    """(row offset, normalised block) over the rows of ``parts`` as if joined, ``block`` rows at most each."""
    offset = 0
    for part in parts:
        for start in range(0, len(part), block):
            yield offset + start, normalise(part[start:start + block], normalisation)
        offset += len(part)


def standardiser(*parts: np.ndarray, block: int = 2048, normalisation: str = "none") -> tuple[np.ndarray, np.ndarray]:
    """StandardScaler's mean_ and scale_ (float64, population std; constant features get scale 1) of the normalised
    rows of ``parts`` taken together, in row blocks (no copy of a part)."""
    n = sum(len(part) for part in parts)
    mean = np.zeros(parts[0].shape[1])
    for _, rows in _blocks(parts, block, normalisation):
        mean += rows.sum(axis=0, dtype=np.float64)
    mean /= n
    var = np.zeros(parts[0].shape[1])
    for _, rows in _blocks(parts, block, normalisation):
        centred = rows.astype(np.float64)
        centred -= mean
        var += np.einsum("ij,ij->j", centred, centred)
    var /= n
    eps = np.finfo(np.float64).eps
    constant = var <= n * eps * var + (n * mean * eps) ** 2  # scikit-learn's test for a constant feature
    scale = np.sqrt(var)
    scale[constant | (scale == 0)] = 1.0
    return mean, scale


def as_pipeline(mean, scale, coef, intercept, fitted_classes, C: float, normalisation: str = "none") -> Pipeline:
    """The scikit-learn (normalisation +) StandardScaler + LogisticRegression pipeline with these parameters (no
    fitting)."""
    scaler = StandardScaler()
    scaler.mean_, scaler.scale_ = np.array(mean, dtype=np.float64), np.array(scale, dtype=np.float64)
    scaler.var_, scaler.n_features_in_, scaler.n_samples_seen_ = scaler.scale_ ** 2, len(scaler.mean_), 0
    logreg = LogisticRegression(C=C)
    # C order, as a loaded file gives it: the same layout gives the same float sums, so loaded = fitted, bit for bit
    logreg.coef_, logreg.intercept_ = np.ascontiguousarray(coef, dtype=np.float64), np.array(intercept, dtype=np.float64)
    logreg.classes_, logreg.n_features_in_ = np.array(fitted_classes), len(scaler.mean_)
    steps = [("standardscaler", scaler), ("logisticregression", logreg)]
    if normalisation != "none":
        steps.insert(0, ("normalise", FunctionTransformer(normalise, kw_args={"kind": normalisation})))
    return Pipeline(steps)


class _Objective:
    """scikit-learn's lbfgs objective for standardised X, scaled by 1/N: mean (weighted) log loss + ||W||^2 / (2 C N).

    X is the rows of ``parts`` taken together (never joined into one array), normalised block by block. Parameters
    are one float64 vector: W (D x K, K = 1 for two classes) then the K intercepts, for the standardised features.
    X itself is never standardised: logits are X @ (W/s) + (b - (m/s) @ W). ``weights``: one per class code, or None.
    """

    def __init__(self, parts: Sequence[np.ndarray], codes: np.ndarray, n_fitted: int, mean, scale, device: torch.device,
                 normalisation: str, weights: np.ndarray | None):
        self.n, self.dim = sum(len(part) for part in parts), parts[0].shape[1]
        self.k = 1 if n_fitted == 2 else n_fitted
        self.device, self.normalisation = device, normalisation
        self.parts = [torch.from_numpy(part).to(device) for part in parts]  # views on the CPU; copies on an accelerator
        self.codes = torch.from_numpy(codes.astype(np.int64, copy=False)).to(device)
        self.row_weights = None if weights is None else \
            torch.from_numpy(weights.astype(np.float32)).to(device)[self.codes]
        self.mean, self.scale = mean, scale
        self.C = 1.0
        self.evaluations = 0
        self._recent: list[tuple] = []  # (w, data term) of the last two w evaluated (see _data_term)

    def split(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return w[:self.dim * self.k].reshape(self.dim, self.k), w[self.dim * self.k:]

    def folded(self, w: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights and intercepts that act on the normalised, unstandardised vectors, float32 on the device."""
        W, b = self.split(w)
        W_raw = W / self.scale[:, None]
        b_raw = b - self.mean @ W_raw
        as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(self.device)  # noqa: E731
        return as_tensor(W_raw), as_tensor(b_raw)

    def logits(self, parts: Sequence[torch.Tensor], w: np.ndarray) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(row offset, normalised block, its logits) over ``parts``, block by block."""
        W, b = self.folded(w)
        for start, rows in _blocks(parts, BLOCK_ROWS, self.normalisation):
            yield start, rows, torch.addmm(b, rows, W)

    def __call__(self, w: np.ndarray) -> tuple[float, np.ndarray]:
        W, _ = self.split(w)
        data_value, data_grad_W, data_grad_b = self._data_term(w)
        penalty = 1.0 / (self.C * self.n)
        value = data_value + 0.5 * penalty * float(np.dot(w[:W.size], w[:W.size]))
        return value, np.concatenate([(data_grad_W + penalty * W).ravel(), data_grad_b])

    def _data_term(self, w: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        """The mean (weighted) log loss at ``w`` and its gradient (W, b). It does not depend on C, so it is kept for the
        last two ``w`` asked: L-BFGS-B asks for its start again, and a warm start for the solution at the C before."""
        for seen, term in self._recent:
            if np.array_equal(seen, w):
                return term
        self.evaluations += 1
        loss = torch.zeros((), dtype=torch.float64, device=self.device)
        grad_W = torch.zeros((self.dim, self.k), dtype=torch.float64, device=self.device)
        grad_b = torch.zeros(self.k, dtype=torch.float64, device=self.device)
        for start, rows, z in self.logits(self.parts, w):
            codes = self.codes[start:start + len(z)]
            # exponents are clamped at -75 (e^-75 ~ 3e-33): float32 denormals (below 1.2e-38, also after dividing by the
            # sum of up to 10^5 class terms) make exp and matmul 10x slower, and a
            # probability below 1e-38 changes nothing
            if self.k == 1:  # binomial: log(1 + e^z) - y z, gradient sigmoid(z) - y
                target = codes.to(z.dtype)[:, None]
                e = torch.exp(torch.clamp(-z.abs(), min=-75.0))
                row_loss = torch.relu(z) + torch.log1p(e) - target * z
                residual = torch.where(z >= 0, 1 / (1 + e), e / (1 + e)) - target
            else:  # multinomial: logsumexp(z) - z_y, gradient softmax(z) - onehot(y)
                top = z.amax(dim=1, keepdim=True)
                picked = z.gather(1, codes[:, None])
                residual = z.sub_(top).clamp_(min=-75.0).exp_()  # in place: z is not needed any more
                total = residual.sum(dim=1, keepdim=True)
                row_loss = top + torch.log(total) - picked
                residual /= total
                residual[torch.arange(len(z), device=self.device), codes] -= 1
            if self.row_weights is not None:
                weights = self.row_weights[start:start + len(z), None]
                row_loss, residual = row_loss * weights, residual * weights
            loss += row_loss.sum(dtype=torch.float64)
            grad_W += (residual.T @ rows).T.double()  # R^T X: the faster orientation
            grad_b += residual.sum(0, dtype=torch.float64)
        grad_W, grad_b = grad_W.cpu().numpy(), grad_b.cpu().numpy()
        # back to the standardised parametrisation: dL/dW = (X^T R - m (1^T R)) / s
        grad_W = (grad_W - self.mean[:, None] * grad_b[None, :]) / self.scale[:, None]
        term = (loss.item() / self.n, grad_W / self.n, grad_b / self.n)
        self._recent = [*self._recent[-1:], (w.copy(), term)]
        return term

    def proba(self, X: torch.Tensor, w: np.ndarray) -> np.ndarray:
        """Probabilities over the fitted classes (float64), as scikit-learn's predict_proba gives them."""
        z = torch.cat([block for _, _, block in self.logits([X], w)]).double()
        if self.k == 1:
            p = torch.sigmoid(z)
            return torch.cat([1 - p, p], dim=1).cpu().numpy()
        return torch.softmax(z, dim=1).cpu().numpy()

    def minimise(self, C: float, start: np.ndarray, gtol: float) -> tuple[np.ndarray, int]:
        """The solution at C from ``start`` (SciPy's L-BFGS-B, scikit-learn's settings but ``gtol``), its iterations."""
        self.C = C
        result = minimize(self, start, method="L-BFGS-B", jac=True,
                          options={"maxiter": MAX_ITER, "maxls": 50, "gtol": gtol, "ftol": 64 * np.finfo(float).eps})
        return result.x, int(result.nit)


@dataclass(frozen=True)
class _Fitted:
    """A fitted model in the standardised parametrisation: standardisation, fitted classes, W (D x K) and b (K)."""
    mean: np.ndarray
    scale: np.ndarray
    classes: np.ndarray
    W: np.ndarray
    b: np.ndarray


def _rank(scores: tuple[float, float]) -> tuple[float, float]:
    """Validation (accuracy, log loss) as a key to maximise: accuracy first, then the lower log loss."""
    return scores[0], -scores[1]


class LogisticBaseline(ValidatedClassifier):
    """See the module's docstring. ``cv_folds`` below 2 (or a train split above ``CV_MAX_VECTORS``): C is chosen on
    the validation split; without a refit (``final_fit``) the model is the one fitted on X alone. ``Cs`` None: the
    grid by the train size (see the module); ``Cs_`` holds the grid used."""

    def __init__(self, Cs: tuple[float, ...] | None = None, seed: int = 0, tol: float = TOL, device: str = "auto",
                 cv_folds: int = 0, final_fit: str = "auto", normalisation: str = "power",
                 class_weight: str = "balanced", validation_fraction: float = 0.1):
        self.Cs, self.seed, self.tol, self.device = Cs, seed, tol, device
        self.cv_folds, self.final_fit, self.normalisation, self.class_weight = cv_folds, final_fit, normalisation, class_weight
        self.validation_fraction = validation_fraction

    def _objective(self, parts: Sequence[np.ndarray], codes: np.ndarray, n_fitted: int, device: torch.device,
                   normalisation: str) -> _Objective:
        """The objective on the rows of ``parts``, which ``normalisation`` turns into the vectors to fit."""
        mean, scale = standardiser(*parts, normalisation=normalisation)
        weights = balanced_class_weights(codes, n_fitted) if self.class_weight == "balanced" else None
        return _Objective(parts, codes, n_fitted, mean, scale, device, normalisation, weights)

    def _path(self, objective: _Objective, Cs: Sequence[float]) -> Iterator[tuple[float, np.ndarray]]:
        """The solutions along increasing ``Cs``, each fit warm-started from the one before (or one step further)."""
        path: list[np.ndarray] = []  # the solutions at the last two Cs
        C_before = 0.0  # the C of path[-1]
        for C in sorted(Cs):
            objective.C = C
            start, gtol = np.zeros((objective.dim + 1) * objective.k), self.tol
            if path:  # a warm start from the solution at the C before
                start = path[-1]
                added = np.abs(objective.split(start)[0]).max() * abs(1 / C - 1 / C_before) / objective.n
                gtol = min(self.tol, max(WARM_FLOOR, WARM_REDUCTION * added))
                if len(path) == 2:  # one more step along the line through the last two solutions, if that is better
                    guess = 2 * path[-1] - path[-2]
                    if objective(guess)[0] < objective(start)[0]:
                        start = guess
            w, self.n_iter_[C] = objective.minimise(C, start, gtol)
            path, C_before = [*path[-1:], w], C
            yield C, w

    @staticmethod
    def _scores(objective: _Objective, X_val: torch.Tensor, y_val: np.ndarray, fitted_classes: np.ndarray,
                w: np.ndarray) -> tuple[float, float]:
        proba = objective.proba(X_val, w)
        return (float(accuracy_score(y_val, fitted_classes[proba.argmax(1)])),
                float(log_loss(y_val, proba, labels=fitted_classes)))

    def _fit(self, X, y, X_val, y_val, n_classes: int | None = None, normalised: bool = False) -> LogisticBaseline:
        """Choose C (cross-validation or the validation split, see the module), keeping the best mean validation
        accuracy (ties: lower log loss, then smaller C), then fit at it on train+validation or train (``final_fit``,
        see ``refits``). float32 input is used as is (no copy) but for the folds of a cross-validation; unless
        ``normalised``, it is normalised block by block in every evaluation. numpy's BLAS is sequential meanwhile
        (``sequential_numpy_blas``)."""
        with sequential_numpy_blas():
            X, y = check_X_y(X, y, dtype=np.float32)
            X_val, y_val = check_X_y(X_val, y_val, dtype=np.float32)
            labels = np.arange(n_classes or max(y.max(), y_val.max()) + 1)
            if len(np.unique(y)) < 2:
                raise ValueError(f"the baseline needs train vectors of at least 2 classes; got only class {y[0]}")
            device = training_device(self.device)
            self.n_iter_: dict[float, int] = {}
            counts = np.bincount(y, minlength=len(labels)) + np.bincount(y_val, minlength=len(labels))
            folds = min(self.cv_folds, counts[counts > 0].min())
            refit = refits(self.final_fit, len(X))
            self.Cs_ = tuple(self.Cs) if self.Cs is not None else C_GRID if len(X) <= SMALL_FIT else C_GRID[::2]
            vectors_are = "none" if normalised else self.normalisation
            warm = None  # the model fitted on X alone at C_, when C is chosen on the validation split
            if folds >= 2 and counts.sum() <= CV_MAX_VECTORS:
                # small: train and validation are joined and normalised once, and every fit reads that copy as is
                self.selection_ = f"{folds}-fold cross-validation"
                joined = mapped_matrix(len(X) + len(X_val), X.shape[1])
                joined[:len(X)], joined[len(X):] = X, X_val
                normalise_in_place(joined, vectors_are)
                parts, vectors_are = [joined] if refit else [joined[:len(X)]], "none"
                totals = self._cross_validate(joined, np.concatenate([y, y_val]), folds, device)
                self.C_ = max(sorted(totals), key=lambda C: (*_rank(totals[C]), -C))
            else:  # large: the vectors are used as given
                self.selection_ = "validation split"
                parts = [X, X_val] if refit else [X]
                totals, warm = self._validate(X, y, X_val, y_val, device, vectors_are)
            self.val_scores_ = {C: {"val_accuracy": a, "val_log_loss": l} for C, (a, l) in totals.items()}
            fit_y = np.concatenate([y, y_val]) if refit else y
            self.n_fitted_ = len(fit_y)
            if not refit and warm is not None:
                fitted = warm
            else:
                fitted_classes, codes = np.unique(fit_y, return_inverse=True)
                objective = self._objective(parts, codes, len(fitted_classes), device, vectors_are)
                if warm is not None and np.array_equal(warm.classes, fitted_classes):
                    w = self._refit(objective, warm)
                else:
                    *_, (_, w) = self._path(objective, [C for C in self.Cs_ if C <= self.C_])
                fitted = _Fitted(objective.mean, objective.scale, fitted_classes, *objective.split(w))
            self.pipeline_ = as_pipeline(fitted.mean, fitted.scale, fitted.W.T, fitted.b, fitted.classes, self.C_,
                                         self.normalisation)
            self.classes_ = labels
            return self

    def _validate(self, X: np.ndarray, y: np.ndarray, X_val: np.ndarray, y_val: np.ndarray, device: torch.device,
                  normalisation: str) -> tuple[dict[float, tuple], _Fitted]:
        """Validation (accuracy, log loss) per C of the path fitted on X (both turned into the vectors to fit by
        ``normalisation``); sets C_ and returns the model fitted at it."""
        totals, best, worse = {}, None, 0
        fitted_classes, codes = np.unique(y, return_inverse=True)
        objective = self._objective([X], codes, len(fitted_classes), device, normalisation)
        X_val_t = torch.from_numpy(X_val).to(device)
        for C, w in self._path(objective, self.Cs_):
            totals[C] = self._scores(objective, X_val_t, y_val, fitted_classes, w)
            if best is None or _rank(totals[C]) > best:
                best, self.C_, chosen, worse = _rank(totals[C]), C, w, 0
            else:
                worse += 1
                if worse >= PATH_PATIENCE:
                    break
        return totals, _Fitted(objective.mean, objective.scale, fitted_classes, *objective.split(chosen))

    def _refit(self, objective: _Objective, before: _Fitted) -> np.ndarray:
        """The solution at C_ for ``objective`` from the model ``before`` (the same function of the vectors,
        re-expressed in the new standardisation), whose gradient it must cut WARM_REDUCTION-fold (to at most TOL)."""
        W_raw = before.W / before.scale[:, None]
        b_raw = before.b - before.mean @ W_raw
        start = np.concatenate([(W_raw * objective.scale[:, None]).ravel(), b_raw + objective.mean @ W_raw])
        objective.C = self.C_
        gtol = min(self.tol, max(WARM_FLOOR, WARM_REDUCTION * np.abs(objective(start)[1]).max()))
        refitted, self.n_iter_[self.C_] = objective.minimise(self.C_, start, gtol)
        return refitted

    def _cross_validate(self, X: np.ndarray, y: np.ndarray, folds: int, device: torch.device) -> dict[float, tuple]:
        """Mean validation (accuracy, log loss) per C over stratified ``folds`` (shuffled, seeded) of the already
        normalised X."""
        totals = {C: np.zeros(2) for C in self.Cs_}
        for fit_rows, val_rows in StratifiedKFold(folds, shuffle=True, random_state=self.seed).split(X, y):
            fitted_classes, codes = np.unique(y[fit_rows], return_inverse=True)
            objective = self._objective([X[fit_rows]], codes, len(fitted_classes), device, "none")
            X_val_t = torch.from_numpy(X[val_rows]).to(device)
            for C, w in self._path(objective, self.Cs_):
                totals[C] += self._scores(objective, X_val_t, y[val_rows], fitted_classes, w)
        return {C: tuple(total / folds) for C, total in totals.items()}

    def predict_proba(self, X) -> np.ndarray:
        """Probabilities over all classes (zero for a class absent from the training labels), by the scikit-learn
        pipeline in float64, ``PREDICT_ROWS`` vectors at a time (its float64 copies are of one block, not of X)."""
        proba = np.zeros((len(X), len(self.classes_)))
        for start in range(0, max(1, len(X)), PREDICT_ROWS):  # an empty X too goes to scikit-learn, which refuses it
            rows = np.asarray(X[start:start + PREDICT_ROWS], dtype=np.float64)
            proba[start:start + len(rows), self.pipeline_.classes_] = self.pipeline_.predict_proba(rows)
        return proba

    def save(self, path: Path, **metadata) -> None:
        """The coefficients and ``metadata`` as JSON, written atomically."""
        scaler, logreg = self.pipeline_.named_steps["standardscaler"], self.pipeline_.named_steps["logisticregression"]
        atomic_write_text(path, json.dumps({
            "C": self.C_,
            "selection": self.selection_,
            "n_fitted": self.n_fitted_,
            "normalisation": self.normalisation,
            "class_weight": self.class_weight,
            "final_fit": self.final_fit,
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
        settings = {**PRE_ACCURACY_PARAMS, **{k: saved[k] for k in PRE_ACCURACY_PARAMS if k in saved}}
        baseline = cls(**settings)
        baseline.C_, baseline.classes_ = saved["C"], np.array(saved["classes"])
        baseline.selection_, baseline.n_fitted_ = saved.get("selection", "validation split"), saved.get("n_fitted", 0)
        baseline.val_scores_ = {float(C): s for C, s in saved["val_scores"].items()}
        baseline.pipeline_ = as_pipeline(saved["mean"], saved["scale"], saved["coef"], saved["intercept"],
                                         saved["fitted_classes"], saved["C"], baseline.normalisation)
        return baseline, saved
