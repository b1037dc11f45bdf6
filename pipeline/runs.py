"""Trained runs: every ``train-head`` keeps its models under ``CACHE/<backbone>/runs/<name>/`` (``head.pt``,
``logreg.json``, ``training.json``), so a new head never replaces another. Naming, the training record, and which
run ``report``, ``predict`` and ``export`` read: the one named by RUN, else the best on validation.

Torch-free: choosing a run reads JSON only.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import UserError

RUNS = "runs"
TRAINING_FILE = "training.json"
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]{0,99}")
SWEPT = ("lr", "hidden", "dropout", "seed")  # the head's settings a sweep varies; a derived run name is made of them


def check_run_name(name: str) -> None:
    """A run name is a folder name: letters, digits and ``._+=-``, not starting with a dot or dash, at most 100."""
    if name and not RUN_NAME.fullmatch(name):
        raise UserError(f"--run '{name}' is not a usable run name; use letters, digits and ._+=- (at most 100, "
                        f"starting with a letter or digit), e.g. RUN=lr0.01-wide")


def derived_name(settings) -> str:
    """The run name made from the head's settings: ``lr0.003-hidden256-dropout0.2-seed0``."""
    return "-".join(f"{name}{getattr(settings, name):g}" for name in SWEPT)


def runs_dir(settings) -> Path:
    return settings.backbone_dir() / RUNS


def training_dir(settings) -> Path:
    """Where ``train-head`` writes: the run named by RUN, else by ``derived_name``."""
    return runs_dir(settings) / (settings.run or derived_name(settings))


def seal(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def read_training_record(folder: Path) -> dict:
    """``training.json``: what the last completed ``train-head`` of this run wrote (written last, after the model
    files): its settings, validation scores and the sha256 of every model file. Missing, damaged or edited, it is a
    UserError."""
    path = folder / TRAINING_FILE
    if not path.is_file():
        raise UserError(f"no {path}; run `make train-head` with the same BACKBONE and CACHE first")
    try:
        record = json.loads(path.read_text())
        intact = record.pop("sha256") == seal(record)
    except (ValueError, KeyError, TypeError, AttributeError):
        intact = False
    if not intact:
        raise UserError(f"{path} is damaged; run `make train-head RUN={folder.name}` again")
    return record


@dataclass(frozen=True)
class RunScore:
    """One trained run as its training record describes it: validation scores and the settings that made it."""
    name: str
    head_val_accuracy: float
    head_val_loss: float
    logreg_val_accuracy: float
    settings: dict

    @classmethod
    def of(cls, folder: Path) -> RunScore:
        record = read_training_record(folder)
        validation = record["validation"]
        return cls(folder.name, validation["head_accuracy"], validation["head_loss"], validation["logreg_accuracy"],
                   record["settings"])

    def rank(self) -> tuple[float, float]:
        """Key to maximise: the head's validation accuracy, then its lower validation loss."""
        return self.head_val_accuracy, -self.head_val_loss


def best_first(scores) -> list[RunScore]:
    """``scores`` ordered best on validation first (``RunScore.rank``; ties: by name)."""
    return sorted(scores, key=lambda r: (tuple(-v for v in r.rank()), r.name))


def trained_runs(settings) -> list[RunScore]:
    """Every run of the backbone with a training record, best on validation first."""
    folder = runs_dir(settings)
    return best_first(RunScore.of(d) for d in folder.iterdir() if (d / TRAINING_FILE).is_file()) if folder.is_dir() else []


def chosen_run(settings) -> Path:
    """The folder of the run to read: RUN when given (it must exist), else the best on validation."""
    folder = runs_dir(settings)
    if settings.run:
        if not (folder / settings.run / TRAINING_FILE).is_file():
            names = [r.name for r in trained_runs(settings)]
            raise UserError(f"no trained run '{settings.run}' in {folder}; "
                            + (f"trained: {', '.join(names)}" if names else "run `make train-head` first"))
        return folder / settings.run
    runs = trained_runs(settings)
    if not runs:
        raise UserError(f"no trained head in {folder}; run `make train-head` with the same BACKBONE and CACHE first")
    return folder / runs[0].name
