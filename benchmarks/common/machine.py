"""The machine a measurement ran on: cores, CPU model and flags, memory, load, the time.

A number in benchmarks/NOTES.md is quoted with these, because the same command on the same
files moves with the CPU and with whatever else shares it.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
from pathlib import Path

import psutil


def cores() -> int:
    """CPU cores this process may run on (its affinity mask; ``os.cpu_count()`` where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_model() -> str:
    """The CPU's ``model name`` from ``/proc/cpuinfo``, else ``platform.processor()``, else ``unknown``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    """The CPU's SIMD flags that matter here (``lscpu``/``/proc/cpuinfo``): AVX*, AMX, FMA, F16C."""
    from imgscore.inference.backends.auto import cpu_signature

    sig = cpu_signature()
    return sig[sig.index("[") + 1 : -1].split() if "[" in sig else []


def has_bf16() -> bool:
    """Native bf16 arithmetic (AVX512_BF16 or AMX-BF16); without it bf16 is emulated and slow."""
    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_flags()))


def ram_gib() -> float:
    """Physical memory, GiB (one decimal)."""
    return round(psutil.virtual_memory().total / 2**30, 1)


def loadavg() -> list[float]:
    """The 1, 5 and 15-minute load averages, two decimals: above the core count, other work shared the CPU."""
    return [round(v, 2) for v in os.getloadavg()]


def utc_now(fmt: str = "%Y-%m-%d %H:%M UTC") -> str:
    """The current UTC time in ``fmt`` (``strftime``)."""
    return dt.datetime.now(dt.UTC).strftime(fmt)


def machine_line() -> str:
    """One line for a result file: CPU model, cores, operating system and kernel."""
    return f"{cpu_model()}, {cores()} cores, {platform.system()} {platform.release()}"
