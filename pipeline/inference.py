"""How the frozen backbone runs: device choice, normalisation on the device, precision, memory format, runtime.

Every option here is measured by ``make bench`` against the plain float32 PyTorch forward; the
tests check that each gives the plain vectors within tolerance.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.metadata
import importlib.util
import json
import sys
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from pipeline.backbones import Backbone
from pipeline.config import check_value
from pipeline.errors import UserError
from pipeline.files import atomic_write_text, file_sha256

RUNTIME_PACKAGES = {"openvino": "openvino"}  # the package a runtime needs beyond torch


def runtime_installed(runtime: str) -> bool:
    """Whether the package ``runtime`` needs beyond torch is importable here."""
    package = RUNTIME_PACKAGES.get(runtime)
    return package is None or importlib.util.find_spec(package) is not None


def check_runtime(runtime: str, device: torch.device, precision: str = "fp32") -> None:
    """Refuse, before any work, a runtime that cannot run here (its package missing, or not on this device), and
    PyTorch's fp16 on a CPU, which has no fast float16 kernels (``make bench`` measures it against fp32)."""
    if not runtime_installed(runtime):
        raise UserError(f"RUNTIME={runtime} needs the {RUNTIME_PACKAGES[runtime]} package; pip install 'pipeline[fast-cpu]' "
                        f"or pass RUNTIME=torch")
    if runtime == "openvino" and device.type != "cpu":
        raise UserError(f"RUNTIME=openvino runs on the CPU, not {device}; pass DEVICE=cpu or RUNTIME=torch")
    if precision == "fp16" and device.type == "cpu" and runtime != "openvino":
        raise UserError("PRECISION=fp16 runs about 10x slower than fp32 on a CPU; pass PRECISION=bf16 (the CPU's fast "
                        "half precision) or PRECISION=fp32")


def resolve_device(name: str) -> torch.device:
    """'auto' picks MPS, then CUDA, then CPU; an explicit device must exist here."""
    if name == "auto":
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}'; use auto, cpu, cuda, cuda:N or mps") from None
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count(),
        "mps": torch.backends.mps.is_available(),
    }.get(device.type, False)
    if not available:
        raise UserError(f"device '{name}' is not available on this machine; use DEVICE=auto or DEVICE=cpu")
    return device


def keep_freed_memory() -> None:
    """Stop glibc from unmapping every large freed tensor: on CPU each forward otherwise page-faults its
    activations back in (benchmarks/NOTES.md says what that cost). Linux/glibc only."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL("libc.so.6")
            m_trim_threshold, m_mmap_max = -1, -4
            libc.mallopt(m_mmap_max, 0)
            libc.mallopt(m_trim_threshold, 2**31 - 1)


def _autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    if precision == "fp32":
        return None
    if device.type == "mps" or precision == "fp16":
        return torch.float16
    return torch.bfloat16


KEPT_MODEL_PACKAGES = ("torch", "torchvision", "efficientnet-lite-pytorch", "openvino")  # they define the graph


def package_version(package: str) -> str:
    """The installed version of the distribution ``package``, or "missing"."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "missing"


def kept_model(folder: Path, backbone: Backbone, weights: str) -> Path:
    """Where, in ``folder``, the OpenVINO model converted from ``backbone`` with ``weights`` is kept: named by what
    makes its graph (backbone, weights, input size, normalisation, the layer replaced, the versions of
    ``KEPT_MODEL_PACKAGES``, and the code that builds backbones), so a change to any of them converts anew. Only
    RUNTIME=openvino reads or writes it."""
    made_by = [backbone.name, weights, backbone.crop, backbone.mean, backbone.std, backbone.classifier,
               *map(package_version, KEPT_MODEL_PACKAGES), file_sha256(Path(__file__).with_name("backbones.py"))]
    return Path(folder) / f"openvino-{hashlib.sha256(json.dumps(made_by).encode()).hexdigest()[:16]}"


def _converted(model: Callable[[], nn.Module], crop: int, keep: Path | None):
    """The OpenVINO model of ``model()``: read from ``keep`` (``<keep>.xml`` and ``.bin``, checked against the sha256 of
    each in ``<keep>.json``) when it holds a good copy (``model`` is then not called), else converted (which traces the
    model: seconds) and, with ``keep``, saved there for the next run. A missing, partial or damaged copy is converted
    again."""
    import openvino as ov

    files = {suffix: keep.with_name(keep.name + suffix) for suffix in (".xml", ".bin")} if keep else {}
    record = keep.with_name(keep.name + ".json") if keep else None
    if record is not None and record.is_file():
        try:
            if json.loads(record.read_text()) == {s: file_sha256(f) for s, f in files.items()}:
                return ov.Core().read_model(files[".xml"])
        except (OSError, ValueError, RuntimeError):
            pass
    example, module = torch.zeros(1, 3, crop, crop, dtype=torch.uint8), model()
    with warnings.catch_warnings():
        # OpenVINO traces with torch.jit, which warns of its deprecation and of Normalize's constant mean and std
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        converted = ov.convert_model(module, example_input=example, input=[-1, 3, crop, crop])
    if keep is not None:
        with contextlib.suppress(OSError, RuntimeError):  # a copy not kept costs the next run a conversion, nothing else
            record.unlink(missing_ok=True)
            ov.save_model(converted, files[".xml"], compress_to_fp16=False)
            atomic_write_text(record, json.dumps({s: file_sha256(f) for s, f in files.items()}))
    return converted


def _openvino(model: Callable[[], nn.Module], crop: int, precision: str, keep: Path | None
              ) -> Callable[[torch.Tensor], torch.Tensor]:
    """OpenVINO on the CPU in throughput mode: each batch is split over the compiled model's parallel streams (one
    infer request each, run at once), which keeps the cores busier than one request over all of them; the rows come
    back in order, each computed as a latency-mode run computes it."""
    try:
        import openvino as ov
    except ImportError:
        raise UserError("RUNTIME=openvino needs the openvino package; pip install 'pipeline[fast-cpu]'") from None
    hint = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}[precision]
    compiled = ov.Core().compile_model(_converted(model, crop, keep), "CPU",
                                       {"PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_PRECISION_HINT": hint})
    requests = ov.AsyncInferQueue(compiled, compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
    parts: dict[int, np.ndarray] = {}
    requests.set_callback(lambda request, i: parts.__setitem__(i, request.get_output_tensor(0).data.copy()))

    def run(images: torch.Tensor) -> torch.Tensor:
        parts.clear()
        pieces = [p for p in np.array_split(images.numpy(), len(requests)) if len(p)]
        for i, piece in enumerate(pieces):
            requests.start_async(piece, i)
        requests.wait_all()
        return torch.from_numpy(np.concatenate([parts[i] for i in range(len(pieces))]).astype(np.float32, copy=False))

    return run


def prepare(backbone: Backbone, model: nn.Module | Callable[[], nn.Module], device: torch.device,
            precision: str = "fp32", runtime: str = "torch", keep: Path | None = None
            ) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function from a batch of uint8 images (on CPU, from ``backbone.transform()``) to float32 vectors
    (on CPU), run the chosen way; the images are normalised on the device, as the model's first layers. ``model``:
    the backbone's module, or a function that loads it, called only when it is needed (an OpenVINO model kept in
    ``keep`` needs none). ``keep``: where OpenVINO's converted model is kept between runs (see ``_converted``); the
    caller names it by what made ``model`` (backbone, weights, library versions)."""
    check_value("precision", precision)
    check_value("runtime", runtime)
    check_runtime(runtime, device, precision)
    if device.type == "cpu":
        keep_freed_memory()

    def normalised() -> nn.Module:
        return nn.Sequential(backbone.normalize(), model if isinstance(model, nn.Module) else model())

    if runtime == "openvino":
        return _openvino(normalised, backbone.crop, precision, keep)
    module = normalised().to(device, memory_format=torch.channels_last)
    if runtime == "compile":
        module = torch.compile(module, dynamic=False)
    dtype = _autocast_dtype(device, precision)
    compiled_batch = 0

    def run(images: torch.Tensor) -> torch.Tensor:
        nonlocal compiled_batch
        count = len(images)
        if runtime == "compile":  # pad a short last batch to the compiled size rather than compile a second graph
            compiled_batch = compiled_batch or count
            if count < compiled_batch:
                images = torch.cat([images, images.new_zeros(compiled_batch - count, *images.shape[1:])])
        images = images.to(device, non_blocking=True, memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            return module(images)[:count].float().cpu()

    return run
