"""Fuzz the decode path a shard uses: mutated real photos in every default format end as the
model's tensor or a ``DecodeError`` — no other exception, within the per-image time budget and
memory bound (``tests/fuzz_cases.py``). A fixed number of derandomized cases runs here;
``benchmarks/fuzz_decode.py`` runs many more. Each crasher found becomes a case below.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.fuzz_cases import (
    CASE_BUDGET_S,
    CASE_MEMORY_MIB,
    EDITS,
    PeakMemory,
    mutate,
    run_case,
    seed_files,
)

SEEDS = sorted(seed_files())
edits = st.lists(
    st.tuples(st.sampled_from(EDITS), st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1, max_size=8
)


def check(data: bytes, name: str) -> str:
    """Run one case and assert the contract; the outcome (``tensor`` or ``DecodeError.<kind>``)."""
    with PeakMemory() as mem:
        out = run_case(data, name)
    assert out.result != "crash", f"{name}: {out.detail}"
    assert out.seconds <= CASE_BUDGET_S
    assert mem.growth_mib <= CASE_MEMORY_MIB, f"{name}: peak memory +{mem.growth_mib:.0f} MiB"
    return out.result


def test_every_seed_decodes_to_the_tensor():
    """The seeds themselves score: a fuzz case that fails is the mutation's doing."""
    assert {
        "astronaut.jpg",
        "astronaut.png",
        "astronaut.webp",
        "astronaut.tif",
        "astronaut.bmp",
        "astronaut.gif",
        "pair.mpo",
    } <= set(SEEDS)
    assert {name: check(seed_files()[name], name) for name in SEEDS} == dict.fromkeys(SEEDS, "tensor")


@pytest.mark.fuzz
@settings(
    max_examples=600, derandomize=True, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(name=st.sampled_from(SEEDS), edits=edits)
def test_mutated_photos_end_as_a_tensor_or_a_decode_error(name, edits):
    check(mutate(seed_files()[name], edits), name)


@pytest.mark.skipif("AVIF" not in Image.SAVE, reason="this Pillow has no AVIF encoder")
def test_truncated_avif_is_a_decode_error():
    """Found by benchmarks/fuzz_decode.py: libavif's 'Failed to decode image: Not implemented' is
    a RuntimeError from Image.open, which escaped the decode as a non-DecodeError."""
    data = mutate(seed_files()["astronaut.avif"], [("truncate", 25558, 118), ("delete", 41134, 92), ("flip", 6868, 0)])
    assert check(data, "cut.avif") == "DecodeError.corrupt"
