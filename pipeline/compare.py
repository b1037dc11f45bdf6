"""``compare``: the whole pipeline for several backbones, one table (the cache makes re-runs cheap)."""

from __future__ import annotations

import dataclasses
import json
import logging

from pipeline.backbones import get_backbone
from pipeline.config import Settings
from pipeline.errors import UserError
from pipeline.files import atomic_write_text, check_writable, disk_full_as_user_error
from pipeline.freshness import bring_up_to_date
from pipeline.report import report
from pipeline.train import train

log = logging.getLogger(__name__)


def compare(settings: Settings) -> list[dict]:
    """Run features, train-head and report per backbone; a backbone that cannot run is a row saying why.

    A CACHE that cannot be written is refused before any work (``Settings`` refuses an empty BACKBONES); the tables
    are written atomically.
    """
    check_writable(settings.cache)
    rows = []
    for name in settings.backbones.split():
        one = dataclasses.replace(settings, backbone=name)
        try:
            get_backbone(name)
            log.info(bring_up_to_date(one).line())
            train(one, settings.data)
            metrics = report(one, settings.data)
        except UserError as error:
            rows.append({"backbone": name, "error": str(error)})
            log.info(f"compare: {name} unavailable: {error}")
            continue
        timings = metrics["timings"]
        rows.append({
            "backbone": name,
            "feature_dim": metrics["feature_dim"],
            "extraction_img_s": timings["throughput_img_s"] or None,
            "head_test_accuracy": metrics["head"]["test_accuracy"],
            "logreg_test_accuracy": metrics["logreg"]["test_accuracy"],
        })
    table = render(rows)
    with disk_full_as_user_error(settings.cache, "compare"):
        atomic_write_text(settings.cache / "compare.json", json.dumps(rows, indent=2))
        atomic_write_text(settings.cache / "compare.md", table + "\n")
    log.info(table)
    log.info(f"compare: wrote {settings.cache / 'compare.md'} and {settings.cache / 'compare.json'}")
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
