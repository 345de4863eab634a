"""The run-start canary of reduced precision: the run's first images scored with fp32 torch and
with the configured fast path, which is refused below :data:`CANARY_MIN_AGREEMENT` top-1
agreement or above :data:`CANARY_MAX_MEAN_DSCORE` mean |Δscore| (:func:`start_inference`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from imgscore.config.scoring import InferenceConfig
from imgscore.errors import ConfigError
from imgscore.images.dataset import Sample, ShardDataset
from imgscore.images.entries import ImageEntry
from imgscore.images.preprocess import DecodeOptions
from imgscore.inference.backends.eager import TorchForward
from imgscore.inference.backends.factory import make_forward
from imgscore.inference.backends.forward import Forward
from imgscore.inference.backends.installed import runtime_versions
from imgscore.inference.model import LoadedModel

log = logging.getLogger("imgscore")

# Canary thresholds: refuse reduced precision below this top-1 agreement with fp32
# torch, or above this mean |Δscore| (the reference top-1 class's probability).
CANARY_MIN_AGREEMENT = 0.995
CANARY_MAX_MEAN_DSCORE = 0.01


@dataclass
class CanaryResult:
    """Reduced precision against fp32 torch on the run's first images.

    ``top1_agreement`` is the fraction of images whose top-1 class is the same;
    ``mean_abs_dscore``/``max_abs_dscore`` the mean/max over images of |p_fast(c) − p_ref(c)|
    for the reference's top-1 class c (probabilities in [0, 1]).
    """

    images: int
    top1_agreement: float
    mean_abs_dscore: float
    max_abs_dscore: float
    passed: bool
    backend: str
    precision: str
    min_agreement: float = CANARY_MIN_AGREEMENT
    max_mean_dscore: float = CANARY_MAX_MEAN_DSCORE
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields, as the manifest's ``inference.canary`` records them."""
        return asdict(self)


def compare_probs(ref: torch.Tensor, fast: torch.Tensor) -> tuple[float, float, float]:
    """(top-1 agreement, mean |Δscore|, max |Δscore|) of two probability tensors float32 [N, C];
    Δscore is taken on the reference's top-1 class."""
    top = ref.argmax(1, keepdim=True)
    agree = float((fast.argmax(1) == top[:, 0]).float().mean())
    d = (ref.gather(1, top) - fast.gather(1, top)).abs()[:, 0]
    return agree, float(d.mean()), float(d.max())


def run_canary(
    reference: Callable[[torch.Tensor], torch.Tensor],
    fast: Forward,
    batches: Sequence[torch.Tensor],
    *,
    channels_last_ref: bool = True,
    min_agreement: float = CANARY_MIN_AGREEMENT,
    max_mean_dscore: float = CANARY_MAX_MEAN_DSCORE,
) -> CanaryResult:
    """Score ``batches`` (float32 [B, 3, H, W] each, the run's first images) with fp32 torch
    (``reference``) and the ``fast`` path; pass when top-1 agreement ≥ ``min_agreement`` and
    mean |Δscore| ≤ ``max_mean_dscore`` (99.5 % and 0.01 by default).

    With fewer than 200 images a single flipped top-1 already falls below 99.5 %, so a small
    sample refuses any flip; a non-finite fast output counts as a flip.
    """
    t0 = time.perf_counter()
    refs: list[torch.Tensor] = []
    fasts: list[torch.Tensor] = []
    with torch.inference_mode():
        for x in batches:
            xr = x.contiguous(memory_format=torch.channels_last) if channels_last_ref else x.contiguous()
            xf = x.contiguous(memory_format=torch.channels_last) if fast.channels_last else x.contiguous()
            refs.append(reference(xr).float())
            fasts.append(torch.nan_to_num(fast(xf).float(), nan=-1.0))
    if not refs:
        raise ValueError("the canary needs at least one decodable image")
    ref, fst = torch.cat(refs), torch.cat(fasts)
    agree, mean_d, max_d = compare_probs(ref, fst)
    passed = agree >= min_agreement and mean_d <= max_mean_dscore
    return CanaryResult(
        len(ref),
        round(agree, 6),
        round(mean_d, 6),
        round(max_d, 6),
        passed,
        fast.backend,
        fast.precision,
        min_agreement,
        max_mean_dscore,
        round(time.perf_counter() - t0, 3),
    )


def canary_for_run(
    lm: LoadedModel,
    root: str,
    entries: Sequence[ImageEntry],
    decode_opts: DecodeOptions,
    *,
    backend: str,
    precision: str,
    threads: int,
    batch: int,
    images: int,
    cache_dir: Path | None = None,
    channels_last: bool = True,
) -> CanaryResult | None:
    """The run-start canary for reduced precision; ``None`` when ``precision`` is fp32.

    Decodes the run's first ``images`` decodable entries (looking at no more than four times as
    many; undecodable ones are skipped here and recorded by their shard as usual) with the run's
    own preprocessing, and compares fp32 torch with the configured fast path (:func:`run_canary`).

    Raises:
        ConfigError: no decodable image among the entries looked at.
    """
    if precision == "fp32":
        return None
    fast = make_forward(lm, backend, precision, threads, cache_dir, channels_last)
    reference = TorchForward(lm, "fp32", channels_last)
    ds = ShardDataset(root, list(entries[: 4 * images]), lm.preprocess, decode_opts)
    tensors: list[torch.Tensor] = []
    for i in range(len(ds)):
        item = ds[i]
        if isinstance(item, Sample):
            tensors.append(item.tensor)
            if len(tensors) == images:
                break
    if not tensors:
        raise ConfigError(
            f"inference.precision={precision}: the canary found no decodable image among the run's first "
            f"{len(ds)} images; score in fp32 (inference.precision=fp32)"
        )
    x = torch.stack(tensors).to(lm.device)
    batches = [x[i : i + batch] for i in range(0, len(x), batch)]
    return run_canary(reference, fast, batches, channels_last_ref=channels_last)


def start_inference(
    inf_cfg: InferenceConfig,
    lm: LoadedModel,
    root: str,
    entries: Sequence[ImageEntry],
    decode_opts: DecodeOptions,
    threads: int,
) -> dict[str, Any]:
    """What a run records about its inference path at start, after the canary if one is due.

    Returns the manifest's ``inference`` block: ``backend`` (as configured; ``auto`` resolves
    per worker, see each shard's record), ``precision`` (what the shards will run),
    ``precision_requested``, ``canary`` (:class:`CanaryResult` as a dict, or None for fp32) and
    ``runtimes`` (installed versions). When the canary fails and ``inference.on_canary_fail`` is
    ``fp32``, ``precision`` is ``fp32`` and a WARNING says why.

    Raises:
        ConfigError: the canary failed and ``on_canary_fail`` is ``refuse`` (exit 2, before any
            part file is written); or an impossible backend/precision combination.
    """
    batch = inf_cfg.batch_size if isinstance(inf_cfg.batch_size, int) else 32
    canary = canary_for_run(
        lm,
        root,
        entries,
        decode_opts,
        backend=inf_cfg.backend,
        precision=inf_cfg.precision,
        threads=threads,
        batch=batch,
        images=inf_cfg.canary_images,
        cache_dir=inf_cfg.cache_dir,
        channels_last=inf_cfg.channels_last,
    )
    precision = inf_cfg.precision
    if canary is not None and not canary.passed:
        what = (
            f"inference.precision={inf_cfg.precision} on {canary.backend} failed the canary on the run's first "
            f"{canary.images} images: top-1 agreement with fp32 torch {canary.top1_agreement:.2%} "
            f"(needs ≥ {canary.min_agreement:.1%}), mean |Δscore| {canary.mean_abs_dscore:.4f} "
            f"(needs ≤ {canary.max_mean_dscore})"
        )
        if inf_cfg.on_canary_fail == "refuse":
            raise ConfigError(
                f"{what}; score in fp32 (inference.precision=fp32), or set inference.on_canary_fail=fp32 to fall back"
            )
        log.warning("%s; scoring in fp32 instead (inference.on_canary_fail=fp32)", what)
        precision = "fp32"
    return {
        "backend": inf_cfg.backend,
        "precision": precision,
        "precision_requested": inf_cfg.precision,
        "canary": canary.to_dict() if canary is not None else None,
        "runtimes": runtime_versions(),
    }
