"""``inference.num_workers: auto`` / ``batch_size: auto``: the rule (tasks/autotune.py) on costs
measured on this machine's three benchmark workloads, and the measurement itself."""

from __future__ import annotations

import pytest
import torch

from imgscore.tasks import autotune as A

# Per-image costs measured here (benchmarks/NOTES.md, issue 16), seconds: decode core time,
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
    w, t, pred = A.choose_split(costs)
    assert (w, t) == want, pred
    assert pred[f"{w}x{t}"] >= max(pred.values()) * (1 - A.TIE)
    assert set(pred) == {"0x2", "1x1", "2x1"}


def test_starting_decoders_must_pay_for_itself_within_the_shard():
    """Each DataLoader process costs its start per shard: for cheap 32-px images the decoder that
    pays in a long shard does not in a shard of 500; for 12-megapixel photos it always does."""
    assert A.choose_split(SMALL, images=500)[:2] == (0, 2)
    assert A.choose_split(SMALL, images=10**7)[:2] == (1, 1)
    assert A.choose_split(DECODE, images=100)[:2] == (2, 1)


def test_never_a_multithreaded_forward_beside_more_decoders_than_spare_cores():
    """Spinning OpenMP teams beside decode processes collapsed throughput 10× (module doc):
    every candidate with t > 1 leaves w + t <= cores."""
    for share in (2, 4, 8):
        c = A.Costs(decode=0.01, fwd_1=0.02, fwd_share=0.02 / share, share=share, images=8)
        _, _, pred = A.choose_split(c)
        for key in pred:
            w, t = map(int, key.split("x"))
            assert t == 1 or w + t <= share, key


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
    n = calls["decode"]
    b = A.shard_split(_DS(), lambda t: _Fwd(), 2, "auto", 16, key, torch.device("cpu"), can_fork=True)
    assert calls["decode"] == n and (b.workers, b.threads, b.batch) == (a.workers, a.threads, 16)
    c = A.shard_split(_DS(), lambda t: _Fwd(), 2, 3, "auto", key, torch.device("cpu"), can_fork=True)
    assert (c.workers, c.threads) == (3, 2)
