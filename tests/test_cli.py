"""Choices the CLI remembers: without BACKBONE, stage two and predict use the one backbone CACHE has work for."""

from __future__ import annotations

import pytest

from pipeline.cli import TRAINED, main, remembered_backbone
from pipeline.config import DEFAULTS
from pipeline.errors import UserError


RUN_RECORD = "runs/some-run/training.json"


def cache_with(tmp_path, **files: str):
    """A cache folder where backbone ``name`` holds the file ``files[name]``."""
    cache = tmp_path / "cache"
    for name, file in files.items():
        (cache / name / file).parent.mkdir(parents=True)
        (cache / name / file).write_text("{}")
    return cache


def test_the_only_backbone_with_a_head_is_used(tmp_path):
    cache = cache_with(tmp_path, efficientnet_lite0=RUN_RECORD, resnet50="features.h5")
    assert remembered_backbone(cache, TRAINED) == "efficientnet_lite0"
    assert remembered_backbone(cache, "features.h5") == "resnet50"


def test_the_default_wins_when_it_has_one_and_stands_when_nothing_does(tmp_path):
    cache = cache_with(tmp_path, efficientnet_lite0=RUN_RECORD, **{DEFAULTS.backbone: RUN_RECORD})
    assert remembered_backbone(cache, TRAINED) == DEFAULTS.backbone
    assert remembered_backbone(cache, "features.h5") == DEFAULTS.backbone
    assert remembered_backbone(tmp_path / "missing", "features.h5") == DEFAULTS.backbone


def test_several_candidates_are_named_in_the_error(tmp_path):
    cache = cache_with(tmp_path, efficientnet_lite0=RUN_RECORD, resnet50=RUN_RECORD)
    with pytest.raises(UserError, match="efficientnet_lite0, resnet50"):
        remembered_backbone(cache, TRAINED)
    assert main(["report", "--cache", str(cache)]) == 2  # one line, exit code 2, before the report's imports


def test_export_without_a_trained_head_is_one_line_and_writes_nothing(tmp_path, capsys):
    cache = tmp_path / "cache"
    assert main(["export", "--cache", str(cache), "--backbone", "efficientnet_lite0"]) == 2
    assert "no trained head" in capsys.readouterr().err and not cache.exists()
