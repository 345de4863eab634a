"""Fuzz the decode path for longer than the test suite does.

Each case takes a seed photo in one of the default ``input.formats`` and 1-8 random byte edits
(``tests/fuzz_cases.py``: the same seeds, edits and contract as ``tests/test_fuzz_decode.py``),
decodes it as a shard does and checks that it ends as a float32 [3, 224, 224] tensor or a
``DecodeError`` within the time budget, and that the case grew peak memory by no more than the
bound. Prints the cases run, the outcomes by kind, the slowest case and peak memory, and every
crasher; with ``--save DIR`` the crashers' bytes are written there to become regression fixtures.

    nice -n 19 .venv/bin/python -m benchmarks.fuzz_decode --cases 5000 [--seed 0] [--save /tmp/crashers]
"""

from __future__ import annotations

import argparse
import collections
import random
import sys
import time
from pathlib import Path

from tests.fuzz_cases import CASE_MEMORY_MIB, EDITS, PeakMemory, mutate, run_case, seed_files


def random_edits(rng: random.Random) -> list[tuple[str, int, int]]:
    """1-8 edits as :func:`tests.fuzz_cases.mutate` takes them."""
    return [(rng.choice(EDITS), rng.randrange(1 << 16), rng.randrange(256)) for _ in range(rng.randint(1, 8))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=1000, help="cases to run")
    ap.add_argument("--seed", type=int, default=0, help="random seed (the same seed runs the same cases)")
    ap.add_argument("--save", type=Path, default=None, help="folder for the crashers' bytes")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    seeds = seed_files()
    names = sorted(seeds)
    kinds: collections.Counter[str] = collections.Counter()
    crashers: list[tuple[int, str, list, str]] = []
    slowest = (0.0, "")
    peak_growth = 0.0
    t0 = time.monotonic()
    for i in range(args.cases):
        name = rng.choice(names)
        edits = random_edits(rng)
        data = mutate(seeds[name], edits)
        with PeakMemory() as mem:
            out = run_case(data, name)
        peak_growth = max(peak_growth, mem.growth_mib)
        if out.result != "crash" and mem.growth_mib > CASE_MEMORY_MIB:
            out.result, out.detail = "crash", f"peak memory +{mem.growth_mib:.0f} MiB, over {CASE_MEMORY_MIB} MiB"
        kinds[out.result] += 1
        slowest = max(slowest, (out.seconds, f"case {i} ({name})"))
        if out.result == "crash":
            crashers.append((i, name, edits, out.detail))
            if args.save is not None:
                args.save.mkdir(parents=True, exist_ok=True)
                (args.save / f"case{i:06d}-{name}").write_bytes(data)
    took = time.monotonic() - t0
    print(f"cases run: {args.cases} (seed {args.seed}, {len(names)} seed files) in {took:.0f} s")
    print("outcomes: " + ", ".join(f"{k} {n}" for k, n in kinds.most_common()))
    print(
        f"slowest case: {slowest[0]:.2f} s, {slowest[1]}; largest peak-memory growth of a case: {peak_growth:.0f} MiB"
        f" (bound {CASE_MEMORY_MIB} MiB)"
    )
    print(f"crashers found: {len(crashers)}")
    for i, name, edits, detail in crashers:
        print(f"  case {i} {name} edits={edits}: {detail}")
    return 1 if crashers else 0


if __name__ == "__main__":
    sys.exit(main())
