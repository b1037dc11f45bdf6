"""Stage two at scale: fit time and peak memory of the head and the logistic baseline on synthetic vectors.

Synthetic Gaussian clusters (N x D float32, C classes, seeded) are made in memory, split 90/10 into
train and validation (views, as ``train-head`` does) and fitted with the default settings. Each
measurement runs in a fresh process, so one fit's peak resident memory (``ru_maxrss``) never mixes
with another's. Prints a table; ``--json`` also writes the rows.

    python benchmarks/stage_two_scale.py                       # N = 10k and 100k, D = 1280, C = 100
    python benchmarks/stage_two_scale.py --n 3060 --classes 102 --models logreg

Timings on a shared machine are only comparable within one run (compare ratios, not seconds).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

MODELS = ("head", "logreg")


def clusters(n: int, dim: int, n_classes: int, seed: int, spread: float) -> tuple[np.ndarray, np.ndarray]:
    """``n`` float32 vectors around ``n_classes`` random centres ~ N(0, 1), noise std ``spread``, balanced labels;
    shifted and scaled to the range of real pooled CNN features (mean 0.2, std about 0.25 per feature)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_classes, dim), dtype=np.float32)
    y = rng.permutation(np.arange(n) % n_classes)
    X = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 8192):  # in chunks: no float64 or full-size temporaries
        stop = min(n, start + 8192)
        X[start:stop] = rng.standard_normal((stop - start, dim), dtype=np.float32)
        X[start:stop] *= spread
        X[start:stop] += centres[y[start:stop]]
        X[start:stop] *= 0.25 / spread
        X[start:stop] += 0.2
    return X, y


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(model: str, n: int, dim: int, n_classes: int, seed: int, spread: float) -> dict:
    """One fit in this process: seconds, peak RSS, RSS before the fit, validation accuracy."""
    import torch  # noqa: F401  (imported before the first RSS reading, as train-head has it)

    from pipeline.baseline import LogisticBaseline
    from pipeline.head import HeadClassifier

    X, y = clusters(n, dim, n_classes, seed, spread)
    n_train = n - n // 10
    X_train, y_train, X_val, y_val = X[:n_train], y[:n_train], X[n_train:], y[n_train:]
    before = rss_mb()
    start, cpu_start = time.perf_counter(), cpu_seconds()
    if model == "head":
        fitted = HeadClassifier(seed=seed).fit(X_train, y_train, X_val, y_val, n_classes=n_classes)
        detail = {"epochs": len(fitted.history_), "best_epoch": fitted.best_epoch_,
                  "batch_size": getattr(fitted, "batch_size_", fitted.batch_size)}
    else:
        fitted = LogisticBaseline(seed=seed).fit(X_train, y_train, X_val, y_val, n_classes=n_classes)
        detail = {"C": fitted.C_, "iterations": sum(getattr(fitted, "n_iter_", {}).values()) or None}
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"model": model, "n": n, "dim": dim, "classes": n_classes, "seconds": seconds, "cpu_seconds": cpu, "peak_rss_mb": peak,
            "rss_before_fit_mb": before, "train_matrix_mb": X_train.nbytes / 2**20,
            "val_accuracy": fitted.score(X_val, y_val), **detail}


def run_child(model: str, args: argparse.Namespace, n: int) -> dict:
    command = [sys.executable, __file__, "--child", model, "--n", str(n), "--dim", str(args.dim), "--classes",
               str(args.classes), "--seed", str(args.seed), "--spread", str(args.spread)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{model} at N={n} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[10_000, 100_000], help="vectors (train + validation)")
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--spread", type=float, default=8.0, help="noise std around each centre (centres ~ N(0, 1))")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--child", choices=MODELS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.n[0], args.dim, args.classes, args.seed, args.spread)))
        return
    rows = [run_child(model, args, n) for n in args.n for model in args.models]
    print("| N | model | fit s | fit CPU s | peak RSS MB | RSS before fit MB | train matrix MB | val acc | detail |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        detail = f"C={r['C']}" + (f", {r['iterations']} L-BFGS iterations" if r.get("iterations") else "") \
            if r["model"] == "logreg" else \
            f"{r['epochs']} epochs (best {r['best_epoch']}), batch {r['batch_size']}"
        print(f"| {r['n']} | {r['model']} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {r['peak_rss_mb']:.0f} | {r['rss_before_fit_mb']:.0f} | "
              f"{r['train_matrix_mb']:.0f} | {r['val_accuracy']:.3f} | {detail} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
