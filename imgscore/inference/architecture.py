"""The module a checkpoint's weights load into, and the strict load itself.

- the module is torchvision's builder for ``model.arch`` (its head sized from the checkpoint,
  built on the meta device: :func:`build_from_state_dict`), or whatever ``model.factory``
  (``"package.module:function"``) returns (:func:`call_factory`);
- a uniform key prefix (``module.``, ``_orig_mod.``, Lightning's ``model.``, ``net.``, …,
  stacked) is stripped when that makes the keys fit the module
  (:func:`imgscore.inference.state_dict.strip_prefix`);
- the weights load strictly: accepted exactly when ``load_state_dict(strict=True)`` accepts them
  (so BatchNorm ``num_batches_tracked`` may be absent from pre-0.4 files, as PyTorch allows);
  anything else is refused with the file described and the one fix that applies (a replaced
  head → ``model.factory`` or TorchScript; another architecture → the ``model.arch`` that fits).
"""

from __future__ import annotations

import difflib
import functools
import importlib
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models import WeightsEnum

from imgscore.config.scoring import ModelConfig
from imgscore.errors import ModelError
from imgscore.inference.checkpoint import Checkpoint
from imgscore.inference.exported import ExportedProgramModule
from imgscore.inference.state_dict import StateDict, first_components, matching_group, strip_prefix


def check_arch(arch: str) -> None:
    """Raise :class:`ModelError` with close matches when ``arch`` is no torchvision classifier."""
    names = torchvision.models.list_models(module=torchvision.models)
    if arch not in names:
        close = difflib.get_close_matches(arch, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ModelError(
            f"unknown model.arch {arch!r}{hint} (see torchvision.models.list_models(module=torchvision.models))"
        )


def _build_arch(arch: str, num_classes: int | None = None, meta: bool = True) -> nn.Module:
    """``torchvision.models.get_model(arch)`` (with ``num_classes`` when given), on the meta device
    when ``meta`` (no memory, no random init) unless the builder computes with tensors while
    building (regnet sizes its blocks with torch ops), which is built on the CPU instead."""
    kw: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    if meta:
        try:
            with torch.device("meta"):
                return torchvision.models.get_model(arch, **kw)
        except (NotImplementedError, RuntimeError):
            pass
    return torchvision.models.get_model(arch, **kw)


@functools.lru_cache(maxsize=64)
def _reference_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """Key → shape of torchvision's default (1000-class) ``arch`` (:func:`_build_arch`)."""
    return {k: tuple(v.shape) for k, v in _build_arch(arch).state_dict().items()}


@functools.lru_cache(maxsize=64)
def _meta_reference_shapes(arch: str) -> dict[str, tuple[int, ...]] | None:
    """:func:`_reference_shapes` built on the meta device only; None when ``arch`` cannot be."""
    try:
        with torch.device("meta"):
            module = torchvision.models.get_model(arch)
    except (NotImplementedError, RuntimeError):
        return None
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _head_keys(ref: dict[str, tuple[int, ...]]) -> list[str]:
    """The classifier's entries in a default 1000-class build: first dimension 1000."""
    return [k for k, shape in ref.items() if len(shape) >= 1 and shape[0] == 1000]


def _head_size(ref: dict[str, tuple[int, ...]], sd: Mapping[str, Any]) -> int | None:
    """Number of classes the checkpoint's head was trained for: the size of the last classifier
    entry of the architecture (``ref``, :func:`_reference_shapes`) as ``sd`` holds it."""
    for k in reversed(_head_keys(ref)):
        if k in sd and hasattr(sd[k], "shape") and len(sd[k].shape) >= 1:
            return int(sd[k].shape[0])
    return None


def _guess_arch(arch: str, sd: Mapping[str, Any]) -> str | None:
    """A torchvision architecture of ``arch``'s family (same leading letters: resnet18 … resnet152)
    whose keys and shapes, the head's size aside, are exactly ``sd``'s; None when none is.
    Only families that build on the meta device are tried (no memory, and fast: benchmarks/NOTES.md, "Models")."""
    family = re.match(r"[a-z]+", arch)
    if family is None:
        return None
    names = [
        n
        for n in torchvision.models.list_models(module=torchvision.models)
        if n.startswith(family.group()) and n != arch
    ]
    for name in names[:16]:
        ref = _meta_reference_shapes(name)
        if ref is None or set(ref) != set(sd):
            continue
        head = set(_head_keys(ref))
        if all(k in head or tuple(getattr(sd[k], "shape", ())) == shape for k, shape in ref.items()):
            return name
    return None


def _cast_like(sd: Mapping[str, Any], own: Mapping[str, torch.Tensor]) -> StateDict:
    """``sd`` with floating tensors cast to the dtype ``own`` declares for them (what copying into
    an initialised module gives), keeping ``_metadata`` (module versions) for the load."""

    def cast(k: str, v: Any) -> Any:
        if k in own and isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != own[k].dtype:
            return v.to(own[k].dtype)
        return v

    out = StateDict((k, cast(k, v)) for k, v in sd.items())
    meta = getattr(sd, "_metadata", None)
    if meta is not None:
        out._metadata = meta
    return out


def _load_strict(module: nn.Module, sd: Mapping[str, Any], ck: Checkpoint, target: str, arch: str | None) -> None:
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


def _mismatch_error(
    ck: Checkpoint,
    sd: Mapping[str, Any],
    expected: set[str],
    target: str,
    arch: str | None,
    missing: list[str],
    unexpected: list[str],
    mismatched: list[str],
) -> ModelError:
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
    group = matching_group(ck.weights(), expected)
    if heads and differing and all(k.split(".", 1)[0] in heads for k in differing) and unexpected:
        head = sorted(heads)[0]
        return ck.refuse(
            f"its classifier head ({head}) is not {arch}'s: {arch} has {', '.join(missing[:4]) or '-'}, the "
            "checkpoint has "
            f"{', '.join(unexpected[:4])} (a replaced head, such as nn.Sequential(nn.Dropout(p), nn.Linear(...)))",
            "Build that module in code and set model.factory: 'package.module:function' to it (docs/checkpoints.md, "
            "'Custom "
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


def build_from_state_dict(arch: str, num_classes: int | None, ck: Checkpoint) -> tuple[nn.Module, int]:
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
    sd, ck.prefix = strip_prefix(ck.weights(), set(ref))
    n = _head_size(ref, sd)
    if n is None:  # keys of another arch: the strict load below lists what differs
        n = num_classes or 1000
    elif num_classes is not None and num_classes != n:
        raise ck.refuse(
            f"model.num_classes={num_classes} but the checkpoint's head has {n} classes",
            "Unset model.num_classes, or set it to " + str(n),
        )
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
            f"model.factory {spec!r}: cannot import {mod_name!r} ({type(exc).__name__}: {exc}){hint}; the module must "
            "be "
            "importable on every machine that scores"
        ) from None
    except Exception as exc:
        raise ModelError(f"model.factory {spec!r}: importing {mod_name!r} raised {type(exc).__name__}: {exc}") from None
    fn = getattr(mod, fn_name.strip(), None)
    if not callable(fn):
        close = difflib.get_close_matches(
            fn_name, [n for n in dir(mod) if not n.startswith("_") and callable(getattr(mod, n))], n=3
        )
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ModelError(f"model.factory {spec!r}: {mod_name} has no function {fn_name!r}{hint}")
    try:
        module = fn()
    except Exception as exc:
        raise ModelError(f"model.factory {spec!r} raised {type(exc).__name__}: {exc}") from None
    if not isinstance(module, nn.Module):
        raise ModelError(f"model.factory {spec!r} returned a {type(module).__name__}, not a torch.nn.Module")
    return module


def module_for(ck: Checkpoint, cfg: ModelConfig, crop: int) -> tuple[nn.Module, int]:
    """The module that holds ``ck``'s weights, and its number of outputs: the file's own module
    (TorchScript, a torch.export program, a trusted pickled module), ``model.factory``'s with the
    weights loaded strictly, or torchvision's ``model.arch`` sized from the checkpoint's head
    (:func:`build_from_state_dict`). ``crop``: the input size the output probe runs at.

    Raises:
        ModelError: ``model.factory`` beside a file with its own module; a torch.export program that
            cannot take ``crop``-sized RGB float32 batches; weights that do not fit;
            ``model.num_classes`` other than the module's outputs.
    """
    if ck.module is not None:  # TorchScript, a torch.export program, or a trusted pickled module
        if cfg.factory is not None:
            raise ck.refuse(
                f"model.factory ({cfg.factory}) is set, but this file carries its own module", "Unset model.factory"
            )
        if isinstance(ck.module, ExportedProgramModule) and (why := ck.module.input_problem(crop)):
            raise ck.refuse(*why)  # its input shape is fixed: refused here, not as a failed forward per batch
        return ck.module, probe_num_classes(ck.module, crop)
    if cfg.factory is None:
        return build_from_state_dict(cfg.arch, cfg.num_classes, ck)
    module = call_factory(cfg.factory)
    sd, ck.prefix = strip_prefix(ck.weights(), set(module.state_dict()))
    _load_strict(module, sd, ck, f"the module model.factory ({cfg.factory}) returns", None)
    n = probe_num_classes(module, crop)
    if cfg.num_classes is not None and cfg.num_classes != n:
        raise ck.refuse(
            f"model.num_classes={cfg.num_classes} but the module model.factory returns has {n} outputs",
            f"Unset model.num_classes, or set it to {n}",
        )
    return module, n


def weights_file(arch: str, name: str) -> tuple[WeightsEnum, Path]:
    """torchvision's weights ``name`` of ``arch`` (``IMAGENET1K_V2``, ``DEFAULT``; a
    ``torchvision.models.WeightsEnum`` member) and where the local torch hub cache keeps its file.

    Raises:
        ModelError: ``arch`` has no torchvision weights, or none of that name.
    """
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


def probe_num_classes(module: nn.Module, crop: int) -> int:
    """Output size of ``module`` (put in eval mode) for one zero image of ``crop`` pixels."""
    module.eval()
    with torch.inference_mode():
        out = module(torch.zeros(1, 3, crop, crop))
    if isinstance(out, (tuple, list)):
        out = out[0]
    return int(out.shape[-1])
