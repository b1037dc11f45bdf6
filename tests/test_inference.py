"""Fast paths give the plain path's vectors within tolerance (how fast they are is `make bench`'s job)."""

from __future__ import annotations

import dataclasses
import importlib.metadata

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms.functional import pil_to_tensor

from conftest import run_cli
from pipeline.backbones import get_backbone, load_backbone
from pipeline.errors import UserError
from pipeline.images import load_rgb
from pipeline.inference import check_runtime, kept_model, package_version, prepare

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def lite0():
    backbone = get_backbone("efficientnet_lite0")
    return backbone, load_backbone(backbone, None)


@pytest.fixture(scope="module")
def photos():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (240, 300, 3), dtype=np.uint8)).resize((600, 480)) for _ in range(4)]


@pytest.fixture(scope="module")
def images(lite0, photos):
    """What the pipeline feeds ``prepare``: uint8 crops, normalised later as the model's first layers."""
    return torch.stack([lite0[0].transform()(pil_to_tensor(p)) for p in photos])


@pytest.fixture(scope="module")
def expected(lite0, images):
    """The reference for every way of running the model: normalised, contiguous, float32, eager."""
    backbone, model = lite0
    with torch.inference_mode():
        return model(backbone.normalize()(images))


def test_uint8_preprocessing_gives_the_seed_notebooks_vectors(lite0, photos, expected):
    """Resizing decoded uint8 tensors (torch) instead of PIL images, and normalising per batch, moves pixels by
    at most a level or two: the vectors stay the seed notebook's within float noise of the features."""
    backbone, model = lite0
    seed_transform = T.Compose([T.Resize(backbone.resize), T.CenterCrop(backbone.crop), T.ToTensor(),
                                T.Normalize(backbone.mean, backbone.std)])
    with torch.inference_mode():
        seed = model(torch.stack([seed_transform(p) for p in photos]))
    assert _cosine(expected, seed) > 0.9999


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a, b).min().item()


def test_channels_last_fp32_matches_the_plain_forward(lite0, images, expected):
    got = prepare(*lite0, CPU)(images)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_is_close_and_returns_float32(lite0, images, expected):
    got = prepare(*lite0, CPU, precision="bf16")(images)
    assert got.dtype == torch.float32 and _cosine(got, expected) > 0.995


@pytest.mark.parametrize("precision, min_cosine", [("fp32", 0.99999), ("bf16", 0.995)])
def test_openvino_matches_the_plain_forward(lite0, images, expected, precision, min_cosine):
    pytest.importorskip("openvino")
    forward = prepare(*lite0, CPU, precision=precision, runtime="openvino")
    got = forward(images)
    assert got.shape == expected.shape and got.dtype == torch.float32
    torch.testing.assert_close(forward(images[:1]), got[:1], rtol=1e-5, atol=1e-6)  # fewer images than streams
    assert _cosine(got, expected) > min_cosine
    if precision == "fp32":
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4)


@pytest.mark.slow  # compiles
def test_torch_compile_matches_the_plain_forward_and_pads_a_short_last_batch(lite0, images, expected):
    forward = prepare(*lite0, CPU, runtime="compile")
    torch.testing.assert_close(forward(images), expected, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(forward(images[:3]), expected[:3], rtol=1e-3, atol=1e-4)


def test_unknown_precision_or_runtime_is_refused(lite0):
    with pytest.raises(UserError, match="--precision 'int4' is not one of"):
        prepare(*lite0, CPU, precision="int4")
    with pytest.raises(UserError, match="--runtime 'tensorrt' is not one of"):
        prepare(*lite0, CPU, runtime="tensorrt")
    with pytest.raises(UserError, match="RUNTIME=openvino runs on the CPU"):
        check_runtime("openvino", torch.device("cuda"))


@pytest.mark.parametrize("runtime", ["torch", "compile"])
def test_fp16_on_a_cpu_is_refused_with_the_fast_alternative(lite0, runtime):
    with pytest.raises(UserError, match="pass PRECISION=bf16"):
        prepare(*lite0, CPU, precision="fp16", runtime=runtime)
    check_runtime(runtime, CPU, "bf16")
    check_runtime(runtime, torch.device("cuda"), "fp16")  # a GPU's fast half precision


def test_jpeg_draft_decodes_large_photos_smaller_but_to_nearly_the_same_input(tmp_path, lite0):
    rng = np.random.default_rng(1)
    smooth = Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).resize((2400, 1800), Image.BICUBIC)
    smooth.save(tmp_path / "big.jpg", quality=95)
    full, drafted = load_rgb(tmp_path / "big.jpg"), load_rgb(tmp_path / "big.jpg", min_side=255)
    assert full.size == (2400, 1800) and drafted.size == (600, 450)
    transform = lite0[0].transform()
    assert (transform(pil_to_tensor(full)).float() - transform(pil_to_tensor(drafted)).float()).abs().mean() < 2.5  # of 255 levels


def test_float16_storage_halves_the_vectors_and_keeps_their_values(tmp_path, tiny_data):
    for storage in ("float32", "float16"):
        assert run_cli("features", "--data", tiny_data, "--cache", tmp_path / storage, "--backbone", "efficientnet_lite0",
                       "--storage", storage) == 0
    with h5py.File(tmp_path / "float32/efficientnet_lite0/features.h5") as a, h5py.File(tmp_path / "float16/efficientnet_lite0/features.h5") as b:
        assert b["train/features"].dtype == np.float16
        np.testing.assert_allclose(b["train/features"][()].astype(np.float32), a["train/features"][()], rtol=2e-3, atol=1e-3)


def test_openvino_keeps_its_converted_model_and_converts_again_when_it_is_damaged(lite0, images, expected, tmp_path,
                                                                                   monkeypatch):
    ov = pytest.importorskip("openvino")
    backbone, model = lite0
    loads = []

    def load():  # the backbone is loaded only to convert it: a good kept copy needs no weights read
        loads.append(1)
        return model

    keep = tmp_path / "openvino-x"
    first = prepare(backbone, load, CPU, runtime="openvino", keep=keep)(images)
    assert {p.name for p in tmp_path.iterdir()} == {"openvino-x.xml", "openvino-x.bin", "openvino-x.json"}
    assert loads == [1]
    convert = ov.convert_model
    conversions = []
    monkeypatch.setattr(ov, "convert_model", lambda *a, **k: conversions.append(1) or convert(*a, **k))
    torch.testing.assert_close(prepare(backbone, load, CPU, runtime="openvino", keep=keep)(images), first, rtol=1e-4,
                               atol=1e-5)
    assert conversions == [] and loads == [1]  # read back, not converted
    weights = bytearray((tmp_path / "openvino-x.bin").read_bytes())
    weights[len(weights) // 2] ^= 0xFF
    (tmp_path / "openvino-x.bin").write_bytes(weights)
    again = prepare(backbone, load, CPU, runtime="openvino", keep=keep)(images)
    assert conversions == [1] and loads == [1, 1]  # the flipped bit is seen: converted again, and kept again
    torch.testing.assert_close(again, expected, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(prepare(*lite0, CPU, runtime="openvino", keep=keep)(images), again, rtol=1e-4, atol=1e-5)
    assert conversions == [1]


def test_the_kept_model_is_named_by_everything_that_makes_its_graph(tmp_path, monkeypatch):
    backbone = get_backbone("efficientnet_lite0")
    name = kept_model(tmp_path, backbone, "w")
    assert kept_model(tmp_path, backbone, "w") == name and name.parent == tmp_path
    assert kept_model(tmp_path, backbone, "other weights") != name
    assert kept_model(tmp_path, dataclasses.replace(backbone, mean=(0.5, 0.5, 0.5)), "w") != name
    assert kept_model(tmp_path, dataclasses.replace(backbone, classifier="fc"), "w") != name
    version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda p: "0.0" if p == "torchvision" else version(p))
    assert kept_model(tmp_path, backbone, "w") != name


def test_a_package_version_is_the_installed_one_or_missing():
    assert torch.__version__.startswith(package_version("torch"))  # the distribution's version, without "+cu130"
    assert package_version("no-such-distribution-here") == "missing"
