"""The CUDA path: same answers as the CPU, pinned non-blocking copies, autocast, channels_last,
one GPU per Dask worker. Every test is marked ``gpu`` and skipped where CUDA is absent
(tests/conftest.py); benchmarks/gpu_check.py is the matching stand-alone check with timings."""

from __future__ import annotations

import pyarrow.dataset as ds
import pytest
import torch
from torch.utils.data import DataLoader

from imgscore.config.scoring import ModelConfig, PreprocessConfig
from imgscore.flows.cli import main
from imgscore.images.dataset import ShardDataset, collate_samples
from imgscore.images.preprocess import DecodeOptions
from imgscore.images.scan import scan_images
from imgscore.inference.backends.eager import forward_probs
from imgscore.inference.model import load_model
from tests.conftest import base_overrides, make_image_folder

pytestmark = pytest.mark.gpu


def _model(ckpt, device: str):
    return load_model(
        ModelConfig(arch="mobilenet_v3_small", checkpoint=ckpt),
        PreprocessConfig(),
        torch.device(device),
        channels_last=True,
    )


def _batch(root, lm, pin: bool):
    index = scan_images(root)
    loader = DataLoader(
        ShardDataset(str(root), index.entries, lm.preprocess, DecodeOptions(10**8)),
        batch_size=len(index.entries),
        collate_fn=collate_samples,
        pin_memory=pin,
    )
    return next(iter(loader))


def test_gpu_run_matches_cpu_run(tmp_path, photos, tiny_checkpoint, prefect_server):
    root = make_image_folder(tmp_path / "images", photos)
    out = {}
    for device in ("cpu", "cuda"):
        argv = ["run", "-q"]
        for o in base_overrides(root, tiny_checkpoint, tmp_path / device, **{"inference.device": device}):
            argv += ["--set", o]
        assert main(argv) == 0
        rows = (
            ds.dataset(tmp_path / device / "predictions", format="parquet", partitioning="hive").to_table().to_pylist()
        )
        out[device] = {r["image_path"]: r for r in rows}
    assert sorted(out["cpu"]) == sorted(out["cuda"]) and len(out["cpu"]) == 12
    assert {r["device"] for r in out["cuda"].values()} == {"cuda:0"}
    for path, c in out["cpu"].items():
        g = out["cuda"][path]
        assert g["pred_index"] == c["pred_index"], path
        assert g["score"] == pytest.approx(c["score"], abs=1e-3)  # TF32/cuDNN kernels differ from CPU


def test_batches_are_pinned_and_copied_non_blocking(tmp_path, photos, tiny_checkpoint):
    lm = _model(tiny_checkpoint, "cuda")
    batch = _batch(make_image_folder(tmp_path / "images", photos), lm, pin=True)
    assert batch.tensor.device.type == "cpu" and batch.tensor.is_pinned()  # built on the CPU, pinned
    x = batch.tensor.to(lm.device, non_blocking=True, memory_format=torch.channels_last)
    assert x.is_cuda and x.is_contiguous(memory_format=torch.channels_last)
    probs = forward_probs(lm, x, "fp32")
    assert probs.dtype == torch.float32 and probs.device.type == "cpu"
    assert torch.allclose(probs.sum(dim=1), torch.ones(len(probs)), atol=1e-5)


def test_model_is_channels_last_on_the_gpu(tiny_checkpoint):
    lm = _model(tiny_checkpoint, "cuda")
    conv = next(m for m in lm.module.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_cuda and conv.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_precision_stays_close_to_fp32(tmp_path, photos, tiny_checkpoint, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    lm = _model(tiny_checkpoint, "cuda")
    batch = _batch(make_image_folder(tmp_path / "images", photos), lm, pin=True)
    x = batch.tensor.to(lm.device, non_blocking=True, memory_format=torch.channels_last)
    with torch.inference_mode():
        ref, low = forward_probs(lm, x, "fp32"), forward_probs(lm, x, precision)
    assert low.dtype == torch.float32  # softmax in fp32 whatever the autocast dtype
    assert (low - ref).abs().max().item() < (0.03 if precision == "bf16" else 0.005)


def test_two_dask_workers_take_two_gpus(tmp_path, photos, tiny_checkpoint, prefect_server):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    root = make_image_folder(tmp_path / "images", photos)
    argv = ["run", "-q"]
    for o in base_overrides(
        root,
        tiny_checkpoint,
        tmp_path / "out",
        **{"inference.device": "auto", "runner.type": "dask", "runner.n_workers": 2, "run.shard_size": 3},
    ):
        argv += ["--set", o]
    assert main(argv) == 0
    rows = ds.dataset(tmp_path / "out" / "predictions", format="parquet", partitioning="hive").to_table().to_pylist()
    by_worker = {}
    for r in rows:
        by_worker.setdefault(r["worker"], set()).add(r["device"])
    assert len(by_worker) == 2
    assert sorted(d for devs in by_worker.values() for d in devs) == ["cuda:0", "cuda:1"]  # one GPU each
