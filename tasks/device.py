"""Pick each worker's device and its share of CPU threads."""

from __future__ import annotations

import logging
import os
import socket

import torch

from tasks.errors import ConfigError

log = logging.getLogger("imgscore")


def worker_name() -> str:
    """``host:pid`` of this process, recorded on every row."""
    return f"{socket.gethostname()}:{os.getpid()}"


def resolve_device(name: str, rank: int | None = None) -> torch.device:
    """Map ``inference.device`` to a ``torch.device`` for this process.

    ``auto`` picks CUDA, else MPS, else CPU. With several GPUs and a worker ``rank`` (Dask
    workers), worker ``rank`` takes GPU ``rank % device_count``.

    Raises:
        ConfigError: an explicit ``cuda``/``cuda:N``/``mps`` that this machine does not have —
            never a silent switch to CPU.
    """
    if name == "auto":
        if torch.cuda.is_available():
            n = torch.cuda.device_count()
            return torch.device("cuda", (rank or 0) % n)
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

    ``num_threads`` wins when given; otherwise ``os.cpu_count() // workers_on_host`` (at least 1),
    so several workers on one machine do not oversubscribe it.
    """
    n = num_threads or max(1, (os.cpu_count() or 1) // max(1, workers_on_host))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    log.debug("worker %s uses %d torch threads", worker_name(), n)
    return n
