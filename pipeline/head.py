"""The trained head: Linear-ReLU-Dropout-Linear-LogSoftmax on cached vectors, with a scikit-learn-style API."""

from __future__ import annotations

import copy
import io
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import accuracy_score
from sklearn.utils.validation import check_array, check_X_y
from torch import nn

from pipeline.config import DEFAULTS
from pipeline.files import atomic_write


SMALL_TRAIN = 8192  # up to this many training vectors, batch_size 0 means 64 (the seed notebook's batch)


def auto_batch_size(n_train: int) -> int:
    """64 up to ``SMALL_TRAIN`` vectors; above, doubled per doubling of the train size (1024 for 10^5 vectors),
    so an epoch keeps about 64-128 optimisation steps and each step is a matmul big enough to use the cores."""
    batch = 64
    while n_train > SMALL_TRAIN * batch // 64:
        batch *= 2
    return batch


def training_device(device: str = "auto") -> torch.device:
    """CUDA when ``device`` is "auto" and ``torch.cuda.is_available()``, else the CPU; any other value is taken as is."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class MLPHead(nn.Sequential):
    def __init__(self, in_features: int, n_classes: int, hidden: int = DEFAULTS.hidden, dropout: float = DEFAULTS.dropout):
        super().__init__(
            nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, n_classes), nn.LogSoftmax(dim=1)
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


class HeadClassifier:
    """NLLLoss + Adam; keeps the epoch with the lowest validation loss (early stopping after ``patience``).

    ``batch_size`` 0 picks it from the number of training vectors (``auto_batch_size``). ``device`` "auto" trains on
    CUDA when ``torch.cuda.is_available()`` and on the CPU otherwise; the fitted model always ends on the CPU.
    """

    def __init__(self, hidden: int = DEFAULTS.hidden, dropout: float = DEFAULTS.dropout, lr: float = DEFAULTS.lr,
                 epochs: int = DEFAULTS.epochs, batch_size: int = DEFAULTS.head_batch_size,
                 patience: int = DEFAULTS.patience, seed: int = DEFAULTS.seed, verbose: bool = False,
                 device: str = "auto"):
        self.hidden, self.dropout, self.lr, self.epochs = hidden, dropout, lr, epochs
        self.batch_size, self.patience, self.seed, self.verbose, self.device = batch_size, patience, seed, verbose, device

    def get_params(self) -> dict:
        return {k: getattr(self, k) for k in ("hidden", "dropout", "lr", "epochs", "batch_size", "patience", "seed")}

    def fit(self, X, y, X_val, y_val, n_classes: int | None = None) -> HeadClassifier:
        X, y = check_X_y(X, y, dtype=np.float32)  # float32 input is used as is (a view, no copy)
        X_val, y_val = check_X_y(X_val, y_val, dtype=np.float32)
        self.n_classes_ = int(n_classes or max(y.max(), y_val.max()) + 1)
        self.classes_ = np.arange(self.n_classes_)
        self.batch_size_ = self.batch_size or auto_batch_size(len(X))
        device = training_device(self.device)
        torch.manual_seed(self.seed)
        order = torch.Generator().manual_seed(self.seed)
        self.model_ = MLPHead(X.shape[1], self.n_classes_, self.hidden, self.dropout).to(device)
        optimizer = torch.optim.Adam(self.model_.parameters(), lr=self.lr)
        loss_fn = nn.NLLLoss()
        X_t, y_t = torch.from_numpy(X).to(device), torch.from_numpy(y.astype(np.int64)).to(device)
        Xv_t, yv_t = torch.from_numpy(X_val).to(device), torch.from_numpy(y_val.astype(np.int64)).to(device)
        self.history_: list[EpochLog] = []
        best_loss, best_state, waited = math.inf, None, 0
        for epoch in range(1, self.epochs + 1):
            self.model_.train()
            total = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: no sync per step
            for batch in torch.randperm(len(X_t), generator=order).to(device).split(self.batch_size_):
                optimizer.zero_grad()
                loss = loss_fn(self.model_(X_t[batch]), y_t[batch])
                loss.backward()
                optimizer.step()
                total += loss.detach().double() * len(batch)
            self.model_.eval()
            with torch.no_grad():
                log_probs = self.model_(Xv_t)
                val_loss = loss_fn(log_probs, yv_t).item()
                val_accuracy = (log_probs.argmax(1) == yv_t).float().mean().item()
            log = EpochLog(epoch, total.item() / len(X_t), val_loss, val_accuracy)
            self.history_.append(log)
            if self.verbose:
                print(log.line(self.epochs))
            if val_loss < best_loss:
                best_loss, best_state, waited, self.best_epoch_ = val_loss, copy.deepcopy(self.model_.state_dict()), 0, epoch
            else:
                waited += 1
                if waited >= self.patience:
                    break
        self.model_.load_state_dict(best_state)
        self.model_.cpu().eval()
        return self

    def predict_proba(self, X) -> np.ndarray:
        X = check_array(X, dtype=np.float32)
        with torch.no_grad():
            return self.model_(torch.from_numpy(X)).exp().numpy()

    def predict(self, X) -> np.ndarray:
        return self.predict_proba(X).argmax(1)

    def score(self, X, y) -> float:
        return float(accuracy_score(y, self.predict(X)))

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
            "history": [asdict(h) for h in self.history_],
            **metadata,
        }, checkpoint)
        atomic_write(path, lambda f: f.write(checkpoint.getbuffer()))

    @classmethod
    def load(cls, path: Path) -> tuple[HeadClassifier, dict]:
        """The fitted head and the checkpoint's metadata."""
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        head = cls(**checkpoint["params"])
        head.n_classes_ = checkpoint["n_classes"]
        head.classes_ = np.arange(head.n_classes_)
        head.best_epoch_ = checkpoint["best_epoch"]
        head.history_ = [EpochLog(**h) for h in checkpoint["history"]]
        head.model_ = MLPHead(checkpoint["feature_dim"], head.n_classes_, head.hidden, head.dropout)
        head.model_.load_state_dict(checkpoint["state_dict"])
        head.model_.eval()
        return head, checkpoint
