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


def test_embed_gives_the_cached_vectors_of_the_same_files_and_names_the_unusable(tmp_path, tiny_data):
    import numpy as np

    settings = pipeline.Settings(data=str(tiny_data), cache=str(tmp_path / "cache"), backbone="efficientnet_lite0")
    pipeline.bring_up_to_date(settings)
    (tiny_data / "test/cat/broken.png").write_bytes(b"not a png")
    embedded = pipeline.embed(settings, [str(tiny_data / "test/cat")])
    with pipeline.open_features(settings) as store:
        cached = dict(zip(store.paths("test"), store.features("test")))
    assert [p.rsplit("/", 1)[1] for p in embedded.paths] == [f"cat{i}.png" for i in range(4)]
    expected = np.stack([cached[f"test/cat/cat{i}.png"] for i in range(4)])
    np.testing.assert_allclose(embedded.vectors, expected, rtol=1e-4, atol=1e-5)
    assert [s.path.rsplit("/", 1)[1] for s in embedded.skipped] == ["broken.png"]
