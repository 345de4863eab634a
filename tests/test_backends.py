"""Backends (imgscore/inference/backends/): the ONNX export cache, runtimes that are missing or asked for
what they cannot do, TorchScript exports, thread shares and ``auto``'s once-per-machine choice.

Answers of the fp32 backends against torch, and the reduced-precision canary, are checked in
tests/test_fidelity.py on a model whose answers are distinct by construction.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from imgscore.config.scoring import ModelConfig, PreprocessConfig
from imgscore.errors import ConfigError
from imgscore.inference.backends.auto import choose_backend, resolve_forward
from imgscore.inference.backends.eager import forward_probs
from imgscore.inference.backends.export import export_key, export_onnx
from imgscore.inference.backends.factory import check_backend, make_forward, preflight
from imgscore.inference.backends.installed import BackendUnavailable, installed_backends
from imgscore.inference.model import clear_model_cache, load_model
from tests.conftest import base_overrides

CPU = torch.device("cpu")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime has no wheel for this platform")
ov = pytest.importorskip("openvino", reason="openvino has no wheel for this platform")


def _load(ckpt, arch="mobilenet_v3_small", crop=64):
    return load_model(ModelConfig(arch=arch, checkpoint=ckpt), PreprocessConfig(resize=crop, crop=crop), CPU)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One export cache for the module: each export costs seconds, so tests share them."""
    return tmp_path_factory.mktemp("imgscore_cache")


def test_export_is_made_once_and_keyed_by_checkpoint_and_input_size(tmp_path, tiny_model, tiny_checkpoint, cache):
    """A second request reuses the file; a checkpoint with other bytes (one weight changed) or
    another crop gets its own export, so a stale export is never scored."""
    lm = _load(tiny_checkpoint)
    path = export_onnx(lm, cache)
    meta = json.loads((path.parent / "meta.json").read_text())
    assert path.name == "model.onnx" and meta["model_id"] == lm.model_id and meta["exporter"] == "torch.export"
    stamp = path.stat().st_mtime_ns
    assert export_onnx(lm, cache) == path and path.stat().st_mtime_ns == stamp

    sd = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    next(v for k, v in sd.items() if k.endswith("weight")).add_(0.5)
    changed = tmp_path / "changed.pt"
    torch.save(sd, changed)
    other = export_onnx(_load(changed), cache)
    assert other != path and other.is_file()
    bigger = export_onnx(_load(tiny_checkpoint, crop=96), cache)
    assert bigger not in (path, other)
    assert not [p for p in (cache / "onnx").iterdir() if p.name.startswith(".")]  # no temp folders left

    sess = ort.InferenceSession(str(bigger), providers=["CPUExecutionProvider"])
    (shape,) = [i.shape for i in sess.get_inputs()]
    assert shape[1:] == [3, 96, 96] and not isinstance(shape[0], int)  # dynamic batch axis


def _export_in_child(args) -> str:
    ckpt, cache = args
    clear_model_cache()
    return str(export_onnx(_load(ckpt), cache))


def test_concurrent_workers_make_one_export(tmp_path, tiny_checkpoint):
    """Two processes ask for the same export at once: both get the same complete file, made once
    (one folder, one meta.json, no temporary folder left) — the file lock and the rename."""
    cache = tmp_path / "shared_cache"
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        paths = pool.map(_export_in_child, [(tiny_checkpoint, cache)] * 2)
    assert paths[0] == paths[1]
    folders = list((cache / "onnx").iterdir())
    assert [p.name for p in folders if p.is_dir()] == [Path(paths[0]).parent.name]
    import onnx

    onnx.checker.check_model(paths[0])


def test_torchscript_checkpoint_exports_and_scores_like_torch(tmp_path, tiny_model, photos, cache):
    """A TorchScript archive goes through the TorchScript-based exporter; ONNX Runtime then
    computes the same function (fp32; probabilities within 1e-4, where rounding moves them ~1e-6)."""
    ts = tmp_path / "tiny_scripted.pt"
    torch.jit.save(torch.jit.script(tiny_model), ts)
    lm = _load(ts)
    assert lm.source == "torchscript"
    fwd = make_forward(lm, "onnxruntime", "fp32", threads=1, cache_dir=cache)
    assert json.loads((export_onnx(lm, cache).parent / "meta.json").read_text())["exporter"] == "torchscript"
    from imgscore.images.preprocess import build_transform

    tf = build_transform(lm.preprocess)
    x = torch.stack([tf(img) for img in photos.values()])
    with torch.inference_mode():
        ref = forward_probs(lm, x, "fp32")
    got = fwd(x)
    assert got.dtype == torch.float32 and got.shape == ref.shape == (len(photos), 3)
    assert (got - ref).abs().max() < 1e-4


def test_each_runtime_gets_the_worker_thread_share(tiny_checkpoint, cache):
    """The thread count handed over (the worker's core share) is what each runtime is set to."""
    lm = _load(tiny_checkpoint)
    fo = make_forward(lm, "onnxruntime", "fp32", threads=1, cache_dir=cache)
    assert fo.session.get_session_options().intra_op_num_threads == 1
    fv = make_forward(lm, "openvino", "fp32", threads=1, cache_dir=cache)
    assert int(fv.compiled.get_property("INFERENCE_NUM_THREADS")) == 1
    assert make_forward(lm, "openvino", "fp32", threads=1, cache_dir=cache) is fv  # one session per process


def test_openvino_fp32_is_asked_for_explicitly(tiny_checkpoint, cache):
    """OpenVINO's default precision is bf16 on CPUs that have it; imgscore's fp32 is an explicit
    f32 hint, so the compiled model reports fp32 on every CPU."""
    fv = make_forward(_load(tiny_checkpoint), "openvino", "fp32", threads=1, cache_dir=cache)
    assert fv.precision == "fp32" and fv.describe() == {"backend": "openvino", "precision": "fp32"}


@pytest.mark.parametrize(
    "backend, precision, device, pattern",
    [
        ("onnxruntime", "bf16", "cpu", r"inference.precision=bf16 is not available with inference.backend=onnxruntime"),
        ("openvino", "fp16", "cpu", r"fp16 is a GPU precision"),
        ("auto", "bf16", "cpu", r"name the fast path the canary checks"),
        ("onnxruntime", "fp32", "cuda", r"runs on the CPU but inference.device resolved to cuda"),
    ],
)
def test_impossible_combinations_are_refused(backend, precision, device, pattern):
    with pytest.raises(ConfigError, match=pattern):
        check_backend(backend, precision, torch.device(device))


def test_missing_runtime_names_the_install_line(monkeypatch):
    """A runtime that does not import is a usage error (exit 2) with the pip line of its extra."""
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(BackendUnavailable, match=r"pip install 'imgscore\[onnx\]'") as exc:
        preflight("onnxruntime", "fp32", CPU)
    assert exc.value.exit_code == 2
    with pytest.raises(BackendUnavailable, match=r"pip install 'imgscore\[openvino\]'"):
        preflight("openvino", "fp32", CPU)
    assert installed_backends() == ["torch"]


def test_cli_refuses_a_missing_runtime_before_scoring(tmp_path, image_folder, tiny_checkpoint):
    """The real console script, with an ``onnxruntime`` on its path that fails to import (what an
    absent package does): exit 2, one line with the install command, nothing written."""
    shadow = tmp_path / "shadow" / "onnxruntime"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'onnxruntime'\")\n")
    out = tmp_path / "out"
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONPATH": str(shadow.parent),
        "PREFECT_HOME": str(tmp_path / "ph"),
    }
    sets = [
        a
        for o in base_overrides(image_folder, tiny_checkpoint, out, **{"inference.backend": "onnxruntime"})
        for a in ("--set", o)
    ]
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "imgscore"), "run", *sets],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "pip install 'imgscore[onnx]'" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (out / "predictions").exists() and not (out / "runs").exists()


def test_auto_measures_once_per_machine_and_picks_a_measured_backend(tiny_checkpoint, tmp_path):
    """``auto`` times the candidates, keeps the fastest it measured and caches the choice, so a
    second process (here: a second call) does not measure again."""
    lm = _load(tiny_checkpoint)
    first = choose_backend(lm, threads=1, batch=4, cache_dir=tmp_path)
    assert set(first.img_per_s) == {"torch", "onnxruntime", "openvino"}
    assert first.backend == max(first.img_per_s, key=first.img_per_s.get)
    assert choose_backend(lm, threads=1, batch=4, cache_dir=tmp_path) == first  # read back, not re-measured
    only = choose_backend(lm, threads=1, batch=4, cache_dir=tmp_path, candidates=["torch"])
    assert only.backend == "torch"
    fwd = resolve_forward(lm, "auto", "fp32", threads=1, batch=4, cache_dir=tmp_path)
    assert fwd.backend == first.backend


def test_a_factory_models_export_follows_its_code(tmp_path, monkeypatch, tiny_model):
    """``model.factory``: the same checkpoint with edited factory code gets another export key,
    so an export made before the edit is never scored."""
    (tmp_path / "factory_for_backends.py").write_text(
        "import torchvision\n\ndef build():\n    return torchvision.models.mobilenet_v3_small(num_classes=3)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    ckpt = tmp_path / "sd.pt"
    torch.save(tiny_model.state_dict(), ckpt)
    cfg = ModelConfig(arch="mobilenet_v3_small", checkpoint=ckpt, factory="factory_for_backends:build")
    lm = load_model(cfg, PreprocessConfig(resize=64, crop=64), CPU)
    before = export_key(lm)
    (tmp_path / "factory_for_backends.py").write_text(
        "import torchvision\n\n\ndef build():  # edited\n    return "
        "torchvision.models.mobilenet_v3_small(num_classes=3)\n"
    )
    assert export_key(lm) != before
    sys.modules.pop("factory_for_backends", None)
