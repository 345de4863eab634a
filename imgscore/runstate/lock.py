"""One writer per run: a lock file with the owner's pid and host, and stale-lock detection.

``OUT/runs/RUN/.lock`` is created only if absent (:func:`imgscore.io.storage.create_new`: a temp
file hard-linked to the name, atomic on POSIX file systems, NFSv3+ included, and the same promise
an object store's conditional put gives) by whichever process writes the run's part files and
manifest. The flows hold it for their whole body, where
it is visible::

    with run_lock.held(run_dir, "imgscore run"):
        plan = ...; score_all(...); finish_run(...)

A second writer is refused with :class:`~imgscore.errors.RunLockedError` (CLI exit 2)
naming the owner.

A lock is *stale* — and is broken by the next taker — when its owner is on this host and that
process is gone, or its pid now belongs to a process started later (the owner's start time is
recorded and compared through ``psutil``, which reads it on Linux, macOS and Windows alike). A
lock owned by another host cannot be checked from here; it is honoured until it is older than
``REMOTE_STALE_S`` and the message says which file to delete.

Why not ``filelock`` (an ``flock`` that the kernel drops when the owner dies): the lock file
must say who holds it for the refusal message, and ``filelock`` truncates the file each time a
contender tries it; ``flock`` across NFS clients depends on the lock manager, and object stores
have no locks at all, only create-if-absent — which is what this lock is made of.

Temp files (``.NAME.PID.tmp``, from :class:`imgscore.io.file_ops.AtomicWrite`) of a run whose
lock is not live are leftovers of a killed writer: :func:`clean_run_temp_files` removes them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
from upath import UPath

from imgscore.errors import RunLockedError
from imgscore.io import file_ops, storage
from imgscore.io.containment import UnsafePathError, inside
from imgscore.io.parquet import TABLES
from imgscore.io.storage import AnyPath

# A lock file's owner record: pid, host, started_s, purpose, acquired_at, acquired_s ({} when unreadable).
LockRecord = dict[str, Any]

LOCK_NAME = ".lock"
REMOTE_STALE_S = 24 * 3600.0  # a lock held by another host counts as stale after a day


def _start_time(pid: int) -> float | None:
    """When ``pid`` started (seconds since the epoch, psutil), or None when there is no such process."""
    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, OSError):
        return None


def pid_alive(pid: int) -> bool:
    """True when a process with ``pid`` exists on this host."""
    return pid > 0 and psutil.pid_exists(pid)


def lock_path(run_dir: AnyPath) -> UPath:
    """``run_dir/.lock``: the run's lock file (JSON owner record); an object in an object store."""
    return storage.path(run_dir, LOCK_NAME)


def read_lock(run_dir: AnyPath) -> LockRecord | None:
    """The lock's owner record (pid, host, started_s, purpose, acquired_at), or None when unlocked.

    A lock file that cannot be parsed (its writer was killed mid-write) reads as ``{}``: stale.
    """
    try:
        text = file_ops.read_small(lock_path(run_dir))  # never through a link planted as .lock
    except FileNotFoundError:
        return None
    except OSError:  # a symlink or a special file planted as .lock: not a lock (stale; taking it renames it away)
        return {}
    return _parse(text)


def _parse(text: bytes) -> LockRecord:
    """An owner record from a lock file's bytes; ``{}`` when they are no JSON object."""
    try:
        rec = json.loads(text or b"{}")
    except ValueError:
        return {}
    return rec if isinstance(rec, dict) else {}


def is_stale(rec: LockRecord, now: float | None = None) -> bool:
    """Whether the owner recorded in ``rec`` is certainly (same host) or presumably (other host,
    older than ``REMOTE_STALE_S`` seconds) gone."""
    if not rec or "pid" not in rec:
        return True
    if rec.get("host") != socket.gethostname():
        return (now or time.time()) - float(rec.get("acquired_s", 0)) > REMOTE_STALE_S
    pid = int(rec["pid"])
    if not pid_alive(pid):
        return True
    started = rec.get("started_s")  # locks written before psutil was used have none: pid only
    now_started = _start_time(pid)
    return started is not None and now_started is not None and abs(now_started - float(started)) > 1.0


def owner(rec: LockRecord) -> str:
    """The lock's owner in a few words: purpose, pid, host and since when."""
    return (
        f"{rec.get('purpose', 'a writer')} (pid {rec.get('pid')} on {rec.get('host')}, since {rec.get('acquired_at')})"
    )


def advice(rec: LockRecord, run_dir: AnyPath) -> str:
    """What to do about a live lock: wait, or stop the owner. Deleting the lock file is suggested
    only for an owner on another host, whose process this host cannot see (on this host a gone
    owner's lock is taken over by itself)."""
    if rec.get("host") == socket.gethostname():
        return f"wait for it to finish, or stop it (kill {rec.get('pid')})"
    return (
        f"wait for it to finish; if that process is gone, delete {lock_path(run_dir)} (it is taken over after "
        f"{REMOTE_STALE_S // 3600:.0f} h)"
    )


def describe(rec: LockRecord, run_dir: AnyPath) -> str:
    """One line naming the lock's owner and what to do about it (for refusal messages)."""
    return f"{owner(rec)}; {advice(rec, run_dir)}"


def acquire(run_dir: AnyPath, purpose: str) -> LockRecord:
    """Take the run's lock for this process; break it first when it is stale.

    The lock is created only if absent (:func:`imgscore.io.storage.create_new`: a temp file
    hard-linked to ``.lock`` on disk, a PUT with ``If-None-Match: *`` on an object store), so of
    two takers exactly one wins, and the file appears whole.

    Args:
        run_dir: ``OUT/runs/RUN``.
        purpose: what holds it, for the refusal message, e.g. ``"imgscore rerun"``.

    Returns:
        The owner record written to the lock file.

    Raises:
        RunLockedError: a live process (this one included) holds the lock.
    """
    path = lock_path(run_dir)
    rec: LockRecord = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started_s": _start_time(os.getpid()),
        "purpose": purpose,
        "acquired_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "acquired_s": time.time(),
    }
    for _ in range(3):
        if storage.create_new(path, json.dumps(rec).encode()):
            return rec
        held = read_lock(run_dir)
        if held is None:
            continue  # released between our create and read: try again
        if not is_stale(held):
            raise RunLockedError(f"run {storage.name_of(run_dir)} is locked by {describe(held, run_dir)}")
        _break(path, held)
    raise RunLockedError(f"could not take the lock {path} after 3 tries (another process keeps taking it)")


def _break(path: UPath, held: LockRecord) -> None:
    """Remove a stale lock, but only if it is still the one we judged: one that another process
    re-took in between (a live owner's record) is put back (:func:`imgscore.io.file_ops.delete_unless`)."""

    def retaken(data: bytes) -> bool:
        now_held = _parse(data)
        return now_held != held and not is_stale(now_held)

    file_ops.delete_unless(path, retaken)


def release(run_dir: AnyPath) -> bool:
    """Remove the lock if this process owns it; return whether it did."""
    rec = read_lock(run_dir)
    if rec and rec.get("pid") == os.getpid() and rec.get("host") == socket.gethostname():
        storage.delete(lock_path(run_dir))
        return True
    return False


@contextlib.contextmanager
def held(run_dir: AnyPath, purpose: str) -> Iterator[LockRecord]:
    """Hold the run's lock for the ``with`` block: taken on entry, released on exit (an
    exception or Ctrl-C included). Creates ``run_dir``; removes it again when the block leaves
    it empty (a run refused before it wrote anything leaves no trace).

    Raises:
        RunLockedError: a live process holds the lock (the message names it).
    """
    run_dir = storage.path(run_dir)
    storage.make_dirs(run_dir)
    rec = acquire(run_dir, purpose)
    try:
        yield rec
    finally:
        release(run_dir)
        file_ops.remove_empty_folder(run_dir)


def is_locked(run_dir: AnyPath) -> bool:
    """True when a live owner holds the run's lock."""
    rec = read_lock(run_dir)
    return rec is not None and not is_stale(rec)


def clean_run_temp_files(folders: Iterable[AnyPath]) -> int:
    """Delete leftover ``.*.tmp`` names (killed writers) under ``folders``; return how many.

    The folders are derived from the run folder and the run's id and date
    (``imgscore.runstate.commits.run_folders``), never from file lists in the run state. A
    symlink with a temp name is removed itself, not its target, and symlinked folders are not
    entered (:func:`imgscore.io.file_ops.remove_temp_files`). Call it only while holding the
    run's lock, or for runs whose lock is not live: a live writer's temp file must not be
    removed under it.
    """
    return sum(file_ops.remove_temp_files(f) for f in folders)  # 0 for an object store; a missing folder or a link: 0


def clean_abandoned_temp_files(out_root: AnyPath, skip_run: str | None = None) -> int:
    """Remove temp files left by killed writers of any run under ``out_root`` that no live process
    holds (its lock absent or stale); return how many. Runs that are being written are left alone.

    Looks in every run's part-file folders (``OUT/{predictions,errors,errors_history}/run_date=*/RUN_ID/``,
    and ``run_id=RUN_ID/`` folders of the layout before) and in ``OUT/runs/*/``.
    """
    local = storage.local_path(out_root)
    if local is None:
        return 0  # object stores hold no temp files: every write is one PUT
    out: Path = local
    live: dict[str, bool] = {}

    def abandoned(run_id: str) -> bool:
        if run_id == skip_run:
            return False
        if run_id not in live:
            live[run_id] = is_locked(out / "runs" / run_id)
        return not live[run_id]

    def ours(d: Path) -> bool:  # a folder reached through a symlink out of the output root is not cleaned
        try:
            inside(out, d, "folder")
            return True
        except UnsafePathError:
            return False

    folders: list[Path] = []
    for table in TABLES:
        for d in out.glob(f"{table}/run_date=*/*"):  # RUN_ID/, and run_id=RUN_ID/ of the layout before
            if d.is_dir() and abandoned(d.name.removeprefix("run_id=")) and ours(d):
                folders.append(d)
    for d in out.glob("runs/*"):
        if d.is_dir() and abandoned(d.name) and ours(d):
            folders.append(d)
    return clean_run_temp_files(folders)


FOLDER_LOCKS = "_locks"  # under output.root; "_" keeps it out of every reader's glob


def folder_lock_dir(out_root: AnyPath, input_root: AnyPath, model_identity: str) -> UPath:
    """``OUT/_locks/folder-<sha256[:16]>``: the lock folder of one (input folder, model) pair,
    the folder compared by its real path and the model by ``model_identity`` (its config)."""
    blob = json.dumps([storage.resolve(input_root), model_identity])
    return storage.path(out_root, FOLDER_LOCKS, f"folder-{hashlib.sha256(blob.encode()).hexdigest()[:16]}")


@contextlib.contextmanager
def folder_held(out_root: AnyPath, input_root: AnyPath, model_identity: str, purpose: str) -> Iterator[LockRecord]:
    """Hold the lock of (``input_root``, model) for the ``with`` block — ``run.skip_scored`` runs
    only: two incremental runs of one folder with one model at once would each plan before the
    other wrote anything, and both would score every new image.

    Raises:
        RunLockedError: a live run holds it (the message names it and the deployment guard).
    """
    d = folder_lock_dir(out_root, input_root, model_identity)
    with contextlib.ExitStack() as stack:
        try:
            rec = stack.enter_context(held(d, purpose))
        except RunLockedError:
            other = read_lock(d) or {}
            raise RunLockedError(
                f"{input_root} is being scored with this model by {owner(other)}; with run.skip_scored a second run at "
                f"the same time would score the same images again — {advice(other, d)} (a deployment's "
                "concurrency_limit: 1 queues the next run instead)"
            ) from None
        yield rec
