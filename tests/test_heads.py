"""The head and the logistic baseline on synthetic vectors: they learn, they are reproducible, they round-trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import make_blobs

from pipeline.baseline import LogisticBaseline
from pipeline.head import HeadClassifier, MLPHead


@pytest.fixture(scope="module")
def blobs():
    X, y = make_blobs(n_samples=600, n_features=32, centers=3, cluster_std=4.0, random_state=0)
    X = X.astype(np.float32)
    return X[:400], y[:400], X[400:500], y[400:500], X[500:], y[500:]


def test_head_architecture_is_the_seed_notebooks():
    head = MLPHead(1024, 2)
    assert [type(m).__name__ for m in head] == ["Linear", "ReLU", "Dropout", "Linear", "LogSoftmax"]
    assert (head[0].in_features, head[0].out_features, head[2].p, head[3].out_features) == (1024, 256, 0.2, 2)


def test_head_learns_and_keeps_its_best_validation_epoch(blobs):
    X, y, Xv, yv, Xt, yt = blobs
    head = HeadClassifier(epochs=15, patience=3, seed=1).fit(X, y, Xv, yv)
    assert head.score(Xt, yt) > 0.9
    losses = [h.val_loss for h in head.history_]
    assert head.best_epoch_ == int(np.argmin(losses)) + 1
    assert len(head.history_) <= 15
    np.testing.assert_allclose(head.predict_proba(Xt).sum(1), 1.0, rtol=1e-5)


def test_head_stops_early_when_validation_loss_stops_falling(blobs):
    X, y, Xv, yv, _, _ = blobs
    head = HeadClassifier(epochs=200, patience=2, lr=0.05, seed=0).fit(X, y, Xv, yv)
    assert len(head.history_) < 200
    assert len(head.history_) - head.best_epoch_ == 2


def test_head_same_seed_same_result_other_seed_other_result(blobs):
    X, y, Xv, yv, Xt, _ = blobs
    a, b, c = (HeadClassifier(epochs=3, seed=s).fit(X, y, Xv, yv) for s in (7, 7, 8))
    np.testing.assert_array_equal(a.predict_proba(Xt), b.predict_proba(Xt))
    assert not np.array_equal(a.predict_proba(Xt), c.predict_proba(Xt))


def test_head_save_load_round_trip(tmp_path, blobs):
    X, y, Xv, yv, Xt, _ = blobs
    head = HeadClassifier(epochs=3, hidden=16).fit(X, y, Xv, yv)
    head.save(tmp_path / "head.pt", backbone="b", classes=["x", "y", "z"])
    loaded, meta = HeadClassifier.load(tmp_path / "head.pt")
    np.testing.assert_array_equal(loaded.predict_proba(Xt), head.predict_proba(Xt))
    assert meta["backbone"] == "b" and meta["classes"] == ["x", "y", "z"] and loaded.hidden == 16
    assert torch.load(tmp_path / "head.pt", weights_only=True)["feature_dim"] == 32


def test_head_rejects_misshapen_input(blobs):
    X, y, Xv, yv, _, _ = blobs
    with pytest.raises(ValueError):
        HeadClassifier(epochs=1).fit(X, y[:-1], Xv, yv)


def test_baseline_picks_c_on_validation_and_is_deterministic(blobs):
    X, y, Xv, yv, Xt, yt = blobs
    a = LogisticBaseline().fit(X, y, Xv, yv)
    b = LogisticBaseline().fit(X, y, Xv, yv)
    assert a.score(Xt, yt) > 0.9
    best = max(a.val_scores_.items(), key=lambda kv: (kv[1]["val_accuracy"], -kv[1]["val_log_loss"]))[0]
    assert a.C_ == best
    coef = lambda m: m.pipeline_.named_steps["logisticregression"].coef_  # noqa: E731
    np.testing.assert_array_equal(coef(a), coef(b))


def test_baseline_saves_coefficients_as_json_and_loads_them_exactly(tmp_path, blobs):
    X, y, Xv, yv, Xt, _ = blobs
    baseline = LogisticBaseline().fit(X[y < 2], y[y < 2], Xv[yv < 2], yv[yv < 2], n_classes=3)
    baseline.save(tmp_path / "logreg.json", backbone="b")
    text = (tmp_path / "logreg.json").read_text()
    assert text.startswith("{") and '"coef"' in text
    loaded, meta = LogisticBaseline.load(tmp_path / "logreg.json")
    np.testing.assert_array_equal(loaded.predict_proba(Xt), baseline.predict_proba(Xt))
    assert loaded.predict_proba(Xt).shape == (len(Xt), 3) and meta["backbone"] == "b"
