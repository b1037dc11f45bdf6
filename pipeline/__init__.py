"""Feature-caching two-stage transfer learning.

images -> backbone -> feature store (HDF5) -> heads -> report

The names below are the API for notebooks and scripts (see the README's "Python API"); each is imported when first
used, so ``import pipeline`` loads neither torch nor matplotlib and changes nothing in the session.
"""

from importlib import import_module

__version__ = "0.1.0"

_API = {
    "Settings": "pipeline.config",
    "bring_up_to_date": "pipeline.freshness",
    "ExtractSummary": "pipeline.freshness",
    "FeatureStore": "pipeline.store",
    "open_features": "pipeline.train",
    "HeadClassifier": "pipeline.head",
    "LogisticBaseline": "pipeline.baseline",
    "train": "pipeline.train",
    "sweep": "pipeline.sweep",
    "trained_runs": "pipeline.runs",
    "report": "pipeline.report",
    "predict": "pipeline.predict",
    "embed": "pipeline.predict",
    "export": "pipeline.export",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute '{name}'")


def __dir__() -> list[str]:
    return __all__
