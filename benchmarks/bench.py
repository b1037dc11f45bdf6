"""``make bench``: stage one against the bare forward, cached against the seed notebook's way, the CPU
runtimes side by side, stage two alone, peak memory. Ratios, measured in one run on one machine.

Prints a table and writes its keys into ``CACHE/bench.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from pipeline import baseline
from pipeline.backbones import get_backbone, load_backbone
from pipeline.config import DEFAULTS, Settings
from pipeline.extract import decode_workers, extract
from pipeline.files import atomic_write_text
from pipeline.head import HeadClassifier, MLPHead, normalise
from pipeline.images import ImageFiles, collate_good, jpeg_decoder, load_image, load_rgb
from pipeline.listing import scan_dataset
from pipeline.inference import prepare, resolve_device, runtime_installed
from pipeline.store import FeatureStore, features_file

REPO = Path(__file__).resolve().parents[1]
RUNTIME_VARIANTS = {  # name: (precision, runtime, channels_last and allocator tuning)
    "eager fp32": ("fp32", "torch", False),
    "eager fp32 channels_last": ("fp32", "torch", True),
    "eager bf16 autocast": ("bf16", "torch", True),
    "torch.compile fp32": ("fp32", "compile", True),
    "openvino fp32": ("fp32", "openvino", True),
    "openvino bf16": ("bf16", "openvino", True),
}


def subset(data: Path, folder: Path, n_train: int, n_test: int) -> Path:
    """A smaller ImageFolder of symlinks: the first n images of each split, classes interleaved."""
    listing = scan_dataset(data)
    for split, n in (("train", n_train), ("test", n_test)):
        entries = listing.splits[split].entries
        by_class = [[e for e in entries if e.label == c] for c in range(len(listing.classes))]
        picked = [e for group in zip(*by_class) for e in group][:n]
        for entry in picked:
            target = folder / entry.path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to((data / entry.path).resolve())
    return folder


def random_weights(backbone: str, folder: Path) -> Path:
    path = folder / f"{backbone}-random.pth"
    if not path.exists():
        torch.manual_seed(0)
        torch.save(get_backbone(backbone).build().state_dict(), path)
    return path


def weights_for(backbone: str, folder: Path) -> Path | None:
    """Real weights where they are on this machine (packaged), random ones otherwise: speed does not depend on them."""
    b = get_backbone(backbone)
    return None if b.packaged_weights else random_weights(backbone, folder)


def bare_forward(backbone: str, weights: Path | None, variant: str, batch_size: int, device: str, images: int) -> float:
    """img/s of the backbone alone on ready tensors; run in a fresh process so each variant starts clean."""
    precision, runtime, tuned = RUNTIME_VARIANTS[variant]
    b = get_backbone(backbone)
    model = load_backbone(b, weights)
    if tuned:
        forward = prepare(b, model, resolve_device(device), precision, runtime)
    else:
        dev = resolve_device(device)
        model = torch.nn.Sequential(b.normalize(), model).to(dev)

        def forward(x):
            with torch.inference_mode():
                return model(x.to(dev)).cpu()
    batch = torch.randint(0, 256, (batch_size, 3, b.crop, b.crop), dtype=torch.uint8)
    forward(batch)  # warm-up (and OpenVINO's compile)
    batches = max(2, images // batch_size)
    start = time.perf_counter()
    for _ in range(batches):
        forward(batch)
    return batches * batch_size / (time.perf_counter() - start)


def in_child(args: list[str]) -> dict:
    """Run this script in a child process and return the JSON it prints last."""
    process = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True)
    if process.returncode:
        raise RuntimeError(f"{' '.join(args)} failed:\n{process.stderr}")
    return json.loads(process.stdout.strip().splitlines()[-1])


def peak_rss_mb(args: list[str]) -> float:
    """Peak resident memory of one CLI command in a fresh process, sampled from /proc (ru_maxrss would
    include this benchmark's own memory, which a child inherits as its high-water mark at fork)."""
    process = subprocess.Popen([sys.executable, "-m", "pipeline", *map(str, args)], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    while process.poll() is None:
        with contextlib.suppress(OSError, IndexError):  # gone, or a zombie with no memory left
            status = Path(f"/proc/{process.pid}/status").read_text()
            peak = max(peak, int(status.split("VmHWM:")[1].split()[0]))
        time.sleep(0.02)
    if process.returncode:
        raise RuntimeError(process.stderr.read())
    return peak / 1024


def stage_one(settings: Settings, data: Path, images: int, cache: Path) -> dict:
    """Stage one over ``data`` against the bare forward of the same backbone, batch size and device, measured
    just before and just after it (the machine's speed drifts) on ``images`` images, and against the forward
    calls inside the run itself (the same moments, so drift cancels)."""
    bare_args = [__file__, "--forward-only", settings.backbone, str(settings.weights or "-"), "eager fp32 channels_last",
                 str(images), "--batch-size", str(settings.batch_size), "--device", settings.device]
    before = in_child(bare_args)["img_s"]
    run = extract(Settings(**{**vars(settings), "data": data, "cache": cache}))
    after = in_child(bare_args)["img_s"]
    rate, bare, in_run = run.extracted / run.seconds, (before + after) / 2, run.extracted / run.backbone_seconds
    return {"images": run.extracted, "pipeline_img_s": rate, "bare_forward_img_s": bare,
            "bare_forward_before_after": [before, after], "efficiency": rate / bare,
            "forward_in_run_img_s": in_run, "efficiency_in_run": rate / in_run}


def uncached_training(backbone: str, weights: Path | None, data: Path, settings: Settings, epochs: int) -> float:
    """The seed notebook's way: every epoch pushes every image through the frozen backbone, then the head; its
    loader gets stage one's choice of decode workers (on 2 cores none: workers there slow both ways down)."""
    b = get_backbone(backbone)
    device = resolve_device(settings.device)
    forward = prepare(b, load_backbone(b, weights), device)
    listing = scan_dataset(data)
    entries = listing.splits["train"].entries
    dataset = ImageFiles(data, [(e.path, e.view) for e in entries], b.transform(), min_side=b.resize)
    labels = torch.tensor([e.label for e in entries])
    workers = decode_workers(settings, device, len(entries))
    loader = torch.utils.data.DataLoader(dataset, batch_size=settings.batch_size, shuffle=True, collate_fn=collate_good,
                                         num_workers=workers, persistent_workers=workers > 0)
    head = MLPHead(b.feature_dim, len(listing.classes))
    optimizer = torch.optim.Adam(head.parameters(), lr=settings.lr)
    start = time.perf_counter()
    for _ in range(epochs):
        for indices, images, _ in loader:
            optimizer.zero_grad()
            features = forward(images).clone()  # out of inference mode, so autograd may use it
            loss = torch.nn.functional.nll_loss(head(features), labels[indices])
            loss.backward()
            optimizer.step()
    return time.perf_counter() - start


def head_training_seconds(X: np.ndarray, y: np.ndarray, epochs: int, seed: int = 0, lr: float = DEFAULTS.lr) -> float:
    split = len(X) * 9 // 10
    start = time.perf_counter()
    HeadClassifier(epochs=epochs, patience=epochs, seed=seed, lr=lr).fit(X[:split], y[:split], X[split:], y[split:])
    return time.perf_counter() - start


def interleaved_medians(ways: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Median seconds of each way (a function returning the seconds it measured), run ``repeats`` times interleaved
    (the machine's speed drifts)."""
    seconds: dict[str, list[float]] = {way: [] for way in ways}
    for _ in range(repeats):
        for way, run in ways.items():
            seconds[way].append(run())
    return {way: float(np.median(times)) for way, times in seconds.items()}


def baseline_blas_seconds(X: np.ndarray, y: np.ndarray, repeats: int = 3) -> dict:
    """The logistic baseline's fit on (X, y), median seconds of ``repeats`` interleaved, with numpy's and SciPy's BLAS
    sequential (the library's way, ``baseline.sequential_numpy_blas``) and left on their default threads."""
    def fit(context: contextlib.AbstractContextManager) -> float:
        with context:
            start = time.perf_counter()
            baseline.LogisticBaseline().fit(X, y)
            return time.perf_counter() - start

    return interleaved_medians({
        "sequential": lambda: fit(contextlib.nullcontext()),
        "threaded": lambda: fit(mock.patch.object(baseline, "sequential_numpy_blas", contextlib.nullcontext)),
    }, repeats)


FIRST_HEAD_FIT = """
import json, sys, time
from unittest import mock
import numpy as np, torch
from pipeline import head
X, y = np.random.default_rng(0).normal(size=(1000, {dim})).astype(np.float32), np.arange(1000) % 2
optimiser = head.Adam if sys.argv[1] == "functional" else lambda params, lr, fused: torch.optim.Adam(params, lr=lr, fused=fused)
with mock.patch.object(head, "Adam", optimiser):
    start = time.perf_counter()
    head.HeadClassifier(epochs=2).fit(X, y)
print(json.dumps({{"s": time.perf_counter() - start}}))
"""


def first_head_fit_seconds(dim: int, repeats: int = 3) -> dict:
    """A head's first fit in a fresh process (1,000 vectors, 2 epochs), median seconds of ``repeats`` interleaved,
    with the library's Adam (torch's functional API, ``head.Adam``) and with torch.optim.Adam, whose first use
    imports torch._dynamo."""
    return interleaved_medians({way: lambda way=way: in_child(["-c", FIRST_HEAD_FIT.format(dim=dim), way])["s"]
                                for way in ("functional", "torch.optim")}, repeats)


def power_normalisation_ms(X: np.ndarray, repeats: int = 20) -> dict:
    """Milliseconds (best of ``repeats``) of ``normalise(X, "power")`` against torch's plain sign(x) * sqrt(|x|) on
    the same vectors, and the fraction of them that are zero: torch's CPU root is slow on zeros."""
    T = torch.from_numpy(X)
    ways = {"ours": lambda: normalise(T, "power"), "plain": lambda: T.abs().sqrt_().copysign_(T)}
    best = {way: min(timeit.repeat(run, number=1, repeat=repeats)) * 1e3 for way, run in ways.items()}
    return {**best, "zeros": float((X == 0).mean()), "vectors": len(X)}


def row_compress_ms(dim: int, rows: int = 8192, repeats: int = 20) -> dict:
    """Milliseconds (best of ``repeats``) to copy the 90% of a block of ``rows`` float32 vectors that a mask keeps
    into place, as stage two splits its train matrix while reading it: torch's index_select (the library's way) against
    numpy's compress."""
    block = np.random.default_rng(0).normal(size=(rows, dim)).astype(np.float32)
    keep = np.random.default_rng(1).random(rows) < 0.9
    out = np.zeros((int(keep.sum()), dim), dtype=np.float32)
    compress_rows = importlib.import_module("pipeline.train")._compress_rows  # the module, not the function `train`
    ways = {"ours": lambda: compress_rows(keep, block, out), "numpy": lambda: np.compress(keep, block, axis=0, out=out)}
    return {way: min(timeit.repeat(run, number=1, repeat=repeats)) * 1e3 for way, run in ways.items()} | {"rows": rows}


def decoder_ms(data: Path, backbone: str, images: int = 200) -> dict:
    """Per image, decode and resize to the backbone's crop: Pillow alone against ``load_image`` (TorchCodec for
    plain JPEGs, where it is installed)."""
    transform, resize = get_backbone(backbone).transform(), get_backbone(backbone).resize
    paths = [data / e.path for e in scan_dataset(data).splits["train"].entries[:images]]
    decoders = {"pillow": lambda path: pil_to_tensor(load_rgb(path, resize))}
    if jpeg_decoder() is not None:
        decoders["torchcodec"] = lambda path: load_image(path, resize)
    timings = {}
    for name, decode in decoders.items():
        start = time.perf_counter()
        for path in paths:
            transform(decode(path))
        timings[f"{name}_ms"] = 1000 * (time.perf_counter() - start) / len(paths)
    return timings


def decode_ms(folder: Path, size=(3000, 2000), repeats: int = 5) -> dict:
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    path = folder / "large.jpg"
    photo.save(path, quality=90)
    timings = {}
    for name, min_side in (("full", None), ("draft", 255)):
        start = time.perf_counter()
        for _ in range(repeats):
            load_rgb(path, min_side)
        timings[f"{name}_ms"] = 1000 * (time.perf_counter() - start) / repeats
    return {"image": f"{size[0]}x{size[1]} JPEG", **timings, "speedup": timings["full_ms"] / timings["draft_ms"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "cats-dogs")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--compare", nargs="*", default=["densenet121", "efficientnet_lite0"],
                        help="backbones for the CPU-runtime table (random weights where none are on disk)")
    parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    parser.add_argument("--device", default=DEFAULTS.device)
    parser.add_argument("--images", type=int, default=384, help="train images used for stage one and the notebook's way")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--heads", type=int, default=8, help="size of the hyper-parameter sweep")
    parser.add_argument("--cache", type=Path, default=DEFAULTS.cache)
    parser.add_argument("--forward-only", nargs=4, metavar=("BACKBONE", "WEIGHTS", "VARIANT", "IMAGES"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.forward_only:
        backbone, weights, variant, images = args.forward_only
        rate = bare_forward(backbone, None if weights == "-" else Path(weights), variant, args.batch_size, args.device, int(images))
        print(json.dumps({"img_s": rate}))
        return

    results: dict = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                 "torch": torch.__version__, "device": str(resolve_device(args.device))}}
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    try:
        small = subset(args.data, work / "small", args.images // 4, 16)
        data = subset(args.data, work / "data", args.images, 16)
        weights = weights_for(args.backbone, work)
        settings = Settings(data=data, cache=work / "cache", backbone=args.backbone, weights=weights,
                            batch_size=args.batch_size, device=args.device, precision="fp32", runtime="torch")
        # fp32 PyTorch throughout, as the bare forward it is compared with; the default path has its own section

        # 1. stage one against the bare forward, each backbone on the whole dataset
        results["stage1"] = {"backbone": args.backbone, "batch_size": args.batch_size,
                             **stage_one(settings, args.data, args.images, work / "whole")}
        results["stage1_other"] = {
            other: stage_one(Settings(**{**vars(settings), "backbone": other, "weights": weights_for(other, work)}),
                             args.data, args.images, work / "whole")
            for other in args.compare if other != args.backbone
        }
        summary = extract(settings)
        results["workers"] = {}
        for workers in (0, 1, 2):
            run = extract(Settings(**{**vars(settings), "cache": work / f"workers{workers}", "workers": workers}))
            results["workers"][str(workers)] = run.extracted / run.seconds

        # 2. time to a trained head: cached against the notebook's way
        with FeatureStore(features_file(settings.backbone_dir())) as store:
            X, y = store.features("train"), store.labels("train")
        head_s = head_training_seconds(X, y, args.epochs)
        uncached_s = uncached_training(args.backbone, weights, data, settings, args.epochs)
        cached_s = summary.seconds + head_s
        sweep_cached = summary.seconds + sum(head_training_seconds(X, y, args.epochs, seed=k, lr=DEFAULTS.lr * 2 ** (k % 4 - 2))
                                             for k in range(args.heads))
        per_epoch_uncached, per_epoch_head = uncached_s / args.epochs, head_s / args.epochs
        results["time_to_head"] = {
            "epochs": args.epochs, "images": len(y), "cached_s": cached_s, "uncached_s": uncached_s,
            "speedup": uncached_s / cached_s, "heads": args.heads, "sweep_cached_s": sweep_cached,
            "sweep_uncached_s_estimated": args.heads * uncached_s, "sweep_speedup": args.heads * uncached_s / sweep_cached,
            "speedup_by_epochs": {str(e): e * per_epoch_uncached / (summary.seconds + e * per_epoch_head) for e in (1, 5, 20, 50)},
        }

        # 3. CPU runtimes side by side, each in a fresh process; a runtime whose package is missing is listed as such
        results["runtimes"] = {}
        installed = [v for v, (_, runtime, _) in RUNTIME_VARIANTS.items() if runtime_installed(runtime)]
        results["runtimes_not_installed"] = [v for v in RUNTIME_VARIANTS if v not in installed]
        for backbone in args.compare:
            b_weights = weights_for(backbone, work)
            rates = {}
            for variant in installed:
                out = in_child([__file__, "--forward-only", backbone, str(b_weights or "-"), variant, "96",
                                   "--batch-size", str(args.batch_size), "--device", "cpu"])
                rates[variant] = out["img_s"]
            base = rates["eager fp32 channels_last"]
            results["runtimes"][backbone] = {v: {"img_s": r, "vs_channels_last": r / base} for v, r in rates.items()}

        # 4. stage two alone
        rng = np.random.default_rng(0)
        dim = get_backbone(args.backbone).feature_dim
        X10k, y10k = rng.normal(size=(10_000, dim)).astype(np.float32), rng.integers(0, 2, 10_000)
        epoch_s = head_training_seconds(X10k, y10k, 2) / 2
        from sklearn.linear_model import LogisticRegression
        start = time.perf_counter()
        LogisticRegression(max_iter=2000).fit(X, y)
        logreg_s = time.perf_counter() - start
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pipeline", "train-head", "--cache", str(settings.cache), "--backbone", args.backbone],
                       cwd=REPO, check=True, capture_output=True)
        train_head_s = time.perf_counter() - start
        results["stage2"] = {"head_epoch_s_per_10k": epoch_s, "logreg_fit_s": logreg_s, "logreg_n": len(y),
                             "baseline_fit_s": baseline_blas_seconds(X, y), "power_normalisation_ms": power_normalisation_ms(X),
                             "row_compress_ms": row_compress_ms(dim),
                             "first_head_fit_s": first_head_fit_seconds(dim), "train_head_wall_s": train_head_s}

        # 5. peak memory at two dataset sizes: stage one streams, stage two holds the vectors
        results["memory_mb"] = {}
        for name, folder in (("small", small), ("large", args.data)):
            cache = work / f"rss-{name}"
            common = ["--cache", cache, "--backbone", args.backbone]
            stage1 = peak_rss_mb(["features", "--data", folder, *common, "--workers", "0", *(["--weights", weights] if weights else [])])
            stage2 = peak_rss_mb(["train-head", *common, "--epochs", "2"])
            images = sum(len(s.paths) for s in scan_dataset(folder).splits.values())
            results["memory_mb"][name] = {"images": images, "stage1": stage1, "stage2": stage2}

        results["decode"] = decode_ms(work)
        results["decoder"] = decoder_ms(args.data, args.backbone)

        # 6. stage one across processes (torchrun, gloo on CPU): the same images with 1 and 2 processes (one per GPU)
        results["scaling"] = {}
        one_gpu = resolve_device(args.device).type == "cuda" and torch.cuda.device_count() < 2
        for nproc in (1,) if one_gpu else (1, 2):
            run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                                  "-m", "pipeline", "features", "--data", str(data), "--cache", str(work / f"nproc{nproc}"),
                                  "--backbone", args.backbone, "--device", args.device, *(["--weights", str(weights)] if weights else [])],
                                 cwd=REPO, capture_output=True, text=True, check=True)
            # the run's seconds, on its summary line (other "features: " lines say what it measured or rebuilt)
            seconds = next(float(m.group(1)) for l in run.stdout.splitlines()
                           if l.startswith("features: ") and (m := re.search(r"\| ([0-9.]+) s", l)))
            results["scaling"][str(nproc)] = {"seconds": seconds, "img_s": summary.extracted / seconds}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    args.cache.mkdir(parents=True, exist_ok=True)
    path = args.cache / "bench.json"  # other sections (default_path, scale) are kept: each script writes its own keys
    atomic_write_text(path, json.dumps({**(json.loads(path.read_text()) if path.is_file() else {}), **results}, indent=2))
    print(render(results))
    print(f"wrote {args.cache / 'bench.json'}")


def render(r: dict) -> str:
    s1, th, s2 = r["stage1"], r["time_to_head"], r["stage2"]
    lines = [
        f"machine: {r['machine']['cpu']}, {r['machine']['cores']} cores, torch {r['machine']['torch']}, device {r['machine']['device']}",
        "",
        f"| stage one ({s1['backbone']}, batch {s1['batch_size']}, {s1['images']} images) | img/s |",
        "|---|---:|",
        f"| pipeline (decode, resize, model, HDF5) | {s1['pipeline_img_s']:.1f} |",
        f"| bare forward on ready tensors | {s1['bare_forward_img_s']:.1f} |",
        f"| **efficiency** | **{s1['efficiency']:.2f}** |",
        f"| forward inside the run (same moments; its share of the run) | {s1['forward_in_run_img_s']:.1f} "
        f"({s1['efficiency_in_run']:.2f}) |",
        *[f"| decode and resize, per image: {name.removesuffix('_ms')} | {ms:.2f} ms |" for name, ms in r["decoder"].items()],
        *[f"| pipeline with {w} decode workers | {v:.1f} |" for w, v in r["workers"].items()],
        *[f"| {b} ({o['images']} images): pipeline {o['pipeline_img_s']:.1f}, bare {o['bare_forward_img_s']:.1f}, "
          f"**efficiency {o['efficiency']:.2f}** (inside the run {o['efficiency_in_run']:.2f}) | |" for b, o in r["stage1_other"].items()],
        "",
        f"| time to a trained head ({th['images']} train images) | cached | notebook's way | speedup |",
        "|---|---:|---:|---:|",
        f"| {th['epochs']} epochs | {th['cached_s']:.1f} s | {th['uncached_s']:.1f} s | **{th['speedup']:.1f}x** |",
        f"| sweep of {th['heads']} heads x {th['epochs']} epochs | {th['sweep_cached_s']:.1f} s | "
        f"{th['sweep_uncached_s_estimated']:.1f} s (8 x measured) | **{th['sweep_speedup']:.1f}x** |",
        *[f"| {e} epochs (from per-epoch costs) | | | {v:.1f}x |" for e, v in th["speedup_by_epochs"].items()],
        "",
        "| bare forward, CPU, batch " + str(s1["batch_size"]) + " | " + " | ".join(r["runtimes"]) + " |",
        "|---|" + "---:|" * len(r["runtimes"]),
    ]
    variants = next(iter(r["runtimes"].values())).keys()
    for v in variants:
        cells = [f"{r['runtimes'][b][v]['img_s']:.1f} img/s ({r['runtimes'][b][v]['vs_channels_last']:.2f}x)" for b in r["runtimes"]]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    if r["runtimes_not_installed"]:
        lines.append(f"not measured, package not installed: {', '.join(r['runtimes_not_installed'])}")
    lines += [
        "",
        f"stage two: head {s2['head_epoch_s_per_10k']:.2f} s per epoch per 10k vectors; logistic fit {s2['logreg_fit_s']:.2f} s "
        f"on {s2['logreg_n']} vectors; `train-head` end to end {s2['train_head_wall_s']:.1f} s",
        *([f"the baseline's fit on the same vectors, numpy's and SciPy's BLAS sequential (the default) "
           f"{blas['sequential']:.2f} s against threaded {blas['threaded']:.2f} s "
           f"({blas['threaded'] / blas['sequential']:.1f}x)"] if (blas := s2.get("baseline_fit_s")) else []),
        *([f"power normalisation of the same {root['vectors']} vectors ({root['zeros']:.0%} zeros): {root['ours']:.2f} ms "
           f"against {root['plain']:.2f} ms for torch's plain sign * sqrt ({root['plain'] / root['ours']:.1f}x)"]
          if (root := s2.get("power_normalisation_ms")) else []),
        *([f"splitting the train matrix as it is read (90% of a block of {rows['rows']:,} vectors copied into place): "
           f"{rows['ours']:.1f} ms with torch's index_select (the default) against {rows['numpy']:.1f} ms with numpy's "
           f"compress ({rows['numpy'] / rows['ours']:.1f}x)"] if (rows := s2.get("row_compress_ms")) else []),
        *([f"a head's first fit in a fresh process (1,000 vectors, 2 epochs): {first['functional']:.2f} s with torch's "
           f"functional Adam (the default) against {first['torch.optim']:.2f} s with torch.optim.Adam, whose first use "
           f"imports torch._dynamo ({first['torch.optim'] / first['functional']:.1f}x)"] if (first := s2.get("first_head_fit_s")) else []),
        "peak RSS (main process, 0 workers): " + "; ".join(f"{m['images']} images: stage one {m['stage1']:.0f} MB, stage two {m['stage2']:.0f} MB"
                                 for m in r["memory_mb"].values()),
        "stage one across processes (torchrun, each process 1 thread for >1 process): "
        + ", ".join(f"{n} process{'es' if n != '1' else ''} {v['img_s']:.1f} img/s" for n, v in r["scaling"].items()),
        f"decode of a {r['decode']['image']}: full {r['decode']['full_ms']:.1f} ms, draft {r['decode']['draft_ms']:.1f} ms "
        f"({r['decode']['speedup']:.1f}x)",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
