"""The three stages through the CLI on small generated images: files, layout, metrics, errors."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
import torchvision

from conftest import run_cli, run_cli_process, run_folder

LITE = ("--backbone", "efficientnet_lite0")


def test_densenet_with_a_weights_file_writes_1024d_vectors_in_the_documented_layout(tmp_path, tiny_data):
    weights = tmp_path / "densenet121-random.pth"
    torch.save(torchvision.models.densenet121().state_dict(), weights)
    cache = tmp_path / "cache"
    assert run_cli("features", "--data", tiny_data, "--cache", cache, "--backbone", "densenet121", "--weights", weights) == 0
    with h5py.File(cache / "densenet121" / "features.h5") as f:
        assert f.attrs["backbone"] == "densenet121" and f.attrs["feature_dim"] == 1024 and f.attrs["complete"]
        assert list(f.attrs["classes"]) == ["cat", "dog"]
        assert f.attrs["weights"].startswith("sha256:")
        assert all(step in f.attrs["transform"] for step in ("Resize(size=[255]", "CenterCrop(size=(224, 224))", "Normalize(mean=[0.485"))
        assert set(json.loads(f.attrs["versions"])) >= {"torch", "torchvision", "pillow"}
        assert f.attrs["created"]
        [segment] = json.loads(f.attrs["sources"])  # the vectors and their index live in one segment file, mapped by runs
        for split, n in (("train", 20), ("test", 8)):
            features = f[split]["features"]
            assert features.shape == (n, 1024) and features.dtype == np.float32 and features.is_virtual
            assert f[split]["runs"][()].tolist() == [[0, n, 0, 0]] and "paths" not in f[split]  # rows 0:n are its rows 0:n
            with h5py.File(cache / "densenet121" / segment["name"]) as seg:
                assert seg[split]["features"].chunks is not None and seg[split]["features"].fletcher32
                assert seg[split]["labels"].shape == (n,)
                paths = [p.decode() for p in seg[split]["paths"][()]]
            assert paths[0] == f"{split}/cat/cat0.png" and all(not p.startswith("/") for p in paths)
            assert (f[split]["features"][()] >= 0).all()  # after the ReLU


def test_all_three_stages_through_the_cli(tmp_path, tiny_data, capsys):
    cache = tmp_path / "cache"
    assert run_cli("features", "--data", tiny_data, "--cache", cache, *LITE) == 0
    assert run_cli("train-head", "--cache", cache, *LITE, "--epochs", "4", "--seed", "3") == 0
    out = capsys.readouterr().out
    assert "Epoch 1/4.. Train loss: " in out and ".. Val loss: " in out and ".. Val accuracy: " in out
    assert run_cli("report", "--cache", cache, *LITE) == 0
    folder, run = cache / "efficientnet_lite0", run_folder(cache)
    assert {p.name for p in folder.iterdir()} >= {"features.h5", "metrics.json", "report.md"}
    assert {p.name for p in run.iterdir()} == {"head.pt", "logreg.json", "training.json"}
    assert run.name == "lr0.003-hidden256-dropout0.2-seed3"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["backbone"] == "efficientnet_lite0" and metrics["feature_dim"] == 1280
    assert metrics["classes"] == ["cat", "dog"]
    assert (metrics["n_train"], metrics["n_val"], metrics["n_test"]) == (18, 2, 8)
    for model in ("head", "logreg"):
        assert metrics[model]["test_accuracy"] == 1.0  # colours are trivially separable
        assert np.trace(metrics[model]["confusion_matrix"]) == 8
    report = (folder / "report.md").read_text()
    assert "test accuracy" in report and "confusion matrix" in report and "Timings" in report
    head = torch.load(run / "head.pt", weights_only=True)
    assert head["backbone"] == "efficientnet_lite0" and head["classes"] == ["cat", "dog"] and head["feature_dim"] == 1280
    assert head["params"]["lr"] == 0.003 and head["params"]["seed"] == 3


def test_same_seed_same_numbers(tmp_path, tiny_data):
    cache = tmp_path / "cache"
    run_cli("features", "--data", tiny_data, "--cache", cache, *LITE)
    saved = []
    for _ in range(2):
        assert run_cli("train-head", "--cache", cache, *LITE, "--epochs", "3") == 0
        head = torch.load(run_folder(cache) / "head.pt", weights_only=True)
        logreg = json.loads((run_folder(cache) / "logreg.json").read_text())
        saved.append((head["state_dict"], logreg["coef"], head["history"]))
    (state_a, coef_a, hist_a), (state_b, coef_b, hist_b) = saved
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert coef_a == coef_b and hist_a == hist_b


@pytest.mark.slow  # fresh process
@pytest.mark.parametrize("command", ["train-head", "report"])
def test_stage_two_refuses_a_missing_cache(tmp_path, command):
    result = run_cli_process(command, "--cache", tmp_path / "nowhere", *LITE)
    assert result.returncode == 2 and "no feature cache" in result.stderr and "Traceback" not in result.stderr


def test_bad_input_is_one_line_exit_2_and_debug_shows_the_traceback(tmp_path):
    result = run_cli_process("features", "--data", tmp_path / "absent", *LITE)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "DATA=" in result.stderr
    debug = run_cli_process("features", "--data", tmp_path / "absent", *LITE, "--debug")
    assert debug.returncode == 2 and "Traceback" in debug.stderr


@pytest.mark.slow  # fresh process
def test_unknown_backbone_through_the_cli(tmp_path, tiny_data):
    result = run_cli_process("features", "--data", tiny_data, "--backbone", "alexnet", "--cache", tmp_path)
    assert result.returncode == 2 and "unknown backbone 'alexnet'" in result.stderr and "densenet121" in result.stderr
