"""The shard's three steps (imgscore.inference.score): only the DataLoader's own failures become a
ShardError, the steps compose for any list of images, and a rerun's merge keeps index order."""

from __future__ import annotations

import pyarrow as pa
import pytest

from imgscore.errors import ShardError
from imgscore.inference.loader import loader_batches
from imgscore.io.parquet import ERRORS_SCHEMA, PREDICTIONS_SCHEMA
from imgscore.runstate.rerun_plan import merge_partial


class _Loader:
    """Stands for a DataLoader whose iterator fails the way torch's does (a RuntimeError from
    ``__next__``: a killed worker, a timeout) after ``ok`` batches."""

    def __init__(self, ok: int, exc: BaseException):
        self.ok, self.exc = ok, exc

    def __iter__(self):
        yield from range(self.ok)
        raise self.exc


def test_a_dataloader_failure_becomes_a_shard_error():
    got = []
    with pytest.raises(
        ShardError, match=r"shard 7: DataLoader failed: DataLoader worker \(pid 1\) is killed by signal: Bus error"
    ):
        for b in loader_batches(
            _Loader(2, RuntimeError("DataLoader worker (pid 1) is killed by signal: Bus error")), 7
        ):
            got.append(b)
    assert got == [0, 1]


def test_an_error_in_the_scoring_code_is_not_relabelled():
    """The guard wraps only the loader's own calls: an error raised while a batch is being
    scored (here a RuntimeError, as a model bug would raise) reaches the caller as itself."""
    with pytest.raises(RuntimeError, match="a bug in scoring") as info:
        for _ in loader_batches(_Loader(3, RuntimeError("not reached")), 0):
            raise RuntimeError("a bug in scoring")
    assert not isinstance(info.value, ShardError)


def _pred(path: str, score: float) -> dict:
    import datetime as dt

    return {
        "run_id": "r",
        "image_path": path,
        "label": None,
        "label_name": None,
        "pred_index": 0,
        "pred_label": "a",
        "score": score,
        "topk_indices": [0],
        "topk_scores": [score],
        "model_id": "m",
        "device": "cpu",
        "worker": "h:1",
        "shard_id": 0,
        "batch_id": 0,
        "scored_at": dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        "file_size": 1,
        "file_mtime_ns": 1,
    }


def _err(path: str, attempt: int) -> dict:
    import datetime as dt

    return {
        "run_id": "r",
        "image_path": path,
        "shard_id": 0,
        "batch_id": 0,
        "stage": "decode",
        "error_type": "DecodeError.truncated",
        "message": "x",
        "attempt": attempt,
        "occurred_at": dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        "worker": "h:1",
    }


def test_merge_of_a_partial_shard_keeps_index_order_and_old_rows():
    order = pa.array(["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"])
    old_pred = pa.Table.from_pylist(
        [_pred("a.jpg", 0.1), _pred("c.jpg", 0.3), _pred("e.jpg", 0.5)], schema=PREDICTIONS_SCHEMA
    )
    old_err = pa.Table.from_pylist([_err("b.jpg", 1), _err("d.jpg", 1)], schema=ERRORS_SCHEMA)
    new_pred = pa.Table.from_pylist([_pred("d.jpg", 0.9)], schema=PREDICTIONS_SCHEMA)  # d fixed; b still fails
    new_err = pa.Table.from_pylist([_err("b.jpg", 2)], schema=ERRORS_SCHEMA)
    preds, errs = merge_partial(old_pred, old_err, new_pred, new_err, ["b.jpg", "d.jpg"], order)
    assert preds["image_path"].to_pylist() == ["a.jpg", "c.jpg", "d.jpg", "e.jpg"]
    assert preds["score"].to_pylist() == pytest.approx([0.1, 0.3, 0.9, 0.5])
    assert [(r["image_path"], r["attempt"]) for r in errs.to_pylist()] == [("b.jpg", 2)]
