"""The feature store's mapped file: its size grows with its runs, not its rows; its index is read through the runs."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest

from conftest import make_images
from pipeline.config import Settings
from pipeline.extract import extract
from pipeline.memory import mapped_matrix
from pipeline.store import (FeatureStore, ImageKey, Placement, Source, SplitIndex, StoreWriter, _strings, content_digest,
                            encoded, features_file)

DIM = 3
ATTRS = {"fingerprint": "{}", "backbone": "test", "feature_dim": DIM, "classes": ["a", "b"]}


def _segment(path, names: list[str], dtype=np.float32) -> Source:
    """A plain file of ``names`` (train only), vector i = [i, i, i] offset by the file's first name."""
    rows = [(ImageKey("train", name, -1, 10 + i, 20 + i), i % 2, bytes([i % 256]) * 16) for i, name in enumerate(names)]
    with StoreWriter(path, ATTRS) as writer:
        writer.add_split("train", SplitIndex.build(rows, []), DIM, dtype)[:] = np.arange(len(names))[:, None] + np.zeros(DIM)
        writer.commit()
    return Source(path.name, writer.digest, {"train": len(names)})


def _mapped(path, sources: list[Source], placement: Placement, index: SplitIndex) -> None:
    with StoreWriter(path, ATTRS, sources=sources) as writer:
        writer.add_mapped_split("train", index, placement, DIM, np.float32)
        writer.commit()


def test_a_mapped_file_grows_with_its_runs_not_its_rows(tmp_path):
    sizes = {}
    for n in (10, 20_000):
        folder = tmp_path / str(n)
        folder.mkdir()
        names = [f"train/a/{i:06d}.png" for i in range(n)]
        source = _segment(folder / "seg.h5", names)
        with FeatureStore(folder / "seg.h5") as segment:
            index = segment.index("train")
        _mapped(folder / "features.h5", [source], Placement(np.zeros(n, dtype=np.int64), np.arange(n)), index)
        sizes[n] = (folder / "features.h5").stat().st_size
        with FeatureStore(folder / "features.h5") as store:
            assert store.paths("train") == names and store.placement("train").run_array().tolist() == [[0, n, 0, 0]]
            np.testing.assert_array_equal(store.index("train").digests, index.digests)
            np.testing.assert_array_equal(store.features("train")[:, 0], np.arange(n))
    assert abs(sizes[20_000] - sizes[10]) < 1024  # rows 0:n of one source, however many rows


def test_interleaved_runs_gather_the_index_and_vectors_of_each_row(tmp_path):
    old = _segment(tmp_path / "old.h5", ["a0", "a2", "a4", "a6"])
    new = _segment(tmp_path / "new.h5", ["a1", "a5"])
    placement = Placement(np.array([0, 1, 0, 0, 1, 0]), np.array([0, 0, 1, 2, 1, 3]))  # a0 a1 a2 a4 a5 a6
    stores = [FeatureStore(tmp_path / name) for name in ("old.h5", "new.h5")]
    rows = [(stores[s].index("train").keys("train")[r], int(stores[s].labels("train")[r]), bytes(stores[s].index("train").digests[r]))
            for s, r in zip(placement.sources, placement.rows)]
    expected = [float(stores[s].features("train")[r, 0]) for s, r in zip(placement.sources, placement.rows)]
    for store in stores:
        store.close()
    _mapped(tmp_path / "features.h5", [old, new], placement, SplitIndex.build(rows, []))
    with FeatureStore(tmp_path / "features.h5") as store:
        assert store.paths("train") == ["a0", "a1", "a2", "a4", "a5", "a6"]
        assert store.index("train").sizes.tolist() == [10, 10, 11, 12, 11, 13]
        assert store.features("train")[:, 0].tolist() == expected
        assert len(store.placement("train").run_array()) == 5


def test_vectors_are_read_into_a_given_array_across_runs_and_converted_from_float16(tmp_path):
    old = _segment(tmp_path / "old.h5", ["a0", "a2", "a4", "a6"])
    new = _segment(tmp_path / "new.h5", ["a1", "a5"], dtype=np.float16)
    placement = Placement(np.array([0, 1, 0, 0, 1, 0]), np.array([0, 0, 1, 2, 1, 3]))  # a0 a1 a2 a4 a5 a6
    with FeatureStore(tmp_path / "old.h5") as a, FeatureStore(tmp_path / "new.h5") as b:
        index = SplitIndex.build([(store.index("train").keys("train")[r], int(store.labels("train")[r]),
                                   bytes(store.index("train").digests[r]))
                                  for store, r in zip([[a, b][s] for s in placement.sources], placement.rows)], [])
    _mapped(tmp_path / "features.h5", [old, new], placement, index)
    for path, expected in (("features.h5", [0, 0, 1, 2, 1, 3]), ("new.h5", [0, 1]), ("old.h5", [0, 1, 2, 3])):
        with FeatureStore(tmp_path / path) as store:
            rows = slice(1, len(expected))
            out = np.full((len(expected) - 1, DIM), np.nan, dtype=np.float32)
            assert store.features("train", rows, out=out) is out
            np.testing.assert_array_equal(out, np.array(expected[1:], dtype=np.float32)[:, None] + np.zeros(DIM))
            assert store.features("train")[:, 0].tolist() == expected and store.features("train").dtype == np.float32
            assert store.features("train", slice(2, 2)).shape == (0, DIM)
            read_only = out.copy()
            read_only.setflags(write=False)
            for wrong in (np.empty((9, DIM), dtype=np.float32), np.empty((len(expected) - 1, 2 * DIM), np.float32)[:, ::2],
                          np.empty_like(out, dtype=np.float64), read_only):
                with pytest.raises(ValueError, match="out must be"):  # not read as damage
                    store.features("train", rows, out=wrong)


def _vm_flags(array: np.ndarray) -> list[str]:
    """The kernel's flags for the mapping that holds the middle of ``array`` (``/proc/self/smaps``; Linux)."""
    address, flags, inside = array.ctypes.data + array.nbytes // 2, None, False  # numpy advises from a page boundary on
    for line in open("/proc/self/smaps"):
        first = line.split()[0]
        if "-" in first and not first.endswith(":"):
            start, end = (int(a, 16) for a in first.split("-"))
            inside = start <= address < end
        elif inside and first == "VmFlags:":
            flags = line.split()[1:]
    return flags


def test_a_mapped_matrix_is_private_writable_zeroed_float32_memory_without_huge_page_advice():
    import torch

    X = mapped_matrix(3000, 700)
    assert X.shape == (3000, 700) and X.dtype == np.float32 and X.flags.c_contiguous and X.flags.writeable
    assert not X.any()
    if os.path.exists("/proc/self/smaps"):  # numpy's own array of this size is advised huge pages ("hg")
        assert "hg" not in _vm_flags(X)
    torch.from_numpy(X)[5, 2] = 4.0  # torch works on it in place, as the head does on the train matrix
    assert X[5, 2] == 4.0 and not mapped_matrix(3000, 700).any()
    child = os.fork()
    if child == 0:  # a forked process (a DataLoader worker) writes to its own copy, never to the parent's
        try:
            X[0, 0] = 1.0
        finally:
            os._exit(0 if X[0, 0] == 1.0 else 1)
    assert os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) == 0
    assert X[0, 0] == 0.0
    assert mapped_matrix(0, 7).shape == (0, 7) and mapped_matrix(4, 0).shape == (4, 0)


def test_a_whole_split_is_read_into_a_mapped_matrix_and_a_part_into_plain_memory(tmp_path, monkeypatch):
    import pipeline.store

    _segment(tmp_path / "a.h5", ["a0", "a1", "a2"])
    made = []
    monkeypatch.setattr(pipeline.store, "mapped_matrix", lambda *shape: made.append(shape) or mapped_matrix(*shape))
    with FeatureStore(tmp_path / "a.h5") as store:
        assert store.features("train")[:, 0].tolist() == [0, 1, 2] and made == [(3, DIM)]
        assert store.features("train", slice(1, None))[:, 0].tolist() == [1, 2] and made == [(3, DIM)]
        with pytest.raises(ValueError, match="positive step"):
            store.features("train", slice(None, None, -1))


def test_runs_that_do_not_tile_the_rows_are_refused():
    for runs in ([[0, 2, 0, 0], [3, 4, 0, 2]], [[0, 2, 1, 0]], [[0, 5, 0, 0]], [[0, 2, 0, -1]]):
        with pytest.raises(ValueError):
            Placement.from_runs(np.array(runs), 4, 1)
    assert Placement.from_runs(np.array([[0, 2, 0, 5], [2, 4, 0, 0]]), 4, 1).rows.tolist() == [5, 6, 0, 1]


def _as_format_2(path) -> None:
    """Rewrite a format-3 ``features.h5`` as format 2 wrote it: the index row by row, and ``source``/``source_row``."""
    with FeatureStore(path) as store:
        indexes = {split: store.index(split) for split in store.splits}
        placements = {split: store.placement(split) for split in store.splits}
    with h5py.File(path, "a") as f:
        for split, index in indexes.items():
            group = f[split]
            del group["runs"]
            group.create_dataset("paths", data=np.array([os.fsencode(p) for p in index.paths], dtype=object),
                                 dtype=h5py.string_dtype("ascii"))
            for name in ("views", "labels", "sizes", "mtimes", "digests"):
                group.create_dataset(name, data=getattr(index, name))
            group.create_dataset("source", data=placements[split].sources)
            group.create_dataset("source_row", data=placements[split].rows)
        f.attrs["format_version"] = 2
        shapes = {s: [*f[s]["features"].shape, str(f[s]["features"].dtype)] for s in indexes}
        f.attrs["content_sha256"] = content_digest(f.attrs, indexes, shapes, placements)


def test_a_format_2_cache_is_read_and_updated_without_extracting_it_again(tmp_path):
    data = make_images(tmp_path / "data", {"train": 4, "test": 2})
    settings = Settings(data=data, cache=tmp_path / "cache", backbone="efficientnet_lite0")
    extract(settings)
    path = features_file(settings.backbone_dir())
    with FeatureStore(path) as store:
        before = {split: (store.paths(split), store.features(split)) for split in store.splits}
    _as_format_2(path)
    with FeatureStore(path) as store:
        assert store.attrs["format_version"] == 2
        for split, (paths, vectors) in before.items():
            assert store.paths(split) == paths
            np.testing.assert_array_equal(store.features(split), vectors)
    (data / "train" / "cat" / "cat0.png").rename(data / "train" / "cat" / "moved.png")
    summary = extract(settings)
    assert summary.extracted == 1 and summary.reused == 11
    with h5py.File(path) as f:
        assert f.attrs["format_version"] == 3 and "runs" in f["train"]


def test_a_reader_keeps_the_version_it_opened_while_a_compaction_removes_its_segments(tmp_path, monkeypatch):
    import pipeline.extract as extract_module

    data = make_images(tmp_path / "data", {"train": 4, "test": 2})
    settings = Settings(data=data, cache=tmp_path / "cache", backbone="efficientnet_lite0")
    extract(settings)
    folder = settings.backbone_dir()
    [old_segment] = folder.glob("features.seg-*.h5")
    reader = FeatureStore(features_file(folder))
    before = {split: (reader.paths(split), reader.features(split)) for split in reader.splits}
    monkeypatch.setattr(extract_module, "MAX_SEGMENTS", 1)  # the update copies every vector into one new segment
    (data / "train" / "cat" / "cat0.png").rename(data / "train" / "cat" / "renamed.png")
    assert extract(settings).extracted == 1
    assert not old_segment.exists()
    with reader:
        for split, (paths, vectors) in before.items():
            assert reader.paths(split) == paths
            np.testing.assert_array_equal(reader.features(split), vectors)
            np.testing.assert_array_equal(reader.features(split, slice(1, 3)), vectors[1:3])
    with FeatureStore(features_file(folder)) as now:
        assert "train/cat/renamed.png" in now.paths("train") and "train/cat/cat0.png" not in now.paths("train")


def test_a_class_added_before_the_others_relabels_the_kept_rows_without_extracting_them(tmp_path):
    data = make_images(tmp_path / "data", {"train": 6, "test": 2})
    settings = Settings(data=data, cache=tmp_path / "cache", backbone="efficientnet_lite0")
    extract(settings)
    make_images(data, {"train": 1, "test": 1}, classes=("bird",))  # sorts first: cat and dog become 1 and 2
    summary = extract(settings)
    assert summary.extracted == 2 and summary.reused == 16
    with FeatureStore(features_file(settings.backbone_dir())) as store:
        assert store.classes == ["bird", "cat", "dog"] and len(store.sources) == 2
        for split in store.splits:
            assert [store.classes[label] for label in store.labels(split)] == [p.split("/")[1] for p in store.paths(split)]


def test_appends_keep_the_segments_few_and_never_copy_the_big_one(tmp_path):
    import shutil

    data = make_images(tmp_path / "data", {"train": 8, "test": 2})
    settings = Settings(data=data, cache=tmp_path / "cache", backbone="efficientnet_lite0")
    extract(settings)
    folder = settings.backbone_dir()
    [(first, stamp)] = [(p, p.stat().st_mtime_ns) for p in folder.glob("features.seg-*.h5")]
    counts = []
    for i in range(8):
        shutil.copy(data / "train" / "cat" / "cat0.png", data / "train" / "cat" / f"added{i}.png")
        assert extract(settings).extracted == 1
        with FeatureStore(features_file(folder)) as store:
            sizes = [sum(source.rows.values()) for source in store.sources]
        assert sizes[0] == 20 and sizes[1:] == sorted(sizes[1:], reverse=True)  # oldest and biggest first
        counts.append(len(sizes))
    assert first.stat().st_mtime_ns == stamp and max(counts) <= 5  # 1 + log2(8) + 1
    assert sorted(folder.glob("features.seg-*.h5")) == sorted(folder / s.name for s in FeatureStore(features_file(folder)).sources)


@pytest.mark.parametrize("merge", [False, True])
def test_a_join_labels_every_part_by_the_listings_classes(tmp_path, merge):
    """Under torchrun a part left unchanged since a class was added keeps its own classes; the join relabels it."""
    from pipeline.distributed import join

    def part(name: str, classes: list[str], images: list[tuple[str, int]]) -> None:
        rows = [(ImageKey("train", path, -1, 1, 1), label, bytes(16)) for path, label in images]
        attrs = {**ATTRS, "classes": classes, "created": "now", "images_extracted": len(rows), "views_extracted": 0,
                 "extraction_seconds": 1.0, "augment_seconds": 0.0, "throughput_img_s": 1.0}
        with StoreWriter(tmp_path / name, attrs) as writer:
            writer.add_split("train", SplitIndex.build(rows, []), DIM)[:] = np.ones((len(rows), DIM))
            writer.commit()

    part("features.part-0-of-2.1.h5", ["b", "c"], [("train/b/0.png", 0), ("train/c/1.png", 1)])  # before "a" came
    part("features.part-1-of-2.1.h5", ["a", "b", "c"], [("train/a/2.png", 0), ("train/c/3.png", 2)])
    parts = [tmp_path / "features.part-0-of-2.1.h5", tmp_path / "features.part-1-of-2.1.h5"]
    assert join(tmp_path / "features.h5", parts, ["a", "b", "c"], merge)
    with FeatureStore(tmp_path / "features.h5") as store:
        assert store.classes == ["a", "b", "c"] and store.labels("train").tolist() == [1, 2, 0, 2]


@pytest.mark.parametrize("names", [[], [""], ["a", "", "b"], ["cat/\udcff\udcfe.jpg", "ünï/cödé.png", "a b\tc"]])
def test_names_encode_and_decode_in_one_call_as_one_by_one(tmp_path, names):
    assert encoded(names) == [os.fsencode(n) for n in names]  # odd bytes (surrogate escapes), empty names
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f.create_dataset("s", data=np.array(encoded(names), dtype=object), dtype=h5py.vlen_dtype(bytes))
        assert _strings(f["s"]) == names
    assert encoded(["nul\0inside", "x"]) == [b"nul\0inside", b"x"]  # a NUL (no file name has one): one by one
