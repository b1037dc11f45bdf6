"""Every setting of the pipeline, each with its one default and the values it may take.

The CLI builds its flags from these fields (``--batch-size`` for ``batch_size``, ``choices=`` from the
metadata), and the Makefile passes a flag only when its variable is set, so a default lives here and
nowhere else. A ``Settings`` is checked when it is made: an invalid one never exists, so nothing on disk
is touched on behalf of a bad setting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from pipeline.errors import UserError
from pipeline.runs import check_run_name

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
RUNTIMES = ("auto", "torch", "compile", "openvino")
STORAGES = ("float32", "float16")
MODELS = ("head", "logreg")
FORMATS = ("text", "csv", "json")
NORMALISATIONS = ("power", "none")
CLASS_WEIGHTS = ("balanced", "none")
FINAL_FITS = ("auto", "train+val", "train")
SEED_MAX = 2**32 - 1  # numpy's and scikit-learn's random_state range


def _setting(default, help: str, choices: tuple | None = None, low: float | None = None, high: float | None = None,
             low_open: bool = False, high_open: bool = False):
    """A field with its help text; ``choices``, or bounds ``[low, high]`` (``*_open``: the bound itself excluded)."""
    return field(default=default, metadata={"help": help, "choices": choices, "low": low, "high": high,
                                            "low_open": low_open, "high_open": high_open})


def _bounds_text(meta: dict) -> str:
    low, high = meta["low"], meta["high"]
    parts = []
    if low is not None:
        parts.append(f"{'above' if meta['low_open'] else 'at least'} {low}")
    if high is not None:
        parts.append(f"{'below' if meta['high_open'] else 'at most'} {high}")
    return " and ".join(parts)


def check_value(name: str, value) -> None:
    """Raise ``UserError`` naming the flag and what it accepts when ``value`` is not allowed for setting ``name``."""
    meta = SETTING_FIELDS[name].metadata
    flag = "--" + name.replace("_", "-")
    if meta["choices"] is not None and value not in meta["choices"]:
        raise UserError(f"{flag} '{value}' is not one of: {', '.join(meta['choices'])}")
    low, high = meta["low"], meta["high"]
    if low is None and high is None:
        return
    if not math.isfinite(value) or (low is not None and (value <= low if meta["low_open"] else value < low)) or \
            (high is not None and (value >= high if meta["high_open"] else value > high)):
        raise UserError(f"{flag} must be a number {_bounds_text(meta)} (got {value})")


@dataclass(frozen=True)
class Settings:
    # where things are
    data: Path = _setting(Path("Cat_Dog_data"), "dataset root holding train/<class>/* and test/<class>/*")
    cache: Path = _setting(Path("cache"), "folder for feature caches, heads and reports")
    backbone: str = _setting("densenet121", "frozen feature extractor (see `python -m pipeline backbones`)")
    weights: Path | None = _setting(None, "local state-dict file to load instead of the backbone's default weights")
    # stage one
    device: str = _setting("auto", "auto (MPS, then CUDA, then CPU), cpu, cuda, cuda:N or mps")
    batch_size: int = _setting(32, "images per forward pass in stage one", low=1, high=2**16)
    precision: str = _setting("auto", "backbone arithmetic: auto (the fastest faithful one, measured once per machine: "
                                      "see pipeline/fastpath.py), fp32, or bf16/fp16 autocast (vectors are stored as "
                                      "float32 either way)", choices=PRECISIONS)
    runtime: str = _setting("auto", "auto (with PRECISION, the fastest faithful way, measured), torch (eager), compile "
                                    "(torch.compile: a minute to compile, then faster), or openvino (CPU only; "
                                    "pip install 'pipeline[fast-cpu]')", choices=RUNTIMES)
    storage: str = _setting("float32", "dtype of the stored vectors: float32, or float16 for half the disk", choices=STORAGES)
    workers: int = _setting(-1, "image-decoding worker processes; -1 picks from the CPU count", low=-1, high=256)
    chunk_size: int = _setting(256, "images per committed chunk; an interrupted run resumes from the last one", low=1,
                               high=2**20)
    force: bool = _setting(False, "re-extract everything even if the cache is up to date")
    verify: bool = _setting(False, "also re-read every image and every stored vector: catches images edited in place "
                                   "(same size and mtime) and damaged vectors, and redoes just those")
    merge: bool = _setting(False, "under torchrun, copy the parts into one plain features.h5 instead of joining them virtually")
    augment: int = _setting(0, "also cache this many augmented views of every train image (RandomRotation, RandomResizedCrop, flip)",
                            low=0, high=1000)
    # stage two
    seed: int = _setting(0, "seed for the validation split, head initialisation and shuffling", low=0, high=SEED_MAX)
    epochs: int = _setting(20, "maximum training epochs of the head", low=1, high=10**6)
    patience: int = _setting(5, "stop after this many epochs without a lower validation loss", low=1, high=10**6)
    hidden: int = _setting(256, "hidden units of the head", low=1, high=2**16)
    dropout: float = _setting(0.2, "dropout probability of the head", low=0, high=1, high_open=True)
    lr: float = _setting(0.003, "Adam learning rate of the head", low=0, low_open=True)
    head_batch_size: int = _setting(0, "vectors per optimisation step of the head; 0 picks from the train size "
                                       "(64 up to 8192 vectors, then doubled per doubling: 1024 for 10^5)", low=0, high=2**20)
    val_fraction: float = _setting(0.1, "fraction of train held out (stratified) for choosing the epoch and C",
                                   low=0, high=1, low_open=True, high_open=True)
    cv_folds: int = _setting(0, "0 or 1: the baseline's C is chosen on the validation split; k: by stratified k-fold "
                                "cross-validation when train holds at most 20,000 vectors (fewer folds when a class has "
                                "fewer images; several times the baseline's time)",
                             low=0, high=100)
    final_fit: str = _setting("auto", "what head and baseline are fitted on once the epoch and C are chosen: "
                                      "train+val (all of train), train (without the validation split) or auto "
                                      "(train+val up to 20,000 train vectors, train above)",
                              choices=FINAL_FITS)
    normalisation: str = _setting("power", "element-wise normalisation of the vectors before head and baseline: power "
                                           "(signed square root) or none", choices=NORMALISATIONS)
    class_weight: str = _setting("balanced", "weight of each train vector in the loss of head and baseline: balanced "
                                             "(N / (classes x its class's count): every class counts the same) or none",
                                 choices=CLASS_WEIGHTS)
    run: str = _setting("", "name of a trained run: train-head keeps its models in CACHE/<backbone>/runs/<RUN> (empty: "
                            "named after lr, hidden, dropout and seed); report, predict and export read that run "
                            "(empty: the best on validation)")
    # compare
    backbones: str = _setting("densenet121 resnet50 efficientnet_lite0", "space-separated backbones for `compare`")
    # predict
    model: str = _setting("head", "which trained classifier predicts: head or logreg", choices=MODELS)
    top_k: int = _setting(1, "classes to show per image, most probable first", low=1, high=10**6)
    format: str = _setting("text", "output of predict: text, csv or json", choices=FORMATS)
    # diagnostics
    debug: bool = _setting(False, "show full tracebacks instead of one-line errors")

    def __post_init__(self) -> None:
        for name in ("data", "cache", "weights"):  # paths may be given as str, as everywhere in Python
            if isinstance(getattr(self, name), str):
                object.__setattr__(self, name, Path(getattr(self, name)))
        for name in SETTING_FIELDS:
            check_value(name, getattr(self, name))
        check_run_name(self.run)
        if not self.backbones.split():
            raise UserError("--backbones is empty; pass BACKBONES=\"densenet121 efficientnet_lite0\" (space-separated)")
        if self.weights is not None and not Path(self.weights).is_file():
            what = "is a folder" if Path(self.weights).is_dir() else "not found" if not Path(self.weights).exists() \
                else "is not a regular file"
            raise UserError(f"weights file '{self.weights}' {what}; pass WEIGHTS=/path/to/state_dict.pth")

    def backbone_dir(self) -> Path:
        """Folder holding everything made for this backbone: ``CACHE/<backbone>``."""
        return self.cache / self.backbone


SETTING_FIELDS = {f.name: f for f in fields(Settings)}
DEFAULTS = Settings()
