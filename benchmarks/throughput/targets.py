"""The targets a full ``make bench`` run is held to: each ``{target, measured, met}``, the last
table of results/latest.md."""

from __future__ import annotations


def _target(target: str, measured: str, met: bool) -> dict:
    return {"target": target, "measured": measured, "met": met}


def targets(r: dict) -> list[dict]:
    """Each target of a full run's results ``r``."""
    c, d, mem = r["compute"], r["decode"], r["memory"]
    startup = max(c["imgscore_marginal"]["startup_s"], d["imgscore_marginal"]["startup_s"])
    agree = min(c["agreement_trained"]["top1_agreement"], d["agreement_trained"]["top1_agreement"])
    growth = max(mem["rss_growth_tree"], mem["rss_growth_main"])
    cr, dr, prefect = c["ratios"], d["ratios"], mem["prefect_overhead_per_shard_s"]
    return [
        _target(
            "compute-bound: marginal ≥ 0.90 × forward-only",
            f"{cr['marginal_vs_forward_only']:.2f} ×",
            cr["marginal_vs_forward_only"] >= 0.90,
        ),
        _target(
            "decode-bound: marginal ≥ 6 × plain batch-1 loop",
            f"{dr['marginal_vs_plain']:.1f} ×",
            dr["marginal_vs_plain"] >= 6,
        ),
        _target(
            "decode-bound: marginal ≥ 0.8 × decode + forward core-time bound",
            f"{dr['marginal_vs_core_time_bound']:.2f} ×",
            dr["marginal_vs_core_time_bound"] >= 0.8,
        ),
        _target("fixed start-up of `imgscore run` ≤ 10 s", f"{startup:.1f} s", startup <= 10),
        _target("Prefect overhead ≤ 20 ms per shard", f"{prefect * 1e3:.0f} ms", prefect <= 0.020),
        _target(
            "top-1 agreement with fp32 full decode ≥ 99.5 % (trained model)", f"{agree * 100:.1f} %", agree >= 0.995
        ),
        _target("10× the images → peak memory < +10 %", f"{growth * 100:+.1f} %", growth < 0.10),
        *_onnxruntime_targets(c),
        *_bf16_target(r),
        *_decode_and_small_targets(d, r.get("small")),
    ]


def _onnxruntime_targets(c: dict) -> list[dict]:
    ro = c.get("ratios_onnxruntime", {})
    if ro.get("marginal_vs_eager_forward_only") is None:
        return []
    agree = c["backend_runs"]["onnxruntime"]["large"]["agreement_vs_torch_run"]["top1_agreement"]
    return [
        _target(
            "compute: `imgscore run` onnxruntime marginal ≥ 1.4 × eager forward-only",
            f"{ro['marginal_vs_eager_forward_only']:.2f} ×",
            ro["marginal_vs_eager_forward_only"] >= 1.4,
        ),
        _target(
            "compute: onnxruntime marginal ≥ 0.85 × ONNX Runtime forward-only",
            f"{ro['marginal_vs_ort_forward_only']:.2f} ×",
            ro["marginal_vs_ort_forward_only"] >= 0.85,
        ),
        _target("compute: onnxruntime run's top-1 = torch run's top-1", f"{agree * 100:.1f} %", agree == 1.0),
    ]


def _bf16_target(r: dict) -> list[dict]:
    c = r["compute"]
    bf = c["backends_forward_only"].get("openvino bf16", {})
    if not bf.get("img_per_s"):
        return []
    x = bf["img_per_s"] / c["forward_only"]["img_per_s"]
    emulated = "" if r.get("bf16_native") else ", emulated: this CPU has no bf16"
    return [
        _target(
            "compute: bf16 (opt-in, canary passed) ≥ 2.5 × eager forward-only",
            f"{x:.2f} × forward-only (OpenVINO bf16{emulated}; agreement {bf['top1_agreement'] * 100:.1f} %)",
            x >= 2.5 and bf["top1_agreement"] >= 0.995,
        )
    ]


def _decode_and_small_targets(d: dict, sm: dict | None) -> list[dict]:
    backends = d.get("backend_runs", {}).values()
    marginals = [d["imgscore_marginal"]["img_per_s"], *[v["marginal"]["img_per_s"] for v in backends]]
    x = max(marginals) / d["plain_loop"]["img_per_s"]
    out = [_target("decode-bound: best `imgscore run` marginal ≥ 8 × plain batch-1 loop", f"{x:.1f} ×", x >= 8)]
    if sm:
        v = sm.get("one_vs_best_two", sm["auto"]["one_vs_two"])
        out.append(
            _target(
                "small images: one run ≥ 0.9 × two concurrent runs (the better of auto and 0 workers)",
                f"{v:.2f} × (vs two `auto` runs: {sm['auto']['one_vs_two']:.2f} ×)",
                v >= 0.9,
            )
        )
    return out
