"""``python -m pipeline <command>``: a thin layer over the library; flags come from ``config.Settings``.

Each command imports only the modules it runs, so `features` (a no-op, most of the time) never loads
scikit-learn or matplotlib."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from pipeline.config import DEFAULTS, SETTING_FIELDS, Settings
from pipeline.errors import UserError

STAGE_ONE = ["data", "cache", "backbone", "weights", "device", "precision", "runtime", "storage", "batch_size", "workers",
             "chunk_size", "force", "verify", "augment", "merge"]
STAGE_TWO = ["cache", "backbone", "seed", "epochs", "patience", "hidden", "dropout", "lr", "head_batch_size", "val_fraction",
             "cv_folds", "final_fit", "normalisation", "class_weight"]
REPORT = ["cache", "backbone"]
COMPARE = ["backbones", *[n for n in dict.fromkeys(STAGE_ONE + STAGE_TWO) if n not in ("backbone", "weights")]]
PREDICT = ["cache", "backbone", "weights", "device", "precision", "runtime", "batch_size", "workers", "model", "top_k", "format"]
DESCRIPTION = ("Feature-caching transfer learning: run a frozen ImageNet backbone once over your images (features), "
               "then train cheap heads on the cached vectors (train-head), compare them (report), use them (predict).")
CHECKS_DATA = "check that the cache was made from this dataset (default: whichever it was made from)"
DATA_CHECKED = ("train-head", "report")  # commands whose --data only checks the cache's dataset
NEEDS = {"train-head": "features.h5", "report": "training.json", "predict": "training.json", "export": "training.json"}  # what each reads from CACHE


def _run_data(settings: Settings, data: Path | None) -> None:
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
    from pipeline.train import train

    train(settings, data)


def _run_report(settings: Settings, data: Path | None) -> None:
    from pipeline.report import report

    report(settings, data)


def _run_all(settings: Settings, data: Path | None) -> None:
    _run_features(settings, data)
    _run_train(settings, settings.data)
    _run_report(settings, settings.data)


def _run_predict(settings: Settings, data: Path | None, images: list[Path]) -> None:
    from pipeline.predict import predict, render
    from pipeline.listing import shown

    predictions = predict(settings, images, settings.model, settings.top_k)
    print(render(predictions, settings.format, settings.top_k))
    if settings.format != "text":
        for p in predictions:
            if p.skipped:
                print(f"skipped {shown(p.path)}: {p.skipped}", file=sys.stderr)


def _run_export(settings: Settings, data: Path | None) -> None:
    from pipeline.export import export

    for kind, written in export(settings).items():
        print(f"export: {kind}: {written}")


def _run_compare(settings: Settings, data: Path | None) -> None:
    from pipeline.compare import compare

    compare(settings)


def _list_backbones(settings: Settings, data: Path | None) -> None:
    from pipeline.backbones import BACKBONES

    for b in BACKBONES.values():
        source = f"torchvision {type(b.weights).__name__}.{b.weights.name}" if b.weights else "packaged with pip (offline)"
        print(f"{b.name:<20} {b.feature_dim:>5}-d  input {b.crop}px  weights: {source}")


COMMANDS = {
    "data": (_run_data, ["data"], "download the seed notebook's Cats-vs-Dogs photos into DATA (unless it holds train/ and test/)"),
    "features": (_run_features, STAGE_ONE, "stage one: cache backbone vectors of every image in HDF5"),
    "train-head": (_run_train, STAGE_TWO, "stage two: train the head and the logistic baseline on the cache"),
    "report": (_run_report, REPORT, "test accuracy of head and baseline, side by side"),
    "all": (_run_all, list(dict.fromkeys(STAGE_ONE + STAGE_TWO)), "features, train-head and report in one go"),
    "predict": (_run_predict, PREDICT, "classify image files or folders with the trained head (or --model logreg)"),
    "export": (_run_export, ["cache", "backbone", "weights"],
               "write the backbone and trained head as one deployable model: model.pt2, model.onnx (and the torchvision "
               "state dict)"),
    "compare": (_run_compare, COMPARE, "run the pipeline for several backbones and write one table"),
    "backbones": (_list_backbones, [], "list the known backbones"),
}


def _add_setting(parser: argparse.ArgumentParser, name: str) -> None:
    spec = SETTING_FIELDS[name]
    flag = "--" + name.replace("_", "-")
    default = getattr(DEFAULTS, name)
    if isinstance(default, bool):
        parser.add_argument(flag, action="store_true", help=spec.metadata["help"])
        return
    kind = {int: int, float: float, str: str}.get(type(default), Path)
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
            _add_setting(sub, setting)
        if name in DATA_CHECKED:
            sub.add_argument("--data", type=Path, default=None, help=CHECKS_DATA)
        if name == "predict":
            sub.add_argument("images", nargs="+", type=Path, help="image files or folders")
        sub.add_argument("--debug", action="store_true", help=SETTING_FIELDS["debug"].metadata["help"])
        sub.set_defaults(run=run)
        if name in NEEDS:
            sub.set_defaults(backbone=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    given = {k: v for k, v in vars(args).items() if k in SETTING_FIELDS and v is not None}
    data_check = given.pop("data", None) if args.command in DATA_CHECKED else None
    try:
        if args.command in NEEDS and "backbone" not in given:
            given["backbone"] = remembered_backbone(Path(given.get("cache", DEFAULTS.cache)), NEEDS[args.command])
        settings = Settings(**given)
        args.run(settings, data_check, *([args.images] if args.command == "predict" else []))
    except UserError as error:
        if args.debug:
            traceback.print_exc()
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: committed chunks are kept; run the same command again to resume", file=sys.stderr)
        return 130
    return 0
