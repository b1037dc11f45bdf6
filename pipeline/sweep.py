"""Head sweeps: train a grid of heads from the cache in one process, each kept as its own run, compared on validation.

The train split is read, split and normalised once; every run is trained on the same training rows and chosen on
the same validation rows (split by the first SEED listed), so their validation scores compare like for like; SEED
values then seed each head's initialisation and shuffling. The logistic baseline does not depend on the swept
settings and is fitted once, then saved with every run. The test split is not read: ``report`` reads it for one
run (RUN=, by default the best on validation).
"""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import asdict, replace
from pathlib import Path

from pipeline import plots
from pipeline.config import Settings
from pipeline.errors import UserError
from pipeline.files import atomic_write_text, check_writable
from pipeline.runs import SWEPT, RunScore, best_first, derived_name
from pipeline.train import fit_baseline, fit_head, read_training_set, save_run

log = logging.getLogger(__name__)


SWEEP_FILE = "sweep.json"
SWEEP_PLOT = "sweep.png"


def grid_settings(settings: Settings, grid: dict[str, list]) -> list[Settings]:
    """One Settings per combination of the grid's values (repeated values once; every one checked before any work),
    named by ``derived_name``; settings not in the grid keep their value."""
    for name, values in grid.items():
        if not values:
            raise UserError(f"--{name} has no value; pass at least one, e.g. {name.upper()}=\"{getattr(settings, name)}\"")
    combinations = [dict(zip(grid, values)) for values in itertools.product(*(dict.fromkeys(v) for v in grid.values()))]
    return [replace(settings, run=derived_name(replace(settings, **c)), **c) for c in combinations]


def sweep(settings: Settings, grid: dict[str, list], data: Path | None = None) -> list[RunScore]:
    """Train every combination of ``grid`` (setting name -> values; names from ``SWEPT``) as its own run, then write
    ``sweep.json`` and ``sweep.png`` (validation scores of the runs, best first) beside the runs; returns the scores,
    best on validation first."""
    runs = grid_settings(settings, grid)
    first = runs[0]
    training = read_training_set(first, data)
    check_writable(settings.backbone_dir())
    baseline, baseline_seconds = fit_baseline(first, training)
    scores = []
    for i, run in enumerate(runs, 1):
        log.info(f"sweep: run {i}/{len(runs)}: {run.run}")
        head, head_seconds = fit_head(run, training)
        scores.append(RunScore.of(save_run(run, training, head, head_seconds, baseline, baseline_seconds)))
    scores = best_first(scores)
    folder = settings.backbone_dir()
    plots.sweep_scores(scores, folder / SWEEP_PLOT)
    atomic_write_text(folder / SWEEP_FILE, json.dumps({"grid": grid, "split_seed": first.seed,
                                                       "runs": [asdict(s) for s in scores]}, indent=2))
    log.info(table(scores))
    log.info(f"sweep: best on validation: run {scores[0].name}; `make report` reads it (RUN=<name> for another); "
          f"wrote {SWEEP_FILE} and {SWEEP_PLOT} to {folder}")
    return scores


def table(scores: list[RunScore], limit: int = 20) -> str:
    """The runs as a Markdown table, best on validation first, ``limit`` rows at most."""
    swept = [name for name in SWEPT if len({s.settings[name] for s in scores}) > 1] or list(SWEPT)
    lines = [f"| run | {' | '.join(swept)} | head val accuracy | head val loss |", "|---|" + "---:|" * (len(swept) + 2)]
    lines += [f"| {s.name} | {' | '.join(f'{s.settings[n]:g}' for n in swept)} | {s.head_val_accuracy:.3f} | "
              f"{s.head_val_loss:.4f} |" for s in scores[:limit]]
    if len(scores) > limit:
        lines.append(f"({len(scores) - limit} more runs in {SWEEP_FILE})")
    return "\n".join(lines)
