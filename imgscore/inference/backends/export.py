"""The ONNX export of a loaded model, made once and cached on disk (:func:`export_onnx`).

An export is made once per (model_id, preprocessing, input size, torch version) with
``torch.onnx.export``: a changed checkpoint has another ``model_id`` (sha256 of its bytes), so
it never reuses a stale export, and concurrent workers wait on one file lock while one of them
exports into a temporary folder that is renamed into place. TorchScript checkpoints export
through the TorchScript-based exporter, every other module through ``torch.export``.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from imgscore.errors import ConfigError, ModelError
from imgscore.images.decode import warnings_lock
from imgscore.inference.backends.installed import exporter_modules
from imgscore.inference.exported import ExportedProgramModule
from imgscore.inference.model import LoadedModel
from imgscore.io.fetched import cache_root, default_cache_dir  # noqa: F401 - where they were

log = logging.getLogger("imgscore")

EXPORT_FORMAT = 1  # bump when the export recipe changes (invalidates every cached export)
OPSET = 18  # ONNX opset of exports; ONNX Runtime >= 1.14 and OpenVINO >= 2023.0 read it


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
    # what both exporters are given; they differ in how the batch dimension is declared
    args = (module, example, str(path))
    named: dict[str, Any] = {
        "input_names": ["input"],
        "output_names": ["logits"],
        "opset_version": OPSET,
        "verbose": False,
    }
    # Deprecation notes of the TorchScript exporter and torch.export's progress lines are not
    # the user's business; decoding threads take the same lock around warnings capture.
    with warnings_lock(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not isinstance(module, torch.jit.ScriptModule):
            try:
                torch.onnx.export(
                    *args,
                    dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                    dynamo=True,
                    external_data=False,
                    **named,
                )
                return "torch.export"
            except Exception as exc:  # not traceable by torch.export: the TorchScript exporter next
                log.info(
                    "torch.export-based ONNX export failed (%s: %s); trying the TorchScript-based exporter",
                    type(exc).__name__,
                    str(exc).splitlines()[0][:200] if str(exc) else "",
                )
        torch.onnx.export(*args, dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False, **named)
        return "torchscript"


def _refuse_fixed_batch(lm: LoadedModel) -> None:
    """A torch.export program exported with a static (or bounded) batch cannot become an ONNX
    model with a dynamic batch: re-exporting it fixes the example's batch size into the graph (a
    model that refuses every other batch at run time). A ConfigError, so ``auto`` passes it by.

    Raises:
        ConfigError: naming the program's input and the two fixes.
    """
    module = lm.module
    if isinstance(module, ExportedProgramModule) and not module.any_batch:
        raise ConfigError(
            f"inference.backend: the ONNX backends need a model that takes any batch size, and this torch.export "
            f"program takes {module.input_text()}; use inference.backend=torch (which runs it in chunks), or export "
            "it with a dynamic batch: torch.export.export(model.eval(), (example,), "
            "dynamic_shapes=({0: torch.export.Dim('batch')},))"
        )


def export_onnx(lm: LoadedModel, cache_dir: Path | None = None) -> Path:
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
        ConfigError: the cache folder cannot be written (names ``inference.cache_dir``); a
            torch.export program whose batch is not free (:func:`_refuse_fixed_batch`).
    """
    from filelock import FileLock

    _refuse_fixed_batch(lm)

    key = export_key(lm)
    root = cache_root(cache_dir)
    final = root / "onnx" / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', lm.arch)}-{key[:24]}"
    model_path = final / "model.onnx"
    if model_path.is_file():
        return model_path
    exporter_modules()
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"inference.cache_dir {str(root)!r} cannot hold the ONNX export ({exc.strerror}); "
            "set inference.cache_dir to a writable folder"
        ) from None
    with FileLock(str(final) + ".lock"):
        if not model_path.is_file():  # another process may have exported it while we waited
            _export_into(final, lm, key)
    return model_path


def _export_into(final: Path, lm: LoadedModel, key: str) -> None:
    """Export ``lm`` into a hidden temporary folder beside ``final`` with its ``meta.json``, and
    rename that folder to ``final`` (the caller holds ``final``'s lock).

    Raises:
        ModelError: the module cannot be exported.
    """
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
        meta = {
            "key": key,
            "exporter": exporter,
            "seconds": round(time.perf_counter() - t0, 2),
            "model_id": lm.model_id,
            "arch": lm.arch,
            "num_classes": lm.num_classes,
            "preprocess": lm.preprocess.to_dict(),
            "torch": torch.__version__,
            "opset": OPSET,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the cache may be shared
        os.rename(tmp, final)
        log.info(
            "exported %s (model_id %s) to ONNX in %.1f s with the %s exporter: %s",
            lm.arch,
            lm.model_id[:12],
            meta["seconds"],
            exporter,
            final / "model.onnx",
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
