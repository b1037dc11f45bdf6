"""PRECISION=auto RUNTIME=auto: the fastest faithful stage-one path, measured on the user's images, kept per machine."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from conftest import make_images
from pipeline import fastpath
from pipeline.backbones import get_backbone
from pipeline.config import Settings
from pipeline.extract import extract
from pipeline.fastpath import REFERENCE, Measured, PathChoice, candidates, choose, resolve, served
from pipeline.listing import scan_dataset
from pipeline.store import FeatureStore, features_file

pytestmark = pytest.mark.measured_path
LITE = "efficientnet_lite0"
CPU = torch.device("cpu")


def measured(*rows: tuple[str, str, float, float]) -> list[Measured]:
    return [Measured(p, r, img_s, cosine, cosine) for p, r, img_s, cosine in rows]


def test_the_fastest_faithful_path_wins_when_it_pays():
    runs = measured(("fp32", "torch", 100, 1.0), ("fp32", "openvino", 200, 1.0), ("bf16", "openvino", 500, 0.995))
    every = [(m.precision, m.runtime) for m in runs]
    assert choose(runs, every) == ("fp32", "openvino")  # bf16 is faster but not faithful
    assert choose(measured(("fp32", "torch", 100, 1.0), ("fp32", "openvino", 105, 1.0)), every) == REFERENCE  # < MIN_GAIN
    assert choose(runs, [("fp32", "openvino"), ("bf16", "openvino")]) == ("fp32", "openvino")
    assert choose(runs, [("bf16", "openvino")]) == ("bf16", "openvino")  # the user fixed it: the fastest allowed


def test_candidates_start_with_the_reference_and_respect_a_fixed_setting(monkeypatch):
    assert candidates(CPU)[0] == REFERENCE and all(p != "fp16" for p, _ in candidates(CPU))
    assert all(p == "fp32" for p, _ in candidates(CPU, precision="fp32"))
    assert all(r == "torch" for _, r in candidates(CPU, runtime="torch"))
    monkeypatch.setattr(fastpath, "runtime_installed", lambda runtime: runtime != "openvino")
    assert all(r != "openvino" for _, r in candidates(CPU))
    monkeypatch.setattr(fastpath, "cpu_has_bf16", lambda: False)
    assert candidates(CPU) == [REFERENCE]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("fast") / "data", {"train": 12, "test": 4})


def test_auto_measures_once_per_machine_and_picks_a_faithful_path(data, tmp_path, monkeypatch):
    settings = Settings(data=data, cache=tmp_path / "cache", backbone=LITE)
    listing = scan_dataset(data)
    resolved, choice = resolve(settings, get_backbone(LITE), CPU, listing, "w")
    assert (resolved.precision, resolved.runtime) == (choice.precision, choice.runtime) != ("auto", "auto")
    assert choice.measured[0].runtime == "torch" and choice.measured[0].cosine_min == pytest.approx(1.0)
    chosen = choice.of(choice.precision, choice.runtime)
    assert chosen.cosine_min >= fastpath.COSINE_MIN and chosen.img_s == max(m.img_s for m in choice.measured if m.faithful) \
        or (choice.precision, choice.runtime) == REFERENCE
    saved = json.loads((settings.backbone_dir() / fastpath.PATH_FILE).read_text())
    assert (saved["precision"], saved["runtime"]) == (choice.precision, choice.runtime)

    def never(*args):
        raise AssertionError("measured again on the same machine")

    monkeypatch.setattr(fastpath, "load_backbone", never)
    again, read = resolve(settings, get_backbone(LITE), CPU, listing, "w")
    assert read == choice and (again.precision, again.runtime) == (resolved.precision, resolved.runtime)
    with pytest.raises(AssertionError, match="measured again"):  # another machine (here: other weights) measures
        resolve(settings, get_backbone(LITE), CPU, listing, "other weights")
    kept, why = resolve(settings, get_backbone(LITE), CPU, listing, "other weights",
                        made_with={"precision": "fp32", "runtime": "torch"})
    assert (kept.precision, kept.runtime, why.measured) == ("fp32", "torch", []) and "kept" in why.reason


def test_a_batch_size_above_the_calibration_images_is_measured_on_one_batch_of_that_size(data, tmp_path, monkeypatch):
    seen = {}

    def measure(backbone, model, device, pairs, images, batch_size, keep):
        seen.update(images=len(images), batch_size=batch_size)
        return [Measured(p, r, 1.0, 1.0, 1.0) for p, r in pairs]

    monkeypatch.setattr(fastpath, "CALIBRATION_IMAGES", 4)
    monkeypatch.setattr(fastpath, "_measure", measure)
    settings = Settings(data=data, cache=tmp_path / "cache", backbone=LITE, batch_size=8)
    resolve(settings, get_backbone(LITE), CPU, scan_dataset(data), "w")
    assert seen == {"images": 8, "batch_size": 8}  # not a batch of 4: stage one runs batches of 8
    resolve(dataclasses.replace(settings, batch_size=2, cache=tmp_path / "other"), get_backbone(LITE), CPU,
            scan_dataset(data), "w")
    assert seen == {"images": 4, "batch_size": 2}  # smaller batches: CALIBRATION_IMAGES in batches of 2


def test_an_auto_cache_records_its_path_and_predict_serves_it(data, tmp_path, monkeypatch):
    choice = PathChoice("fp32", "openvino", "measured", measured(("fp32", "torch", 1, 1.0), ("fp32", "openvino", 3, 1.0)), {})
    real = fastpath.resolve
    monkeypatch.setattr(fastpath, "resolve", lambda settings, *a, **k: real(settings, *a, **k) if settings.precision != "auto"
                        else (dataclasses.replace(settings, precision="fp32", runtime="openvino"), choice))
    summary = extract(Settings(data=data, cache=tmp_path / "auto", backbone=LITE))
    assert "PRECISION=fp32 RUNTIME=openvino (auto, measured: 3.0x fp32 torch" in summary.ran_as
    exact = extract(Settings(data=data, cache=tmp_path / "exact", backbone=LITE, precision="fp32", runtime="torch"))
    assert exact.ran_as == "PRECISION=fp32 RUNTIME=torch"
    with FeatureStore(features_file(tmp_path / "auto" / LITE)) as fast, FeatureStore(features_file(tmp_path / "exact" / LITE)) as ref:
        assert (fast.fingerprint["precision"], fast.fingerprint["runtime"]) == ("fp32", "openvino")
        a, b = fast.features("train"), ref.features("train")
        cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert cosine.min() >= fastpath.COSINE_MIN
        served_settings = served(Settings(backbone=LITE), fast.fingerprint)
    assert (served_settings.precision, served_settings.runtime) == ("fp32", "openvino")
    assert (served(Settings(), None).precision, served(Settings(runtime="openvino"), None).runtime) == ("fp32", "openvino")
