"""Names from the wild: Unicode NFD folder names (macOS) against NFC class lists, and
``$``, ``\\``, ``^``, ``_`` in class and file names, which matplotlib would read as math text.

Class names are compared after NFC normalization everywhere they are compared (folder vs model
classes, report matching, incremental skip keys); files are still opened by their raw bytes;
the report says when names matched only after normalization. Every label renders literally and
no name can cost a run its report.
"""

from __future__ import annotations

import json
import logging
import os
import unicodedata
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.dataset as pads
import pytest
import torch
from prefect import get_run_logger  # noqa: F401  (configures Prefect's logging now, not inside a test after caplog)

from imgscore.flows.artifacts import (
    publish_run_report,  # imports Prefect, which configures logging: before caplog
)
from imgscore.flows.cli import main as cli_main
from imgscore.io.parquet import (
    ERRORS_SCHEMA,
    PREDICTIONS_SCHEMA,
    make_table,
    part_dir,
    part_name,
    write_table_atomic,
)
from imgscore.report import build, html, markdown, plots, stats
from imgscore.report.evaluate import Confusion, accuracy_of_run, label_matching, normalized_matches
from imgscore.report.model import ClassCount
from tests.conftest import base_overrides

NFD_ECOLE = unicodedata.normalize("NFD", "école")  # e + U+0301, as macOS writes folder names
NFC_ECOLE = unicodedata.normalize("NFC", "école")  # U+00E9, as class lists hold it
assert NFD_ECOLE != NFC_ECOLE
RUN = "20260102T000000Z-names1"


def write_run(out: Path, folder_classes: list[str], model_classes: list[str], rows: list[tuple[int, int, str]]) -> Path:
    """A finished run by hand: rows are (label, pred_index, image_path)."""
    now = datetime(2026, 1, 2, tzinfo=UTC)
    preds = [
        {
            "run_id": RUN,
            "image_path": path,
            "label": lab,
            "label_name": folder_classes[lab],
            "pred_index": p,
            "pred_label": model_classes[p],
            "score": 0.9,
            "topk_indices": [p],
            "topk_scores": [0.9],
            "model_id": "e" * 64,
            "model_name": "resnet18",
            "device": "cpu",
            "worker": "h:1",
            "shard_id": 0,
            "batch_id": 0,
            "scored_at": now,
            "file_size": 1,
            "file_mtime_ns": 1,
        }
        for lab, p, path in rows
    ]
    write_table_atomic(
        make_table(preds, PREDICTIONS_SCHEMA), part_dir(out, "predictions", "2026-01-02", RUN) / part_name(0)
    )
    write_table_atomic(make_table([], ERRORS_SCHEMA), part_dir(out, "errors", "2026-01-02", RUN) / part_name(0))
    manifest = {
        "run_id": RUN,
        "run_date": "2026-01-02",
        "status": "complete",
        "created_at": now.isoformat(),
        "input": {"root": None, "layout": "imagefolder", "classes": folder_classes},
        "counts": {
            "scanned": len(rows),
            "scored": len(rows),
            "failed": 0,
            "skipped": 0,
            "already_scored": 0,
            "pending": 0,
        },
        "model": {
            "arch": "resnet18",
            "model_id": "e" * 64,
            "classes": model_classes,
            "num_classes": len(model_classes),
        },
        "shards": [{"shard_id": 0, "images": len(rows), "state": "complete", "scored": len(rows), "failed": 0}],
        "outputs": {},
        "timings": {},
    }
    (out / "runs" / RUN).mkdir(parents=True)
    (out / "runs" / RUN / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_nfd_folder_names_match_nfc_model_classes_by_name(tmp_path):
    """Folder classes sort as [cat, école(NFD), fox], the model's are [cat, fox, école(NFC)]: three
    of four images are right by name; matching by index (what happened before) claims one."""
    folder = ["cat", NFD_ECOLE, "fox"]
    model = ["cat", "fox", NFC_ECOLE]
    rows = [(0, 0, "cat/a.jpg"), (1, 2, f"{NFD_ECOLE}/a.jpg"), (1, 2, f"{NFD_ECOLE}/b.jpg"), (2, 0, "fox/a.jpg")]
    out = write_run(tmp_path / "out", folder, model, rows)
    assert label_matching(folder, model) == "name" and normalized_matches(folder, model) == [NFD_ECOLE]
    acc = accuracy_of_run(out, RUN)
    assert (acc["accuracy"], acc["matched_by"], acc["normalized"]) == (0.75, "name", [NFD_ECOLE])
    r = build.build_report(out, RUN)
    assert r.accuracy.accuracy == 0.75 and r.accuracy.per_class[1].recall == 1.0
    note = r.accuracy.normalization_note()
    assert "only after Unicode NFC normalization" in note and NFD_ECOLE in note
    assert "Unicode NFC normalization" in markdown.markdown_summary(r, None)
    page = html.render_html(r)
    assert "only after Unicode NFC normalization" in page
    assert r.accuracy.per_class_of(NFC_ECOLE).support == 2  # the model's name finds the folder's class


def test_raw_names_equal_give_no_normalization_note(tmp_path):
    out = write_run(tmp_path / "out", ["cat", NFC_ECOLE], ["cat", NFC_ECOLE], [(0, 0, "cat/a.jpg"), (1, 1, "é/a.jpg")])
    r = build.build_report(out, RUN)
    assert r.accuracy.normalized == [] and r.accuracy.normalization_note() is None


MATH_NAMES = ["price_$5_to_$10", "a\\b^c_d", "$x$", "under_score"]


def test_incremental_skip_keys_match_names_in_nfc(photos, tmp_path):
    """The same files, named in NFD on disk now and in NFC in an earlier run's rows (the folder
    went through a macOS share): already scored, by stat and by content hash alike."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from imgscore.images.entries import ImageEntry, ImageIndex
    from imgscore.images.scan import scan_images
    from imgscore.io.file_ops import sha256_of_file
    from imgscore.runstate.already_scored import split_already_scored
    from imgscore.runstate.incremental import HASHES_FILE, HASHES_SCHEMA
    from tests.test_incremental import MODEL, _fake_prior_run

    root = tmp_path / "images"
    root.mkdir()
    for i, name in enumerate((f"{NFD_ECOLE}_1.jpg", "plain.jpg", f"caf{unicodedata.normalize('NFD', 'é')}.jpg")):
        photos["coffee"].resize((40 + i, 30)).save(root / name, format="JPEG")
    index = scan_images(root)
    assert any(e.image_path != unicodedata.normalize("NFC", e.image_path) for e in index.entries)
    as_nfc = [ImageEntry(unicodedata.normalize("NFC", e.rel), None, None, e.size, e.mtime_ns) for e in index.entries]
    out = tmp_path / "out"
    _fake_prior_run(out, root, ImageIndex(root, "flat", [], as_nfc), MODEL)
    assert split_already_scored(scan_images(root), out, MODEL, "stat").already_scored == 3
    # touched since (new mtime, same bytes): the sha256 key, also in NFC, still finds them
    hashes = [
        {"image_path": e.image_path, "size": e.size, "mtime_ns": e.mtime_ns, "sha256": sha256_of_file(root / r.rel)}
        for e, r in zip(as_nfc, index.entries, strict=True)
    ]
    pq.write_table(pa.Table.from_pylist(hashes, schema=HASHES_SCHEMA), out / "runs" / "r0" / HASHES_FILE)
    for e in index.entries:
        os.utime(root / e.rel, ns=(e.mtime_ns, e.mtime_ns + 10**9))
    assert split_already_scored(scan_images(root), out, MODEL, "stat").already_scored == 0
    assert split_already_scored(scan_images(root), out, MODEL, "sha256").already_scored == 3


def test_plot_labels_render_literally(monkeypatch):
    """Every Text in every plot is made with math-text parsing off (matplotlib then draws the
    string as written); before, ``price_$5_to_$10`` raised ValueError while saving."""
    figs = []
    real = plots._svg_data_uri
    monkeypatch.setattr(plots, "_svg_data_uri", lambda fig: figs.append(fig) or real(fig))
    classes = [ClassCount(index=i, name=n, predicted=i + 1, share=0.25) for i, n in enumerate(MATH_NAMES)]
    conf = Confusion(
        matrix=[[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]],
        rows=MATH_NAMES,
        columns=MATH_NAMES,
        accuracy=1.0,
        matched_by="name",
        reason=None,
        normalized=[],
        correct=4,
        labelled=4,
        per_class=[],
        empty_classes=0,
    )
    assert plots.plot_class_distribution(classes).startswith("data:image/svg+xml;base64,")
    assert plots.plot_confusion_matrix(conf).startswith("data:image/svg+xml;base64,")
    assert plots.plot_confidence_histogram(stats.score_stats(__import__("numpy").array([0.1, 0.5, 0.9]))) is not None
    texts = [t for fig in figs for t in fig.findobj(lambda a: hasattr(a, "get_parse_math"))]
    shown = {t.get_text() for t in texts}
    assert set(MATH_NAMES) <= shown
    assert all(not t.get_parse_math() for t in texts)


def test_report_failure_is_one_line_without_traceback(tmp_path, monkeypatch, caplog):
    out = write_run(tmp_path / "out", ["cat"], ["cat"], [(0, 0, "cat/a.jpg")])

    def boom(*a, **k):
        raise ValueError("price_$5_to_$10\n      ^\nParseSyntaxException: Expected end of text")

    monkeypatch.setattr(html, "write_html_report", boom)
    with caplog.at_level(logging.DEBUG, logger="imgscore"):
        assert publish_run_report(out, RUN) is None
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in warnings] == [f"report.html for {RUN} not written: ValueError: price_$5_to_$10"]
    assert all(r.exc_info is None for r in warnings)  # the traceback only at debug (--verbose)


def test_a_plot_that_cannot_be_drawn_costs_only_itself(tmp_path, monkeypatch):
    out = write_run(tmp_path / "out", ["cat", "dog"], ["cat", "dog"], [(0, 0, "cat/a.jpg"), (1, 0, "dog/a.jpg")])

    def boom(*a, **k):
        raise ValueError("bad glyph\nsecond line")

    monkeypatch.setattr(plots, "plot_confusion_matrix", boom)
    page = html.render_html(build.build_report(out, RUN))
    assert "confusion matrix not drawn: ValueError: bad glyph" in page and "second line" not in page
    assert page.count("data:image/svg+xml") == 2


@pytest.mark.slow
def test_names_end_to_end_report_written_and_matched_by_name(prefect_server, photos, tiny_model, tmp_path, capfd):
    """A real run: class folders named in NFD and with math-text characters, a checkpoint whose
    class list is NFC in another order. The run writes report.html, prints no traceback (even
    without -q), `imgscore report --format html` exits 0, and accuracy is the share of rows whose
    label and prediction name the same class in NFC — whatever the random model predicts."""
    folder_names = ["a_b^c\\d", NFD_ECOLE, "price_$5_to_$10"]
    model_classes = ["a_b^c\\d", "price_$5_to_$10", NFC_ECOLE]
    root = tmp_path / "images"
    for i, cls in enumerate(folder_names):
        (root / cls).mkdir(parents=True)
        for j, photo in enumerate(("chelsea", "coffee")):
            photos[photo].resize((80 + 8 * i, 64)).save(root / cls / f"img_{j}_$^{i}.jpg")
    ckpt = tmp_path / "named.pt"
    torch.save({"model": tiny_model.state_dict(), "classes": model_classes}, ckpt)
    out = tmp_path / "out"
    sets = [a for kv in base_overrides(root, ckpt, out, **{"run.run_id": "names"}) for a in ("--set", kv)]
    ours = logging.getLogger("imgscore")
    level = ours.level
    try:
        assert cli_main(["run", *sets]) == 0
    finally:
        ours.setLevel(level)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "not written" not in err
    assert (out / "runs" / "names" / "report.html").stat().st_size > 10_000
    assert cli_main(["report", "names", "--format", "html", "--set", f"output.root={out}"]) == 0
    assert capfd.readouterr().out.strip() == str(out / "runs" / "names" / "report.html")
    assert cli_main(["report", "names", "--format", "json", "--set", f"output.root={out}"]) == 0
    report = json.loads(capfd.readouterr().out)
    rows = pads.dataset(str(out / "predictions"), format="parquet", partitioning="hive").to_table().to_pylist()
    assert len(rows) == 6 and {r["label_name"] for r in rows} == set(folder_names)  # raw folder names kept
    right = sum(
        unicodedata.normalize("NFC", r["label_name"]) == unicodedata.normalize("NFC", r["pred_label"]) for r in rows
    )
    acc = report["accuracy"]
    assert acc["matched_by"] == "name" and acc["normalized"] == [NFD_ECOLE]
    assert acc["correct"] == right and acc["accuracy"] == pytest.approx(right / 6)
