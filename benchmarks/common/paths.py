"""Where the benchmarks read and write."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
#: Images, checkpoints and run outputs the benchmarks make, cached between runs (git-ignored).
DATA = REPO / "benchmarks" / "data"
#: The result files benchmarks/NOTES.md quotes (committed).
RESULTS = REPO / "benchmarks" / "results"
#: The ``imgscore`` console script of the environment running the benchmark.
IMGSCORE = Path(sys.executable).parent / "imgscore"
