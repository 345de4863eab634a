"""The failure ledger (``run.skip_scored``): one corrupt upload fails at most one night.

An image that failed before with the same bytes is carried as ``already_failed`` — not retried,
not counted in ``failed``, listed in ``runs/RUN/already_failed.parquet`` — until the file changes
or ``run.retry_failed`` is set; and a night is judged on what it took on, with ``run.min_errors``.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from imgscore.config.running import RunConfig
from imgscore.flows.cli import main as cli_main
from imgscore.flows.score_images import over_budget
from imgscore.images.scan import scan_images
from imgscore.io import storage
from imgscore.io.file_ops import sha256_of_file
from imgscore.io.parquet import (
    ERRORS_SCHEMA,
    PREDICTIONS_SCHEMA,
    make_table,
    part_dir,
    run_part_files,
)
from imgscore.runstate.already_scored import split_already_scored
from imgscore.runstate.incremental import CARRIED_FILE, HASHES_FILE, HASHES_SCHEMA, RETRIED_ERRORS
from tests.conftest import base_overrides
from tests.test_incremental import folder


def night(root: Path, ckpt: Path, out, capsys, **extra) -> tuple[int, dict, str]:
    """One nightly `imgscore run` (skip_scored) into ``out`` (a local folder or an object-store
    root); returns (exit code, its manifest, stdout)."""
    sets = base_overrides(root, ckpt, out, **{"run.skip_scored": "true", "run.shard_size": 8, **extra})
    before = set(storage.list_names(storage.path(out, "runs")))
    code = cli_main(["run", *sum((["--set", s] for s in sets), []), "--quiet"])
    (rid,) = set(storage.list_names(storage.path(out, "runs"))) - before
    return (
        code,
        json.loads(storage.read_bytes(storage.path(out, "runs", rid, "manifest.json"))),
        capsys.readouterr().out,
    )


def read_parquet(path) -> list[dict]:
    with storage.open_input(path) as f:
        return pq.read_table(f).to_pylist()


def errors_of(out, m: dict):
    files = run_part_files(out, "errors", m["run_date"], m["run_id"])
    return read_parquet(files[0]) if files else []


@pytest.mark.slow
def test_a_corrupt_upload_fails_one_night_and_is_carried_until_it_changes(
    prefect_server, photos, tiny_checkpoint, tmp_path, capsys, out_root
):
    """Acceptance. Night 1 is clean. Night 2 takes on one new file, a text
    file named .jpg: 1 of 1 failed is 100 % but under run.min_errors (5), so the night is
    ``partial``, exit 0. Night 3, nothing new: exit 0, the bad file carried as already_failed 1
    (not retried: no errors rows, nothing scanned), listed with the run that recorded it, and its
    report.html says so. ``run.retry_failed`` tries it again (still bad). Fixing the file makes
    night 5 score it. Into a local folder or a bucket."""
    root = folder(tmp_path / "images", photos, range(10))
    out = out_root
    code, m1, _ = night(root, tiny_checkpoint, out, capsys)
    assert (code, m1["status"], m1["counts"]["scored"]) == (0, "complete", 10)

    (root / "bad.jpg").write_text("this is a text file, not a JPEG\n")
    code, m2, _ = night(root, tiny_checkpoint, out, capsys)
    assert code == 0 and m2["status"] == "partial"
    assert (m2["counts"]["scanned"], m2["counts"]["failed"], m2["counts"]["already_scored"]) == (1, 1, 10)
    (row,) = errors_of(out, m2)
    st = (root / "bad.jpg").stat()
    assert (row["image_path"], row["error_type"]) == ("bad.jpg", "DecodeError.unidentified")
    assert (row["input_root"], row["file_size"], row["file_mtime_ns"]) == (str(root), st.st_size, st.st_mtime_ns)

    code, m3, printed = night(root, tiny_checkpoint, out, capsys)
    c = m3["counts"]
    assert code == 0 and m3["status"] == "complete"
    assert (c["scanned"], c["failed"], c["already_scored"], c["already_failed"]) == (0, 0, 10, 1)
    assert errors_of(out, m3) == [] and m3["shards"] == []
    carried = read_parquet(out / "runs" / m3["run_id"] / CARRIED_FILE)
    assert [(r["image_path"], r["failed_run_id"], r["error_type"]) for r in carried] == [
        ("bad.jpg", m2["run_id"], "DecodeError.unidentified")
    ]
    assert m3["incremental"]["carried"] == {
        "file": CARRIED_FILE,
        "by_error_type": {"DecodeError.unidentified": 1},
        "by_run": {m2["run_id"]: 1},
    }
    assert "already_failed  1" in printed and "known_bad       1 image(s) failed before" in printed
    assert str(out / "runs" / m3["run_id"] / CARRIED_FILE) in printed
    page = (out / "runs" / m3["run_id"] / "report.html").read_text()  # the night's report, with its known-bad line
    assert (
        "1 image(s) failed before with the same bytes" in page
        and str(out / "runs" / m3["run_id"] / CARRIED_FILE) in page
    )
    assert "devices         none: nothing new to score" in printed and "predictions " not in printed

    code, m4, _ = night(root, tiny_checkpoint, out, capsys, **{"run.retry_failed": "true"})
    assert code == 0 and (m4["counts"]["scanned"], m4["counts"]["failed"], m4["counts"]["already_failed"]) == (1, 1, 0)

    folder(root, photos, range(10, 11))
    (root / "n_010.jpg").replace(root / "bad.jpg")  # the upload is fixed: a real JPEG, other size and mtime
    code, m5, _ = night(root, tiny_checkpoint, out, capsys)
    assert code == 0 and m5["status"] == "complete"
    assert (m5["counts"]["scored"], m5["counts"]["failed"], m5["counts"]["already_failed"]) == (1, 0, 0)
    code, m6, _ = night(root, tiny_checkpoint, out, capsys)  # scored now: no longer carried
    assert (m6["counts"]["already_scored"], m6["counts"]["already_failed"]) == (11, 0)


def test_error_budget_is_judged_with_min_errors():
    """The rule, by construction: over = rate > max_error_rate and failed >= min_errors."""
    budget = RunConfig()  # max_error_rate 0.01, min_errors 5
    assert over_budget(1, 1, budget) is None  # one corrupt upload in a small night
    assert over_budget(4, 4, budget) is None
    assert "30.00%" in over_budget(300, 1000, budget)
    assert over_budget(5, 5, budget) is not None
    assert over_budget(10, 1000, budget) is None  # 1 % is not above 1 %
    assert over_budget(1, 1, RunConfig(min_errors=0)) is not None  # min_errors 0: the rate alone


MODEL = {"model_id": "a" * 64, "preprocess": {"resize": 256, "crop": 224}}


def _prior_run(
    out: Path, root: Path, run_id: str, scored: list, failed: list[tuple], hashes: list | None = None
) -> None:
    """An earlier run as the flow leaves it: manifest, a predictions and an errors part file
    (``failed``: (entry, error_type)), and optionally its content hashes."""
    now = datetime.now(UTC)
    preds = [
        {
            "run_id": run_id,
            "input_root": str(root),
            "image_path": e.image_path,
            "pred_index": 0,
            "pred_label": "a",
            "score": 0.5,
            "topk_indices": [0],
            "topk_scores": [0.5],
            "model_id": MODEL["model_id"],
            "model_name": "m",
            "device": "cpu",
            "worker": "h:1",
            "shard_id": 0,
            "batch_id": 0,
            "scored_at": now,
            "file_size": e.size,
            "file_mtime_ns": e.mtime_ns,
        }
        for e in scored
    ]
    errs = [
        {
            "run_id": run_id,
            "input_root": str(root),
            "image_path": e.image_path,
            "shard_id": 0,
            "batch_id": 0,
            "stage": "decode",
            "error_type": t,
            "message": f"{t} here",
            "attempt": 1,
            "occurred_at": now,
            "model_id": MODEL["model_id"],
            "model_name": "m",
            "file_size": e.size,
            "file_mtime_ns": e.mtime_ns,
        }
        for e, t in failed
    ]
    for table, rows, schema in (("predictions", preds, PREDICTIONS_SCHEMA), ("errors", errs, ERRORS_SCHEMA)):
        d = part_dir(out, table, "2026-01-01", run_id)
        d.mkdir(parents=True)
        pq.write_table(make_table(rows, schema), d / "part-00000.parquet")
    (out / "runs" / run_id).mkdir(parents=True)
    (out / "runs" / run_id / "manifest.json").write_text(
        json.dumps({"run_id": run_id, "run_date": "2026-01-01", "input": {"root": str(root)}, "model": MODEL})
    )
    if hashes is not None:
        pq.write_table(make_table(hashes, HASHES_SCHEMA), out / "runs" / run_id / HASHES_FILE)


def test_ledger_carries_failures_of_the_bytes_not_of_the_infrastructure(photos, tmp_path):
    """Only failures that say something about the file are carried: a corrupt decode is; a shard
    that could not run, an out-of-memory, an unreadable file and an object read that failed after
    its retries (RETRIED_ERRORS) are retried."""
    root = folder(tmp_path / "images", photos, range(6))
    out = tmp_path / "out"
    e = {x.image_path: x for x in scan_images(root).entries}
    _prior_run(
        out,
        root,
        "r1",
        [e["n_000.jpg"]],
        [
            (e["n_001.jpg"], "DecodeError.corrupt"),
            (e["n_002.jpg"], "ShardFailed"),
            (e["n_003.jpg"], "OutOfMemoryError"),
            (e["n_004.jpg"], "DecodeError.unreadable"),
            (e["n_005.jpg"], "ObjectReadError"),
        ],
    )
    assert set(RETRIED_ERRORS) == {"ShardFailed", "OutOfMemoryError", "DecodeError.unreadable", "ObjectReadError"}
    r = split_already_scored(scan_images(root), out, MODEL)
    assert (r.already_scored, r.already_failed) == (1, 1)
    assert sorted(x.image_path for x in r.index.entries) == ["n_002.jpg", "n_003.jpg", "n_004.jpg", "n_005.jpg"]
    assert r.carried.to_pylist()[0]["image_path"] == "n_001.jpg" and r.carried.to_pylist()[0]["failed_run_id"] == "r1"
    r = split_already_scored(scan_images(root), out, MODEL, retry_failed=True)
    assert (r.already_scored, r.already_failed, len(r.index.entries)) == (1, 0, 5)
    # a later failure of the same bytes is the one listed (newest run first)
    _prior_run(out, root, "r2", [], [(e["n_001.jpg"], "DecodeError.truncated")])
    assert split_already_scored(scan_images(root), out, MODEL).carried["failed_run_id"].to_pylist() == ["r2"]
    # a changed file is tried again
    (root / "n_001.jpg").write_bytes((root / "n_005.jpg").read_bytes())
    r = split_already_scored(scan_images(root), out, MODEL)
    assert r.already_failed == 0 and "n_001.jpg" in {x.image_path for x in r.index.entries}


def test_ledger_by_content_with_sha256(photos, tmp_path):
    """skip_key=sha256: a touched bad file (new mtime, same bytes) is still carried, matched by
    its recorded hash; a file whose bytes changed is tried again."""
    root = folder(tmp_path / "images", photos, range(3))
    (root / "bad.jpg").write_bytes(b"not an image at all")
    out = tmp_path / "out"
    e = {x.image_path: x for x in scan_images(root).entries}
    hashes = [
        {"image_path": p, "size": x.size, "mtime_ns": x.mtime_ns, "sha256": sha256_of_file(root / p)}
        for p, x in e.items()
    ]
    _prior_run(
        out,
        root,
        "r1",
        [e["n_000.jpg"], e["n_001.jpg"], e["n_002.jpg"]],
        [(e["bad.jpg"], "DecodeError.unidentified")],
        hashes,
    )
    st = (root / "bad.jpg").stat()
    os.utime(root / "bad.jpg", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert split_already_scored(scan_images(root), out, MODEL, "stat").already_failed == 0  # stat: touched = changed
    r = split_already_scored(scan_images(root), out, MODEL, "sha256")
    assert (r.already_scored, r.already_failed, r.hashed) == (3, 1, 1)
    assert (
        r.carried["failed_run_id"].to_pylist() == ["r1"] and r.hashes.num_rows == 0
    )  # carried images are not recorded again
    (root / "bad.jpg").write_bytes(b"other bytes, still not an image")
    r = split_already_scored(scan_images(root), out, MODEL, "sha256")
    assert r.already_failed == 0 and [x.image_path for x in r.index.entries] == ["bad.jpg"]
