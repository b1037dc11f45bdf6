"""Trained runs and head sweeps: every train-head is kept under its own name; sweeps train a grid in one process and
compare on validation; report, predict and export read RUN= or the best on validation."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from conftest import make_images, run_cli
from pipeline.config import Settings
from pipeline.errors import UserError
from pipeline.runs import RunScore, chosen_run, derived_name, read_training_record, trained_runs
from pipeline.store import FeatureStore
from pipeline.sweep import grid_settings

LITE = ("--backbone", "efficientnet_lite0")


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    data = make_images(root / "data", {"train": 12, "test": 4}, classes=("cat", "dog", "bird"))
    cache = root / "cache"
    assert run_cli("features", "--data", data, "--cache", cache, *LITE) == 0
    return data, cache


def test_run_names_are_derived_from_the_head_settings_and_checked():
    assert derived_name(Settings(lr=0.01, hidden=64, dropout=0.5, seed=3)) == "lr0.01-hidden64-dropout0.5-seed3"
    assert Settings(run="wide_lr0.01+flip").run == "wide_lr0.01+flip"
    for bad in ("../up", ".hidden", "a/b", "x" * 101, "sp ace"):
        with pytest.raises(UserError, match="not a usable run name"):
            Settings(run=bad)


def test_each_train_head_is_kept_and_report_predict_read_the_best_on_validation_or_run(cached, capsys):
    data, cache = cached
    assert run_cli("train-head", "--cache", cache, *LITE, "--epochs", "3", "--lr", "0.00001") == 0
    assert run_cli("train-head", "--cache", cache, *LITE, "--epochs", "3", "--run", "good") == 0
    settings = Settings(cache=cache, backbone="efficientnet_lite0")
    runs = {r.name: r for r in trained_runs(settings)}
    assert set(runs) >= {"good", "lr1e-05-hidden256-dropout0.2-seed0"}
    slow, good = runs["lr1e-05-hidden256-dropout0.2-seed0"], runs["good"]
    assert slow.settings["lr"] == 1e-05 and good.settings["lr"] == Settings().lr and good.settings["hidden"] == 256
    record = read_training_record(cache / "efficientnet_lite0" / "runs" / "good")
    assert record["run"] == "good" and record["validation"]["head_accuracy"] == good.head_val_accuracy
    best = max(runs.values(), key=RunScore.rank)
    assert chosen_run(settings).name == best.name
    assert chosen_run(replace(settings, run=slow.name)).name == slow.name

    assert run_cli("report", "--cache", cache, *LITE, "--run", slow.name) == 0
    metrics = json.loads((cache / "efficientnet_lite0" / "metrics.json").read_text())
    assert metrics["run"]["name"] == slow.name and metrics["run"]["training"]["settings"]["lr"] == 1e-05
    assert run_cli("report", "--cache", cache, *LITE) == 0
    assert json.loads((cache / "efficientnet_lite0" / "metrics.json").read_text())["run"]["name"] == best.name

    capsys.readouterr()
    assert run_cli("predict", "--cache", cache, "--run", "missing", data / "test" / "cat") == 2
    assert "no trained run 'missing'" in capsys.readouterr().err
    assert run_cli("report", "--cache", cache, *LITE, "--run", "../x") == 2


def test_grid_settings_are_every_combination_checked_before_any_work():
    runs = grid_settings(Settings(), {"lr": [0.001, 0.01], "hidden": [8, 16], "seed": [0, 1, 2]})
    assert len(runs) == 12 and len({r.run for r in runs}) == 12
    assert {(r.lr, r.hidden, r.seed) for r in runs} == {(lr, h, s) for lr in (0.001, 0.01) for h in (8, 16) for s in (0, 1, 2)}
    assert all(r.run == derived_name(r) for r in runs)
    with pytest.raises(UserError, match="--dropout"):
        grid_settings(Settings(), {"dropout": [0.1, 1.5]})
    with pytest.raises(UserError, match="--lr has no value"):
        grid_settings(Settings(), {"lr": [], "seed": [0]})
    assert [r.lr for r in grid_settings(Settings(), {"lr": [0.01, 0.01, 0.1]})] == [0.01, 0.1]


def test_sweep_trains_the_grid_on_one_split_and_keeps_every_run(cached, tmp_path, monkeypatch):
    data, cache = cached
    read_splits = []
    features = FeatureStore.features
    monkeypatch.setattr(FeatureStore, "features",
                        lambda self, split, *a, **k: read_splits.append(split) or features(self, split, *a, **k))
    sweep_cache = tmp_path / "cache"
    (sweep_cache / "efficientnet_lite0").mkdir(parents=True)
    for name in ("features.h5",):
        (sweep_cache / "efficientnet_lite0" / name).write_bytes((cache / "efficientnet_lite0" / name).read_bytes())
    for segment in (cache / "efficientnet_lite0").glob("features.seg-*.h5"):
        (sweep_cache / "efficientnet_lite0" / segment.name).write_bytes(segment.read_bytes())
    # the Make form: several values in one argument, as LR="0.001 0.01" passes them
    assert run_cli("sweep", "--cache", sweep_cache, *LITE, "--lr", "0.001 0.01", "--hidden", "8", "16",
                   "--seed", "0", "1", "--epochs", "3") == 0
    settings = Settings(cache=sweep_cache, backbone="efficientnet_lite0")
    runs = trained_runs(settings)
    assert len(runs) == 8 and {(r.settings["lr"], r.settings["hidden"], r.settings["seed"]) for r in runs} == \
        {(lr, h, s) for lr in (0.001, 0.01) for h in (8, 16) for s in (0, 1)}
    records = [read_training_record(sweep_cache / "efficientnet_lite0" / "runs" / r.name) for r in runs]
    assert {r["split_seed"] for r in records} == {0} and len({r["n_val"] for r in records}) == 1
    assert len({r["validation"]["logreg_accuracy"] for r in records}) == 1  # one baseline, fitted once
    assert len({r["files"]["head.pt"] for r in records}) == 8  # every head its own
    swept = json.loads((sweep_cache / "efficientnet_lite0" / "sweep.json").read_text())
    assert [r["name"] for r in swept["runs"]] == [r.name for r in runs]
    assert (sweep_cache / "efficientnet_lite0" / "sweep.png").stat().st_size > 0
    assert "test" not in read_splits and "train" in read_splits  # the test split is not touched
    assert np.all(np.diff([-r.rank()[0] for r in runs]) >= 0)  # best on validation first
    assert chosen_run(settings).name == runs[0].name
