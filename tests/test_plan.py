"""Planning: the run's partition date and its id come from one instant."""

from datetime import UTC, datetime

import torch

from imgscore.config.loading import build_config
from imgscore.inference.model import load_model
from imgscore.runstate.plan import new_run_id, plan_new_run, run_date_of
from tests.conftest import base_overrides


def test_run_date_is_the_date_of_the_run_id_stamp_across_midnight():
    started = datetime(2026, 3, 1, 23, 59, 59, 900000, tzinfo=UTC)  # the CLI stamps the id …
    run_id = new_run_id(started)
    planned = datetime(2026, 3, 2, 0, 0, 4, tzinfo=UTC)  # … and the flow plans 4 s later
    assert run_id.startswith("20260301T235959Z-")
    assert run_date_of(run_id, planned) == "2026-03-01"
    assert run_date_of("nightly-7", planned) == "2026-03-02"  # a hand-made id: the planning date
    assert run_date_of("20261399T000000Z-abc", planned) == "2026-03-02"  # digits that are no date


def test_a_planned_run_partitions_by_its_id_not_by_the_planning_clock(tmp_path, image_folder, tiny_checkpoint):
    cfg = build_config({}, base_overrides(image_folder, tiny_checkpoint, tmp_path / "out"))
    lm = load_model(cfg.model, cfg.preprocess, torch.device("cpu"))
    run_id = new_run_id(datetime(2020, 12, 31, 23, 59, 59, tzinfo=UTC))  # stamped on a day that is long over
    plan = plan_new_run(cfg, run_id, lm.info())
    try:
        assert plan.run_date == plan.manifest.run_date == "2020-12-31"
        assert plan.manifest.outputs["predictions"].endswith(f"run_date=2020-12-31/{run_id}")
        assert {r.run_date for r in plan.shards} == {"2020-12-31"}
    finally:
        plan.state.close()
