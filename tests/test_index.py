"""The streamed scan and the run's index: same order with any number of threads, shards cut at
the same rows whatever the batch sizes, one small footer per shard read."""

from __future__ import annotations

import hashlib
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from imgscore.images import scan as scan_mod
from imgscore.images import scan_stream, walk
from imgscore.images.entries import INDEX_SCHEMA
from imgscore.images.scan import open_scan, scan_images
from imgscore.images.scan_stream import ordered_map
from imgscore.runstate.index import (
    IndexWriter,
    read_shard_entries,
    refresh_shards,
    shard_location,
    table_fingerprint,
)


def _tree(root, classes=7, per=9):
    """Class folders of tiny PNGs with nested folders, junk, an unsupported format and a class
    that is empty; names chosen so sorted order differs from creation order."""
    for c in range(classes):
        d = root / f"c{(c * 3) % classes:02d}"
        for i in range(per):
            sub = d / ("nested" if i % 4 == 0 else "")
            sub.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (4, 4), (c * 30, i * 20, 0)).save(sub / f"img_{(i * 7) % per:03d}.png")
        (d / "photo.heic").write_bytes(b"\0")  # skipped, with a reason
        (d / ".DS_Store").write_bytes(b"\0")
    (root / "empty").mkdir()
    return root


def _entries(index):
    return [(e.rel, e.label, e.label_name, e.size) for e in index.entries]


@pytest.mark.parametrize("layout", ["imagefolder", "flat"])
def test_threads_change_nothing_but_speed(tmp_path, layout):
    """Units (class folders, or the root's files and top-level folders) are scanned on threads
    but yielded in order, so the list, the labels and the skipped list are the same."""
    root = _tree(tmp_path / "t")
    if layout == "flat":
        Image.new("RGB", (4, 4)).save(root / "top.png")
    one = scan_images(root, threads=1)
    many = scan_images(root, threads=4)
    assert one.layout == many.layout == layout
    assert _entries(one) == _entries(many) and one.skipped == many.skipped and one.classes == many.classes
    assert len(one.entries) == 63 + (layout == "flat")
    assert [s["reason"].startswith("HEIC") for s in one.skipped] == [True] * 7


def test_ordered_map_raises_in_order_and_stops_early():
    def work(u):
        for i in range(3):
            if u == 5 and i == 1:
                raise OSError("unit 5 unreadable")
            yield (u, i)

    got = []
    with pytest.raises(OSError, match="unit 5"):
        for item in ordered_map(work, list(range(10)), threads=3):
            got.append(item)
    assert got == [(u, i) for u in range(5) for i in range(3)] + [(5, 0)]
    gen = ordered_map(work, list(range(4)), threads=2)
    assert next(gen) == (0, 0)
    gen.close()  # leaving early stops the threads


def _old_fingerprint(entries) -> str:  # the definition before fingerprints were vectorised
    h = hashlib.sha256()
    for e in entries:
        h.update(f"{e.image_path}\t{e.size}\t{e.mtime_ns}\n".encode())
    return h.hexdigest()


def test_index_writer_cuts_the_same_shards_whatever_the_batches(tmp_path, monkeypatch):
    root = _tree(tmp_path / "t")
    full = scan_images(root)
    monkeypatch.setattr(scan_stream, "SCAN_BATCH_ROWS", 4)  # many small batches, not aligned to shards
    spans = []
    for d, per_file in ((tmp_path / "a", 3), (tmp_path / "b", 64)):
        s = open_scan(root)
        with IndexWriter(d, 10, shards_per_file=per_file) as w:
            for b in s.batches(threads=2):
                w.write(b)
        spans.append(w.shards)
        assert w.rows == 63 and [x.stop - x.start for x in w.shards] == [10] * 6 + [3]
        for x in w.shards:
            got = read_shard_entries(d, x.index_file, x.row_group)
            assert [e.rel for e in got] == [e.rel for e in full.entries[x.start : x.stop]]
            assert x.fingerprint == _old_fingerprint(full.entries[x.start : x.stop])
            assert shard_location(w.info(), x.shard_id) == (x.index_file, x.row_group)
    assert [x.fingerprint for x in spans[0]] == [x.fingerprint for x in spans[1]]
    assert len(os.listdir(tmp_path / "a" / "index.parquet")) == 3  # 7 shards, 3 a file
    assert pq.ParquetFile(tmp_path / "a" / "index.parquet" / "part-00000.parquet").num_row_groups == 3
    assert pq.read_table(tmp_path / "a" / "index.parquet").num_rows == 63  # readable as one dataset


def test_refresh_restats_only_the_shards_asked(tmp_path):
    root = _tree(tmp_path / "t", classes=2, per=6)
    s = open_scan(root)
    with IndexWriter(tmp_path / "run", 4, shards_per_file=2) as w:
        for b in s.batches():
            w.write(b)
    first = read_shard_entries(tmp_path / "run", *shard_location(w.info(), 1))
    target = root / first[0].rel
    target.write_bytes(target.read_bytes() + b"\0" * 10)  # changed size
    before = {x.shard_id: x.fingerprint for x in w.shards}
    fps = refresh_shards(tmp_path / "run", w.info(), root, [1])
    assert set(fps) == {1} and fps[1] != before[1]
    again = read_shard_entries(tmp_path / "run", *shard_location(w.info(), 1))
    assert again[0].size == target.stat().st_size and [e.rel for e in again] == [e.rel for e in first]
    other = read_shard_entries(tmp_path / "run", *shard_location(w.info(), 0))
    assert (
        table_fingerprint(
            pa.Table.from_pylist([{"image_path": e.image_path, "size": e.size, "mtime_ns": e.mtime_ns} for e in other])
        )
        == before[0]
    )


def test_scan_threads_auto_is_one_on_a_local_disk(tmp_path):
    assert walk.filesystem_type(tmp_path) is not None
    network = walk.filesystem_type(tmp_path) in walk.NETWORK_FILESYSTEMS
    assert scan_mod.scan_threads_for(tmp_path, "auto") == (8 if network else 1)
    assert scan_mod.scan_threads_for(tmp_path, 3) == 3
    assert INDEX_SCHEMA.names[:2] == ["image_path", "fs_path"]
