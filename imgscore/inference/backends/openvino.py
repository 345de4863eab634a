"""OpenVINO on the CPU device, compiled from the model's ONNX export (fp32, or bf16 when asked)."""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from imgscore.inference.backends.forward import Forward, as_input, probs_of
from imgscore.inference.backends.installed import import_runtime


class OpenVinoForward(Forward):
    """OpenVINO on the CPU device, compiled from the ONNX export.

    ``INFERENCE_PRECISION_HINT`` is set explicitly (``f32`` for fp32, ``bf16`` when asked), so a
    CPU with bf16 never reduces precision silently; ``precision`` is what OpenVINO reports after
    compiling. ``INFERENCE_NUM_THREADS`` is the worker's core share, one stream, latency hint
    (one batch at a time per shard). Infer requests are per thread (they are not thread-safe).
    """

    backend = "openvino"
    _HINTS = {"fp32": "f32", "bf16": "bf16"}
    _NAMES = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}

    def __init__(self, path: Path, threads: int, precision: str = "fp32") -> None:
        ov = import_runtime("openvino")
        core = ov.Core()
        self.compiled = core.compile_model(
            str(path),
            "CPU",
            {
                "INFERENCE_NUM_THREADS": threads,
                "INFERENCE_PRECISION_HINT": self._HINTS[precision],
                "PERFORMANCE_HINT": "LATENCY",
                "NUM_STREAMS": 1,
            },
        )
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")  # an openvino.Type
        got = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
        self.precision = self._NAMES.get(got, got)
        self.threads = threads
        self._local = threading.local()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        req = getattr(self._local, "req", None)
        if req is None:
            req = self._local.req = self.compiled.create_infer_request()
        req.infer({0: as_input(x)})
        return probs_of(req.get_output_tensor(0).data.copy())
