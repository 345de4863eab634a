"""Load a torchvision classifier from storage, together with its transform, classes and id.

One :class:`LoadedModel` carries the module, its eval transform (:class:`PreprocessSpec`), its
class names and its fingerprint (``model_id``), like torchvision's ``Weights`` objects do, so
scoring code can never pair a model with the wrong transform or label list.

What a checkpoint file may hold, and how it is read, is in :mod:`imgscore.inference.checkpoint`
(safetensors, TorchScript, ``torch.save`` state_dicts and training-checkpoint dicts, pickled
modules only when trusted). Here the weights meet a module:

- the module is torchvision's builder for ``model.arch`` (its head sized from the checkpoint), or
  whatever ``model.factory`` (``"package.module:function"``) returns;
- a uniform key prefix (``module.``, ``_orig_mod.``, Lightning's ``model.``, ``net.``, …,
  stacked) is stripped when that makes the keys fit the module
  (:func:`imgscore.inference.checkpoint.strip_prefix`);
- the weights load strictly: accepted exactly when ``load_state_dict(strict=True)`` accepts them
  (so BatchNorm ``num_batches_tracked`` may be absent from pre-0.4 files, as PyTorch allows);
  anything else is refused with the file described and the one fix that applies (a replaced
  head → ``model.factory`` or TorchScript; another architecture → the ``model.arch`` that fits).
"""

from __future__ import annotations

import difflib
import functools
import importlib
import logging
import os
import re
import stat
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

import torch
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
from imgscore.images.scan import sha256_of_file
from imgscore.inference.checkpoint import (
    Checkpoint,
    first_components,
    matching_group,
    read_checkpoint,
    strip_prefix,
)
from imgscore.report.evaluate import nfc


@dataclass
class LoadedModel:
    """A model ready to score: module in eval mode on ``device`` plus everything that goes with it."""

    module: nn.Module
    arch: str
    classes: list[str]
    model_id: str  # sha256 hex of the checkpoint (or weights) file
    preprocess: PreprocessSpec
    device: torch.device
    source: str  # state_dict | training_checkpoint | safetensors | torchscript | pickled_module | torchvision_weights

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


def _read_classes(spec: Path | list[str] | None) -> list[str] | None:
    """``model.classes``: the inline list, or the file's non-blank lines (stripped; a UTF-8 byte order mark
    is not part of the first name), each in Unicode NFC: ``café`` typed with a combining accent is the
    same class as with a precomposed one, and the duplicate check sees it.

    Raises:
        ModelError: the file is missing, or a name is given twice (two outputs one label: the
            report would count them as one class); named with both items or lines.
    """
    if spec is None:
        return None
    if isinstance(spec, list):
        names = [nfc(str(c)) for c in spec]
        if (dup := first_duplicate(names)) is not None:
            name, i, j = dup
            raise ModelError(f"model.classes names {name!r} twice (items {i} and {j} of the list); "
                             "give each output its own name, in output order")
        return names
    p = Path(spec)
    if not p.is_file():
        raise ModelError(f"model.classes file {str(p)!r} does not exist; give a file with one class name a line, or an inline list")
    numbered = [(n, nfc(line.strip())) for n, line in enumerate(p.read_text(encoding="utf-8-sig").splitlines(), 1) if line.strip()]
    if (dup := first_duplicate([name for _, name in numbered])) is not None:
        name, i, j = dup
        raise ModelError(f"model.classes file {str(p)!r} names {name!r} twice (lines {numbered[i][0]} and {numbered[j][0]}); "
                         "give each output its own name, one a line in output order")
    return [name for _, name in numbered]


def first_duplicate(names: list[str]) -> tuple[str, int, int] | None:
    """The first name given twice in ``names``, with the positions of both, or None."""
    first: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in first:
            return name, first[name], i
        first[name] = i
    return None


def _build_arch(arch: str, num_classes: int | None = None, meta: bool = True) -> nn.Module:
    """``torchvision.models.get_model(arch)`` (with ``num_classes`` when given), on the meta device
    when ``meta`` (no memory, no random init) unless the builder computes with tensors while
    building (regnet sizes its blocks with torch ops), which is built on the CPU instead."""
    kw = {} if num_classes is None else {"num_classes": num_classes}
    if meta:
        try:
            with torch.device("meta"):
                return torchvision.models.get_model(arch, **kw)
        except (NotImplementedError, RuntimeError):
            pass
    return torchvision.models.get_model(arch, **kw)


@functools.lru_cache(maxsize=64)
def _reference_shapes(arch: str, meta_only: bool = False) -> dict[str, tuple[int, ...]] | None:
    """Key → shape of torchvision's default (1000-class) ``arch``; None when ``meta_only`` and it
    cannot be built on the meta device."""
    if meta_only:
        try:
            with torch.device("meta"):
                module = torchvision.models.get_model(arch)
        except (NotImplementedError, RuntimeError):
            return None
    else:
        module = _build_arch(arch)
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _head_keys(ref: dict[str, tuple[int, ...]]) -> list[str]:
    """The classifier's entries in a default 1000-class build: first dimension 1000."""
    return [k for k, shape in ref.items() if len(shape) >= 1 and shape[0] == 1000]


def _head_size(ref: dict[str, tuple[int, ...]], sd: dict[str, torch.Tensor]) -> int | None:
    """Number of classes the checkpoint's head was trained for: the size of the last classifier
    entry of the architecture (``ref``, :func:`_reference_shapes`) as ``sd`` holds it."""
    for k in reversed(_head_keys(ref)):
        if k in sd and hasattr(sd[k], "shape") and len(sd[k].shape) >= 1:
            return int(sd[k].shape[0])
    return None


def _guess_arch(arch: str, sd: dict[str, torch.Tensor]) -> str | None:
    """A torchvision architecture of ``arch``'s family (same leading letters: resnet18 … resnet152)
    whose keys and shapes, the head's size aside, are exactly ``sd``'s; None when none is.
    Only families that build on the meta device are tried (no memory, and fast: benchmarks/NOTES.md, "Models")."""
    family = re.match(r"[a-z]+", arch)
    if family is None:
        return None
    names = [n for n in torchvision.models.list_models(module=torchvision.models) if n.startswith(family.group()) and n != arch]
    for name in names[:16]:
        ref = _reference_shapes(name, meta_only=True)
        if ref is None or set(ref) != set(sd):
            continue
        head = set(_head_keys(ref))
        if all(k in head or tuple(getattr(sd[k], "shape", ())) == shape for k, shape in ref.items()):
            return name
    return None


def _cast_like(sd, own: dict[str, torch.Tensor]):
    """``sd`` with floating tensors cast to the dtype ``own`` declares for them (what copying into
    an initialised module gives), keeping ``_metadata`` (module versions) for the load."""
    out = OrderedDict(
        (k, v.to(own[k].dtype) if k in own and isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != own[k].dtype else v)
        for k, v in sd.items()
    )
    meta = getattr(sd, "_metadata", None)
    if meta is not None:
        out._metadata = meta
    return out


def _load_strict(module: nn.Module, sd, ck: Checkpoint, target: str, arch: str | None) -> None:
    """Load ``sd`` into ``module`` exactly when ``module.load_state_dict(sd, strict=True)`` would
    accept it (missing BatchNorm ``num_batches_tracked`` of pre-0.4 files included); modules on
    the meta device take the tensors (``assign=True``), cast to their declared dtype.

    Raises:
        ModelError: missing, unexpected or mis-shaped keys, with the file described and the fix
            (:func:`_mismatch_error`).
    """
    own = module.state_dict()
    mismatched = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in sd and hasattr(sd[k], "shape") and tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    if mismatched:  # load_state_dict would raise on these; list keys the way it would
        legacy = getattr(sd, "_metadata", None) is None
        missing = [k for k in own if k not in sd and not (legacy and k.endswith("num_batches_tracked"))]
        unexpected = [k for k in sd if k not in own]
    else:
        assign = any(t.is_meta for t in own.values())
        result = module.load_state_dict(_cast_like(sd, own) if assign else sd, strict=False, assign=assign)
        missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
        if not missing and not unexpected:
            return
    raise _mismatch_error(ck, sd, set(own), target, arch, missing, unexpected, mismatched)


def _mismatch_error(ck: Checkpoint, sd, expected: set[str], target: str, arch: str | None,
                    missing: list[str], unexpected: list[str], mismatched: list[str]) -> ModelError:
    """The refusal for weights that do not fit: what differs, and the one fix that applies."""
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:5])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:5])})")
    if mismatched:
        parts.append(f"{len(mismatched)} shape mismatches (e.g. {'; '.join(mismatched[:3])})")
    groups = ", ".join(f"{p} ({n})" for p, n in first_components(sd).most_common(5))
    problem = f"its weights do not fit {target}: {'; '.join(parts)}; checkpoint keys by first name: {groups}"
    random = "; a partial load would score with random weights"
    differing = [*missing, *unexpected, *(m.split(":", 1)[0] for m in mismatched)]
    heads = {k.split(".", 1)[0] for k in _head_keys(_reference_shapes(arch))} if arch else set()
    group = matching_group(ck.state_dict, expected)
    if heads and differing and all(k.split(".", 1)[0] in heads for k in differing) and unexpected:
        head = sorted(heads)[0]
        return ck.refuse(
            f"its classifier head ({head}) is not {arch}'s: {arch} has {', '.join(missing[:4]) or '-'}, the checkpoint has "
            f"{', '.join(unexpected[:4])} (a replaced head, such as nn.Sequential(nn.Dropout(p), nn.Linear(...)))",
            "Build that module in code and set model.factory: 'package.module:function' to it (docs/checkpoints.md, 'Custom "
            "architectures'), or save the model as TorchScript (torch.jit.script(model).save(path)) and point "
            "model.checkpoint at that file",
        )
    if group is not None:
        return ck.refuse(
            f"its keys are not all under one prefix ({groups}); the keys under {group!r} alone fit {target}",
            f"Save those alone and point model.checkpoint at the new file: torch.save({{k.removeprefix({group!r}): v "
            f"for k, v in sd.items() if k.startswith({group!r})}}, 'weights.pt')",
        )
    if arch is None:
        return ck.refuse(problem + random, "Make model.factory build the architecture this checkpoint was trained with")
    guess = _guess_arch(arch, sd)
    if guess is not None:
        return ck.refuse(problem + random, f"Its keys and shapes are torchvision's {guess}: set model.arch={guess}")
    return ck.refuse(
        problem + random,
        "Check model.arch (and model.num_classes): set it to the architecture the checkpoint was trained with, or "
        "set model.factory ('package.module:function') for one torchvision does not build",
    )


def _build_from_state_dict(arch: str, num_classes: int | None, ck: Checkpoint) -> tuple[nn.Module, int]:
    """``torchvision.models.get_model(arch, num_classes=n)`` holding the checkpoint's weights;
    ``n`` is read from the checkpoint's head (or ``num_classes``, which must agree).

    Built on the meta device, so torchvision's random initialisation of weights that the checkpoint
    replaces anyway is skipped: most of the build and load time, with identical logits
    (benchmarks/NOTES.md, "Models"). A module that would keep any meta tensor after
    the load (a buffer the checkpoint does not carry) is built again the ordinary way.

    Raises:
        ModelError: a head size other than ``num_classes``; weights that do not fit
            (:func:`_load_strict`).
    """
    ref = _reference_shapes(arch)
    sd, ck.prefix = strip_prefix(ck.state_dict, set(ref))
    n = _head_size(ref, sd)
    if n is None:  # keys of another arch: the strict load below lists what differs
        n = num_classes or 1000
    elif num_classes is not None and num_classes != n:
        raise ck.refuse(f"model.num_classes={num_classes} but the checkpoint's head has {n} classes", "Unset model.num_classes, or set it to " + str(n))
    module = _build_arch(arch, n)
    _load_strict(module, sd, ck, arch, arch)
    if any(t.is_meta for t in (*module.parameters(), *module.buffers())):
        module = _build_arch(arch, n, meta=False)
        _load_strict(module, sd, ck, arch, arch)
    return module, n


def call_factory(spec: str) -> nn.Module:
    """Import ``"package.module:function"`` (``model.factory``), call it with no arguments and
    return the ``nn.Module`` it builds.

    Raises:
        ModelError: the module cannot be imported, has no such function, the call raises, or it
            returns something other than an ``nn.Module``.
    """
    mod_name, _, fn_name = spec.partition(":")
    try:
        mod = importlib.import_module(mod_name.strip())
    except ImportError as exc:
        hint = ""
        if "" not in sys.path and os.getcwd() not in sys.path:
            hint = " (the current folder is not on sys.path: run with PYTHONPATH=. or install the package)"
        raise ModelError(
            f"model.factory {spec!r}: cannot import {mod_name!r} ({type(exc).__name__}: {exc}){hint}; the module must be "
            "importable on every machine that scores"
        ) from None
    except Exception as exc:
        raise ModelError(f"model.factory {spec!r}: importing {mod_name!r} raised {type(exc).__name__}: {exc}") from None
    fn = getattr(mod, fn_name.strip(), None)
    if not callable(fn):
        close = difflib.get_close_matches(fn_name, [n for n in dir(mod) if not n.startswith("_") and callable(getattr(mod, n))], n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ModelError(f"model.factory {spec!r}: {mod_name} has no function {fn_name!r}{hint}")
    try:
        module = fn()
    except Exception as exc:
        raise ModelError(f"model.factory {spec!r} raised {type(exc).__name__}: {exc}") from None
    if not isinstance(module, nn.Module):
        raise ModelError(f"model.factory {spec!r} returned a {type(module).__name__}, not a torch.nn.Module")
    return module


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


_SPECIAL_FILES = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def not_a_file(path: Path) -> str:
    """Why ``path`` (not a regular file) cannot be a checkpoint, and the fix: a clause that
    follows the quoted path. Looks at the path with ``stat`` only, never opens it (opening a FIFO
    for reading blocks until a writer comes)."""
    fix = "point it at a local checkpoint file (.pt, .pth, .ckpt, .safetensors)"
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if path.is_symlink():
            return f"is a symbolic link to {os.readlink(path)!r}, which does not exist; {fix}"
        return f"does not exist; {fix}"
    except OSError as exc:
        return f"cannot be read ({exc.strerror}); {fix}"
    if stat.S_ISDIR(mode):
        return f"is a folder, not a file; {fix}"
    kind = next((what for test, what in _SPECIAL_FILES if test(mode)), f"a special file (mode {stat.filemode(mode)})")
    via = f" (a process substitution or an inherited file descriptor: {os.path.realpath(path)})" if str(path).startswith(("/dev/fd/", "/proc/")) else ""
    return (f"is not a regular file: it is {kind}{via}, which can be read only once and not seeked, while the checkpoint is "
            "read by every scoring process; copy it to a file first (e.g. cat PATH > model.pt) and point model.checkpoint at that file")


def _probe_num_classes(module: nn.Module, crop: int) -> int:
    """Output size of ``module`` (put in eval mode) for one zero image of ``crop`` pixels."""
    module.eval()
    with torch.inference_mode():
        out = module(torch.zeros(1, 3, crop, crop))
    if isinstance(out, (tuple, list)):
        out = out[0]
    return int(out.shape[-1])


def _build(cfg: ModelConfig, pre: PreprocessConfig) -> LoadedModel:
    if cfg.factory is None:
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
        raise ModelError(f"model.checkpoint {str(path)!r} {not_a_file(path)}")
    model_id = file_sha256(path)
    spec = _resolve_preprocess(pre, None)
    ck = read_checkpoint(path, cfg.trust_checkpoint)

    if ck.module is not None:  # TorchScript, or a trusted pickled module
        if cfg.factory is not None:
            raise ck.refuse(f"model.factory ({cfg.factory}) is set, but this file carries its own module", "Unset model.factory")
        module = ck.module
        n = _probe_num_classes(module, spec.crop)
    elif cfg.factory is not None:
        module = call_factory(cfg.factory)
        sd, ck.prefix = strip_prefix(ck.state_dict, set(module.state_dict()))
        _load_strict(module, sd, ck, f"the module model.factory ({cfg.factory}) returns", None)
        n = _probe_num_classes(module, spec.crop)
        if cfg.num_classes is not None and cfg.num_classes != n:
            raise ck.refuse(f"model.num_classes={cfg.num_classes} but the module model.factory returns has {n} outputs", f"Unset model.num_classes, or set it to {n}")
    else:
        module, n = _build_from_state_dict(cfg.arch, cfg.num_classes, ck)

    if cfg_classes is None and ck.classes and (dup := first_duplicate(ck.classes)) is not None:
        raise ck.refuse(f"its class list names {dup[0]!r} twice (outputs {dup[1]} and {dup[2]})",
                        "Set model.classes to the names in output order, each once")
    classes = cfg_classes or ck.classes or [str(i) for i in range(n)]
    if len(classes) != n:
        if cfg_classes is None:
            raise ck.refuse(f"it names {len(classes)} classes but the model has {n} outputs", "Set model.classes to one name per output, in output order")
        raise ModelError(
            f"model.classes has {len(classes)} names but the model has {n} outputs; "
            "give one class name per output, in output order"
        )
    return LoadedModel(module, cfg.factory or cfg.arch, classes, model_id, spec, torch.device("cpu"), ck.kind)


PROBE_IMAGES = 2  # random images in the output probe: a model refused must fail on every one of them
PROBE_SEED = 0


def _model_source(cfg: ModelConfig) -> str:
    """Where the model's weights come from, as the config names it (for refusals)."""
    if cfg.weights is not None:
        return f"model.weights {cfg.weights}"
    if cfg.checkpoint is not None:
        return f"model.checkpoint {str(cfg.checkpoint)!r}"
    return f"model.factory {cfg.factory!r}"


def check_finite_weights(module: nn.Module, name: str, source: str) -> None:
    """Refuse a module any of whose floating parameters or buffers holds NaN or Inf: every
    image it scored would be an error row (a checkpoint saved after training diverged).

    Raises:
        ModelError: naming the model, how many tensors are non-finite and the first few.
    """
    tensors = [(k, t) for k, t in (*module.named_parameters(), *module.named_buffers()) if t.is_floating_point()]
    bad = []
    for k, t in tensors:
        if not bool(torch.isfinite(t).all()):
            nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            bad.append(f"{k}: " + ", ".join(f"{n} {w}" for n, w in ((nan, "NaN"), (inf, "Inf")) if n) + f" of {t.numel()}")
    if bad:
        raise ModelError(
            f"model {name} ({source}) has non-finite weights: {len(bad)} of its {len(tensors)} weight tensors hold NaN or Inf "
            f"(e.g. {'; '.join(bad[:3])}), so every image would be recorded as an error; refused before scoring. "
            "Point the config at a checkpoint saved before training diverged (a NaN loss), or retrain the model"
        )


def check_finite_outputs(lm: LoadedModel, name: str, source: str) -> None:
    """Refuse a model whose probabilities are NaN or Inf for every one of :data:`PROBE_IMAGES`
    seeded random images (pixels uniform in [0, 1], normalised with the model's mean/std, float32
    [N, 3, crop, crop] on its device): such a model would blame each image. One forward pass at
    load; a model that is finite on any probe image is accepted (per-image non-finite outputs
    stay per-image error rows).

    Raises:
        ModelError: naming the model and what its outputs were.
    """
    crop = lm.preprocess.crop
    g = torch.Generator().manual_seed(PROBE_SEED)
    x = torch.rand(PROBE_IMAGES, 3, crop, crop, generator=g)
    x = (x - torch.tensor(lm.preprocess.mean).view(1, 3, 1, 1)) / torch.tensor(lm.preprocess.std).view(1, 3, 1, 1)
    x = x.to(lm.device)
    if any(p.is_contiguous(memory_format=torch.channels_last) and p.ndim == 4 and not p.is_contiguous() for p in lm.module.parameters()):
        x = x.contiguous(memory_format=torch.channels_last)
    try:
        with torch.inference_mode():
            raw = lm.module(x)
    except Exception:  # a module that cannot take this input: scoring will say so per batch
        return
    raw = raw[0] if isinstance(raw, (tuple, list)) else raw
    probs = torch.softmax(raw.float(), dim=1) if raw.ndim == 2 else raw  # as scoring turns logits into probabilities
    if probs.ndim != 2 or bool(torch.isfinite(probs).all(dim=1).any()):
        return
    what = ", ".join(w for w, f in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)) if bool(f(raw).any()))
    raise ModelError(
        f"model {name} ({source}) gives non-finite outputs for every input: its logits hold {what or 'values whose softmax is NaN'} "
        f"for all {PROBE_IMAGES} probe images ({crop}x{crop} random pixels), so every image would be recorded as an error; "
        "refused before scoring. Its weights are finite: look for an overflow in its forward (a layer whose activations exceed "
        "float32, a division by zero), or point the config at another checkpoint"
    )


def load_model(cfg: ModelConfig, pre: PreprocessConfig, device: torch.device, channels_last: bool = True) -> LoadedModel:
    """Build the configured model in eval mode on ``device``, once per process.

    The weights are read to CPU memory first (``map_location="cpu"``, so a checkpoint saved on
    ``cuda:0`` loads on a CPU-only machine) and the module is then moved to ``device``. Later
    calls with the same config and device return the cached object (one load per worker process,
    never per shard or batch).

    A model that is wrong as a whole is refused here, before anything is scored: NaN or Inf in
    its weights (:func:`check_finite_weights`), or non-finite outputs for every probe image
    (:func:`check_finite_outputs`).

    Raises:
        ModelError: unknown arch, missing file, pickled module without trust, key/shape
            mismatch, head size disagreeing with ``num_classes`` or ``classes``, weights not in the
            local hub cache, non-finite weights or outputs.
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
        name, source = cfg.resolved_name, _model_source(cfg)
        check_finite_weights(module, name, source)
        check_finite_outputs(lm, name, source)
        _MODEL_CACHE[key] = lm
        return lm


def clear_model_cache() -> None:
    """Forget loaded models (tests; long-lived processes after a checkpoint changes)."""
    with _LOCK:
        _MODEL_CACHE.clear()
        _FOLDED.clear()
