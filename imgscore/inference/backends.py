"""Inference backends: eager PyTorch, ONNX Runtime and OpenVINO behind one forward contract.

Every backend gives a :class:`Forward`: a callable from a float32 ``[B, 3, H, W]`` batch to
softmax probabilities float32 ``[B, C]`` on the CPU — the contract of :func:`forward_probs`,
so per-image isolation (``imgscore.inference.score.score_isolated``), the NaN/Inf check and top-k
are the same code for every backend.

ONNX Runtime and OpenVINO run an ONNX export of the loaded model, made once per
(model_id, preprocessing, input size, torch version) with ``torch.onnx.export`` and cached on
disk (:func:`export_onnx`): a changed checkpoint has another ``model_id`` (sha256 of its bytes),
so it never reuses a stale export, and concurrent workers wait on one file lock while one of
them exports into a temporary folder that is renamed into place. TorchScript checkpoints export
through the TorchScript-based exporter, every other module through ``torch.export``.

Threads: each runtime gets the worker's core share that torch gets
(``imgscore.inference.device.configure_threads``). Precision: ``fp32`` everywhere by default —
OpenVINO is told ``f32`` explicitly, because on CPUs with bf16 its default is bf16, which moved
resnet50 logits by up to 0.53. Reduced precision (``bf16``) is opt-in and checked by a canary
at run start (:func:`run_canary`).

``inference.backend=auto`` times every installed backend on this machine for this model (a few
batches of seeded input) and keeps the fastest; the choice is cached on disk per (model, CPU,
threads, batch size), so it is measured once per machine (:func:`choose_backend`).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import json
import logging
import os
import platform
import re
import shutil
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from imgscore.errors import ConfigError, ModelError
from imgscore.inference.model import LoadedModel

log = logging.getLogger("imgscore")

BACKENDS = ("torch", "onnxruntime", "openvino")
# What `pip install` line brings each runtime (pyproject.toml optional extras).
EXTRAS = {"onnxruntime": "onnx", "openvino": "openvino"}
EXPORT_FORMAT = 1  # bump when the export recipe changes (invalidates every cached export)
OPSET = 18  # ONNX opset of exports; ONNX Runtime >= 1.14 and OpenVINO >= 2023.0 read it

# Canary thresholds: refuse reduced precision below this top-1 agreement with fp32
# torch, or above this mean |Δscore| (the reference top-1 class's probability).
CANARY_MIN_AGREEMENT = 0.995
CANARY_MAX_MEAN_DSCORE = 0.01


class BackendUnavailable(ConfigError):
    """The configured runtime is not installed (exit 2, with the install line)."""


def forward_probs(lm: LoadedModel, x: torch.Tensor, precision: str) -> torch.Tensor:
    """Softmax probabilities float32 [B, C] on CPU for an input float32 [B, 3, H, W] on ``lm.device``.

    ``precision`` bf16/fp16 runs the forward under ``torch.autocast``; the softmax is always fp32.
    """
    if precision != "fp32" and lm.device.type in ("cuda", "cpu"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        with torch.autocast(device_type=lm.device.type, dtype=dtype):
            out = lm.module(x)
    else:
        out = lm.module(x)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return torch.softmax(out.float(), dim=1).cpu()


class Forward:
    """A backend's forward pass: ``fwd(x)`` with x float32 [B, 3, H, W] → probabilities float32
    [B, C] on the CPU. ``backend`` and ``precision`` say what really runs (``precision`` is
    what the runtime reports after compiling, e.g. OpenVINO's inference precision);
    ``channels_last`` is the input memory format the backend wants (torch's conv nets)."""

    backend: str = "torch"
    precision: str = "fp32"
    channels_last: bool = False
    device: torch.device = torch.device("cpu")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self) -> dict:
        """JSON-ready ``{"backend", "precision"}`` for manifests and Parquet metadata."""
        return {"backend": self.backend, "precision": self.precision}


class TorchForward(Forward):
    """Eager PyTorch (:func:`forward_probs`) on ``lm.device``, autocast for bf16/fp16."""

    def __init__(self, lm: LoadedModel, precision: str = "fp32", channels_last: bool = True):
        self.lm, self.precision, self.device, self.channels_last = lm, precision, lm.device, channels_last

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return forward_probs(self.lm, x, self.precision)


def _probs(logits: np.ndarray) -> torch.Tensor:
    return torch.softmax(torch.from_numpy(np.asarray(logits, dtype=np.float32)), dim=1)


def _as_input(x: torch.Tensor) -> np.ndarray:
    """float32 C-contiguous NCHW numpy view (or copy) of ``x``: what both runtimes read."""
    return np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())


class OrtForward(Forward):
    """ONNX Runtime's CPU execution provider on an exported model (fp32 only).

    ``intra_op_num_threads`` is the worker's core share; one inter-op thread (a CNN's graph is
    a chain, nothing runs beside it); every graph optimisation on (ONNX Runtime fuses
    Conv+BatchNorm+ReLU itself). ``session.run`` is thread-safe, so one session serves every
    shard thread of a process.
    """

    backend = "onnxruntime"

    def __init__(self, path: Path, threads: int):
        ort = _import_runtime("onnxruntime")
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3  # errors only: no per-session warnings on the terminal
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.threads = threads

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        (logits, *_) = self.session.run(None, {self.input_name: _as_input(x)})
        return _probs(logits)


class OpenVinoForward(Forward):
    """OpenVINO on the CPU device, compiled from the ONNX export.

    ``INFERENCE_PRECISION_HINT`` is set explicitly (``f32`` for fp32, ``bf16`` when asked), so a
    CPU with bf16 never reduces precision silently; ``precision`` is what OpenVINO reports after
    compiling. ``INFERENCE_NUM_THREADS`` is the worker's core share, one stream, latency hint
    (one batch at a time per shard). Infer requests are per thread (they are not thread-safe).
    """

    backend = "openvino"
    _HINTS = {"fp32": "f32", "bf16": "bf16"}
    _NAMES = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}

    def __init__(self, path: Path, threads: int, precision: str = "fp32"):
        ov = _import_runtime("openvino")
        core = ov.Core()
        self.compiled = core.compile_model(
            str(path),
            "CPU",
            {
                "INFERENCE_NUM_THREADS": threads,
                "INFERENCE_PRECISION_HINT": self._HINTS[precision],
                "PERFORMANCE_HINT": "LATENCY",
                "NUM_STREAMS": 1,
            },
        )
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")  # an openvino.Type
        got = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
        self.precision = self._NAMES.get(got, got)
        self.threads = threads
        self._local = threading.local()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        req = getattr(self._local, "req", None)
        if req is None:
            req = self._local.req = self.compiled.create_infer_request()
        req.infer({0: _as_input(x)})
        return _probs(req.get_output_tensor(0).data.copy())


# ----------------------------------------------------------------------------- runtimes


def _import_runtime(name: str):
    """Import ``onnxruntime`` or ``openvino``, or raise :class:`BackendUnavailable` (exit 2)
    naming the pip line that installs it."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise BackendUnavailable(
            f"inference.backend={name} needs the {name} package, which is not installed here ({exc}); "
            f"install it with: pip install 'imgscore[{EXTRAS[name]}]' — or use inference.backend=torch"
        ) from None


def installed_backends() -> list[str]:
    """The backends this process can run: ``torch`` plus each runtime that imports (and, for
    ONNX export, ``onnx`` + ``onnxscript``), in :data:`BACKENDS` order."""
    out = ["torch"]
    for name in BACKENDS[1:]:
        try:
            _import_runtime(name)
            _exporter_modules()
        except ConfigError:
            continue
        out.append(name)
    return out


def _exporter_modules() -> None:
    for mod in ("onnx", "onnxscript"):
        try:
            importlib.import_module(mod)
        except ImportError as exc:
            raise BackendUnavailable(
                f"exporting the model to ONNX needs the {mod} package, which is not installed here ({exc}); "
                "install it with: pip install 'imgscore[onnx]' — or use inference.backend=torch"
            ) from None


# ----------------------------------------------------------------------------- export cache


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/imgscore`` (``~/.cache/imgscore`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "imgscore"


def _code_id(lm: LoadedModel) -> str | None:
    """sha256 of the source files that define the model when they are not torch's or
    torchvision's: the ``model.factory`` function's module and the module's own class. Editing
    that code changes the export key even when the checkpoint stays the same."""
    names = {type(lm.module).__module__}
    if ":" in lm.arch:  # model.factory "package.module:function"
        names.add(lm.arch.partition(":")[0].strip())
    h = hashlib.sha256()
    found = False
    for name in sorted(n for n in names if n.split(".")[0] not in ("torch", "torchvision")):
        path = getattr(sys.modules.get(name), "__file__", None)
        try:
            h.update(Path(path).read_bytes() if path else name.encode())
            found = True
        except OSError:
            h.update(name.encode())
    return h.hexdigest() if found else None


def export_key(lm: LoadedModel) -> str:
    """sha256 hex of everything an export depends on: the checkpoint's fingerprint
    (``model_id``), arch (or ``model.factory``) and the source of a factory's module, head size,
    how it was loaded, the resolved preprocessing (its crop is the input size), torch's and
    torchvision's versions and :data:`EXPORT_FORMAT`."""
    blob = {
        "code": _code_id(lm),
        "torchvision": importlib.metadata.version("torchvision"),
        "format": EXPORT_FORMAT,
        "opset": OPSET,
        "model_id": lm.model_id,
        "arch": lm.arch,
        "num_classes": lm.num_classes,
        "source": lm.source,
        "preprocess": lm.preprocess.to_dict(),
        "torch": torch.__version__,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def _cpu_fp32_copy(lm: LoadedModel) -> torch.nn.Module:
    """The loaded module as an fp32 CPU module in eval mode (the loaded one is left as it is)."""
    import copy

    module = lm.module
    if isinstance(module, torch.jit.ScriptModule):
        return module.cpu().float().eval() if lm.device.type != "cpu" else module.eval()
    return copy.deepcopy(module).to("cpu", torch.float32).to(memory_format=torch.contiguous_format).eval()


def _export(module: torch.nn.Module, crop: int, path: Path) -> str:
    """Write ``module`` as ONNX to ``path`` with a dynamic batch axis; return the exporter used.

    ``torch.export``-based (``dynamo=True``, torch's default) for ordinary modules; the
    TorchScript-based exporter for ScriptModules, which ``torch.export`` cannot read (and as a
    second try for a module ``torch.export`` cannot trace). Input ``input`` float32
    [batch, 3, crop, crop], output ``logits`` float32 [batch, C].
    """
    example = (torch.zeros(2, 3, crop, crop),)
    # Deprecation notes of the TorchScript exporter and torch.export's progress lines are not
    # the user's business; decoding threads take the same lock around warnings capture.
    from imgscore.images.preprocess import warnings_lock

    with warnings_lock(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not isinstance(module, torch.jit.ScriptModule):
            try:
                torch.onnx.export(
                    module, example, str(path), input_names=["input"], output_names=["logits"],
                    dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), dynamo=True,
                    external_data=False, opset_version=OPSET, verbose=False,
                )
                return "torch.export"
            except Exception as exc:  # not traceable by torch.export: the TorchScript exporter next
                log.info("torch.export-based ONNX export failed (%s: %s); trying the TorchScript-based exporter",
                         type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
        torch.onnx.export(
            module, example, str(path), input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False,
            opset_version=OPSET, verbose=False,
        )
        return "torchscript"


def export_onnx(lm: LoadedModel, cache_dir: str | Path | None = None) -> Path:
    """The ONNX export of ``lm``: ``CACHE/onnx/<arch>-<key>/model.onnx``, made on first use.

    ``CACHE`` is ``cache_dir`` or :func:`default_cache_dir`; ``key`` is :func:`export_key`, so a
    changed checkpoint, preprocessing or torch version gets a new export. Concurrent processes
    (Dask workers, two runs) serialise on ``<folder>.lock`` (``filelock``); the one that holds
    it exports into a hidden temporary folder beside the final one and renames it into place,
    so a reader never sees half a file and a killed exporter leaves only a hidden folder.
    ``meta.json`` beside the model records the key's inputs, the exporter and its seconds.

    Raises:
        BackendUnavailable: ``onnx``/``onnxscript`` not installed (exit 2, with the pip line).
        ModelError: the module cannot be exported (exit 2; ``inference.backend=torch`` still works).
        ConfigError: the cache folder cannot be written (names ``inference.cache_dir``).
    """
    from filelock import FileLock

    key = export_key(lm)
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    final = root / "onnx" / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', lm.arch)}-{key[:24]}"
    model_path = final / "model.onnx"
    if model_path.is_file():
        return model_path
    _exporter_modules()
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"inference.cache_dir {str(root)!r} cannot hold the ONNX export ({exc.strerror}); "
            "set inference.cache_dir to a writable folder"
        ) from None
    with FileLock(str(final) + ".lock"):
        if model_path.is_file():  # another process exported it while we waited
            return model_path
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        try:
            t0 = time.perf_counter()
            try:
                exporter = _export(_cpu_fp32_copy(lm), lm.preprocess.crop, tmp / "model.onnx")
            except Exception as exc:
                raise ModelError(
                    f"model.arch={lm.arch} (model_id {lm.model_id[:12]}) cannot be exported to ONNX: "
                    f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}; "
                    "use inference.backend=torch for this model"
                ) from None
            meta = {"key": key, "exporter": exporter, "seconds": round(time.perf_counter() - t0, 2),
                    "model_id": lm.model_id, "arch": lm.arch, "num_classes": lm.num_classes,
                    "preprocess": lm.preprocess.to_dict(), "torch": torch.__version__, "opset": OPSET}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the cache may be shared
            os.rename(tmp, final)
            log.info("exported %s (model_id %s) to ONNX in %.1f s with the %s exporter: %s",
                     lm.arch, lm.model_id[:12], meta["seconds"], exporter, model_path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return model_path


# ----------------------------------------------------------------------------- choosing


_FORWARDS: dict[tuple, Forward] = {}
_LOCK = threading.Lock()


def check_backend(backend: str, precision: str, device: torch.device) -> None:
    """Refuse combinations that cannot run, before any scoring (exit 2).

    ONNX Runtime and OpenVINO run on the CPU here; ONNX Runtime's CPU provider has no bf16
    path; fp16 is a GPU precision. ``auto`` with reduced precision is refused: the canary checks
    one named fast path, not whichever each machine would pick.
    """
    if backend == "torch":
        return
    if backend == "auto":
        if precision != "fp32":
            raise ConfigError(
                f"inference.precision={precision} with inference.backend=auto: name the fast path the "
                "canary checks (inference.backend=torch or openvino), or keep precision fp32"
            )
        return
    if device.type != "cpu":
        raise ConfigError(
            f"inference.backend={backend} runs on the CPU but inference.device resolved to {device}; "
            "set inference.device=cpu, or inference.backend=torch to use the GPU"
        )
    if backend == "onnxruntime" and precision != "fp32":
        raise ConfigError(
            f"inference.precision={precision} is not available with inference.backend=onnxruntime "
            "(its CPU provider runs fp32); use inference.backend=openvino for bf16, or precision fp32"
        )
    if backend == "openvino" and precision == "fp16":
        raise ConfigError(
            "inference.precision=fp16 is a GPU precision; with inference.backend=openvino use bf16 or fp32"
        )


def make_forward(lm: LoadedModel, backend: str, precision: str = "fp32", threads: int = 1,
                 cache_dir: str | Path | None = None, channels_last: bool = True) -> Forward:
    """The :class:`Forward` for ``backend`` (not ``auto``), built once per process and cached
    per (model, backend, precision, threads).

    Raises:
        BackendUnavailable, ConfigError, ModelError: see :func:`check_backend`, :func:`export_onnx`.
    """
    check_backend(backend, precision, lm.device)
    if backend == "torch":
        return TorchForward(lm, precision, channels_last)
    key = (id(lm.module), export_key(lm), backend, precision, threads, str(cache_dir))
    with _LOCK:
        hit = _FORWARDS.get(key)
    if hit is not None:
        return hit
    _import_runtime(backend)  # a missing runtime is refused before the export is made
    path = export_onnx(lm, cache_dir)
    fwd: Forward = OrtForward(path, threads) if backend == "onnxruntime" else OpenVinoForward(path, threads, precision)
    with _LOCK:
        return _FORWARDS.setdefault(key, fwd)


def clear_forward_cache() -> None:
    """Forget built sessions (tests; a long-lived process after a checkpoint changes)."""
    with _LOCK:
        _FORWARDS.clear()


def cpu_signature() -> str:
    """The CPU model and its SIMD flags that matter to these runtimes (``/proc/cpuinfo``)."""
    model, flags = platform.processor() or platform.machine(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                flags = sorted(f for f in have if f.startswith(("avx", "amx")) or f in ("fma", "f16c"))
                break
    except OSError:
        pass
    return f"{model} [{' '.join(flags)}]"


@dataclass
class BackendChoice:
    """What ``auto`` picked on this machine and what it measured (img/s per backend)."""

    backend: str
    img_per_s: dict[str, float]
    batch: int
    threads: int
    cpu: str
    measured_at: str


def _time_forward(fwd: Forward, x: torch.Tensor, repeats: int = 2) -> float:
    xin = x.contiguous(memory_format=torch.channels_last) if fwd.channels_last else x.contiguous()
    with torch.inference_mode():
        fwd(xin)  # warm-up: primitive creation, allocator
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fwd(xin)
            best = min(best, time.perf_counter() - t0)
    return len(x) / best


def choose_backend(lm: LoadedModel, threads: int, batch: int, cache_dir: str | Path | None = None,
                   channels_last: bool = True, candidates: Sequence[str] | None = None) -> BackendChoice:
    """``inference.backend=auto``: the fastest fp32 backend for this model on this machine.

    Times each installed backend (:func:`installed_backends`, or ``candidates``) on one batch
    of ``min(batch, 16)`` seeded normal images at the model's input size — a warm-up, then the
    best of two — and picks the highest img/s. The choice is written to
    ``CACHE/auto/<key>.json`` keyed by (export key, CPU model and flags, threads, batch), so each
    machine measures once; a GPU device always gets ``torch``. All candidates are fp32 and give
    the same answers (tests/test_fidelity.py), so the choice changes speed, never scores.
    """
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if lm.device.type != "cpu":
        return BackendChoice("torch", {}, batch, threads, "", now)
    cands = list(candidates) if candidates is not None else installed_backends()
    cpu = cpu_signature()
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    sig = hashlib.sha256(json.dumps([export_key(lm), cpu, threads, batch, cands, channels_last]).encode()).hexdigest()[:24]
    path = root / "auto" / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', lm.arch)}-{sig}.json"
    try:
        got = BackendChoice(**json.loads(path.read_text()))
        if got.backend in cands:
            return got
    except (OSError, ValueError, TypeError):
        pass
    g = torch.Generator().manual_seed(0)
    x = torch.randn(min(batch, 16), 3, lm.preprocess.crop, lm.preprocess.crop, generator=g)
    rates: dict[str, float] = {}
    for name in cands:
        try:
            rates[name] = round(_time_forward(make_forward(lm, name, "fp32", threads, cache_dir, channels_last), x), 2)
        except ConfigError as exc:  # not installed / not exportable: not a candidate here
            log.info("inference.backend=auto: %s is not a candidate (%s)", name, exc)
    best = max(rates, key=rates.get) if rates else "torch"
    choice = BackendChoice(best, rates, batch, threads, cpu, now)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(asdict(choice), indent=2))
        os.replace(tmp, path)
    except OSError as exc:  # a read-only cache costs a re-measure next time, nothing else
        log.info("inference.backend=auto: could not cache the choice in %s (%s)", path, exc)
    log.info("inference.backend=auto chose %s on %s (%d threads, img/s: %s)", best, cpu, threads, rates)
    return choice


def resolve_backend(lm: LoadedModel, backend: str, precision: str, threads: int, batch: int,
                    cache_dir: str | Path | None = None, channels_last: bool = True) -> str:
    """The concrete backend for a configured ``inference.backend``: ``auto`` resolved by
    :func:`choose_backend` on this machine, anything else as given (checked)."""
    check_backend(backend, precision, lm.device)
    if backend != "auto":
        return backend
    return choose_backend(lm, threads, batch, cache_dir, channels_last).backend


def resolve_forward(lm: LoadedModel, backend: str, precision: str, threads: int, batch: int,
                    cache_dir: str | Path | None = None, channels_last: bool = True) -> Forward:
    """:func:`make_forward` for a configured ``inference.backend`` (:func:`resolve_backend`)."""
    backend = resolve_backend(lm, backend, precision, threads, batch, cache_dir, channels_last)
    return make_forward(lm, backend, precision, threads, cache_dir, channels_last)


# ----------------------------------------------------------------------------- canary


@dataclass
class CanaryResult:
    """Reduced precision against fp32 torch on the run's first images.

    ``top1_agreement`` is the fraction of images whose top-1 class is the same;
    ``mean_abs_dscore``/``max_abs_dscore`` the mean/max over images of |p_fast(c) − p_ref(c)|
    for the reference's top-1 class c (probabilities in [0, 1]).
    """

    images: int
    top1_agreement: float
    mean_abs_dscore: float
    max_abs_dscore: float
    passed: bool
    backend: str
    precision: str
    min_agreement: float = CANARY_MIN_AGREEMENT
    max_mean_dscore: float = CANARY_MAX_MEAN_DSCORE
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def compare_probs(ref: torch.Tensor, fast: torch.Tensor) -> tuple[float, float, float]:
    """(top-1 agreement, mean |Δscore|, max |Δscore|) of two probability tensors float32 [N, C];
    Δscore is taken on the reference's top-1 class."""
    top = ref.argmax(1, keepdim=True)
    agree = float((fast.argmax(1) == top[:, 0]).float().mean())
    d = (ref.gather(1, top) - fast.gather(1, top)).abs()[:, 0]
    return agree, float(d.mean()), float(d.max())


def run_canary(reference: Callable[[torch.Tensor], torch.Tensor], fast: Forward,
               batches: Sequence[torch.Tensor], *, channels_last_ref: bool = True,
               min_agreement: float = CANARY_MIN_AGREEMENT, max_mean_dscore: float = CANARY_MAX_MEAN_DSCORE) -> CanaryResult:
    """Score ``batches`` (float32 [B, 3, H, W] each, the run's first images) with fp32 torch
    (``reference``) and the ``fast`` path; pass when top-1 agreement ≥ ``min_agreement`` and
    mean |Δscore| ≤ ``max_mean_dscore`` (99.5 % and 0.01 by default).

    With fewer than 200 images a single flipped top-1 already falls below 99.5 %, so a small
    sample refuses any flip; a non-finite fast output counts as a flip.
    """
    t0 = time.perf_counter()
    refs, fasts = [], []
    with torch.inference_mode():
        for x in batches:
            xr = x.contiguous(memory_format=torch.channels_last) if channels_last_ref else x.contiguous()
            xf = x.contiguous(memory_format=torch.channels_last) if fast.channels_last else x.contiguous()
            refs.append(reference(xr).float())
            fasts.append(torch.nan_to_num(fast(xf).float(), nan=-1.0))
    if not refs:
        raise ValueError("the canary needs at least one decodable image")
    ref, fst = torch.cat(refs), torch.cat(fasts)
    agree, mean_d, max_d = compare_probs(ref, fst)
    passed = agree >= min_agreement and mean_d <= max_mean_dscore
    return CanaryResult(len(ref), round(agree, 6), round(mean_d, 6), round(max_d, 6), passed,
                        fast.backend, fast.precision, min_agreement, max_mean_dscore,
                        round(time.perf_counter() - t0, 3))


def runtime_versions() -> dict[str, str | None]:
    """Installed versions of the runtimes (for manifests and benchmark headers)."""
    out = {}
    for dist in ("onnxruntime", "openvino", "onnx"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def preflight(backend: str, precision: str, device: torch.device) -> None:
    """Refuse before scoring (exit 2) what :func:`make_forward` would refuse on a worker: an
    impossible combination (:func:`check_backend`), or a runtime or exporter that is not
    installed (with the pip line). Imports the runtime; exports nothing."""
    check_backend(backend, precision, device)
    if backend in ("onnxruntime", "openvino"):
        _import_runtime(backend)
        _exporter_modules()


def canary_for_run(lm: LoadedModel, root: str, entries: Sequence, decode_opts, *, backend: str,
                   precision: str, threads: int, batch: int, images: int,
                   cache_dir: str | Path | None = None, channels_last: bool = True) -> CanaryResult | None:
    """The run-start canary for reduced precision; ``None`` when ``precision`` is fp32.

    Decodes the run's first ``images`` decodable entries (looking at no more than four times as
    many; undecodable ones are skipped here and recorded by their shard as usual) with the run's
    own preprocessing, and compares fp32 torch with the configured fast path (:func:`run_canary`).

    Raises:
        ConfigError: no decodable image among the entries looked at.
    """
    if precision == "fp32":
        return None
    from imgscore.images.dataset import Sample, ShardDataset

    fast = make_forward(lm, backend, precision, threads, cache_dir, channels_last)
    reference = TorchForward(lm, "fp32", channels_last)
    ds = ShardDataset(root, list(entries[: 4 * images]), lm.preprocess, decode_opts)
    tensors: list[torch.Tensor] = []
    for i in range(len(ds)):
        item = ds[i]
        if isinstance(item, Sample):
            tensors.append(item.tensor)
            if len(tensors) == images:
                break
    if not tensors:
        raise ConfigError(
            f"inference.precision={precision}: the canary found no decodable image among the run's first "
            f"{len(ds)} images; score in fp32 (inference.precision=fp32)"
        )
    x = torch.stack(tensors).to(lm.device)
    batches = [x[i : i + batch] for i in range(0, len(x), batch)]
    return run_canary(reference, fast, batches, channels_last_ref=channels_last)


def start_inference(inf_cfg, lm: LoadedModel, root: str, entries: Sequence, decode_opts, threads: int) -> dict:
    """What a run records about its inference path at start, after the canary if one is due.

    Returns the manifest's ``inference`` block: ``backend`` (as configured; ``auto`` resolves
    per worker, see each shard's record), ``precision`` (what the shards will run),
    ``precision_requested``, ``canary`` (:class:`CanaryResult` as a dict, or None for fp32) and
    ``runtimes`` (installed versions). When the canary fails and ``inference.on_canary_fail`` is
    ``fp32``, ``precision`` is ``fp32`` and a WARNING says why.

    Raises:
        ConfigError: the canary failed and ``on_canary_fail`` is ``refuse`` (exit 2, before any
            part file is written); or an impossible backend/precision combination.
    """
    batch = inf_cfg.batch_size if isinstance(inf_cfg.batch_size, int) else 32
    canary = canary_for_run(
        lm, root, entries, decode_opts, backend=inf_cfg.backend, precision=inf_cfg.precision, threads=threads,
        batch=batch, images=inf_cfg.canary_images, cache_dir=inf_cfg.cache_dir, channels_last=inf_cfg.channels_last,
    )
    precision = inf_cfg.precision
    if canary is not None and not canary.passed:
        what = (
            f"inference.precision={inf_cfg.precision} on {canary.backend} failed the canary on the run's first "
            f"{canary.images} images: top-1 agreement with fp32 torch {canary.top1_agreement:.2%} "
            f"(needs ≥ {canary.min_agreement:.1%}), mean |Δscore| {canary.mean_abs_dscore:.4f} (needs ≤ {canary.max_mean_dscore})"
        )
        if inf_cfg.on_canary_fail == "refuse":
            raise ConfigError(f"{what}; score in fp32 (inference.precision=fp32), or set inference.on_canary_fail=fp32 to fall back")
        log.warning("%s; scoring in fp32 instead (inference.on_canary_fail=fp32)", what)
        precision = "fp32"
    return {
        "backend": inf_cfg.backend,
        "precision": precision,
        "precision_requested": inf_cfg.precision,
        "canary": canary.to_dict() if canary is not None else None,
        "runtimes": runtime_versions(),
    }
