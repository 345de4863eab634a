"""The one place a backend's forward is built (:func:`make_forward`), once per process, and
refused before any scoring when it cannot run (:func:`check_backend`, :func:`preflight`)."""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from imgscore.errors import ConfigError
from imgscore.inference.backends.eager import TorchForward
from imgscore.inference.backends.export import export_key, export_onnx
from imgscore.inference.backends.forward import Forward
from imgscore.inference.backends.installed import exporter_modules, import_runtime
from imgscore.inference.backends.onnxruntime import OrtForward
from imgscore.inference.backends.openvino import OpenVinoForward
from imgscore.inference.model import LoadedModel

# (id of the module, export key, backend, precision, threads, cache folder) → its built forward
_FORWARDS: dict[tuple[int, str, str, str, int, str], Forward] = {}
_LOCK = threading.Lock()


def check_backend(backend: str, precision: str, device: torch.device) -> None:
    """Refuse combinations that cannot run, before any scoring (exit 2).

    ONNX Runtime and OpenVINO run on the CPU here; ONNX Runtime's CPU provider has no bf16
    path; fp16 is a GPU precision. ``auto`` with reduced precision is refused: the canary checks
    one named fast path, not whichever each machine would pick.
    """
    if backend == "torch":
        return
    if backend == "auto":
        if precision != "fp32":
            raise ConfigError(
                f"inference.precision={precision} with inference.backend=auto: name the fast path the "
                "canary checks (inference.backend=torch or openvino), or keep precision fp32"
            )
        return
    if device.type != "cpu":
        raise ConfigError(
            f"inference.backend={backend} runs on the CPU but inference.device resolved to {device}; "
            "set inference.device=cpu, or inference.backend=torch to use the GPU"
        )
    if backend == "onnxruntime" and precision != "fp32":
        raise ConfigError(
            f"inference.precision={precision} is not available with inference.backend=onnxruntime "
            "(its CPU provider runs fp32); use inference.backend=openvino for bf16, or precision fp32"
        )
    if backend == "openvino" and precision == "fp16":
        raise ConfigError(
            "inference.precision=fp16 is a GPU precision; with inference.backend=openvino use bf16 or fp32"
        )


def make_forward(
    lm: LoadedModel,
    backend: str,
    precision: str = "fp32",
    threads: int = 1,
    cache_dir: Path | None = None,
    channels_last: bool = True,
) -> Forward:
    """The :class:`Forward` for ``backend`` (not ``auto``), built once per process and cached
    per (model, backend, precision, threads).

    Raises:
        BackendUnavailable, ConfigError, ModelError: see :func:`check_backend`, :func:`export_onnx`.
    """
    check_backend(backend, precision, lm.device)
    if backend == "torch":
        return TorchForward(lm, precision, channels_last)
    key = (id(lm.module), export_key(lm), backend, precision, threads, str(cache_dir))
    with _LOCK:
        hit = _FORWARDS.get(key)
    if hit is not None:
        return hit
    import_runtime(backend)  # a missing runtime is refused before the export is made
    path = export_onnx(lm, cache_dir)
    fwd: Forward = OrtForward(path, threads) if backend == "onnxruntime" else OpenVinoForward(path, threads, precision)
    with _LOCK:
        return _FORWARDS.setdefault(key, fwd)


def clear_forward_cache() -> None:
    """Forget built sessions (tests; a long-lived process after a checkpoint changes)."""
    with _LOCK:
        _FORWARDS.clear()


def preflight(backend: str, precision: str, device: torch.device) -> None:
    """Refuse before scoring (exit 2) what :func:`make_forward` would refuse on a worker: an
    impossible combination (:func:`check_backend`), or a runtime or exporter that is not
    installed (with the pip line). Imports the runtime; exports nothing."""
    check_backend(backend, precision, device)
    if backend in ("onnxruntime", "openvino"):
        import_runtime(backend)
        exporter_modules()
