"""ONNX Runtime's CPU execution provider on the model's ONNX export (fp32 only)."""

from __future__ import annotations

from pathlib import Path

import torch

from imgscore.inference.backends.forward import Forward, as_input, probs_of
from imgscore.inference.backends.installed import import_runtime


class OrtForward(Forward):
    """ONNX Runtime's CPU execution provider on an exported model (fp32 only).

    ``intra_op_num_threads`` is the worker's core share; one inter-op thread (a CNN's graph is
    a chain, nothing runs beside it); every graph optimisation on (ONNX Runtime fuses
    Conv+BatchNorm+ReLU itself). ``session.run`` is thread-safe, so one session serves every
    shard thread of a process.
    """

    backend = "onnxruntime"

    def __init__(self, path: Path, threads: int) -> None:
        ort = import_runtime("onnxruntime")
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3  # errors only: no per-session warnings on the terminal
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.threads = threads

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        (logits, *_) = self.session.run(None, {self.input_name: as_input(x)})
        return probs_of(logits)
