"""Analytics-ready Parquet: two runs into one output root, read by DuckDB, pandas, pyarrow and
polars exactly as docs/results.md shows; one schema (and per-run metadata) on every part file.

Run 1 scores a 3-class folder of 12 photos plus a class of 4 broken files (so one shard has an
empty predictions file). Run 2 scores the same folder with the same settings, but its shard 1
cannot run (retries exhausted), so those 4 images keep their run-1 prediction as the latest.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

import imgscore.tasks.score_shard as shard_tasks
from imgscore.config.loading import build_config
from imgscore.errors import ShardError
from imgscore.flows.cli import execute
from imgscore.inference.model import file_sha256
from imgscore.io.parquet import ERRORS_SCHEMA, PREDICTIONS_SCHEMA, config_hash
from tests.conftest import base_overrides, doc_section, make_image_folder

pytestmark = pytest.mark.slow

SETTINGS = {"run.shard_size": 4, "run.max_error_rate": 0.5, "run.shard_retries": 0}


@pytest.fixture(scope="module")
def two_runs(prefect_server, photos, tiny_checkpoint, tmp_path_factory):
    base = tmp_path_factory.mktemp("analytics")
    root = make_image_folder(base / "images", photos)
    (root / "zzz").mkdir()
    for i in range(4):
        (root / "zzz" / f"broken_{i}.jpg").write_bytes(b"" if i % 2 else b"not a jpeg")
    out = base / "out"

    def run():
        return execute(build_config({}, base_overrides(root, tiny_checkpoint, out, **SETTINGS)), quiet=True)

    code1, s1 = run()
    real = shard_tasks.score_shard

    def shard_1_breaks(ref, *args, **kwargs):
        if ref.shard_id == 1:
            raise ShardError(f"shard {ref.shard_id}: DataLoader failed: simulated bus error")
        return real(ref, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(shard_tasks, "score_shard", shard_1_breaks)
        code2, s2 = run()
    return {
        "out": out,
        "root": root,
        "ckpt": tiny_checkpoint,
        "codes": (code1, code2),
        "runs": (s1["run_id"], s2["run_id"]),
        "summaries": (s1, s2),
    }


def test_two_runs_as_set_up(two_runs):
    s1, s2 = two_runs["summaries"]
    assert two_runs["codes"] == (0, 1)  # run 2 has a failed shard: over budget, everything else written
    assert (s1["scanned"], s1["scored"], s1["failed"]) == (16, 12, 4)
    assert (s2["scanned"], s2["scored"], s2["failed"]) == (16, 8, 8)
    assert s2["failed_shards"] == [1]
    assert Path(s2["report"]).is_file()  # the report is written for a failed run too


def test_duckdb_reads_both_runs_with_hive_partitioning(two_runs):
    out = two_runs["out"]
    r1, r2 = two_runs["runs"]
    con = duckdb.connect()
    rows = con.sql(
        f"SELECT run_id, typeof(run_date), count(*), count(DISTINCT image_path) "
        f"FROM read_parquet('{out}/predictions/**/*.parquet', hive_partitioning = true) GROUP BY ALL ORDER BY run_id"
    ).fetchall()
    assert rows == [(r1, "DATE", 12, 12), (r2, "DATE", 8, 8)]
    errs = dict(
        con.sql(
            f"SELECT run_id, count(*) FROM read_parquet('{out}/errors/**/*.parquet', hive_partitioning = true) GROUP "
            "BY ALL"
        ).fetchall()
    )
    assert errs == {r1: 4, r2: 8}
    kinds = con.sql(
        f"SELECT error_type, count(*) FROM read_parquet('{out}/errors/**/*.parquet', hive_partitioning = true) "
        f"WHERE run_id = '{r2}' GROUP BY ALL ORDER BY 1"
    ).fetchall()
    assert dict(kinds)["ShardFailed"] == 4


def _part_files(out: Path, table: str) -> list[Path]:
    return sorted((out / table).rglob("part-*.parquet"))


def test_every_part_file_has_identical_schema_and_run_metadata(two_runs):
    out = two_runs["out"]
    preds, errs = _part_files(out, "predictions"), _part_files(out, "errors")
    assert len(preds) == 8 and len(errs) == 8  # 4 shards per run, both tables, empty ones included
    empty = [p for p in preds if pq.read_metadata(p).num_rows == 0]
    assert len(empty) == 3  # the broken-only shard of each run + run 2's failed shard
    for files, schema in ((preds, PREDICTIONS_SCHEMA), (errs, ERRORS_SCHEMA)):
        schemas = [pq.read_schema(p) for p in files]
        for p, s in zip(files, schemas, strict=True):
            assert s.remove_metadata().equals(schema.remove_metadata()), p
        assert all(s.remove_metadata().equals(schemas[0].remove_metadata()) for s in schemas)

    want_torch = importlib.metadata.version("torch")
    model_id = file_sha256(two_runs["ckpt"])
    by_run: dict[str, set[bytes]] = {}
    for p in preds + errs:
        raw = pq.read_schema(p).metadata[b"imgscore"]
        run_id = p.parent.name  # OUT/<table>/run_date=D/RUN_ID/part-…
        by_run.setdefault(run_id, set()).add(raw)
    assert set(by_run) == set(two_runs["runs"])
    # within a run, every file (scored, empty, failed-shard, errors) carries the same metadata
    assert all(len(v) == 1 for v in by_run.values())
    metas = {rid: json.loads(next(iter(v))) for rid, v in by_run.items()}
    for rid, m in metas.items():
        assert m["run_id"] == rid and m["config"]["run"]["run_id"] == rid
        assert (m["arch"], m["model_id"], m["classes"]) == ("mobilenet_v3_small", model_id, ["0", "1", "2"])
        assert m["preprocess"]["crop"] == 224 and m["preprocess"]["resize"] == 256
        assert m["torch"] == want_torch and m["torchvision"] == importlib.metadata.version("torchvision")
    h1, h2 = (metas[r]["config_hash"] for r in two_runs["runs"])
    assert h1 == h2 == config_hash(metas[two_runs["runs"][0]]["config"])  # same settings, other run_id
    other = json.loads(json.dumps(metas[two_runs["runs"][0]]["config"]))
    other["run"]["shard_size"] = 5
    assert config_hash(other) != h1


def _documented_blocks() -> list[tuple[str, str]]:
    section = doc_section("results.md", "Reading the results")
    return re.findall(r"```(sql|python)\n(.*?)```", section, re.S)


def test_documented_examples_run_and_agree_on_latest_prediction(two_runs):
    out = two_runs["out"]
    r1, r2 = two_runs["runs"]
    blocks = [
        (lang, code.replace("'outputs/", f"'{out}/").replace('"outputs/', f'"{out}/'))
        for lang, code in _documented_blocks()
    ]
    assert {lang for lang, _ in blocks} == {"sql", "python"}
    assert (
        sum("pandas" in c for _, c in blocks)
        and sum("polars" in c for _, c in blocks)
        and sum("pyarrow.dataset" in c for _, c in blocks)
    )

    # which run each image's latest prediction comes from: shard 1 (4 images) failed in run 2
    latest_expected = None
    con = duckdb.connect()
    sql = "\n".join(code for lang, code in blocks if lang == "sql")
    statements = [s for s in sql.split(";") if re.sub(r"--[^\n]*", "", s).strip()]
    assert len(statements) == 4
    for stmt in statements:
        res = con.sql(stmt)
        rows = res.fetchall()
        assert rows, stmt
        if "QUALIFY" in stmt:
            cols = res.columns
            latest_expected = {r[cols.index("image_path")]: r[cols.index("run_id")] for r in rows}
    assert latest_expected is not None and len(latest_expected) == 12
    assert sorted(latest_expected.values()).count(r1) == 4 and sorted(latest_expected.values()).count(r2) == 8

    for lang, code in blocks:
        if lang != "python":
            continue
        ns: dict = {}
        exec(compile(code, "docs/results.md", "exec"), ns)  # noqa: S102 - our own documented examples
        if "latest" in ns:
            latest = ns["latest"]
            if hasattr(latest, "to_pandas") and not hasattr(latest, "iterrows"):
                latest = latest.to_pandas()
            got = dict(zip(latest["image_path"], latest["run_id"].astype(str), strict=True))
            assert got == latest_expected
        if "per_run" in ns:
            per_run = ns["per_run"]
            n = per_run["images"].sum() if hasattr(per_run, "columns") else None
            assert n is None or int(n) == 20
        if "table" in ns:
            assert ns["table"].num_rows == 20 and ns["meta"]["arch"] == "mobilenet_v3_small"


def _run_date(out: Path, run_id: str) -> str:
    return json.loads((out / "runs" / run_id / "manifest.json").read_text())["run_date"]


def _open_with_every_reader(folder: Path) -> dict[str, dict[str, tuple[int, set[str]]]]:
    """Open ``folder`` with each installed reader exactly as an analyst types it (no options
    beyond the defaults, except DuckDB's glob and hive flag and ``dataset``'s hive partitioning);
    return reader → run_id → (rows, run_date values as text), checking run_id is a plain string."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.dataset as pads

    def tally(run_ids, run_dates):
        got: dict[str, tuple[int, set[str]]] = {}
        for rid, d in zip(run_ids, run_dates, strict=True):
            n, dates = got.get(rid, (0, set()))
            got[rid] = (n + 1, dates | {str(d)})
        return got

    seen = {}
    df = pd.read_parquet(folder)
    assert not isinstance(df["run_id"].dtype, pd.CategoricalDtype)
    seen["pandas.read_parquet"] = tally(df["run_id"], df["run_date"])
    for name, t in (
        ("pyarrow.parquet.read_table", pq.read_table(folder)),
        ("pyarrow.dataset", pads.dataset(folder, format="parquet", partitioning="hive").to_table()),
    ):
        assert t.schema.field("run_id").type in (pa.string(), pa.large_string()), name
        seen[name] = tally(t["run_id"].to_pylist(), t["run_date"].to_pylist())
    try:
        import polars as pl
    except ImportError:
        pl = None
    if pl is not None:
        for name, f in (
            ("polars.read_parquet", pl.read_parquet(folder)),
            ("polars.scan_parquet", pl.scan_parquet(folder).collect()),
        ):
            assert f.schema["run_id"] == pl.String, name
            seen[name] = tally(f["run_id"].to_list(), f["run_date"].to_list())
    rows = duckdb.sql(
        f"SELECT run_id, run_date FROM read_parquet('{folder}/**/*.parquet', hive_partitioning = true)"
    ).fetchall()
    seen["duckdb"] = tally([r[0] for r in rows], [r[1] for r in rows])
    return seen


def test_each_installed_reader_opens_the_folders_untouched(two_runs):
    """Acceptance: pandas, pyarrow (read_table and dataset), polars and DuckDB
    open predictions/ and errors/ of a two-run output root as they are, with run_id a string
    column and run_date from the path; every reader sees every row of both runs. Spark follows by
    construction: its partition discovery takes only key=value folders (run_date), and run_id is
    a plain column in every file."""
    out = two_runs["out"]
    r1, r2 = two_runs["runs"]
    d1, d2 = _run_date(out, r1), _run_date(out, r2)
    want = {"predictions": {r1: (12, {d1}), r2: (8, {d2})}, "errors": {r1: (4, {d1}), r2: (8, {d2})}}
    for table in ("predictions", "errors"):
        seen = _open_with_every_reader(out / table)
        assert {"pandas.read_parquet", "pyarrow.parquet.read_table", "pyarrow.dataset", "duckdb"} <= set(seen)
        for reader, got in seen.items():
            assert got == want[table], f"{reader} on {table}/"


def test_rows_name_their_input_folder(two_runs):
    """Acceptance: input_root on every row of both tables, the absolute input.root."""
    out, root = two_runs["out"], two_runs["root"]
    for table in ("predictions", "errors"):
        t = pq.read_table(out / table, columns=["input_root"])
        assert t.num_rows > 0 and set(t["input_root"].to_pylist()) == {str(root)}


def test_latest_per_image_over_two_folders_keeps_both(prefect_server, photos, tiny_checkpoint, tmp_path):
    """Acceptance: A/x.jpg and B/x.jpg scored into one output root; every documented
    "latest prediction per image" query (DuckDB, pandas, polars) returns both images, one per
    folder — they partition by (input_root, image_path)."""
    out = tmp_path / "out"
    roots = []
    for name, photo in (("A", "chelsea"), ("B", "coffee")):
        root = tmp_path / name
        root.mkdir()
        photos[photo].convert("RGB").resize((96, 96)).save(root / "x.jpg")
        roots.append(root)
        assert execute(build_config({}, base_overrides(root, tiny_checkpoint, out)), quiet=True)[0] == 0
    blocks = [
        (lang, code.replace("'outputs/", f"'{out}/").replace('"outputs/', f'"{out}/'))
        for lang, code in _documented_blocks()
    ]
    n_latest = 0
    for lang, code in blocks:
        if lang == "sql":
            for stmt in code.split(";"):
                if "QUALIFY" in stmt:
                    res = duckdb.sql(stmt)
                    cols = res.columns
                    got = sorted((r[cols.index("input_root")], r[cols.index("image_path")]) for r in res.fetchall())
                    assert got == [(str(roots[0]), "x.jpg"), (str(roots[1]), "x.jpg")]
                    n_latest += 1
        else:
            ns: dict = {}
            exec(compile(code, "docs/results.md", "exec"), ns)  # noqa: S102 - our own documented examples
            if "latest" in ns:
                latest = ns["latest"]
                latest = (
                    latest.to_pandas() if hasattr(latest, "to_pandas") and not hasattr(latest, "iterrows") else latest
                )
                assert sorted(zip(latest["input_root"], latest["image_path"], strict=True)) == [
                    (str(roots[0]), "x.jpg"),
                    (str(roots[1]), "x.jpg"),
                ]
                n_latest += 1
    assert n_latest == 3  # DuckDB, pandas, polars


def test_an_output_root_of_the_layout_before_is_moved_in_place_and_then_reads_untouched(two_runs, tmp_path):
    """Output roots written before this layout (``run_date=D/run_id=RUN/``, files without
    input_root, errors without file_size/file_mtime_ns) do not read in pandas or read_table; the
    next imgscore run or rerun moves them (imgscore/runstate/migrate.py). Built here from a copy of the two
    runs, written back in the old layout and old schema; after the move every reader gets the same
    rows as from the original, input_root filled from each run's manifest, and the report reads."""
    import shutil

    import pandas as pd
    import pyarrow as pa

    from imgscore.report.build import build_report
    from imgscore.runstate import migrate

    out = tmp_path / "old"
    shutil.copytree(two_runs["out"], out, ignore=shutil.ignore_patterns("_prefect"))
    old_columns = {
        "predictions": [f.name for f in PREDICTIONS_SCHEMA if f.name != "input_root"],
        "errors": [f.name for f in ERRORS_SCHEMA if f.name not in ("input_root", "file_size", "file_mtime_ns")],
    }
    for table, cols in old_columns.items():
        for d in sorted((out / table).glob("run_date=*/*")):
            legacy = d.with_name(f"run_id={d.name}")
            legacy.mkdir()
            for f in sorted(d.glob("part-*.parquet")):
                t = pq.read_table(f)
                pq.write_table(t.select(cols).replace_schema_metadata(t.schema.metadata), legacy / f.name)
            shutil.rmtree(d)
    with pytest.raises((pa.ArrowTypeError, pa.ArrowInvalid), match="run_id"):
        pd.read_parquet(out / "predictions")  # why the layout changed

    moved = migrate.migrate_output_root(out)
    assert sorted(moved.runs) == sorted(two_runs["runs"]) and moved.files == 16 and not moved.held
    assert not list(out.glob("*/run_date=*/run_id=*"))
    r1, r2 = two_runs["runs"]
    for table in ("predictions", "errors"):
        assert _open_with_every_reader(out / table) == _open_with_every_reader(two_runs["out"] / table)
        assert set(pq.read_table(out / table, columns=["input_root"])["input_root"].to_pylist()) == {
            str(two_runs["root"])
        }
    assert pq.read_table(out / "errors", columns=["file_size"])["file_size"].null_count == 12  # unknown for old rows
    assert build_report(out, r1).rows.model_dump() == {"predictions": 12, "errors": 4}
    assert migrate.migrate_output_root(out).runs == []  # idempotent
