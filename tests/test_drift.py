"""Night-over-night drift on real folders whose class mix changes between nights.

The model is ``tests.colour_model`` (answers fixed by construction: the dominant tint), so the
predicted-class mix of each night is the folder's mix, and every number here follows from the
image counts alone — on any CPU.
"""

from __future__ import annotations

import json
import logging
import math
import shutil

import pyarrow as pa
import pyarrow.dataset as ds
import pytest
import torch

from imgscore.config.loading import build_config
from imgscore.flows.cli import execute
from imgscore.flows.cli import main as cli_main
from imgscore.report.build import build_report
from imgscore.report.drift import psi, shares
from imgscore.report.html import render_html
from tests import colour_model
from tests.conftest import make_variants
from tests.test_notify import Receiver

pytestmark = pytest.mark.slow


def fill(root, photos, mix: dict[str, int]) -> None:
    """``root/<colour>/<colour>_<i>.jpg``: ``mix[colour]`` tinted real photos each (the old night's files removed)."""
    shutil.rmtree(root, ignore_errors=True)
    pool = [v for name in ("chelsea", "coffee", "rocket") for v in make_variants(photos[name], 4, size=64)]
    for colour, n in mix.items():
        (root / colour).mkdir(parents=True)
        for i in range(n):
            colour_model.tinted(pool[i % len(pool)], colour).save(root / colour / f"{colour}_{i}.jpg", quality=90)


@pytest.fixture(scope="module")
def nights(prefect_server, photos, tmp_path_factory):
    base = tmp_path_factory.mktemp("drift")
    ckpt = base / "colour.pt"
    torch.save(colour_model.build().state_dict(), ckpt)
    root, out = base / "images", base / "out"

    def night(mix, **extra):
        fill(root, photos, mix)
        items = {
            "input.root": root,
            "model.factory": "tests.colour_model:build",
            "model.checkpoint": ckpt,
            "model.classes": "[red, green, blue]",
            "output.root": out,
            "inference.device": "cpu",
            "inference.batch_size": 8,
            "run.shard_size": 8,
            "output.embeddings": "true",
            "drift.min_images": 5,
            "drift.max_class_shift": 0.2,
            "drift.max_embedding_shift": 0.01,
            **extra,
        }
        return execute(build_config({}, [f"{k}={v}" for k, v in items.items()]), quiet=True)

    even, red_heavy = {"red": 4, "green": 4, "blue": 4}, {"red": 10, "green": 1, "blue": 1}
    import imgscore.flows.score_images  # noqa: F401  (Prefect configures its loggers when imported)

    logged = Records()  # what reaches a handler of Prefect's flow-run logger, at the level it arrives with
    logging.getLogger("prefect.flow_runs").addHandler(logged)
    try:
        with Receiver() as hook:  # a real HTTP server: nights 2 and 3 complete, only night 2 drifted
            runs = [
                night(even),
                night(red_heavy, **{"notify.webhook_url": hook.url}),
                night(red_heavy, **{"drift.baseline_runs": 1, "notify.webhook_url": hook.url}),
                night(even, **{"drift.baseline_runs": 1, "drift.fail": "true"}),
            ]
    finally:
        logging.getLogger("prefect.flow_runs").removeHandler(logged)
    return {"out": out, "runs": runs, "root": root, "posts": hook.posts, "logged": logged.records}


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.levelno, record.getMessage()))


def test_drift_warnings_reach_prefect_but_not_the_terminal(nights):
    """The summary prints each drift warning; Prefect's console handler (WARNING without
    --verbose) must not print it a second time as "Flow run '…' - drift: …". The record still
    goes to the flow run's logs (the API handler takes INFO)."""
    drift = [(level, msg) for level, msg in nights["logged"] if msg.startswith("drift: ")]
    _, s2 = nights["runs"][1]
    assert {msg for _, msg in drift} >= {f"drift: {w}" for w in s2["drift"]} and s2["drift"]
    assert all(level == logging.INFO for level, _ in drift), drift


def test_first_night_has_nothing_to_compare_with(nights):
    code, summary = nights["runs"][0]
    assert code == 0 and summary["drift"] == []
    d = build_report(nights["out"], summary["run_id"]).drift
    assert d.baseline.runs == [] and "no earlier complete run" in d.reason


def test_class_mix_change_is_a_warning_not_a_failure(nights):
    """Night 2 (10 red, 1 green, 1 blue) against night 1 (4 of each): PSI and the largest
    shift computed here from the two nights' predictions, as the module defines them."""
    (_, s1), (code, s2) = nights["runs"][:2]
    assert code == 0 and s2["status"] == "complete"
    preds = ds.dataset(nights["out"] / "predictions", format="parquet", partitioning="hive").to_table().to_pandas()
    p1 = preds[preds.run_id == s1["run_id"]]
    p2 = preds[preds.run_id == s2["run_id"]]
    assert (p1.pred_label == p1.label_name).all() and (p2.pred_label == p2.label_name).all()  # the colour decides
    want = psi(shares(pa.array(p2.pred_label.tolist())), shares(pa.array(p1.pred_label.tolist())))
    expected = (10 / 12 - 4 / 12) * math.log(10 / 4) + 2 * (1 / 12 - 4 / 12) * math.log(1 / 4)
    assert want == pytest.approx(expected, rel=1e-9)

    report = build_report(nights["out"], s2["run_id"])
    d = report.drift
    assert d.baseline.runs == [s1["run_id"]] and d.judged
    assert d.classes.psi == pytest.approx(expected, abs=1e-5)
    top = d.classes.shifts[0]
    assert (top.class_name, top.share, top.baseline_share) == (
        "red",
        pytest.approx(10 / 12, abs=1e-5),
        pytest.approx(4 / 12, abs=1e-5),
    )
    assert d.error_rate.model_dump() == {"current": 0.0, "baseline": 0.0, "change": 0.0}
    assert d.embedding.dim == 3 and d.embedding.cosine_distance > 0.01  # the mean colour moved towards red
    kinds = " | ".join(s2["drift"])
    assert "drift.max_psi" in kinds and "drift.max_class_shift" in kinds and "drift.max_embedding_shift" in kinds
    assert s2["drift"] == d.warnings
    recorded = json.loads((nights["out"] / "runs" / s2["run_id"] / "manifest.json").read_text())["drift"]
    assert recorded == {"baseline_runs": [s1["run_id"]], "psi": d.classes.psi, "warnings": d.warnings}
    # the webhook hears about a completed run only because it drifted (notify.on_success is off)
    (post,) = nights["posts"]
    assert (
        post["body"]["run_id"] == s2["run_id"]
        and post["body"]["status"] == "complete"
        and post["body"]["drift"] == recorded
    )
    page = render_html(report)
    assert (
        "Compared with recent nights" in page
        and 'alt="class shares against recent nights"' in page
        and "drift.max_psi" in page
    )


def test_baseline_is_the_previous_n_complete_runs(nights):
    """Night 3 has night 2's mix: against night 2 alone nothing moved (PSI 0, no warning)."""
    (_, s2), (code, s3) = nights["runs"][1:3]
    assert code == 0 and s3["drift"] == []
    d = build_report(nights["out"], s3["run_id"]).drift
    assert d.baseline.runs == [s2["run_id"]] and d.classes.psi == pytest.approx(0.0, abs=1e-9)


def test_drift_fail_turns_the_warning_into_exit_1_and_json_carries_the_numbers(nights, capsys):
    """Night 4 (4 of each again) with drift.fail against night 3 alone (10/1/1): the same shift
    in reverse, so the same PSI (it is symmetric) — and this time the run fails (exit 1), with
    every image still scored."""
    (_, s2), (_, s3), (code, s4) = nights["runs"][1:]
    assert code == 1 and s4["status"] == "failed" and s4["scored"] == 12
    assert any("drift.max_psi" in w for w in s4["drift"])
    capsys.readouterr()
    assert cli_main(["report", s4["run_id"], "--format", "json", "--set", f"output.root={nights['out']}"]) == 0
    d = json.loads(capsys.readouterr().out)["drift"]
    expected = (10 / 12 - 4 / 12) * math.log(10 / 4) + 2 * (1 / 12 - 4 / 12) * math.log(1 / 4)
    assert d["baseline"]["runs"] == [s3["run_id"]] and d["baseline"]["images"] == 12 and d["thresholds"]["fail"] is True
    assert d["classes"]["psi"] == pytest.approx(expected, abs=1e-5)
    assert [n["run_id"] for n in d["nights"]] == [s3["run_id"], s4["run_id"]] and d["nights"][0]["class_shares"][
        "red"
    ] == pytest.approx(10 / 12)
    assert d["warnings"] == s4["drift"]

    from prefect.artifacts import Artifact

    (row,) = json.loads(Artifact.get("score-images-drift").data)  # the latest night's
    assert (
        row["run_id"] == s4["run_id"]
        and row["psi"] == pytest.approx(expected, abs=1e-5)
        and "drift.max_psi" in row["warnings"]
    )
