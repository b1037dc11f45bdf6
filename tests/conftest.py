"""Shared fixtures: small generated ImageFolder datasets, the real data, and CLI runners."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import fastpath
from pipeline.cli import main

MEASURED_CANDIDATES = fastpath.candidates

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = REPO.parent / "shared" / "data" / "cats-dogs"
COLORS = {"cat": (200, 60, 40), "dog": (40, 60, 200), "bird": (40, 200, 60)}


def make_images(root: Path, per_class: dict[str, int], classes=("cat", "dog"), seed: int = 0, size=(40, 32)) -> Path:
    """Write noisy solid-colour PNGs: ``root/<split>/<class>/<class><i>.png``; classes are separable by colour."""
    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = np.clip(np.array(COLORS[name]) + rng.normal(0, 30, (size[1], size[0], 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{name}{i}.png")
    return root


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    return make_images(tmp_path / "data", {"train": 10, "test": 4})


@contextmanager
def tmpfs(folder: Path, size: int) -> Iterator[Path]:
    """A tmpfs of ``size`` bytes mounted on ``folder`` (skips the test where mounting is not allowed)."""
    folder.mkdir(parents=True, exist_ok=True)
    if not shutil.which("mount") or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", folder],
                                                   capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root and mount)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", folder], check=True)


def run_folder(cache: Path, backbone: str = "efficientnet_lite0") -> Path:
    """The folder of the trained run that report, predict and export read by default (the best on validation)."""
    from pipeline.config import Settings
    from pipeline.runs import chosen_run

    return chosen_run(Settings(cache=cache, backbone=backbone))


def run_cli(*args: str) -> int:
    """The CLI in this process (fast: torch is imported once)."""
    return main([str(a) for a in args])


EXACT = ("--precision", "fp32", "--runtime", "torch")  # the exact path: stage one's vectors as torchvision's
MEASURING = ("features", "all", "compare")  # commands whose PRECISION=auto RUNTIME=auto may measure and choose


def run_cli_process(*args: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """The CLI as a user runs it, in a fresh Python process; commands that choose their stage-one path run the exact
    one unless the test passes --precision or --runtime (the in-process runs get it from ``exact_by_default``)."""
    args = tuple(map(str, args))
    if args[0] in MEASURING and not {"--precision", "--runtime"} & set(args):
        args = (*args, *EXACT)
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **(env or {})}, **kwargs)


@pytest.fixture(scope="session", autouse=True)
def exact_by_default():
    """PRECISION=auto RUNTIME=auto resolve to the exact path (fp32, torch) in tests, from the first fixture on: a
    measured choice depends on timing. Tests of the choice itself are marked ``measured_path``."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fastpath, "candidates", lambda device, precision="auto", runtime="auto": [
            (precision if precision != "auto" else "fp32", runtime if runtime != "auto" else "torch")])
        yield


@pytest.fixture(autouse=True)
def measured_path(request, monkeypatch):
    if "measured_path" in request.keywords:
        monkeypatch.setattr(fastpath, "candidates", MEASURED_CANDIDATES)


@pytest.fixture
def real_data() -> Path:
    if not (REAL_DATA / "train").is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"the real dataset is missing at {REAL_DATA}; CI must have it")
        pytest.skip(f"real dataset not found at {REAL_DATA}")
    return REAL_DATA
