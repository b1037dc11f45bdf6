"""Stage two's accuracy choices on small generated vectors: power normalisation, balanced class weights, the choice of
C by cross-validation, and the final fit on train + validation (head and baseline), saved and loaded as trained."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.datasets import make_blobs
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler
from sklearn.utils.class_weight import compute_class_weight

from pipeline import baseline as baseline_module
from pipeline.baseline import C_GRID, LogisticBaseline
from pipeline import head as head_module
from pipeline.head import SQRT_FLOOR, HeadClassifier, balanced_class_weights, normalise, normalise_in_place, refits


@pytest.fixture(scope="module")
def pooled():
    """Non-negative vectors of 3 overlapping classes (like pooled ReLU activations): train, validation, test."""
    X, y = make_blobs(n_samples=600, n_features=24, centers=3, cluster_std=5.0, random_state=1)
    X = np.abs(X).astype(np.float32)
    return X[:400], y[:400], X[400:500], y[400:500], X[500:], y[500:]


def test_power_normalisation_is_the_signed_square_root_for_arrays_and_tensors():
    X = np.array([[4.0, -9.0, 0.0, 0.25, -0.0, np.inf, -np.inf, np.nan]], dtype=np.float32)
    expected = [[2.0, -3.0, 0.0, 0.5, 0.0, np.inf, -np.inf, np.nan]]
    np.testing.assert_array_equal(normalise(X, "power"), expected)
    np.testing.assert_array_equal(normalise(torch.from_numpy(X), "power").numpy(), expected)
    assert normalise(X, "none") is X


def test_power_normalisation_is_torchs_signed_root_of_every_normal_float_and_floors_denormals():
    """The floor under the root (SQRT_FLOOR) changes no normal float: the numbers are torch's own sign * sqrt."""
    rng = np.random.default_rng(0)
    X = (rng.choice([-1, 1], 10**6) * 2.0 ** rng.uniform(-126, 127, 10**6)).astype(np.float32)
    X[::7] = 0.0  # zeros among them, as in pooled vectors after a ReLU
    T = torch.from_numpy(X)
    assert torch.equal(normalise(T, "power"), T.abs().sqrt().copysign(T))
    denormals = np.array([1e-40, -1e-45], dtype=np.float32)
    np.testing.assert_array_equal(normalise(denormals, "power"), np.sqrt(SQRT_FLOOR, dtype=np.float32) * np.array([1, -1]))


def test_balanced_class_weights_are_scikit_learns_and_zero_for_an_absent_class():
    codes = np.array([0, 0, 0, 1, 2, 2])
    np.testing.assert_allclose(balanced_class_weights(codes, 3), compute_class_weight("balanced", classes=np.arange(3), y=codes))
    assert balanced_class_weights(codes, 4)[3] == 0


@pytest.mark.parametrize("class_weight", ["none", "balanced"])
def test_baseline_solves_scikit_learns_problem_on_power_normalised_vectors(pooled, class_weight):
    X, y, Xv, yv, Xt, _ = pooled
    X, y = X[(y != 2) | (np.arange(len(y)) % 4 == 0)], y[(y != 2) | (np.arange(len(y)) % 4 == 0)]  # class 2 is rare
    ours = LogisticBaseline(Cs=(0.1,), cv_folds=0, final_fit="train", normalisation="power",
                            class_weight=class_weight).fit(X, y, Xv, yv)
    reference = make_pipeline(FunctionTransformer(lambda a: np.sqrt(a)), StandardScaler(),
                              LogisticRegression(C=0.1, max_iter=2000, tol=1e-8,
                                                 class_weight=None if class_weight == "none" else "balanced"))
    reference.fit(X.astype(np.float64), y)
    np.testing.assert_allclose(ours.predict_proba(Xt), reference.predict_proba(Xt), atol=2e-3)
    assert ours.pipeline_.named_steps["normalise"].kw_args == {"kind": "power"}


def test_balanced_class_weights_raise_the_recall_of_a_rare_class():
    X, y = make_blobs(n_samples=[600, 600], n_features=8, centers=[[0] * 8, [1.5] * 8], cluster_std=2.0, random_state=0)
    X = X.astype(np.float32)
    rare = (y == 0) | (np.arange(len(y)) % 10 == 0)  # class 1 keeps 1 in 10 in train: 600 against about 60
    train, test = np.arange(len(y)) < 900, np.arange(len(y)) >= 900
    X_fit, y_fit = X[train & rare], y[train & rare]
    recall = {}
    for weight in ("none", "balanced"):
        model = LogisticBaseline(Cs=(1.0,), cv_folds=0, final_fit="train", normalisation="none", class_weight=weight)
        predicted = model.fit(X_fit[:-20], y_fit[:-20], X_fit[-20:], y_fit[-20:]).predict(X[test])
        recall[weight] = (predicted[y[test] == 1] == 1).mean()
    assert recall["balanced"] > recall["none"] + 0.2


def test_baseline_chooses_c_by_cross_validation_on_a_small_train_split(pooled):
    X, y, Xv, yv, Xt, yt = pooled
    model = LogisticBaseline(cv_folds=5).fit(X, y, Xv, yv)
    assert model.selection_ == "5-fold cross-validation" and set(model.val_scores_) == set(model.Cs_)
    best = max(model.val_scores_.items(), key=lambda kv: (kv[1]["val_accuracy"], -kv[1]["val_log_loss"], -kv[0]))[0]
    assert model.C_ == best and model.n_fitted_ == len(X) + len(Xv) and model.score(Xt, yt) > 0.8
    few = np.concatenate([np.flatnonzero(yv != 2), np.flatnonzero(yv == 2)[:1]])  # class 2: 3 images in all
    X3, y3 = np.concatenate([X[y != 2], X[y == 2][:2]]), np.concatenate([y[y != 2], y[y == 2][:2]])
    assert LogisticBaseline(cv_folds=5).fit(X3, y3, Xv[few], yv[few]).selection_ == "3-fold cross-validation"


def test_baseline_final_fit_on_train_and_validation_is_the_fit_on_both_joined(pooled):
    X, y, Xv, yv, Xt, _ = pooled
    settings = {"normalisation": "power", "class_weight": "balanced"}
    both = LogisticBaseline(Cs=(0.01, 0.1), cv_folds=0, final_fit="train+val", tol=1e-7, **settings).fit(X, y, Xv, yv)
    reference = LogisticBaseline(Cs=(both.C_,), cv_folds=0, final_fit="train", tol=1e-7, **settings).fit(
        np.concatenate([X, Xv]), np.concatenate([y, yv]), Xv, yv)
    assert both.n_fitted_ == reference.n_fitted_ == 500
    np.testing.assert_allclose(both.predict_proba(Xt), reference.predict_proba(Xt), atol=1e-3)
    alone = LogisticBaseline(Cs=(both.C_,), cv_folds=0, final_fit="train", **settings).fit(X, y, Xv, yv)
    assert alone.n_fitted_ == 400 and not np.allclose(alone.predict_proba(Xt), both.predict_proba(Xt), atol=1e-3)


def test_baseline_saves_and_loads_its_choices_and_reads_a_file_from_before_them(tmp_path, pooled):
    X, y, Xv, yv, Xt, _ = pooled
    model = LogisticBaseline(Cs=(0.1, 1.0), cv_folds=5).fit(X, y, Xv, yv)
    model.save(tmp_path / "logreg.json")
    loaded, saved = LogisticBaseline.load(tmp_path / "logreg.json")
    np.testing.assert_array_equal(loaded.predict_proba(Xt), model.predict_proba(Xt))
    assert (loaded.normalisation, loaded.class_weight, loaded.final_fit) == ("power", "balanced", "auto")
    assert (saved["selection"], saved["n_fitted"]) == ("5-fold cross-validation", 500)
    plain = LogisticBaseline(Cs=(1.0,), cv_folds=0, final_fit="train", normalisation="none", class_weight="none")
    plain.fit(X, y, Xv, yv).save(tmp_path / "old.json")
    old = {k: v for k, v in json.loads((tmp_path / "old.json").read_text()).items()
           if k not in ("selection", "n_fitted", "normalisation", "class_weight", "final_fit")}
    (tmp_path / "old.json").write_text(json.dumps(old))
    np.testing.assert_array_equal(LogisticBaseline.load(tmp_path / "old.json")[0].predict_proba(Xt), plain.predict_proba(Xt))


def test_head_refits_on_train_and_validation_for_the_chosen_epoch(tmp_path, pooled):
    X, y, Xv, yv, Xt, yt = pooled
    refit, again = (HeadClassifier(epochs=12, patience=3, seed=3).fit(X, y, Xv, yv) for _ in range(2))
    kept = HeadClassifier(epochs=12, patience=3, seed=3, final_fit="train").fit(X, y, Xv, yv)
    assert refit.best_epoch_ == kept.best_epoch_ and (refit.n_fitted_, kept.n_fitted_) == (500, 400)
    np.testing.assert_array_equal(refit.predict_proba(Xt), again.predict_proba(Xt))
    assert not np.allclose(refit.predict_proba(Xt), kept.predict_proba(Xt)) and refit.score(Xt, yt) > 0.8
    refit.save(tmp_path / "head.pt")
    loaded, checkpoint = HeadClassifier.load(tmp_path / "head.pt")
    np.testing.assert_array_equal(loaded.predict_proba(Xt), refit.predict_proba(Xt))
    assert loaded.normalisation == "power" and checkpoint["n_fitted"] == 500


def test_auto_final_fit_refits_and_the_c_grid_is_fine_only_for_small_train_splits(pooled, monkeypatch):
    X, y, Xv, yv, _, _ = pooled
    assert refits("train+val", 10**7) and not refits("train", 10) and refits("auto", 20_000) and not refits("auto", 20_001)
    small = (HeadClassifier(epochs=2, seed=0).fit(X, y, Xv, yv), LogisticBaseline(Cs=(1.0,)).fit(X, y, Xv, yv))
    monkeypatch.setattr(head_module, "SMALL_FIT", len(X) - 1)
    large = (HeadClassifier(epochs=2, seed=0).fit(X, y, Xv, yv), LogisticBaseline(Cs=(1.0,)).fit(X, y, Xv, yv))
    assert [m.n_fitted_ for m in small] == [500, 500] and [m.n_fitted_ for m in large] == [400, 400]
    assert (LogisticBaseline().fit(X, y, Xv, yv).Cs_, LogisticBaseline(Cs=(0.5,)).fit(X, y, Xv, yv).Cs_) == (C_GRID, (0.5,))
    monkeypatch.setattr(baseline_module, "SMALL_FIT", len(X) - 1)
    assert LogisticBaseline().fit(X, y, Xv, yv).Cs_ == (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)


@pytest.mark.parametrize("small", [True, False])
def test_the_c_path_stops_once_it_is_past_the_best_on_validation(pooled, monkeypatch, small):
    X, y, Xv, yv, _, _ = pooled
    noisy = np.random.default_rng(0).permutation(y)  # labels unrelated to X: strong regularisation is best
    if not small:
        monkeypatch.setattr(baseline_module, "SMALL_FIT", len(X) - 1)
    stopped, patience = LogisticBaseline(final_fit="train").fit(X, noisy, Xv, yv), baseline_module.PATH_PATIENCE
    monkeypatch.setattr(baseline_module, "PATH_PATIENCE", len(C_GRID))
    full = LogisticBaseline(final_fit="train").fit(X, noisy, Xv, yv)
    assert stopped.Cs_ == full.Cs_ == (C_GRID if small else C_GRID[::2]) and list(full.val_scores_) == list(full.Cs_)
    searched = list(stopped.val_scores_)
    assert searched == list(full.Cs_[:len(searched)]) and len(searched) < len(full.Cs_)
    best = max(searched, key=lambda C: (stopped.val_scores_[C]["val_accuracy"], -stopped.val_scores_[C]["val_log_loss"]))
    assert stopped.C_ == best == full.C_ and searched.index(best) == len(searched) - 1 - patience
    np.testing.assert_allclose(stopped.predict_proba(Xv), full.predict_proba(Xv))


def test_the_c_path_stops_after_cs_in_a_row_no_better_than_the_best(pooled, monkeypatch):
    X, y, Xv, yv, _, _ = pooled
    accuracies = iter([0.5, 0.4, 0.6, 0.6, 0.55, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9])  # a tie is no better
    monkeypatch.setattr(LogisticBaseline, "_scores", staticmethod(lambda *_: (next(accuracies), 1.0)))
    model = LogisticBaseline(final_fit="train").fit(X, y, Xv, yv)
    assert list(model.val_scores_) == list(C_GRID[:5]) and model.C_ == C_GRID[2]


@pytest.mark.parametrize("final_fit", ["train", "train+val"])
def test_fitting_on_vectors_normalised_beforehand_gives_the_same_models(pooled, final_fit):
    X, y, Xv, yv, Xt, _ = pooled
    Xn, Xvn = normalise_in_place(X.copy(), "power"), normalise_in_place(Xv.copy(), "power")
    np.testing.assert_array_equal(Xn, normalise(X, "power"))
    for model in (HeadClassifier(epochs=3, seed=0, final_fit=final_fit), LogisticBaseline(Cs=(0.1, 1.0), final_fit=final_fit)):
        raw = clone(model).fit(X, y, Xv, yv)
        given = clone(model).fit(Xn, y, Xvn, yv, normalised=True)
        assert given.normalisation == "power" and given.n_fitted_ == raw.n_fitted_
        np.testing.assert_allclose(given.predict_proba(Xt), raw.predict_proba(Xt), atol=1e-5)


def test_head_normalises_its_inputs_in_fit_and_predict(pooled):
    X, y, Xv, yv, Xt, _ = pooled
    settings = {"epochs": 3, "seed": 0, "final_fit": "train", "class_weight": "none"}
    power = HeadClassifier(normalisation="power", **settings).fit(X, y, Xv, yv)
    by_hand = HeadClassifier(normalisation="none", **settings).fit(np.sqrt(X), y, np.sqrt(Xv), yv)
    np.testing.assert_allclose(power.predict_proba(Xt), by_hand.predict_proba(np.sqrt(Xt)), atol=1e-6)
