"""A model that is wrong as a whole is refused at load, before anything is scored: NaN or Inf in
its weights (:func:`check_finite_weights`), or non-finite outputs for every probe image
(:func:`check_finite_outputs`). Per-image non-finite outputs stay per-image errors rows."""

from __future__ import annotations

import torch
from torch import nn

from imgscore.errors import ModelError
from imgscore.images.preprocess import PreprocessSpec

PROBE_IMAGES = 2  # random images in the output probe: a model refused must fail on every one of them
PROBE_SEED = 0


def check_finite_weights(module: nn.Module, name: str, source: str) -> None:
    """Refuse a module any of whose floating parameters or buffers holds NaN or Inf: every
    image it scored would be an error row (a checkpoint saved after training diverged).

    Raises:
        ModelError: naming the model, how many tensors are non-finite and the first few.
    """
    tensors = [(k, t) for k, t in (*module.named_parameters(), *module.named_buffers()) if t.is_floating_point()]
    bad = []
    for k, t in tensors:
        if not bool(torch.isfinite(t).all()):
            nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            bad.append(
                f"{k}: " + ", ".join(f"{n} {w}" for n, w in ((nan, "NaN"), (inf, "Inf")) if n) + f" of {t.numel()}"
            )
    if bad:
        raise ModelError(
            f"model {name} ({source}) has non-finite weights: {len(bad)} of its {len(tensors)} weight tensors hold "
            "NaN or Inf "
            f"(e.g. {'; '.join(bad[:3])}), so every image would be recorded as an error; refused before scoring. "
            "Point the config at a checkpoint saved before training diverged (a NaN loss), or retrain the model"
        )


def check_finite_outputs(module: nn.Module, spec: PreprocessSpec, device: torch.device, name: str, source: str) -> None:
    """Refuse a model whose probabilities are NaN or Inf for every one of :data:`PROBE_IMAGES`
    seeded random images (pixels uniform in [0, 1], normalised with ``spec``'s mean/std, float32
    [N, 3, crop, crop] on ``device``, the module's): such a model would blame each image. One forward pass at
    load; a model that is finite on any probe image is accepted (per-image non-finite outputs
    stay per-image error rows).

    Raises:
        ModelError: naming the model and what its outputs were.
    """
    crop = spec.crop
    g = torch.Generator().manual_seed(PROBE_SEED)
    x = torch.rand(PROBE_IMAGES, 3, crop, crop, generator=g)
    x = (x - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    x = x.to(device)
    if any(
        p.is_contiguous(memory_format=torch.channels_last) and p.ndim == 4 and not p.is_contiguous()
        for p in module.parameters()
    ):
        x = x.contiguous(memory_format=torch.channels_last)
    try:
        with torch.inference_mode():
            raw = module(x)
    except Exception:  # a module that cannot take this input: scoring will say so per batch
        return
    raw = raw[0] if isinstance(raw, (tuple, list)) else raw
    probs = torch.softmax(raw.float(), dim=1) if raw.ndim == 2 else raw  # as scoring turns logits into probabilities
    if probs.ndim != 2 or bool(torch.isfinite(probs).all(dim=1).any()):
        return
    what = ", ".join(
        w for w, f in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)) if bool(f(raw).any())
    )
    raise ModelError(
        f"model {name} ({source}) gives non-finite outputs for every input: its logits hold "
        f"{what or 'values whose softmax is NaN'} "
        f"for all {PROBE_IMAGES} probe images ({crop}x{crop} random pixels), so every image would be recorded as an "
        "error; "
        "refused before scoring. Its weights are finite: look for an overflow in its forward (a layer whose "
        "activations exceed "
        "float32, a division by zero), or point the config at another checkpoint"
    )
