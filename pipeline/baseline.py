"""The baseline: standardised, L2-regularised multinomial logistic regression, C chosen on the validation split.

It is scikit-learn's ``make_pipeline(StandardScaler(), LogisticRegression(C=C))`` (lbfgs), fitted by a
path over the C grid instead of one cold fit per C:

- the same objective: C * (sum of log losses) + 0.5 * ||W||^2 on standardised vectors, intercept unpenalised
  (binary: one weight vector, as scikit-learn does), minimised by the same optimiser (SciPy's L-BFGS-B) with
  scikit-learn's stopping rule (``gtol`` TOL on the mean-scaled objective, ``maxls`` 50, at most MAX_ITER);
- the C grid is walked in increasing order, each fit starting from the previous solution (a warm start: most
  of the work of a weakly regularised fit is already done by the more regularised one before it), or from
  one more step along the line through the last two solutions when that has the lower objective. A warm
  start must also cut the gradient that the change of C adds 100-fold (WARM_REDUCTION, WARM_FLOOR): with
  TOL alone, at 10^5 vectors the larger Cs would keep the previous solution unchanged. On flowers-17 and
  cats-dogs this picks the C, and gives the validation scores, of solutions converged to 1e-7;
- loss and gradient are computed by torch in float32, in row blocks, on the vectors as given: the
  standardisation is folded into the weights (X/s @ W = X @ (W/s)), so there is no float64 copy, no scaled
  copy of X, and no N x C matrix larger than a block. On CUDA when ``torch.cuda.is_available()``.

The fitted model is then the scikit-learn pipeline built from those coefficients, so prediction, and the
JSON file (coefficients, not a pickle: readable anywhere, safe to load, exact float round trip), are as before.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import minimize
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, log_loss
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_X_y

from pipeline.files import atomic_write_text
from pipeline.head import training_device

C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)
MAX_ITER = 2000
TOL = 1e-4  # scikit-learn's default
# A warm start must also cut the gradient that the change of C adds at its start WARM_REDUCTION-fold (but need
# not go below WARM_FLOOR): the objective is scaled by 1/N, so at 10^5 vectors that gradient is already below
# TOL, and TOL alone would leave the previous C's solution unchanged (a cold start begins far from any optimum).
WARM_REDUCTION = 1e-2
WARM_FLOOR = 1e-5
BLOCK_ROWS = 8192  # rows per block of the loss and gradient: bounds the N x C temporaries


def standardiser(X: np.ndarray, block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """StandardScaler's mean_ and scale_ (float64, population std; constant features get scale 1), in row blocks."""
    n = len(X)
    mean = X.sum(axis=0, dtype=np.float64) / n
    var = np.zeros(X.shape[1])
    for start in range(0, n, block):
        centred = X[start:start + block].astype(np.float64)
        centred -= mean
        var += np.einsum("ij,ij->j", centred, centred)
    var /= n
    eps = np.finfo(np.float64).eps
    constant = var <= n * eps * var + (n * mean * eps) ** 2  # scikit-learn's test for a constant feature
    scale = np.sqrt(var)
    scale[constant | (scale == 0)] = 1.0
    return mean, scale


def as_pipeline(mean, scale, coef, intercept, fitted_classes, C: float) -> Pipeline:
    """The scikit-learn StandardScaler + LogisticRegression pipeline with these parameters (no fitting)."""
    scaler = StandardScaler()
    scaler.mean_, scaler.scale_ = np.array(mean, dtype=np.float64), np.array(scale, dtype=np.float64)
    scaler.var_, scaler.n_features_in_, scaler.n_samples_seen_ = scaler.scale_ ** 2, len(scaler.mean_), 0
    logreg = LogisticRegression(C=C)
    logreg.coef_, logreg.intercept_ = np.array(coef, dtype=np.float64), np.array(intercept, dtype=np.float64)
    logreg.classes_, logreg.n_features_in_ = np.array(fitted_classes), len(scaler.mean_)
    return Pipeline([("standardscaler", scaler), ("logisticregression", logreg)])


class _Objective:
    """scikit-learn's lbfgs objective for standardised X, scaled by 1/N: mean log loss + ||W||^2 / (2 C N).

    Parameters are one float64 vector: W (D x K, K = 1 for two classes) then the K intercepts, for the
    standardised features. X itself is never standardised: logits are X @ (W/s) + (b - (m/s) @ W).
    """

    def __init__(self, X: np.ndarray, codes: np.ndarray, n_fitted: int, mean, scale, device: torch.device):
        self.n, self.dim = X.shape
        self.k = 1 if n_fitted == 2 else n_fitted
        self.device = device
        self.X = torch.from_numpy(X).to(device)  # a view on the CPU; one copy on an accelerator
        self.codes = torch.from_numpy(codes.astype(np.int64)).to(device)
        self.mean, self.scale = mean, scale
        self.C = 1.0
        self.evaluations = 0
        self._recent: list[tuple] = []  # (C, w, value, gradient) of the last two calls: L-BFGS-B asks for x0 again

    def split(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return w[:self.dim * self.k].reshape(self.dim, self.k), w[self.dim * self.k:]

    def folded(self, w: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights and intercepts that act on the raw (unstandardised) vectors, float32 on the device."""
        W, b = self.split(w)
        W_raw = W / self.scale[:, None]
        b_raw = b - self.mean @ W_raw
        as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(self.device)  # noqa: E731
        return as_tensor(W_raw), as_tensor(b_raw)

    def logits(self, X: torch.Tensor, w: np.ndarray):
        """Raw-space logits of X, block by block."""
        W, b = self.folded(w)
        for start in range(0, len(X), BLOCK_ROWS):
            yield start, torch.addmm(b, X[start:start + BLOCK_ROWS], W)

    def __call__(self, w: np.ndarray) -> tuple[float, np.ndarray]:
        for C, seen, value, gradient in self._recent:
            if C == self.C and np.array_equal(seen, w):
                return value, gradient.copy()
        self.evaluations += 1
        loss = torch.zeros((), dtype=torch.float64, device=self.device)
        grad_W = torch.zeros((self.dim, self.k), dtype=torch.float64, device=self.device)
        grad_b = torch.zeros(self.k, dtype=torch.float64, device=self.device)
        for start, z in self.logits(self.X, w):
            codes = self.codes[start:start + len(z)]
            # exponents are clamped at -75 (e^-75 ~ 3e-33): float32 denormals (below 1.2e-38, also after dividing by the
            # sum of up to 10^5 class terms) make exp and matmul 10x slower, and a
            # probability below 1e-38 changes nothing
            if self.k == 1:  # binomial: log(1 + e^z) - y z, gradient sigmoid(z) - y
                target = codes.to(z.dtype)[:, None]
                e = torch.exp(torch.clamp(-z.abs(), min=-75.0))
                loss += (torch.relu(z) + torch.log1p(e) - target * z).sum(dtype=torch.float64)
                residual = torch.where(z >= 0, 1 / (1 + e), e / (1 + e)) - target
            else:  # multinomial: logsumexp(z) - z_y, gradient softmax(z) - onehot(y)
                top = z.amax(dim=1, keepdim=True)
                picked = z.gather(1, codes[:, None])
                residual = z.sub_(top).clamp_(min=-75.0).exp_()  # in place: z is not needed any more
                total = residual.sum(dim=1, keepdim=True)
                loss += (top + torch.log(total) - picked).sum(dtype=torch.float64)
                residual /= total
                residual[torch.arange(len(z), device=self.device), codes] -= 1
            grad_W += (residual.T @ self.X[start:start + len(z)]).T.double()  # R^T X: the faster orientation
            grad_b += residual.sum(0, dtype=torch.float64)
        W, _ = self.split(w)
        grad_W, grad_b = grad_W.cpu().numpy(), grad_b.cpu().numpy()
        # back to the standardised parametrisation: dL/dW = (X^T R - m (1^T R)) / s
        grad_W = (grad_W - self.mean[:, None] * grad_b[None, :]) / self.scale[:, None]
        penalty = 1.0 / (self.C * self.n)
        value = loss.item() / self.n + 0.5 * penalty * float(np.dot(w[:W.size], w[:W.size]))
        gradient = np.concatenate([(grad_W / self.n + penalty * W).ravel(), grad_b / self.n])
        self._recent = [*self._recent[-1:], (self.C, w.copy(), value, gradient.copy())]
        return value, gradient

    def proba(self, X: torch.Tensor, w: np.ndarray) -> np.ndarray:
        """Probabilities over the fitted classes (float64), as scikit-learn's predict_proba gives them."""
        z = torch.cat([block for _, block in self.logits(X, w)]).double()
        if self.k == 1:
            p = torch.sigmoid(z)
            return torch.cat([1 - p, p], dim=1).cpu().numpy()
        return torch.softmax(z, dim=1).cpu().numpy()


class LogisticBaseline:
    def __init__(self, Cs: tuple[float, ...] = C_GRID, seed: int = 0, tol: float = TOL, device: str = "auto"):
        self.Cs, self.seed, self.tol, self.device = Cs, seed, tol, device

    def fit(self, X, y, X_val, y_val, n_classes: int | None = None) -> LogisticBaseline:
        """Fit one model per C on (X, y), along increasing C with warm starts; keep the best validation accuracy
        (ties: lower log loss, then smaller C). float32 input is used as is (no copy)."""
        X, y = check_X_y(X, y, dtype=np.float32)
        X_val, y_val = check_X_y(X_val, y_val, dtype=np.float32)
        labels = np.arange(n_classes or max(y.max(), y_val.max()) + 1)
        fitted_classes, codes = np.unique(y, return_inverse=True)
        if len(fitted_classes) < 2:
            raise ValueError(f"the baseline needs train vectors of at least 2 classes; got only class {fitted_classes[0]}")
        mean, scale = standardiser(X)
        device = training_device(self.device)
        objective = _Objective(X, codes, len(fitted_classes), mean, scale, device)
        X_val_t = torch.from_numpy(X_val).to(device)
        self.val_scores_: dict[float, dict[str, float]] = {}
        self.n_iter_: dict[float, int] = {}
        best_key, best_w, path = None, None, []  # path: the solutions at the last two Cs
        for C in sorted(self.Cs):
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
            result = minimize(objective, start, method="L-BFGS-B", jac=True,
                              options={"maxiter": MAX_ITER, "maxls": 50, "gtol": gtol, "ftol": 64 * np.finfo(float).eps})
            w, path, C_before = result.x, [*path[-1:], result.x], C
            self.n_iter_[C] = int(result.nit)
            proba = objective.proba(X_val_t, w)
            accuracy = accuracy_score(y_val, fitted_classes[proba.argmax(1)])
            loss = log_loss(y_val, proba, labels=fitted_classes)
            self.val_scores_[C] = {"val_accuracy": float(accuracy), "val_log_loss": float(loss)}
            if best_key is None or (accuracy, -loss) > best_key:
                best_key, self.C_, best_w = (accuracy, -loss), C, w.copy()
        W, b = objective.split(best_w)
        self.pipeline_ = as_pipeline(mean, scale, W.T, b, fitted_classes, self.C_)
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
        baseline = cls()
        baseline.C_, baseline.classes_ = saved["C"], np.array(saved["classes"])
        baseline.val_scores_ = {float(C): s for C, s in saved["val_scores"].items()}
        baseline.pipeline_ = as_pipeline(saved["mean"], saved["scale"], saved["coef"], saved["intercept"],
                                         saved["fitted_classes"], saved["C"])
        return baseline, saved
