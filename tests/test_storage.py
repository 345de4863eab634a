"""The filesystem layer (``imgscore.io.storage``, ``object_store``, ``objects``) against a real S3 server (SeaweedFS on
loopback) and a real fault-injecting HTTP proxy: roots and URLs, conditional creates, listings,
object reads with retries and timeouts, and the refusal of secrets in ``storage.options``."""

from __future__ import annotations

import threading
import time

import psutil
import pytest

from imgscore.io import object_store, objects, storage
from tests.s3_server import FaultProxy


def test_roots_normalize_and_join():
    """URLs keep one spelling (lower-case scheme, no trailing slash); file:// is a local path;
    unknown schemes and bucket-less URLs are refused with the fix."""
    assert storage.normalize_root("S3://bucket/images/") == "s3://bucket/images"
    assert storage.normalize_root("file:///data/images") == "/data/images"
    assert storage.normalize_root("outputs") == "outputs"
    assert storage.join("s3://b/out", "runs", "R1/manifest.json") == "s3://b/out/runs/R1/manifest.json"
    assert storage.join("/o", "runs", "R1") == "/o/runs/R1"
    assert storage.is_remote("gs://b/x") and storage.is_remote("abfs://c/x") and not storage.is_remote("file:///x")
    assert (
        storage.parent_of("s3://b/out/runs/R1") == "s3://b/out/runs" and storage.name_of("s3://b/out/runs/R1") == "R1"
    )
    with pytest.raises(ValueError, match=r"unknown storage scheme http://"):
        storage.normalize_root("http://example/x")
    with pytest.raises(ValueError, match=r"names no bucket; write s3://BUCKET/PREFIX"):
        storage.normalize_root("s3://")


def test_secrets_in_options_are_refused_and_env_references_expand(monkeypatch):
    """A credential can only be named (``${VAR}``), never written; the name is resolved on the
    machine that opens the store, and an unset variable is named in the error."""
    object_store.check_options(
        {"endpoint_url": "http://127.0.0.1:1", "client_kwargs": {"region_name": "eu-west-1"}, "anon": False}
    )
    for bad in (
        {"secret": "hunter2"},
        {"key": "AKIA123"},
        {"client_kwargs": {"aws_secret_access_key": "x"}},
        {"sas_token": "sv=2020"},
        {"connection_string": "DefaultEndpoints..."},
        {"account_key": "abc"},
    ):
        with pytest.raises(ValueError, match="looks like a credential.*SOME_ENV_VAR"):
            object_store.check_options(bad)
    object_store.check_options({"secret": "${MY_SECRET}", "token": "anon"})
    monkeypatch.setenv("MY_SECRET", "s3cr3t")
    assert object_store._expand({"a": {"secret": "${MY_SECRET}"}}, "storage.options") == {"a": {"secret": "s3cr3t"}}
    monkeypatch.delenv("MY_SECRET")
    with pytest.raises(ValueError, match=r"storage.options.secret refers to \$\{MY_SECRET\}, which is not set"):
        object_store._expand({"secret": "${MY_SECRET}"}, "storage.options")


def test_seaweedfs_listens_only_on_the_ports_it_was_given(s3_server):
    """Every port of master, volume, filer and S3 gateway (HTTP and gRPC) was chosen free by the
    fixture and bound to loopback; the server opened no other listening socket."""
    proc = psutil.Process(s3_server.proc.pid)
    listening = {
        (c.laddr.ip, c.laddr.port)
        for p in [proc, *proc.children(recursive=True)]
        for c in p.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN
    }
    assert listening == {("127.0.0.1", port) for port in s3_server.ports.values()}, (listening, s3_server.ports)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_create_new_lets_exactly_one_of_racing_writers_win(where, tmp_path, request):
    """Eight threads create the same name at once: one gets True, the others False, and the
    content is the winner's whole payload (a PUT with If-None-Match: * on S3; O_EXCL + link locally)."""
    url = (
        str(tmp_path / "shards" / "00003.json")
        if where == "local"
        else request.getfixturevalue("s3").url("out/shards/00003.json")
    )
    results: dict[int, bool] = {}
    barrier = threading.Barrier(8)

    def writer(i: int) -> None:
        barrier.wait()
        results[i] = storage.create_new(url, f"writer {i} ".encode() * 1000)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, ok in results.items() if ok]
    assert len(winners) == 1, results
    assert storage.read_bytes(url) == f"writer {winners[0]} ".encode() * 1000
    assert storage.create_new(url, b"late") is False
    if where == "local":
        assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["00003.json"]  # no temp file left


def test_whole_file_io_listing_and_delete_on_s3(s3):
    """write/read/list/glob/delete on a bucket as on a folder; a missing object is FileNotFoundError."""
    base = s3.url("out")
    storage.write_bytes(storage.join(base, "runs/R1/manifest.json"), b"{}")
    storage.write_bytes(storage.join(base, "runs/R1/ledger/000001.jsonl"), b"a\n")
    storage.write_bytes(storage.join(base, "runs/R2/manifest.json"), b"{}")
    assert storage.read_bytes(storage.join(base, "runs/R1/manifest.json")) == b"{}"
    assert storage.list_names(storage.join(base, "runs")) == ["R1", "R2"]
    assert storage.list_names(storage.join(base, "nothing")) == []
    assert storage.glob(storage.join(base, "runs/*/manifest.json")) == [
        s3.url("out/runs/R1/manifest.json"),
        s3.url("out/runs/R2/manifest.json"),
    ]
    assert storage.is_file(storage.join(base, "runs/R1/manifest.json")) and not storage.is_file(
        storage.join(base, "runs/R1")
    )
    storage.delete(storage.join(base, "runs/R2/manifest.json"))
    storage.delete(storage.join(base, "runs/R2/manifest.json"))  # already gone: fine
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(base, "runs/R2/manifest.json"))
    storage.delete_tree(storage.join(base, "runs/R1"))
    assert s3.keys("out/") == []


def test_listing_reports_size_last_modified_and_etag(s3):
    """Each listed object carries its size, last-modified time (ns) and ETag; keys are relative
    to the listed prefix; a non-recursive listing gives the sub-prefixes ("folders")."""
    s3.put("img/a/one.jpg", b"12345")
    s3.put("img/b/sub/two.png", b"xy")
    s3.put("img/top.jpg", b"z")
    objs, prefixes = objects.list_objects(s3.url("img"))
    assert [o.key for o in objs] == ["a/one.jpg", "b/sub/two.png", "top.jpg"] and prefixes == []
    head = s3.client.head_object(Bucket=s3.bucket, Key=s3.key("img/a/one.jpg"))
    assert objs[0].size == 5 and objs[0].version == head["ETag"].strip('"')
    assert (
        abs(objs[0].mtime_ns / 1e9 - head["LastModified"].timestamp()) < 1.0
        and abs(objs[0].mtime_ns / 1e9 - time.time()) < 600
    )
    top, prefixes = objects.list_objects(s3.url("img"), recursive=False)
    assert [o.key for o in top] == ["top.jpg"] and prefixes == ["a", "b"]


def test_object_reads_retry_throttling_and_time_out_slow_objects(s3, s3_server, monkeypatch):
    """Through a real proxy: an object answered 503 SlowDown every time fails after exactly
    retries + 1 GETs (botocore's standard retry mode, with backoff); an object that does not
    answer within the read timeout fails with a timeout; the other objects of the same batch
    are read. By construction: the proxy decides per key, whatever the timing of the batch."""
    for name in ("ok.jpg", "throttled.jpg", "slow.jpg"):
        s3.put(f"img/{name}", name.encode())
    with FaultProxy(s3_server.endpoint, slow_s=4.0) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        proxy.fail_keys.add(f"/{s3.bucket}/{s3.prefix}/img/throttled.jpg")
        proxy.slow_keys.add(f"/{s3.bucket}/{s3.prefix}/img/slow.jpg")
        object_store.configure(object_store.Settings.of(retries=2, read_timeout_s=0.5, connect_timeout_s=2))
        t0 = time.monotonic()
        ok, throttled, slow = objects.read_objects([s3.url("img", n) for n in ("ok.jpg", "throttled.jpg", "slow.jpg")])
        took = time.monotonic() - t0
    assert ok == b"ok.jpg"
    said = objects.describe_error(throttled)
    assert isinstance(throttled, OSError) and "SlowDown" in said, said
    assert proxy.gets[f"/{s3.bucket}/{s3.prefix}/img/throttled.jpg"] == 3  # 1 + storage retries
    assert isinstance(slow, TimeoutError | OSError) and not isinstance(slow, bytes)
    assert took < object_store.current_settings().object_timeout_s + 5, took


def _messy_tree(root, photos):
    """A folder with what the scan must get right: classes, nested folders, hidden and junk
    names, a non-image, a format Pillow cannot read here, a non-ASCII name, an image outside
    any class."""
    from tests.conftest import make_image_folder

    make_image_folder(root, photos, per_class=3)
    (root / "chelsea" / "nested" / "deeper").mkdir(parents=True)
    photos["chelsea"].resize((40, 30)).save(root / "chelsea" / "nested" / "a.jpg")
    photos["chelsea"].resize((30, 40)).save(root / "chelsea" / "nested" / "deeper" / "b.png")
    photos["coffee"].resize((40, 30)).save(root / "coffee" / "Ünïcode café.JPG")
    (root / "coffee" / "notes.txt").write_text("not an image")
    (root / "coffee" / "raw.heic").write_bytes(b"\0\0\0\x18ftypheic")
    (root / "coffee" / ".DS_Store").write_bytes(b"junk")
    (root / "coffee" / "._coffee_0.jpg").write_bytes(b"appledouble")
    (root / ".ipynb_checkpoints").mkdir()
    (root / ".ipynb_checkpoints" / "x.jpg").write_bytes(b"hidden")
    (root / "__MACOSX" / "rocket").mkdir(parents=True)
    (root / "__MACOSX" / "rocket" / "._r.jpg").write_bytes(b"junk")
    photos["rocket"].resize((20, 20)).save(root / "stray.jpg")
    return root


@pytest.mark.parametrize("threads", [1, 8])
def test_object_scan_lists_like_the_folder_scan(threads, s3, photos, tmp_path):
    """The same tree on disk and in a bucket gives the same layout, classes, image list in the
    same order (so the same shards and labels), sizes and skipped list; objects also carry
    their ETag and last-modified. By construction: both scans classify with skip_reason and
    order with torchvision's rule, whatever the number of listing threads."""
    import pyarrow as pa

    from imgscore.images.entries import entries_from_table
    from imgscore.images.scan import open_scan

    local = _messy_tree(tmp_path / "images", photos)
    url = s3.upload(local, "images")
    disk, bucket = open_scan(local, "imagefolder"), open_scan(url, "imagefolder")  # auto: flat (stray.jpg)
    assert (
        (bucket.layout, bucket.classes)
        == (disk.layout, disk.classes)
        == ("imagefolder", ["chelsea", "coffee", "rocket"])
    )
    on_disk = [e for b in disk.batches(1) for e in entries_from_table(pa.Table.from_batches([b]))]
    listed = [e for b in bucket.batches(threads) for e in entries_from_table(pa.Table.from_batches([b]))]
    assert [(e.image_path, e.label, e.label_name, e.size) for e in listed] == [
        (e.image_path, e.label, e.label_name, e.size) for e in on_disk
    ]
    assert (
        len(listed) == 12
        and listed[3].image_path == "chelsea/nested/a.jpg"
        and listed[4].image_path == "chelsea/nested/deeper/b.png"
    )
    assert all(e.version and len(e.version) >= 32 and e.mtime_ns for e in listed)
    assert sorted(map(tuple, (d.items() for d in bucket.skipped))) == sorted(
        map(tuple, (d.items() for d in disk.skipped))
    )
    assert {d["image_path"] for d in bucket.skipped} == {"coffee/notes.txt", "coffee/raw.heic", "stray.jpg"}
    flat_disk, flat_bucket = open_scan(local), open_scan(url)
    assert flat_disk.layout == flat_bucket.layout == "flat"
    assert [
        e.image_path for b in flat_bucket.batches(threads) for e in entries_from_table(pa.Table.from_batches([b]))
    ] == [e.image_path for b in flat_disk.batches(1) for e in entries_from_table(pa.Table.from_batches([b]))]


def test_object_scan_refuses_an_empty_prefix_and_names_it(s3):
    """A prefix with no objects is a wrong URL, refused before anything is written (exit 2)."""
    from imgscore.errors import InputError
    from imgscore.images.scan import open_scan

    with pytest.raises(InputError, match=r"holds no objects; check the bucket and prefix"):
        open_scan(s3.url("nothing-here"))


def test_dataloader_workers_read_objects_and_record_what_fails(s3, s3_server, photos, tmp_path, monkeypatch):
    """Two DataLoader worker processes read a shard straight from the bucket: each good image
    gives the very tensor the same file gives on disk (same bytes, same decode); an object
    answered 503 every time, one deleted after the scan and a corrupt one are failures of
    their own image (ObjectReadError after the retries; DecodeError.unreadable; DecodeError.*),
    and the rest of their batch is scored. By construction: the proxy fails by key."""
    import torch
    from torch.utils.data import DataLoader

    from imgscore.images.dataset import ShardDataset, collate_samples
    from imgscore.images.preprocess import DecodeOptions, PreprocessSpec
    from imgscore.images.scan import scan_images

    local = tmp_path / "flat"
    local.mkdir()
    for i, name in enumerate(("astronaut", "coffee", "chelsea", "rocket", "cat", "colorwheel")):
        photos[name].resize((64 + 8 * i, 64)).save(local / f"{i}_{name}.{'png' if i % 2 else 'jpg'}")
    (local / "9_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    url = s3.upload(local, "flat")
    index = scan_images(url)
    assert [e.image_path for e in index.entries][-1] == "9_corrupt.jpg" and len(index.entries) == 7
    s3.client.delete_object(Bucket=s3.bucket, Key=s3.key("flat/2_chelsea.jpg"))  # gone between scan and decode
    spec, opts = PreprocessSpec(resize=48, crop=32), DecodeOptions(10**8)
    with FaultProxy(s3_server.endpoint) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        proxy.fail_keys.add(f"/{s3.bucket}/{s3.key('flat/1_coffee.png')}")
        object_store.configure(object_store.Settings.of(retries=1, read_timeout_s=5))
        ds = ShardDataset(url, index.entries, spec, opts)
        batches = list(
            DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate_samples, multiprocessing_context="fork")
        )
    failures = {f.image_path: (f.stage, f.error_type, f.message) for b in batches for f in b.failures}
    assert (
        failures["1_coffee.png"][:2] == ("decode", "ObjectReadError")
        and "SlowDown (503)" in failures["1_coffee.png"][2]
    )
    assert (
        failures["2_chelsea.jpg"][:2] == ("decode", "DecodeError.unreadable")
        and "no longer exists" in failures["2_chelsea.jpg"][2]
    )
    assert failures["9_corrupt.jpg"][1].startswith("DecodeError.")
    assert len(failures) == 3
    assert proxy.gets[f"/{s3.bucket}/{s3.key('flat/1_coffee.png')}"] == 2  # read in a worker: 1 + 1 retry
    on_disk = ShardDataset(str(local), scan_images(local).entries, spec, opts)
    got = {index.entries[p].image_path: b.tensor[i] for b in batches for i, p in enumerate(b.positions)}
    assert sorted(got) == ["0_astronaut.jpg", "3_rocket.png", "4_cat.jpg", "5_colorwheel.png"]
    for pos, entry in enumerate(on_disk.entries):
        if entry.image_path in got:
            assert torch.equal(got[entry.image_path], on_disk[pos].tensor), entry.image_path


@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_writers_of_one_shard_commit_once(where, tmp_path, request):
    """Two attempts at the same shard (a Dask task run again after its worker was lost): both
    write the whole shard's part files to the same keys, only the first creates the commit
    record, and the second gets the first's record back (the files agree with its counts); a
    rerun (``replace=True``) replaces it. By construction: the record is an exclusive create."""
    from imgscore.inference.commit import commit_shard
    from imgscore.io.parquet import ERRORS_SCHEMA, PREDICTIONS_SCHEMA
    from imgscore.runstate.manifest import ShardRef, ShardResult, read_commit_record

    out = str(tmp_path / "out") if where == "local" else request.getfixturevalue("s3").url("out")
    ref = ShardRef(
        run_id="r1",
        run_date="2026-12-01",
        run_dir=storage.join(out, "runs", "r1"),
        input_root="/x",
        shard_id=0,
        start=0,
        stop=0,
        fingerprint="fp",
    )
    empty_p, empty_e = PREDICTIONS_SCHEMA.empty_table(), ERRORS_SCHEMA.empty_table()
    first = commit_shard(
        ref, out, empty_p, empty_e, ShardResult(shard_id=0, state="complete", fingerprint="fp", worker="host:1")
    )
    second = commit_shard(
        ref, out, empty_p, empty_e, ShardResult(shard_id=0, state="complete", fingerprint="fp", worker="host:2")
    )
    assert first.worker == second.worker == "host:1"
    assert read_commit_record(ref.run_dir, 0).worker == "host:1"
    again = commit_shard(
        ref,
        out,
        empty_p,
        empty_e,
        ShardResult(shard_id=0, state="complete", fingerprint="fp", worker="host:3"),
        replace=True,
    )
    assert again.worker == read_commit_record(ref.run_dir, 0).worker == "host:3"


def test_the_path_type_is_a_pathlib_path_locally_and_rides_on_the_configured_store_remotely(s3, tmp_path, monkeypatch):
    """What ``storage.path`` promises (and the minor pin of universal-pathlib protects): a local
    root gives a real ``pathlib.Path``; a remote one a UPath whose ``.fs`` is the very instance
    ``object_store.filesystem`` opened with the settings in force (so a ``Path`` method on it reaches
    the same endpoint with the same retries), also after the settings or the endpoint change."""
    from pathlib import Path

    local = storage.path(tmp_path, "runs", "R1")
    assert (
        isinstance(local, Path)
        and local == tmp_path / "runs" / "R1"
        and storage.path(f"file://{tmp_path}", "x") == tmp_path / "x"
    )
    p = storage.path(s3.url("out"), "runs/R1", "manifest.json")
    assert str(p) == s3.url("out/runs/R1/manifest.json") and str(p / "x") == str(p) + "/x"
    assert p.fs is object_store.filesystem(str(p))[0] and p.fs.retries == 1
    p.write_bytes(b"{}")
    assert storage.read_bytes(str(p)) == b"{}" and p.exists()
    p.unlink(missing_ok=True)
    assert not p.exists() and s3.keys("out/") == []
    p.unlink(missing_ok=True)  # nothing there is fine, as on disk
    object_store.configure(object_store.Settings.of(retries=1))
    q = storage.path(s3.url("out"))
    assert q.fs is object_store.filesystem(str(q))[0] and q.fs is not p.fs
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # a client reads it when it is made
    r = storage.path(s3.url("out"))
    assert r.fs is object_store.filesystem(str(r))[0] and r.fs is not q.fs
