"""Fast paths give the plain path's vectors within tolerance (how fast they are is `make bench`'s job)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli
from pipeline.backbones import get_backbone, load_backbone
from pipeline.errors import UserError
from pipeline.images import load_rgb
from pipeline.inference import prepare

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def lite0():
    backbone = get_backbone("efficientnet_lite0")
    return backbone, load_backbone(backbone, None)


@pytest.fixture(scope="module")
def images(lite0):
    rng = np.random.default_rng(0)
    photos = [Image.fromarray(rng.integers(0, 255, (240, 300, 3), dtype=np.uint8)).resize((600, 480)) for _ in range(4)]
    return torch.stack([lite0[0].transform()(p) for p in photos])


def _plain(model, images):
    with torch.inference_mode():
        return model(images)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a, b).min().item()


def test_channels_last_fp32_matches_the_plain_forward(lite0, images):
    expected = _plain(lite0[1], images)
    got = prepare(lite0[1], CPU, 224)(images)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_is_close_and_returns_float32(lite0, images):
    expected = _plain(lite0[1], images)
    got = prepare(lite0[1], CPU, 224, precision="bf16")(images)
    assert got.dtype == torch.float32 and _cosine(got, expected) > 0.995


@pytest.mark.parametrize("precision, min_cosine", [("fp32", 0.99999), ("bf16", 0.995)])
def test_openvino_matches_the_plain_forward(lite0, images, precision, min_cosine):
    pytest.importorskip("openvino")
    expected = _plain(lite0[1], images)
    got = prepare(lite0[1], CPU, 224, precision=precision, runtime="openvino")(images)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert _cosine(got, expected) > min_cosine
    if precision == "fp32":
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4)


def test_unknown_precision_or_runtime_is_refused(lite0):
    with pytest.raises(UserError, match="unknown precision"):
        prepare(lite0[1], CPU, 224, precision="int4")
    with pytest.raises(UserError, match="unknown runtime"):
        prepare(lite0[1], CPU, 224, runtime="tensorrt")


def test_jpeg_draft_decodes_large_photos_smaller_but_to_nearly_the_same_input(tmp_path, lite0):
    rng = np.random.default_rng(1)
    smooth = Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).resize((2400, 1800), Image.BICUBIC)
    smooth.save(tmp_path / "big.jpg", quality=95)
    full, drafted = load_rgb(tmp_path / "big.jpg"), load_rgb(tmp_path / "big.jpg", min_side=255)
    assert full.size == (2400, 1800) and drafted.size == (600, 450)
    transform = lite0[0].transform()
    assert (transform(full) - transform(drafted)).abs().mean() < 0.02


def test_float16_storage_halves_the_vectors_and_keeps_their_values(tmp_path, tiny_data):
    for storage in ("float32", "float16"):
        assert run_cli("features", "--data", tiny_data, "--cache", tmp_path / storage, "--backbone", "efficientnet_lite0",
                       "--storage", storage) == 0
    with h5py.File(tmp_path / "float32/efficientnet_lite0/features.h5") as a, h5py.File(tmp_path / "float16/efficientnet_lite0/features.h5") as b:
        assert b["train/features"].dtype == np.float16
        np.testing.assert_allclose(b["train/features"][()].astype(np.float32), a["train/features"][()], rtol=2e-3, atol=1e-3)
