"""Run state (imgscore.runstate.manifest): the typed manifest, the one place a result is applied,
the ledger between summaries, old manifests, and the run lock as a context manager."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
from pydantic import ValidationError

from imgscore.errors import RunLockedError
from imgscore.runstate import lock as run_lock
from imgscore.runstate.manifest import Counts, Manifest, ShardRecord, ShardResult
from imgscore.runstate.state import RunState, ledger_segments, load_manifest


def new_manifest(n: int = 6, size: int = 10) -> Manifest:
    shards = [
        ShardRecord(shard_id=i, start=i * size, stop=(i + 1) * size, images=size, fingerprint=f"fp{i}")
        for i in range(n)
    ]
    return Manifest(
        run_id="r1", run_date="2026-01-01", counts=Counts(scanned=n * size, pending=n * size), shards=shards
    )


def result(sid: int, state: str = "complete", scored: int = 10, failed: int = 0, attempt: int = 1, **kw) -> ShardResult:
    return ShardResult(
        shard_id=sid,
        state=state,
        images=10,
        scored=scored,
        failed=failed,
        attempt=attempt,
        fingerprint=f"fp{sid}",
        **kw,
    )


def test_apply_keeps_counts_equal_to_a_recount():
    """Counts change by each record's difference: after any sequence of results they equal a
    full recount (by construction of both from the same per-record contribution)."""
    rng = random.Random(0)
    m = new_manifest(8)
    for _ in range(200):
        sid = rng.randrange(8)
        state = rng.choice(["complete", "partial", "failed"])
        scored = {"complete": 10, "partial": rng.randrange(10), "failed": 0}[state]
        failed = 10 - scored
        m.apply(result(sid, state, scored, failed, attempt=rng.randrange(1, 4)))
        incremental = m.counts.model_dump()
        assert incremental == m.model_copy(deep=True).recount().counts.model_dump()
    assert m.counts.scored + m.counts.failed + m.counts.pending == m.counts.scanned


def test_attempts_never_go_down_and_old_names_load():
    m = new_manifest(2)
    m.apply(result(0, "partial", 9, 1, attempt=3))
    m.apply(result(0, "partial", 9, 1, attempt=2))  # a replay of an older result
    assert m.shards[0].attempts == 3
    old_entry = {
        "shard_id": 0,
        "start": 0,
        "stop": 5,
        "images": 5,
        "fingerprint": "x",
        "state": "complete",
        "attempt": 2,
        "scored": 5,
        "failed": 0,
    }
    assert ShardRecord.model_validate(old_entry).attempts == 2
    with pytest.raises(ValidationError):
        ShardRecord.model_validate({**old_entry, "state": "done"})  # states are one Literal
    with pytest.raises(ValidationError):
        Manifest(run_id="r", status="finished")


def test_commits_go_to_the_ledger_not_the_summary(tmp_path):
    """A commit appends one ledger line and leaves manifest.json alone until compaction is due;
    readers see summary + ledger, so nothing is lost in between."""
    state = RunState(tmp_path, new_manifest(), compact_every_s=3600)
    state.save()
    summary = (tmp_path / "manifest.json").read_bytes()
    for sid in range(4):
        state.commit(result(sid))
    assert (tmp_path / "manifest.json").read_bytes() == summary
    seen = load_manifest(tmp_path)
    assert [s.state for s in seen.shards] == ["complete"] * 4 + ["pending"] * 2
    assert seen.counts.scored == 40 and seen.counts.pending == 20
    state.close()  # compacts: the summary holds everything, the folded segments are gone
    raw = json.loads((tmp_path / "manifest.json").read_text())
    assert [s["state"] for s in raw["shards"]][:4] == ["complete"] * 4 and raw["counts"]["scored"] == 40
    assert ledger_segments(tmp_path, raw["ledger"]["from_segment"]) == [] and ledger_segments(tmp_path) == []


def test_compaction_is_time_based(tmp_path):
    state = RunState(tmp_path, new_manifest(), compact_every_s=0.0)
    state.save()
    state.commit(result(0))
    raw = json.loads((tmp_path / "manifest.json").read_text())
    assert raw["shards"][0]["state"] == "complete"  # due at once: folded into the summary


def test_a_torn_last_line_and_a_killed_writer(tmp_path):
    """A writer killed mid-append leaves a line without its newline: readers skip it. The next
    writer (a rerun) starts a segment of its own and replays the old one."""
    state = RunState(tmp_path, new_manifest(), compact_every_s=3600)
    state.save()
    state.commit(result(0))
    state.commit(result(1, "partial", 8, 2, failed_images=["a.jpg", "b.jpg"]))
    seg = tmp_path / "ledger" / f"{ledger_segments(tmp_path)[-1]:06d}.jsonl"
    with open(seg, "ab") as f:
        f.write(b'{"shard_id": 2, "state": "compl')  # torn
    m = load_manifest(tmp_path)
    assert [s.state for s in m.shards[:3]] == ["complete", "partial", "pending"]
    assert m.shards[1].failed_images == ["a.jpg", "b.jpg"]
    nxt = RunState.open(tmp_path)
    assert nxt.ledger.segment > ledger_segments(tmp_path)[-1]
    nxt.commit(result(2))
    nxt.close()
    assert [s.state for s in load_manifest(tmp_path).shards[:3]] == ["complete", "partial", "complete"]


def test_a_manifest_of_the_previous_version_loads(tmp_path):
    """manifest.json as the version before the ledger wrote it (one file per run, rewritten per
    shard; 'attempts' in entries; no ledger, no format_version)."""
    old = {
        "run_id": "old",
        "run_date": "2026-01-01",
        "flow_run_id": None,
        "status": "partial",
        "created_at": "2026-01-01T00:00:00+00:00",
        "updated_at": "2026-01-01T00:00:00+00:00",
        "input": {"root": "/data", "layout": "flat", "classes": []},
        "counts": {"scanned": 10, "scored": 9, "failed": 1, "skipped": 0, "already_scored": 0, "pending": 0},
        "skipped": [],
        "model": {"model_id": "m"},
        "config": {},
        "incremental": {"skip_scored": False},
        "index": {"file": "index.parquet", "fingerprint": "f", "images": 10, "shard_size": 5},
        "shards": [
            {
                "shard_id": 0,
                "start": 0,
                "stop": 5,
                "images": 5,
                "fingerprint": "a",
                "state": "complete",
                "attempts": 1,
                "scored": 5,
                "failed": 0,
                "files": [],
                "failed_images": [],
                "device": "cpu",
                "worker": "h:1",
                "seconds": 0.5,
                "warnings": {},
                "reason": None,
            },
            {
                "shard_id": 1,
                "start": 5,
                "stop": 10,
                "images": 5,
                "fingerprint": "b",
                "state": "partial",
                "attempts": 2,
                "scored": 4,
                "failed": 1,
                "files": [],
                "failed_images": ["x.jpg"],
                "device": "cpu",
                "worker": "h:1",
                "seconds": 0.5,
                "warnings": {"w": 1},
                "reason": None,
            },
        ],
        "outputs": {"predictions": "p", "errors": "e"},
        "timings": {"planned_at_s": 1.0},
        "reruns": [{"shards": []}],
        "extra_key": 1,
    }
    (tmp_path / "manifest.json").write_text(json.dumps(old))
    m = load_manifest(tmp_path)
    assert m.shards[1].attempts == 2 and m.counts.failed == 1 and m.reruns == [{"shards": []}]
    from imgscore.runstate.index import shard_location

    assert shard_location(m.index, 1) == ("index.parquet", 1)  # the single-file index of that version
    assert m.to_dict()["extra_key"] == 1  # unknown keys survive a rewrite


def test_lock_held_releases_on_error_and_removes_an_empty_run_folder(tmp_path):
    run_dir = tmp_path / "runs" / "r1"
    with pytest.raises(ValueError), run_lock.held(run_dir, "imgscore run"):
        assert run_lock.read_lock(run_dir)["pid"] == os.getpid()
        with pytest.raises(RunLockedError, match=r"locked by imgscore run \(pid \d+"):
            run_lock.acquire(run_dir, "imgscore rerun")
        raise ValueError("planning failed")
    assert not run_dir.exists()  # refused before anything was written: no trace
    with run_lock.held(run_dir, "imgscore run"):
        (run_dir / "manifest.json").write_text("{}")
    assert run_dir.is_dir() and run_lock.read_lock(run_dir) is None


def test_a_reused_pid_does_not_keep_a_lock_alive(tmp_path):
    """The lock records its owner's start time (psutil); a live process with the same pid but
    a later start is another process, so the lock is stale."""
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        rec = {"pid": p.pid, "host": os.uname().nodename, "purpose": "imgscore run", "started_s": 1.0, "acquired_s": 0}
        assert run_lock.is_stale(rec)
        assert not run_lock.is_stale({**rec, "started_s": run_lock._start_time(p.pid)})
    finally:
        p.kill()
        p.wait()


@pytest.mark.parametrize(
    "content", [b'{"run_id": ', b"\x80\x04\x95\x0b\x00\x00\x00\x00\x00\x00\x00}\x94\x8c\x01a\x94K\x01s.", b"[1, 2]"]
)
def test_a_damaged_manifest_is_one_line_naming_the_file_and_exit_2(content, tmp_path, capsys):
    """A truncated manifest, pickle bytes, JSON that is not a manifest: ``imgscore rerun`` and
    ``imgscore report`` exit 2 with one line naming the file — not pydantic's multi-line text."""
    from imgscore.errors import RunStateError
    from imgscore.flows.cli import main as cli_main

    run_dir = tmp_path / "out" / "runs" / "r1"
    run_dir.mkdir(parents=True)
    (run_dir / "manifest.json").write_bytes(content)
    with pytest.raises(RunStateError, match="manifest.json is not a readable imgscore manifest"):
        load_manifest(run_dir)
    for cmd in ("rerun", "report"):
        capsys.readouterr()
        assert cli_main([cmd, "r1", "--set", f"output.root={tmp_path / 'out'}"]) == 2
        lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
        assert len(lines) == 1 and str(run_dir / "manifest.json") in lines[0] and "pydantic" not in lines[0], lines


def test_a_lock_refusal_suggests_deleting_the_file_only_for_an_owner_on_another_host(tmp_path):
    """On this host a live owner is to be waited for or stopped (its lock is taken over by itself
    once it is gone); only a lock from another host, whose process cannot be seen from here,
    comes with the file to delete."""
    import socket

    here = {"pid": os.getpid(), "host": socket.gethostname(), "purpose": "imgscore run", "acquired_at": "t"}
    there = {**here, "host": "elsewhere.example"}
    assert "delete" not in run_lock.describe(here, tmp_path) and f"kill {os.getpid()}" in run_lock.describe(
        here, tmp_path
    )
    assert f"delete {run_lock.lock_path(tmp_path)}" in run_lock.describe(there, tmp_path)
    assert run_lock.describe(here, tmp_path).count("wait for it to finish") == 1
