"""``make bench``, scale section: what the unchanged ``features``, adding 10 images, ``train-head`` and ``report`` cost
at N = 10k, 100k and 1M train images, as a table, a log-log plot and the fitted growth of each cost with N.

For each N, a synthetic ImageFolder is written to disk: N train and N/10 test files over 100 classes, each file a
valid 8x8 PNG. Its feature store (efficientnet_lite0, 1280-d) is built in a child process by the real stage one,
``pipeline.extract.extract`` (listing, plan, chunks, store writer), with only the backbone pass replaced: instead of
decoding and resizing each image (about 150 img/s here, hours at 1M), it commits chunks of seeded Gaussian cluster
vectors of each file's class (from its folder name) with the file's real digest, so the head has something to
learn. Then each command runs as the real CLI in a fresh process (the append with the real backbone on the 10 new
files); wall seconds, CPU seconds, peak RSS and bytes written are that child's own (``os.wait4``; this process
stays small, so the RSS a child starts with never hides its own).

    python benchmarks/scale.py --n 2000 10000           # a short run
    python benchmarks/scale.py --storage float16        # half the disk for the store at 1M
    python benchmarks/scale.py --work /data/scale       # keep the datasets and stores there; the next run reuses them

Merges its rows into CACHE/bench.json under "scale" and writes CACHE/bench_scale.png. On a shared machine the
seconds are indicative only: compare within one run.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.files import atomic_write_text
from pipeline.freshness import seconds_text

REPO = Path(__file__).resolve().parents[1]
BACKBONE = "efficientnet_lite0"  # its weights come with pip: the append's real forward needs no network
SPREAD = 4.0  # noise std around each class centre (centres ~ N(0, 1)), as in real pooled features: not trivially separable
ADDED = 10
HOW = ("store built by pipeline.extract.extract (real listing, chunks and store writer) over real PNG files, the "
       "backbone pass replaced by seeded Gaussian class clusters (no decoding); every measured command is the real CLI "
       "in a fresh process, the append with the real backbone")
COSTS = {  # row key: label in the table, plot and growth line
    "noop_s": "no-op features", "noop_in_run_s": "no-op, in run", "add_s": f"add {ADDED} images",
    "add_in_run_s": f"add {ADDED}, in run", "add_after_imports_s": f"add {ADDED}, in run after imports",
    "train_head_s": "train-head", "report_s": "report",
}
MEMORY = {"noop_rss_mb": "no-op features", "add_rss_mb": f"add {ADDED} images", "train_head_rss_mb": "train-head",
          "report_rss_mb": "report"}


def png(colour: tuple[int, int, int]) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(out, "PNG")
    return out.getvalue()


def write_images(data: Path, split: str, n: int, classes: int, prefix: str = "") -> None:
    """``n`` files under ``data/split/class<c>/``, image i in class i % classes."""
    image = png((128, 128, 128))
    for c in range(min(n, classes)):
        (data / split / f"class{c:03d}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (data / split / f"class{i % classes:03d}" / f"{prefix}{i:07d}.png").write_bytes(image)


def synthetic_backbone_pass(classes: int, dim: int, seed: int):
    """A stand-in for ``pipeline.extract._run_backbone``: each file's vector is its class centre (centres ~ N(0, 1))
    plus Gaussian noise of std SPREAD, scaled to the range of real pooled CNN features (mean 0.2, std about 0.25)."""
    from pipeline.images import file_digest

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, dim), dtype=np.float32)

    def run(settings, backbone, root, todo, partial, forward, device) -> float:
        for start in range(0, len(todo), settings.chunk_size):
            keys = todo[start:start + settings.chunk_size]
            labels = np.array([int(Path(key.path).parent.name.removeprefix("class")) for key in keys])
            vectors = centres[labels] + SPREAD * rng.standard_normal((len(keys), dim), dtype=np.float32)
            partial.save_chunk(keys, vectors * (0.25 / SPREAD) + 0.2, [file_digest(root / key.path) for key in keys],
                               [""] * len(keys))
        return 0.0

    return run


def build(work: Path, n: int, classes: int, storage: str, seed: int) -> dict:
    """The dataset's files and its feature store (runs in a child process: the monkeypatch and the memory stay there)."""
    import pipeline.extract
    from pipeline.backbones import get_backbone
    from pipeline.config import Settings

    start = time.perf_counter()
    write_images(work / "data", "train", n, classes)
    write_images(work / "data", "test", max(n // 10, classes), classes)
    files_s = time.perf_counter() - start
    dim = get_backbone(BACKBONE).feature_dim
    pipeline.extract._run_backbone = synthetic_backbone_pass(classes, dim, seed)
    summary = pipeline.extract.extract(Settings(data=work / "data", cache=work / "cache", backbone=BACKBONE,
                                                storage=storage, chunk_size=8192))
    return {"files_s": files_s, "build_s": summary.seconds, "images": summary.images, "store_mb": summary.size_bytes / 1e6,
            "dim": dim}


def run(args: list[str]) -> dict:
    """One command in a fresh process: wall and CPU seconds, peak RSS and bytes written (its own, from wait4), output."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        child = subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if child.returncode:
        raise SystemExit(f"{' '.join(map(str, args))} failed ({child.returncode}):\n{stderr[-3000:]}")
    return {"s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "rss_mb": usage.ru_maxrss / 1024,
            "written_mb": usage.ru_oublock * 512 / 1e6, "stdout": stdout}


def in_run_seconds(stdout: str) -> tuple[float, float]:
    """The seconds on the summary line of `features` (``features: ... | S s, ..., I s of it importing torch``), and
    of them those spent importing (0 when the run imported nothing)."""
    line = next(line for line in stdout.splitlines() if line.startswith("features: "))
    imported = re.search(r"([\d.]+) s of it importing", line)
    return float(re.search(r"\| ([\d.]+) s", line).group(1)), float(imported.group(1)) if imported else 0.0


FIRST_FILL = ("import sys, time, numpy as np; from pipeline.memory import mapped_matrix; n, d = map(int, sys.argv[1:3]); "
              "start = time.perf_counter(); X = np.empty((n, d), np.float32) if sys.argv[3] == 'numpy' else mapped_matrix(n, d); "
              "X.fill(1.0); print(time.perf_counter() - start)")
ALLOCATIONS = ("numpy", "mapped")  # np.empty (numpy advises huge pages from 4 MB), pipeline.memory.mapped_matrix (does not)


FILL_PAUSE_S = 10  # before each first fill: what earlier processes freed is as old as at a command typed after them


def first_fill_s(rows: int, dim: int) -> dict[str, float]:
    """Seconds to allocate a rows x dim float32 matrix and write it once, each way in a fresh process (a process's
    first large allocation, as a command's train matrix is), each after ``FILL_PAUSE_S``: a VM with free page
    reporting hands memory freed a few seconds before back to its host, and a fill right after a free measures the
    memory still held."""
    fills = {}
    for way in ALLOCATIONS:
        time.sleep(FILL_PAUSE_S)
        fills[way] = float(run(["-c", FIRST_FILL, rows, dim, way])["stdout"])
    return fills


def files_of(folder: Path) -> dict[Path, tuple[int, int]]:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def built(n: int, args: argparse.Namespace, work: Path) -> dict:
    """Build the dataset and store for ``n`` train images in ``work`` (a child process), or reuse the ones a previous
    run with ``--work`` left there (``built.json`` is written last, so a half-made build is never reused)."""
    record = work / "built.json"
    if record.is_file():
        return json.loads(record.read_text())
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    free = shutil.disk_usage(work).free
    needed = 1.1 * n * (4096 + 2 * 1280 * (2 if args.storage == "float16" else 4))  # files, store and its partial chunks
    if needed > free:
        raise SystemExit(f"N={n} needs about {needed / 1e9:.0f} GB of disk in {work}, {free / 1e9:.0f} GB free; "
                         f"pass --storage float16, --work elsewhere, or a smaller --n")
    child = run([__file__, "--build", str(n), str(work), "--classes", str(args.classes), "--storage", args.storage,
                 "--seed", str(args.seed)])
    made = {"n": n, **json.loads(child["stdout"].strip().splitlines()[-1]), "build_rss_mb": child["rss_mb"]}
    atomic_write_text(record, json.dumps(made))
    return made


def remove_added(data: Path) -> None:
    for added in [*data.glob("train/*/warm-*.png"), *data.glob("train/*/added-*.png")]:
        added.unlink()


def measure(n: int, args: argparse.Namespace, work: Path) -> dict:
    """Time each command on the dataset and store for ``n`` train images. An unmeasured ``features`` first brings
    the store up to date (after a reused build: pipeline code changed since); ``train-head`` and ``report`` run on the
    N synthetic vectors alone (the appended files are one grey image under 10 labels: in the train split they would
    be contradictory rows, which slow the logistic regression). Then an unmeasured add of ``ADDED`` images does once
    what only a store's first extraction on a machine does (the fastest way to run the backbone measured, OpenVINO's
    converted model kept beside the store), so the add measured is any later one. The added images are removed at
    the end (and the store updated), so a reused build measures the same data again."""
    started = time.perf_counter()
    row = built(n, args, work)
    data, cache = work / "data", work / "cache"
    common = ["-m", "pipeline"]
    location = ["--cache", cache, "--backbone", BACKBONE]
    features = [*common, "features", "--data", data, *location, "--storage", args.storage]

    remove_added(data)  # left by an interrupted run
    run(features)
    floor = run(["-c", "import pipeline.train"])  # what stage two's libraries alone hold (torch's CUDA build: more)
    train = run([*common, "train-head", *location])
    [training_file] = (cache / BACKBONE / "runs").glob("*/training.json")  # the one run: default settings
    training = json.loads(training_file.read_text())
    report = run([*common, "report", *location])
    metrics = json.loads((cache / BACKBONE / "metrics.json").read_text())
    write_images(data, "train", ADDED, args.classes, prefix="warm-")
    run(features)
    noop = run(features)
    write_images(data, "train", ADDED, args.classes, prefix="added-")
    before = files_of(cache / BACKBONE)
    add = run(features)
    new = {p: size for p, (size, mtime) in files_of(cache / BACKBONE).items() if before.get(p) != (size, mtime)}
    remove_added(data)  # a reused build stays as built
    run(features)
    add_in_run, add_imports = in_run_seconds(add["stdout"])
    return row | {
        "noop_s": noop["s"], "noop_in_run_s": in_run_seconds(noop["stdout"])[0], "noop_rss_mb": noop["rss_mb"],
        "add_s": add["s"], "add_in_run_s": add_in_run, "add_after_imports_s": add_in_run - add_imports,
        "add_rss_mb": add["rss_mb"],
        "add_written_mb": add["written_mb"], "add_new_files_mb": sum(new.values()) / 1e6,
        "train_head_s": train["s"], "train_head_cpu_s": train["cpu_s"], "train_head_rss_mb": train["rss_mb"],
        "libraries_rss_mb": floor["rss_mb"],
        "train_matrix_mb": (training["n_train"] + training["n_val"]) * metrics["feature_dim"] * 4 / 2**20,
        "head_s": training["head_seconds"], "logreg_s": training["logreg_seconds"], "n_train": training["n_train"],
        "report_s": report["s"], "report_rss_mb": report["rss_mb"], "n_test": metrics["n_test"],
        "head_test_accuracy": metrics["head"]["test_accuracy"], "logreg_test_accuracy": metrics["logreg"]["test_accuracy"],
        "first_fill_s": first_fill_s(training["n_train"] + training["n_val"], metrics["feature_dim"]),
        "load_average": os.getloadavg()[0], "row_s": time.perf_counter() - started,
    }


def growth(rows: list[dict]) -> dict[str, float]:
    """Slope of log cost against log N for each cost (0: flat, 1: linear); needs two N and positive costs."""
    n = np.log([r["n"] for r in rows])
    return {key: float(np.polyfit(n, np.log([r[key] for r in rows]), 1)[0]) for key in [*COSTS, *MEMORY, "add_written_mb"]
            if len(set(n)) > 1 and all(r[key] > 0 for r in rows)}


HEADER = ("| N train | no-op s (in run) | add 10 s (in run; after imports) | add 10: MB written (new files) | train-head s (head, logreg) "
          "| report s (N test) | peak RSS MB: no-op, add, train-head, report | train-head RSS above its libraries' "
          "/ train matrix | test acc head, logreg |\n"
          "|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def above_libraries(r: dict) -> str:
    """train-head's peak RSS above what its libraries alone hold, against the train matrix ("-" in rows measured
    before the bench recorded them)."""
    if "libraries_rss_mb" not in r:
        return "-"
    above = r["train_head_rss_mb"] - r["libraries_rss_mb"]
    return f"{above:.0f} / {r['train_matrix_mb']:.0f} MB = {above / r['train_matrix_mb']:.2f}x"


def table_row(r: dict) -> str:
    after = f"; {r['add_after_imports_s']:.1f}" if "add_after_imports_s" in r else ""  # "": rows recorded before it
    return (f"| {r['n']:,} | {r['noop_s']:.2f} ({seconds_text(r['noop_in_run_s'])}) | {r['add_s']:.2f} ({r['add_in_run_s']:.1f}{after}) "
            f"| {r['add_written_mb']:.1f} ({r['add_new_files_mb']:.1f}) | {r['train_head_s']:.1f} ({r['head_s']:.1f}, "
            f"{r['logreg_s']:.1f}) | {r['report_s']:.1f} ({r['n_test']:,}) | {r['noop_rss_mb']:.0f}, {r['add_rss_mb']:.0f}, "
            f"{r['train_head_rss_mb']:.0f}, {r['report_rss_mb']:.0f} | {above_libraries(r)} | {r['head_test_accuracy']:.3f}, "
            f"{r['logreg_test_accuracy']:.3f} |")


def render(rows: list[dict], slopes: dict[str, float]) -> str:
    lines = [HEADER, *map(table_row, rows), "", "setup per N (not measured costs): " + "; ".join(
        f"{r['n']:,}: files {r['files_s']:.0f} s, store {r['build_s']:.0f} s ({r['store_mb']:.0f} MB), whole row "
        f"{r['row_s']:.0f} s, load average {r['load_average']:.1f}" for r in rows)]
    filled = [r for r in rows if "first_fill_s" in r]  # rows recorded before the bench measured it have none
    if filled:
        lines += ["", "first fill of a new train matrix (N x D float32, fresh process), numpy's np.empty (huge pages "
                      "advised) against the mapped_matrix stage two reads into: " + "; ".join(
                          f"{r['n']:,}: {r['first_fill_s']['numpy']:.2f} s against {r['first_fill_s']['mapped']:.2f} s "
                          f"({r['first_fill_s']['numpy'] / r['first_fill_s']['mapped']:.1f}x)" for r in filled)]
    if slopes:
        names = {**COSTS, **{k: f"peak RSS {v}" for k, v in MEMORY.items()}, "add_written_mb": "add 10: bytes written"}
        lines += ["", "growth with N (slope of log cost vs log N; 0 flat, 1 linear): "
                     + ", ".join(f"{names[k]} {v:.2f}" for k, v in slopes.items())]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["n"] for r in rows]
    figure, (seconds, memory) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, label in COSTS.items():
        seconds.plot(n, [r[key] for r in rows], marker="o", label=label)
    for key, label in MEMORY.items():
        memory.plot(n, [r[key] for r in rows], marker="o", label=label)
    for axes, title, unit in ((seconds, "cost against N", "seconds"), (memory, "peak resident memory", "MB")):
        axes.set(xscale="log", yscale="log", xlabel="train images N (test N/10, 100 classes)", ylabel=unit, title=title)
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[10_000, 100_000, 1_000_000], help="train images (test: N/10)")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--storage", choices=("float32", "float16"), default="float32", help="dtype of the stored vectors")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=Path("cache"), help="where bench.json and bench_scale.png go")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for the datasets and stores, kept and reused by the next run (default: a temporary one)")
    parser.add_argument("--build", nargs=2, metavar=("N", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        print(json.dumps(build(Path(args.build[1]), int(args.build[0]), args.classes, args.storage, args.seed)))
        return

    work = args.work or Path(tempfile.mkdtemp(prefix="scale-"))
    rows = []
    print(HEADER, flush=True)
    try:
        for n in sorted(args.n):
            rows.append(measure(n, args, work / str(n)))
            print(table_row(rows[-1]), flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    slopes = growth(rows)
    args.cache.mkdir(parents=True, exist_ok=True)
    plot(rows, args.cache / "bench_scale.png")
    path = args.cache / "bench.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results["scale"] = {"how": HOW, "backbone": BACKBONE, "classes": args.classes, "storage": args.storage,
                        "rows": rows, "growth": slopes, "plot": "bench_scale.png"}
    atomic_write_text(path, json.dumps(results, indent=2))
    print(f"scale: {HOW}; {args.classes} classes, {rows[0]['dim']}-d vectors stored as {args.storage}")
    print(render(rows, slopes))
    print(f"wrote {path} (key \"scale\") and {args.cache / 'bench_scale.png'}"
          + (f"; datasets and stores kept in {work}" if args.work else ""))


if __name__ == "__main__":
    main()
