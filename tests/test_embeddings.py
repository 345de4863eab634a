"""Embeddings (``output.embeddings``): the head's input as a fixed-size vector per image, in its own table.

The vectors are checked against a forward hook on the plain torchvision model fed the same
preprocessed tensors; the analytics recipes (docs/results.md) run on a real run's tables.
"""

from __future__ import annotations

import re
import shutil

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch
import torchvision

from imgscore.config.loading import build_config
from imgscore.errors import ConfigError
from imgscore.flows.cli import execute
from imgscore.images.decode import decode_file
from imgscore.images.preprocess import DecodeOptions, build_transform
from imgscore.inference.embeddings import Tap, choose_layer, embeddings_table, find_head
from imgscore.inference.model import load_model
from tests.conftest import base_overrides, doc_section


@pytest.mark.parametrize(
    ("arch", "head"),
    [
        ("resnet18", "fc"),
        ("shufflenet_v2_x0_5", "fc"),
        ("mobilenet_v3_small", "classifier.3"),
        ("efficientnet_b0", "classifier.1"),
        ("convnext_tiny", "classifier.2"),
        ("densenet121", "classifier"),
        ("vit_b_16", "heads.head"),
        ("swin_t", "head"),
    ],
)
def test_head_found_from_the_architecture(arch, head):
    """The head is where torchvision's builders put it (built on the meta device: no weights)."""
    with torch.device("meta"):
        module = torchvision.models.get_model(arch, num_classes=7)
    assert find_head(module, 7) == head


def test_no_linear_head_and_unknown_layer_are_refused_with_the_fix():
    with torch.device("meta"):
        squeeze = torchvision.models.squeezenet1_0(num_classes=7)
        resnet = torchvision.models.resnet18(num_classes=7)
    with pytest.raises(ConfigError, match="set output.embedding_layer"):
        find_head(squeeze, 7)
    assert choose_layer(squeeze, "features", 7).name == "features"
    with pytest.raises(ConfigError, match="did you mean avgpool"):
        choose_layer(resnet, "avgpoo", 7)
    with pytest.raises(ConfigError, match="inference.backend=torch"):
        build_config({"output": {"embeddings": True}, "inference": {"backend": "onnxruntime"}})


def test_float16_column_reads_back_in_duckdb(tmp_path):
    """The float16 column is a fixed-size list of halves in Arrow, and DuckDB reads it as FLOAT[]."""
    keys = [
        {
            "run_id": "r",
            "input_root": "/data",
            "image_path": f"{i}.jpg",
            "model_id": "m",
            "model_name": "m",
            "shard_id": 0,
            "batch_id": 0,
        }
        for i in range(3)
    ]
    vecs = [
        np.array([1.0, 0.0, 0.5], np.float32),
        np.array([1.0, 0.0, 0.5], np.float32),
        np.array([0.0, 1.0, 0.0], np.float32),
    ]
    t = embeddings_table(keys, vecs, 3, "float16")
    assert t.schema.field("embedding").type == pa.list_(pa.float16(), 3)
    pq.write_table(t, tmp_path / "e.parquet")
    sims = duckdb.sql(
        f"SELECT a.image_path, b.image_path, list_cosine_similarity(a.embedding, b.embedding) FROM "
        f"'{tmp_path}/e.parquet' a, '{tmp_path}/e.parquet' b WHERE a.image_path < b.image_path ORDER BY 3 DESC"
    ).fetchall()
    assert (
        sims[0][:2] == ("0.jpg", "1.jpg")
        and sims[0][2] == pytest.approx(1.0, abs=1e-6)
        and sims[-1][2] == pytest.approx(0.0, abs=1e-6)
    )


@pytest.fixture(scope="module")
def embedded_run(prefect_server, photos, tiny_model, tiny_checkpoint, tmp_path_factory):
    """One run of a 3-class folder of 12 photos plus an exact copy of one of them, embeddings on."""
    from tests.conftest import make_image_folder

    base = tmp_path_factory.mktemp("emb")
    root = make_image_folder(base / "images", photos)
    shutil.copy(root / "coffee" / "coffee_0.jpg", root / "coffee" / "coffee_copy.jpg")
    out = base / "out"
    cfg = build_config({}, base_overrides(root, tiny_checkpoint, out, **{"output.embeddings": "true"}))
    code, summary = execute(cfg, quiet=True)
    return {"code": code, "summary": summary, "root": root, "out": out, "cfg": cfg}


@pytest.mark.slow
def test_vectors_are_the_plain_models_head_input(embedded_run, tiny_model):
    """Each image's vector is the input of ``classifier[3]`` of the plain torchvision model, read
    with a forward hook on the same preprocessed tensor. By construction on any CPU: the two
    paths compute the same function (imgscore folds BatchNorm into the convs and uses
    channels_last, which changes only float rounding, ~1e-5 relative), so a tolerance of 1e-3 of
    the vector's scale separates a right layer from a wrong one (another layer has another size
    or other values entirely)."""
    r = embedded_run
    assert r["code"] == 0 and r["summary"]["scored"] == 13
    emb = ds.dataset(r["out"] / "embeddings", format="parquet", partitioning="hive").to_table()
    preds = ds.dataset(r["out"] / "predictions", format="parquet", partitioning="hive").to_table()
    assert emb.schema.field("embedding").type == pa.list_(pa.float32(), 1024)
    assert sorted(emb["image_path"].to_pylist()) == sorted(preds["image_path"].to_pylist())
    assert set(emb["model_id"].to_pylist()) == set(preds["model_id"].to_pylist())

    seen = {}
    tiny_model.classifier[3].register_forward_pre_hook(lambda _m, args: seen.__setitem__("x", args[0]))
    lm = load_model(r["cfg"].model, r["cfg"].preprocess, torch.device("cpu"))
    tf = build_transform(lm.preprocess)
    vectors = {
        p: np.asarray(v, np.float32)
        for p, v in zip(emb["image_path"].to_pylist(), emb["embedding"].to_pylist(), strict=True)
    }
    with torch.inference_mode():
        for path, got in vectors.items():
            x = tf(
                decode_file(str(r["root"] / path), lm.preprocess, DecodeOptions.from_input(r["cfg"].input), []).image
            )[None]
            tiny_model(x)
            want = seen["x"][0].numpy()
            assert got.shape == want.shape
            assert np.abs(got - want).max() <= 1e-3 * max(1.0, float(np.abs(want).max())), path
    tiny_model.classifier[3]._forward_pre_hooks.clear()


def _recipes() -> list[str]:
    section = doc_section("results.md", "Analytics recipes")
    return [c for lang, c in re.findall(r"```(sql|python)\n(.*?)```", section, re.S) if lang == "sql"]


@pytest.mark.slow
def test_documented_recipes_find_neighbours_and_the_duplicate(embedded_run):
    """The documented (docs/results.md) nearest-neighbour and near-duplicate queries, run as printed on this run:
    the exact copy of coffee_0.jpg is its nearest neighbour (cosine 1 up to float rounding) and
    the one near-duplicate pair of the night."""
    out = embedded_run["out"]
    con = duckdb.connect()
    results = {}
    for block in _recipes():
        for stmt in (
            s for s in block.replace("'outputs/", f"'{out}/").split(";") if re.sub(r"--[^\n]*", "", s).strip()
        ):
            res = con.sql(stmt)
            if res is not None:
                results[stmt] = (res.columns, res.fetchall())
    neighbours = next(v for k, v in results.items() if "nearest" in k.lower())
    dupes = next(v for k, v in results.items() if "duplicate" in k.lower())
    cols, rows = neighbours
    assert rows[0][cols.index("neighbour")] == "coffee/coffee_copy.jpg" and rows[0][cols.index("similarity")] > 0.9999
    cols, rows = dupes
    assert [(r[cols.index("image_a")], r[cols.index("image_b")]) for r in rows] == [
        ("coffee/coffee_0.jpg", "coffee/coffee_copy.jpg")
    ]


@pytest.mark.slow
def test_rerun_of_a_fixed_image_keeps_one_vector_per_prediction(prefect_server, photos, tiny_checkpoint, tmp_path):
    """A partial shard rerun: the fixed image gets its vector, the kept images keep theirs
    unchanged (the same bytes), and the shard's embeddings stay in its predictions' order."""
    from imgscore.flows.cli import main as cli_main
    from tests.conftest import make_variants

    root = tmp_path / "images"
    root.mkdir()
    for i, v in enumerate(make_variants(photos["chelsea"], 6, size=64)):
        v.save(root / f"img_{i}.jpg", quality=90)
    bad = root / "img_4.jpg"
    bad.write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    sets = base_overrides(
        root, tiny_checkpoint, out, **{"output.embeddings": "true", "run.max_error_rate": 0.5, "run.shard_size": 3}
    )
    assert cli_main(["run", *sum((["--set", s] for s in sets), []), "--quiet"]) == 0

    def tables():
        e = ds.dataset(out / "embeddings", format="parquet", partitioning="hive").to_table().to_pandas()
        p = ds.dataset(out / "predictions", format="parquet", partitioning="hive").to_table().to_pandas()
        return e, p

    before, _ = tables()
    assert sorted(before["image_path"]) == ["img_0.jpg", "img_1.jpg", "img_2.jpg", "img_3.jpg", "img_5.jpg"]
    make_variants(photos["rocket"], 1, size=64)[0].save(bad, quality=90)
    run_id = before["run_id"].iloc[0]
    assert cli_main(["rerun", run_id, "--set", f"output.root={out}", "--quiet"]) == 0
    after, preds = tables()
    shard1 = after[after["shard_id"] == 1]
    assert (
        shard1["image_path"].tolist()
        == preds[preds["shard_id"] == 1]["image_path"].tolist()
        == ["img_3.jpg", "img_4.jpg", "img_5.jpg"]
    )
    old = before.set_index("image_path")["embedding"]
    new = after.set_index("image_path")["embedding"]
    for kept in ("img_3.jpg", "img_5.jpg"):
        assert np.array_equal(np.asarray(new[kept]), np.asarray(old[kept]))
    assert len(new["img_4.jpg"]) == 1024 and np.isfinite(np.asarray(new["img_4.jpg"])).all()


def test_a_tapped_model_can_still_be_copied(tiny_model):
    """A process that scored with embeddings keeps the hook on its cached module; the ONNX export
    deep-copies that module. The copy gets its own tap: it sees its own forwards, the original's
    features are untouched."""
    import copy

    module = copy.deepcopy(tiny_model)
    tap = Tap(module, choose_layer(module, None, 3))
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        module(x)  # the original's features: 2 images, not taken yet
        clone = copy.deepcopy(module)
        (new_tap,) = {h.__self__ for h in clone.classifier[-1]._forward_pre_hooks.values()}
        assert new_tap is not tap and new_tap.module_ref is clone
        with pytest.raises(RuntimeError, match="was not called"):
            new_tap.take()  # starts empty
        clone(x[:1])
        assert new_tap.take().shape[0] == 1 and tap.take().shape[0] == 2
