"""Feature-caching two-stage transfer learning.

images -> backbone -> feature store (HDF5) -> heads -> report

The names below are the API for notebooks and scripts (see the README's "Python API"); each is imported when first
used, so ``import pipeline`` loads neither torch nor matplotlib and changes nothing in the session.
"""

import sys
from importlib import import_module
from types import ModuleType

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


class _Package(ModuleType):
    """This package's module: an API name is always the function or class, also once the submodule of the same name
    (``pipeline.train``, ``pipeline.report``, ...) was imported, which would otherwise replace it. The submodules
    themselves are ``sys.modules["pipeline.train"]`` (or ``from pipeline.train import ...``)."""

    def __getattribute__(self, name: str):
        if name in _API:
            return getattr(import_module(_API[name]), name)
        return super().__getattribute__(name)

    def __dir__(self) -> list[str]:
        return __all__


sys.modules[__name__].__class__ = _Package
