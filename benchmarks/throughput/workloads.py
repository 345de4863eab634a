"""Each workload's measurements, in the order ``make bench`` takes them.

Agreement is measured against the fp32 full-decode reference (``in_process.reference_predictions``);
with a trained model (the demo's resnet18) for the figure that counts, and with the workload's
calibrated random model next to its noise floor (±1 grey level of noise, nothing else changed).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from benchmarks.common.images import spread, subset
from benchmarks.common.machine import cores, loadavg
from benchmarks.common.models import make_checkpoint, reference_transform, trained_checkpoint
from benchmarks.common.paths import DATA
from benchmarks.throughput import in_process as ip
from benchmarks.throughput.command_runs import (
    best_of,
    imgscore_run,
    imgscore_runs,
    marginal,
    scoring_rate,
)
from benchmarks.throughput.specs import (
    PIPELINE_SPLIT,
    MemorySpec,
    SmallSpec,
    Workload,
    prepare_memory,
    prepare_small,
    prepare_workload,
)


def run_workload(w: Workload, sizes: dict[str, Any]) -> dict:
    """Every measurement of a compute or decode workload, and their ratios."""
    print(f"[{w.name}] {w.arch} on {w.size[0]}x{w.size[1]} JPEGs", flush=True)
    folder, rels, ckpt = prepare_workload(w)
    batch = sizes["batch"]
    res: dict = {
        "workload": w.name,
        "arch": w.arch,
        "image_size": list(w.size),
        "images_total": w.n_large,
        "bytes_per_image": int(np.mean([(folder / "all" / r).stat().st_size for r in rels])),
    }
    ref = _references(res, w, folder, rels, ckpt, batch)
    _forward_and_decode(res, w, folder, rels, ckpt, batch)
    print("  plain loop (batch 1) …", flush=True)
    res["plain_loop"] = ip.plain_loop(subset(folder, rels, w.n_plain), w.arch, ckpt)
    print("  tuned loop …", flush=True)
    nw, th = PIPELINE_SPLIT
    res["tuned_loop"] = ip.tuned_loop(subset(folder, rels, w.n_tuned), w.arch, ckpt, batch, nw, th)
    runs_l = _command_runs(res, w, folder, rels, ckpt, batch, sizes["repeats"])
    for k in ("plain_loop", "tuned_loop", "imgscore_large"):
        res[k]["agreement"] = ip.agreement(res[k]["_preds"], ref)
    res["imgscore_large"]["agreement_all_runs"] = [ip.agreement(r["_preds"], ref) for r in runs_l]
    res["ratios_onnxruntime"], res["ratios"] = _ratios_onnxruntime(res), _ratios(res)
    return res


def _references(res: dict, w: Workload, folder: Path, rels: list[str], ckpt: Path, batch: int) -> ip.Predictions:
    """The fp32 reference, the random model's noise floor and the trained model's agreement into
    ``res``; returns the reference."""
    big = subset(folder, rels, w.n_large)
    print("  reference (fp32, full decode) …", flush=True)
    ref = ip.reference_predictions(big, w.arch, ckpt, batch)
    res["reference"] = {
        "images": len(ref),
        "distinct_top1": len({v[0] for v in ref.values()}),
        "median_top1_score": round(float(np.median([v[1] for v in ref.values()])), 4),
    }
    # how chaotic the random model is: ±1 grey level of noise, nothing else changed
    noisy = ip.reference_predictions(subset(folder, rels, w.n_tuned), w.arch, ckpt, batch, noise=True)
    res["random_model_noise_floor"] = ip.agreement(noisy, ref)

    print("  agreement of a trained model: imgscore's path vs fp32 full decode …", flush=True)
    tck = trained_checkpoint()
    t_ref = ip.reference_predictions(big, "resnet18", tck, batch)
    t_fast = ip.pipeline_predictions(big, "resnet18", tck, batch, PIPELINE_SPLIT[0])
    res["agreement_trained"] = {
        **ip.agreement(t_fast, t_ref),
        "distinct_top1": len({v[0] for v in t_ref.values()}),
        "median_top1_score": round(float(np.median([v[1] for v in t_ref.values()])), 4),
    }
    return ref


def _forward_and_decode(res: dict, w: Workload, folder: Path, rels: list[str], ckpt: Path, batch: int) -> None:
    """(a) forward-only (torch in three forms, every backend), decode core time and the core-time bound into ``res``."""
    print("  forward-only …", flush=True)
    tfm = reference_transform()
    pre = torch.stack([tfm(Image.open(folder / "all" / r).convert("RGB")) for r in spread(rels, batch)])
    res["forward_only"] = ip.forward_only(w.arch, ckpt, pre, w.fwd_batches, cores())
    res["forward_default_format"] = ip.forward_only(w.arch, ckpt, pre, max(1, w.fwd_batches // 2), cores(), fast=False)
    res["forward_1_thread"] = ip.forward_only(w.arch, ckpt, pre, max(1, w.fwd_batches // 2), 1)

    print("  forward-only per backend …", flush=True)
    res["backends_forward_only"] = ip.backend_forward_only(w.arch, ckpt, pre, w.fwd_batches, cores())

    print("  decode core-time …", flush=True)
    dec_paths = [folder / "all" / r for r in spread(rels, w.n_decode)]
    res["decode_draft"] = ip.decode_core_time(dec_paths, draft=True)
    res["decode_full"] = ip.decode_core_time(dec_paths, draft=False)
    per_img = res["decode_draft"]["core_s_per_image"] + 1.0 / res["forward_1_thread"]["img_per_s"]
    res["core_time_bound"] = {
        "img_per_s": round(cores() / per_img, 2),
        "core_s_per_image": round(per_img, 5),
        "cores": cores(),
    }


def _command_runs(
    res: dict, w: Workload, folder: Path, rels: list[str], ckpt: Path, batch: int, repeats: int
) -> list[dict]:
    """(d) ``imgscore run`` at two sizes, with torch and each runtime the forward-only step could
    load, into ``res``; returns every large torch run."""
    print("  imgscore run ×2 sizes …", flush=True)
    small_root, big = subset(folder, rels, w.n_small), subset(folder, rels, w.n_large)
    sets = [f"inference.batch_size={batch}"]
    runs_s, runs_l = [], []
    for r in range(repeats):
        runs_s.append(imgscore_run(small_root, w.arch, ckpt, DATA / "out" / f"{w.name}-small-{r}", sets))
        runs_l.append(imgscore_run(big, w.arch, ckpt, DATA / "out" / f"{w.name}-large-{r}", sets))
        print(f"    small {runs_s[-1]['wall_s']} s, large {runs_l[-1]['wall_s']} s", flush=True)
    s, lg = best_of(runs_s), best_of(runs_l)
    res["imgscore_small"], res["imgscore_large"] = s, lg
    res["imgscore_marginal"] = marginal(s, lg)

    res["backend_runs"] = {}
    for backend in ("onnxruntime", "openvino"):
        if "error" in res["backends_forward_only"].get(f"{backend} fp32", {"error": 1}):
            continue
        print(f"  imgscore run ×2 sizes, inference.backend={backend} …", flush=True)
        b_sets = [*sets, f"inference.backend={backend}", f"inference.cache_dir={DATA / 'cache'}"]
        bs = imgscore_run(small_root, w.arch, ckpt, DATA / "out" / f"{w.name}-small-{backend}", b_sets)
        bl = imgscore_run(big, w.arch, ckpt, DATA / "out" / f"{w.name}-large-{backend}", b_sets)
        print(f"    small {bs['wall_s']} s, large {bl['wall_s']} s", flush=True)
        bl["agreement_vs_torch_run"] = ip.agreement(bl["_preds"], lg["_preds"])
        res["backend_runs"][backend] = {"small": bs, "large": bl, "marginal": marginal(bs, bl)}
    return runs_l


def _ratios_onnxruntime(res: dict) -> dict:
    fo, pl = res["forward_only"]["img_per_s"], res["plain_loop"]["img_per_s"]
    ort_fo = res["backends_forward_only"].get("onnxruntime fp32", {}).get("img_per_s")
    ort_mg = res["backend_runs"].get("onnxruntime", {}).get("marginal", {}).get("img_per_s")
    return {
        "marginal_vs_eager_forward_only": round(ort_mg / fo, 3) if ort_mg else None,
        "marginal_vs_ort_forward_only": round(ort_mg / ort_fo, 3) if ort_mg and ort_fo else None,
        "marginal_vs_plain": round(ort_mg / pl, 2) if ort_mg else None,
        "ort_forward_vs_eager_forward": round(ort_fo / fo, 3) if ort_fo else None,
    }


def _ratios(res: dict) -> dict:
    fo, pl = res["forward_only"]["img_per_s"], res["plain_loop"]["img_per_s"]
    bound = res["core_time_bound"]["img_per_s"]
    mg = res["imgscore_marginal"]["img_per_s"]
    return {
        "marginal_vs_forward_only": round(mg / fo, 3),
        "marginal_vs_plain": round(mg / pl, 2),
        "marginal_vs_core_time_bound": round(mg / bound, 3),
        "tuned_vs_plain": round(res["tuned_loop"]["img_per_s"] / pl, 2),
        "tuned_vs_forward_only": round(res["tuned_loop"]["img_per_s"] / fo, 3),
        "draft_decode_speedup": round(
            res["decode_full"]["core_s_per_image"] / res["decode_draft"]["core_s_per_image"], 2
        ),
        "channels_last_fold_speedup": round(fo / res["forward_default_format"]["img_per_s"], 2),
    }


def _growth(many: dict, few: dict, key: str) -> float | None:
    return round(many[key] / few[key] - 1, 4) if few.get(key) else None


def run_memory(ms: MemorySpec, sizes: dict[str, Any]) -> dict:
    """Peak memory for 10× the images, and what a shard costs beyond its images."""
    print(
        f"[memory] {ms.arch} on {ms.size[0]}x{ms.size[1]} JPEGs: {ms.n_few} vs {ms.n_many} images, "
        f"{ms.shard} per shard",
        flush=True,
    )
    folder, rels, ckpt = prepare_memory(ms)
    few, many = subset(folder, rels, ms.n_few), subset(folder, rels, ms.n_many)
    # one process layout for both sizes (auto may pick a different split for each, and the tree's
    # RSS would then measure the layout, not growth with the number of images)
    loader = [f"inference.batch_size={min(sizes['batch'], ms.shard)}", "inference.num_workers=2"]
    r_few = imgscore_run(few, ms.arch, ckpt, DATA / "out" / "mem-few", [f"run.shard_size={ms.shard}", *loader])
    r_many = imgscore_run(many, ms.arch, ckpt, DATA / "out" / "mem-many", [f"run.shard_size={ms.shard}", *loader])
    r_one = imgscore_run(many, ms.arch, ckpt, DATA / "out" / "mem-one-shard", [f"run.shard_size={ms.n_many}", *loader])
    extra = r_many["shards"] - r_one["shards"]
    return {
        "few": r_few,
        "many": r_many,
        "many_one_shard": r_one,
        "rss_growth_main": round(r_many["peak_rss_main_mib"] / r_few["peak_rss_main_mib"] - 1, 4),
        "rss_growth_tree": round(r_many["peak_rss_tree_mib"] / r_few["peak_rss_tree_mib"] - 1, 4),
        # where the tree's growth is: Prefect's temporary server, or the DataLoader workers
        "rss_growth_server": _growth(r_many, r_few, "peak_rss_server_mib"),
        "rss_growth_others": _growth(r_many, r_few, "peak_rss_others_mib"),
        # everything a shard costs beyond its images: Prefect task run, DataLoader start, part files
        "overhead_per_shard_total_s": round((r_many["wall_s"] - r_one["wall_s"]) / extra, 4) if extra else None,
        # the part outside score_shard (Prefect's task-run machinery): time between the plan and
        # the last shard's end not spent inside score_shard, per extra shard
        "prefect_overhead_per_shard_s": (
            round((r_many["outside_shards_s"] - r_one["outside_shards_s"]) / extra, 4) if extra else None
        ),
    }


def run_small(spec: SmallSpec, repeats: int = 1) -> dict:
    """Small images: one ``imgscore run`` against two concurrent ones on the same
    folder — with ``inference.num_workers: auto`` (the measured split) and with 0 workers and
    every thread; the splits chosen. Each figure is the best of ``repeats``.
    ``one_vs_best_two``: one ``auto`` run against the better of the two configs' two-run
    figures (two runs at once may do better with a split one run would not choose)."""
    print(f"[small] {spec.arch} on {spec.size[0]}x{spec.size[1]} JPEGs: one run vs two at once", flush=True)
    folder, rels, ckpt = prepare_small(spec)
    root = subset(folder, rels, spec.images)
    base = [f"run.shard_size={spec.shard}", f"preprocess.resize={spec.size[1]}", f"preprocess.crop={spec.size[1]}"]
    res: dict = {"spec": asdict(spec)}
    for name, extra in (
        ("auto", ["inference.num_workers=auto", "inference.batch_size=auto"]),
        ("fixed_0_workers", ["inference.num_workers=0", "inference.batch_size=32"]),
    ):
        sets = [*base, *extra]
        ones, twos = [], []
        for rep in range(max(1, repeats)):
            one = imgscore_run(root, spec.arch, ckpt, DATA / "out" / f"small-one-{name}-{rep}", sets)
            two = imgscore_runs(
                [(root, spec.arch, ckpt, DATA / "out" / f"small-two-{name}-{rep}-{k}", sets) for k in "ab"]
            )
            ones.append((scoring_rate([one]), one["splits"]))
            twos.append(scoring_rate(two))
        (r1, splits), r2 = max(ones, key=lambda o: o[0]["img_per_s"]), max(twos, key=lambda t: t["img_per_s"])
        res[name] = {
            "one": r1,
            "two": r2,
            "one_vs_two": round(r1["img_per_s"] / r2["img_per_s"], 3),
            "splits": splits,
            "one_all": [o[0]["img_per_s"] for o in ones],
            "two_all": [t["img_per_s"] for t in twos],
            "load": loadavg(),
        }
        print(
            f"    {name}: one run {res[name]['one_all']} img/s, two at once {res[name]['two_all']} img/s; "
            f"split {splits}",
            flush=True,
        )
    best_two = max(res[n]["two"]["img_per_s"] for n in ("auto", "fixed_0_workers"))
    res["one_vs_best_two"] = round(res["auto"]["one"]["img_per_s"] / best_two, 3)
    return res


def run_dask_cold_start(spec: SmallSpec) -> dict:
    """Dask, 2 workers, the small-image folder: flow wall time and the first shards' set-up with
    ``runner.warm_workers`` off (workers import torch and load the model at their first shard)
    and on (cluster started before the model loads, workers warmed by the plugin)."""
    folder, rels, ckpt = prepare_small(spec)
    root = subset(folder, rels, spec.images)
    res = {}
    for warm in ("false", "true"):
        sets = [
            f"run.shard_size={spec.shard // 2}",
            f"preprocess.resize={spec.size[1]}",
            f"preprocess.crop={spec.size[1]}",
            "runner.type=dask",
            "runner.n_workers=2",
            f"runner.warm_workers={warm}",
        ]
        r = imgscore_run(root, spec.arch, ckpt, DATA / "out" / f"dask-warm-{warm}", sets)
        res[f"warm_workers={warm}"] = {
            "command_wall_s": r["wall_s"],
            "launch_to_planned_s": r["launch_to_planned_s"],
            "planned_to_done_s": r["score_phase_s"],
            "first_shard_setup_s": r["first_shard_setup_s"],
            "load": loadavg(),
        }
        print(f"    dask warm_workers={warm}: {res[f'warm_workers={warm}']}", flush=True)
    return res


def warm_up() -> None:
    """One tiny ``imgscore run``: creates the Prefect database in PREFECT_HOME and fills the page
    cache with Python's imports, so the first timed run pays neither."""
    warm = DATA / "warm"
    (warm / "x").mkdir(parents=True, exist_ok=True)
    for i in range(4):
        if not (warm / "x" / f"{i}.jpg").exists():
            noise = np.random.default_rng(i).integers(0, 256, (48, 64, 3), dtype=np.uint8)
            Image.fromarray(noise).save(warm / "x" / f"{i}.jpg")
    wck = make_checkpoint("mobilenet_v3_large", sorted((warm / "x").glob("*.jpg")), DATA / "ckpt" / "warm.pt")
    imgscore_run(warm, "mobilenet_v3_large", wck, DATA / "out" / "warm")
