"""The trained head: Linear-ReLU-Dropout-Linear-LogSoftmax on cached vectors, with a scikit-learn-style API."""

from __future__ import annotations

import copy
import io
import logging
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import train_test_split
from sklearn.utils.validation import check_array, check_X_y
from torch import nn
from torch.optim.adam import adam

from pipeline.config import DEFAULTS
from pipeline.files import atomic_write

log = logging.getLogger(__name__)


# what a checkpoint saved before these settings existed was trained with
PRE_ACCURACY_PARAMS = {"normalisation": "none", "class_weight": "none", "final_fit": "train"}
FUSED_ADAM_DEVICES = ("cpu", "cuda")  # where the head steps by torch's fused Adam kernel (one pass per step, not one per op)
SMALL_TRAIN = 8192  # up to this many training vectors, batch_size 0 means 64 (the seed notebook's batch)
# up to this many train vectors a fit is small: final_fit "auto" refits on train + validation, and the baseline's
# default C grid has two values per decade (one above)
SMALL_FIT = 20_000


def refits(final_fit: str, n_train: int) -> bool:
    """Whether ``final_fit`` means a refit on train + validation for ``n_train`` training vectors: always for
    "train+val", never for "train"; "auto" up to ``SMALL_FIT``, where the 10% held out is a few images per
    class (above, 10% more vectors changes little and the refit would double the fit's time)."""
    return final_fit == "train+val" or (final_fit == "auto" and n_train <= SMALL_FIT)


def auto_batch_size(n_train: int) -> int:
    """64 up to ``SMALL_TRAIN`` vectors; above, doubled per doubling of the train size (1024 for 10^5 vectors),
    so an epoch keeps about 64-128 optimisation steps and each step is a matmul big enough to use the cores."""
    batch = 64
    while n_train > SMALL_TRAIN * batch // 64:
        batch *= 2
    return batch


SQRT_FLOOR = float(np.finfo(np.float32).tiny)  # the smallest normal float32


def normalise(X: np.ndarray | torch.Tensor, kind: str) -> np.ndarray | torch.Tensor:
    """The element-wise normalisation ``kind`` of a numpy array or torch tensor: "power" is a new array of the signed
    square roots sign(x) * sqrt(|x|) (it damps the few large activations of pooled CNN vectors); "none" is X itself.
    Element-wise, so it may be applied block by block.

    The root is taken of max(|x|, ``SQRT_FLOOR``) and multiplied by sign(x): torch's CPU square root takes a slow path
    on zeros and denormals, and a pooled vector after a ReLU is often half zeros (``make bench``, stage two). So 0 stays
    0 (-0 becomes +0), and an x with |x| below 1.2e-38 (a float32 denormal; in float64 input too) becomes
    sign(x) * 1.1e-19 instead of its own root."""
    if kind == "none":
        return X
    if isinstance(X, torch.Tensor):
        return X.abs().clamp_min_(SQRT_FLOOR).sqrt_().mul_(X.sign())
    return normalise(torch.from_numpy(np.ascontiguousarray(X)), kind).numpy()  # torch's numbers for arrays too: one rounding


def normalise_in_place(X: np.ndarray, kind: str, block: int = 1024) -> np.ndarray:
    """X normalised by ``kind`` in place, ``block`` rows at a time by torch (on every core; no temporary larger than
    a block, the same numbers as ``normalise`` of a tensor); returns X."""
    if kind != "none":
        for start in range(0, len(X), block):
            rows = torch.from_numpy(X[start:start + block])
            rows.copy_(normalise(rows, kind))
    return X


def balanced_class_weights(codes: np.ndarray, n_classes: int) -> np.ndarray:
    """scikit-learn's ``class_weight="balanced"``: N / (n_classes * count) per class code (float64, one per class; a
    class without vectors gets 0), so every class's vectors weigh the same in total."""
    counts = np.bincount(codes, minlength=n_classes).astype(np.float64)
    return np.divide(len(codes), n_classes * counts, out=np.zeros(n_classes), where=counts > 0)


def training_device(device: str = "auto") -> torch.device:
    """CUDA when ``device`` is "auto" and ``torch.cuda.is_available()``, else the CPU; any other value is taken as is."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


DROPOUT_BITS = 15  # random bits per element of the head's dropout mask: two elements per draw of torch's random_


class Dropout(nn.Dropout):
    """``nn.Dropout`` (each element zeroed with probability p in training, the rest scaled by the inverse of the kept
    fraction; the identity in eval) with its mask drawn two elements per 31-bit draw of ``random_``, ``DROPOUT_BITS``
    bits each: on a CPU, torch's ``bernoulli_`` and ``uniform_`` cost a draw per element and are a large share of a
    head's epoch (``make bench``, stage two). So the p applied is ``p`` (the setting, as recorded) rounded to a multiple
    of 2^-15 (at most 1 - 2^-15); the scale is the exact inverse of the kept fraction, so the expected output is the
    input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        levels = 2 ** DROPOUT_BITS
        dropped = min(round(self.p * levels), levels - 1)
        if not self.training or dropped == 0:
            return x
        draws = torch.empty((x.numel() + 1) // 2, dtype=torch.int32, device=x.device).random_()  # 0 .. 2^31 - 1
        bits = torch.cat((draws & (levels - 1), draws >> (31 - DROPOUT_BITS)))[:x.numel()].view(x.shape)
        return x * (bits >= dropped).to(x.dtype).mul_(levels / (levels - dropped))


class Adam:
    """torch's Adam through its functional API ``torch.optim.adam.adam``: the same steps as ``torch.optim.Adam(params,
    lr, fused=fused)`` (betas 0.9 and 0.999, eps 1e-8, no weight decay), where torch.optim's optimiser classes import
    torch._dynamo on their first use, most of a small head's fit (``make bench``, stage two). Built once the parameters
    are on their device; every parameter must have its gradient at each ``step``; ``zero_grad`` is the model's own."""

    def __init__(self, params: Iterable[nn.Parameter], lr: float, fused: bool):
        self.params, self.lr, self.fused = list(params), lr, fused
        self.exp_avgs = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sqs = [torch.zeros_like(p) for p in self.params]
        # the step count as torch.optim.Adam keeps it (under the float32 default dtype): float32, on the parameter's
        # device when fused, else on the CPU
        self.steps = [torch.zeros((), dtype=torch.float32, device=p.device if fused else "cpu") for p in self.params]

    @torch.no_grad()
    def step(self) -> None:
        adam(self.params, [p.grad for p in self.params], self.exp_avgs, self.exp_avg_sqs, [], self.steps, fused=self.fused,
             amsgrad=False, beta1=0.9, beta2=0.999, lr=self.lr, weight_decay=0.0, eps=1e-8, maximize=False)


class MLPHead(nn.Sequential):
    def __init__(self, in_features: int, n_classes: int, hidden: int = DEFAULTS.hidden, dropout: float = DEFAULTS.dropout):
        super().__init__(
            nn.Linear(in_features, hidden), nn.ReLU(), Dropout(dropout), nn.Linear(hidden, n_classes), nn.LogSoftmax(dim=1)
        )


@dataclass(frozen=True)
class EpochLog:
    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float

    def line(self, epochs: int) -> str:
        return (
            f"Epoch {self.epoch}/{epochs}.. Train loss: {self.train_loss:.3f}.. "
            f"Val loss: {self.val_loss:.3f}.. Val accuracy: {self.val_accuracy:.1%}"
        )


def _rows(parts: list[torch.Tensor], labels: list[torch.Tensor], index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``index`` of the concatenation of ``parts`` (and their labels), gathered without concatenating the parts
    (by ``index_select``: on a CPU several times faster than indexing with a tensor, ``parts[0][index]``)."""
    if len(parts) == 1:
        return parts[0].index_select(0, index), labels[0].index_select(0, index)
    first = index < len(parts[0])
    head, later = index[first], index[~first] - len(parts[0])
    return (torch.cat([parts[0].index_select(0, head), parts[1].index_select(0, later)]),
            torch.cat([labels[0].index_select(0, head), labels[1].index_select(0, later)]))


class ValidatedClassifier(ClassifierMixin, BaseEstimator):
    """scikit-learn's estimator conventions for a classifier that chooses on validation data: ``fit(X, y)`` holds out
    a stratified ``validation_fraction`` of X (seeded by ``seed``, as ``MLPClassifier(early_stopping=True)`` does)
    and takes labels of any kind; ``fit(X, y, X_val, y_val, n_classes)`` uses the given validation vectors and labels
    0..n_classes-1 (``train-head``'s way: no copy of its train matrix), and with ``normalised`` True takes X and X_val
    as already normalised by ``normalisation`` (``train-head`` normalises its own array once, in place). Subclasses
    implement ``_fit`` for the latter."""

    def fit(self, X, y, X_val=None, y_val=None, n_classes: int | None = None, normalised: bool = False):
        if X_val is not None:
            return self._fit(X, y, X_val, y_val, n_classes, normalised)
        X = check_array(X, dtype=np.float32)
        labels, codes = np.unique(np.asarray(y), return_inverse=True)
        rows, val_rows = train_test_split(np.arange(len(X)), test_size=self.validation_fraction, stratify=codes,
                                          random_state=self.seed)
        self._fit(X[rows], codes[rows], X[val_rows], codes[val_rows], len(labels))
        self.classes_ = labels
        return self

    def predict(self, X) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(1)]


class HeadClassifier(ValidatedClassifier):
    """NLLLoss + Adam; the epoch is the one with the lowest validation loss (early stopping after ``patience``).

    ``final_fit`` "train+val": once the epoch is chosen, a new head (same seed) is trained for exactly that many epochs
    on train and validation together, and kept; "train": the chosen epoch's head itself; "auto": see ``refits``. ``normalisation`` is applied
    to every input, in fit and predict (see ``normalise``); ``class_weight`` "balanced" weighs NLLLoss by class (see
    ``balanced_class_weights``). ``batch_size`` 0 picks it from the number of training vectors (``auto_batch_size``).
    ``device`` "auto" trains on CUDA when ``torch.cuda.is_available()`` and on the CPU otherwise; the fitted model
    always ends on the CPU.
    """

    def __init__(self, hidden: int = 256, dropout: float = 0.2, lr: float = 0.003, epochs: int = 20, batch_size: int = 0,
                 patience: int = 5, seed: int = 0, verbose: bool = False, device: str = "auto",
                 normalisation: str = "power", class_weight: str = "balanced", final_fit: str = "auto",
                 validation_fraction: float = 0.1):
        self.hidden, self.dropout, self.lr, self.epochs = hidden, dropout, lr, epochs
        self.batch_size, self.patience, self.seed, self.verbose, self.device = batch_size, patience, seed, verbose, device
        self.normalisation, self.class_weight, self.final_fit = normalisation, class_weight, final_fit
        self.validation_fraction = validation_fraction

    def _fit(self, X, y, X_val, y_val, n_classes: int | None = None, normalised: bool = False) -> HeadClassifier:
        """Choose the epoch on (X_val, y_val), then keep that head or refit on both (``final_fit``); float32 input is
        used as is (no copy of X, also when refitting); unless ``normalised``, each batch is normalised as it is drawn."""
        X, y = check_X_y(X, y, dtype=np.float32)
        X_val, y_val = check_X_y(X_val, y_val, dtype=np.float32)
        self.n_classes_ = int(n_classes or max(y.max(), y_val.max()) + 1)
        self.classes_ = np.arange(self.n_classes_)
        self.batch_size_ = self.batch_size or auto_batch_size(len(X))
        device = training_device(self.device)
        X_t, y_t = torch.from_numpy(X).to(device), torch.from_numpy(y.astype(np.int64)).to(device)
        Xv_t, yv_t = torch.from_numpy(X_val).to(device), torch.from_numpy(y_val.astype(np.int64)).to(device)
        drawn = "none" if normalised else self.normalisation  # the normalisation of each batch as it is drawn
        Xv_t = normalise(Xv_t, drawn)
        self.history_: list[EpochLog] = []
        best_loss, best_state, waited = math.inf, None, 0
        model, steps = self._trainer([X_t], [y_t], device, drawn)
        val_loss_fn = self._loss(y_t, device)
        for epoch in range(1, self.epochs + 1):
            train_loss = steps()
            model.eval()
            with torch.no_grad():
                log_probs = model(Xv_t)
                val_loss = val_loss_fn(log_probs, yv_t).item()
                val_accuracy = (log_probs.argmax(1) == yv_t).float().mean().item()
            epoch_log = EpochLog(epoch, train_loss, val_loss, val_accuracy)
            self.history_.append(epoch_log)
            if self.verbose:
                log.info(epoch_log.line(self.epochs))
            if val_loss < best_loss:
                best_loss, best_state, waited, self.best_epoch_ = val_loss, copy.deepcopy(model.state_dict()), 0, epoch
            else:
                waited += 1
                if waited >= self.patience:
                    break
        model.load_state_dict(best_state)
        self.n_fitted_ = len(X)
        if refits(self.final_fit, len(X)) and len(X_val):
            model, steps = self._trainer([X_t, torch.from_numpy(X_val).to(device)], [y_t, torch.from_numpy(
                y_val.astype(np.int64)).to(device)], device, drawn)
            for _ in range(self.best_epoch_):
                steps()
            self.n_fitted_ = len(X) + len(X_val)
        self.model_ = model.cpu().eval()
        return self

    def _loss(self, y: torch.Tensor, device: torch.device) -> nn.NLLLoss:
        """NLLLoss, weighted by ``balanced_class_weights`` of labels ``y`` when ``class_weight`` is "balanced"."""
        if self.class_weight == "none":
            return nn.NLLLoss()
        weights = balanced_class_weights(y.cpu().numpy(), self.n_classes_)
        return nn.NLLLoss(weight=torch.from_numpy(weights.astype(np.float32)).to(device))

    def _trainer(self, parts: list[torch.Tensor], labels: list[torch.Tensor], device: torch.device, normalisation: str):
        """A new head (seeded) and a function running one epoch over the rows of ``parts`` (each batch normalised by
        ``normalisation``) that returns its mean training loss; the shuffling generator is seeded too, so the same seed
        gives the same epochs."""
        torch.manual_seed(self.seed)
        order = torch.Generator().manual_seed(self.seed)
        model = MLPHead(parts[0].shape[1], self.n_classes_, self.hidden, self.dropout).to(device)
        optimizer = Adam(model.parameters(), lr=self.lr, fused=device.type in FUSED_ADAM_DEVICES)
        loss_fn = self._loss(torch.cat(labels), device)
        n = sum(len(p) for p in parts)

        def epoch() -> float:
            model.train()
            total = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: no sync per step
            for batch in torch.randperm(n, generator=order).to(device).split(self.batch_size_):
                rows, targets = _rows(parts, labels, batch)
                model.zero_grad()
                loss = loss_fn(model(normalise(rows, normalisation)), targets)
                loss.backward()
                optimizer.step()
                total += loss.detach().double() * len(batch)
            return total.item() / n

        return model, epoch

    def predict_proba(self, X) -> np.ndarray:
        X = check_array(X, dtype=np.float32)
        with torch.no_grad():
            return self.model_(normalise(torch.from_numpy(X), self.normalisation)).exp().numpy()

    def save(self, path: Path, **metadata) -> None:
        """A plain checkpoint (tensors and primitives only; loads with ``weights_only=True``), written atomically.

        It is serialised in memory first: torch.save turns a failed file write (a full disk) into a RuntimeError
        without its errno, so the file itself is written with a plain write.
        """
        checkpoint = io.BytesIO()
        torch.save({
            "state_dict": self.model_.state_dict(),
            "params": self.get_params(),
            "n_classes": self.n_classes_,
            "feature_dim": self.model_[0].in_features,
            "best_epoch": self.best_epoch_,
            "n_fitted": self.n_fitted_,
            "history": [asdict(h) for h in self.history_],
            **metadata,
        }, checkpoint)
        atomic_write(path, lambda f: f.write(checkpoint.getbuffer()))

    @classmethod
    def load(cls, path: Path) -> tuple[HeadClassifier, dict]:
        """The fitted head and the checkpoint's metadata."""
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        head = cls(**{**PRE_ACCURACY_PARAMS, **checkpoint["params"]})
        head.n_classes_ = checkpoint["n_classes"]
        head.classes_ = np.arange(head.n_classes_)
        head.best_epoch_ = checkpoint["best_epoch"]
        head.n_fitted_ = checkpoint.get("n_fitted", 0)
        head.history_ = [EpochLog(**h) for h in checkpoint["history"]]
        head.model_ = MLPHead(checkpoint["feature_dim"], head.n_classes_, head.hidden, head.dropout)
        head.model_.load_state_dict(checkpoint["state_dict"])
        head.model_.eval()
        return head, checkpoint
