"""Eager PyTorch: the loaded module itself, under ``torch.autocast`` for bf16/fp16."""

from __future__ import annotations

import torch

from imgscore.inference.backends.forward import Forward
from imgscore.inference.model import LoadedModel


def forward_probs(lm: LoadedModel, x: torch.Tensor, precision: str) -> torch.Tensor:
    """Softmax probabilities float32 [B, C] on CPU for an input float32 [B, 3, H, W] on ``lm.device``.

    ``precision`` bf16/fp16 runs the forward under ``torch.autocast``; the softmax is always fp32.
    """
    if precision != "fp32" and lm.device.type in ("cuda", "cpu"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        with torch.autocast(device_type=lm.device.type, dtype=dtype):
            out = lm.module(x)
    else:
        out = lm.module(x)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return torch.softmax(out.float(), dim=1).cpu()


class TorchForward(Forward):
    """Eager PyTorch (:func:`forward_probs`) on ``lm.device``, autocast for bf16/fp16."""

    def __init__(self, lm: LoadedModel, precision: str = "fp32", channels_last: bool = True) -> None:
        self.lm, self.precision, self.device, self.channels_last = lm, precision, lm.device, channels_last

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return forward_probs(self.lm, x, self.precision)
