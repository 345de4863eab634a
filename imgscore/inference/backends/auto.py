"""``inference.backend=auto``: every installed backend timed on this machine for this model (a
few batches of seeded input), the fastest kept; the choice is cached on disk per (model, CPU,
threads, batch size), so it is measured once per machine (:func:`choose_backend`)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from imgscore.errors import ConfigError
from imgscore.inference.backends.export import cache_root, export_key
from imgscore.inference.backends.factory import check_backend, make_forward
from imgscore.inference.backends.forward import Forward
from imgscore.inference.backends.installed import installed_backends
from imgscore.inference.model import LoadedModel

log = logging.getLogger("imgscore")


def cpu_signature() -> str:
    """The CPU model and its SIMD flags that matter to these runtimes (``/proc/cpuinfo``)."""
    model, flags = platform.processor() or platform.machine(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                flags = sorted(f for f in have if f.startswith(("avx", "amx")) or f in ("fma", "f16c"))
                break
    except OSError:
        pass
    return f"{model} [{' '.join(flags)}]"


@dataclass
class BackendChoice:
    """What ``auto`` picked on this machine and what it measured (img/s per backend)."""

    backend: str
    img_per_s: dict[str, float]
    batch: int
    threads: int
    cpu: str
    measured_at: str


def _time_forward(fwd: Forward, x: torch.Tensor, repeats: int = 2) -> float:
    """Images per second of ``fwd`` on ``x`` (float32 [B, 3, H, W]): a warm-up, then the best of ``repeats``."""
    xin = x.contiguous(memory_format=torch.channels_last) if fwd.channels_last else x.contiguous()
    with torch.inference_mode():
        fwd(xin)  # warm-up: primitive creation, allocator
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fwd(xin)
            best = min(best, time.perf_counter() - t0)
    return len(x) / best


def choose_backend(
    lm: LoadedModel,
    threads: int,
    batch: int,
    cache_dir: Path | None = None,
    channels_last: bool = True,
    candidates: Sequence[str] | None = None,
) -> BackendChoice:
    """``inference.backend=auto``: the fastest fp32 backend for this model on this machine.

    Times each installed backend (:func:`installed_backends`, or ``candidates``) on one batch
    of ``min(batch, 16)`` seeded normal images at the model's input size — a warm-up, then the
    best of two — and picks the highest img/s. The choice is written to
    ``CACHE/auto/<key>.json`` keyed by (export key, CPU model and flags, threads, batch), so each
    machine measures once; a GPU device always gets ``torch``. All candidates are fp32 and give
    the same answers (tests/test_fidelity.py), so the choice changes speed, never scores.
    """
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if lm.device.type != "cpu":
        return BackendChoice("torch", {}, batch, threads, "", now)
    cands = list(candidates) if candidates is not None else installed_backends()
    cpu = cpu_signature()
    sig = hashlib.sha256(json.dumps([export_key(lm), cpu, threads, batch, cands, channels_last]).encode())
    path = cache_root(cache_dir) / "auto" / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', lm.arch)}-{sig.hexdigest()[:24]}.json"
    try:
        got = BackendChoice(**json.loads(path.read_text()))
        if got.backend in cands:
            return got
    except (OSError, ValueError, TypeError):
        pass
    rates = _measure(lm, cands, threads, batch, cache_dir, channels_last)
    best = max(rates, key=lambda name: rates[name]) if rates else "torch"
    choice = BackendChoice(best, rates, batch, threads, cpu, now)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(asdict(choice), indent=2))
        os.replace(tmp, path)
    except OSError as exc:  # a read-only cache costs a re-measure next time, nothing else
        log.info("inference.backend=auto: could not cache the choice in %s (%s)", path, exc)
    log.info("inference.backend=auto chose %s on %s (%d threads, img/s: %s)", best, cpu, threads, rates)
    return choice


def _measure(
    lm: LoadedModel, candidates: list[str], threads: int, batch: int, cache_dir: Path | None, channels_last: bool
) -> dict[str, float]:
    """Images per second of each candidate backend that can run here (:func:`_time_forward`) on
    ``min(batch, 16)`` seeded normal images at the model's input size."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(min(batch, 16), 3, lm.preprocess.crop, lm.preprocess.crop, generator=g)
    rates: dict[str, float] = {}
    for name in candidates:
        try:
            rates[name] = round(_time_forward(make_forward(lm, name, "fp32", threads, cache_dir, channels_last), x), 2)
        except ConfigError as exc:  # not installed / not exportable: not a candidate here
            log.info("inference.backend=auto: %s is not a candidate (%s)", name, exc)
    return rates


def resolve_backend(
    lm: LoadedModel,
    backend: str,
    precision: str,
    threads: int,
    batch: int,
    cache_dir: Path | None = None,
    channels_last: bool = True,
) -> str:
    """The concrete backend for a configured ``inference.backend``: ``auto`` resolved by
    :func:`choose_backend` on this machine, anything else as given (checked)."""
    check_backend(backend, precision, lm.device)
    if backend != "auto":
        return backend
    return choose_backend(lm, threads, batch, cache_dir, channels_last).backend


def resolve_forward(
    lm: LoadedModel,
    backend: str,
    precision: str,
    threads: int,
    batch: int,
    cache_dir: Path | None = None,
    channels_last: bool = True,
) -> Forward:
    """:func:`make_forward` for a configured ``inference.backend`` (:func:`resolve_backend`)."""
    backend = resolve_backend(lm, backend, precision, threads, batch, cache_dir, channels_last)
    return make_forward(lm, backend, precision, threads, cache_dir, channels_last)
