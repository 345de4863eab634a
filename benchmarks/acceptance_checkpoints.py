"""Acceptance check for the main job: one real model, every checkpoint form, CPU-only.

Uses the demo's resnet18 trained on scikit-learn's digit scans (run `make demo` first) and its
450-image held-out ImageFolder. Saves the same weights as
  - a DataParallel state_dict tagged as saved on cuda:0,
  - a training-checkpoint dict (optimizer, numpy scalars, argparse namespace),
  - `_orig_mod.module.`-prefixed keys,
  - a TorchScript archive,
  - a whole pickled module (must be refused with exit 2 unless trusted),
runs `imgscore run` on each with CUDA_VISIBLE_DEVICES="", and compares top-1 and scores with a
plain PyTorch loop using the same transform.

    .venv/bin/python -m benchmarks.acceptance_checkpoints
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import pyarrow.dataset as ds
import torch
import torchvision

from benchmarks.common.paths import IMGSCORE, REPO
from imgscore.demo import DEMO_SPEC
from imgscore.images.decode import decode_image
from imgscore.images.preprocess import DecodeOptions, build_transform
from tests.conftest import save_as_if_cuda

DEMO = REPO / "outputs" / "demo"
HELD = DEMO / "digits" / "heldout"


def plain_loop(model) -> dict[str, tuple[int, float]]:
    tf = build_transform(DEMO_SPEC)
    out = {}
    with torch.no_grad():
        for p in sorted(HELD.rglob("*.png")):
            x = tf(decode_image(str(p), DEMO_SPEC, DecodeOptions(10**8)))[None]
            prob = torch.softmax(model(x), 1)[0]
            out[str(p.relative_to(HELD))] = (int(prob.argmax()), float(prob.max()))
    return out


def checkpoint_forms(model: torch.nn.Module, tmp: Path) -> dict[str, Path]:
    """The demo model saved in each form a checkpoint arrives in (names → files under ``tmp``)."""
    sd = model.state_dict()
    forms = {}
    forms["dataparallel_cuda0"] = tmp / "dp_cuda.pt"
    save_as_if_cuda(OrderedDict(("module." + k, v) for k, v in sd.items()), forms["dataparallel_cuda0"])
    forms["training_checkpoint"] = DEMO / "digits_resnet18.pt"
    forms["orig_mod_module_prefix"] = tmp / "prefixed.pt"
    torch.save(OrderedDict(("_orig_mod.module." + k, v) for k, v in sd.items()), forms["orig_mod_module_prefix"])
    forms["torchscript"] = tmp / "scripted.pt"
    torch.jit.save(torch.jit.script(model), forms["torchscript"])
    forms["pickled_module"] = tmp / "module.pt"
    torch.save(model, forms["pickled_module"])
    return forms


def main() -> int:
    ck = torch.load(DEMO / "digits_resnet18.pt", map_location="cpu", weights_only=False)
    model = torchvision.models.resnet18(num_classes=10)
    model.load_state_dict(ck["model"])
    model.eval()
    ref = plain_loop(model)
    tmp = Path(tempfile.mkdtemp(prefix="imgscore-accept-"))
    forms = checkpoint_forms(model, tmp)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PREFECT_HOME": str(tmp / "prefect")}
    imgscore = str(IMGSCORE)
    print(
        "| form | exit | images | top-1 equal to plain loop | max abs score diff | img/s (wall) |\n"
        "|---|---|---|---|---|---|"
    )
    for name, path in forms.items():
        out = tmp / f"out_{name}"
        args = [
            imgscore,
            "run",
            "--config",
            str(REPO / "configs" / "demo.yaml"),
            "--quiet",
            "--set",
            f"model.checkpoint={path}",
            "--set",
            f"output.root={out}",
            "--set",
            "run.shard_size=150",
        ]
        t0 = time.perf_counter()
        proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            print(f"| {name} | {proc.returncode} | – | – | – | – |  {proc.stderr.strip()[:110]}…")
            if name == "pickled_module":
                assert proc.returncode == 2 and not (out / "predictions").exists()
                proc = subprocess.run(
                    [*args, "--set", "model.trust_checkpoint=true"], capture_output=True, text=True, env=env, cwd=REPO
                )
                name = "pickled_module (trusted)"
            else:
                continue
        rows = ds.dataset(out / "predictions", format="parquet", partitioning="hive").to_table().to_pylist()
        same = sum(ref[r["image_path"]][0] == r["pred_index"] for r in rows)
        diff = max(abs(ref[r["image_path"]][1] - r["score"]) for r in rows)
        devices = {r["device"] for r in rows}
        print(
            f"| {name} | {proc.returncode} | {len(rows)} | {same}/{len(rows)} | {diff:.2e} | {len(rows) / wall:.1f} "
            f"({devices}) |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
