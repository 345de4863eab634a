"""Load a torchvision classifier from storage, together with its transform, classes and id.

One :class:`LoadedModel` carries the module, its eval transform (:class:`PreprocessSpec`), its
class names and its fingerprint (``model_id``), like torchvision's ``Weights`` objects do, so
scoring code can never pair a model with the wrong transform or label list.

Checkpoint forms accepted (``model.checkpoint``):
- a plain ``state_dict``;
- a training-checkpoint dict with the weights under ``model_state_dict``, ``state_dict``,
  ``model``, ``model_state`` or ``net``, next to optimizer state, numpy scalars and argparse
  namespaces (those types are allow-listed for ``torch.load(weights_only=True)``); an optional
  ``classes`` list in the dict names the classes;
- keys prefixed ``module.`` (DataParallel/DDP) and/or ``_orig_mod.`` (torch.compile), in any
  stacking — stripped only when every key carries the prefix;
- a TorchScript archive (``torch.jit.save``);
- a whole pickled module (``torch.save(model)``) — only with ``model.trust_checkpoint=true``,
  since unpickling runs code from the file.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import pickle
import threading
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn

from imgscore.tasks.config import ModelConfig, PreprocessConfig
from imgscore.tasks.errors import ModelError
from imgscore.tasks.preprocess import (
    DEFAULT_CROP,
    DEFAULT_RESIZE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PreprocessSpec,
)
from imgscore.tasks.scan import sha256_of_file

# Keys under which common training scripts (torchvision references, Lightning-style loops,
# timm, hand-written ones) keep the weights in a checkpoint dict, in the order we look.
STATE_DICT_KEYS = ("model_state_dict", "state_dict", "model", "model_state", "net")
PREFIXES = ("module.", "_orig_mod.")


def _safe_globals() -> list:
    """Types a training checkpoint commonly holds besides tensors, allowed for weights_only loads."""
    core = getattr(np, "_core", None) or np.core
    allowed: list = [argparse.Namespace, core.multiarray.scalar, np.dtype]
    allowed += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    return allowed


@dataclass
class LoadedModel:
    """A model ready to score: module in eval mode on ``device`` plus everything that goes with it."""

    module: nn.Module
    arch: str
    classes: list[str]
    model_id: str  # sha256 hex of the checkpoint (or weights) file
    preprocess: PreprocessSpec
    device: torch.device
    source: str  # state_dict | training_checkpoint | torchscript | pickled_module | torchvision_weights

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def folded(self) -> LoadedModel:
        """This model with every Conv→BatchNorm pair folded into one conv (eval-mode inference only).

        Built once per loaded model and cached; the original ``module`` is left as it was. Folding
        is exact up to float rounding (about 1e-5 on logits); it saves the BatchNorm pass over every
        activation. A module that cannot be traced by ``torch.fx`` (TorchScript, some pickled
        modules) is returned unchanged. See benchmarks/NOTES.md for what it gives.
        """
        with _LOCK:
            cached = _FOLDED.get(id(self))
            if cached is None or cached[0] is not self.module:
                cached = (self.module, fold_conv_bn(self.module))
                _FOLDED[id(self)] = cached
        return replace(self, module=cached[1])

    def info(self) -> dict:
        """JSON-ready description for manifests and Parquet metadata."""
        return {
            "arch": self.arch,
            "model_id": self.model_id,
            "classes": self.classes,
            "num_classes": self.num_classes,
            "source": self.source,
            "preprocess": self.preprocess.to_dict(),
        }


_SHA_CACHE: dict[tuple, str] = {}
_MODEL_CACHE: dict[tuple, LoadedModel] = {}
_FOLDED: dict[int, tuple[nn.Module, nn.Module]] = {}  # id(LoadedModel) → (module, folded module)
_LOCK = threading.Lock()


def fold_conv_bn(module: nn.Module) -> nn.Module:
    """A copy of ``module`` (eval mode) with each Conv→BatchNorm pair folded into the conv.

    Uses ``torch.fx`` (``torch.fx.experimental.optimization.fuse``), which follows the real
    dataflow and folds only a conv whose sole user is the BatchNorm. The copy keeps the memory
    format of the input module's weights. Modules ``torch.fx`` cannot trace are returned as they
    are (TorchScript archives are already frozen graphs).
    """
    if isinstance(module, torch.jit.ScriptModule) or module.training:
        return module
    from torch.fx.experimental.optimization import fuse

    channels_last = any(
        p.ndim == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
        for p in module.parameters()
    )
    try:
        out = fuse(module, inplace=False)
    except Exception as exc:  # not traceable (data-dependent control flow): unfolded, exactly as loaded
        logging.getLogger("imgscore").info("conv-BN folding not applied (%s: %s); scoring the module as loaded",
                                           type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return module
    return out.to(memory_format=torch.channels_last) if channels_last else out


def file_sha256(path: str | Path) -> str:
    """sha256 hex digest of a file, cached per (path, size, mtime) in this process."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = sha256_of_file(path)
    return _SHA_CACHE[key]


def check_arch(arch: str) -> None:
    """Raise :class:`ModelError` with close matches when ``arch`` is no torchvision classifier."""
    names = torchvision.models.list_models(module=torchvision.models)
    if arch not in names:
        close = difflib.get_close_matches(arch, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ModelError(
            f"unknown model.arch {arch!r}{hint} (see torchvision.models.list_models(module=torchvision.models))"
        )


def strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove ``module.`` / ``_orig_mod.`` prefixes, repeatedly, while every key has one."""
    sd = dict(state_dict)
    changed = True
    while changed and sd:
        changed = False
        for p in PREFIXES:
            if all(k.startswith(p) for k in sd):
                sd = {k[len(p):]: v for k, v in sd.items()}
                changed = True
    return sd


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return any(n.endswith("constants.pkl") for n in names) and any("/code/" in n for n in names)


def _read_classes(spec: Path | list[str] | None) -> list[str] | None:
    if spec is None:
        return None
    if isinstance(spec, list):
        return [str(c) for c in spec]
    p = Path(spec)
    if not p.is_file():
        raise ModelError(f"model.classes file {str(p)!r} does not exist; give a file with one class name a line, or an inline list")
    return [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def _head_size(arch: str, sd: dict[str, torch.Tensor]) -> int | None:
    """Number of classes the checkpoint's head was trained for.

    Builds ``arch`` on the meta device (no memory, no init cost), finds the last entry of its
    default 1000-class state_dict whose first dimension is 1000 (the classifier), and reads that
    entry's size from ``sd``.
    """
    with torch.device("meta"):
        ref = torchvision.models.get_model(arch)
    head_keys = [k for k, v in ref.state_dict().items() if v.ndim >= 1 and v.shape[0] == 1000]
    for k in reversed(head_keys):
        if k in sd and hasattr(sd[k], "shape") and len(sd[k].shape) >= 1:
            return int(sd[k].shape[0])
    return None


def _load_state_dict_strict(module: nn.Module, sd: dict[str, torch.Tensor], where: str) -> None:
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in sd and hasattr(sd[k], "shape") and tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:5])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:5])})")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches (e.g. {'; '.join(mismatched[:3])})")
        raise ModelError(
            f"{where} does not match model.arch: {'; '.join(parts)}. "
            "Check model.arch (and model.num_classes); a partial load would score with random weights"
        )
    if not any(t.is_meta for t in own.values()):
        module.load_state_dict(sd, strict=True)
        return
    # Built on the meta device (no random init): take the checkpoint's tensors as they are, cast
    # to the dtype the module declares — what copying into an initialised module would give.
    sd = {k: (v.to(own[k].dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != own[k].dtype else v) for k, v in sd.items()}
    module.load_state_dict(sd, strict=True, assign=True)


def _build_from_state_dict(arch: str, n: int, sd: dict[str, torch.Tensor], where: str) -> nn.Module:
    """``torchvision.models.get_model(arch, num_classes=n)`` holding ``sd``'s weights.

    Built on the meta device, so torchvision's random initialisation of weights that the checkpoint
    replaces anyway is skipped: resnet50's build and load took 0.33-0.38 s, now 0.09-0.11 s on
    this 2-core machine, with identical logits. A module
    that would keep any meta tensor after the load (a buffer the checkpoint does not carry) is
    built again the ordinary way.

    Raises:
        ModelError: missing, unexpected or mis-shaped keys (:func:`_load_state_dict_strict`).
    """
    with torch.device("meta"):
        module = torchvision.models.get_model(arch, num_classes=n)
    _load_state_dict_strict(module, sd, where)
    if any(t.is_meta for t in (*module.parameters(), *module.buffers())):
        module = torchvision.models.get_model(arch, num_classes=n)
        _load_state_dict_strict(module, sd, where)
    return module


def _torch_load(path: Path, trust: bool):
    """``torch.load`` with weights_only=True and the allow-list; full unpickling only if trusted."""
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:
            names = []
        with open(path, "rb") as f:
            legacy_pickle = f.read(1) == b"\x80"  # torch.save(..., _use_new_zipfile_serialization=False)
        if not names and not zipfile.is_zipfile(path) and not legacy_pickle:
            # Not pickled objects at all (a text file, a truncated legacy file): never advise trust.
            raise ModelError(
                f"model.checkpoint {str(path)!r} is not a readable PyTorch file ({str(exc).splitlines()[-1][:120]}); "
                "point model.checkpoint at a file written by torch.save or torch.jit.save"
            ) from None
        if trust:
            try:
                return torch.load(path, map_location="cpu", weights_only=False)
            except Exception as exc2:
                raise ModelError(
                    f"model.checkpoint {str(path)!r} could not be unpickled even with model.trust_checkpoint=true: "
                    f"{type(exc2).__name__}: {exc2}"
                ) from None
        names = sorted(names, key=lambda n: (n.startswith(("torch.", "collections.", "builtins.")), n))
        what = ", ".join(names[:5]) + (", …" if len(names) > 5 else "") if names else str(exc).splitlines()[0][:200]
        raise ModelError(
            f"model.checkpoint {str(path)!r} holds pickled Python objects ({what}); loading it runs code "
            "from the file. Set model.trust_checkpoint=true if you trust this file, or re-save it as "
            "a state_dict: torch.save(model.state_dict(), path)"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ModelError(f"model.checkpoint {str(path)!r} is not a readable PyTorch file: {type(exc).__name__}: {exc}") from None


def _resolve_preprocess(cfg: PreprocessConfig, base: dict | None) -> PreprocessSpec:
    base = base or {}
    return PreprocessSpec(
        resize=cfg.resize or base.get("resize", DEFAULT_RESIZE),
        crop=cfg.crop or base.get("crop", DEFAULT_CROP),
        mean=tuple(cfg.mean or base.get("mean", IMAGENET_MEAN)),
        std=tuple(cfg.std or base.get("std", IMAGENET_STD)),
        interpolation=cfg.interpolation or base.get("interpolation", "bilinear"),
        background=tuple(cfg.background),
        jpeg_draft=cfg.jpeg_draft,
        max_aspect_ratio=cfg.max_aspect_ratio,
        value_range=tuple(cfg.value_range) if cfg.value_range is not None else None,
        non_finite=cfg.non_finite,
        color_manage=cfg.color_manage,
    )


def _weights_file(arch: str, name: str):
    try:
        enum = torchvision.models.get_model_weights(arch)
    except (ValueError, KeyError):
        raise ModelError(f"model.arch {arch!r} has no torchvision weights") from None
    valid = ["DEFAULT", *enum.__members__]
    short = name.split(".")[-1]
    if short not in valid:
        raise ModelError(f"model.weights {name!r} is not a weights name for {arch}; valid: {', '.join(valid)}")
    weights = enum.DEFAULT if short == "DEFAULT" else enum[short]
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    fname = os.path.basename(weights.url)
    return weights, folder / fname


def _probe_num_classes(module: nn.Module, crop: int) -> int:
    with torch.inference_mode():
        out = module(torch.zeros(1, 3, crop, crop))
    if isinstance(out, (tuple, list)):
        out = out[0]
    return int(out.shape[-1])


def _build(cfg: ModelConfig, pre: PreprocessConfig) -> LoadedModel:
    check_arch(cfg.arch)
    cfg_classes = _read_classes(cfg.classes)

    if cfg.weights is not None:
        weights, path = _weights_file(cfg.arch, cfg.weights)
        if not path.is_file():
            raise ModelError(
                f"model.weights {cfg.weights} for {cfg.arch} is not in the local torch hub cache: expected "
                f"{path.name} in {path.parent} (no download is attempted). Copy the file there from a "
                "machine with internet, or set TORCH_HOME to a folder that has checkpoints/" + path.name
            )
        t = weights.transforms()
        base = {
            "resize": int(t.resize_size[0]),
            "crop": int(t.crop_size[0]),
            "mean": tuple(t.mean),
            "std": tuple(t.std),
            "interpolation": t.interpolation.value,
        }
        categories = list(weights.meta.get("categories") or [])
        # torchvision reads the cached file itself (load_state_dict_from_url downloads only when absent).
        module = torchvision.models.get_model(cfg.arch, weights=weights)
        classes = cfg_classes or categories
        if len(classes) != len(categories):
            raise ModelError(
                f"model.classes has {len(classes)} names but weights {cfg.weights} have {len(categories)} classes"
            )
        return LoadedModel(module, cfg.arch, classes, file_sha256(path), _resolve_preprocess(pre, base), torch.device("cpu"), "torchvision_weights")

    if cfg.checkpoint is None:
        raise ModelError("set model.checkpoint (a local checkpoint file) or model.weights (e.g. IMAGENET1K_V2)")
    path = Path(cfg.checkpoint)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise ModelError(f"model.checkpoint {str(path)!r} {what}; point it at a local .pt/.pth file")
    model_id = file_sha256(path)
    spec = _resolve_preprocess(pre, None)

    if _is_torchscript(path):
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise ModelError(f"model.checkpoint {str(path)!r} is a TorchScript archive that failed to load: {exc}") from None
        n = _probe_num_classes(module, spec.crop)
        source = "torchscript"
        ckpt_classes = None
    else:
        obj = _torch_load(path, cfg.trust_checkpoint)
        ckpt_classes = None
        source = "state_dict"
        if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
            key = next((k for k in STATE_DICT_KEYS if k in obj), None)
            if key is None:
                raise ModelError(
                    f"model.checkpoint {str(path)!r} is a dict without weights: no key among "
                    f"{', '.join(STATE_DICT_KEYS)} (found: {', '.join(map(str, list(obj)[:10]))})"
                )
            c = obj.get("classes")
            if isinstance(c, (list, tuple)) and all(isinstance(x, str) for x in c):
                ckpt_classes = list(c)
            obj = obj[key]
            source = "training_checkpoint"
        if isinstance(obj, nn.Module):  # only reachable when trusted
            module = obj
            n = _probe_num_classes(module, spec.crop)
            source = "pickled_module"
        elif isinstance(obj, dict):
            sd = strip_prefixes(obj)
            n = _head_size(cfg.arch, sd)
            if n is None:  # keys of another arch: the strict load below lists what differs
                n = cfg.num_classes or 1000
            elif cfg.num_classes is not None and cfg.num_classes != n:
                raise ModelError(f"model.num_classes={cfg.num_classes} but the checkpoint's head has {n} classes")
            module = _build_from_state_dict(cfg.arch, n, sd, f"model.checkpoint {str(path)!r}")
        else:
            raise ModelError(f"model.checkpoint {str(path)!r} holds a {type(obj).__name__}, not weights")

    classes = cfg_classes or ckpt_classes or [str(i) for i in range(n)]
    if len(classes) != n:
        raise ModelError(
            f"model.classes has {len(classes)} names but the model has {n} outputs; "
            "give one class name per output, in output order"
        )
    return LoadedModel(module, cfg.arch, classes, model_id, spec, torch.device("cpu"), source)


def load_model(cfg: ModelConfig, pre: PreprocessConfig, device: torch.device, channels_last: bool = True) -> LoadedModel:
    """Build the configured model in eval mode on ``device``, once per process.

    The weights are read to CPU memory first (``map_location="cpu"``, so a checkpoint saved on
    ``cuda:0`` loads on a CPU-only machine) and the module is then moved to ``device``. Later
    calls with the same config and device return the cached object (one load per worker process,
    never per shard or batch).

    Raises:
        ModelError: unknown arch, missing file, pickled module without trust, key/shape
            mismatch, head size disagreeing with ``num_classes`` or ``classes``, weights not in the
            local hub cache.
    """
    ck = cfg.checkpoint
    stamp = None
    if ck is not None and Path(ck).is_file():
        st = os.stat(ck)
        stamp = (str(Path(ck).resolve()), st.st_size, st.st_mtime_ns)
    key = (cfg.model_dump_json(), pre.model_dump_json(), stamp, str(device), channels_last)
    with _LOCK:
        hit = _MODEL_CACHE.get(key)
        if hit is not None:
            return hit
        lm = _build(cfg, pre)
        module = lm.module.eval().to(device)
        if channels_last and not isinstance(module, torch.jit.ScriptModule):
            module = module.to(memory_format=torch.channels_last)
        lm.module = module
        lm.device = device
        _MODEL_CACHE[key] = lm
        return lm


def clear_model_cache() -> None:
    """Forget loaded models (tests; long-lived processes after a checkpoint changes)."""
    with _LOCK:
        _MODEL_CACHE.clear()
        _FOLDED.clear()
