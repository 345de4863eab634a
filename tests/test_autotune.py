"""``inference.num_workers: auto`` / ``batch_size: auto``: the rule (imgscore/inference/autotune.py) on costs
measured on this machine's three benchmark workloads, and the measurement itself."""

from __future__ import annotations

import pytest
import torch

from imgscore.inference import autotune as A

# Per-image costs measured here (benchmarks/NOTES.md), seconds: decode core time,
# forward with 1 thread, forward with both cores.
COMPUTE = A.Costs(decode=0.0117, fwd_1=0.150, fwd_share=0.081, share=2, images=8)  # resnet50, 1600×1200
DECODE = A.Costs(decode=0.0341, fwd_1=0.0139, fwd_share=0.0106, share=2, images=8)  # mobilenet_v3_large, 4000×3000
SMALL = A.Costs(decode=0.00037, fwd_1=0.00072, fwd_share=0.00037, share=2, images=8)  # resnet18, 32×32


@pytest.mark.parametrize(
    "costs, want",
    [(COMPUTE, (0, 2)), (DECODE, (2, 1)), (SMALL, (1, 1))],
    ids=["forward-bound: inline", "decode-bound: two decoders beside one thread", "small: one decoder, one thread"],
)
def test_rule_picks_the_split_with_the_best_predicted_rate(costs, want):
    w, t, pred, lanes = A.choose_split(costs)
    assert (w, t) == want and not lanes, pred
    assert pred[f"{w}x{t}"] >= max(pred.values()) * (1 - A.TIE)
    assert set(pred) == {"0x2", "1x1", "2x1"}  # no lanes unless the forward can run in the workers


def test_lanes_when_every_core_running_the_whole_pipeline_beats_the_split():
    """Lanes: S processes that each decode and forward with one thread, ``S / (d + f(1))``.
    For 32-px images and for resnet50 that beats every split (a 2-thread forward is far from
    2× one thread); for 12-megapixel photos two decoders beside one forward thread already
    keep both cores busy, and the tie goes to the forward in this process."""
    for costs in (SMALL, COMPUTE):
        ch = A.choose_split(costs, lanes=True)
        assert ch.lanes and (ch.workers, ch.threads) == (2, 1), ch.predicted
        assert ch.predicted["2xL"] == pytest.approx(2 / (costs.decode + costs.fwd_1), rel=1e-3)
    ch = A.choose_split(DECODE, lanes=True)
    assert not ch.lanes and (ch.workers, ch.threads) == (2, 1), ch.predicted
    # a lane pays its process start and its first forward per shard: never for a handful of images
    assert not A.choose_split(SMALL, images=50, lanes=True).lanes
    # lanes take whole batches in turn: one batch keeps one lane busy (a one-thread forward)
    assert not A.choose_split(COMPUTE, images=32, batch=32, lanes=True).lanes
    assert A.choose_split(COMPUTE, images=1000, batch=32, lanes=True).lanes
    # one core, a daemonic worker, or more cores than lanes may hold batches: no lanes candidate
    one = A.Costs(decode=0.001, fwd_1=0.002, fwd_share=0.002, share=1, images=8)
    big = A.Costs(decode=0.001, fwd_1=0.002, fwd_share=0.002 / 8, share=A.MAX_LANES + 1, images=8)
    for c, fork in ((one, True), (SMALL, False), (big, True)):
        assert not any(k.endswith("xL") for k in A.choose_split(c, can_fork=fork, lanes=True).predicted)


def test_starting_decoders_must_pay_for_itself_within_the_shard():
    """Each DataLoader process costs its start per shard: for cheap 32-px images the decoder that
    pays in a long shard does not in a shard of 100; for 12-megapixel photos it always does."""
    assert A.choose_split(SMALL, images=100)[:2] == (0, 2)
    assert A.choose_split(SMALL, images=10**7)[:2] == (1, 1)
    assert A.choose_split(DECODE, images=100)[:2] == (2, 1)


def test_never_a_multithreaded_forward_beside_more_decoders_than_spare_cores():
    """Spinning OpenMP teams beside decode processes collapsed throughput 10× (module doc):
    every candidate with t > 1 leaves w + t <= cores; lanes run one thread each."""
    for share in (2, 4, 8):
        c = A.Costs(decode=0.01, fwd_1=0.02, fwd_share=0.02 / share, share=share, images=8)
        _, _, pred, _ = A.choose_split(c, lanes=True)
        for key in pred:
            w, t = key.split("x")
            assert t == "L" and int(w) == share or int(t) == 1 or int(w) + int(t) <= share, key


def test_a_daemonic_worker_decodes_inline():
    assert A.choose_split(DECODE, can_fork=False)[:2] == (0, 2)


def test_batch_grows_only_for_cheap_forwards():
    assert A.choose_batch(COMPUTE.fwd_share, "auto") == 32
    assert A.choose_batch(SMALL.fwd_share, "auto") == 256
    assert A.choose_batch(SMALL.fwd_share, 8) == 8  # a number is kept


def test_shard_split_measures_once_and_keeps_what_is_configured():
    """The measured path: real decode-like work and a real forward; a second shard with the same
    key reuses the split, and a configured number of workers is kept as given."""
    calls = {"decode": 0}
    conv = torch.nn.Conv2d(3, 8, 3).eval()

    class _Fwd:
        channels_last = False

        def __call__(self, x):
            return conv(x).mean((2, 3)).softmax(1)

    class _Item:
        def __init__(self, t):
            self.tensor = t

    class _DS:
        def __len__(self):
            return 16

        def __getitem__(self, i):
            calls["decode"] += 1
            return _Item(torch.rand(3, 32, 32))

    key = ("test", "conv", "torch", "fp32", 2, 32, 10)
    a = A.shard_split(_DS(), lambda t: _Fwd(), 2, "auto", "auto", key, torch.device("cpu"), can_fork=True)
    assert a.costs is not None and a.costs.images == 8 and a.costs.decode > 0 and a.costs.fwd_1 > 0
    assert (a.workers, a.threads) == A.choose_split(a.costs, images=16)[:2] and a.batch in (32, 64, 128, 256)
    assert not a.lanes  # not offered by the caller
    n = calls["decode"]
    b = A.shard_split(_DS(), lambda t: _Fwd(), 2, "auto", 16, key, torch.device("cpu"), can_fork=True)
    assert calls["decode"] == n and (b.workers, b.threads, b.batch) == (a.workers, a.threads, 16)
    c = A.shard_split(_DS(), lambda t: _Fwd(), 2, 3, "auto", key, torch.device("cpu"), can_fork=True)
    assert (c.workers, c.threads) == (3, 2)
