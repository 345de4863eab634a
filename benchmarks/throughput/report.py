"""results/latest.md: the tables of a full ``make bench`` run (its targets: ``targets``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def render(r: dict) -> str:
    """The Markdown report of a full run's results ``r`` (every workload measured; ``r["targets"]`` set)."""
    lines = [f"# imgscore benchmark — {r['date']}\n", _machine(r)]
    lines += _throughput_table(r)
    lines += _measures_table(r)
    lines += _agreement_table(r)
    lines += _memory_table(r)
    lines += _splits(r)
    lines += _backends_table(r)
    lines += _small_table(r.get("small"))
    lines += _dask_table(r.get("dask_cold_start"))
    lines += ["| target | measured | met |", "| --- | ---: | --- |"]
    lines += [f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else '**no**'} |" for t in r["targets"]]
    return "\n".join(lines) + "\n"


def _machine(r: dict) -> str:
    return (
        f"{r['cores']} cores ({r['cpu']}), {r['ram_gib']} GiB RAM, torch {r['torch']}, Pillow {r['pillow']}, "
        f"Python {r['python']}; load average (1/5/15 min) {r['load_before']} before, {r['load_after']} after; "
        f"sizes `{r['sizes']}`; `make bench` took {r['total_s'] / 60:.1f} min. `imgscore run` uses "
        f"configs/nightly.yaml (batch 32, `inference.num_workers: auto`, channels_last, folded BN, JPEG draft, "
        f"fp32) under a temporary Prefect server; the tuned loop uses {r['pipeline_split']['dataloader_workers']} "
        f"DataLoader workers beside torch threads = cores.\n"
    )


def _paths(w: dict) -> list[tuple[str, Any, float, Any]]:
    """A workload's rows of the throughput table: ``(path, images, img/s, peak memory MiB)``."""
    fo, bound, pl, t = w["forward_only"], w["core_time_bound"], w["plain_loop"], w["tuned_loop"]
    s, lg, m = w["imgscore_small"], w["imgscore_large"], w["imgscore_marginal"]
    tuned = (
        f"(c) tuned loop: draft, batch {t['batch']}, {t['workers']} workers, channels_last, folded BN, inference_mode"
    )
    return [
        ("(a) forward-only limit: pre-decoded, batch 32, channels_last, folded BN", fo["images"], fo["img_per_s"], ""),
        (
            "decode + forward core-time bound: cores / (draft decode + 1-thread forward s/img)",
            "",
            bound["img_per_s"],
            "",
        ),
        (
            "(b) plain loop: ImageFolder, batch 1, PIL full decode, no_grad",
            pl["images"],
            pl["img_per_s"],
            pl["peak_rss_tree_mib"],
        ),
        (tuned, t["images"], t["img_per_s"], t["peak_rss_tree_mib"]),
        (
            f"(d) `imgscore run`, {s['images']} images, end to end",
            s["images"],
            s["img_per_s_end_to_end"],
            s["peak_rss_tree_mib"],
        ),
        (
            f"(d) `imgscore run`, {lg['images']} images, end to end",
            lg["images"],
            lg["img_per_s_end_to_end"],
            lg["peak_rss_tree_mib"],
        ),
        ("**(d) `imgscore run` marginal (Δimages / Δseconds)**", m["images"], m["img_per_s"], ""),
    ]


def _throughput_table(r: dict) -> list[str]:
    lines = [
        "| workload | path | images | img/s | × plain loop | × forward-only | peak memory MiB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for w in (r["compute"], r["decode"]):
        fo, pl = w["forward_only"]["img_per_s"], w["plain_loop"]["img_per_s"]
        workload = f"{w['workload']}: {w['arch']}, {w['image_size'][0]}×{w['image_size'][1]} JPEG"
        for name, n, rate, rss in _paths(w):
            lines.append(f"| {workload} | {name} | {n} | {rate:.2f} | {rate / pl:.2f} | {rate / fo:.2f} | {rss} |")
    lines.append("")
    lines.append(
        "Peak memory: RSS summed over the process tree (DataLoader workers and the Prefect server included; "
        "pages forked workers share count once per process, so an upper bound), sampled every 0.5 s.\n"
    )
    return lines


def _two_columns(r: dict, rows: list[tuple[str, Callable[[dict], Any]]]) -> list[str]:
    """A ``measure | compute | decode`` table, one row per ``(label, value of a workload)``."""
    lines = ["| measure | compute | decode |", "| --- | ---: | ---: |"]
    lines += [f"| {label} | {f(r['compute'])} | {f(r['decode'])} |" for label, f in rows]
    return [*lines, ""]


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def _measures_table(r: dict) -> list[str]:
    return _two_columns(
        r,
        [
            (
                "forward-only, default memory format, BN not folded (img/s)",
                lambda w: w["forward_default_format"]["img_per_s"],
            ),
            ("forward-only, 1 thread (img/s)", lambda w: w["forward_1_thread"]["img_per_s"]),
            (
                "decode + transform, full decode (ms of one core / image)",
                lambda w: _ms(w["decode_full"]["core_s_per_image"]),
            ),
            (
                "decode + transform, JPEG draft (ms of one core / image)",
                lambda w: _ms(w["decode_draft"]["core_s_per_image"]),
            ),
            (
                "`imgscore run` fixed start-up, intercept of the two sizes (s)",
                lambda w: w["imgscore_marginal"]["startup_s"],
            ),
            ("`imgscore run` launch → plan written (s)", lambda w: w["imgscore_small"]["launch_to_planned_s"]),
            (
                "`imgscore run` wall times, small / large, every repeat (s)",
                lambda w: f"{w['imgscore_small']['wall_s_all']} / {w['imgscore_large']['wall_s_all']}",
            ),
            (
                "in-shard throughput of the large run, score_shard's own clock (img/s)",
                lambda w: w["imgscore_large"]["in_shard_img_per_s"],
            ),
            ("bytes per JPEG", lambda w: f"{w['bytes_per_image'] / 1e6:.2f} MB"),
        ],
    )


def _ag(a: dict) -> str:
    return f"{a['top1_agreement'] * 100:.1f} % of {a['n']}, max Δscore {a['max_top1_score_diff']}"


def _agreement_table(r: dict) -> list[str]:
    head = (
        "Agreement with the fp32 full-decode reference (PIL full decode, torchvision eval recipe, unmodified module):\n"
    )
    return [
        head,
        *_two_columns(
            r,
            [
                (
                    "trained model (demo resnet18): imgscore's decode + model path",
                    lambda w: _ag(w["agreement_trained"]),
                ),
                (
                    "trained model: distinct top-1 classes / median top-1 score",
                    lambda w: (
                        f"{w['agreement_trained']['distinct_top1']} / {w['agreement_trained']['median_top1_score']}"
                    ),
                ),
                ("random benchmark model: `imgscore run` (large)", lambda w: _ag(w["imgscore_large"]["agreement"])),
                ("random benchmark model: tuned loop", lambda w: _ag(w["tuned_loop"]["agreement"])),
                ("random benchmark model: plain loop", lambda w: _ag(w["plain_loop"]["agreement"])),
                (
                    "random benchmark model, ±1 grey level of noise only (its noise floor)",
                    lambda w: _ag(w["random_model_noise_floor"]),
                ),
            ],
        ),
    ]


def _memory_table(r: dict) -> list[str]:
    mem = r["memory"]
    sp, few, many, one = mem["spec"], mem["few"], mem["many"], mem["many_one_shard"]
    images = f"{sp['size'][0]}×{sp['size'][1]} JPEGs"
    lines = [
        f"Memory and per-shard overhead ({sp['arch']}, {images}, {sp['shard']} images per shard):\n",
        "| measure | value |",
        "| --- | ---: |",
    ]
    for run in (few, many):
        lines.append(
            f"| peak memory, {run['images']} images: main process RSS / process tree RSS (MiB) | "
            f"{run['peak_rss_main_mib']} / {run['peak_rss_tree_mib']} |"
        )
    lines.append(
        f"| growth for 10× the images: main / tree | {mem['rss_growth_main'] * 100:+.1f} % / "
        f"{mem['rss_growth_tree'] * 100:+.1f} % |"
    )
    if mem.get("rss_growth_server") is not None:
        lines.append(
            f"| of the tree: Prefect's temporary server / DataLoader workers and the rest (MiB, "
            f"{few['images']} → {many['images']} images) | {few['peak_rss_server_mib']} → "
            f"{many['peak_rss_server_mib']} / {few['peak_rss_others_mib']} → "
            f"{many['peak_rss_others_mib']} |"
        )
    lines.append(
        f"| cost of a shard beyond its images ({many['shards']} vs {one['shards']} shards, same images) | "
        f"{mem['overhead_per_shard_total_s'] * 1e3:.0f} ms |"
    )
    lines.append(f"| of which Prefect, outside `score_shard` | {mem['prefect_overhead_per_shard_s'] * 1e3:.0f} ms |")
    lines.append(
        f"| importing torch + torchvision + Prefect + imgscore in a fresh interpreter | {r['imports']['seconds']} s |"
    )
    return [*lines, ""]


def _splits(r: dict) -> list[str]:
    splits = []
    for w in (r["compute"], r["decode"]):
        runs = [("torch", w["imgscore_large"]), *((k, v["large"]) for k, v in w.get("backend_runs", {}).items())]
        splits += [f"{w['workload']} {b}: {', '.join(run['splits'])}" for b, run in runs if run.get("splits")]
    if not splits:
        return []
    return [
        "Splits `auto` chose in the large runs (DataLoader processes × forward threads, or lanes): "
        + "; ".join(splits)
        + ".\n"
    ]


def _backends_table(r: dict) -> list[str]:
    """A row per backend: forward-only and `imgscore run` marginal, with the ONNX Runtime
    forward-only limit as the anchor column."""
    bf16 = "yes" if r.get("bf16_native") else "no (bf16 rows are emulated, measured on one batch)"
    lines = [
        f"Backends. CPU flags: {' '.join(r.get('cpu_flags', []))}; native bf16: {bf16}; runtimes "
        f"{r.get('runtimes')}. Agreement: with torch fp32 on the forward-only batch (top-1, mean |Δscore|), "
        "what the canary measures at run start.\n",
        "| workload | backend, precision | forward-only img/s | × eager forward-only | × ORT forward-only | "
        "agreement, mean Δscore | `imgscore run` marginal img/s | × eager forward-only | × ORT forward-only |",
        "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for key in ("compute", "decode"):
        w = r.get(key)
        if not w or "backends_forward_only" not in w:
            continue
        fo = w["forward_only"]["img_per_s"]
        ort = w["backends_forward_only"].get("onnxruntime fp32", {}).get("img_per_s")
        runs = {
            "torch fp32": w["imgscore_marginal"],
            **{f"{b} fp32": v["marginal"] for b, v in w.get("backend_runs", {}).items()},
        }
        for name, m in w["backends_forward_only"].items():
            if "error" in m:
                lines.append(f"| {key}: {w['arch']} | {name} | not run: {m['error'][:80]} | | | | | | |")
                continue
            mg = runs.get(name, {}).get("img_per_s")
            lines.append(
                f"| {key}: {w['arch']} | {name} | {m['img_per_s']:.2f} | {m['img_per_s'] / fo:.2f} | "
                f"{m['img_per_s'] / ort:.2f} | {m['top1_agreement'] * 100:.1f} %, {m['mean_abs_dscore']} | "
                + (f"{mg:.2f} | {mg / fo:.2f} | {mg / ort:.2f} |" if mg else " | | |")
            )
    return [*lines, ""]


def _small_table(sm: dict | None) -> list[str]:
    if not sm:
        return []
    sp = sm["spec"]
    lines = [
        f"Small images ({sp['arch']}, {sp['images']} JPEGs of {sp['size'][0]}×{sp['size'][1]}, "
        f"resize = crop = {sp['size'][1]}, {sp['shard']} per shard): scoring-phase img/s "
        "(first plan written → last shard committed).\n",
        "| inference.num_workers | one run | two runs at once, together | one ÷ two | every repeat, one / two "
        "| split chosen |",
        "| --- | ---: | ---: | ---: | --- | --- |",
    ]
    for name in ("auto", "fixed_0_workers"):
        v = sm[name]
        lines.append(
            f"| {name} | {v['one']['img_per_s']} | {v['two']['img_per_s']} | {v['one_vs_two']:.2f} | "
            f"{v.get('one_all')} / {v.get('two_all')} | {', '.join(v['splits'])} |"
        )
    if "one_vs_best_two" in sm:
        lines.append(
            f"\nOne `auto` run ÷ the best two-runs-at-once figure of either setting: **{sm['one_vs_best_two']:.2f}**."
        )
    return [*lines, ""]


def _dask_table(dk: dict | None) -> list[str]:
    if not dk:
        return []
    lines = [
        "Dask cold start (2 workers, the small-image folder):\n",
        "| runner.warm_workers | command wall s | launch → plan written s | plan → last shard s "
        "| slowest first-shard set-up s |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, v in dk.items():
        lines.append(
            f"| {name.split('=')[1]} | {v['command_wall_s']} | {v['launch_to_planned_s']} | "
            f"{v['planned_to_done_s']} | {v['first_shard_setup_s']} |"
        )
    return [*lines, ""]
