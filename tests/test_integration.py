"""The real cats-vs-dogs photos (../shared/data/cats-dogs) through all three stages, with real ImageNet weights."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from conftest import run_cli_process

pytestmark = pytest.mark.integration


def test_cats_vs_dogs_head_and_baseline_reach_97_percent(tmp_path, real_data):
    common = ("--cache", tmp_path / "cache", "--backbone", "efficientnet_lite0")
    for command in (["features", "--data", real_data], ["train-head", "--data", real_data], ["report", "--data", real_data]):
        result = run_cli_process(*command, *common)
        assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "cache" / "efficientnet_lite0" / "metrics.json").read_text())
    assert (metrics["n_train"] + metrics["n_val"], metrics["n_test"]) == (1400, 500)
    assert metrics["skipped"] == []
    assert metrics["head"]["test_accuracy"] >= 0.97
    assert metrics["logreg"]["test_accuracy"] >= 0.97

    predicted = run_cli_process("predict", real_data / "test", *common, "--format", "csv")
    assert predicted.returncode == 0, predicted.stderr
    rows = list(csv.DictReader(io.StringIO(predicted.stdout)))
    assert len(rows) == 500
    accuracy = sum(r["prediction"] == Path(r["path"]).parent.name for r in rows) / len(rows)
    assert abs(accuracy - metrics["head"]["test_accuracy"]) <= 1 / 500  # a tie at the boundary at most
