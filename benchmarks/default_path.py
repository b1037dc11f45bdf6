"""``make bench``, default-path section: the default stage one (PRECISION=auto RUNTIME=auto) against PyTorch float32,
the whole pipeline (decode to HDF5), side by side on the same images in one run, per backbone.

For each backbone, three runs of the real ``extract`` in fresh caches: float32 PyTorch; auto, whose first run on
a machine measures the candidate paths on a calibration batch (its seconds include that); auto again with that
choice already made and OpenVINO's converted model kept (the steady state: its img/s is the default's). The vectors of the auto run are compared with
the float32 ones image by image (cosine). Backbones without weights on this machine run with random weights (speed
does not depend on them; their cosines say little about trained weights).

    python benchmarks/default_path.py                                  # densenet121 and efficientnet_lite0
    python benchmarks/default_path.py --backbones efficientnet_lite0 --images 200

Merges ``default_path.<backbone>.{img_s, fp32_img_s, speedup, choice, cosine_min, ...}`` into CACHE/bench.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from bench import REPO, subset, weights_for
from pipeline.config import DEFAULTS, Settings
from pipeline.extract import extract
from pipeline.fastpath import PATH_FILE
from pipeline.files import atomic_write_text
from pipeline.store import FeatureStore, features_file


def cosines(exact: Path, fast: Path) -> np.ndarray:
    """Cosine similarity of each image's vector in two feature files of the same images (all splits)."""
    found = []
    with FeatureStore(exact) as a, FeatureStore(fast) as b:
        for split in a.splits:
            assert a.paths(split) == b.paths(split)
            x, y = a.features(split).astype(np.float64), b.features(split).astype(np.float64)
            found.append((x * y).sum(1) / np.maximum(np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1), 1e-30))
    return np.concatenate(found)


def measure(backbone: str, data: Path, work: Path, batch_size: int) -> dict:
    work.mkdir(parents=True)
    weights = weights_for(backbone, work)

    def run(name: str, **settings):
        return extract(Settings(data=data, cache=work / name, backbone=backbone, weights=weights, batch_size=batch_size,
                                **settings))

    exact = run("exact", precision="fp32", runtime="torch")
    first = run("auto-first")
    measured = work / "auto-first" / backbone / PATH_FILE
    if measured.is_file():  # the steady state: the choice already made on this machine, OpenVINO's model kept
        (work / "auto" / backbone).mkdir(parents=True)
        for made in [measured, *(work / "auto-first" / backbone).glob("openvino-*")]:
            shutil.copyfile(made, work / "auto" / backbone / made.name)
    auto = run("auto")
    choice = json.loads(measured.read_text()) if measured.is_file() else {}
    cosine = cosines(features_file(work / "exact" / backbone), features_file(work / "auto" / backbone))
    with FeatureStore(features_file(work / "auto" / backbone)) as store:
        chosen = f"{store.fingerprint['precision']} {store.fingerprint['runtime']}"
    return {
        "images": auto.extracted, "weights": "packaged (trained)" if weights is None else "random",
        "img_s": auto.extracted / auto.seconds, "fp32_img_s": exact.extracted / exact.seconds,
        "speedup": exact.seconds / auto.seconds, "choice": chosen, "ran_as": auto.ran_as,
        "cosine_min": float(cosine.min()), "cosine_mean": float(cosine.mean()),
        "first_run_s": first.seconds, "run_s": auto.seconds, "fp32_run_s": exact.seconds,
        "calibration": choice.get("measured", []),
    }


def render(section: dict) -> str:
    lines = ["| backbone (weights) | default path | default img/s | fp32 torch img/s | speedup | cosine to fp32: min (mean) "
             "| first run, measuring included |", "|---|---|---:|---:|---:|---:|---:|"]
    for name, r in section.items():
        lines.append(f"| {name} ({r['weights']}) | {r['choice']} | {r['img_s']:.1f} | {r['fp32_img_s']:.1f} | "
                     f"**{r['speedup']:.2f}x** | {r['cosine_min']:.5f} ({r['cosine_mean']:.5f}) | {r['first_run_s']:.1f} s |")
    lines += ["", "calibration (forward only, on the calibration batch; cosine to fp32 torch: least over its images):"]
    for name, r in section.items():
        lines.append(f"- {name}: " + "; ".join(f"{m['precision']} {m['runtime']} {m['img_s']:.0f} img/s, cosine "
                                                 f">= {m['cosine_min']:.5f}" for m in r["calibration"]))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "cats-dogs")
    parser.add_argument("--backbones", nargs="+", default=["densenet121", "efficientnet_lite0"])
    parser.add_argument("--images", type=int, default=1400, help="train images (and 100 test images)")
    parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    parser.add_argument("--cache", type=Path, default=DEFAULTS.cache, help="where bench.json is")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-path-"))
    try:
        data = subset(args.data, work / "data", args.images, 100)
        section = {b: measure(b, data, work / b, args.batch_size) for b in args.backbones}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    path = args.cache / "bench.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results["default_path"] = section
    args.cache.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(results, indent=2))
    print(render(section))
    print(f"wrote {path} (key \"default_path\")")


if __name__ == "__main__":
    main()
