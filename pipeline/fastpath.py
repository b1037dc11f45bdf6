"""PRECISION=auto and RUNTIME=auto: the fastest faithful way to run the backbone on this machine, measured.

The candidates are the ways this device can run the backbone (``candidates``), limited to the given precision or
runtime when only one of the two is "auto". Each runs, after a warm-up, on calibration images of the user's own,
decoded as stage one decodes them, in batches of BATCH_SIZE as stage one runs them (a batch of another size can rank
the candidates otherwise), beside the reference: PyTorch float32, the exact path. A candidate is
faithful when its vector of every image has a cosine similarity of at least ``COSINE_MIN`` to the reference's
(the README says what a looser bound cost in accuracy); the fastest faithful candidate is chosen if it is at least
``MIN_GAIN`` times as fast as the reference, else the reference. An existing feature file keeps the way it was made
while that can run here (FORCE=1 rebuilds it the chosen way), so "auto" never rebuilds a cache. The choice and its measurements are kept in
``CACHE/<backbone>/path.json`` with the machine they were made on (processor and its feature flags, accelerator,
library versions, weights, batch size): the next run on the same machine reads them back instead of measuring again; any other
machine measures afresh. Under torchrun, a rank never measures (ranks must agree): it reads ``path.json`` or takes
the reference.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from pipeline.backbones import Backbone, load_backbone
from pipeline.config import Settings
from pipeline.errors import UserError
from pipeline.files import atomic_write_text, disk_full_as_user_error
from pipeline.images import ImageFiles, collate_good
from pipeline.inference import kept_model, prepare, runtime_installed
from pipeline.listing import NO_VIEW, DatasetListing

log = logging.getLogger(__name__)

PATH_FILE = "path.json"
REFERENCE = ("fp32", "torch")
COSINE_MIN = 0.999  # the least cosine similarity to the reference's vector that a faithful path keeps, per image
MIN_GAIN = 1.1  # a path is chosen over the reference only when at least this much faster
CALIBRATION_IMAGES = 64  # at least; a BATCH_SIZE above it is measured on one batch of that size
CALIBRATION_PASSES = 2  # timed passes over the calibration images per candidate; the fastest counts


@dataclass(frozen=True)
class Measured:
    """One candidate on the calibration batch: images per second (forward only) and cosine to the reference."""
    precision: str
    runtime: str
    img_s: float
    cosine_mean: float
    cosine_min: float

    @property
    def faithful(self) -> bool:
        return self.cosine_min >= COSINE_MIN


@dataclass(frozen=True)
class PathChoice:
    """The chosen precision and runtime, why, the measurements behind the choice, and the machine they were made on."""
    precision: str
    runtime: str
    reason: str
    measured: list[Measured]
    machine: dict

    def of(self, precision: str, runtime: str) -> Measured | None:
        return next((m for m in self.measured if (m.precision, m.runtime) == (precision, runtime)), None)

    @property
    def speedup(self) -> float:
        """The chosen path's images per second over the reference's (1.0 without measurements)."""
        chosen, reference = self.of(self.precision, self.runtime), self.of(*REFERENCE)
        return chosen.img_s / reference.img_s if chosen and reference else 1.0

    def line(self) -> str:
        chosen = self.of(self.precision, self.runtime)
        measured = f": {self.speedup:.1f}x fp32 torch, cosine to it >= {chosen.cosine_min:.4f}" if chosen else ""
        return f"PRECISION={self.precision} RUNTIME={self.runtime} (auto, {self.reason}{measured})"


def _cpuinfo(field: str) -> str | None:
    """The value of ``field`` in /proc/cpuinfo (its first processor); None where there is no such file (not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith(field)), "")
    except OSError:
        return None


def cpu_has_bf16() -> bool:
    """Whether this CPU has bfloat16 instructions (AMX or AVX512-BF16; Apple silicon has them too)."""
    flags = _cpuinfo("flags")
    if flags is None:
        return platform.machine() == "arm64" and platform.system() == "Darwin"
    return bool({"amx_bf16", "avx512_bf16"} & set(flags.split()))


def machine(settings: Settings, device: torch.device, weights: str) -> dict:
    """What a measured choice holds for: it is measured again when any of these differ."""
    flags = sorted(set((_cpuinfo("flags") or "").split()))  # one model name can cover CPUs with and without AMX
    key = {"cpu": _cpuinfo("model name") or platform.processor(), "cpu_flags": hashlib.sha256(" ".join(flags).encode()).hexdigest()[:16],
           "cores": os.cpu_count(), "device": str(device), "torch": torch.__version__, "weights": weights,
           "batch_size": settings.batch_size, "passes": CALIBRATION_PASSES}
    if device.type == "cuda":
        key["accelerator"] = torch.cuda.get_device_name(device)
    if runtime_installed("openvino"):
        import importlib.metadata
        key["openvino"] = importlib.metadata.version("openvino")
    return key


def candidates(device: torch.device, precision: str = "auto", runtime: str = "auto") -> list[tuple[str, str]]:
    """The (precision, runtime) pairs worth measuring on ``device``, the reference first, limited to the given
    precision or runtime when not "auto". fp16 on a CPU (no fast kernels) and a runtime not installed are left out."""
    if device.type == "cuda":
        pairs = [REFERENCE, ("fp16", "torch")]
        if torch.cuda.get_device_capability(device) >= (8, 0):
            pairs.append(("bf16", "torch"))
    elif device.type == "mps":
        pairs = [REFERENCE, ("fp16", "torch")]
    else:
        pairs = [REFERENCE]
        if runtime_installed("openvino"):
            pairs += [("fp32", "openvino")] + ([("bf16", "openvino")] if cpu_has_bf16() else [])
        if cpu_has_bf16():
            pairs.append(("bf16", "torch"))
    return [(p, r) for p, r in pairs if precision in ("auto", p) and runtime in ("auto", r)]


def _calibration_batch(listing: DatasetListing, backbone: Backbone, count: int) -> torch.Tensor | None:
    """Up to ``count`` train images, spread over the listing, decoded and cropped as stage one does."""
    paths = listing.splits["train"].paths
    picked = paths[::max(1, len(paths) // count)][:count]
    dataset = ImageFiles(listing.root, [(path, NO_VIEW) for path in picked], backbone.transform(), min_side=backbone.resize)
    _, images, _ = collate_good([dataset[i] for i in range(len(dataset))])
    return images


def _measure(backbone: Backbone, model: torch.nn.Module, device: torch.device, pairs: list[tuple[str, str]],
             images: torch.Tensor, batch_size: int, keep: Path) -> list[Measured]:
    """Each pair's speed on ``images`` in batches of ``batch_size``, as stage one will run it (after a warm-up batch;
    the fastest of ``CALIBRATION_PASSES`` passes), and its vectors' cosine to those of the first pair; ``keep``: where
    OpenVINO's converted model is kept (stage one reads it back)."""
    measured, reference = [], None
    for precision, runtime in pairs:
        forward = prepare(backbone, model, device, precision, runtime, keep)
        forward(images[:batch_size])
        seconds = float("inf")
        for _ in range(CALIBRATION_PASSES):
            start = time.perf_counter()
            vectors = torch.cat([forward(batch) for batch in images.split(batch_size)])
            seconds = min(seconds, time.perf_counter() - start)
        reference = vectors if reference is None else reference
        cosine = torch.nn.functional.cosine_similarity(vectors.double(), reference.double(), dim=1)
        measured.append(Measured(precision, runtime, len(images) / seconds, cosine.mean().item(), cosine.min().item()))
    return measured


def choose(measured: list[Measured], allowed: list[tuple[str, str]]) -> tuple[str, str]:
    """The fastest faithful path among ``allowed``, where the reference (``measured[0]``) counts ``MIN_GAIN`` times
    its speed; when none of ``allowed`` is faithful (the reference not among them), the fastest of them."""
    reference = measured[0]
    options = [m for m in measured if (m.precision, m.runtime) in allowed]
    best = max([m for m in options if m.faithful] or options,
               key=lambda m: m.img_s * (MIN_GAIN if m is reference else 1.0))
    return best.precision, best.runtime


def resolve(settings: Settings, backbone: Backbone, device: torch.device, listing: DatasetListing, weights: str,
            made_with: dict | None = None, distributed: bool = False) -> tuple[Settings, PathChoice | None]:
    """``settings`` with a concrete precision and runtime (unchanged when neither is "auto"), and the choice. An
    existing feature file's way (``made_with``: its fingerprint) is kept while it can run here and FORCE is off, so
    "auto" never rebuilds a cache."""
    if "auto" not in (settings.precision, settings.runtime):
        return settings, None
    allowed = candidates(device, settings.precision, settings.runtime)
    if not allowed:
        raise UserError(f"no way to run PRECISION={settings.precision} RUNTIME={settings.runtime} on {device}; "
                        f"pass PRECISION=auto RUNTIME=auto")
    pairs = [REFERENCE, *(p for p in allowed if p != REFERENCE)]  # what is measured: the reference first
    key = machine(settings, device, weights)
    path = settings.backbone_dir() / PATH_FILE
    kept = (made_with or {}).get("precision"), (made_with or {}).get("runtime")
    if kept in allowed and not settings.force:
        choice = PathChoice(*kept, "kept: the cache was made so", [], key)
    elif (choice := _read(path, key, pairs)) is not None:
        pass
    elif distributed or len(allowed) == 1:
        choice = PathChoice(*allowed[0], "not measured under torchrun" if distributed else "the only way", [], key)
    elif (images := _calibration_batch(listing, backbone, max(CALIBRATION_IMAGES, settings.batch_size))) is None:
        choice = PathChoice(*allowed[0], "no decodable train image to measure on", [], key)
    else:
        log.info(f"features: measuring {len(pairs)} ways to run {backbone.name} on {len(images)} of your images "
                 f"(once per machine; kept in {path})")
        measured = _measure(backbone, load_backbone(backbone, settings.weights), device, pairs, images,
                            settings.batch_size, kept_model(settings.backbone_dir(), backbone, weights))
        choice = PathChoice(*choose(measured, allowed), f"measured on this machine, {PATH_FILE}", measured, key)
        with disk_full_as_user_error(path.parent, "features"):
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(asdict(choice), indent=2))
    return replace(settings, precision=choice.precision, runtime=choice.runtime), choice


def _read(path: Path, key: dict, pairs: list[tuple[str, str]]) -> PathChoice | None:
    """The choice in ``path`` when it was made on this machine from these candidates; else None."""
    try:
        saved = json.loads(path.read_text())
        choice = PathChoice(saved["precision"], saved["runtime"], saved["reason"],
                            [Measured(**m) for m in saved["measured"]], saved["machine"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if choice.machine != key or [(m.precision, m.runtime) for m in choice.measured] != pairs:
        return None
    return choice


def served(settings: Settings, fingerprint: dict | None) -> Settings:
    """``settings`` with each "auto" of precision and runtime replaced by the one the feature file was made with
    (``fingerprint``; without one, the reference's), so predict and embed compute vectors as the cache does."""
    made = dict(zip(("precision", "runtime"), REFERENCE)) | {k: v for k, v in (fingerprint or {}).items()
                                                              if k in ("precision", "runtime")}
    return replace(settings, **{name: made[name] for name in made if getattr(settings, name) == "auto"})
