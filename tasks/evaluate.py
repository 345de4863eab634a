"""Read a run's predictions back and compare them with the folder labels.

Matching folder labels to model outputs: when every folder class name is also a model class name
(the usual case: the model was trained on folders like these) labels are matched **by name**
(``label_name == pred_label``), so a model with more classes, or the same classes in another
order, is judged correctly. Otherwise (a checkpoint without class names predicts ``"0"``, ``"1"``,
…) they are matched **by index** (``label == pred_index``), as torchvision's ImageFolder numbers
classes in sorted folder order. The mode used is always returned as ``matched_by``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

MAX_EXTRA_COLUMNS = 20  # confusion matrix: predicted classes outside the folder classes kept by name


def read_run(out_root: str | Path, run_id: str, table: str = "predictions", columns: list[str] | None = None):
    """One run's rows as a pyarrow Table, through ``pyarrow.dataset`` with hive partitioning.

    Returns an empty table with the dataset's schema when the run has no rows.
    """
    dset = ds.dataset(Path(out_root) / table, format="parquet", partitioning="hive")
    return dset.to_table(columns=columns, filter=pc.field("run_id") == run_id)


def label_matching(folder_classes: list[str] | None, model_classes: list[str] | None) -> str:
    """``"name"`` when every folder class is a model class name, else ``"index"`` (see module doc)."""
    if folder_classes and model_classes and set(folder_classes) <= set(model_classes):
        return "name"
    return "index"


def correct_mask(t: pa.Table, matched_by: str) -> pa.ChunkedArray:
    """Boolean per row of ``t`` (columns label, label_name, pred_index, pred_label): prediction right."""
    if matched_by == "name":
        return pc.equal(t["label_name"], t["pred_label"])
    return pc.equal(t["label"], t["pred_index"])


def _run_classes(out_root: str | Path, run_id: str) -> tuple[list[str] | None, list[str] | None]:
    path = Path(out_root) / "runs" / run_id / "manifest.json"
    if not path.is_file():
        return None, None
    m = json.loads(path.read_text(encoding="utf-8"))
    return (m.get("input") or {}).get("classes"), (m.get("model") or {}).get("classes")


def accuracy_of_run(out_root: str | Path, run_id: str) -> dict:
    """Top-1 accuracy over the labelled predictions of a run.

    Returns:
        ``{accuracy, correct, labelled, matched_by}``; accuracy is a fraction in [0, 1], NaN when
        nothing is labelled. ``matched_by`` is ``name`` or ``index`` (module doc), decided from
        the run's manifest (``index`` when there is none).
    """
    t = read_run(out_root, run_id, columns=["label", "label_name", "pred_index", "pred_label"])
    labelled = t.filter(pc.is_valid(t["label"]))
    matched_by = label_matching(*_run_classes(out_root, run_id))
    correct = int(pc.sum(correct_mask(labelled, matched_by)).as_py() or 0)
    n = labelled.num_rows
    return {"accuracy": correct / n if n else float("nan"), "correct": correct, "labelled": n, "matched_by": matched_by}


def confusion(t: pa.Table, folder_classes: list[str] | None, model_classes: list[str]) -> dict:
    """Confusion matrix of the labelled rows of ``t`` (label, label_name, pred_index, pred_label).

    Rows are the folder classes (in label order); columns start with the model class each folder
    class should be predicted as (so the diagonal is "correct"), followed by the other predicted
    classes in model-index order, at most :data:`MAX_EXTRA_COLUMNS` of them; the rest are summed
    into a last ``(other)`` column.

    Returns:
        ``{rows: [names], columns: [names], matrix: [[int]], matched_by, correct, labelled,
        accuracy, per_class: [{name, support, correct, recall}]}``, or None when no row is
        labelled.
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

    def diag_col(i: int) -> int | None:  # model index that row i should be predicted as
        if matched_by == "name":
            return model_classes.index(rows[i])
        return i if i < n_model else None

    diag = [diag_col(i) for i in range(len(rows))]
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
        matrix[lab][col_of.get(p, other)] += 1
    per_class = []
    for i, name in enumerate(rows):
        support = sum(matrix[i])
        ok = matrix[i][i] if diag[i] is not None else 0
        per_class.append({"name": name, "support": support, "correct": ok, "recall": ok / support if support else None})
    correct = sum(pc_["correct"] for pc_ in per_class)
    n = len(labels)
    return {
        "rows": rows,
        "columns": columns,
        "matrix": matrix,
        "matched_by": matched_by,
        "correct": correct,
        "labelled": n,
        "accuracy": correct / n,
        "per_class": per_class,
    }
