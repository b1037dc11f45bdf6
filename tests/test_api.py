"""The package's API for notebooks: lazy, side-effect free, and what the README shows."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import pipeline


@pytest.mark.slow  # fresh process
def test_import_pipeline_loads_no_heavy_library_and_lists_its_api():
    code = ("import sys, pipeline; print(sorted(m for m in ('torch', 'h5py', 'sklearn', 'matplotlib') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr
    assert {"Settings", "bring_up_to_date", "open_features", "HeadClassifier", "predict"} <= set(dir(pipeline))


def test_every_name_of_the_api_resolves_and_stays_itself_once_its_module_is_imported():
    import pipeline.train  # noqa: F401  (a submodule named like an API function)

    for name in pipeline.__all__:
        assert getattr(pipeline, name) is not None
    for name in ("train", "sweep", "report", "predict", "export"):
        assert callable(getattr(pipeline, name)) and getattr(pipeline, name).__name__ == name


def test_embed_gives_the_cached_vectors_of_the_same_files_and_names_the_unusable(tmp_path, tiny_data):
    import numpy as np

    settings = pipeline.Settings(data=str(tiny_data), cache=str(tmp_path / "cache"), backbone="efficientnet_lite0")
    pipeline.bring_up_to_date(settings)
    (tiny_data / "test/cat/broken.png").write_bytes(b"not a png")
    embedded = pipeline.embed(settings, [str(tiny_data / "test/cat")])
    with pipeline.open_features(settings) as store:
        cached = dict(zip(store.paths("test"), store.features("test")))
    assert [p.rsplit("/", 1)[1] for p in embedded.paths] == [f"cat{i}.png" for i in range(4)]
    expected = np.stack([cached[f"test/cat/cat{i}.png"] for i in range(4)])
    np.testing.assert_allclose(embedded.vectors, expected, rtol=1e-4, atol=1e-5)
    assert [s.path.rsplit("/", 1)[1] for s in embedded.skipped] == ["broken.png"]


def blobs(n_per_class: int = 30, dim: int = 8, seed: int = 0):
    """Three separable clusters labelled with strings, as a scikit-learn user's labels may be."""
    import numpy as np

    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (3, dim))
    X = np.concatenate([c + rng.normal(0, 1, (n_per_class, dim)) for c in centres]).astype(np.float32)
    return X, np.repeat(np.array(["iris", "rose", "tulip"]), n_per_class)


def test_the_estimators_are_scikit_learn_estimators():
    from sklearn.base import clone
    from sklearn.model_selection import GridSearchCV, cross_val_score

    X, y = blobs()
    head = pipeline.HeadClassifier(epochs=60, patience=60, hidden=16)
    assert clone(head).get_params() == head.get_params()
    scores = cross_val_score(head, X, y, cv=3)
    assert len(scores) == 3 and scores.min() > 0.9
    search = GridSearchCV(pipeline.LogisticBaseline(), {"Cs": [(0.01,), (1.0,)]}, cv=3).fit(X, y)
    assert search.best_params_["Cs"] in [(0.01,), (1.0,)] and search.best_score_ > 0.9
    assert set(search.predict(X)) == {"iris", "rose", "tulip"}


def test_fit_without_validation_data_holds_out_a_stratified_seeded_fraction():
    X, y = blobs()
    a = pipeline.HeadClassifier(epochs=3, hidden=16, seed=1).fit(X, y)
    b = pipeline.HeadClassifier(epochs=3, hidden=16, seed=1).fit(X, y)
    assert list(a.classes_) == ["iris", "rose", "tulip"] and a.n_fitted_ == len(X)  # refitted on train + validation
    np.testing.assert_array_equal(a.predict_proba(X), b.predict_proba(X))
    logreg = pipeline.LogisticBaseline(final_fit="train").fit(X, y)
    assert logreg.n_fitted_ == len(X) - round(0.1 * len(X)) and logreg.score(X, y) > 0.9


def test_the_estimators_defaults_are_the_pipelines():
    from pipeline.config import DEFAULTS

    head, logreg = pipeline.HeadClassifier(), pipeline.LogisticBaseline()
    assert (head.hidden, head.dropout, head.lr, head.epochs, head.batch_size, head.patience, head.seed) == (
        DEFAULTS.hidden, DEFAULTS.dropout, DEFAULTS.lr, DEFAULTS.epochs, DEFAULTS.head_batch_size, DEFAULTS.patience,
        DEFAULTS.seed)
    for estimator in (head, logreg):
        assert (estimator.normalisation, estimator.class_weight, estimator.final_fit, estimator.validation_fraction) == (
            DEFAULTS.normalisation, DEFAULTS.class_weight, DEFAULTS.final_fit, DEFAULTS.val_fraction)
    assert logreg.cv_folds == DEFAULTS.cv_folds


def test_the_readme_api_block_runs(tmp_path, tiny_data, monkeypatch):
    from conftest import REPO

    text = (REPO / "README.md").read_text()
    section = text[text.index("## Python API"):]
    block = section[section.index("```python\n") + len("```python\n"):section.index("\n```", section.index("```python"))]
    monkeypatch.chdir(tmp_path)  # the block's default CACHE, cache/, lands here
    namespace: dict = {}
    exec(block.replace("../shared/data/cats-dogs", str(tiny_data)), namespace)
    assert namespace["head"].score(namespace["X_test"], namespace["y_test"]) > 0.9
    assert namespace["logreg"].score(namespace["X_test"], namespace["y_test"]) > 0.9
    assert namespace["embedded"].vectors.shape == (4, 1280) and namespace["embedded"].skipped == []


@pytest.mark.slow  # fresh processes: the CLI as users run it
def test_the_library_is_quiet_by_default_and_speaks_through_logging(tmp_path, tiny_data):
    from conftest import run_cli_process

    code = (f"import logging, sys, pipeline\n"
            f"settings = pipeline.Settings(data={str(tiny_data)!r}, cache={str(tmp_path / 'cache')!r}, "
            f"backbone='efficientnet_lite0', epochs=2)\n"
            f"pipeline.bring_up_to_date(settings)\n"
            f"pipeline.train(settings)\n"
            f"logging.basicConfig(level=logging.INFO, stream=sys.stdout, format='%(name)s: %(message)s')\n"
            f"pipeline.train(settings)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()  # nothing before logging was configured, then the library's records
    assert lines[0].startswith("pipeline.head: Epoch 1/2.. ") and lines[-1].startswith("pipeline.train: train-head: ")
    cli = run_cli_process("train-head", "--cache", tmp_path / "cache", "--backbone", "efficientnet_lite0", "--epochs", "2")
    assert cli.returncode == 0 and [line.split(": ", 1)[1] for line in lines][:2] == cli.stdout.splitlines()[:2]
