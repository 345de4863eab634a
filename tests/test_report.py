"""The run report (numbers, HTML, CLI), Prefect artifacts and the terminal progress bar.

Most checks run on a run written by hand (manifest + part files with known values), so every
number has an expected value; one end-to-end flow run checks that the report and the artifacts
appear at the end of a real run, and a Chromium test renders the page.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgscore.config.loading import build_config
from imgscore.flows.artifacts import RunProgressArtifact, publish_run_report
from imgscore.flows.cli import execute
from imgscore.flows.cli import main as cli_main
from imgscore.io import storage
from imgscore.io.parquet import (
    ERRORS_SCHEMA,
    PREDICTIONS_SCHEMA,
    make_table,
    part_dir,
    part_name,
    write_table_atomic,
)
from imgscore.report import build, html, markdown, plots, stats, thumbnails
from imgscore.report.evaluate import accuracy_of_run, confusion
from imgscore.report.model import dumps
from imgscore.runtime import progress as prog
from tests.conftest import base_overrides

RUN = "20260101T000000Z-abc123"
CLASSES = ["cat", "dog", "fox"]
# (class folder, file, predicted index, score): 6 images, 4 right, 2 wrong
PRED_ROWS = [
    ("cat", "cat/a.png", 0, 0.90),
    ("cat", "cat/b.png", 1, 0.40),  # wrong
    ("dog", "dog/a.png", 1, 0.80),
    ("dog", "dog/b.png", 1, 0.70),
    ("fox", "fox/a.png", 2, 0.95),
    ("fox", "fox/b.png", 0, 0.35),  # wrong, least confident
]
ERROR_ROWS = [
    ("cat/broken.jpg", "decode", "UnidentifiedImageError", "cannot identify image file"),
    ("dog/empty.jpg", "decode", "EmptyFile", "file is empty (0 bytes)"),
    ("dog/<b>odd</b>.jpg", "decode", "UnidentifiedImageError", "cannot identify image file"),
]


def write_fake_run(out, images: Path | None = None, model_classes=CLASSES, run_id: str = RUN):
    """A finished run by hand: manifest.json plus one predictions and one errors part file, under
    ``out`` (a local folder or an object-store root); returns ``out``."""
    now = datetime(2026, 1, 1, tzinfo=UTC)
    preds = []
    for i, (cls, path, p, s) in enumerate(PRED_ROWS):
        other = [j for j in range(3) if j != p]
        preds.append(
            {
                "run_id": run_id,
                "image_path": path,
                "label": CLASSES.index(cls),
                "label_name": cls,
                "pred_index": p,
                "pred_label": model_classes[p],
                "score": s,
                "topk_indices": [p, *other],
                "topk_scores": [s, (1 - s) * 0.6, (1 - s) * 0.4],
                "model_id": "f" * 64,
                "model_name": "resnet18",
                "device": "cpu" if i < 3 else "cuda:0",
                "worker": f"host:{100 + i % 2}",
                "shard_id": i // 3,
                "batch_id": 0,
                "scored_at": now,
                "file_size": 10,
                "file_mtime_ns": 1,
            }
        )
    errors = [
        {
            "run_id": run_id,
            "image_path": path,
            "shard_id": 1,
            "batch_id": 0,
            "stage": stage,
            "error_type": et,
            "message": msg,
            "attempt": 1,
            "occurred_at": now,
            "worker": "host:101",
            "model_id": "f" * 64,
            "model_name": "resnet18",
        }
        for path, stage, et, msg in ERROR_ROWS
    ]
    for table, rows, schema in (("predictions", preds, PREDICTIONS_SCHEMA), ("errors", errors, ERRORS_SCHEMA)):
        write_table_atomic(
            make_table(rows, schema), storage.join(str(part_dir(out, table, "2026-01-01", run_id)), part_name(0))
        )
    shards = [
        {
            "shard_id": 0,
            "images": 3,
            "state": "complete",
            "scored": 3,
            "failed": 0,
            "device": "cpu",
            "worker": "host:100",
            "seconds": 1.0,
        },
        {
            "shard_id": 1,
            "images": 6,
            "state": "partial",
            "scored": 3,
            "failed": 3,
            "device": "cuda:0",
            "worker": "host:101",
            "seconds": 2.0,
        },
    ]
    manifest = {
        "run_id": run_id,
        "run_date": "2026-01-01",
        "status": "partial",
        "created_at": now.isoformat(),
        "updated_at": now.isoformat(),
        "input": {"root": str(images) if images else None, "layout": "imagefolder", "classes": CLASSES},
        "counts": {"scanned": 9, "scored": 6, "failed": 3, "skipped": 1, "already_scored": 4, "pending": 0},
        "skipped": [{"image_path": "cat/x.heic", "reason": "HEIC/HEIF needs the pillow-heif plugin"}],
        "model": {
            "arch": "resnet18",
            "model_id": "f" * 64,
            "classes": list(model_classes),
            "num_classes": 3,
            "source": "state_dict",
        },
        "config": {"output": {"root": str(out)}},
        "shards": shards,
        "outputs": {"predictions": str(part_dir(out, "predictions", "2026-01-01", run_id))},
        "timings": {"wall_s": 3.0, "images_per_s": 2.0, "shard_seconds": 3.0, "scan_s": 0.1},
    }
    storage.write_bytes(storage.join(str(out), "runs", run_id, "manifest.json"), json.dumps(manifest).encode())
    return out


@pytest.fixture
def fake_images(tmp_path) -> Path:
    """Small PNGs for the fake run's predictions (RGBA for one, to check compositing)."""
    root = tmp_path / "images"
    for i, (_, path, _, _) in enumerate(PRED_ROWS):
        p = root / path
        p.parent.mkdir(parents=True, exist_ok=True)
        mode = "RGBA" if path == "fox/b.png" else "RGB"
        color = (0, 0, 0, 0) if mode == "RGBA" else (40 * i, 100, 200)
        Image.new(mode, (300, 200), color).save(p)
    return root


@pytest.fixture
def fake_run(tmp_path, fake_images) -> Path:
    return write_fake_run(tmp_path / "out", fake_images)


# ---------------------------------------------------------------------------------- numbers


def test_build_report_numbers(fake_run):
    r = build.build_report(fake_run, RUN)
    assert r.counts.model_dump() == {
        "scanned": 9,
        "scored": 6,
        "failed": 3,
        "skipped": 1,
        "already_scored": 4,
        "already_failed": 0,
        "pending": 0,
    }
    assert r.error_rate == pytest.approx(3 / 9, abs=1e-6)
    assert r.rows.model_dump() == {"predictions": 6, "errors": 3}
    assert r.timing.wall_s == 3.0 and r.timing.images_per_s == 2.0
    assert r.devices == ["cpu", "cuda:0"]
    assert r.workers == ["host:100", "host:101"]
    assert r.shards == {"total": 2, "complete": 1, "partial": 1}
    assert [(c.name, c.predicted) for c in r.classes] == [("cat", 2), ("dog", 3), ("fox", 1)]
    assert r.classes[1].share == pytest.approx(0.5)

    scores = np.array([s for *_, s in PRED_ROWS], dtype=np.float32).astype(np.float64)
    s = r.scores
    assert s.count == 6
    assert s.min == pytest.approx(0.35, abs=1e-6) and s.max == pytest.approx(0.95, abs=1e-6)
    assert s.percentiles["p50"] == pytest.approx(np.percentile(scores, 50), abs=1e-6)
    assert s.percentiles["p95"] == pytest.approx(np.percentile(scores, 95), abs=1e-6)
    assert sum(s.histogram.counts) == 6
    assert sum(s.histogram.counts[:6]) == 0 and sum(s.histogram.counts[6:9]) == 2  # 0.35, 0.40

    acc = r.accuracy
    assert (acc.correct, acc.labelled, acc.matched_by) == (4, 6, "name")
    assert acc.accuracy == pytest.approx(4 / 6)
    assert acc.rows == CLASSES and acc.columns == CLASSES
    assert acc.matrix == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert [p.recall for p in acc.per_class] == [0.5, 1.0, 0.5]

    e = r.errors
    assert e.total == 3 and e.by_stage == {"decode": 3}
    top = e.groups[0]
    assert (top.stage, top.error_type, top.count) == ("decode", "UnidentifiedImageError", 2)
    assert sorted(top.examples) == ["cat/broken.jpg", "dog/<b>odd</b>.jpg"]
    assert e.groups[1].examples == ["dog/empty.jpg"]

    low = r.lowest_confidence
    assert [x.image_path for x in low] == ["fox/b.png", "cat/b.png", "dog/b.png", "dog/a.png", "cat/a.png", "fox/a.png"]
    assert low[0].pred_label == "cat" and low[0].label_name == "fox"
    assert r.skipped.count == 1
    json.loads(dumps(r))  # JSON-clean (no NaN)


def test_histogram_bins_are_exact():
    s = stats.score_stats(np.array([0.0, 0.049, 0.05, 0.5, 0.999, 1.0], dtype=np.float32))
    counts = s.histogram.counts
    assert counts[0] == 2 and counts[1] == 1 and counts[10] == 1 and counts[19] == 2
    empty = stats.score_stats(np.zeros(0, np.float32))
    assert empty.count == 0 and empty.percentiles["p50"] is None and sum(empty.histogram.counts) == 0


def test_labels_matched_by_index_when_model_has_no_class_names(tmp_path):
    out = write_fake_run(tmp_path / "out", model_classes=["0", "1", "2"])
    r = build.build_report(out, RUN)
    assert r.accuracy.matched_by == "index"
    assert r.accuracy.correct == 4
    assert r.accuracy.columns == ["0", "1", "2"]
    assert accuracy_of_run(out, RUN) == {
        "accuracy": pytest.approx(4 / 6),
        "correct": 4,
        "labelled": 6,
        "matched_by": "index",
        "reason": None,
        "normalized": [],
    }


@pytest.mark.parametrize(
    ("folder", "model", "expected"),
    [
        (CLASSES, ["fox", "owl", "cat", "dog"], "name"),  # more model classes, other order: by name
        (CLASSES, ["0", "1", "2"], "index"),  # generic names, same count
        (CLASSES, ["car", "plane", "ship"], "index"),  # same count: index, as before
        (CLASSES, [str(i) for i in range(10)], "none"),  # names and counts differ
        (["2024-01", "2024-02"], ["cat", "dog", "fox"], "none"),  # "flat" folder of dated subfolders
        (None, ["0", "1", "2", "3"], "index"),  # old manifest without folder classes
    ],
)
def test_label_matching_modes(folder, model, expected):
    from imgscore.report.evaluate import label_matching, unmatched_reason

    assert label_matching(folder, model) == expected
    assert (unmatched_reason(folder, model) is None) == (expected != "none")


TEN = [f"class_{i}" for i in range(10)]  # a 10-class model whose names are not the folder's


def test_accuracy_is_na_when_labels_cannot_be_paired(tmp_path, capsys):
    """3 folder classes, a 10-class model with other names: index matching would claim 4/6."""
    from rich.console import Console

    from imgscore.report.terminal import print_report

    out = write_fake_run(tmp_path / "out", model_classes=TEN)
    r = build.build_report(out, RUN)
    acc = r.accuracy
    assert (acc.accuracy, acc.correct, acc.labelled, acc.matched_by) == (None, None, 6, "none")
    assert "counts differ (folder 3, model 10)" in acc.reason and "e.g. cat, dog, fox" in acc.reason
    # still a label × prediction count table, without a "correct" diagonal
    assert acc.rows == CLASSES and acc.columns == ["class_0", "class_1", "class_2"]
    assert acc.matrix == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert [(p.support, p.correct, p.recall) for p in acc.per_class] == [(2, None, None)] * 3
    run_acc = accuracy_of_run(out, RUN)
    assert (run_acc["accuracy"], run_acc["correct"], run_acc["matched_by"]) == (None, None, "none")
    assert run_acc["reason"] == acc.reason

    # json: null + reason
    data = json.loads(dumps(r))
    assert data["accuracy"]["accuracy"] is None and data["accuracy"]["reason"] == acc.reason
    assert cli_main(["report", RUN, "--format", "json", "--set", f"output.root={out}"]) == 0
    cli_data = json.loads(capsys.readouterr().out)
    assert cli_data["accuracy"]["accuracy"] is None and cli_data["accuracy"]["reason"] == acc.reason

    # html: n/a card and sentence with the reason, no number
    page = html.render_html(r)
    assert '<div class="card"><b>n/a</b><span>accuracy</span></div>' in page
    assert "Accuracy n/a: folder classes are not model class names" in page
    assert "0.6667" not in page and "matched by index" not in page and "by index (folder" not in page
    assert len(_data_uris(page, "image/svg+xml")) == 3  # the count table is still plotted

    # Prefect markdown + table artifacts
    md = markdown.markdown_summary(r, "/x/report.html")
    assert "Accuracy **n/a**: folder classes are not model class names" in md and "0.6667" not in md
    assert "| class_0 | 2 | 33.3% | – | – |" in md  # per-class rows are model classes; none is a folder class
    assert markdown.summary_row(r)[0]["accuracy"] is None

    # terminal table
    buf = io.StringIO()
    print_report(r, Console(file=buf, width=400))
    text = buf.getvalue()
    (line,) = [ln for ln in text.splitlines() if ln.startswith("accuracy")]
    assert "n/a: folder classes are not model class names" in line and "(6 labelled)" in line
    assert "0.6667" not in text


def test_confusion_by_name_with_more_model_classes_and_other_column():
    import pyarrow as pa

    model = ["bird", "cat", "dog", *[f"x{i}" for i in range(30)]]
    # folder classes cat, dog; predictions: cat→cat, cat→x0..x24 (25 distinct extra classes), dog→dog
    rows = [("cat", 0, 1), ("dog", 1, 2)] + [("cat", 0, 3 + i) for i in range(25)]
    t = pa.table(
        {
            "label": pa.array([r[1] for r in rows], pa.int32()),
            "label_name": [r[0] for r in rows],
            "pred_index": pa.array([r[2] for r in rows], pa.int32()),
            "pred_label": [model[r[2]] for r in rows],
        }
    )
    conf = confusion(t, ["cat", "dog"], model)
    assert conf.matched_by == "name"
    assert conf.columns[:2] == ["cat", "dog"] and conf.columns[-1] == "(other)"
    assert len(conf.columns) == 2 + 20 + 1
    assert conf.matrix[0][0] == 1 and conf.matrix[1][1] == 1
    assert sum(conf.matrix[0]) == 26 and conf.matrix[0][-1] == 5
    assert (conf.correct, conf.labelled) == (2, 27)


def test_flat_folder_has_no_accuracy(tmp_path):
    out = tmp_path / "out"
    write_fake_run(out)
    t_path = part_dir(out, "predictions", "2026-01-01", RUN) / part_name(0)
    import pyarrow.parquet as pq

    t = pq.read_table(t_path)
    t = t.set_column(t.schema.get_field_index("label"), "label", __import__("pyarrow").nulls(t.num_rows, "int32"))
    write_table_atomic(t.cast(PREDICTIONS_SCHEMA), t_path)
    r = build.build_report(out, RUN)
    assert r.accuracy is None
    assert "Confusion" not in html.render_html(r)


def test_missing_run_names_the_runs_there(fake_run):
    from imgscore.errors import UsageError

    with pytest.raises(UsageError, match=r"run 'nope' not found .*20260101T000000Z-abc123.*output\.root"):
        build.build_report(fake_run, "nope")


# ---------------------------------------------------------------------------------- HTML


def _data_uris(page: str, kind: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(rf'src="data:{re.escape(kind)};base64,([A-Za-z0-9+/=]+)"', page)]


def test_html_is_self_contained_with_plots_thumbnails_and_escaping(fake_run):
    r = build.build_report(fake_run, RUN)
    path = html.write_html_report(r, fake_run)
    assert path == fake_run / "runs" / RUN / "report.html"
    page = path.read_text(encoding="utf-8")
    assert "<script" not in page.lower() and "<link" not in page.lower()
    assert not re.search(r'(src|href)="(https?:)?//', page), "nothing may be fetched"
    svgs = _data_uris(page, "image/svg+xml")
    assert len(svgs) == 3  # class distribution, confidence histogram, confusion matrix
    assert all(s.lstrip().startswith(b"<?xml") and b"<svg" in s for s in svgs)
    jpegs = _data_uris(page, "image/jpeg")
    assert len(jpegs) == 6
    thumbs = [Image.open(io.BytesIO(b)) for b in jpegs]
    assert all(max(t.size) == thumbnails.THUMB_PX for t in thumbs)  # 300x200 → 112x75
    # fox/b.png (least confident, first) is fully transparent: composited on white, not black
    assert np.asarray(thumbs[0].convert("L")).mean() > 245
    # text from files is escaped; numbers are on the page
    assert "dog/<b>odd</b>.jpg" not in page and "dog/&lt;b&gt;odd&lt;/b&gt;.jpg" in page
    assert "UnidentifiedImageError" in page and "0.6667" in page
    assert "cat/x.heic" in page  # skipped files listed


HOSTILE = ["<script>alert(1)</script>", '" onmouseover="alert(1)', "it's & <b>bold</b>"]  # model class names


def test_hostile_class_names_show_as_text_in_the_page(tmp_path, fake_images):
    """Class names come from the checkpoint or the folder (untrusted): through the template they
    are text in every place they appear (per-class table, thumbnail captions), never markup,
    and an attribute value cannot be closed by a quote in a name."""
    out = write_fake_run(tmp_path / "out", fake_images, model_classes=HOSTILE)
    page = html.write_html_report(build.build_report(out, RUN), out).read_text(encoding="utf-8")
    assert "<script" not in page.lower() and 'onmouseover="' not in page and "<b>bold" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&quot; onmouseover=&quot;alert(1)" in page and "it&#x27;s &amp; &lt;b&gt;bold&lt;/b&gt;" in page
    assert page.count("<b>") == page.count("</b>")  # only the page's own markup


def test_thumbnail_of_missing_or_broken_file_is_a_reason(tmp_path):
    uri, why = thumbnails.thumbnail_data_uri(tmp_path / "nope.jpg")
    assert uri is None and why == "file not found"
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    uri, why = thumbnails.thumbnail_data_uri(bad)
    assert uri is None and "UnidentifiedImageError" in why


def test_html_shows_placeholder_when_input_root_is_gone(tmp_path):
    out = write_fake_run(tmp_path / "out", tmp_path / "moved-away")
    page = html.write_html_report(build.build_report(out, RUN), out).read_text()
    assert page.count("file not found") == 6 and not _data_uris(page, "image/jpeg")


@pytest.mark.chromium
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs headless Chromium (Debian package chromium)")
def test_report_renders_in_headless_chromium(fake_run, tmp_path):
    path = html.write_html_report(build.build_report(fake_run, RUN), fake_run)
    shot = tmp_path / "report.png"
    cmd = [
        "chromium",
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--window-size=1280,2400",
        f"--screenshot={shot}",
        path.resolve().as_uri(),
    ]
    subprocess.run(cmd, capture_output=True, timeout=90, check=True)
    im = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert im.shape[:2] == (2400, 1280)

    def pixels_near(rgb, tol=12):
        return int((np.abs(im - np.array(rgb)).max(axis=2) <= tol).sum())

    assert pixels_near((0x3B, 0x6E, 0xA8)) > 2000  # class-distribution bars drawn (the SVG rendered)
    assert pixels_near((0x5A, 0x9E, 0x6F)) > 500  # confidence histogram bars
    assert pixels_near((0xC0, 0x39, 0x2B), tol=20) > 20  # status badge / wrong-label marks
    shutil.copy(shot, Path("/tmp") / "imgscore_report_screenshot.png")  # for a human to look at


# ---------------------------------------------------------------------------------- CLI


def test_cli_report_table_json_html(fake_run, capsys):
    assert cli_main(["report", RUN, "--set", f"output.root={fake_run}"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"scanned\s+9", out) and re.search(r"already_scored\s+4", out) and re.search(r"failed\s+3", out)
    assert "UnidentifiedImageError" in out and "0.6667" in out

    assert cli_main(["report", RUN, "--format", "json", "--set", f"output.root={fake_run}"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["counts"]["scored"] == 6 and data["accuracy"]["correct"] == 4

    assert cli_main(["report", RUN, "--format", "html", "--set", f"output.root={fake_run}"]) == 0
    printed = capsys.readouterr().out.strip()
    assert Path(printed) == fake_run / "runs" / RUN / "report.html" and Path(printed).stat().st_size > 10_000


def test_per_class_cells_have_numbers_when_classes_match_by_index(tmp_path, capsys):
    """Model classes "0", "1", "2" and folder classes cat, dog, fox pair by index: the per-class
    table's "in folder" and "recall" cells show folder class i's numbers on model class i's row
    (they showed "–" while the JSON had them)."""
    out = write_fake_run(tmp_path / "out", model_classes=["0", "1", "2"])
    acc = build.build_report(out, RUN).accuracy
    for i, name in enumerate(["0", "1", "2"]):
        assert acc.per_class_of(name) == acc.per_class[i] and acc.per_class_of(name).support > 0
    assert cli_main(["report", RUN, "--set", f"output.root={out}"]) == 0
    table = capsys.readouterr().out
    for i, name in enumerate(["0", "1", "2"]):
        p = acc.per_class[i]
        row = next(line for line in table.splitlines() if re.match(rf"\W*{name}\s", line))
        assert re.search(rf"\b{p.support}\s+\W*{p.recall:.3f}", row), row
    md = markdown.markdown_summary(build.build_report(out, RUN), None)
    assert "– | – |" not in md and "| 0 | " in md


def test_report_piped_to_a_file_never_wraps_a_path(tmp_path, fake_images, capsys):
    """Not a terminal (capsys, `> file`, `| less`): paths longer than 80 columns stay on one line."""
    out = write_fake_run(tmp_path / ("a_long_output_folder_name_" * 6) / "out", fake_images)
    assert cli_main(["report", RUN, "--format", "html", "--set", f"output.root={out}"]) == 0
    capsys.readouterr()
    assert cli_main(["report", RUN, "--set", f"output.root={out}"]) == 0
    text = capsys.readouterr().out
    path = str(out / "runs" / RUN / "report.html")
    assert len(path) > 200 and any(path in line for line in text.splitlines())


def test_report_of_a_killed_run_says_abandoned_and_lists_known_bad(out_root, fake_images, capsys, caplog):
    """A manifest left ``running`` with no live lock owner (kill -9, OOM, reboot) reads as
    ``abandoned`` with the rerun command; images carried by the failure ledger are counted with
    the file that lists them, in every rendering — and the page is written, on a bucket as on disk."""
    out = write_fake_run(str(out_root), fake_images)
    mpath = storage.join(out, "runs", RUN, "manifest.json")
    m = json.loads(storage.read_bytes(mpath))
    m["status"] = "running"
    m["counts"]["already_failed"] = 2
    m["incremental"] = {
        "skip_scored": True,
        "carried": {"file": "already_failed.parquet", "by_error_type": {"DecodeError.corrupt": 2}, "by_run": {"r0": 2}},
    }
    storage.write_bytes(mpath, json.dumps(m).encode())
    lock = json.dumps({"pid": 999_999_999, "host": "gone", "started_s": 0}).encode()  # owner gone
    storage.write_bytes(storage.join(out, "runs", RUN, ".lock"), lock)
    r = build.build_report(out, RUN)
    assert r.status == "abandoned" and r.rerun == f"imgscore rerun {RUN} --set output.root={out}"
    known_bad_file = storage.join(out, "runs", RUN, "already_failed.parquet")
    assert r.known_bad.model_dump() == {
        "count": 2,
        "file": known_bad_file,
        "by_error_type": {"DecodeError.corrupt": 2},
        "by_run": {"r0": 2},
    }
    assert r.outputs["report"] is None  # never written
    with caplog.at_level(logging.WARNING, logger="imgscore"):
        written = publish_run_report(out, RUN)  # what the flow's last step does
    assert written == storage.join(out, "runs", RUN, "report.html") and "not written" not in caplog.text
    page = storage.read_bytes(written).decode()
    assert "2 image(s) failed before with the same bytes" in page and known_bad_file in page and "st-abandoned" in page
    assert cli_main(["report", RUN, "--set", f"output.root={out}"]) == 0
    text = capsys.readouterr().out
    assert "abandoned" in text and r.rerun in text and re.search(r"already_failed\s+2", text)
    assert "2 image(s) failed before with the same bytes" in text and "already_failed.parquet" in text
    page = html.render_html(r)
    assert "st-abandoned" in page and "2 image(s) failed before" in page
    assert "already failed" in markdown.markdown_summary(r, None) and "Known bad" in markdown.markdown_summary(r, None)


def test_report_of_a_live_run_says_it_is_running_and_offers_no_rerun(tmp_path, fake_images, capsys):
    """A run whose lock a live process holds: `imgscore rerun` would be refused (locked), so the
    report names the writer (pid, host) instead of offering it — in every rendering."""
    import socket
    import sys
    import time

    from imgscore.runstate import lock as run_lock

    out = write_fake_run(tmp_path / "out", fake_images)
    mpath = out / "runs" / RUN / "manifest.json"
    m = json.loads(mpath.read_text())
    m["status"] = "running"
    mpath.write_text(json.dumps(m))
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (out / "runs" / RUN / ".lock").write_text(
            json.dumps(
                {
                    "pid": writer.pid,
                    "host": socket.gethostname(),
                    "started_s": run_lock._start_time(writer.pid),
                    "purpose": "imgscore run",
                    "acquired_at": "2026-03-01T02:00:00+00:00",
                    "acquired_s": time.time(),
                }
            )
        )
        r = build.build_report(out, RUN)
        assert r.status == "running" and r.rerun is None
        assert r.writer == f"imgscore run (pid {writer.pid} on {socket.gethostname()}, since 2026-03-01T02:00:00+00:00)"
        assert cli_main(["report", RUN, "--set", f"output.root={out}"]) == 0
        text = capsys.readouterr().out
        assert f"still running: imgscore run (pid {writer.pid} on {socket.gethostname()}" in text
        assert "imgscore rerun" not in text and "finish it with" not in text
        page = html.render_html(r)
        assert f"still running: imgscore run (pid {writer.pid}" in page and "imgscore rerun" not in page
    finally:
        writer.kill()
        writer.wait()
    r = build.build_report(out, RUN)  # its writer gone without an ending: abandoned, and now the rerun finishes it
    assert r.status == "abandoned" and r.writer is None and r.rerun == f"imgscore rerun {RUN} --set output.root={out}"


@pytest.mark.parametrize("model_has", ["every folder class", "three classes"])
def test_ten_thousand_empty_class_folders_give_a_small_report_quickly(model_has, tmp_path, fake_images, capsys):
    """10,000 empty class folders beside the 3 that hold images: report.html was 9.4 MB and took
    minutes (a 10,003-row confusion matrix, drawn, and 40 bars of never-predicted classes). Only
    classes that appear are tabled and drawn; the rest is one "and N more" line."""
    import time

    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = sorted(CLASSES + [f"empty_{i:05d}" for i in range(10_000)])
    model_classes = folder if model_has == "every folder class" else CLASSES
    out = write_fake_run(tmp_path / "out", fake_images, model_classes=CLASSES)
    mpath = out / "runs" / RUN / "manifest.json"
    m = json.loads(mpath.read_text())
    m["input"]["classes"] = folder
    m["model"].update(classes=model_classes, num_classes=len(model_classes))
    mpath.write_text(json.dumps(m))
    part = next((out / "predictions").rglob("part-*.parquet"))
    t = pq.read_table(part)
    labels = [folder.index(n) for n in t["label_name"].to_pylist()]
    preds = [model_classes.index(CLASSES[p]) for p in t["pred_index"].to_pylist()]
    t = t.set_column(t.schema.get_field_index("label"), "label", pa.array(labels, pa.int32()))
    t = t.set_column(t.schema.get_field_index("pred_index"), "pred_index", pa.array(preds, pa.int32()))
    pq.write_table(t, part)

    t0 = time.perf_counter()
    r = build.build_report(out, RUN)
    path = html.write_html_report(r, out)
    took = time.perf_counter() - t0
    assert took < 20, f"report took {took:.1f} s"  # was 75-235 s on a 2-core machine
    assert path.stat().st_size < 500_000, path.stat().st_size  # was 15-31 MB
    assert [c.name for c in r.classes] == CLASSES  # only predicted classes, never the empty ones
    acc = r.accuracy
    assert acc.rows == CLASSES and acc.empty_classes == 10_000 and acc.labelled == 6
    page = path.read_text()
    assert page.count("empty_") <= 12  # at most the few examples of why accuracy is n/a, not 10,000 rows
    if model_has == "every folder class":
        assert acc.accuracy == pytest.approx(4 / 6) and acc.columns == CLASSES  # paired by name, as before
        assert r.classes_left_out.model_dump() == {"count": 10_000, "never_predicted": 10_000}
        assert "and 10000 more classes, not listed: 10000 of the model&#x27;s classes were never predicted" in page
        assert cli_main(["report", RUN, "--set", f"output.root={out}"]) == 0
        assert "and 10000 more classes, not listed" in capsys.readouterr().out
    else:
        assert acc.accuracy is None and r.classes_left_out is None


def test_the_drawn_confusion_matrix_keeps_the_largest_classes():
    rows = [f"c{i}" for i in range(100)]
    matrix = [[0] * 101 for _ in rows]
    for i in range(100):
        matrix[i][i] = i + 1  # class c99 has the most images
        matrix[i][100] = 1
    names, cols, mat, left = plots._bounded_matrix(rows, [*rows, "(other)"], matrix, paired=True)
    assert names == [f"c{i}" for i in range(60, 100)] and left == 60
    assert cols[:40] == names and cols[-1] == "(other)"
    assert mat.sum() == sum(i + 2 for i in range(60, 100))  # every image of the kept rows is in a drawn cell


def test_cli_report_unknown_run_exits_2(fake_run, capsys):
    assert cli_main(["report", "nope", "--set", f"output.root={fake_run}"]) == 2
    assert "run 'nope' not found" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- artifacts content


def test_artifact_keys_are_valid_and_stable():
    assert markdown.artifact_key("score-images", "summary") == "score-images-summary"
    assert markdown.artifact_key("Score Images_v2!", "Progress") == "score-images-v2-progress"
    for k in (markdown.artifact_key("rerun_failed", "report"), markdown.artifact_key("--X--", "y")):
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", k)


def test_summary_row_and_markdown(fake_run):
    r = build.build_report(fake_run, RUN)
    (row,) = markdown.summary_row(r)
    assert (row["run_id"], row["scored"], row["failed"], row["already_scored"]) == (RUN, 6, 3, 4)
    assert row["accuracy"] == pytest.approx(4 / 6, abs=1e-6)
    md = markdown.markdown_summary(r, "/x/report.html")
    assert "| dog | 3 | 50.0% | 2 | 1.000 |" in md
    assert "| decode | UnidentifiedImageError | 2 |" in md
    assert "`/x/report.html`" in md


def test_report_failure_is_logged_not_raised(fake_run, monkeypatch, caplog):
    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(html, "write_html_report", boom)
    with caplog.at_level(logging.WARNING, logger="imgscore"):
        assert publish_run_report(fake_run, RUN) is None
    assert "report.html for 20260101T000000Z-abc123 not written: OSError: disk full" in caplog.text
    with caplog.at_level(logging.WARNING, logger="imgscore"):
        assert publish_run_report(fake_run, "no-such-run") is None
    assert "run report for no-such-run not written" in caplog.text
    monkeypatch.setattr(build, "build_report", lambda *a, **k: 1 / 0)  # a bug in the report, not a bad run
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="imgscore"):
        assert publish_run_report(fake_run, RUN) is None
    (line,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert (
        line.getMessage() == f"run report for {RUN} not written: ZeroDivisionError: division by zero"
        and line.exc_info is None
    )


def test_progress_artifact_outside_a_run_is_inert():
    p = RunProgressArtifact.start({"run_id": RUN, "shards": [{"images": 5}], "counts": {}})
    assert p.artifact_id is None and p.total == 5
    assert p.update({"run_id": RUN, "counts": {"scored": 5, "failed": 0}}) is None


def test_progress_artifact_counts_given_total_and_done(monkeypatch):
    """The rerun's use: its own total and done (not the manifest's), its own title; 100 % at once
    when there is nothing to do. Prefect's API functions are replaced by recorders."""
    import prefect.artifacts

    from imgscore.flows import artifacts as arts

    calls = []
    monkeypatch.setattr(arts, "_in_run", lambda: True)
    monkeypatch.setattr(
        prefect.artifacts, "create_progress_artifact", lambda p, **kw: calls.append(("create", p, kw)) or "aid"
    )
    monkeypatch.setattr(
        prefect.artifacts, "update_progress_artifact", lambda aid, p, **kw: calls.append(("update", p, kw))
    )
    m = {"run_id": RUN, "shards": [{"images": 5}, {"images": 5}], "counts": {"scored": 9, "failed": 1}}
    p = RunProgressArtifact.start(
        m, flow_name="rerun-failed", min_interval_s=0.0, total=3, title=f"imgscore rerun of {RUN}"
    )
    assert calls == [
        ("create", 0.0, {"key": "rerun-failed-progress", "description": f"imgscore rerun of {RUN}: 0/3 images"})
    ]
    assert p.update(m, done=1) == pytest.approx(33.33) and p.update(m, done=3) == 100.0
    assert calls[-1] == ("update", 100.0, {"description": f"imgscore rerun of {RUN}: 3/3 images, 1 errors"})
    assert RunProgressArtifact.start(m, min_interval_s=0.0).update(m) == 100.0  # default: the manifest's 10/10
    calls.clear()
    empty = RunProgressArtifact.start(m, flow_name="rerun-failed", total=0)
    assert calls[0][1] == 100.0 and empty.last_progress == 100.0


# ---------------------------------------------------------------------------------- progress bar


def test_progress_fields_and_hook():
    from rich.console import Console

    from imgscore.runstate.manifest import Counts, Manifest, ShardRecord

    manifest = Manifest(
        run_id=RUN,
        counts=Counts(scanned=80, scored=30, failed=2, pending=48),
        shards=[ShardRecord(shard_id=0, images=40), ShardRecord(shard_id=1, images=40)],
        timings={"planned_at_s": 1000.0},
    )
    f = prog.progress_fields(manifest, now=1016.0)
    assert f == {"total": 80, "done": 32, "errors": 2, "rate": "2.0"}
    console = Console(file=io.StringIO(), force_terminal=True, width=100)
    bar = prog._bar(console)
    hook = prog.make_hook(bar)
    hook(manifest, None)
    task = bar.tasks[0]
    assert (task.total, task.completed, task.fields["errors"]) == (80, 32, 2)
    manifest.counts.scored, manifest.counts.failed = 78, 2
    hook(manifest, None)
    assert bar.tasks[0].completed == 80 and len(bar.tasks) == 1


def test_progress_off_when_quiet_or_not_a_terminal(monkeypatch):
    from rich.console import Console

    before = prog.listeners()
    with prog.progress_for(Console(file=io.StringIO()), enabled=False):
        assert prog.listeners() == before
    monkeypatch.setattr("sys.stdout.isatty", lambda: False, raising=False)
    with prog.progress_for(Console(file=io.StringIO()), enabled=True):
        assert prog.listeners() == before
    monkeypatch.setattr(prog.sys, "stdout", type("Tty", (io.StringIO,), {"isatty": lambda self: True})())
    with prog.progress_for(Console(file=io.StringIO(), force_terminal=True), enabled=True):
        assert len(prog.listeners()) == len(before) + 1
    assert prog.listeners() == before


# ---------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_run_writes_report_and_artifacts(prefect_server, image_folder, tiny_checkpoint, tmp_path):
    from prefect.artifacts import Artifact

    (image_folder / "rocket" / "zero.jpg").write_bytes(b"")
    (image_folder / "coffee" / "notes.jpg").write_text("not a jpeg")
    out = tmp_path / "out"
    cfg = build_config({}, base_overrides(image_folder, tiny_checkpoint, out, **{"run.max_error_rate": 0.5}))
    code, summary = execute(cfg, quiet=True)
    assert code == 0
    run_id = summary["run_id"]
    assert (summary["scanned"], summary["scored"], summary["failed"]) == (14, 12, 2)

    report_path = out / "runs" / run_id / "report.html"
    assert summary["report"] == str(report_path) and report_path.is_file()
    page = report_path.read_text()
    assert len(_data_uris(page, "image/svg+xml")) == 3  # labelled folder: the confusion matrix too
    assert len(_data_uris(page, "image/jpeg")) == 12  # real thumbnails read back from input.root
    assert "coffee/notes.jpg" in page and "rocket/zero.jpg" in page

    r = build.build_report(out, run_id)
    assert r.accuracy.matched_by == "index" and r.accuracy.labelled == 12
    assert sum(c.predicted for c in r.classes) == 12
    assert r.errors.by_stage == {"decode": 2}

    summ = Artifact.get("score-images-summary")
    (row,) = json.loads(summ.data)
    assert (row["run_id"], row["scanned"], row["scored"], row["failed"]) == (run_id, 14, 12, 2)
    md = Artifact.get("score-images-report")
    assert run_id in md.data and str(report_path) in md.data and "| decode |" in md.data
    prog_art = Artifact.get("score-images-progress")
    assert prog_art.type == "progress" and float(prog_art.data) == 100.0
    assert prog_art.flow_run_id == summ.flow_run_id == md.flow_run_id

    # the CLI reads the same run back
    assert cli_main(["report", run_id, "--set", f"output.root={out}", "--quiet"]) == 0


def test_report_reads_only_its_own_run(tmp_path):
    out = write_fake_run(tmp_path / "out")
    write_fake_run(out, run_id="20260102T000000Z-def456")
    r = build.build_report(out, RUN)
    assert r.rows.model_dump() == {"predictions": 6, "errors": 3}
    assert sum(c.predicted for c in r.classes) == 6 and r.accuracy.labelled == 6
