"""``make bench --ablations``: each speed option measured alone, on the compute and decode
workloads' images (results/ablations.json; what each option gave is in benchmarks/NOTES.md)."""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader

from benchmarks.common.images import spread, subset
from benchmarks.common.machine import cores, loadavg
from benchmarks.common.models import fast_module, plain_module, reference_transform
from benchmarks.throughput.in_process import load_folded
from benchmarks.throughput.specs import prepare_workload
from imgscore.inference.model import fold_conv_bn


def pipeline_throughput(
    root: Path,
    arch: str,
    ckpt: Path,
    batch: int,
    workers: int,
    threads: int,
    draft: bool = True,
    fold: bool = True,
    channels_last: bool = True,
    prefetch: int = 2,
) -> dict:
    """img/s of imgscore's scoring path in process (ShardDataset → DataLoader → forward_probs),
    everything score_shard does except writing Parquet; model load and warm-up not timed."""
    from imgscore.images.dataset import ShardDataset, collate_samples
    from imgscore.images.preprocess import DecodeOptions
    from imgscore.images.scan import scan_images
    from imgscore.inference.backends.eager import forward_probs

    torch.set_num_threads(threads)
    lm = load_folded(arch, ckpt, channels_last=channels_last, fold=fold)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    with torch.inference_mode():
        forward_probs(lm, torch.zeros(2, 3, 224, 224).contiguous(memory_format=memory_format), "fp32")
    index = scan_images(root, "auto", True)
    spec = dataclasses.replace(lm.preprocess, jpeg_draft=draft)
    t0 = time.perf_counter()
    dsf = ShardDataset(str(root), index.entries, spec, DecodeOptions(max_pixels=10**9))
    kw: dict[str, Any] = {"prefetch_factor": prefetch, "multiprocessing_context": "fork"} if workers else {}
    loader = DataLoader(dsf, batch_size=batch, num_workers=workers, collate_fn=collate_samples, **kw)
    n = 0
    with torch.inference_mode():
        for b in loader:
            forward_probs(lm, b.tensor.contiguous(memory_format=memory_format), "fp32")
            n += len(b.positions)
    dt = time.perf_counter() - t0
    torch.set_num_threads(cores())
    return {
        "images": n,
        "seconds": round(dt, 3),
        "img_per_s": round(n / dt, 2),
        "workers": workers,
        "threads": threads,
        "draft": draft,
        "fold": fold,
        "channels_last": channels_last,
        "prefetch": prefetch,
        "batch": batch,
    }


Variant = tuple[Callable[[], torch.Tensor], Callable[[], AbstractContextManager]]


def _bf16(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return m(x)


def _variants(arch: str, ckpt: Path, x: torch.Tensor, compile_: bool, out: dict) -> dict[str, Variant]:
    """Each model-side option as ``name → (forward, grad context)``; what building the optional
    ones cost, or why they failed, goes into ``out``."""
    base = plain_module(arch, ckpt)
    cl = copy.deepcopy(base).to(memory_format=torch.channels_last)
    folded_cl = fold_conv_bn(copy.deepcopy(base)).to(memory_format=torch.channels_last)
    folded_c = fold_conv_bn(copy.deepcopy(base))
    xc, xl = x.contiguous(), x.contiguous(memory_format=torch.channels_last)
    variants: dict[str, Variant] = {
        "contiguous": (lambda: base(xc), torch.inference_mode),
        "channels_last": (lambda: cl(xl), torch.inference_mode),
        "channels_last+folded": (lambda: folded_cl(xl), torch.inference_mode),
        "contiguous+folded": (lambda: folded_c(xc), torch.inference_mode),
        "channels_last+folded, no_grad": (lambda: folded_cl(xl), torch.no_grad),
        "channels_last+folded, bf16 autocast": (lambda: _bf16(folded_cl, xl), torch.inference_mode),
    }
    try:
        t0 = time.perf_counter()
        with torch.inference_mode():
            ts = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.script(copy.deepcopy(cl))))
            ts(xl)
            ts(xl)
        out["torchscript_frozen_build_s"] = round(time.perf_counter() - t0, 2)
        variants["torchscript frozen + optimize_for_inference"] = (lambda: ts(xl), torch.inference_mode)
    except Exception as exc:  # recorded, not fatal: it is an experiment
        out["torchscript_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    if compile_:
        try:
            t0 = time.perf_counter()
            comp = torch.compile(folded_cl)
            with torch.inference_mode():
                comp(xl)
            out["torch_compile_first_call_s"] = round(time.perf_counter() - t0, 1)
            variants["torch.compile (inductor)"] = (lambda: comp(xl), torch.inference_mode)
        except Exception as exc:
            out["torch_compile_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return variants


def forward_variants(arch: str, ckpt: Path, x: torch.Tensor, batches: int, compile_: bool) -> dict:
    """Forward-only img/s for each model-side option, same inputs, interleaved rounds (best of 2),
    with each option's largest probability difference and top-1 agreement against the first."""
    torch.set_num_threads(cores())
    out: dict = {}
    variants = _variants(arch, ckpt, x, compile_, out)
    ref = None
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(2):
        for k, (fn, ctx) in variants.items():
            with ctx():
                fn()  # warm-up for this round
                t0 = time.perf_counter()
                for _ in range(batches):
                    y = fn()
                times[k].append(time.perf_counter() - t0)
            y = torch.softmax(y.float(), 1)
            if ref is None:
                ref = y
            out.setdefault("max_prob_diff", {})[k] = round(float((y - ref).abs().max()), 6)
            out.setdefault("top1_agree", {})[k] = round(float((y.argmax(1) == ref.argmax(1)).float().mean()), 4)
    out["img_per_s"] = {k: round(batches * len(x) / min(v), 2) for k, v in times.items()}
    return out


def batch_sizes(arch: str, ckpt: Path, x: torch.Tensor, sizes: tuple[int, ...]) -> dict[int, float]:
    """Forward-only img/s of imgscore's module at each batch size (``x`` repeated to fill larger ones)."""
    torch.set_num_threads(cores())
    m = fast_module(arch, ckpt)
    out = {}
    with torch.inference_mode():
        for b in sizes:
            xb = x[:b] if b <= len(x) else x.repeat(b // len(x) + 1, 1, 1, 1)[:b]
            xb = xb.contiguous(memory_format=torch.channels_last)
            m(xb)
            n = max(1, 64 // b)
            t0 = time.perf_counter()
            for _ in range(n):
                m(xb)
            out[b] = round(n * b / (time.perf_counter() - t0), 2)
    return out


def _pipeline_runs(root: Path, arch: str, ckpt: Path, batch: int) -> list[dict]:
    """The scoring path at several workers × threads splits, then with one option off at a time."""
    runs = []
    for nw, th in ((0, cores()), (1, cores()), (2, cores()), (2, 1), (1, 1), (3, cores())):
        runs.append(pipeline_throughput(root, arch, ckpt, batch, nw, th))
        print(f"    workers {nw} threads {th}: {runs[-1]['img_per_s']} img/s", flush=True)
    runs.append(pipeline_throughput(root, arch, ckpt, batch, 2, cores(), prefetch=4))
    runs.append(pipeline_throughput(root, arch, ckpt, batch, 2, cores(), draft=False))
    runs.append(pipeline_throughput(root, arch, ckpt, batch, 2, cores(), fold=False))
    runs.append(pipeline_throughput(root, arch, ckpt, batch, 2, cores(), fold=False, channels_last=False))
    return runs


def run_ablations(
    sizes: dict,
    compile_: bool,
    keys: tuple[str, ...] = ("compute", "decode"),
    parts: tuple[str, ...] = ("forward", "batch", "pipeline"),
    save: Callable[[dict], Any] | None = None,
) -> dict:
    """The ``parts`` of the ablations for the workloads ``keys``; ``save`` (when given) is called
    with the results so far after each part, so a long run that is stopped keeps what it measured."""
    res: dict = {}
    for key in keys:
        w = sizes[key]
        folder, rels, ckpt = prepare_workload(w)
        tfm = reference_transform()
        x = torch.stack([tfm(Image.open(folder / "all" / r).convert("RGB")) for r in spread(rels, sizes["batch"])])
        res[key] = {}
        if "forward" in parts:
            print(f"[ablations/{key}] forward variants …", flush=True)
            res[key]["forward"] = forward_variants(
                w.arch, ckpt, x, 1 if key == "compute" else 3, compile_ and key == "decode"
            )
            res[key]["forward"]["load"] = loadavg()
            save and save(res)
        if "batch" in parts:
            print(f"[ablations/{key}] batch sizes …", flush=True)
            res[key]["batch_img_per_s"] = batch_sizes(
                w.arch, ckpt, x, (1, 8, 16, 32, 64) if sizes["batch"] >= 32 else (1, 4, 8)
            )
            res[key]["batch_load"] = loadavg()
            save and save(res)
        if "pipeline" in parts:
            print(f"[ablations/{key}] workers × threads, prefetch, draft …", flush=True)
            res[key]["pipeline"] = _pipeline_runs(subset(folder, rels, w.n_tuned), w.arch, ckpt, sizes["batch"])
            res[key]["pipeline_load"] = loadavg()
            save and save(res)
    return res
