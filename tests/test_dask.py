"""Dask runner: same answers as the thread runner, DataLoader workers inside Dask workers, one
Prefect API for every worker, and each worker's own device and thread share."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import time
from pathlib import Path

import pyarrow.dataset as ds
import pytest
import torch

from imgscore.errors import ConfigError
from imgscore.flows.cli import main
from imgscore.inference import device as dev
from tests.conftest import assert_same_answers, base_overrides, make_image_folder

pytestmark = pytest.mark.slow


def _predictions(out: Path) -> dict[str, dict]:
    table = ds.dataset(out / "predictions", format="parquet", partitioning="hive").to_table()
    return {r["image_path"]: r for r in table.to_pylist()}


def _shard_states(out: Path) -> list[dict]:
    (run_dir,) = (out / "runs").iterdir()
    return [json.loads(p.read_text()) for p in sorted((run_dir / "shards").glob("*.json"))]


@contextlib.contextmanager
def busy_cores(n: int):
    """``n`` busy-loop processes (``yes`` into /dev/null) for the block's duration, killed after it."""
    procs = [subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) for _ in range(n)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_a_late_heartbeat_in_a_cluster_we_start_is_not_a_traceback(capfd, monkeypatch):
    """Workers of a cluster imgscore starts have distributed's comm timeouts raised and log a
    failed heartbeat (``Worker.heartbeat``'s own record, with its TimeoutError) at DEBUG, without
    a traceback, unless --verbose; the worker processes get both from the cluster's config."""
    import dask
    from distributed import Client, LocalCluster

    from imgscore.runtime.compat import HEARTBEAT_FAILED_MESSAGE
    from imgscore.runtime.dask_warm import LOCAL_COMM_TIMEOUT, local_cluster_config

    monkeypatch.delenv("IMGSCORE_VERBOSE", raising=False)

    def fail_a_heartbeat() -> tuple:
        import logging

        try:
            raise TimeoutError("Timed out during handshake while connecting to tcp://127.0.0.1:1 after 30 s")
        except TimeoutError:  # what Worker.heartbeat does with it
            logging.getLogger("distributed.worker").exception(HEARTBEAT_FAILED_MESSAGE + ".")
        return dask.config.get("distributed.comm.timeouts.connect"), dask.config.get("distributed.comm.timeouts.tcp")

    with (
        dask.config.set(local_cluster_config()),
        LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        capfd.readouterr()
        (timeouts,) = client.run(fail_a_heartbeat).values()
        time.sleep(0.5)  # the worker's stderr reaches the fd
        err = capfd.readouterr().err
    assert timeouts == (LOCAL_COMM_TIMEOUT, LOCAL_COMM_TIMEOUT)
    assert "Traceback" not in err and HEARTBEAT_FAILED_MESSAGE not in err, err


def test_dask_runner_matches_thread_runner(tmp_path, photos, tiny_checkpoint, prefect_server, capfd):
    """The acceptance run: dask, 2 worker processes, 2 DataLoader workers each → exit 0, the
    thread runner's predictions, at least two workers, each with its share of the cores.

    By construction on any CPU: both runs compute the same function on the same pixels, only
    with other torch thread counts (other float summation order), so every class probability
    agrees within 1e-5 and top-1 may differ only between classes tied within that
    (``assert_same_answers``)."""
    root = make_image_folder(tmp_path / "images", photos, per_class=4)  # 12 real photos
    common = base_overrides(root, tiny_checkpoint, tmp_path / "x", **{"run.shard_size": 3, "inference.num_workers": 2})
    common = [o for o in common if not o.startswith("output.root=")]

    def run(name: str, *extra: str) -> Path:
        out = tmp_path / name
        argv = ["run", "-q"] + [a for o in [*common, f"output.root={out}", *extra] for a in ("--set", o)]
        assert main(argv) == 0
        return out

    out_t = run("thread")
    capfd.readouterr()
    with busy_cores(2):  # a loaded machine: a late worker heartbeat once printed a traceback here
        out_d = run("dask", "runner.type=dask", "runner.n_workers=2")
    err = capfd.readouterr().err  # the workers' stderr too (fd level)
    assert "Traceback" not in err and "distributed." not in err and "daemonic" not in err, err[-2000:]

    thread, dask_ = _predictions(out_t), _predictions(out_d)
    assert len(thread) == 12 and sorted(thread) == sorted(dask_)
    for path, t in thread.items():
        d = dask_[path]
        # same function on other processes with other torch thread counts: equal up to float
        # summation order, so compared as probabilities, with ties allowed to swap (conftest)
        assert_same_answers(t, d, atol=1e-5, what=path)
        assert d["pred_label"] == str(d["pred_index"]) and d["score"] == d["topk_scores"][0]
        assert d["label"] == t["label"] and d["device"] == "cpu"

    workers = {r["worker"] for r in dask_.values()}
    assert len(workers) >= 2, workers
    assert f"{os.uname().nodename}:{os.getpid()}" not in workers  # scored in the worker processes
    assert {r["worker"] for r in thread.values()} == {dev.worker_name()}

    cores = dev.usable_cores()
    d_states, t_states = _shard_states(out_d), _shard_states(out_t)
    assert len(d_states) == 4
    # DataLoader processes really ran inside the (non-daemonic) Dask workers: no fallback to 0.
    assert {s["loader_workers"] for s in d_states} == {2}
    assert {s["threads"] for s in d_states} == {max(1, cores // 2)}  # two workers share the host
    assert {s["threads"] for s in t_states} == {cores}


def _probe_loader(requested: int, queue) -> None:
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logging.getLogger("imgscore").addHandler(Keep())
    import multiprocessing

    first = dev.loader_workers(requested)
    dev.loader_workers(requested)  # a second shard in the same process: no second log line
    queue.put((first, records, multiprocessing.current_process().daemon))


def test_daemonic_worker_of_foreign_cluster_falls_back_with_one_log_line():
    """A Dask cluster we do not start keeps daemonic workers (Dask's default): decode in-process,
    say so once. A daemonic process is what such a worker is; forked here to stay fast."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    p = ctx.Process(target=_probe_loader, args=(2, queue), daemon=True)
    p.start()
    n, records, daemon = queue.get(timeout=60)
    p.join(timeout=30)
    assert daemon is True
    assert n == 0
    assert len(records) == 1 and "daemonic" in records[0] and "num_workers=2 → 0" in records[0]
    assert dev.loader_workers(2) == 2  # this (non-daemonic) process keeps its DataLoader workers


def test_workers_report_to_the_flows_api_instead_of_starting_servers(prefect_server):
    """Without PREFECT_API_URL the flow's temporary server is the only one: workers get its URL."""
    from prefect import flow, task
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from imgscore.config.running import RunnerConfig
    from imgscore.runtime.runner import make_task_runner

    @task
    def where() -> tuple[str | None, str | None, int]:
        from prefect.server.api.server import SubprocessASGIServer
        from prefect.settings import PREFECT_API_URL as url

        return url.value(), os.environ.get("PREFECT_API_URL"), len(SubprocessASGIServer._instances)

    @flow
    def probe() -> tuple:
        from prefect.context import FlowRunContext

        flow_url = str(FlowRunContext.get().client.api_url).rstrip("/")
        # As if no API URL were configured: the flow's client is the only place that knows it.
        with temporary_settings(restore_defaults={PREFECT_API_URL}):
            assert PREFECT_API_URL.value() is None
            with make_task_runner(RunnerConfig(type="dask", n_workers=1)) as runner:
                return flow_url, runner.submit(where, {}).result()

    flow_url, (setting, env, servers) = probe()
    assert setting == flow_url and env == flow_url
    assert servers == 0


@pytest.mark.parametrize(
    ("name", "rank", "gpus", "expected"),
    [
        ("auto", 0, 2, "cuda:0"),
        ("auto", 3, 2, "cuda:1"),  # rank 3 of a host with 2 GPUs
        ("cuda", 1, 4, "cuda:1"),  # plain "cuda": this worker's own GPU too
        ("cuda:0", 3, 2, "cuda:0"),  # an explicit index is kept
        ("auto", 5, 1, "cuda:0"),  # CUDA_VISIBLE_DEVICES=one GPU per worker → its only GPU
        ("cpu", 1, 2, "cpu"),
    ],
)
def test_each_worker_picks_its_own_gpu(monkeypatch, name, rank, gpus, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    assert str(dev.resolve_device(name, rank)) == expected


def test_cpu_only_machine_auto_is_cpu_and_explicit_cuda_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert dev.resolve_device("auto", 3) == torch.device("cpu")
    with pytest.raises(
        ConfigError, match=r"inference.device='cuda:1' but CUDA is not available.*use inference.device=auto or cpu"
    ):
        dev.resolve_device("cuda:1")


def test_threads_are_the_workers_share_of_the_cores(monkeypatch):
    monkeypatch.setattr(dev, "usable_cores", lambda: 16)
    before = torch.get_num_threads()
    try:
        assert dev.configure_threads(None, workers_on_host=4) == 4
        assert torch.get_num_threads() == 4
        assert dev.configure_threads(None, workers_on_host=32) == 1  # never 0
        assert dev.configure_threads(3, workers_on_host=4) == 3  # inference.num_threads wins
    finally:
        torch.set_num_threads(before)


def _warm_state() -> dict:
    from imgscore.runtime.dask_warm import WARM_STATE

    return dict(WARM_STATE)


def _cached_model_ids() -> list[str]:
    from imgscore.inference.model import _MODEL_CACHE

    return [lm.model_id for lm in _MODEL_CACHE.values()]


def test_workers_are_warmed_before_their_first_shard(tmp_path, tiny_checkpoint):
    """The warm-up plugin on a real cluster: each worker imports the scoring stack and loads the
    run's model into its per-process cache in the background, so the first shard finds it there.
    Holds by construction: the plugin's setup runs on every worker when it is registered, before
    any task could be submitted, and the test waits for the warm-up to finish."""
    import time

    from distributed import Client, LocalCluster

    from imgscore.config.loading import build_config
    from imgscore.inference.model import file_sha256
    from imgscore.runtime.dask_warm import WarmWorkers

    cfg = build_config({}, base_overrides(tmp_path, tiny_checkpoint, tmp_path / "out"))
    with (
        LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        client.register_plugin(WarmWorkers(cfg.model_dump_json()))
        deadline = time.time() + 240
        while True:
            (state,) = client.run(_warm_state).values()
            if "finished" in state or time.time() > deadline:
                break
            time.sleep(0.5)
        assert "error" not in state and state["model_id"] == file_sha256(tiny_checkpoint), state
        assert state["backend"] == "torch"
        (cached,) = client.run(_cached_model_ids).values()
        assert file_sha256(tiny_checkpoint) in cached
