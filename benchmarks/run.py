"""imgscore throughput benchmark: `make bench` (``.venv/bin/python -m benchmarks.run``).

One process run measures, on the same images and the same model:

  (a) the forward-only limit: the best forward configuration on pre-decoded tensors;
  (b) the plain loop people write first: ImageFolder, torchvision's eval recipe,
      DataLoader(batch_size=1), PIL full decode, torch.no_grad;
  (c) a tuned plain loop: the same ImageFolder with JPEG draft decoding, batch 32, DataLoader
      workers, channels_last, conv-BN folding, torch.inference_mode;
  (d) ``imgscore run --config configs/nightly.yaml`` as a whole subprocess at two sizes, so the
      fixed start-up cost separates from the marginal throughput (Δimages / Δseconds).

The workloads (``benchmarks.throughput.specs``: compute-bound, decode-bound, memory, small
images) are photo variants made from the real photos shipped with scikit-image and scikit-learn
and cached under benchmarks/data/ (git-ignored; ``benchmarks.common.images``). Their checkpoints
are seeded random weights calibrated on 16 of the workload's photos; agreement is measured with
the demo's trained resnet18 (``benchmarks.common.models``), against the fp32 full-decode
reference: PIL full decode, torchvision's eval recipe, the unmodified torchvision module in the
default memory format, fp32.

Output: benchmarks/results/latest.md and latest.json (``--sizes full``, the default), or
benchmarks/data/results-tiny.* for ``--sizes tiny`` (a smoke run for development).
``--prepare`` only makes the images and checkpoints; ``--ablations`` measures each speed option
alone (``benchmarks.throughput.ablations``).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torchvision
from PIL import Image

from benchmarks.common.machine import (
    cores,
    cpu_flags,
    cpu_model,
    has_bf16,
    loadavg,
    ram_gib,
    utc_now,
)
from benchmarks.common.models import trained_checkpoint
from benchmarks.common.paths import DATA, RESULTS
from benchmarks.common.results import public, write_json
from benchmarks.throughput.ablations import run_ablations
from benchmarks.throughput.command_runs import import_cost
from benchmarks.throughput.report import render
from benchmarks.throughput.specs import PIPELINE_SPLIT, SIZES, prepare_memory, prepare_workload
from benchmarks.throughput.targets import targets
from benchmarks.throughput.workloads import (
    run_dask_cold_start,
    run_memory,
    run_small,
    run_workload,
    warm_up,
)

PARTS = ["compute", "decode", "memory", "small", "dask"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", choices=sorted(SIZES), default="full")
    ap.add_argument("--only", choices=PARTS, action="append")
    ap.add_argument("--ablations", action="store_true", help="measure each speed option (benchmarks/NOTES.md) instead")
    ap.add_argument("--repeats", type=int, help="imgscore runs per size (default: the size's own)")
    ap.add_argument(
        "--part", choices=["forward", "batch", "pipeline"], action="append", help="with --ablations: only these parts"
    )
    ap.add_argument("--prepare", action="store_true", help="only make the images and checkpoints")
    ap.add_argument(
        "--compile", action="store_true", help="with --ablations: also torch.compile (minutes of compiling)"
    )
    return ap.parse_args(argv)


def prepare(sizes: dict) -> None:
    """Make the compute, decode and memory workloads' images and checkpoints, and the trained
    checkpoint (all cached for the timed run)."""
    prepare_workload(sizes["compute"])
    prepare_workload(sizes["decode"])
    prepare_memory(sizes["memory"])
    trained_checkpoint()


def ablations(sizes: dict, args: argparse.Namespace) -> None:
    """``--ablations``: results/ablations.json (full sizes), else ``ablations-<sizes>.json`` in benchmarks/data,
    merged part by part into what earlier (partial) runs measured."""
    t0 = time.perf_counter()
    out = (
        RESULTS if args.sizes == "full" else DATA
    ) / f"ablations{'' if args.sizes == 'full' else '-' + args.sizes}.json"
    head = {"date": utc_now(), "cores": cores(), "load_before": loadavg()}
    old = json.loads(out.read_text()) if out.exists() else {}

    def save(res: dict) -> dict:
        merged = {**old, **head}
        for k, v in res.items():
            merged[k] = {**merged.get(k, {}), **v}
        write_json(merged, out)
        return merged

    r = save(
        run_ablations(
            sizes,
            args.compile,
            tuple(args.only or ("compute", "decode")),
            tuple(args.part or ("forward", "batch", "pipeline")),
            save,
        )
    )
    r["load_after"] = loadavg()
    r["total_s"] = round(time.perf_counter() - t0, 1)
    write_json(r, out)
    print(json.dumps(r, indent=1))


def header(sizes_name: str) -> dict:
    """The machine and versions a full run is quoted with."""
    from imgscore.inference.backends.installed import runtime_versions

    return {
        "date": utc_now(),
        "sizes": sizes_name,
        "cores": cores(),
        "cpu": cpu_model(),
        "ram_gib": ram_gib(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pillow": Image.__version__,
        "python": platform.python_version(),
        "load_before": loadavg(),
        "pipeline_split": {"dataloader_workers": PIPELINE_SPLIT[0], "torch_threads": PIPELINE_SPLIT[1]},
        "cpu_flags": cpu_flags(),
        "bf16_native": has_bf16(),
        "runtimes": runtime_versions(),
    }


def measure(sizes: dict, only: set[str], r: dict) -> None:
    """Every part in ``only`` into ``r``, after a warm-up run."""
    warm_up()
    r["imports"] = import_cost()
    if "compute" in only:
        r["compute"] = run_workload(sizes["compute"], sizes)
    if "decode" in only:
        r["decode"] = run_workload(sizes["decode"], sizes)
    if "memory" in only:
        r["memory"] = {"spec": asdict(sizes["memory"]), **run_memory(sizes["memory"], sizes)}
    if "small" in only:
        r["small"] = run_small(sizes["small"], sizes["repeats"])
    if "dask" in only:
        r["dask_cold_start"] = run_dask_cold_start(sizes["small"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = dict(SIZES[args.sizes])
    if args.repeats:
        sizes["repeats"] = args.repeats
    if args.prepare:
        prepare(sizes)
        return 0
    if args.ablations:
        ablations(sizes, args)
        return 0
    only = set(args.only or PARTS)
    DATA.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    r = header(args.sizes)
    print(f"imgscore bench ({args.sizes}): {r['cores']} cores, load {r['load_before']}", flush=True)
    measure(sizes, only, r)
    r["load_after"] = loadavg()
    r["total_s"] = round(time.perf_counter() - t0, 1)
    r = public(r)
    out_dir: Path = RESULTS if args.sizes == "full" and not args.only else DATA
    stem = "latest" if out_dir == RESULTS else f"results-{args.sizes}"
    if set(PARTS) <= only:
        r["targets"] = targets(r)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{stem}.md").write_text(render(r))
        print(render(r))
    write_json(r, out_dir / f"{stem}.json")
    print(f"wrote {out_dir / stem}.json in {r['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
