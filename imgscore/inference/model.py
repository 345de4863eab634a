"""Load a torchvision classifier from storage, together with its transform, classes and id.

One :class:`LoadedModel` carries the module, its eval transform (:class:`PreprocessSpec`), its
class names and its fingerprint (``model_id``), like torchvision's ``Weights`` objects do, so
scoring code can never pair a model with the wrong transform or label list. :func:`load_model`
builds it once per process:

- what a checkpoint file may hold, and how it is read: :mod:`imgscore.inference.checkpoint`
  (safetensors, TorchScript, ``torch.save`` state_dicts and training-checkpoint dicts, torch.export
  programs and pickled modules only when trusted);
- the module the weights load into, and the strict load: :mod:`imgscore.inference.architecture`;
- the class names: :mod:`imgscore.inference.class_names`;
- the refusal of a model wrong as a whole (non-finite weights or outputs):
  :mod:`imgscore.inference.model_checks`.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.fx
import torchvision
from torch import nn

from imgscore.config.scoring import ModelConfig, PreprocessConfig
from imgscore.errors import ModelError
from imgscore.images.preprocess import (
    DEFAULT_CROP,
    DEFAULT_RESIZE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PreprocessSpec,
)
from imgscore.inference.architecture import check_arch, module_for, weights_file
from imgscore.inference.checkpoint import not_a_file, read_checkpoint
from imgscore.inference.class_names import first_duplicate, read_classes
from imgscore.inference.exported import ExportedProgramModule
from imgscore.inference.model_checks import check_finite_outputs, check_finite_weights
from imgscore.io import fetched
from imgscore.io.file_ops import sha256_of_file


@dataclass
class LoadedModel:
    """A model ready to score: module in eval mode on ``device`` plus everything that goes with it."""

    module: nn.Module
    arch: str
    classes: list[str]
    model_id: str  # sha256 hex of the checkpoint (or weights) file
    preprocess: PreprocessSpec
    device: torch.device
    # state_dict | training_checkpoint | safetensors | torchscript | torch_export | pickled_module | torchvision_weights
    source: str
    checkpoint: dict[str, str] | None = None  # a fetched model.checkpoint: url, identity, sha256 (the run's pin)

    @property
    def num_classes(self) -> int:
        """C, the number of outputs (one class name each)."""
        return len(self.classes)

    def folded(self) -> LoadedModel:
        """This model with every Conv→BatchNorm pair folded into one conv (eval-mode inference only).

        Built once per loaded model and cached; the original ``module`` is left as it was. Folding
        is exact up to float rounding (about 1e-5 on logits); it saves the BatchNorm pass over every
        activation. A module that cannot be traced by ``torch.fx`` (TorchScript, some pickled
        modules) and a torch.export program are returned unchanged. See benchmarks/NOTES.md for what it gives.
        """
        with _LOCK:
            cached = _FOLDED.get(id(self))
            if cached is None or cached[0] is not self.module:
                cached = (self.module, fold_conv_bn(self.module))
                _FOLDED[id(self)] = cached
        return replace(self, module=cached[1])

    def info(self) -> dict[str, Any]:
        """JSON-ready description for manifests and Parquet metadata."""
        return {
            "arch": self.arch,
            "model_id": self.model_id,
            "classes": self.classes,
            "num_classes": self.num_classes,
            "source": self.source,
            "preprocess": self.preprocess.to_dict(),
            **({"checkpoint": self.checkpoint} if self.checkpoint else {}),
        }


# A file's (resolved path, size, mtime ns): what a cached load or checksum of it stays valid for.
FileStamp = tuple[str, int, int]
_SHA_CACHE: dict[FileStamp, str] = {}
# (model config JSON, preprocess config JSON, checkpoint stamp, device, channels_last) → the loaded model
_MODEL_CACHE: dict[tuple[str, str, FileStamp | None, str, bool], LoadedModel] = {}
_FOLDED: dict[int, tuple[nn.Module, nn.Module]] = {}  # id(LoadedModel) → (module, folded module)
_LOCK = threading.Lock()


class _OneThreadTracer(torch.fx.Tracer):
    """``torch.fx``'s tracer, confined to the thread that traces.

    Why: while it traces, ``Tracer.trace`` patches ``nn.Module.__call__`` and ``__getattr__`` for
    the whole process. A forward in another thread (a shard scoring while a Dask worker's warm-up,
    or another model's load, folds) would then go through this tracer and fail with "module is not
    installed as a submodule", or get a Proxy for a parameter. Calls from other threads go
    straight to the module, as if nothing were patched.
    """

    def __init__(self) -> None:
        super().__init__()
        self._thread = threading.get_ident()

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        if threading.get_ident() != self._thread:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if threading.get_ident() != self._thread:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)


def fold_conv_bn(module: nn.Module) -> nn.Module:
    """A copy of ``module`` (eval mode) with each Conv→BatchNorm pair folded into the conv.

    Uses ``torch.fx`` (``torch.fx.experimental.optimization.fuse``), which follows the real
    dataflow and folds only a conv whose sole user is the BatchNorm. The trace is confined to the
    calling thread (:class:`_OneThreadTracer`): forwards in other threads run untouched meanwhile.
    The copy keeps the memory format of the input module's weights. Modules ``torch.fx`` cannot
    trace are returned as they are, and so are frozen graphs: TorchScript archives, and torch.export
    programs (ATen ops, no ``nn.Conv2d``/``nn.BatchNorm2d`` modules for ``fuse`` to find).
    """
    if isinstance(module, (torch.jit.ScriptModule, ExportedProgramModule)) or module.training:
        return module
    from torch.fx.experimental.optimization import fuse

    channels_last = any(
        p.ndim == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
        for p in module.parameters()
    )
    try:
        tracer = _OneThreadTracer()
        graph = tracer.trace(module)
        traced = torch.fx.GraphModule(tracer.root, graph, type(module).__name__)
        out = fuse(traced, inplace=False, no_trace=True)
    except Exception as exc:  # not traceable (data-dependent control flow): unfolded, exactly as loaded
        logging.getLogger("imgscore").info(
            "conv-BN folding not applied (%s: %s); scoring the module as loaded",
            type(exc).__name__,
            str(exc).splitlines()[0] if str(exc) else "",
        )
        return module
    return out.to(memory_format=torch.channels_last) if channels_last else out


def file_sha256(path: Path) -> str:
    """sha256 hex digest of a file, cached per (path, size, mtime) in this process."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = sha256_of_file(path)
    return _SHA_CACHE[key]


def _resolve_preprocess(cfg: PreprocessConfig, base: dict[str, Any] | None) -> PreprocessSpec:
    """The eval transform: ``preprocess.*`` where set, else ``base`` (a torchvision weights'
    ``transforms()``), else torchvision's classification reference recipe."""
    base = base or {}
    return PreprocessSpec(
        resize=cfg.resize or base.get("resize", DEFAULT_RESIZE),
        crop=cfg.crop or base.get("crop", DEFAULT_CROP),
        mean=tuple(cfg.mean or base.get("mean", IMAGENET_MEAN)),
        std=tuple(cfg.std or base.get("std", IMAGENET_STD)),
        interpolation=cfg.interpolation or base.get("interpolation", "bilinear"),
        background=cfg.background,
        jpeg_draft=cfg.jpeg_draft,
        max_aspect_ratio=cfg.max_aspect_ratio,
        value_range=cfg.value_range,
        non_finite=cfg.non_finite,
        color_manage=cfg.color_manage,
    )


def _build(cfg: ModelConfig, pre: PreprocessConfig, cache_dir: Path | None = None) -> LoadedModel:
    """The configured model on the CPU (:func:`load_model` moves it to its device and checks it).

    Raises:
        ModelError: see :func:`load_model`.
    """
    if cfg.factory is None:
        check_arch(cfg.arch)
    cfg_classes = read_classes(cfg.classes)
    if cfg.weights is not None:
        return _from_weights(cfg.arch, cfg.weights, cfg_classes, pre)
    return _from_checkpoint(cfg, cfg_classes, pre, cache_dir)


def _from_weights(arch: str, name: str, cfg_classes: list[str] | None, pre: PreprocessConfig) -> LoadedModel:
    """torchvision's ``arch`` with its weights ``name`` from the local torch hub cache, their
    transform under ``preprocess.*`` and their categories as classes (unless ``model.classes``)."""
    weights, path = weights_file(arch, name)
    if not path.is_file():
        raise ModelError(
            f"model.weights {name} for {arch} is not in the local torch hub cache: expected "
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
    module = torchvision.models.get_model(arch, weights=weights)
    classes = cfg_classes or categories
    if len(classes) != len(categories):
        raise ModelError(f"model.classes has {len(classes)} names but weights {name} have {len(categories)} classes")
    spec = _resolve_preprocess(pre, base)
    return LoadedModel(module, arch, classes, file_sha256(path), spec, torch.device("cpu"), "torchvision_weights")


def _from_checkpoint(
    cfg: ModelConfig, cfg_classes: list[str] | None, pre: PreprocessConfig, cache_dir: Path | None = None
) -> LoadedModel:
    """The module ``model.checkpoint`` holds or loads into (:func:`~.architecture.module_for`),
    with the class names the config or the file gives, one per output. A URL is read from the
    local model cache (``imgscore.io.fetched``), pinned by ``model.checkpoint_pin`` when set."""
    if cfg.checkpoint is None:
        raise ModelError("set model.checkpoint (a local checkpoint file) or model.weights (e.g. IMAGENET1K_V2)")
    pin = fetched.Pin.parse(cfg.checkpoint_pin) if cfg.checkpoint_pin else None
    copy = fetched.local_copy(
        cfg.checkpoint, fetched.cache_root(cache_dir) / "models", "model.checkpoint", pin, cfg.registry_uri
    )
    if cfg_classes is None and copy.classes is not None:  # the classes.txt registered with an MLflow model
        cfg_classes = read_classes(copy.classes)
    path = copy.path
    if not path.is_file():
        raise ModelError(f"model.checkpoint {str(path)!r} {not_a_file(path)}")
    model_id = copy.sha256 or file_sha256(path)
    pinned = {"url": copy.url, "identity": copy.identity, "sha256": model_id} if copy.identity is not None else None
    spec = _resolve_preprocess(pre, None)
    ck = read_checkpoint(path, cfg.trust_checkpoint)
    module, n = module_for(ck, cfg, spec.crop)
    if cfg_classes is None and ck.classes and (dup := first_duplicate(ck.classes)) is not None:
        raise ck.refuse(
            f"its class list names {dup[0]!r} twice (outputs {dup[1]} and {dup[2]})",
            "Set model.classes to the names in output order, each once",
        )
    classes = cfg_classes or ck.classes or [str(i) for i in range(n)]
    if len(classes) != n:
        if cfg_classes is None:
            raise ck.refuse(
                f"it names {len(classes)} classes but the model has {n} outputs",
                "Set model.classes to one name per output, in output order",
            )
        raise ModelError(
            f"model.classes has {len(classes)} names but the model has {n} outputs; "
            "give one class name per output, in output order"
        )
    return LoadedModel(module, cfg.factory or cfg.arch, classes, model_id, spec, torch.device("cpu"), ck.kind, pinned)


def _model_source(cfg: ModelConfig) -> str:
    """Where the model's weights come from, as the config names it (for refusals)."""
    if cfg.weights is not None:
        return f"model.weights {cfg.weights}"
    if cfg.checkpoint is not None:
        return f"model.checkpoint {str(cfg.checkpoint)!r}"
    return f"model.factory {cfg.factory!r}"


def load_model(
    cfg: ModelConfig,
    pre: PreprocessConfig,
    device: torch.device,
    channels_last: bool = True,
    cache_dir: Path | None = None,
) -> LoadedModel:
    """Build the configured model in eval mode on ``device``, once per process.

    The weights are read to CPU memory first (``map_location="cpu"``, so a checkpoint saved on
    ``cuda:0`` loads on a CPU-only machine) and the module is then moved to ``device``. Later
    calls with the same config and device return the cached object (one load per worker process,
    never per shard or batch). A ``model.checkpoint`` URL is fetched into ``cache_dir/models``
    (``inference.cache_dir``; default ``~/.cache/imgscore/models``) once per machine; unpinned, it
    is asked for its identity on each call, so a changed object is loaded again.

    A model that is wrong as a whole is refused here, before anything is scored: NaN or Inf in
    its weights (:func:`check_finite_weights`), or non-finite outputs for every probe image
    (:func:`check_finite_outputs`).

    Raises:
        ModelError: unknown arch, missing file, pickled module without trust, key/shape
            mismatch, head size disagreeing with ``num_classes`` or ``classes``, weights not in the
            local hub cache, non-finite weights or outputs.
    """
    # the pin is not in the key (the stamp holds its identity): a hit is used when its bytes are the pinned ones
    key = (
        cfg.model_dump_json(exclude={"checkpoint_pin"}),
        pre.model_dump_json(),
        _stamp(cfg),
        str(device),
        channels_last,
    )
    pinned_sha = fetched.Pin.parse(cfg.checkpoint_pin).sha256 if cfg.checkpoint_pin else None
    with _LOCK:
        hit = _MODEL_CACHE.get(key)
        if hit is not None and pinned_sha in (None, hit.model_id):
            return hit
        lm = _build(cfg, pre, cache_dir)
        module = lm.module.eval().to(device)
        if channels_last and not isinstance(module, torch.jit.ScriptModule):
            module = module.to(memory_format=torch.channels_last)
        lm.module = module
        lm.device = device
        name, source = cfg.resolved_name, _model_source(cfg)
        check_finite_weights(module, name, source)
        check_finite_outputs(module, lm.preprocess, device, name, source)
        _MODEL_CACHE[key] = lm
        return lm


def _stamp(cfg: ModelConfig) -> FileStamp | None:
    """What a cached load of ``cfg`` stays valid for: a local checkpoint's (path, size, mtime); a
    fetched one's pinned identity, else its identity now (one HEAD; an alias's version). The
    plan's unpinned load and the shards' pinned one of the same bytes share one entry."""
    ck = cfg.checkpoint
    if ck is None:
        return None
    if fetched.is_fetched(ck):
        pin = fetched.Pin.parse(cfg.checkpoint_pin) if cfg.checkpoint_pin else None
        identity = pin.identity if pin is not None and pin.identity else None
        identity = identity or fetched.identity_of(str(ck), "model.checkpoint", cfg.registry_uri)
        return (str(ck), 0, hash(identity))
    if Path(ck).is_file():
        st = os.stat(ck)
        return (str(Path(ck).resolve()), st.st_size, st.st_mtime_ns)
    return None


def clear_model_cache() -> None:
    """Forget loaded models (tests; long-lived processes after a checkpoint changes)."""
    with _LOCK:
        _MODEL_CACHE.clear()
        _FOLDED.clear()
