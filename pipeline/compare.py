"""``compare``: the whole pipeline for several backbones, one table (the cache makes re-runs cheap)."""

from __future__ import annotations

import dataclasses
import json

from pipeline.backbones import get_backbone
from pipeline.config import Settings
from pipeline.errors import UserError
from pipeline.extract import extract
from pipeline.report import report
from pipeline.train import train


def compare(settings: Settings) -> list[dict]:
    """Run features, train-head and report per backbone; a backbone that cannot run is a row saying why."""
    rows = []
    for name in settings.backbones.split():
        one = dataclasses.replace(settings, backbone=name)
        try:
            get_backbone(name)
            print(extract(one).line())
            train(one, settings.data)
            metrics = report(one, settings.data)
        except UserError as error:
            rows.append({"backbone": name, "error": str(error)})
            print(f"compare: {name} unavailable: {error}")
            continue
        timings = metrics["timings"]
        rows.append({
            "backbone": name,
            "feature_dim": metrics["feature_dim"],
            "extraction_img_s": timings["throughput_img_s"] or None,
            "head_test_accuracy": metrics["head"]["test_accuracy"],
            "logreg_test_accuracy": metrics["logreg"]["test_accuracy"],
        })
    settings.cache.mkdir(parents=True, exist_ok=True)
    (settings.cache / "compare.json").write_text(json.dumps(rows, indent=2))
    table = render(rows)
    (settings.cache / "compare.md").write_text(table + "\n")
    print(table)
    print(f"compare: wrote {settings.cache / 'compare.md'} and {settings.cache / 'compare.json'}")
    return rows


def render(rows: list[dict]) -> str:
    lines = ["| backbone | dim | extraction img/s | head test acc | logreg test acc |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['backbone']} | | | unavailable: {r['error']} | |")
        else:
            rate = f"{r['extraction_img_s']:.1f}" if r["extraction_img_s"] else "n/a"
            lines.append(f"| {r['backbone']} | {r['feature_dim']} | {rate} | {r['head_test_accuracy']:.4f} | "
                         f"{r['logreg_test_accuracy']:.4f} |")
    return "\n".join(lines)
