"""The head and the logistic baseline on synthetic vectors: they learn, they are reproducible, they round-trip."""

from __future__ import annotations

import subprocess
import sys
import tracemalloc
from importlib import import_module
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from sklearn.datasets import make_blobs
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_info, threadpool_limits

from pipeline.baseline import LogisticBaseline, _Objective, standardiser
from pipeline.head import FUSED_ADAM_DEVICES, Adam, HeadClassifier, MLPHead, auto_batch_size

train_module = import_module("pipeline.train")  # the module: pipeline.train is the API's function
baseline_module = import_module("pipeline.baseline")


# scikit-learn's plain problem: C chosen on the validation split, fitted on train alone, no normalisation or weights
PLAIN = {"cv_folds": 0, "final_fit": "train", "normalisation": "none", "class_weight": "none"}


@pytest.fixture(scope="module")
def blobs():
    X, y = make_blobs(n_samples=600, n_features=32, centers=3, cluster_std=4.0, random_state=0)
    X = X.astype(np.float32)
    return X[:400], y[:400], X[400:500], y[400:500], X[500:], y[500:]


def test_head_architecture_is_the_seed_notebooks():
    head = MLPHead(1024, 2)
    assert [type(m).__name__ for m in head] == ["Linear", "ReLU", "Dropout", "Linear", "LogSoftmax"]
    assert (head[0].in_features, head[0].out_features, head[2].p, head[3].out_features) == (1024, 256, 0.2, 2)


def test_the_heads_dropout_is_nn_dropout_drawn_faster():
    layer = MLPHead(8, 2, dropout=0.25)[2]
    assert isinstance(layer, torch.nn.Dropout)
    x = torch.ones(2000, 100, requires_grad=True)
    torch.manual_seed(0)
    out = layer.train()(x)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.01 and torch.allclose(out[kept], torch.tensor(1 / 0.75))
    out.sum().backward()
    assert torch.equal(x.grad, out.detach())  # the gradient flows through the kept elements, scaled alike
    torch.manual_seed(0)
    assert torch.equal(layer(x), out)  # seeded: the same mask
    assert layer.eval()(x) is x
    low, high = (out != 0).flatten().chunk(2)  # the low and the high bits of the same draws
    assert all(abs(half.float().mean().item() - 0.75) < 0.01 for half in (low, high))
    assert abs((low & high).float().mean().item() - 0.75 ** 2) < 0.01  # independent of each other
    rounded = MLPHead(8, 2, dropout=0.3)[2].train()(torch.ones(1000, 100))  # 0.3 is not a multiple of 2^-15
    scale = 2**15 / (2**15 - round(0.3 * 2**15))
    assert torch.all((rounded == 0) | (rounded == torch.tensor(scale, dtype=torch.float32)))
    assert abs((rounded != 0).float().mean().item() - 0.7) < 0.01
    odd = layer.train()(torch.ones(3, 5))
    assert odd.shape == (3, 5) and torch.all((odd == 0) | torch.isclose(odd, torch.tensor(1 / 0.75)))


@pytest.mark.parametrize("device, fused", [
    ("cpu", True), ("cpu", False),  # both ways on the CPU; elsewhere the head's way
    pytest.param("cuda", "cuda" in FUSED_ADAM_DEVICES, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")),
    pytest.param("mps", "mps" in FUSED_ADAM_DEVICES, marks=pytest.mark.skipif(not torch.backends.mps.is_available(), reason="no MPS")),
])
def test_the_heads_adam_takes_torch_optim_adams_steps(device, fused):
    torch.manual_seed(0)
    ours, reference = MLPHead(16, 3).to(device), MLPHead(16, 3).to(device)
    reference.load_state_dict(ours.state_dict())
    initial = ours[0].weight.detach().clone()
    optimisers = Adam(ours.parameters(), lr=0.01, fused=fused), torch.optim.Adam(reference.parameters(), lr=0.01, fused=fused)
    x, y = torch.randn(64, 16, device=device), torch.randint(0, 3, (64,), device=device)
    for _ in range(5):
        for model, optimiser in zip((ours, reference), optimisers):
            model.zero_grad()
            torch.nn.functional.nll_loss(model.eval()(x), y).backward()
            optimiser.step()
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), reference.state_dict().values()))
    assert not torch.equal(ours[0].weight, initial)  # the steps moved it
    steps = [optimisers[1].state[p]["step"] for p in reference.parameters()]
    assert [(s.dtype, s.device, s.item()) for s in optimisers[0].steps] == [(s.dtype, s.device, s.item()) for s in steps]


@pytest.mark.slow  # fresh process
def test_fitting_a_head_does_not_import_torch_dynamo():
    """torch.optim's optimiser classes import torch._dynamo on their first use, most of a small head's fit."""
    fit = ("import sys, numpy as np; from pipeline.head import HeadClassifier; "
           "X = np.random.default_rng(0).normal(size=(200, 8)).astype(np.float32); "
           "HeadClassifier(epochs=2).fit(X, np.arange(200) % 2); print('torch._dynamo' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", fit], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.split() == ["False"], result.stderr


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


@pytest.mark.parametrize("cv_folds", [0, 5])
def test_baseline_picks_c_on_validation_and_is_deterministic(blobs, cv_folds):
    X, y, Xv, yv, Xt, yt = blobs
    a = LogisticBaseline(cv_folds=cv_folds).fit(X, y, Xv, yv)
    b = LogisticBaseline(cv_folds=cv_folds).fit(X, y, Xv, yv)
    assert a.selection_ == ("validation split" if cv_folds == 0 else "5-fold cross-validation")
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


def test_baseline_probabilities_in_blocks_are_the_pipelines_on_all_rows_at_once(blobs, monkeypatch):
    X, y, Xv, yv, Xt, _ = blobs
    baseline = LogisticBaseline().fit(X, y, Xv, yv, n_classes=4)  # class 3 has no vectors: probability 0
    whole = np.zeros((len(Xt), 4))
    whole[:, :3] = baseline.pipeline_.predict_proba(Xt.astype(np.float64))
    monkeypatch.setattr(import_module("pipeline.baseline"), "PREDICT_ROWS", 7)
    assert len(Xt) % 7 and len(Xt) > 7  # several blocks, the last one short
    # the same numbers up to the last bits, which BLAS may round otherwise for another number of rows
    np.testing.assert_allclose(baseline.predict_proba(Xt), whole, rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="0 sample"):
        baseline.predict_proba(Xt[:0])


def test_head_batch_size_zero_is_64_for_small_sets_and_grows_with_the_train_size(blobs):
    X, y, Xv, yv, Xt, _ = blobs
    assert auto_batch_size(len(X)) == auto_batch_size(8192) == 64
    assert auto_batch_size(8193) == 128 and auto_batch_size(90_000) == 1024
    auto, fixed = (HeadClassifier(epochs=2, batch_size=b).fit(X, y, Xv, yv) for b in (0, 64))
    assert auto.batch_size_ == 64 and auto.get_params()["batch_size"] == 0
    np.testing.assert_array_equal(auto.predict_proba(Xt), fixed.predict_proba(Xt))


@pytest.mark.parametrize("n_classes", [2, 3])
def test_baseline_solves_scikit_learns_problem(blobs, n_classes):
    """Same objective, same optimiser and stopping rule: coefficients and probabilities as scikit-learn's, binary too."""
    X, y, Xv, yv, Xt, _ = blobs
    X, y, Xv, yv = X[y < n_classes], y[y < n_classes], Xv[yv < n_classes], yv[yv < n_classes]
    X, Xv, Xt = (a * 0.5 + 3.0 for a in (X, Xv, Xt))  # features far from centred: the folded standardisation
    for C in (0.01, 1.0):
        ours = LogisticBaseline(Cs=(C,), **PLAIN).fit(X, y, Xv, yv)
        reference = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000)).fit(X.astype(np.float64), y)
        coef = reference.named_steps["logisticregression"].coef_
        assert ours.pipeline_.named_steps["logisticregression"].coef_.shape == coef.shape
        np.testing.assert_allclose(ours.pipeline_.named_steps["logisticregression"].coef_, coef, atol=1e-4 * np.abs(coef).max())
        np.testing.assert_allclose(ours.predict_proba(Xt)[:, :n_classes], reference.predict_proba(Xt), atol=1e-4)


def _objective(baseline: LogisticBaseline, X, y) -> float:
    """scikit-learn's: C * (sum of multinomial log losses on standardised X) + 0.5 * ||coef||^2, in float64."""
    scaler = baseline.pipeline_.named_steps["standardscaler"]
    logreg = baseline.pipeline_.named_steps["logisticregression"]
    z = scaler.transform(X.astype(np.float64)) @ logreg.coef_.T + logreg.intercept_
    log_p = z - logsumexp(z, axis=1, keepdims=True)
    return baseline.C_ * -log_p[np.arange(len(y)), y].sum() + 0.5 * (logreg.coef_ ** 2).sum()


def test_baseline_warm_start_needs_fewer_iterations_and_ends_near_the_optimum(blobs):
    X, y, _, _, _, _ = blobs
    # validated on its own training data the weaker penalty (C=1) wins; the path reached it from C=0.01's solution
    path = LogisticBaseline(Cs=(0.01, 1.0), **PLAIN).fit(X, y, X, y)
    cold = LogisticBaseline(Cs=(1.0,), **PLAIN).fit(X, y, X, y)
    optimum = _objective(LogisticBaseline(Cs=(1.0,), tol=1e-7, **PLAIN).fit(X, y, X, y), X, y)
    assert path.C_ == cold.C_ == 1.0 and path.n_iter_[1.0] < cold.n_iter_[1.0]
    assert optimum <= _objective(path, X, y) <= optimum * 1.01 and optimum <= _objective(cold, X, y) <= optimum * 1.01


def test_the_objective_reuses_its_data_term_at_a_new_c_with_the_numbers_of_a_fresh_evaluation(blobs):
    X, y, *_ = blobs
    baseline = LogisticBaseline(class_weight="none")
    w = np.random.default_rng(0).normal(size=(X.shape[1] + 1) * 3) * 0.1
    reused = baseline._objective([X], y, 3, torch.device("cpu"), "none")
    reused.C = 1.0
    reused(w)
    reused.C = 10.0
    value, gradient = reused(w)
    assert reused.evaluations == 1  # the log loss and its gradient were computed once
    fresh = baseline._objective([X], y, 3, torch.device("cpu"), "none")
    fresh.C = 10.0
    assert fresh(w)[0] == value and np.array_equal(fresh(w)[1], gradient)
    reused(w + 1e-3)
    assert reused.evaluations == 2  # another w is evaluated anew


def test_numpy_blas_is_sequential_during_the_baseline_fit_and_torchs_threads_are_left_alone(blobs, monkeypatch):
    """An idle OpenBLAS thread spins on the cores that torch's next operation needs (``make bench``, stage two). Only
    the BLAS that numpy's and SciPy's distributions bundle is limited: any other may be torch's own."""
    X, y, X_val, y_val, *_ = blobs

    def blas_threads() -> dict[str, int]:
        return {lib["filepath"]: lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}

    bundled = {path for path in blas_threads() if Path(path).resolve() in baseline_module._bundled_files()}
    if not bundled:
        pytest.skip("numpy and SciPy bundle no BLAS that threadpoolctl controls")
    seen = []
    data_term = _Objective._data_term

    def recording(objective, w):
        seen.append((blas_threads(), torch.get_num_threads()))
        return data_term(objective, w)

    monkeypatch.setattr(_Objective, "_data_term", recording)
    with threadpool_limits(limits=2, user_api="blas"):
        before, torch_threads = blas_threads(), torch.get_num_threads()
        LogisticBaseline(**PLAIN).fit(X, y, X_val, y_val)
        assert seen and all(threads == {path: 1 if path in bundled else n for path, n in before.items()}
                            and torch_during == torch_threads for threads, torch_during in seen)
        assert blas_threads() == before  # restored after the fit


def test_standardiser_is_standard_scalers(blobs):
    X = blobs[0].copy()
    X[:, 0] = 7.0  # constant: scale 1, as StandardScaler
    mean, scale = standardiser(X, block=64)
    reference = StandardScaler().fit(X.astype(np.float64))
    np.testing.assert_allclose(mean, reference.mean_, rtol=1e-12)
    np.testing.assert_allclose(scale, reference.scale_, rtol=1e-9)
    assert scale[0] == 1.0


def test_baseline_needs_two_classes(blobs):
    X, y, Xv, yv, _, _ = blobs
    with pytest.raises(ValueError, match="at least 2 classes"):
        LogisticBaseline().fit(X[y == 0], y[y == 0], Xv, yv)


@pytest.mark.parametrize("model", ["head", "logreg"])
def test_fit_makes_no_copy_of_float32_train_vectors(model):
    """No float64 or float32 copy of X (numpy allocations are traced; a copy would be >= X.nbytes)."""
    X, y = make_blobs(n_samples=50_000, n_features=32, centers=3, random_state=0)
    X = X.astype(np.float32)
    X_train, y_train, X_val, y_val = X[:45_000], y[:45_000], X[45_000:], y[45_000:]  # views, as train-head passes
    fit = (lambda: HeadClassifier(epochs=1).fit(X_train, y_train, X_val, y_val)) if model == "head" else \
        (lambda: LogisticBaseline(Cs=(1.0,)).fit(X_train, y_train, X_val, y_val))
    tracemalloc.start()
    try:
        fit()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < X_train.nbytes / 2


def test_train_split_is_read_partitioned_in_store_order_and_normalised(monkeypatch):
    monkeypatch.setattr(train_module, "READ_ROWS", 3)
    vectors = np.arange(-10, 10, dtype=np.float32).reshape(10, 2)

    class Store:
        feature_dim = 2

        def features(self, split, rows, out):
            assert split == "train" and rows.step is None
            out[...] = vectors[rows]
            return out

    last = np.zeros(10, dtype=bool)
    last[[1, 4, 5, 9]] = True
    X = train_module._read_partitioned(Store(), "train", last, "power")
    order = np.concatenate([np.flatnonzero(~last), np.flatnonzero(last)])
    np.testing.assert_array_equal(X, np.sign(vectors[order]) * np.sqrt(np.abs(vectors[order])))
