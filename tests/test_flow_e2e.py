"""End to end: the Prefect flow over a real-photo ImageFolder, Parquet read back and checked
against the plain PyTorch loop people write first."""

import json
from collections import OrderedDict
from pathlib import Path

import pyarrow.dataset as ds
import pytest
import torch
from torchvision import transforms as T
from torchvision.datasets import ImageFolder

from imgscore.config.loading import build_config
from imgscore.flows.cli import execute
from imgscore.inference.model import file_sha256
from imgscore.io.parquet import ERRORS_SCHEMA, PREDICTIONS_SCHEMA
from imgscore.runstate.state import read_manifest
from tests.conftest import assert_same_answers, base_overrides, save_as_if_cuda

pytestmark = pytest.mark.slow


def plain_loop(root, model):
    """What people write first: ImageFolder + the torchvision eval recipe + softmax.

    Returns ``{relative path: (label, row)}`` where ``row`` holds ``topk_indices``/``topk_scores``
    over all classes, like a prediction row."""
    tf = T.Compose(
        [T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]
    )
    dsf = ImageFolder(str(root), transform=tf)
    out = {}
    with torch.no_grad():
        for (path, label), (x, _) in zip(dsf.samples, dsf, strict=True):
            p = torch.softmax(model(x[None]), 1)[0]
            rel = path[len(str(root)) + 1 :]
            s, i = torch.sort(p, descending=True)
            out[rel] = (label, {"topk_indices": i.tolist(), "topk_scores": s.tolist()})
    return out


def _run(root, ckpt, out, **extra):
    cfg = build_config({}, base_overrides(root, ckpt, out, **extra))
    code, summary = execute(cfg, quiet=True)
    return code, summary


def _preds(out, run_id):
    t = ds.dataset(out / "predictions", format="parquet", partitioning="hive").to_table()
    return t.filter(ds.field("run_id") == run_id).to_pylist()


def test_flow_matches_plain_loop_with_dataparallel_cuda_checkpoint(prefect_server, image_folder, tiny_model, tmp_path):
    """The flow gives the plain loop's answers. By construction on any CPU: both apply the same
    weights to resizes of the same pixels that differ by at most 2e-3 in probability, and answers
    are compared as probabilities with near-ties allowed to swap (``assert_same_answers``)."""
    ckpt = tmp_path / "dp_cuda.pt"
    sd = OrderedDict(("module." + k, v) for k, v in tiny_model.state_dict().items())
    save_as_if_cuda({"epoch": 3, "model": sd}, ckpt)
    out = tmp_path / "out"
    code, summary = _run(image_folder, ckpt, out)
    assert code == 0
    assert (summary["scanned"], summary["scored"], summary["failed"]) == (12, 12, 0)
    assert summary["devices"] == ["cpu"]

    rows = _preds(out, summary["run_id"])
    ref = plain_loop(image_folder, tiny_model)
    assert sorted(r["image_path"] for r in rows) == sorted(ref)
    for r in rows:
        label, plain = ref[r["image_path"]]
        assert r["label"] == label and r["label_name"] == r["image_path"].split("/")[0]
        # The plain loop resizes a float tensor (torchvision v1), the flow a PIL image: up to 2e-3
        # apart on every CPU. Compared as probabilities, near-ties may swap (conftest docstring).
        assert_same_answers(plain, r, atol=2e-3, what=r["image_path"])
        assert r["pred_label"] == str(r["pred_index"]) and r["score"] == r["topk_scores"][0]
        assert r["topk_indices"][0] == r["pred_index"] and len(r["topk_indices"]) == 3
        assert r["topk_scores"] == sorted(r["topk_scores"], reverse=True)
        assert sum(r["topk_scores"]) == pytest.approx(1.0, abs=1e-5)  # k = all 3 classes
        assert r["model_id"] == file_sha256(ckpt)
        assert r["device"] == "cpu" and ":" in r["worker"]
        assert r["scored_at"].tzinfo is not None
    assert sorted({r["shard_id"] for r in rows}) == [0, 1, 2]  # 12 images, shard_size 5

    # every part file has exactly the declared schema, empty error parts too
    pred_dir, err_dir = summary["predictions"], summary["errors"]
    for d, schema in ((pred_dir, PREDICTIONS_SCHEMA), (err_dir, ERRORS_SCHEMA)):
        files = sorted(p.name for p in __import__("pathlib").Path(d).iterdir())
        assert files == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
        assert ds.dataset(d, format="parquet").schema.remove_metadata() == schema

    m = read_manifest(summary["manifest"])
    assert m["status"] == "complete"
    assert m["counts"]["scanned"] == m["counts"]["scored"] + m["counts"]["failed"] == 12
    assert [s["state"] for s in m["shards"]] == ["complete"] * 3
    assert m["model"]["model_id"] == file_sha256(ckpt) and m["model"]["arch"] == "mobilenet_v3_small"
    assert m["config"]["input"]["root"] == str(image_folder)


def test_other_checkpoint_forms_give_the_same_predictions(prefect_server, image_folder, tiny_model, tmp_path):
    """TorchScript, torch.export programs (a dynamic batch, and a static batch of 1 that scores
    batches of 8 and 4), training dict and prefixed keys of one model give one answer per image. By
    construction: the same weights, rounding apart (1e-5), compared with ``assert_same_answers``."""
    sd = tiny_model.state_dict()
    forms = {}
    forms["ts"] = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.trace(tiny_model, torch.zeros(1, 3, 224, 224)), forms["ts"])
    for name, batch, dynamic in (("pt2", 2, {0: torch.export.Dim("batch")}), ("pt2_batch1", 1, None)):
        forms[name] = tmp_path / f"{name}.pt2"
        ep = torch.export.export(tiny_model.eval(), (torch.zeros(batch, 3, 224, 224),), dynamic_shapes=(dynamic,))
        torch.export.save(ep, str(forms[name]))
    forms["ckpt"] = tmp_path / "training.pt"
    torch.save({"model_state_dict": sd, "optimizer": {}, "epoch": 1}, forms["ckpt"])
    forms["prefixed"] = tmp_path / "compiled_dp.pt"
    torch.save(OrderedDict(("_orig_mod.module." + k, v) for k, v in sd.items()), forms["prefixed"])
    results = {}
    for name, p in forms.items():
        trust = {"model.trust_checkpoint": "true"} if name.startswith("pt2") else {}
        code, summary = _run(image_folder, p, tmp_path / "out", **{"inference.batch_size": 8, **trust})
        assert code == 0
        results[name] = {r["image_path"]: r for r in _preds(tmp_path / "out", summary["run_id"])}
        assert {r["model_id"] for r in results[name].values()} == {file_sha256(p)}
        if name.startswith("pt2"):
            assert read_manifest(summary["manifest"])["model"]["source"] == "torch_export"
    base = results["ckpt"]
    assert len(base) == 12
    # the same weights; TorchScript and exported programs are not conv-BN folded: rounding apart
    for name in ("ts", "pt2", "pt2_batch1", "prefixed"):
        assert results[name].keys() == base.keys()
        for k, row in base.items():
            assert_same_answers(row, results[name][k], atol=1e-5, what=f"{name} {k}")


def test_an_output_root_inside_the_input_root_stays_out_of_every_night(
    prefect_server, image_folder, tiny_checkpoint, tmp_path
):
    """input.root=/data, output.root=/data/Scores: the first night's outputs never become a class
    (which shifted every later label) nor grow the next nights' skipped list."""
    out = image_folder / "Scores"
    nights = [_run(image_folder, tiny_checkpoint, out) for _ in range(2)]
    assert [code for code, _ in nights] == [0, 0]
    for _, summary in nights:
        assert (summary["scanned"], summary["scored"], summary["skipped"]) == (12, 12, 0)
        m = read_manifest(summary["manifest"])
        assert m["input"]["classes"] == ["chelsea", "coffee", "rocket"] and m["skipped"] == []
        assert m["input"]["output_root_left_out"] == "Scores"
        rows = _preds(out, summary["run_id"])
        assert {(r["label_name"], r["label"]) for r in rows} == {("chelsea", 0), ("coffee", 1), ("rocket", 2)}
    assert len(list((out / "runs").iterdir())) == 2


def test_ten_thousand_inline_class_names_reach_the_model(prefect_server, image_folder, tmp_path):
    """An inline model.classes of 10,000 names is a 1.4 MB config, over Prefect's 512 KB limit for
    flow-run parameters: the run passes it by reference and every name still reaches the rows."""
    import torchvision

    from imgscore.config.flow_params import MAX_PARAMETER_BYTES, flow_parameters

    torch.manual_seed(0)
    ckpt = tmp_path / "wide_head.pt"
    torch.save(torchvision.models.mobilenet_v3_small(num_classes=10_000).state_dict(), ckpt)
    names = [f"species_{i:05d}_" + "x" * 120 for i in range(10_000)]
    cfg = build_config({"model": {"classes": names}}, base_overrides(image_folder, ckpt, tmp_path / "out"))
    assert len(cfg.model_dump_json()) > 1_300_000
    with flow_parameters(cfg) as params:
        assert list(params) == ["config_file"] and len(json.dumps(params)) < 1000
        assert Path(params["config_file"]).stat().st_size > MAX_PARAMETER_BYTES
    assert not Path(params["config_file"]).exists()  # removed when the run ends

    code, summary = execute(cfg, quiet=True)
    assert code == 0 and summary["scored"] == 12
    rows = _preds(tmp_path / "out", summary["run_id"])
    assert len(rows) == 12 and all(r["pred_label"] == names[r["pred_index"]] for r in rows)
    assert all(names[i] for r in rows for i in r["topk_indices"])
    assert read_manifest(summary["manifest"])["model"]["classes"] == names
