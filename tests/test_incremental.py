"""Incremental nightly runs (``run.skip_scored``): only new or changed images are scored."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from imgscore.flows.cli import main as cli_main
from imgscore.images.scan import scan_images
from imgscore.runstate.already_scored import split_already_scored
from imgscore.runstate.incremental import decode_settings, model_key, recorded_model
from imgscore.runstate.lock import clean_abandoned_temp_files
from tests.conftest import base_overrides, make_variants


def folder(root: Path, photos: dict, names: range, size: int = 48) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    keys = sorted(photos)
    for i in names:
        make_variants(photos[keys[i % len(keys)]], i // len(keys) + 1, size=size)[-1].save(
            root / f"n_{i:03d}.jpg", quality=85
        )
    return root


def nightly(root: Path, ckpt: Path, out: Path, **extra) -> dict:
    sets = base_overrides(root, ckpt, out, **{"run.skip_scored": "true", "run.shard_size": 8, **extra})
    before = {p.name for p in (out / "runs").glob("*")} if (out / "runs").exists() else set()
    assert cli_main(["run", *sum((["--set", s] for s in sets), []), "--quiet"]) == 0
    (rid,) = {p.name for p in (out / "runs").glob("*")} - before
    return json.loads((out / "runs" / rid / "manifest.json").read_text())


def run_rows(out: Path, run_id: str) -> list[str]:
    d = list((out / "predictions").glob(f"run_date=*/{run_id}"))
    return ds.dataset(d[0], format="parquet").to_table(columns=["image_path"])["image_path"].to_pylist() if d else []


def test_nightly_twice_then_ten_new_images_scores_exactly_ten(prefect_server, photos, tiny_checkpoint, tmp_path):
    root = folder(tmp_path / "images", photos, range(30))
    out = tmp_path / "out"
    m1 = nightly(root, tiny_checkpoint, out)
    assert (m1["counts"]["scored"], m1["counts"]["already_scored"]) == (30, 0)
    m2 = nightly(root, tiny_checkpoint, out)
    assert (m2["counts"]["scored"], m2["counts"]["already_scored"]) == (0, 30)
    assert m2["shards"] == [] and m2["status"] == "complete" and m2["incremental"]["prior_runs"] == [m1["run_id"]]
    folder(root, photos, range(30, 40))
    m3 = nightly(root, tiny_checkpoint, out)
    assert (m3["counts"]["scored"], m3["counts"]["already_scored"]) == (10, 30)
    assert sorted(run_rows(out, m3["run_id"])) == [f"n_{i:03d}.jpg" for i in range(30, 40)]
    # a changed image is scored again; a changed checkpoint rescores everything
    make_variants(photos["rocket"], 1, size=56)[0].save(root / "n_000.jpg", quality=70)
    m4 = nightly(root, tiny_checkpoint, out)
    assert run_rows(out, m4["run_id"]) == ["n_000.jpg"] and m4["counts"]["already_scored"] == 39
    other_ckpt = tmp_path / "other.pt"
    other_ckpt.write_bytes(tiny_checkpoint.read_bytes() + b"")  # same weights, but a copy…
    import torch

    sd = torch.load(tiny_checkpoint)
    sd[next(iter(sd))] = sd[next(iter(sd))] * 1.01  # …with one tensor changed: another model_id
    torch.save(sd, other_ckpt)
    m5 = nightly(root, other_ckpt, out)
    assert (m5["counts"]["scored"], m5["counts"]["already_scored"]) == (40, 0)
    assert m5["model"]["model_id"] != m1["model"]["model_id"]


def _fake_prior_run(
    out: Path, root: Path, index, model_info: dict, run_id: str = "r0", failed: set[str] = frozenset()
) -> None:
    """An earlier run as the flow leaves it: a manifest and one predictions part file."""
    import pyarrow.parquet as pq

    from imgscore.io.parquet import PREDICTIONS_SCHEMA, make_table, part_dir

    rows = [
        {
            "run_id": run_id,
            "image_path": e.image_path,
            "label": None,
            "label_name": None,
            "pred_index": 0,
            "pred_label": "a",
            "score": 0.5,
            "topk_indices": [0],
            "topk_scores": [0.5],
            "model_id": model_info["model_id"],
            "model_name": "m",
            "device": "cpu",
            "worker": "h:1",
            "shard_id": 0,
            "batch_id": 0,
            "scored_at": __import__("datetime").datetime.now(__import__("datetime").UTC),
            "file_size": e.size,
            "file_mtime_ns": e.mtime_ns,
        }
        for e in index.entries
        if e.image_path not in failed
    ]
    d = part_dir(out, "predictions", "2026-01-01", run_id)
    d.mkdir(parents=True)
    pq.write_table(make_table(rows, PREDICTIONS_SCHEMA), d / "part-00000.parquet")
    (out / "runs" / run_id).mkdir(parents=True)
    (out / "runs" / run_id / "manifest.json").write_text(
        json.dumps({"run_id": run_id, "run_date": "2026-01-01", "input": {"root": str(root)}, "model": model_info})
    )


MODEL = {"model_id": "a" * 64, "preprocess": {"resize": 256, "crop": 224}}


def test_skip_keys_stat_and_sha256(photos, tmp_path):
    root = folder(tmp_path / "images", photos, range(6))
    out = tmp_path / "out"
    idx = scan_images(root)
    _fake_prior_run(out, root, idx, MODEL, failed={"n_005.jpg"})
    # nothing changed: all but the failed one are skipped (errors are never "scored")
    r = split_already_scored(scan_images(root), out, MODEL, "stat")
    assert [e.image_path for e in r.index.entries] == ["n_005.jpg"] and r.already_scored == 5 and r.prior_runs == ["r0"]
    # other preprocessing, other model, other input folder: nothing is skipped
    assert (
        split_already_scored(
            scan_images(root), out, {**MODEL, "preprocess": {"resize": 300, "crop": 224}}
        ).already_scored
        == 0
    )
    assert split_already_scored(scan_images(root), out, {**MODEL, "model_id": "b" * 64}).already_scored == 0
    os.symlink(root, tmp_path / "same")  # the same folder by another path still matches
    assert split_already_scored(scan_images(tmp_path / "same"), out, MODEL).already_scored == 5
    # touch one file (same bytes, new mtime): stat rescans it, sha256 needs its hash on record
    st = (root / "n_001.jpg").stat()
    os.utime(root / "n_001.jpg", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert {e.image_path for e in split_already_scored(scan_images(root), out, MODEL, "stat").index.entries} == {
        "n_001.jpg",
        "n_005.jpg",
    }
    # a sha256-mode run records the hashes of what it scores; the next one matches by content
    r = split_already_scored(idx, tmp_path / "empty", MODEL, "sha256")
    assert r.hashes.num_rows == 6 and r.hashed == 6
    out2 = tmp_path / "out2"
    _fake_prior_run(out2, root, idx, MODEL)
    r.hashes.to_pandas()  # readable
    import pyarrow.parquet as pq

    pq.write_table(r.hashes, out2 / "runs" / "r0" / "content_hashes.parquet")
    r2 = split_already_scored(scan_images(root), out2, MODEL, "sha256")
    assert r2.already_scored == 6 and r2.hashed == 1  # only the touched file was read
    (root / "n_001.jpg").write_bytes(
        (root / "n_003.jpg").read_bytes()
    )  # new content (n_002 is the same photo: skimage cat is chelsea)
    r3 = split_already_scored(scan_images(root), out2, MODEL, "sha256")
    assert [e.image_path for e in r3.index.entries] == ["n_001.jpg"]
    assert r3.hashes["image_path"].to_pylist() == ["n_001.jpg"]


def test_corrupt_prior_part_counts_as_not_scored(photos, tmp_path):
    root = folder(tmp_path / "images", photos, range(4))
    out = tmp_path / "out"
    idx = scan_images(root)
    _fake_prior_run(out, root, idx, MODEL, run_id="r0")
    _fake_prior_run(out, root, scan_images(root), MODEL, run_id="r1", failed={"n_000.jpg", "n_001.jpg"})
    assert split_already_scored(scan_images(root), out, MODEL).already_scored == 4
    p = next((out / "predictions").glob("run_date=*/r0/part-00000.parquet"))
    p.write_bytes(p.read_bytes()[:100])  # r0 truncated: only r1's two rows count
    r = split_already_scored(scan_images(root), out, MODEL)
    assert r.already_scored == 2 and sorted(e.image_path for e in r.index.entries) == ["n_000.jpg", "n_001.jpg"]


def test_abandoned_temp_files_are_cleaned_but_live_runs_left_alone(tmp_path):
    from imgscore.runstate import lock

    out = tmp_path / "out"
    dead = out / "predictions" / "run_date=2026-01-01" / "dead"
    live = out / "predictions" / "run_date=2026-01-01" / "live"
    for d in (dead, live, out / "runs" / "dead", out / "runs" / "live"):
        d.mkdir(parents=True)
    (dead / ".part-00000.parquet.123.tmp").write_bytes(b"x")
    (live / ".part-00000.parquet.456.tmp").write_bytes(b"x")
    lock.acquire(out / "runs" / "live", "imgscore run")
    try:
        assert clean_abandoned_temp_files(out) == 1
        assert not (dead / ".part-00000.parquet.123.tmp").exists() and (live / ".part-00000.parquet.456.tmp").exists()
    finally:
        lock.release(out / "runs" / "live")


def test_model_key_depends_on_model_preprocessing_and_decode_settings_only():
    """The key changes with what a prediction row depends on (model_id, class names,
    preprocessing, the input.* decode settings) and nothing else; a manifest of an older version,
    without ``decode``, counts with the decode settings of its recorded config (defaults for keys it lacks)."""
    assert model_key(MODEL) == model_key({**MODEL, "arch": "x", "source": "torchscript"})
    assert model_key({**MODEL, "classes": ["cat", "dog"]}) != model_key({**MODEL, "classes": ["cat", "hound"]})
    assert model_key(MODEL) != model_key({**MODEL, "preprocess": {"resize": 256, "crop": 192}})
    default = decode_settings(None)
    assert set(default) == {"max_pixels", "exif_orientation", "max_metadata_bytes"}
    assert model_key(MODEL) == model_key({**MODEL, "decode": default})
    assert model_key(MODEL) != model_key({**MODEL, "decode": {**default, "max_pixels": 5000}})
    assert model_key(MODEL) != model_key({**MODEL, "decode": {**default, "exif_orientation": False}})
    assert model_key(MODEL) != model_key({**MODEL, "decode": {**default, "max_metadata_bytes": 2**20}})
    old = {"model": MODEL, "config": {"input": {"root": "/x", "max_pixels": 5000}}}
    assert recorded_model(old)["decode"] == {**default, "max_pixels": 5000}
    assert model_key(recorded_model({"model": MODEL})) == model_key(MODEL)


def test_a_changed_decode_setting_rescores_and_retries(prefect_server, photos, tiny_checkpoint, tmp_path):
    """Images refused because of input.max_pixels are retried, and scored, once the setting is
    raised (they are not carried by the failure ledger); changing input.exif_orientation scores
    every image again; the same settings again skip them all. By construction: 48x48 images are
    2304 pixels, so input.max_pixels=100 refuses every one and the default accepts every one."""
    root = folder(tmp_path / "images", photos, range(3))
    out = tmp_path / "out"
    m1 = nightly(root, tiny_checkpoint, out, **{"input.max_pixels": 100})
    assert (m1["counts"]["scored"], m1["counts"]["failed"]) == (0, 3)
    m2 = nightly(root, tiny_checkpoint, out)
    assert (m2["counts"]["scored"], m2["counts"]["already_failed"], m2["counts"]["already_scored"]) == (3, 0, 0)
    m3 = nightly(root, tiny_checkpoint, out, **{"input.exif_orientation": "false"})
    assert (m3["counts"]["scored"], m3["counts"]["already_scored"]) == (3, 0)
    m4 = nightly(root, tiny_checkpoint, out, **{"input.exif_orientation": "false"})
    assert (m4["counts"]["scored"], m4["counts"]["already_scored"]) == (0, 3) and m4["incremental"]["prior_runs"] == [
        m3["run_id"]
    ]
    assert m1["model"]["decode"]["max_pixels"] == 100 and m4["model"]["decode"]["exif_orientation"] is False


@pytest.mark.parametrize("key", ["stat", "sha256"])
def test_unknown_or_valid_skip_key(key, photos, tmp_path):
    root = folder(tmp_path / "images", photos, range(2))
    assert split_already_scored(scan_images(root), tmp_path / "o", MODEL, key).already_scored == 0
    with pytest.raises(ValueError, match="stat or sha256"):
        split_already_scored(scan_images(root), tmp_path / "o", MODEL, "md5")


@pytest.mark.slow
def test_a_second_incremental_run_on_the_same_folder_is_refused_while_the_first_plans_and_scores(
    prefect_server, photos, tiny_checkpoint, tmp_path, capsys
):
    """Two skip_scored runs at once on one folder with one model would each plan before the other
    wrote anything and both score everything. The first holds the (folder, model) lock for its
    whole run — here held by another live process exactly as the flow takes it — so the second
    exits 2 naming it and writes no run; another folder, or the same folder once the holder is
    gone, runs."""
    import subprocess
    import sys

    from imgscore.config.loading import build_config
    from imgscore.flows.score_images import scoring_identity

    root = folder(tmp_path / "images", photos, range(6))
    other_root = folder(tmp_path / "other", photos, range(3))
    out = tmp_path / "out"
    sets = base_overrides(root, tiny_checkpoint, out, **{"run.skip_scored": "true"})
    cfg = build_config({}, sets)
    holder = (
        "import sys, time; from imgscore.runstate import lock; "
        f"cm = lock.folder_held({str(out)!r}, {str(root)!r}, sys.argv[1], 'imgscore run first-night'); cm.__enter__(); "
        "print('held', flush=True); time.sleep(120)"
    )
    identity = scoring_identity(cfg)
    other = subprocess.Popen([sys.executable, "-c", holder, identity], stdout=subprocess.PIPE)
    try:
        assert other.stdout.readline().strip() == b"held"
        capsys.readouterr()
        assert cli_main(["run", *sum((["--set", s] for s in sets), []), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"{root} is being scored with this model by imgscore run first-night (pid {other.pid}" in err
        assert "concurrency_limit: 1" in err
        assert (
            err.count("wait for it to finish") == 1 and f"kill {other.pid}" in err and "delete" not in err
        )  # a live owner here
        assert not list((out / "runs").glob("*/manifest.json")) if (out / "runs").exists() else True
        assert nightly(other_root, tiny_checkpoint, out)["counts"]["scored"] == 3  # another folder is not held
    finally:
        other.kill()
        other.wait()
    assert nightly(root, tiny_checkpoint, out)["counts"]["scored"] == 6  # the holder is gone: stale, taken over
