"""Several models, one decode (``models:``): each image decoded once, every model scores it.

Two tiny models with different preprocessing (mobilenet_v3_small at the default 256/224 and a
resnet18 with its own ``transform``) score a real photo folder in one run, and each alone in its
own run; the answers must agree, rows carry ``model_name``/``model_id``, counts are in (image,
model) pairs, and one part file per shard holds both models' rows.
"""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import duckdb
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch
import torchvision
from rich.console import Console

from imgscore.config.loading import build_config
from imgscore.errors import ConfigError
from imgscore.flows.cli import execute
from imgscore.images import dataset as dataset_mod
from imgscore.images.dataset import ShardDataset, collate_per_transform, decode_spec
from imgscore.images.preprocess import DecodeOptions, PreprocessSpec
from imgscore.images.scan import scan_images
from imgscore.io.parquet import ERRORS_SCHEMA, PREDICTIONS_SCHEMA
from imgscore.runstate.state import load_manifest
from tests.conftest import assert_same_answers, doc_section, make_image_folder

ATOL = 1e-4  # the same tensors through the same module: only batch composition differs


def test_models_config_names_and_refusals():
    """``models`` takes model blocks with distinct names; ``model``'s name defaults to its arch."""
    cfg = build_config({"models": [{"name": "prod", "arch": "resnet18"}, {"arch": "mobilenet_v3_small"}]})
    assert [m.resolved_name for m in cfg.scored_models()] == ["prod", "mobilenet_v3_small"]
    assert [m.resolved_name for m in build_config({}).scored_models()] == ["resnet50"]
    assert build_config({"model": {"factory": "pkg.mod:build_net"}}).model.resolved_name == "build_net"
    with pytest.raises(ConfigError, match="the name 'resnet18' is used by 2 models"):
        build_config({"models": [{"arch": "resnet18"}, {"arch": "resnet18", "checkpoint": "/m/b.pt"}]})
    with pytest.raises(ConfigError, match="both model and models are set"):
        build_config({"model": {"arch": "resnet18"}, "models": [{"arch": "resnet50"}]})
    with pytest.raises(ConfigError, match="models is empty"):
        build_config({"models": []})
    with pytest.raises(ConfigError, match="must be one word"):
        build_config({"models": [{"name": "a/b"}]})
    cfg = build_config(
        {"preprocess": {"jpeg_draft": False}, "models": [{"name": "x", "transform": {"resize": 160, "crop": 128}}]}
    )
    pre = cfg.preprocess_for(cfg.models[0])
    assert (pre.resize, pre.crop, pre.jpeg_draft) == (160, 128, False)


def test_each_image_is_decoded_once_for_every_transform(tmp_path, photos, monkeypatch):
    """Two transforms with the same decode settings: one ``decode_file`` call per image (counted
    on the real function), drafted for the larger resize, and each transform's tensor is exactly
    what that transform alone gives on the same decoded image."""
    root = make_image_folder(tmp_path / "images", photos, per_class=2)
    entries = scan_images(root).entries
    a, b = PreprocessSpec(resize=64, crop=56), PreprocessSpec(resize=96, crop=80)
    assert decode_spec([a, b]).resize == 96
    calls = []
    real = dataset_mod.decode_file

    def counted(path, spec, opts, warned=None):
        calls.append((path, spec.resize))
        return real(path, spec, opts, warned)

    monkeypatch.setattr(dataset_mod, "decode_file", counted)
    opts = DecodeOptions(10**8)
    ds_two = ShardDataset(str(root), entries, [a, b], opts)
    batches = collate_per_transform([ds_two[i] for i in range(len(entries))])
    assert len(calls) == len(entries) and {r for _, r in calls} == {96}
    assert [tuple(bt.tensor.shape) for bt in batches] == [(len(entries), 3, 56, 56), (len(entries), 3, 80, 80)]
    alone = ShardDataset(str(root), entries, b, opts)  # b alone: the same decode (resize 96), its transform
    for i in range(len(entries)):
        decoded = real(str(root / entries[i].rel), decode_spec([a, b]), opts)
        assert torch.equal(batches[0].tensor[i], dataset_mod.build_transform(a)(decoded.image))
        assert torch.equal(batches[1].tensor[i], alone[i].tensor)


@pytest.fixture(scope="module")
def second_checkpoint(tmp_path_factory) -> Path:
    """resnet18 with 3 classes, seeded random weights (another model than ``tiny_model``)."""
    torch.manual_seed(1)
    p = tmp_path_factory.mktemp("ckpt2") / "resnet18_3.pt"
    torch.save(torchvision.models.resnet18(num_classes=3).eval().state_dict(), p)
    return p


def _model_blocks(tiny_checkpoint: Path, second_checkpoint: Path) -> list[dict]:
    return [
        {"name": "small", "arch": "mobilenet_v3_small", "checkpoint": str(tiny_checkpoint)},
        {
            "name": "r18",
            "arch": "resnet18",
            "checkpoint": str(second_checkpoint),
            "transform": {"resize": 160, "crop": 128},
        },
    ]


def _run(root: Path, out: Path, models: list[dict], run_id: str, console=None, **extra) -> tuple[int, dict]:
    raw = {
        "input": {"root": str(root)},
        "output": {"root": str(out)},
        "models": models,
        "inference": {"device": "cpu", "batch_size": 4},
        "run": {"shard_size": 5, "run_id": run_id, "min_errors": 100},
    }
    for k, v in extra.items():
        sec, key = k.split(".")
        raw.setdefault(sec, {})[key] = v
    return execute(build_config(raw), quiet=True, console=console)


@pytest.fixture(scope="module")
def runs(prefect_server, photos, tiny_checkpoint, second_checkpoint, tmp_path_factory):
    """A 12-photo folder plus one corrupt JPEG, scored by both models in one run and by each alone."""
    base = tmp_path_factory.mktemp("several")
    root = make_image_folder(base / "images", photos)
    (root / "rocket" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    blocks = _model_blocks(tiny_checkpoint, second_checkpoint)
    out = base / "out"
    printed = io.StringIO()
    both = _run(root, out, blocks, "both", console=Console(file=printed, width=400))
    alone = [_run(root, base / f"out_{b['name']}", [b], f"alone-{b['name']}") for b in blocks]
    return {
        "root": root,
        "out": out,
        "both": both,
        "alone": alone,
        "base": base,
        "blocks": blocks,
        "printed": printed.getvalue(),
    }


def _rows(out: Path, table: str, run_id: str) -> list[dict]:
    folder = next((out / table).glob(f"run_date=*/{run_id}"))
    return ds.dataset(str(folder), format="parquet").to_table().to_pylist()


def test_two_models_in_one_run_answer_as_each_alone(runs):
    """By construction each model sees the same decoded pixels (the images are smaller than four
    times any resize, so no draft) through its own transform in both runs; only the batches'
    make-up differs, so every probability agrees within float rounding."""
    code, summary = runs["both"]
    assert code == 0, summary
    both = {(r["model_name"], r["image_path"]): r for r in _rows(runs["out"], "predictions", "both")}
    assert len(both) == 2 * 12
    for block, (acode, _) in zip(runs["blocks"], runs["alone"], strict=True):
        assert acode == 0
        alone = _rows(runs["base"] / f"out_{block['name']}", "predictions", f"alone-{block['name']}")
        assert len(alone) == 12 and {r["model_name"] for r in alone} == {block["name"]}
        for r in alone:
            mine = both[(block["name"], r["image_path"])]
            assert mine["model_id"] == r["model_id"]
            assert_same_answers(r, mine, ATOL, f"{block['name']} {r['image_path']}")
    ids = {name: {r["model_id"] for (n, _), r in both.items() if n == name} for name in ("small", "r18")}
    assert all(len(v) == 1 for v in ids.values()) and ids["small"] != ids["r18"]


def test_pairs_are_counted_and_errors_name_their_model(runs):
    """The corrupt JPEG is one decode failure, recorded once per model (two failed pairs);
    counts and the error budget are in (image, model) pairs; one part file per shard per table,
    each in the one schema."""
    _, summary = runs["both"]
    assert (summary["scanned"], summary["pairs"], summary["scored"], summary["failed"]) == (13, 26, 24, 2)
    assert summary["models"] == ["small", "r18"]
    errors = _rows(runs["out"], "errors", "both")
    assert sorted((e["model_name"], e["image_path"], e["stage"]) for e in errors) == [
        ("r18", "rocket/broken.jpg", "decode"),
        ("small", "rocket/broken.jpg", "decode"),
    ]
    assert all(e["model_id"] for e in errors)
    m = load_manifest(runs["out"] / "runs" / "both")
    assert [x["name"] for x in m.models] == ["small", "r18"] and m.counts.pairs == 26 and m.counts.pending == 0
    assert m.status == "partial"
    for table, schema in (("predictions", PREDICTIONS_SCHEMA), ("errors", ERRORS_SCHEMA)):
        files = sorted(next((runs["out"] / table).glob("run_date=*/both")).glob("part-*.parquet"))
        assert [f.name for f in files] == [f"part-{i:05d}.parquet" for i in range(3)]  # 13 images, 5 a shard
        for f in files:
            assert pq.read_schema(f).remove_metadata() == schema
        meta = json.loads(pq.read_schema(files[0]).metadata[b"imgscore"])
        assert [x["name"] for x in meta["models"]] == ["small", "r18"]


def test_the_summary_keeps_images_and_pairs_apart_and_ends_with_the_rerun_line(runs):
    """13 images, 2 models: the terminal shows 13 scanned images, 26 pairs, scored and failed as
    pairs, and two rates whose ratio is the images-to-pairs ratio (not a pairs rate called
    images_per_s). The run is partial (the corrupt JPEG), so it ends with the rerun command."""
    _, summary = runs["both"]
    printed = dict(line.split(None, 1) for line in runs["printed"].splitlines()[1:] if line.strip())
    assert printed["scanned"] == "13"
    assert printed["pairs"] == "26 (image, model) pairs; models: small, r18"
    assert printed["scored"] == "24 (image, model) pairs" and printed["failed"] == "2 (image, model) pairs"
    pairs_rate, images_rate = float(printed["pairs_per_s"]), float(printed["images_per_s"])
    assert summary["pairs_per_s"] == pairs_rate and summary["images_per_s"] == images_rate
    assert abs(pairs_rate * summary["wall_s"] - 24) < 0.1 * 24 and abs(images_rate / pairs_rate - 0.5) < 0.02
    assert summary["status"] == "partial"
    assert printed["rerun"] == f"imgscore rerun both --set output.root={runs['out']}" == summary["rerun"]
    m = load_manifest(runs["out"] / "runs" / "both")
    assert m.timings["pairs_per_s"] == pairs_rate and m.timings["images_per_s"] == images_rate
    from imgscore.report.build import build_report

    assert build_report(runs["out"], "both").timing.pairs_per_s == pairs_rate
    _, alone = runs["alone"][0]  # one model: the summary as before, no pairs line
    assert alone["images_per_s"] == alone["pairs_per_s"]


def test_the_auto_split_is_measured_with_one_model_and_with_two(runs):
    """``inference.num_workers: auto`` measures decode and forward costs on the shard's images
    for a one-model run and a two-model run alike (each commit record holds the predictions)."""
    for out, run_id in [
        (runs["out"], "both"),
        *((runs["base"] / f"out_{b['name']}", f"alone-{b['name']}") for b in runs["blocks"]),
    ]:
        record = json.loads((out / "runs" / run_id / "shards" / "00000.json").read_text())
        assert record["split_predicted"], (run_id, record)


def test_report_and_drift_describe_each_model_on_its_own(runs, photos):
    """Two complete two-model nights over one folder: each model's drift baseline is the first
    night and its PSI comes from its own rows (the same answers: 0 by construction); the report
    lists both models and describes the one it is asked for."""
    from imgscore.report.build import build_report

    root = make_image_folder(runs["base"] / "clean", photos)
    for run_id in ("clean1", "clean2"):
        code, summary = _run(root, runs["out"], runs["blocks"], run_id)
        assert code == 0 and summary["status"] == "complete", summary
    m = load_manifest(runs["out"] / "runs" / "clean2")
    assert set(m.drift["models"]) == {"small", "r18"}
    for d in m.drift["models"].values():
        assert d["baseline_runs"] == ["clean1"] and d["psi"] == pytest.approx(0.0, abs=1e-9)
    r = build_report(runs["out"], "both", model_name="r18")
    assert [(x.name, x.scored, x.failed) for x in r.models] == [("small", 12, 1), ("r18", 12, 1)]
    assert r.model.name == "r18" and sum(c.predicted for c in r.classes) == 12
    assert r.error_rate == pytest.approx(2 / 26)
    with pytest.raises(Exception, match="no model named 'nope'"):
        build_report(runs["out"], "both", model_name="nope")
    from imgscore.flows.cli import main as cli_main

    assert (
        cli_main(["report", "both", "--set", f"output.root={runs['out']}", "--format", "json", "--model", "small"]) == 0
    )
    assert cli_main(["report", "both", "--set", f"output.root={runs['out']}", "--model", "nope"]) == 2


def test_adding_a_model_scores_only_that_model_on_old_images(
    prefect_server, photos, tiny_checkpoint, second_checkpoint, tmp_path
):
    """``run.skip_scored``: a night with one model, then a night with that model and a new one.
    The second night scores only the new model (12 predictions, all its), carries the first
    model's 12 images as already scored and its corrupt image as already failed (its own
    ledger), and records the new model's own failure of that image."""
    root = make_image_folder(tmp_path / "images", photos)
    jpeg = (root / "coffee" / "coffee_0.jpg").read_bytes()
    (root / "rocket" / "broken.jpg").write_bytes(
        jpeg[: len(jpeg) * 6 // 10]
    )  # truncated: the same bytes fail every night
    blocks = _model_blocks(tiny_checkpoint, second_checkpoint)
    out = tmp_path / "out"
    code, first = _run(root, out, blocks[:1], "night1", **{"run.skip_scored": True})
    assert code == 0 and (first["scored"], first["failed"]) == (12, 1)
    code, second = _run(root, out, blocks, "night2", **{"run.skip_scored": True})
    assert code == 0, second
    assert (second["scanned"], second["pairs"], second["scored"], second["failed"]) == (13, 13, 12, 1)
    assert (second["already_scored"], second["already_failed"]) == (12, 1)
    preds = _rows(out, "predictions", "night2")
    assert {r["model_name"] for r in preds} == {"r18"} and len(preds) == 12
    assert [(e["model_name"], e["image_path"]) for e in _rows(out, "errors", "night2")] == [
        ("r18", "rocket/broken.jpg")
    ]
    code, third = _run(root, out, blocks, "night3", **{"run.skip_scored": True})
    assert code == 0 and (third["scanned"], third["scored"], third["already_scored"], third["already_failed"]) == (
        0,
        0,
        24,
        2,
    )


def test_rerun_of_a_fixed_image_rescores_it_with_every_model(
    prefect_server, photos, tiny_checkpoint, second_checkpoint, tmp_path
):
    """A truncated JPEG fails for both models; once fixed, ``imgscore rerun`` scores it with
    both, keeps every other row as it was, and ends with one row per (image, model) pair."""
    from imgscore.flows.cli import main as cli_main

    root = make_image_folder(tmp_path / "images", photos)
    jpeg = (root / "coffee" / "coffee_0.jpg").read_bytes()
    bad = root / "rocket" / "broken.jpg"
    bad.write_bytes(jpeg[: len(jpeg) * 6 // 10])
    out = tmp_path / "out"
    code, first = _run(root, out, _model_blocks(tiny_checkpoint, second_checkpoint), "fixme")
    assert code == 0 and (first["scored"], first["failed"]) == (24, 2)
    before = {(r["model_name"], r["image_path"]): r["scored_at"] for r in _rows(out, "predictions", "fixme")}
    bad.write_bytes(jpeg)
    assert cli_main(["rerun", "fixme", "--set", f"output.root={out}", "--quiet"]) == 0
    after = _rows(out, "predictions", "fixme")
    keys = [(r["model_name"], r["image_path"]) for r in after]
    assert len(keys) == len(set(keys)) == 26
    assert {k for k in keys if k[1] == "rocket/broken.jpg"} == {
        ("small", "rocket/broken.jpg"),
        ("r18", "rocket/broken.jpg"),
    }
    changed = sorted(
        k for k, r in zip(keys, after, strict=True) if k[1] != "rocket/broken.jpg" and r["scored_at"] != before[k]
    )
    assert not changed
    m = load_manifest(out / "runs" / "fixme")
    assert (m.counts.scored, m.counts.failed, m.status) == (26, 0, "complete")


def test_embeddings_of_several_models_share_one_table_or_are_refused(
    prefect_server, photos, tiny_checkpoint, second_checkpoint, tmp_path, capfd
):
    """Two models with equal vector lengths: one embeddings row per predictions row, keyed by
    model_name; lengths that differ (mobilenet_v3_small's 1024, resnet18's 512) are refused at
    start with exit 2, naming both, and nothing is written."""
    root = make_image_folder(tmp_path / "images", photos)
    small = {"name": "small", "arch": "mobilenet_v3_small", "checkpoint": str(tiny_checkpoint)}
    twin = {**small, "name": "twin", "transform": {"resize": 160, "crop": 128}}
    code, _ = _run(root, tmp_path / "out", [small, twin], "emb", **{"output.embeddings": True})
    assert code == 0
    preds = {(r["model_name"], r["image_path"]) for r in _rows(tmp_path / "out", "predictions", "emb")}
    embs = _rows(tmp_path / "out", "embeddings", "emb")
    assert {(r["model_name"], r["image_path"]) for r in embs} == preds and len(embs) == 24
    blocks = _model_blocks(tiny_checkpoint, second_checkpoint)
    capfd.readouterr()
    code, _ = _run(root, tmp_path / "out2", blocks, "emb2", **{"output.embeddings": True})
    printed = capfd.readouterr()
    assert code == 2 and "small 1024, r18 512" in printed.out + printed.err
    assert not (tmp_path / "out2" / "predictions").exists()


def test_the_documented_near_duplicate_query_gives_each_pair_once_per_model(
    prefect_server, photos, tiny_checkpoint, tmp_path
):
    """docs/results.md's near-duplicate query, as printed, on a two-model run whose models share
    one checkpoint (one model_id) under two transforms: the exact copy of coffee_0.jpg is found
    once for each model, named by model_name, and no row pairs one model's vector with the other's.
    By construction: a copy decodes to the same pixels, so each model gives it the same vector
    (cosine 1); the query keeps only pairs above 0.999."""
    root = make_image_folder(tmp_path / "images", photos)
    shutil.copy(root / "coffee" / "coffee_0.jpg", root / "coffee" / "coffee_copy.jpg")
    out = tmp_path / "out"
    small = {"name": "small", "arch": "mobilenet_v3_small", "checkpoint": str(tiny_checkpoint)}
    twin = {**small, "name": "twin", "transform": {"resize": 160, "crop": 128}}
    code, _ = _run(root, out, [small, twin], "dupes", **{"output.embeddings": True})
    assert code == 0
    sql = "\n".join(
        c
        for lang, c in re.findall(r"```(sql|python)\n(.*?)```", doc_section("results.md", "Analytics recipes"), re.S)
        if lang == "sql"
    )
    stmt = next(s for s in sql.split(";") if "near-duplicates" in s)
    res = duckdb.sql(stmt.replace("'outputs/", f"'{out}/"))
    cols, rows = res.columns, res.fetchall()
    got = [(r[cols.index("model_name")], r[cols.index("image_a")], r[cols.index("image_b")]) for r in rows]
    assert len(got) == len(set(got))
    assert {g for g in got if g[1:] == ("coffee/coffee_0.jpg", "coffee/coffee_copy.jpg")} == {
        ("small", "coffee/coffee_0.jpg", "coffee/coffee_copy.jpg"),
        ("twin", "coffee/coffee_0.jpg", "coffee/coffee_copy.jpg"),
    }
