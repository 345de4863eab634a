"""Read a run's predictions back and compare them with the folder labels.

Matching folder labels to model outputs (:func:`label_matching`), first rule that applies:

- **by name** (``label_name == pred_label``) when every folder class name is also a model class
  name (the usual case: the model was trained on folders like these), so a model with more
  classes, or the same classes in another order, is judged correctly;
- **by index** (``label == pred_index``) when the folder has as many classes as the model (a
  checkpoint without class names predicts ``"0"``, ``"1"``, …; torchvision's ImageFolder numbers
  classes in sorted folder order), or when either class list is unknown (an old manifest);
- **none** otherwise: names differ *and* counts differ (a 3-class folder scored by a 10-class
  model whose names are not the folder's, or a "flat" folder of date subfolders that ``auto``
  read as classes). There is no defensible pairing, so accuracy is ``None`` ("n/a") with a
  ``reason`` (:func:`unmatched_reason`) instead of a number matched by index.

The mode used is always returned as ``matched_by`` (``"name"``, ``"index"`` or ``"none"``).

Names are compared after Unicode NFC normalization (:func:`nfc`): macOS writes folder names in
NFD (``e`` + combining accent), most class lists hold NFC (``é``), and the two must be one class.
Folder names that matched a model class only after normalization are listed
(:func:`normalized_matches`) so the report can say so.
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from imgscore.io import storage
from imgscore.runstate.commits import manifest_path

MAX_EXTRA_COLUMNS = 20  # confusion matrix: predicted classes outside the folder classes kept by name


def read_run(out_root: str | Path, run_id: str, table: str = "predictions", columns: list[str] | None = None):
    """One run's rows as a pyarrow Table, through ``pyarrow.dataset`` with hive partitioning.

    Returns an empty table with the dataset's schema when the run has no rows.
    """
    fs, where = storage.arrow_filesystem(storage.join(out_root, table))
    dset = ds.dataset(where, format="parquet", partitioning="hive", filesystem=fs)
    return dset.to_table(columns=columns, filter=pc.field("run_id") == run_id)


def nfc(name: str) -> str:
    """``name`` in Unicode normalization form C, the form names are compared in."""
    return unicodedata.normalize("NFC", name)


def normalized_matches(folder_classes: list[str] | None, model_classes: list[str] | None) -> list[str]:
    """Folder class names that equal a model class name only after NFC normalization."""
    if not folder_classes or not model_classes:
        return []
    raw = set(model_classes)
    norm = {nfc(c) for c in model_classes}
    return [c for c in folder_classes if c not in raw and nfc(c) in norm]


def label_matching(folder_classes: list[str] | None, model_classes: list[str] | None) -> str:
    """How folder labels pair with model outputs: ``"name"``, ``"index"`` or ``"none"`` (module doc).

    ``"index"`` also when either list is None or empty (unknown: the behaviour before
    ``"none"`` existed). Never raises.
    """
    if not folder_classes or not model_classes:
        return "index"
    if {nfc(c) for c in folder_classes} <= {nfc(c) for c in model_classes}:
        return "name"
    if len(folder_classes) == len(model_classes):
        return "index"
    return "none"


def _names(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (", …" if len(names) > n else "")


def unmatched_reason(folder_classes: list[str] | None, model_classes: list[str] | None) -> str | None:
    """Why accuracy is n/a for these class lists (one short sentence), or None when
    :func:`label_matching` pairs them by name or by index."""
    if label_matching(folder_classes, model_classes) != "none":
        return None
    norm = {nfc(c) for c in model_classes}
    missing = [c for c in folder_classes if nfc(c) not in norm]
    return (
        f"folder classes are not model class names ({len(missing)} of {len(folder_classes)} missing, e.g. {_names(missing)}) "
        f"and the counts differ (folder {len(folder_classes)}, model {len(model_classes)}), "
        "so labels match neither by name nor by index"
    )


def correct_mask(t: pa.Table, matched_by: str) -> pa.ChunkedArray:
    """Boolean per row of ``t`` (columns label, label_name, pred_index, pred_label): prediction right.

    Raises:
        ValueError: ``matched_by`` is not ``"name"`` or ``"index"`` (``"none"`` has no notion of
            right: do not compute a mask for it).
    """
    if matched_by == "name":
        return pc.equal(pc.utf8_normalize(t["label_name"], "NFC"), pc.utf8_normalize(t["pred_label"], "NFC"))
    if matched_by == "index":
        return pc.equal(t["label"], t["pred_index"])
    raise ValueError(f"matched_by={matched_by!r} has no correct/incorrect; expected 'name' or 'index' (see imgscore.report.evaluate)")


def _run_classes(out_root: str | Path, run_id: str) -> tuple[list[str] | None, list[str] | None]:
    path = manifest_path(out_root, run_id)
    if not storage.is_file(path):
        return None, None
    m = json.loads(storage.read_bytes(path))
    return (m.get("input") or {}).get("classes"), (m.get("model") or {}).get("classes")


def accuracy_of_run(out_root: str | Path, run_id: str) -> dict:
    """Top-1 accuracy over the labelled predictions of a run.

    Returns:
        ``{accuracy, correct, labelled, matched_by, reason, normalized}``. ``matched_by`` is ``name``,
        ``index`` or ``none`` (module doc), decided from the run's manifest (``index`` when there
        is none). For ``name``/``index``: accuracy is a fraction in [0, 1] (NaN when nothing is
        labelled), ``correct`` an int and ``reason`` None. For ``none``: ``accuracy`` and
        ``correct`` are None and ``reason`` says why (:func:`unmatched_reason`). ``normalized``
        lists the folder names that matched only after NFC normalization
        (:func:`normalized_matches`; empty unless matched by name).

    Raises:
        FileNotFoundError: no ``predictions`` dataset under ``out_root`` (pyarrow's error).
    """
    t = read_run(out_root, run_id, columns=["label", "label_name", "pred_index", "pred_label"])
    labelled = t.filter(pc.is_valid(t["label"]))
    folder_classes, model_classes = _run_classes(out_root, run_id)
    matched_by = label_matching(folder_classes, model_classes)
    n = labelled.num_rows
    if matched_by == "none":
        return {"accuracy": None, "correct": None, "labelled": n, "matched_by": matched_by,
                "reason": unmatched_reason(folder_classes, model_classes), "normalized": []}
    correct = int(pc.sum(correct_mask(labelled, matched_by)).as_py() or 0)
    normalized = normalized_matches(folder_classes, model_classes) if matched_by == "name" else []
    return {"accuracy": correct / n if n else float("nan"), "correct": correct, "labelled": n, "matched_by": matched_by, "reason": None,
            "normalized": normalized}


def confusion(t: pa.Table, folder_classes: list[str] | None, model_classes: list[str]) -> dict:
    """Confusion matrix of the labelled rows of ``t`` (label, label_name, pred_index, pred_label).

    Rows are the folder classes that hold labelled rows (in label order; ``empty_classes`` counts
    the folder classes left out for having none, so 10,000 empty class folders cost nothing);
    columns start with the model class each folder
    class should be predicted as (so the diagonal is "correct"), followed by the other predicted
    classes in model-index order, at most :data:`MAX_EXTRA_COLUMNS` of them; the rest are summed
    into a last ``(other)`` column. When labels cannot be paired with model classes
    (``matched_by == "none"``, module doc) there is no diagonal: the columns are only the
    predicted classes, so the matrix is a plain folder-label × prediction count table.

    Returns:
        ``{rows: [names], columns: [names], matrix: [[int]], matched_by, reason, normalized,
        correct, labelled, accuracy, per_class: [{name, support, correct, recall}], empty_classes}``, or None when no row
        is labelled. ``accuracy`` is a fraction in [0, 1] and ``reason`` None when matched by
        name or index; with ``matched_by == "none"``, ``accuracy``, ``correct`` and every
        ``per_class`` ``correct``/``recall`` are None and ``reason`` says why
        (:func:`unmatched_reason`).
    """
    labelled = t.filter(pc.is_valid(t["label"]))
    if labelled.num_rows == 0:
        return None
    matched_by = label_matching(folder_classes, model_classes)
    labels = labelled["label"].to_pylist()
    label_names = labelled["label_name"].to_pylist()
    pred_idx = labelled["pred_index"].to_pylist()
    if folder_classes:
        rows = list(folder_classes)
    else:  # no class list in the manifest: rebuild it from (label, label_name)
        pairs = dict(zip(labels, label_names, strict=True))
        rows = [pairs.get(i, str(i)) for i in range(max(labels) + 1)]
    n_model = len(model_classes)
    paired = matched_by != "none"

    model_index = {}
    for j, c in enumerate(model_classes):
        model_index.setdefault(nfc(c), j)

    def diag_col(i: int) -> int | None:  # model index that row i should be predicted as
        if matched_by == "name":
            return model_index[nfc(rows[i])]
        return i if i < n_model else None

    present = sorted(set(labels))  # folder classes with images in this run; empty class folders get no row
    empty = len(rows) - len(present)
    row_of = {lab: k for k, lab in enumerate(present)}
    diag = [diag_col(i) for i in present] if paired else []
    rows = [rows[i] for i in present]
    in_diag = {c for c in diag if c is not None}
    extra_counts: dict[int, int] = {}
    for p in pred_idx:
        if p not in in_diag:
            extra_counts[p] = extra_counts.get(p, 0) + 1
    kept = sorted(sorted(extra_counts, key=lambda p: -extra_counts[p])[:MAX_EXTRA_COLUMNS])
    col_of: dict[int, int] = {}
    columns: list[str] = []
    for i, c in enumerate(diag):
        columns.append(model_classes[c] if c is not None else f"(none for {rows[i]})")
        if c is not None:
            col_of[c] = i
    for p in kept:
        col_of[p] = len(columns)
        columns.append(model_classes[p] if 0 <= p < n_model else str(p))
    other = len(columns) if len(extra_counts) > len(kept) else None
    if other is not None:
        columns.append("(other)")
    matrix = [[0] * len(columns) for _ in rows]
    for lab, p in zip(labels, pred_idx, strict=True):
        matrix[row_of[lab]][col_of.get(p, other)] += 1
    per_class = []
    for i, name in enumerate(rows):
        support = sum(matrix[i])
        if not paired:
            per_class.append({"name": name, "support": support, "correct": None, "recall": None})
            continue
        ok = matrix[i][i] if diag[i] is not None else 0
        per_class.append({"name": name, "support": support, "correct": ok, "recall": ok / support if support else None})
    n = len(labels)
    correct = sum(pc_["correct"] for pc_ in per_class) if paired else None
    return {
        "rows": rows,
        "columns": columns,
        "matrix": matrix,
        "matched_by": matched_by,
        "reason": None if paired else unmatched_reason(folder_classes, model_classes),
        "normalized": normalized_matches(folder_classes, model_classes) if matched_by == "name" else [],
        "correct": correct,
        "labelled": n,
        "accuracy": correct / n if paired else None,
        "per_class": per_class,
        "empty_classes": empty,
    }
