"""Nothing read back from the output root runs code or reaches outside it (docs/security.md).

Output roots are shared: whoever can write there can replace a file, edit run state or plant a
symlink. These tests plant exactly that and check what imgscore does next: a pickle where a
cached task result used to be, manifests and ledger lines that name files outside, symlinks in
place of folders and temp files, index rows that climb out of the input root, and recorded
config keys that would run code on a rerun.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import pyarrow as pa
import pytest

from imgscore.flows.cli import main as cli_main
from imgscore.io.containment import (
    UnsafePathError,
    check_recorded_files,
    check_relative_column,
    inside,
    safe_name,
)
from imgscore.io.file_ops import remove_temp_files
from tests.conftest import base_overrides
from tests.test_rerun import errors, flat_folder, manifest, only_run, predictions, truncate_jpeg

# --------------------------------------------------------------------------------------------
# (a) a pickle where a cached task result used to be


class _OpensMarker:
    """Unpickling this calls ``open(marker, "w")``: the marker file exists iff someone unpickled it."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickle_record(marker: Path, storage_key: Path) -> bytes:
    """A Prefect 3 result record, as Prefect writes one with its default serializer, whose
    result unpickles into ``open(marker, "w")``."""
    blob = base64.encodebytes(pickle.dumps(_OpensMarker(marker))).decode()
    meta = {
        "storage_key": str(storage_key),
        "expiration": None,
        "prefect_version": "3.9.1",
        "storage_block_id": None,
        "serializer": {"type": "pickle", "picklelib": "cloudpickle", "picklelib_version": None},
    }
    return json.dumps({"metadata": meta, "result": blob}).encode()


def _legacy_cache_keys(m: dict) -> list[str]:
    """The file names under OUT/_prefect/results where imgscore's shard results were persisted
    before this release (the old ``shard_cache_key``: run id, rows, fingerprint, model key)."""
    mkey = m["model"]["model_key"]
    return [
        "imgscore-shard-"
        + hashlib.sha256(
            json.dumps([m["run_id"], s["shard_id"], s["start"], s["stop"], s["fingerprint"], mkey]).encode()
        ).hexdigest()
        for s in m["shards"]
    ]


def test_planted_pickle_result_is_never_unpickled_on_a_flow_run_retry(
    prefect_server, photos, tiny_checkpoint, tmp_path, monkeypatch
):
    """Between the two attempts of a flow run, every place a persisted shard result could be read
    from (each file under OUT/_prefect/results, and the names earlier releases used) holds a
    Prefect record that claims the pickle serializer and whose unpickling creates a marker file.
    After the retry the marker does not exist: nothing was unpickled. The shard whose part file
    was also deleted is scored again; the shard whose commit record still matches its part files
    comes back Cached without being scored; the run completes with every image once.

    By construction: the marker can only appear if some code unpickles a planted record (the
    first attempt and the retry run in this process, so Prefect's own reads would create it)."""
    import imgscore.flows.score_images as si
    import imgscore.tasks.plan as plan_tasks
    import imgscore.tasks.score_shard as shard_tasks
    from imgscore.config.loading import load_config
    from imgscore.errors import ShardError

    root = flat_folder(tmp_path / "images", photos, 15, size=48)
    out = tmp_path / "out"
    marker = tmp_path / "UNPICKLED"
    cfg = load_config(
        None, base_overrides(root, tiny_checkpoint, out, **{"run.shard_retries": 0, "run.run_id": "planted"})
    )
    calls: list[int] = []
    real_score, real_resume = shard_tasks.score_shard, plan_tasks.resume_plan

    def flaky(ref, *a, **kw):
        calls.append(ref.shard_id)
        if ref.shard_id == 1 and calls.count(1) == 1:
            raise ShardError("shard 1: DataLoader failed: bus error (simulated)")
        return real_score(ref, *a, **kw)

    def plant_then_resume(*a, **kw):  # a retry's first step (the first attempt finds no manifest)
        if not (out / "runs" / "planted" / "manifest.json").exists():
            return real_resume(*a, **kw)
        m = manifest(out, "planted")
        results = out / "_prefect" / "results"
        results.mkdir(parents=True, exist_ok=True)
        for name in {*_legacy_cache_keys(m), *(p.name for p in results.iterdir())}:
            (results / name).write_bytes(_pickle_record(marker, results / name))
        next((out / "predictions").glob("run_date=*/planted/part-00002.parquet")).unlink()
        return real_resume(*a, **kw)

    monkeypatch.setattr(shard_tasks, "score_shard", flaky)
    monkeypatch.setattr(plan_tasks, "resume_plan", plant_then_resume)
    state = si.score_images.with_options(retries=1, retry_delay_seconds=0)(cfg.to_dict(), return_state=True)

    assert not marker.exists(), "a planted pickle was unpickled"
    assert state.is_completed(), state
    assert sorted(calls) == [
        0,
        1,
        1,
        2,
        2,
    ]  # 0 scored once (Cached on the retry); 1 failed then scored; 2's part was gone
    m = manifest(out, "planted")
    assert m["status"] == "complete" and m["counts"]["scored"] == 15
    paths = predictions(out, "planted")["image_path"].to_pylist()
    assert sorted(paths) == [f"img_{i:03d}.jpg" for i in range(15)]
    assert errors(out, "planted").num_rows == 0


# --------------------------------------------------------------------------------------------
# (b) run state that names paths outside the output root


@pytest.fixture(scope="module")
def finished_run(prefect_server, photos, tiny_checkpoint, tmp_path_factory) -> tuple[Path, Path, str]:
    """A finished run with one failed image (a truncated JPEG in shard 1), so a rerun has work:
    it would clean temp files, archive errors and rewrite shard 1's part files. Returns
    (images, output root, run id); tests copy the output root before they tamper with it."""
    base = tmp_path_factory.mktemp("finished")
    root = flat_folder(base / "images", photos, 12, size=48)
    truncate_jpeg(root / "img_005.jpg")
    out = base / "out"
    sets = base_overrides(root, tiny_checkpoint, out, **{"run.max_error_rate": 0.5})
    assert cli_main(["run", *sum((["--set", s] for s in sets), []), "--quiet"]) == 0
    return root, out, only_run(out)


def _outside(tmp_path: Path) -> tuple[Path, dict[Path, tuple[int, bytes]]]:
    """A folder outside the output root with sentinel files; returns it and their (mtime_ns, bytes)."""
    d = tmp_path / "outside"
    d.mkdir()
    for name in ("sentinel.txt", "part-00001.parquet", ".part-00001.parquet.4242.tmp"):
        (d / name).write_bytes(f"keep {name}".encode())
    return d, _stat(d)


def _stat(d: Path) -> dict[Path, tuple[int, bytes]]:
    """(mtime_ns, bytes) of every file directly in ``d``."""
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(d.iterdir()) if p.is_file()}


def _tamper(out: Path, rid: str, outside: Path, how: str) -> str:
    """Edit the copied run's state; return the entry the refusal must name."""
    run_dir = out / "runs" / rid
    mpath = run_dir / "manifest.json"
    m = json.loads(mpath.read_text())
    part_dir = next((out / "predictions").glob(f"run_date=*/{rid}"))
    if how == "files-relative":
        m["shards"][1]["files"] = ["../../outside/sentinel.txt", m["shards"][1]["files"][1]]
        entry = "shards[1].files[0]"
    elif how == "files-absolute":
        m["shards"][1]["files"][1] = str(outside / "sentinel.txt")
        entry = "shards[1].files[1]"
    elif how == "run-date":
        m["run_date"] = "../../../outside"
        entry = "run_date"
    elif how == "ledger-line":  # a line appended to the ledger: replayed over the summary
        line = {
            "shard_id": 1,
            "state": "partial",
            "images": 5,
            "scored": 4,
            "failed": 1,
            "attempt": 9,
            "files": [str(outside / "part-00001.parquet")],
        }
        (run_dir / "ledger").mkdir(exist_ok=True)
        (run_dir / "ledger" / f"{m['ledger']['from_segment']:06d}.jsonl").write_text(json.dumps(line) + "\n")
        entry = "shards[1].files[0]"
    elif how == "symlinked-part-folder":  # the part folder replaced by a link to a folder outside
        for p in part_dir.iterdir():
            if p.name != "part-00001.parquet":  # the sentinel keeps that name
                shutil.copy(p, outside / p.name)
        shutil.rmtree(part_dir)
        part_dir.symlink_to(outside, target_is_directory=True)
        entry = "run folder"
    elif how == "symlinked-commit-folder":
        shutil.rmtree(run_dir / "shards")
        (run_dir / "shards").symlink_to(outside, target_is_directory=True)
        entry = "run folder"
    mpath.write_text(json.dumps(m))
    return entry


@pytest.mark.parametrize(
    "how",
    ["files-relative", "files-absolute", "run-date", "ledger-line", "symlinked-part-folder", "symlinked-commit-folder"],
)
def test_rerun_refuses_run_state_that_leaves_the_output_root(finished_run, tmp_path, capsys, how):
    """`imgscore rerun` of a run whose state names something outside the output root exits 2
    with one line naming the entry, before it cleans, archives or writes anything: the files in
    the folder outside keep their bytes and mtimes, and the run's own part files are unchanged.

    By construction: without the refusal this rerun has work to do in exactly the folders the
    tampered state points at (shard 1 is partial: clean-up, errors history, new part files)."""
    _, src, rid = finished_run
    out = tmp_path / "out"
    shutil.copytree(src, out, symlinks=True)
    outside, _ = _outside(tmp_path)
    entry = _tamper(out, rid, outside, how)
    before = _stat(outside)
    capsys.readouterr()

    assert cli_main(["rerun", rid, "--set", f"output.root={out}", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and entry in err, err
    assert _stat(outside) == before
    assert not list(outside.glob("part-*attempt*"))  # no errors history written there either
    assert manifest(out, rid)["shards"][1]["state"] == "partial"  # nothing was rescored


def test_a_copied_output_root_still_reruns(finished_run, tmp_path):
    """Recorded part-file paths are absolute paths under the root where the run was written. An
    output root copied elsewhere keeps them; they name the shard's own part files (same
    ``predictions/run_date=…/RUN/part-….parquet`` tail), so the rerun accepts them and works
    on the copy only — the original run is untouched."""
    _, src, rid = finished_run
    out = tmp_path / "moved"
    shutil.copytree(src, out)
    original = _stat(next((src / "errors").glob(f"run_date=*/{rid}")))
    assert str(src) in manifest(out, rid)["shards"][0]["files"][0]
    assert (
        cli_main(["rerun", rid, "--set", f"output.root={out}", "--quiet"]) == 0
    )  # the truncated JPEG still fails, within budget
    assert _stat(next((src / "errors").glob(f"run_date=*/{rid}"))) == original
    assert list((out / "errors_history").glob(f"run_date=*/{rid}/part-00001-attempt-001.parquet"))


def test_rerun_refuses_a_run_id_that_is_not_a_folder_name(finished_run, capsys):
    """The id came from the command line: the refusal says so, and does not blame run state."""
    _, out, _ = finished_run
    for cmd in ("rerun", "report"):
        for bad in ("../..", "../../etc"):
            assert cli_main([cmd, bad, "--set", f"output.root={out}", "--quiet"]) == 2
            err = capsys.readouterr().err
            assert f"RUN_ID {bad!r} is not a run id" in err and "planted" not in err and "edited" not in err


# --------------------------------------------------------------------------------------------
# (c) symlinks planted at temp-file names


def test_cleanup_removes_a_planted_tmp_symlink_not_its_target(finished_run, tmp_path):
    """A symlink named like a killed writer's temp file (`.part-*.tmp`) inside the run's part
    folder, pointing at a file outside: the rerun's clean-up removes the link; the target keeps
    its bytes and mtime. Clean-up finds temp files by walking the run's own folders (derived from
    the run folder and the run's id and date), not by reading file lists from the manifest."""
    _, src, rid = finished_run
    out = tmp_path / "out"
    shutil.copytree(src, out)
    outside, before = _outside(tmp_path)
    link = next((out / "predictions").glob(f"run_date=*/{rid}")) / ".part-00003.parquet.4242.tmp"
    link.symlink_to(outside / "sentinel.txt")
    cli_main(["rerun", rid, "--set", f"output.root={out}", "--quiet"])
    assert not link.is_symlink() and not link.exists()
    assert _stat(outside) == before
    assert manifest(out, rid)["reruns"][-1]["temp_files_removed"] >= 1


def test_abandoned_cleanup_does_not_enter_a_symlinked_folder(tmp_path):
    """`imgscore run` removes other runs' temp files; a run folder that is a symlink out of the
    output root (or sits below one) is not entered, and a temp-named link is removed itself."""
    from imgscore.runstate.lock import clean_abandoned_temp_files

    out = tmp_path / "out"
    outside, before = _outside(tmp_path)
    (out / "predictions" / "run_date=2026-01-01").mkdir(parents=True)
    (out / "predictions" / "run_date=2026-01-02").symlink_to(outside, target_is_directory=True)
    (outside / "run_id=x").mkdir()
    (outside / "run_id=x" / ".part-00000.parquet.1.tmp").write_bytes(b"keep")
    (out / "runs").mkdir()
    (out / "runs" / "linked").symlink_to(outside, target_is_directory=True)
    own = out / "predictions" / "run_date=2026-01-01" / "y"
    own.mkdir()
    (own / ".part-00000.parquet.2.tmp").symlink_to(outside / "sentinel.txt")
    assert clean_abandoned_temp_files(out) == 1
    assert not (own / ".part-00000.parquet.2.tmp").is_symlink()
    assert (outside / "run_id=x" / ".part-00000.parquet.1.tmp").read_bytes() == b"keep"
    assert _stat(outside) == before


@pytest.mark.parametrize("writer", ["table", "bytes", "ledger"])
def test_writers_never_write_through_a_symlink_at_their_temp_name(tmp_path, writer):
    """Part files, manifests and commit records are written to `.NAME.PID.tmp` and renamed; a
    symlink planted at that name (PIDs are easy to guess) is replaced, never written through.
    A ledger segment is created the same way."""
    from imgscore.io.local_files import temp_path
    from imgscore.io.parquet import ERRORS_SCHEMA, write_bytes_atomic, write_table_atomic
    from imgscore.runstate.manifest import ShardResult
    from imgscore.runstate.state import ShardLedger, _segment_path

    outside, before = _outside(tmp_path)
    folder = tmp_path / "out" / "x"
    folder.mkdir(parents=True)
    if writer == "ledger":
        target = _segment_path(folder, 3)
        target.parent.mkdir()
        target.symlink_to(outside / "sentinel.txt")
        ledger = ShardLedger(folder, 3)
        ledger.append(ShardResult(shard_id=0, state="complete"))
        ledger.close()
        assert not target.is_symlink() and b'"shard_id":0' in target.read_bytes()
    else:
        target = folder / "part-00000.parquet"
        temp_path(target).symlink_to(outside / "sentinel.txt")
        if writer == "table":
            write_table_atomic(ERRORS_SCHEMA.empty_table(), target)
        else:
            write_bytes_atomic(b"{}", target)
        assert not target.is_symlink() and not temp_path(target).exists()
    assert _stat(outside) == before


# --------------------------------------------------------------------------------------------
# the containment checks themselves, and other run state read back


def test_containment_checks(tmp_path):
    root = tmp_path / "out"
    (root / "runs").mkdir(parents=True)
    (root / "runs" / "in").symlink_to(root, target_is_directory=True)  # a link that stays inside is fine
    (root / "runs" / "away").symlink_to(tmp_path, target_is_directory=True)
    assert inside(root, root / "runs" / "in" / "x", "f") == root / "runs" / "in" / "x"
    with pytest.raises(UnsafePathError, match=r"thing '.*away/y' resolves to '.*/y', outside"):
        inside(root, root / "runs" / "away" / "y", "thing")
    with pytest.raises(UnsafePathError, match="outside"):
        inside(root, root / ".." / "out2", "thing")
    for bad in ("..", ".", "", "a/b", "a\\b", "x\0", "\x1b[2J"):
        with pytest.raises(UnsafePathError, match="not a plain folder name"):
            safe_name(bad, "run id")
    parts = [root / "predictions" / "run_date=2026-01-01" / "run_id=r" / "part-00003.parquet"]
    check_recorded_files(
        [str(parts[0]), "predictions/run_date=2026-01-01/run_id=r/part-00003.parquet"], parts, root, "f"
    )
    check_recorded_files(
        ["/old/place/predictions/run_date=2026-01-01/run_id=r/part-00003.parquet"], parts, root, "f"
    )  # root moved
    # a relative output.root (make demo's `outputs`): the writer records root/part relative to the cwd
    rel = Path("outputs")
    rel_parts = [rel / "predictions" / "run_date=2026-01-01" / "run_id=r" / "part-00003.parquet"]
    check_recorded_files(
        [str(rel_parts[0]), "predictions/run_date=2026-01-01/run_id=r/part-00003.parquet"], rel_parts, rel, "f"
    )
    check_recorded_files(["elsewhere/" + str(rel_parts[0])], rel_parts, rel, "f")  # run from another working directory
    for bad in (
        "outputs/predictions/run_date=2026-01-01/run_id=r/part-00004.parquet",
        "outputs/../x",
        "../predictions/run_date=2026-01-01/run_id=r/part-00003.parquet",
    ):
        with pytest.raises(UnsafePathError, match=r"f\[0\]"):
            check_recorded_files([bad], rel_parts, rel, "f")
    for bad in (
        "/etc/passwd",
        "../../x",
        "/old/../predictions/run_date=2026-01-01/run_id=r/part-00003.parquet",
        str(root / "predictions" / "run_date=2026-01-01" / "run_id=r" / "part-00004.parquet"),
    ):
        with pytest.raises(UnsafePathError, match=r"f\[0\]"):
            check_recorded_files([bad], parts, root, "f")
    check_relative_column(pa.array([b"a/b.jpg", b"a..b/c.png", b"..x"], pa.binary()), "fs_path")
    for bad in (b"/etc/passwd", b"../x.jpg", b"a/../../x.jpg", b"a/.."):
        with pytest.raises(UnsafePathError, match="row 1"):
            check_relative_column(pa.array([b"ok.jpg", bad], pa.binary()), "fs_path")
    n = tmp_path / "tmps"
    n.mkdir()
    (n / ".a.tmp").write_bytes(b"")
    (n / "sub").symlink_to(tmp_path / "out", target_is_directory=True)
    (tmp_path / "out" / ".b.tmp").write_bytes(b"keep")
    assert remove_temp_files(n) == 1 and (tmp_path / "out" / ".b.tmp").exists()


def test_index_rows_that_leave_the_input_root_are_refused(finished_run, tmp_path):
    """The index is run state: a row whose fs_path is absolute or climbs out with `..` makes
    reading that shard refuse (exit 2) instead of opening a file outside the input root."""
    import pyarrow.parquet as pq

    from imgscore.runstate.index import read_shard_table

    _, src, rid = finished_run
    run_dir = tmp_path / "run"
    shutil.copytree(src / "runs" / rid, run_dir)
    f = run_dir / "index.parquet" / "part-00000.parquet"
    t = pq.read_table(f)
    fs = t["fs_path"].to_pylist()
    fs[1] = b"../../../etc/passwd"
    pq.write_table(
        t.set_column(t.schema.get_field_index("fs_path"), "fs_path", pa.array(fs, pa.binary())), f, row_group_size=5
    )
    assert (
        read_shard_table(run_dir, "index.parquet/part-00000.parquet", 1).num_rows == 5
    )  # the other shards read as before
    with pytest.raises(UnsafePathError, match="row 1: '../../../etc/passwd'"):
        read_shard_table(run_dir, "index.parquet/part-00000.parquet", 0)
    with pytest.raises(UnsafePathError, match="index file"):
        read_shard_table(run_dir, "../../x.parquet", 0)


def test_a_retry_refuses_a_manifest_that_names_another_input_root(finished_run, tmp_path):
    """A retried flow run reads its plan back from the output root; its own parameters are the
    flow run's. A manifest whose input.root was changed is refused, not scored from there."""
    from imgscore.runstate.resume import resume_plan

    root, src, rid = finished_run
    out = tmp_path / "out"
    shutil.copytree(src, out)
    m = json.loads((out / "runs" / rid / "manifest.json").read_text())
    m["flow_run_id"] = "fr-1"
    (out / "runs" / rid / "manifest.json").write_text(json.dumps(m))
    assert resume_plan(out, rid, "fr-1", root).run_id == rid
    m["input"]["root"] = str(tmp_path)
    (out / "runs" / rid / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UnsafePathError, match="input.root"):
        resume_plan(out, rid, "fr-1", root)


@pytest.mark.parametrize(
    ("key", "value", "flag"),
    [
        ("model.factory", "os:getcwd", "model.factory=os:getcwd"),
        ("model.trust_checkpoint", True, "model.trust_checkpoint=true"),
        ("runner.address", "tcp://10.0.0.9:8786", "runner.address=tcp://10.0.0.9:8786"),
        ("inference.cache_dir", "/tmp/elsewhere", "inference.cache_dir=/tmp/elsewhere"),
    ],
)
def test_rerun_takes_code_running_keys_from_the_manifest_only_when_repeated(key, value, flag):
    """A rerun's config is the one recorded in the manifest, which is read back from the output
    root. A recorded value that would run code or send the run elsewhere is refused (exit 2,
    naming the key and the flag that confirms it) unless the command line repeats it."""
    from imgscore.config.rerun import rerun_config
    from imgscore.config.schema import Config
    from imgscore.errors import ConfigError

    recorded = Config().to_dict()
    section, name = key.split(".")
    recorded[section][name] = value
    recorded["run"]["run_id"] = "r1"
    with pytest.raises(ConfigError, match=rf"run r1 recorded {key} = .*--set {flag}"):
        rerun_config(recorded, None, ["output.root=/tmp/o"])
    cfg = rerun_config(recorded, None, ["output.root=/tmp/o", flag])
    assert str(getattr(getattr(cfg, section), name)) == str(value)
    if key.startswith("model."):  # still not a way to change them
        other = "model.factory=os:getpid" if key == "model.factory" else "model.trust_checkpoint=false"
        with pytest.raises(ConfigError, match="a rerun keeps the run's recorded config"):
            rerun_config(recorded, None, ["output.root=/tmp/o", other])


def test_run_id_in_the_config_must_be_a_folder_name():
    from imgscore.config.loading import load_config
    from imgscore.errors import ConfigError

    with pytest.raises(ConfigError, match=r"run.run_id '../x' must be one folder name"):
        load_config(None, ["run.run_id=../x"])
    assert os.sep not in load_config(None, ["run.run_id=nightly-2026"]).run.run_id


@pytest.mark.parametrize(
    ("url", "secret", "named"),
    [
        ("https://bob:hunter2-SECRET@127.0.0.1:9/m.pt", "hunter2-SECRET", "user name or password"),
        ("https://ghp_TOKEN-SECRET@raw.example.com/m.pt", "ghp_TOKEN-SECRET", "user name or password"),
        ("https://h.example/m.pt?X-Amz-Credential=AKIA&X-Amz-Signature=SIG-SECRET", "SIG-SECRET", "X-Amz-"),
        ("https://acct.blob.core.windows.net/c/m.pt?sv=2024&sig=SAS-SECRET", "SAS-SECRET", "'sig'"),
    ],
)
def test_a_credential_in_a_checkpoint_url_is_refused_without_echoing_it(tmp_path, url, secret, named, capsys):
    """A presigned, SAS or user:password URL in model.checkpoint would be recorded in the manifest,
    every part file's metadata and the flow run's parameters: refused before anything runs (exit 2,
    one line naming what is a credential), and the value itself is printed nowhere."""
    out = tmp_path / "out"
    argv = ["run", "--set", f"input.root={tmp_path}", "--set", f"output.root={out}", "--set", f"model.checkpoint={url}"]
    assert cli_main(argv) == 2
    printed = capsys.readouterr()
    (line,) = [ln for ln in printed.err.splitlines() if ln.strip()]
    assert "model.checkpoint" in line and "holds a credential" in line and named in line, line
    assert secret not in printed.out + printed.err and not out.exists()
