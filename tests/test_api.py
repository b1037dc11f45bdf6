"""The package's API for notebooks: lazy, side-effect free, and what the README shows."""

from __future__ import annotations

import subprocess
import sys

import pipeline


def test_import_pipeline_loads_no_heavy_library_and_lists_its_api():
    code = ("import sys, pipeline; print(sorted(m for m in ('torch', 'h5py', 'sklearn', 'matplotlib') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr
    assert {"Settings", "bring_up_to_date", "open_features", "HeadClassifier", "predict"} <= set(dir(pipeline))


def test_every_name_of_the_api_resolves():
    for name in pipeline.__all__:
        assert getattr(pipeline, name) is not None
