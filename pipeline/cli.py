"""``python -m pipeline <command>``: a thin layer over the library; flags come from ``config.Settings``.

Each command imports only the modules it runs, so `features` (a no-op, most of the time) never loads
scikit-learn or matplotlib, and imports them with the cyclic collector paused (``pipeline.bulk``)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path

from pipeline.bulk import collector_paused
from pipeline.config import DEFAULTS, SETTING_FIELDS, Settings
from pipeline.errors import UserError
from pipeline.runs import SWEPT

STAGE_ONE = ["data", "cache", "backbone", "weights", "device", "precision", "runtime", "storage", "batch_size", "workers",
             "chunk_size", "force", "verify", "augment", "merge"]
STAGE_TWO = ["cache", "backbone", "seed", "epochs", "patience", "hidden", "dropout", "lr", "head_batch_size", "val_fraction",
             "cv_folds", "final_fit", "normalisation", "class_weight", "run"]
SWEEP = [n for n in STAGE_TWO if n != "run"]
REPORT = ["cache", "backbone", "run"]
COMPARE = ["backbones", *[n for n in dict.fromkeys(STAGE_ONE + STAGE_TWO) if n not in ("backbone", "weights", "run")]]
PREDICT = ["cache", "backbone", "run", "weights", "device", "precision", "runtime", "batch_size", "workers", "model",
           "top_k", "format"]
DESCRIPTION = ("Feature-caching transfer learning: run a frozen ImageNet backbone once over your images (features), "
               "then train cheap heads on the cached vectors (train-head), compare them (report), use them (predict).")
CHECKS_DATA = "check that the cache was made from this dataset (default: whichever it was made from)"
DATA_CHECKED = ("train-head", "sweep", "report")  # commands whose --data only checks the cache's dataset
TRAINED = "runs/*/training.json"
NEEDS = {"train-head": "features.h5", "sweep": "features.h5", "report": TRAINED, "predict": TRAINED,
         "export": TRAINED}  # what each reads from CACHE/<backbone>


def _run_data(settings: Settings, data: Path | None) -> None:
    with collector_paused():
        from pipeline.download import SEED_DATA_URL, fetch_dataset
    if fetch_dataset(settings.data):
        print(f"data: {SEED_DATA_URL} unpacked into {settings.data}")
    else:
        print(f"data: {settings.data} already holds train/ and test/")


def _run_features(settings: Settings, data: Path | None) -> None:
    from pipeline.freshness import TORCHRUN_VARIABLES, bring_up_to_date

    summary = bring_up_to_date(settings)
    if int(os.environ.get(TORCHRUN_VARIABLES[0], 0)) == 0:
        print(summary.line())


def _run_train(settings: Settings, data: Path | None) -> None:
    with collector_paused():
        from pipeline.train import train
    train(settings, data)


def _run_sweep(settings: Settings, data: Path | None, grid: dict[str, list]) -> None:
    with collector_paused():
        from pipeline.sweep import sweep
    sweep(settings, grid, data)


def _run_report(settings: Settings, data: Path | None) -> None:
    with collector_paused():
        from pipeline.report import report
    report(settings, data)


def _run_all(settings: Settings, data: Path | None) -> None:
    _run_features(settings, data)
    _run_train(settings, settings.data)
    _run_report(settings, settings.data)


def _run_predict(settings: Settings, data: Path | None, images: list[Path]) -> None:
    from pipeline.listing import shown

    with collector_paused():
        from pipeline.predict import predict, render
    predictions = predict(settings, images, settings.model, settings.top_k)
    print(render(predictions, settings.format, settings.top_k))
    if settings.format != "text":
        for p in predictions:
            if p.skipped:
                print(f"skipped {shown(p.path)}: {p.skipped}", file=sys.stderr)


def _run_export(settings: Settings, data: Path | None) -> None:
    with collector_paused():
        from pipeline.export import export
    for kind, written in export(settings).items():
        print(f"export: {kind}: {written}")


def _run_compare(settings: Settings, data: Path | None) -> None:
    with collector_paused():
        from pipeline.compare import compare
    compare(settings)


def _list_backbones(settings: Settings, data: Path | None) -> None:
    with collector_paused():
        from pipeline.backbones import BACKBONES
    for b in BACKBONES.values():
        source = f"torchvision {type(b.weights).__name__}.{b.weights.name}" if b.weights else "packaged with pip (offline)"
        print(f"{b.name:<20} {b.feature_dim:>5}-d  input {b.crop}px  weights: {source}")


COMMANDS = {
    "data": (_run_data, ["data"], "download the seed notebook's Cats-vs-Dogs photos into DATA (unless it holds train/ and test/)"),
    "features": (_run_features, STAGE_ONE, "stage one: cache backbone vectors of every image in HDF5"),
    "train-head": (_run_train, STAGE_TWO, "stage two: train the head and the logistic baseline on the cache"),
    "sweep": (_run_sweep, SWEEP, "stage two for a grid of head settings (several values per --lr, --hidden, --dropout, "
                                 "--seed), each kept as a run, compared on validation"),
    "report": (_run_report, REPORT, "test accuracy of head and baseline, side by side (RUN=, or the best on validation)"),
    "all": (_run_all, list(dict.fromkeys(STAGE_ONE + STAGE_TWO)), "features, train-head and report in one go"),
    "predict": (_run_predict, PREDICT, "classify image files or folders with the trained head (or --model logreg)"),
    "export": (_run_export, ["cache", "backbone", "run", "weights"],
               "write the backbone and trained head as one deployable model: model.pt2, model.onnx (and the torchvision "
               "state dict)"),
    "compare": (_run_compare, COMPARE, "run the pipeline for several backbones and write one table"),
    "backbones": (_list_backbones, [], "list the known backbones"),
}


def _values(kind: type):
    """argparse type of a swept flag: one or more space-separated values (``--lr 0.001 0.01`` or ``--lr "0.001 0.01"``,
    as Make passes LR="0.001 0.01")."""
    def parse(text: str) -> list:
        return [kind(value) for value in text.split()]
    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


def _add_setting(parser: argparse.ArgumentParser, name: str, swept: bool = False) -> None:
    spec = SETTING_FIELDS[name]
    flag = "--" + name.replace("_", "-")
    default = getattr(DEFAULTS, name)
    if isinstance(default, bool):
        parser.add_argument(flag, action="store_true", help=spec.metadata["help"])
        return
    kind = {int: int, float: float, str: str}.get(type(default), Path)
    if swept:
        parser.add_argument(flag, type=_values(kind), nargs="+", default=[[default]], metavar=name.upper(),
                            help=f"{spec.metadata['help']}; one or more values (default: {default})")
        return
    parser.add_argument(flag, type=kind, default=default, metavar=name.upper(), choices=spec.metadata["choices"],
                        help=f"{spec.metadata['help']} (default: {default})")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line on stderr (problem and where to look) and exit code 2."""

    def error(self, message: str) -> None:
        self.exit(2, f"error: {message}; see `{self.prog} --help`\n")


def remembered_backbone(cache: Path, needs: str) -> str:
    """Without BACKBONE: the default, unless CACHE holds ``needs`` for exactly one other backbone (then that one);
    for several others, an error naming them."""
    from pipeline.store import backbones_with

    found = backbones_with(cache, needs)
    if DEFAULTS.backbone in found or not found:
        return DEFAULTS.backbone
    if len(found) > 1:
        raise UserError(f"{cache} holds {needs} for several backbones ({', '.join(found)}); pass BACKBONE=<one of them>")
    print(f"using BACKBONE={found[0]}, the only backbone with {needs} in {cache}", file=sys.stderr)
    return found[0]


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m pipeline", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (run, settings, help) in COMMANDS.items():
        sub = commands.add_parser(name, help=help, description=help)
        for setting in settings:
            _add_setting(sub, setting, swept=name == "sweep" and setting in SWEPT)
        if name in DATA_CHECKED:
            sub.add_argument("--data", type=Path, default=None, help=CHECKS_DATA)
        if name == "predict":
            sub.add_argument("images", nargs="+", type=Path, help="image files or folders")
        sub.add_argument("--debug", action="store_true", help=SETTING_FIELDS["debug"].metadata["help"])
        sub.set_defaults(handler=run)
        if name in NEEDS:
            sub.set_defaults(backbone=None)
    return parser


class _CurrentStdout(logging.StreamHandler):
    """A handler writing to whatever ``sys.stdout`` is when a record is emitted (pytest replaces it per test)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


def show_messages(level: int = logging.INFO) -> None:
    """The library's log messages (logger ``pipeline``) from ``level`` up as plain lines on stdout; once, however
    often called."""
    logger = logging.getLogger("pipeline")
    logger.setLevel(level)
    if not any(isinstance(h, _CurrentStdout) for h in logger.handlers):
        handler = _CurrentStdout()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    show_messages()
    given = {k: v for k, v in vars(args).items() if k in SETTING_FIELDS and v is not None}
    data_check = given.pop("data", None) if args.command in DATA_CHECKED else None
    grid = {name: [v for values in given.pop(name) for v in values] for name in SWEPT} if args.command == "sweep" else {}
    try:
        if args.command in NEEDS and "backbone" not in given:
            given["backbone"] = remembered_backbone(Path(given.get("cache", DEFAULTS.cache)), NEEDS[args.command])
        settings = Settings(**given)
        extra = [args.images] if args.command == "predict" else [grid] if args.command == "sweep" else []
        args.handler(settings, data_check, *extra)
    except UserError as error:
        if args.debug:
            traceback.print_exc()
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: committed chunks are kept; run the same command again to resume", file=sys.stderr)
        return 130
    return 0
