"""Pick each worker's device, its share of CPU threads, and its DataLoader worker count.

A scoring process is either the flow process itself (thread runner) or a Dask worker process.
A Dask worker finds its place on its machine — its rank among the Dask workers on the same host
and how many there are — by asking the scheduler once (:func:`host_layout`); that rank picks
its GPU and the count divides the cores, so several workers on one machine neither share one
GPU nor oversubscribe the CPU.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import socket
import threading

import torch

from imgscore.errors import ConfigError

log = logging.getLogger("imgscore")

_LAYOUT: dict[str, tuple[int, int]] = {}  # Dask worker address → (rank on host, workers on host)
_LOCK = threading.Lock()
_WARNED_DAEMON = False


def worker_name() -> str:
    """``host:pid`` of this process, recorded on every row."""
    return f"{socket.gethostname()}:{os.getpid()}"


def usable_cores() -> int:
    """CPU cores this process may run on (``sched_getaffinity``, which respects cpusets and
    ``taskset``; ``os.cpu_count()`` where that is unavailable)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _rank_key(ident: dict, address: str) -> tuple:
    name = ident.get("name")
    if isinstance(name, int) or (isinstance(name, str) and name.isdigit()):
        return (0, int(name), "", address)
    return (1, 0, str(name), address)


def host_layout() -> tuple[int, int] | None:
    """``(rank, count)`` of this Dask worker among the Dask workers on the same host.

    Ranks follow worker names when they are integers (a ``LocalCluster`` names its workers 0, 1,
    …; ``dask worker --name 3`` does the same), else names and addresses in sorted order. Asked
    of the scheduler once per worker process and cached. ``None`` outside a Dask worker, or when
    the scheduler cannot be asked (logged once).
    """
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return None
    address = worker.address
    with _LOCK:
        if address in _LAYOUT:
            return _LAYOUT[address]
    try:
        from distributed.comm import get_address_host
        from distributed.utils import sync

        info = sync(worker.loop, worker.scheduler.identity, n_workers=-1)
        host = get_address_host(address)
        mine = sorted(
            (_rank_key(ident, addr), addr) for addr, ident in info["workers"].items() if get_address_host(addr) == host
        )
        addrs = [a for _, a in mine]
        layout = (addrs.index(address), len(addrs)) if address in addrs else (0, max(1, len(addrs)))
    except Exception as exc:  # a scheduler we do not control may refuse identity(); say so once
        log.warning(
            "worker %s could not ask the Dask scheduler for its host layout (%s: %s); assuming it is alone on its host",
            address,
            type(exc).__name__,
            exc,
        )
        layout = (0, 1)
    with _LOCK:
        _LAYOUT[address] = layout
    return layout


def resolve_device(name: str, rank: int | None = None) -> torch.device:
    """Map ``inference.device`` to a ``torch.device`` for this process.

    ``auto`` picks CUDA, else MPS, else CPU. ``auto`` and ``cuda`` (no index) on a machine with
    several GPUs give worker ``rank`` GPU ``rank % device_count``; ``rank`` defaults to this
    Dask worker's rank on its host (:func:`host_layout`), 0 elsewhere. A worker restricted by
    ``CUDA_VISIBLE_DEVICES`` to one GPU sees ``device_count() == 1`` and takes that GPU.

    Raises:
        ConfigError: an explicit ``cuda``/``cuda:N``/``mps`` that this machine does not have —
            never a silent switch to CPU.
    """

    def my_gpu() -> torch.device:
        r = rank
        if r is None:
            layout = host_layout()
            r = layout[0] if layout else 0
        return torch.device("cuda", r % torch.cuda.device_count())

    if name == "auto":
        if torch.cuda.is_available():
            return my_gpu()
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"inference.device={name!r} but CUDA is not available on {socket.gethostname()}; "
                "use inference.device=auto or cpu"
            )
        if name == "cuda":
            return my_gpu()
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"inference.device={name!r} but this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
        return dev
    if name == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise ConfigError("inference.device='mps' but MPS is not available here; use auto or cpu")
        return torch.device("mps")
    raise ConfigError(f"inference.device {name!r} is not one of auto, cpu, cuda, cuda:N, mps")


def configure_threads(num_threads: int | None, workers_on_host: int = 1) -> int:
    """Set torch's intra-op threads to this worker's share of the cores, log and return it.

    ``num_threads`` wins when given. Otherwise ``usable_cores() // workers`` (at least 1), where
    ``workers`` is the number of Dask workers on this host when this is a Dask worker
    (:func:`host_layout`), else ``workers_on_host`` — so several workers on one machine do not
    oversubscribe it. Logged at INFO on the ``imgscore`` logger whenever it changes.
    """
    layout = host_layout()
    share = layout[1] if layout else max(1, workers_on_host)
    n = num_threads or max(1, usable_cores() // share)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
        log.info(
            "worker %s: torch uses %d threads (%d usable cores, %d worker(s) on this host)",
            worker_name(),
            n,
            usable_cores(),
            share,
        )
    return n


def loader_context(num_workers: int) -> str | None:
    """Start method for DataLoader worker processes: ``fork`` where the platform has it.

    Inside a Dask worker the inherited default is ``spawn`` (Dask spawns its workers), and a
    spawned DataLoader worker re-imports torch for every shard — seconds per DataLoader where a
    fork takes a fraction of one (benchmarks/NOTES.md, "Dask workers"). Forked workers never touch CUDA:
    they decode and transform on the CPU, and the batch reaches the device in the parent.
    ``None`` (torch's default) for ``num_workers=0`` or where fork does not exist.
    """
    if num_workers > 0 and "fork" in multiprocessing.get_all_start_methods():
        return "fork"
    return None


def loader_workers(requested: int) -> int:
    """DataLoader worker processes this process may start: ``requested``, or 0 in a daemonic one.

    Dask worker processes are daemonic by default and Python forbids daemonic processes to have
    children ("daemonic processes are not allowed to have children"). The clusters imgscore
    starts run non-daemonic workers (``imgscore.runtime.runner``); on a cluster we do not control that is
    still daemonic, images are decoded in the worker process itself (``num_workers=0``) and one
    WARNING says so.
    """
    global _WARNED_DAEMON
    if requested > 0 and multiprocessing.current_process().daemon:
        if not _WARNED_DAEMON:
            _WARNED_DAEMON = True
            log.warning(
                "worker %s is a daemonic process and cannot start DataLoader workers; decoding in "
                "the worker itself (inference.num_workers=%d → 0). Start the Dask workers with "
                "DASK_DISTRIBUTED__WORKER__DAEMON=False to decode in parallel",
                worker_name(),
                requested,
            )
        return 0
    return requested
