"""``predict``: the trained head (or the baseline) on new images, with stage one's backbone and preprocessing."""

from __future__ import annotations

import csv
import errno
import functools
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader

from pipeline.backbones import Backbone, get_backbone, load_backbone, weights_identity
from pipeline.config import Settings, check_value
from pipeline.errors import UserError
from pipeline.fastpath import served
from pipeline.images import ImageFiles, collate_good
from pipeline.inference import kept_model, prepare, resolve_device
from pipeline.listing import NO_VIEW, BadImage, Skipped, image_stat, shown, walk_folder
from pipeline.runs import chosen_run
from pipeline.store import features_file, stated_fingerprint
from pipeline.train import load_trained


@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]] = field(default_factory=list)
    skipped: str = ""


def image_files(inputs: list[Path]) -> tuple[list[Path], list[Prediction]]:
    """Files as given, folders walked by ``walk_folder``; what ``image_stat`` rejects is returned as skipped.

    Only a path with nothing at all there (not even a broken symbolic link) is an error."""
    files, skipped = [], []
    for item in map(Path, inputs):
        if os.path.isdir(item):
            for found in walk_folder(item):
                if isinstance(found, Skipped):
                    skipped.append(Prediction(os.path.join(item, found.path), skipped=found.reason))
                else:
                    files.append(item / found[0])
            continue
        try:
            os.lstat(item)
        except OSError as error:
            if error.errno == errno.ENOENT:
                raise UserError(f"'{item}' does not exist; pass image files or folders (IMAGES=...)") from None
        try:
            image_stat(item)
        except BadImage as bad:
            skipped.append(Prediction(str(item), skipped=str(bad)))
        else:
            files.append(item)
    return files, skipped


def _load_model(settings: Settings, model: str):
    folder = chosen_run(settings)
    classifier, saved = load_trained(folder, model)
    if saved.get("backbone") != settings.backbone:
        raise UserError(f"the {model} in {folder} was trained on {saved.get('backbone')} vectors, "
                        f"not {settings.backbone}; pass BACKBONE={saved.get('backbone')}")
    return classifier, saved


def _vectors(settings: Settings, backbone: Backbone, weights: str,
             files: list[Path]) -> Iterator[tuple[list[int], np.ndarray | None, dict]]:
    """Stage one's vectors of ``files``, batch by batch: (indices of the decoded files, their vectors, and every
    file's (digest, skip reason) by index); no cache. PRECISION and RUNTIME "auto" are those of the backbone's feature
    file, so the vectors are made as the cached ones were."""
    settings = served(settings, stated_fingerprint(features_file(settings.backbone_dir())))
    forward = prepare(backbone, functools.partial(load_backbone, backbone, settings.weights),
                      resolve_device(settings.device), settings.precision, settings.runtime,
                      kept_model(settings.backbone_dir(), backbone, weights))
    dataset = ImageFiles(Path("/"), [(str(p.resolve()), NO_VIEW) for p in files], backbone.transform(), min_side=backbone.resize)
    loader = DataLoader(dataset, batch_size=settings.batch_size, collate_fn=collate_good, num_workers=max(settings.workers, 0))
    for indices, images, outcomes in loader:
        yield indices, forward(images).numpy() if images is not None else None, outcomes


@dataclass
class Embedded:
    """Vectors of image files: row i is the vector of ``paths[i]``; files that could not be used are in ``skipped``."""

    vectors: np.ndarray
    paths: list[str]
    skipped: list[Prediction]


def embed(settings: Settings, inputs: list[Path | str]) -> Embedded:
    """The backbone's vectors (as stage one makes them, for ``settings``' backbone, weights, device, precision and
    runtime) of the images in ``inputs`` (files or folders), without the cache: for a dataset, use
    ``bring_up_to_date`` and ``open_features``."""
    backbone = get_backbone(settings.backbone)
    files, skipped = image_files([Path(i) for i in inputs])
    rows: dict[int, np.ndarray] = {}
    for indices, vectors, outcomes in _vectors(settings, backbone, weights_identity(backbone, settings.weights), files):
        rows |= dict(zip(indices, vectors)) if vectors is not None else {}
        skipped += [Prediction(str(files[i]), skipped=reason) for i, (_, reason) in outcomes.items() if reason]
    kept = sorted(rows)
    vectors = np.stack([rows[i] for i in kept]) if kept else np.zeros((0, backbone.feature_dim), dtype=np.float32)
    return Embedded(vectors, [str(files[i]) for i in kept], skipped)


def predict(settings: Settings, inputs: list[Path], model: str = "head", top_k: int = 1) -> list[Prediction]:
    """Predictions for the images in ``inputs``, then the skipped files.

    Everything checkable is checked before the backbone loads: model and top_k (``settings`` checked itself when
    made), the trained model's file, backbone and weights, and that the inputs hold at least one image.
    """
    check_value("model", model)
    check_value("top_k", top_k)
    classifier, saved = _load_model(settings, model)
    backbone = get_backbone(settings.backbone)
    weights = weights_identity(backbone, settings.weights)
    if saved.get("weights") != weights:
        raise UserError(f"the {model} was trained on vectors from weights {saved.get('weights')}, not {weights}; "
                        f"pass the same WEIGHTS as for `make features`")
    files, results = image_files(inputs)
    if not files:
        why = "; ".join(f"{shown(p.path)}: {p.skipped}" for p in results[:3])
        raise UserError(f"no images found in {' '.join(map(str, inputs))}{f' ({why})' if why else ''}; "
                        f"pass image files or folders holding them (IMAGES=...)")
    classes = saved["classes"]
    by_index: dict[int, Prediction] = {}
    for indices, vectors, outcomes in _vectors(settings, backbone, weights, files):
        for i, (_, reason) in outcomes.items():
            if reason:
                by_index[i] = Prediction(str(files[i]), skipped=reason)
        if vectors is None:
            continue
        proba = classifier.predict_proba(vectors)
        for i, row in zip(indices, proba):
            order = np.argsort(-row)[:top_k]
            by_index[i] = Prediction(str(files[i]), [(classes[c], float(row[c])) for c in order])
    return [by_index[i] for i in range(len(files))] + results


def render(predictions: list[Prediction], format: str, top_k: int) -> str:
    """The predictions as text, csv or json."""
    check_value("format", format)
    check_value("top_k", top_k)
    if format == "json":
        return json.dumps([{"path": shown(p.path), "prediction": p.top[0][0] if p.top else None,
                            "probability": p.top[0][1] if p.top else None,
                            "top_k": [{"class": c, "probability": q} for c, q in p.top], "skipped": p.skipped or None}
                           for p in predictions], indent=2)
    if format == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        extra = [f"{kind}{k}" for k in range(2, top_k + 1) for kind in ("prediction", "probability")]
        writer.writerow(["path", "prediction", "probability", *extra, "skipped"])
        for p in predictions:
            cells = [x for c, q in p.top for x in (c, f"{q:.6f}")]
            writer.writerow([shown(p.path), *cells, *[""] * (2 * top_k - len(cells)), p.skipped])
        return out.getvalue().rstrip("\n")
    width = max(len(shown(p.path)) for p in predictions) if predictions else 0
    return "\n".join(
        f"{shown(p.path):<{width}}  " + ("skipped: " + p.skipped if p.skipped else "  ".join(f"{c} {q:.1%}" for c, q in p.top))
        for p in predictions
    )
