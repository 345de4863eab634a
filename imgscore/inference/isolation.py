"""Per-image isolation of the forward pass: a batch whose forward raises is split until the
failing images are alone, and CUDA out-of-memory lowers the batch for the rest of the shard
(:func:`score_isolated`). The same code runs in the scoring process and, for lanes, inside the
DataLoader processes (:class:`imgscore.inference.loader.LaneCollate`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class Isolation:
    """Mutable per-shard forward state: the largest batch that fits (lowered on OOM), the OOM
    events seen, and the images that failed as (position, error type, message)."""

    max_batch: int
    oom_events: int = 0
    failures: list[tuple[int, str, str]] = field(default_factory=list)  # (pos, error_type, message)


def score_isolated(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, positions: list[int], state: Isolation
) -> list[tuple[int, torch.Tensor]]:
    """Run ``fn`` on ``x`` in chunks of ``state.max_batch``; isolate failures to single images.

    A chunk whose forward raises is split in halves recursively until the failing images are
    alone; those are appended to ``state.failures`` and every other image is scored. On CUDA
    out-of-memory the chunk is halved and ``state.max_batch`` lowered for the rest of the shard.
    Rows with non-finite outputs are failures too (``NonFiniteOutput``).

    Returns:
        (position, probabilities float32 [C]) for each scored image, in input order.
    """
    out: list[tuple[int, torch.Tensor]] = []

    def run(xs: torch.Tensor, ps: list[int]) -> None:
        try:
            probs = fn(xs)
        except torch.OutOfMemoryError as exc:
            state.oom_events += 1
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(ps) == 1:
                state.failures.append((ps[0], "OutOfMemoryError", str(exc).splitlines()[0]))
                return
            state.max_batch = max(1, min(state.max_batch, len(ps) // 2))
            i = 0  # the rest of this chunk too runs at the lowered size (which may drop again)
            while i < len(ps):
                step = state.max_batch
                run(xs[i : i + step], ps[i : i + step])
                i += step
            return
        except Exception as exc:
            if len(ps) == 1:
                state.failures.append((ps[0], type(exc).__name__, (str(exc) or repr(exc))[:2000]))
                return
            half = len(ps) // 2
            run(xs[:half], ps[:half])
            run(xs[half:], ps[half:])
            return
        finite = torch.isfinite(probs).all(dim=1)
        for i, p in enumerate(ps):
            if bool(finite[i]):
                out.append((p, probs[i]))
            else:
                state.failures.append((p, "NonFiniteOutput", "model output contains NaN or Inf for this image"))

    start = 0
    while start < len(positions):
        step = state.max_batch
        run(x[start : start + step], positions[start : start + step])
        start += step
    return out
