"""``inference.num_workers: auto`` — DataLoader workers vs torch threads, from measured costs.

The split of a worker's cores between decoding (DataLoader worker processes) and the forward
pass (torch / runtime threads) is chosen from what this model costs on these images, measured
once per process on the shard's first few images (:func:`measure`):

- ``d``: core-seconds to decode and transform one image, in this process;
- ``f(t)``: seconds per image of the forward pass with ``t`` threads (measured for 1 and for
  the worker's core share ``S``; in between, interpolated with the measured scaling).

:func:`choose_split` then predicts images per second for each candidate and keeps the best
(on a tie within 3 %, fewer forward threads, then fewer workers: a spinning OpenMP team is the
first thing to suffer when the machine is shared — inline with 2 threads lost most of its speed
while another job held a core, one decoder beside one thread kept half; benchmarks/NOTES.md, "Autotune"):

- inline, ``(0, S)``: decode and forward take turns in this process: ``1 / (d + f(S))``;
- pipelined, ``(w, S - w)`` for ``1 <= w < S``: workers decode while ``S - w`` threads run the
  forward, no core shared: ``min(w / d, 1 / f(S - w))``;
- decode-heavy, ``(w, 1)`` for ``w >= S``: more decode processes than spare cores beside a
  single-threaded forward; the cores are shared, so also bounded by the core time:
  ``min(w / d, 1 / f(1), S / (d + f(1)))``;
- lanes, ``S`` DataLoader processes that each decode *and* run the forward with one thread
  (the forward moves into the DataLoader's ``collate_fn``; only probabilities come back):
  ``S / (d + f(1))`` — every core busy with the whole pipeline, as ``S`` separate runs would
  be. Offered only where the forward can run in a forked process: torch or ONNX Runtime on
  the CPU, one model, no embeddings (:func:`choose_split`'s ``lanes``), and for at most :data:`MAX_LANES`
  cores (each lane holds a batch's activations);

and every DataLoader process costs :data:`WORKER_START_S` per shard (a DataLoader per shard),
spread over the shard's images; a lane also pays :data:`FORWARD_START_S` once for its first
forward in the fresh process.

Never more torch threads than cores left beside the workers when ``t > 1``: an idle OpenMP
team spins, and decode processes beside a spinning 2-thread forward ran about 10× slower
(benchmarks/NOTES.md, "Autotune"). On a 2-core machine the rule
picks inline for resnet50 on 1600×1200 photos (forward-bound), one decode worker beside one
thread or two lanes for 32-px images (whichever the measured costs favour), and two decode
workers beside one thread for 12-megapixel photos. Lanes hold one model forward's activations
per process: the memory of ``S`` batches at once instead of one.

``inference.batch_size: auto`` starts at 32 and doubles (to at most 256) while one batch's
forward at the chosen thread count takes under 50 ms, so per-batch costs (collate, DataLoader
hand-over, Python per batch) stay small next to the forward of small inputs.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch

from imgscore.inference.backends.forward import Forward

log = logging.getLogger("imgscore")

# Starting one forked DataLoader process, per shard: the time a one-worker shard takes to reach
# its first batch beyond an inline shard's (`setup_s` in commit records; benchmarks/NOTES.md, "Autotune").
WORKER_START_S = 0.08
# A lane's first forward in its fresh process (oneDNN primitives, allocator), beyond a
# decode-only worker's first batch (benchmarks/NOTES.md, "Autotune").
FORWARD_START_S = 0.06
# Lanes hold one batch's activations each: at most this many (a 64-core worker runs its forward
# threaded instead of holding 64 batches at once).
MAX_LANES = 8
TIE = 0.03  # predicted rates within 3 % count as equal: fewer processes win
MIN_BATCH, MAX_BATCH, BATCH_TARGET_S = 32, 256, 0.05


@dataclass(frozen=True)
class Costs:
    """Measured per-image costs, seconds: ``decode`` (core time, decode + transform), ``fwd_1``
    (forward with 1 thread), ``fwd_share`` (forward with ``share`` threads)."""

    decode: float
    fwd_1: float
    fwd_share: float
    share: int
    images: int


@dataclass(frozen=True)
class Split:
    """What a shard runs with: DataLoader ``workers``, forward ``threads``, ``batch`` size, the
    predicted img/s of every candidate (``"w×t"`` → img/s, ``"wxL"`` for ``w`` lanes) and the
    costs they came from. ``lanes``: the forward runs inside the ``workers`` DataLoader
    processes (one thread each), not in this process."""

    workers: int
    threads: int
    batch: int
    predicted: dict[str, float]
    costs: Costs | None
    lanes: bool = False

    @property
    def label(self) -> str:
        """``"2x1 batch 32"``, ``"2 lanes batch 64"``: how logs and the bench name it."""
        return (
            f"{self.workers} lanes batch {self.batch}"
            if self.lanes
            else f"{self.workers}x{self.threads} batch {self.batch}"
        )


class Choice(NamedTuple):
    """:func:`choose_split`'s answer: DataLoader ``workers``, forward ``threads`` (1 for lanes),
    ``predicted`` img/s per candidate, and whether the forward runs in the workers (``lanes``)."""

    workers: int
    threads: int
    predicted: dict[str, float]
    lanes: bool


def fwd_at(c: Costs, t: int) -> float:
    """Forward seconds per image with ``t`` threads: measured at 1 and ``share``; between them
    the speed-up grows linearly in ``t`` (Amdahl-like enough for 2–16 cores)."""
    if t <= 1 or c.share <= 1:
        return c.fwd_1
    if t >= c.share:
        return c.fwd_share
    gain = c.fwd_1 / max(c.fwd_share, 1e-12) - 1.0  # extra speed-up of share threads over one
    return c.fwd_1 / (1.0 + gain * (t - 1) / (c.share - 1))


def choose_split(
    c: Costs,
    can_fork: bool = True,
    max_workers: int | None = None,
    images: int | None = None,
    lanes: bool = False,
    batch: int | None = None,
) -> Choice:
    """The :class:`Choice` by the rule in the module doc.

    ``can_fork`` False (a daemonic Dask worker) leaves only inline decoding. ``lanes``: the
    forward may run inside the DataLoader processes (torch on the CPU, one model), which adds
    the ``S`` lanes candidate. ``images``: the shard's length; each DataLoader process then
    also costs :data:`WORKER_START_S` per shard (one DataLoader per shard), and each lane
    :data:`FORWARD_START_S` more, spread over its images; and lanes take whole batches in
    turn (``batch``, default what ``batch_size: auto`` would pick for a one-thread forward), so
    a shard of ``n`` batches keeps only ``min(n, S)`` lanes busy: ``ceil(n / S)`` rounds of one
    batch's decode and forward each.
    """
    s = max(1, c.share)
    d = max(c.decode, 1e-9)
    pred: dict[tuple[int, int, bool], float] = {(0, s, False): 1.0 / (d + c.fwd_share)}
    if can_fork:
        top = max_workers if max_workers is not None else s
        for w in range(1, s):
            pred[(w, s - w, False)] = min(w / d, 1.0 / fwd_at(c, s - w))
        for w in range(s, max(s, top) + 1):
            pred[(w, 1, False)] = min(w / d, 1.0 / c.fwd_1, s / (d + c.fwd_1))
        if lanes and 1 < s <= MAX_LANES:
            pred[(s, 1, True)] = s / (d + c.fwd_1)
    if images:

        def seconds(k: tuple[int, int, bool], v: float) -> float:
            w, _, lane = k
            if not lane:
                return images / v + w * WORKER_START_S
            b = batch or choose_batch(c.fwd_1, "auto")
            rounds = math.ceil(math.ceil(images / b) / w)  # the DataLoader hands batches to lanes in turn
            return rounds * b * (d + c.fwd_1) + w * WORKER_START_S + FORWARD_START_S

        pred = {k: images / seconds(k, v) for k, v in pred.items()}
    best = max(pred.values())
    # ties: fewer forward threads, then fewer processes, then the forward in this process
    w, t, ln = min((k for k, v in pred.items() if v >= best * (1 - TIE)), key=lambda k: (k[1], k[0], k[2]))
    return Choice(
        w, t, {(f"{a}xL" if lane else f"{a}x{b}"): round(v, 2) for (a, b, lane), v in sorted(pred.items())}, ln
    )


def choose_batch(fwd_s_per_image: float, configured: int | str) -> int:
    """``configured`` when it is a number; for ``auto`` see the module doc."""
    if isinstance(configured, int):
        return configured
    b = MIN_BATCH
    while b < MAX_BATCH and b * fwd_s_per_image < BATCH_TARGET_S:
        b *= 2
    return b


def _forward_s_per_image(fwd: Forward, x: torch.Tensor) -> float:
    """Seconds per image of ``fwd`` on ``x`` (float32 [B, 3, H, W]), after two warm-up calls."""
    xin = x.contiguous(memory_format=torch.channels_last) if fwd.channels_last else x.contiguous()
    with torch.inference_mode():
        fwd(xin[:2])  # warm-up: primitives for this shape family, allocator
        fwd(xin)
        t0 = time.perf_counter()
        fwd(xin)
        return (time.perf_counter() - t0) / len(x)


def measure(
    samples: Callable[[int], torch.Tensor | None], n: int, forward_for: Callable[[int], Forward], share: int
) -> Costs | None:
    """Measure :class:`Costs` on up to ``n`` images.

    ``samples(i)`` decodes and transforms image ``i`` (float32 [3, H, W]) or returns None for an
    image that fails; its thread CPU time is the decode cost. ``forward_for(t)`` is the forward
    callable with ``t`` threads. None when no image decodes (nothing to measure).
    """
    tensors: list[torch.Tensor] = []
    spent = 0.0
    prev = torch.get_num_threads()
    torch.set_num_threads(1)  # a DataLoader worker decodes with one torch thread
    try:
        for i in range(n):
            t0 = time.thread_time()
            x = samples(i)
            spent += time.thread_time() - t0
            if x is not None:
                tensors.append(x)
    finally:
        torch.set_num_threads(prev)
    if not tensors:
        return None
    x = torch.stack(tensors)
    f1 = _forward_s_per_image(forward_for(1), x)
    fs = _forward_s_per_image(forward_for(share), x) if share > 1 else f1
    return Costs(decode=spent / len(tensors), fwd_1=f1, fwd_share=fs, share=share, images=len(tensors))


# (models, backend, precision, thread share, input sizes, typical file size) → the split measured for them
SplitKey = tuple[object, ...]
_SPLITS: dict[SplitKey, Split] = {}
_LOCK = threading.Lock()


def cached_split(key: SplitKey) -> Split | None:
    """The split this process already measured for ``key`` (model, backend, share, input)."""
    with _LOCK:
        return _SPLITS.get(key)


def remember_split(key: SplitKey, split: Split) -> Split:
    """Keep ``split`` for ``key`` in this process, unless another thread kept one first; the one kept."""
    with _LOCK:
        return _SPLITS.setdefault(key, split)


GPU_WORKERS = 4  # decode processes per GPU worker under `auto` (the forward runs on the GPU)


class Probe(Protocol):
    """What :func:`shard_split` measures on: the shard's images by position (a ``ShardDataset``)."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> object: ...


def shard_split(
    ds: Probe,
    forward_for: Callable[[int], Forward],
    share: int,
    workers_cfg: int | str,
    batch_cfg: int | str,
    key: SplitKey,
    device: torch.device,
    can_fork: bool,
    probe: int = 8,
    lanes: bool = False,
) -> Split:
    """The :class:`Split` a shard runs with.

    Numbers in ``inference.num_workers`` / ``inference.batch_size`` are kept as given (torch
    threads: the worker's share). ``auto`` is decided once per process and ``key`` by
    :func:`measure` on the shard's first ``probe`` images (``ds[i]`` returns an object with a
    ``tensor`` for a decoded image) and :func:`choose_split`. On a GPU the forward does not
    compete for cores: ``auto`` decodes with ``min(4, share)`` processes (0 when ``can_fork``
    is False) and batch ``auto`` is 32. ``lanes``: whether the forward may run inside the
    DataLoader processes (:func:`choose_split`); only ``num_workers: auto`` ever picks lanes.
    """
    fixed_w = None if workers_cfg == "auto" else int(workers_cfg)
    fixed_b = None if batch_cfg == "auto" else int(batch_cfg)
    if fixed_w is not None and fixed_b is not None:
        return Split(fixed_w, share, fixed_b, {}, None)
    if device.type != "cpu":
        w = fixed_w if fixed_w is not None else (min(GPU_WORKERS, share) if can_fork else 0)
        return Split(w, share, fixed_b or MIN_BATCH, {}, None)
    split = cached_split(key)
    if split is None:
        split = _measure_split(ds, forward_for, share, key, can_fork, probe, lanes, fixed_b)
        if split is None:  # nothing decodes in the probe: the shard records its failures anyway
            return Split(fixed_w if fixed_w is not None else 0, share, fixed_b or MIN_BATCH, {}, None)
    if fixed_w is None:
        return Split(
            split.workers,
            split.threads,
            fixed_b if fixed_b is not None else split.batch,
            split.predicted,
            split.costs,
            split.lanes,
        )
    costs = split.costs
    assert costs is not None  # a split remember_split keeps was measured
    b = fixed_b if fixed_b is not None else choose_batch(fwd_at(costs, share), "auto")
    return Split(fixed_w, share, b, split.predicted, split.costs)


def _measure_split(
    ds: Probe,
    forward_for: Callable[[int], Forward],
    share: int,
    key: SplitKey,
    can_fork: bool,
    probe: int,
    lanes: bool,
    fixed_b: int | None,
) -> Split | None:
    """``num_workers: auto`` on a CPU: the split :func:`measure` and :func:`choose_split` pick on
    the shard's first ``probe`` images, kept for ``key`` (:func:`remember_split`) and logged;
    None when nothing decodes in the probe."""

    def sample(i: int) -> torch.Tensor | None:
        item = ds[i]
        return getattr(item, "tensor", None)

    costs = measure(sample, min(probe, len(ds)), forward_for, share)
    if costs is None:
        return None
    ch = choose_split(costs, can_fork, images=len(ds), lanes=lanes, batch=fixed_b)
    split = remember_split(
        key,
        Split(ch.workers, ch.threads, choose_batch(fwd_at(costs, ch.threads), "auto"), ch.predicted, costs, ch.lanes),
    )
    log.info(
        "worker split for %s: %s (decode %.2f ms, forward %.2f ms/img at 1 thread, %.2f at %d; predicted img/s %s)",
        key[0],
        split.label,
        costs.decode * 1e3,
        costs.fwd_1 * 1e3,
        costs.fwd_share * 1e3,
        share,
        ch.predicted,
    )
    return split
