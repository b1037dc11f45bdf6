"""Stage one under torchrun: two CPU processes (gloo) give the single-process file, joined virtually, and resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, make_images, run_cli, run_cli_process
from pipeline.store import FeatureStore

LITE = ("--backbone", "efficientnet_lite0")
pytestmark = pytest.mark.slow
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]


def torchrun(*args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([*TORCHRUN, "-m", "pipeline", "features", *map(str, args)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs)


def vectors(cache: Path, split: str) -> tuple[list[str], np.ndarray, np.ndarray, bool]:
    with FeatureStore(cache / "efficientnet_lite0" / "features.h5") as store:
        return store.paths(split), store.labels(split), store.features(split), store.file[split]["features"].is_virtual


def _rank_pid(rank: int) -> int | None:
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                environ = (proc / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ and b"PIPELINE_TEST_RUN=distributed" in environ:
                return int(proc.name)
    return None


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("dist") / "data", {"train": 24, "test": 6})


@pytest.fixture(scope="module")
def single(data, tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("single")
    assert run_cli("features", "--data", data, "--cache", cache, *LITE) == 0
    return cache


def test_two_ranks_join_into_the_single_process_file_and_train_the_same_head(data, single, tmp_path):
    cache = tmp_path / "cache"
    process = torchrun("--data", data, "--cache", cache, *LITE)
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, out
    assert "rank 0/2: features: extracted 30 " in out and "rank 1/2: features: extracted 30 " in out
    for split in ("train", "test"):
        paths, labels, features, virtual = vectors(cache, split)
        s_paths, s_labels, s_features, _ = vectors(single, split)
        assert virtual and paths == s_paths
        np.testing.assert_array_equal(labels, s_labels)
        np.testing.assert_allclose(features, s_features, rtol=1e-4, atol=1e-5)
    for folder in (cache, single):
        assert run_cli("train-head", "--cache", folder, *LITE, "--epochs", "3") == 0
        assert run_cli("report", "--cache", folder, *LITE) == 0
    metrics = [json.loads((c / "efficientnet_lite0/metrics.json").read_text()) for c in (cache, single)]
    assert metrics[0]["head"]["test_accuracy"] == metrics[1]["head"]["test_accuracy"]
    assert metrics[0]["logreg"]["test_accuracy"] == metrics[1]["logreg"]["test_accuracy"]

    again = torchrun("--data", data, "--cache", cache, *LITE)
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0 and "features: up to date" in out, out

    merged = torchrun("--data", data, "--cache", cache, *LITE, "--merge")
    assert merged.wait(timeout=300) == 0
    assert not vectors(cache, "train")[3]  # one plain file now
    for part in (cache / "efficientnet_lite0").glob("features.part-1-of-2.*.h5"):
        part.unlink()
    assert run_cli("train-head", "--cache", cache, *LITE, "--epochs", "1") == 0  # needs no part


def test_a_missing_part_is_refused_not_read_as_zeros(data, tmp_path):
    cache = tmp_path / "cache"
    assert torchrun("--data", data, "--cache", cache, *LITE).wait(timeout=300) == 0
    [part] = (cache / "efficientnet_lite0").glob("features.part-1-of-2.*.h5")
    part.unlink()
    result = run_cli_process("train-head", "--cache", cache, *LITE)
    assert result.returncode == 2 and f"reads its vectors from {part.name}, which is missing" in result.stderr


def test_a_killed_rank_resumes_from_its_chunks(data, single, tmp_path):
    cache = tmp_path / "cache"
    args = ("--data", data, "--cache", cache, *LITE, "--batch-size", "2", "--chunk-size", "4")
    env = {**os.environ, "PIPELINE_TEST_RUN": "distributed"}
    process = torchrun(*args, env=env)
    partial = cache / "efficientnet_lite0" / "features.part-1-of-2.partial"
    deadline = time.time() + 180
    while len(list(partial.glob("*/chunk-*.npz"))) < 2:
        assert process.poll() is None and time.time() < deadline, "rank 1 finished before it could be killed"
        time.sleep(0.05)
    pid = _rank_pid(1)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    process.communicate(timeout=120)
    assert process.returncode != 0
    resumed = torchrun(*args)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    rank1 = next(line for line in out.splitlines() if line.startswith("rank 1/2"))
    assert int(rank1.split("resumed ")[1].split(",")[0]) >= 8
    paths, _, features, _ = vectors(cache, "train")
    s_paths, _, s_features, _ = vectors(single, "train")
    assert paths == s_paths
    np.testing.assert_allclose(features, s_features, rtol=1e-4, atol=1e-5)


def test_a_join_reads_only_the_part_versions_it_was_built_from(data, single, tmp_path):
    """Rank 0 killed right after it renamed its new part into place: the old join still reads exactly the old
    vectors (it names the versions it joined), and the next run joins the new ones."""
    cache = tmp_path / "cache"
    grown = tmp_path / "data"
    shutil.copytree(data, grown)
    assert torchrun("--data", grown, "--cache", cache, *LITE).wait(timeout=300) == 0
    before = {s: vectors(cache, s) for s in ("train", "test")}
    for i in range(6):
        shutil.copy(grown / "train/dog/dog0.png", grown / f"train/cat/added{i}.png")
    killed = torchrun("--data", grown, "--cache", cache, *LITE, env={**os.environ, "PIPELINE_KILL_AT": "store-after-rename@0"})
    out, _ = killed.communicate(timeout=300)
    assert killed.returncode != 0, out
    for split in ("train", "test"):
        paths, labels, features, _ = vectors(cache, split)
        assert paths == before[split][0]
        np.testing.assert_array_equal(features, before[split][2])
    assert run_cli("train-head", "--cache", cache, *LITE, "--epochs", "1") == 0
    again = torchrun("--data", grown, "--cache", cache, *LITE)
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out
    paths, _, features, _ = vectors(cache, "train")
    assert len(paths) == len(before["train"][0]) + 6 and not np.isnan(features).any()
    reference = tmp_path / "reference"
    assert run_cli("features", "--data", grown, "--cache", reference, *LITE) == 0
    r_paths, _, r_features, _ = vectors(reference, "train")
    assert paths == r_paths
    np.testing.assert_allclose(features, r_features, rtol=1e-4, atol=1e-5)
    assert len(list((cache / "efficientnet_lite0").glob("features.part-*.h5"))) == 2  # old versions removed
