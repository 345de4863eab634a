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

import functools
import json
import unicodedata
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
from pydantic import BaseModel, ConfigDict

from imgscore.io import storage
from imgscore.io.storage import AnyPath
from imgscore.runstate.commits import manifest_path

MAX_EXTRA_COLUMNS = 20  # confusion matrix: predicted classes outside the folder classes kept by name

MatchedBy = Literal["name", "index", "none"]


class ClassRecall(BaseModel):
    """One folder class (a row of the confusion matrix): ``support`` labelled images, ``correct``
    of them predicted as its paired model class, ``recall`` = correct / support in [0, 1].
    ``correct`` and ``recall`` are None when labels cannot be paired (``matched_by == "none"``),
    ``recall`` also when ``support`` is 0."""

    model_config = ConfigDict(extra="forbid")

    name: str
    support: int
    correct: int | None
    recall: float | None


class Confusion(BaseModel):
    """A run's predictions against its folder labels (:func:`confusion`): the report's ``accuracy``.

    ``matrix[i][j]`` counts images of folder class ``rows[i]`` predicted as ``columns[j]``.
    ``accuracy`` is correct / labelled in [0, 1]; it and ``correct`` are None, and ``reason``
    says why, when labels cannot be paired with model classes (``matched_by == "none"``).
    """

    model_config = ConfigDict(extra="forbid")

    rows: list[str]
    columns: list[str]
    matrix: list[list[int]]
    matched_by: MatchedBy
    reason: str | None
    normalized: list[str]
    correct: int | None
    labelled: int
    accuracy: float | None
    per_class: list[ClassRecall]
    empty_classes: int

    def normalization_note(self) -> str | None:
        """One sentence when folder names matched model classes only after Unicode NFC
        normalization (same letters, other bytes: macOS writes NFD), else None."""
        names = self.normalized
        if not names:
            return None
        shown = ", ".join(repr(n) for n in names[:3]) + (", …" if len(names) > 3 else "")
        return (
            f"{len(names)} folder name(s) matched the model's class names only after Unicode NFC normalization "
            f"({shown}): same letters, other bytes (macOS writes names in NFD)"
        )

    def per_class_of(self, model_class: str) -> ClassRecall | None:
        """The folder class paired with ``model_class`` (names compared in NFC), or None.

        Matched by index, folder class i is paired with model class i (the diagonal column),
        whatever either is called; matched by name (or not at all) the names are the same.
        """
        return self._per_model_class.get(nfc(model_class))

    @functools.cached_property
    def _per_model_class(self) -> dict[str, ClassRecall]:
        if self.matched_by == "index":
            cols = self.columns
            paired = [(cols[i], p) for i, p in enumerate(self.per_class) if i < len(cols)]
            return {nfc(c): p for c, p in paired if not c.startswith("(none for ")}
        return {nfc(p.name): p for p in self.per_class}


def read_run(out_root: AnyPath, run_id: str, table: str = "predictions", columns: list[str] | None = None) -> pa.Table:
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


def label_matching(folder_classes: list[str] | None, model_classes: list[str] | None) -> MatchedBy:
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
    if not folder_classes or not model_classes or label_matching(folder_classes, model_classes) != "none":
        return None
    norm = {nfc(c) for c in model_classes}
    missing = [c for c in folder_classes if nfc(c) not in norm]
    return (
        f"folder classes are not model class names ({len(missing)} of {len(folder_classes)} missing, e.g. "
        f"{_names(missing)}) and the counts differ (folder {len(folder_classes)}, model {len(model_classes)}), so "
        "labels match neither by name nor by index"
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
    raise ValueError(
        f"matched_by={matched_by!r} has no correct/incorrect; expected 'name' or 'index' (see imgscore.report.evaluate)"
    )


def _run_classes(out_root: AnyPath, run_id: str) -> tuple[list[str] | None, list[str] | None]:
    path = manifest_path(out_root, run_id)
    if not storage.is_file(path):
        return None, None
    m = json.loads(storage.read_bytes(path))
    return (m.get("input") or {}).get("classes"), (m.get("model") or {}).get("classes")


def accuracy_of_run(out_root: AnyPath, run_id: str) -> dict:
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
        return {
            "accuracy": None,
            "correct": None,
            "labelled": n,
            "matched_by": matched_by,
            "reason": unmatched_reason(folder_classes, model_classes),
            "normalized": [],
        }
    correct = int(pc.sum(correct_mask(labelled, matched_by)).as_py() or 0)
    normalized = normalized_matches(folder_classes, model_classes) if matched_by == "name" else []
    return {
        "accuracy": correct / n if n else float("nan"),
        "correct": correct,
        "labelled": n,
        "matched_by": matched_by,
        "reason": None,
        "normalized": normalized,
    }


def confusion(t: pa.Table, folder_classes: list[str] | None, model_classes: list[str]) -> Confusion | None:
    """Confusion matrix of the labelled rows of ``t`` (label, label_name, pred_index, pred_label).

    Rows are the folder classes that hold labelled rows (in label order; ``empty_classes`` counts
    the folder classes left out for having none, so 10,000 empty class folders cost nothing);
    columns start with the model class each folder class should be predicted as (so the diagonal
    is "correct"), followed by the other predicted classes in model-index order, at most
    :data:`MAX_EXTRA_COLUMNS` of them; the rest are summed into a last ``(other)`` column. When
    labels cannot be paired with model classes (``matched_by == "none"``, module doc) there is no
    diagonal: the columns are only the predicted classes, so the matrix is a plain folder-label ×
    prediction count table.

    Returns:
        The :class:`Confusion`, or None when no row is labelled. ``accuracy`` is a fraction in
        [0, 1] and ``reason`` None when matched by name or index; with ``matched_by == "none"``,
        ``accuracy``, ``correct`` and every ``per_class`` ``correct``/``recall`` are None and
        ``reason`` says why (:func:`unmatched_reason`).
    """
    labelled = t.filter(pc.is_valid(t["label"]))
    if labelled.num_rows == 0:
        return None
    matched_by = label_matching(folder_classes, model_classes)
    labels: list[int] = labelled["label"].to_pylist()
    pred_idx: list[int] = labelled["pred_index"].to_pylist()
    names = _folder_names(folder_classes, labels, labelled["label_name"].to_pylist())
    present = sorted(set(labels))  # folder classes with images in this run; empty class folders get no row
    rows = [names[i] for i in present]
    diag = _diagonal(present, names, model_classes, matched_by) if matched_by != "none" else []
    columns, col_of = _columns(diag, rows, pred_idx, model_classes)
    row_of = {lab: k for k, lab in enumerate(present)}
    matrix = [[0] * len(columns) for _ in rows]
    for lab, p in zip(labels, pred_idx, strict=True):
        matrix[row_of[lab]][col_of[p]] += 1
    per_class = _per_class(rows, matrix, diag, paired=matched_by != "none")
    correct = sum(p.correct or 0 for p in per_class) if matched_by != "none" else None
    n = len(labels)
    return Confusion(
        rows=rows,
        columns=columns,
        matrix=matrix,
        matched_by=matched_by,
        reason=unmatched_reason(folder_classes, model_classes),
        normalized=normalized_matches(folder_classes, model_classes) if matched_by == "name" else [],
        correct=correct,
        labelled=n,
        accuracy=correct / n if correct is not None else None,
        per_class=per_class,
        empty_classes=len(names) - len(present),
    )


def _folder_names(folder_classes: list[str] | None, labels: list[int], label_names: list[str]) -> list[str]:
    """Folder class names by label; without a class list in the manifest, rebuilt from the rows'
    (label, label_name) pairs."""
    if folder_classes:
        return list(folder_classes)
    pairs = dict(zip(labels, label_names, strict=True))
    return [pairs.get(i, str(i)) for i in range(max(labels) + 1)]


def _diagonal(
    present: list[int], names: list[str], model_classes: list[str], matched_by: MatchedBy
) -> list[int | None]:
    """For each folder class in ``present``, the model index it should be predicted as (None when
    matched by index and the model has fewer classes)."""
    if matched_by == "name":
        model_index: dict[str, int] = {}
        for j, c in enumerate(model_classes):
            model_index.setdefault(nfc(c), j)
        return [model_index[nfc(names[i])] for i in present]
    return [i if i < len(model_classes) else None for i in present]


def _columns(
    diag: list[int | None], rows: list[str], pred_idx: list[int], model_classes: list[str]
) -> tuple[list[str], dict[int, int]]:
    """(column names, predicted model index → its column): the diagonal's model classes first,
    then the :data:`MAX_EXTRA_COLUMNS` most predicted other classes in index order, then
    ``(other)`` for the rest when there are more."""
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
        columns.append(model_classes[p] if 0 <= p < len(model_classes) else str(p))
    if len(extra_counts) > len(kept):
        col_of.update((p, len(columns)) for p in extra_counts if p not in col_of)
        columns.append("(other)")
    return columns, col_of


def _per_class(rows: list[str], matrix: list[list[int]], diag: list[int | None], paired: bool) -> list[ClassRecall]:
    """Support, correct and recall of each row; correct/recall None when labels are not paired."""
    out = []
    for i, name in enumerate(rows):
        support = sum(matrix[i])
        if not paired:
            out.append(ClassRecall(name=name, support=support, correct=None, recall=None))
            continue
        ok = matrix[i][i] if diag[i] is not None else 0
        out.append(ClassRecall(name=name, support=support, correct=ok, recall=ok / support if support else None))
    return out
