"""Every setting of the pipeline, each with its one default.

The CLI builds its flags from these fields (``--batch-size`` for ``batch_size``), and the
Makefile passes a flag only when its variable is set, so a default lives here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path


def _setting(default, help: str, **kwargs):
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass(frozen=True)
class Settings:
    # where things are
    data: Path = _setting(Path("Cat_Dog_data"), "dataset root holding train/<class>/* and test/<class>/*")
    cache: Path = _setting(Path("cache"), "folder for feature caches, heads and reports")
    backbone: str = _setting("densenet121", "frozen feature extractor (see `python -m pipeline backbones`)")
    weights: Path | None = _setting(None, "local state-dict file to load instead of the backbone's default weights")
    # stage one
    device: str = _setting("auto", "auto (MPS, then CUDA, then CPU), cpu, cuda, cuda:N or mps")
    batch_size: int = _setting(32, "images per forward pass in stage one")
    precision: str = _setting("fp32", "backbone arithmetic: fp32, or bf16/fp16 autocast (vectors are stored as float32 either way)")
    runtime: str = _setting("torch", "torch (eager), compile (torch.compile: a minute to compile, then faster), "
                                     "or openvino (CPU only; pip install 'pipeline[fast-cpu]')")
    storage: str = _setting("float32", "dtype of the stored vectors: float32, or float16 for half the disk")
    workers: int = _setting(-1, "image-decoding worker processes; -1 picks from the CPU count")
    chunk_size: int = _setting(256, "images per committed chunk; an interrupted run resumes from the last one")
    force: bool = _setting(False, "re-extract everything even if the cache is up to date")
    merge: bool = _setting(False, "under torchrun, copy the parts into one plain features.h5 instead of joining them virtually")
    augment: int = _setting(0, "also cache this many augmented views of every train image (RandomRotation, RandomResizedCrop, flip)")
    # stage two
    seed: int = _setting(0, "seed for the validation split, head initialisation and shuffling")
    epochs: int = _setting(20, "maximum training epochs of the head")
    patience: int = _setting(5, "stop after this many epochs without a lower validation loss")
    hidden: int = _setting(256, "hidden units of the head")
    dropout: float = _setting(0.2, "dropout probability of the head")
    lr: float = _setting(0.003, "Adam learning rate of the head")
    head_batch_size: int = _setting(64, "vectors per optimisation step of the head")
    val_fraction: float = _setting(0.1, "fraction of train held out (stratified) for choosing the epoch and C")
    # compare
    backbones: str = _setting("densenet121 resnet50 efficientnet_lite0", "space-separated backbones for `compare`")
    # predict
    model: str = _setting("head", "which trained classifier predicts: head or logreg")
    top_k: int = _setting(1, "classes to show per image, most probable first")
    format: str = _setting("text", "output of predict: text, csv or json")
    # diagnostics
    debug: bool = _setting(False, "show full tracebacks instead of one-line errors")

    def backbone_dir(self) -> Path:
        """Folder holding everything made for this backbone: ``CACHE/<backbone>``."""
        return self.cache / self.backbone


DEFAULTS = Settings()
SETTING_FIELDS = {f.name: f for f in fields(Settings)}
