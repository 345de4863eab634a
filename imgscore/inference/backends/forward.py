"""The forward contract every backend keeps (:class:`Forward`), and the array conversions the
two runtimes share."""

from __future__ import annotations

import numpy as np
import torch


class Forward:
    """A backend's forward pass: ``fwd(x)`` with x float32 [B, 3, H, W] → probabilities float32
    [B, C] on the CPU. ``backend`` and ``precision`` say what really runs (``precision`` is
    what the runtime reports after compiling, e.g. OpenVINO's inference precision);
    ``channels_last`` is the input memory format the backend wants (torch's conv nets)."""

    backend: str = "torch"
    precision: str = "fp32"
    channels_last: bool = False
    device: torch.device = torch.device("cpu")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self) -> dict[str, str]:
        """JSON-ready ``{"backend", "precision"}`` for manifests and Parquet metadata."""
        return {"backend": self.backend, "precision": self.precision}


def probs_of(logits: np.ndarray) -> torch.Tensor:
    """Softmax probabilities float32 [B, C] (a CPU tensor) of a runtime's logits [B, C]."""
    return torch.softmax(torch.from_numpy(np.asarray(logits, dtype=np.float32)), dim=1)


def as_input(x: torch.Tensor) -> np.ndarray:
    """float32 C-contiguous NCHW numpy view (or copy) of ``x``: what both runtimes read."""
    return np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
