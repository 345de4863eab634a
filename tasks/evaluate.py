"""Read a run's predictions back and compare them with the folder labels."""

from __future__ import annotations

from pathlib import Path

import pyarrow.compute as pc
import pyarrow.dataset as ds


def read_run(out_root: str | Path, run_id: str, table: str = "predictions", columns: list[str] | None = None):
    """One run's rows as a pyarrow Table, through ``pyarrow.dataset`` with hive partitioning."""
    dset = ds.dataset(Path(out_root) / table, format="parquet", partitioning="hive")
    return dset.to_table(columns=columns, filter=pc.field("run_id") == run_id)


def accuracy_of_run(out_root: str | Path, run_id: str) -> dict:
    """Top-1 accuracy over the labelled predictions of a run: {accuracy, correct, labelled}."""
    t = read_run(out_root, run_id, columns=["label", "pred_index"])
    labelled = t.filter(pc.is_valid(t["label"]))
    correct = int(pc.sum(pc.equal(labelled["label"], labelled["pred_index"])).as_py() or 0)
    n = labelled.num_rows
    return {"accuracy": correct / n if n else float("nan"), "correct": correct, "labelled": n}
