"""``export``: the trained head with its backbone as a torch.export program, as ONNX, and (torchvision backbones) as
the seed notebook's state dict; each checked against what ``predict`` and the cached vectors say."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision.transforms import v2 as T

from conftest import make_images, run_cli
from pipeline.config import Settings
from pipeline.errors import UserError
from pipeline.export import ONNX_FILE, PT2_FILE, TORCHVISION_FILE, DeployedHead, export, read_pt2_metadata
from pipeline.head import HeadClassifier
from pipeline.predict import predict
from pipeline.runs import chosen_run
from pipeline.store import FeatureStore, features_file

pytestmark = pytest.mark.slow  # `make test-fast` leaves it out

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

LITE = "efficientnet_lite0"


def cropped(paths: list[Path], metadata: dict) -> torch.Tensor:
    """What the exports take, made as the README says: RGB uint8, shorter side resized, center-cropped."""
    prepare = T.Compose([T.PILToTensor(), T.Resize(metadata["resize"], antialias=True), T.CenterCrop(metadata["input_size"])])
    return torch.stack([prepare(Image.open(p).convert("RGB")) for p in paths])


def pt2_probabilities(path: Path, images: torch.Tensor) -> np.ndarray:
    model = torch.export.load(path).module()
    with torch.inference_mode():
        return torch.cat([model(batch) for batch in images.split(32)]).numpy()


def onnx_probabilities(path: Path, images: torch.Tensor) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(["probabilities"], {"images": batch.numpy()})[0] for batch in images.split(32)])


def trained_cache(root: Path, backbone: str, *flags) -> tuple[Path, Path]:
    data = make_images(root / "data", {"train": 10, "test": 4})
    cache = root / "cache"
    assert run_cli("features", "--data", data, "--cache", cache, "--backbone", backbone, *flags) == 0
    assert run_cli("train-head", "--cache", cache, "--backbone", backbone, "--epochs", "1") == 0
    return data, cache


@pytest.fixture(scope="module")
def lite(tmp_path_factory):
    data, cache = trained_cache(tmp_path_factory.mktemp("lite"), LITE)
    settings = Settings(cache=cache, backbone=LITE)
    return data, settings, export(settings)


@pytest.fixture(scope="module")
def densenet(tmp_path_factory):
    root = tmp_path_factory.mktemp("densenet")
    weights = root / "densenet121-random.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.densenet121(weights=None).state_dict(), weights)
    data, cache = trained_cache(root, "densenet121", "--weights", weights)
    settings = Settings(cache=cache, backbone="densenet121", weights=weights)
    return data, settings, export(settings)


def test_export_refuses_without_a_trained_head_before_writing_anything(tmp_path, tiny_data):
    with pytest.raises(UserError, match="no trained head in .*run `make train-head`"):
        export(Settings(cache=tmp_path / "cache", backbone=LITE))
    assert not (tmp_path / "cache").exists()
    cache = tmp_path / "features-only"
    assert run_cli("features", "--data", tiny_data, "--cache", cache, "--backbone", LITE) == 0
    before = sorted(p.name for p in (cache / LITE).iterdir())
    with pytest.raises(UserError, match="no trained head"):
        export(Settings(cache=cache, backbone=LITE))
    assert sorted(p.name for p in (cache / LITE).iterdir()) == before


def test_export_refuses_a_head_trained_on_other_weights(densenet):
    _, settings, _ = densenet
    folder = settings.backbone_dir()
    stamps = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    with pytest.raises(UserError, match="pass the same WEIGHTS"):
        export(Settings(cache=settings.cache, backbone="densenet121"))  # torchvision's weights, not the file's
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == stamps


def test_lite_exports_agree_with_predict_and_carry_their_metadata(lite):
    data, settings, written = lite
    folder = chosen_run(settings)
    assert written["pt2"] == folder / PT2_FILE and written["onnx"] == folder / ONNX_FILE
    assert written["torchvision"].startswith("skipped: efficientnet_lite0 is no torchvision model")
    assert not (folder / TORCHVISION_FILE).exists() and not list(folder.glob("*.tmp"))

    metadata = read_pt2_metadata(written["pt2"])
    saved = torch.load(folder / "head.pt", weights_only=True)
    assert metadata["classes"] == ["cat", "dog"] and metadata["backbone"] == LITE
    assert metadata["input_size"] == 224 and metadata["resize"] == 256 and metadata["weights"] == saved["weights"]
    props = {p.key: p.value for p in onnx.load(str(written["onnx"])).metadata_props}
    assert json.loads(props["classes"]) == ["cat", "dog"] and props["backbone"] == LITE
    assert props["weights"] == saved["weights"] and props["input_size"] == "224"

    session = onnxruntime.InferenceSession(str(written["onnx"]), providers=["CPUExecutionProvider"])
    [given] = session.get_inputs()
    assert given.name == "images" and given.type == "tensor(uint8)" and given.shape[1:] == [3, 224, 224]
    assert isinstance(given.shape[0], str)  # the batch axis is dynamic

    paths = sorted((data / "test").glob("*/*.png"))
    expected = {p.path: dict(p.top) for p in predict(settings, paths, top_k=2)}
    expected = np.array([[expected[str(p)][c] for c in metadata["classes"]] for p in paths], dtype=np.float32)
    images = cropped(paths, metadata)
    for probabilities in (pt2_probabilities(written["pt2"], images), onnx_probabilities(written["onnx"], images),
                          pt2_probabilities(written["pt2"], images[:1])):
        assert probabilities.dtype == np.float32
        np.testing.assert_allclose(probabilities, expected[:len(probabilities)], atol=1e-4)
        np.testing.assert_allclose(probabilities.sum(1), 1, atol=1e-5)


def test_export_again_prints_nothing_and_replaces_the_files_with_equal_ones(lite, capfd):
    _, settings, written = lite
    before = {k: Path(v).read_bytes() for k, v in written.items() if k != "torchvision"}
    again = export(settings)
    assert again == written and capfd.readouterr() == ("", "")
    after = read_pt2_metadata(again["pt2"])
    assert after["head_sha256"] and {k: Path(v).stat().st_size for k, v in again.items() if k != "torchvision"} == \
        {k: len(v) for k, v in before.items()}
    assert not list(settings.backbone_dir().rglob("*.tmp"))


def test_densenet_state_dict_is_the_torchvision_model_with_the_head_as_classifier(densenet):
    data, settings, written = densenet
    folder = chosen_run(settings)
    assert set(written) == {"pt2", "onnx", "torchvision"} and written["torchvision"] == folder / TORCHVISION_FILE

    # the README's snippet
    saved = torch.load(written["torchvision"], weights_only=True)
    model = torchvision.models.densenet121()
    model.classifier = DeployedHead(**saved["head"])
    model.load_state_dict(saved["state_dict"])
    model.eval()

    head, checkpoint = HeadClassifier.load(folder / "head.pt")
    assert saved["classes"] == checkpoint["classes"] == ["cat", "dog"]
    for key, value in checkpoint["state_dict"].items():
        assert torch.equal(saved["state_dict"][f"classifier.{key}"], value)

    with FeatureStore(features_file(settings.backbone_dir())) as store:
        cached, paths = store.features("test"), store.paths("test")
    metadata = saved["metadata"]
    to_float = T.Compose([T.ToDtype(torch.float32, scale=True), T.Normalize(metadata["mean"], metadata["std"])])
    images = cropped([data / p for p in paths], metadata)
    pooled = []
    hook = model.classifier.register_forward_pre_hook(lambda _, args: pooled.append(args[0]))
    with torch.inference_mode():
        log_probabilities = model(to_float(images)).numpy()
    hook.remove()
    # what reaches the classifier is what stage one cached (DenseNet's ReLU, global average pool, flatten) ...
    np.testing.assert_allclose(pooled[0].numpy(), cached, rtol=1e-4, atol=1e-4)
    # ... so the model's output is the head's on the cached vectors (with the head's input normalisation, if any)
    probabilities = head.predict_proba(cached)
    np.testing.assert_allclose(log_probabilities, np.log(probabilities), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(pt2_probabilities(written["pt2"], images), probabilities, atol=1e-4)
    np.testing.assert_allclose(onnx_probabilities(written["onnx"], images), probabilities, atol=1e-4)


@pytest.mark.integration
def test_exports_agree_with_predict_on_the_real_cats_dogs_test_split(real_data, tmp_path):
    cache = tmp_path / "cache"
    assert run_cli("features", "--data", real_data, "--cache", cache, "--backbone", LITE) == 0
    assert run_cli("train-head", "--cache", cache, "--backbone", LITE) == 0
    settings = Settings(cache=cache, backbone=LITE)
    written = export(settings)
    paths = sorted(p for p in (real_data / "test").glob("*/*") if p.is_file())
    predicted = {p.path: p.top[0][0] for p in predict(settings, paths) if not p.skipped}
    assert len(predicted) == len(paths) >= 400
    metadata = read_pt2_metadata(written["pt2"])
    images = cropped(paths, metadata)
    truth = [p.parent.name for p in paths]
    for kind, probabilities in (("pt2", pt2_probabilities(written["pt2"], images)),
                                ("onnx", onnx_probabilities(written["onnx"], images))):
        classes = [metadata["classes"][i] for i in probabilities.argmax(1)]
        agreement = np.mean([c == predicted[str(p)] for c, p in zip(classes, paths)])
        accuracy = np.mean([c == t for c, t in zip(classes, truth)])
        print(f"{kind}: agrees with predict on {agreement:.4f} of {len(paths)} test images; accuracy {accuracy:.4f}")
        assert agreement >= 0.995, kind
