"""Read a ``model.checkpoint`` file: its weights or module, its class names, and what it is.

Formats are recognised by content, never by extension (a ``.bin`` or ``.pt`` that holds
safetensors is read as safetensors):

- **safetensors** (Hugging Face, timm, most shared fine-tunes): read with
  ``safetensors.torch.load_file`` — no pickle at all; class names from its string metadata;
- **TorchScript archive** (``torch.jit.save``): ``torch.jit.load(map_location="cpu")``;
- **torch.export archive** (``torch.export.save``, ``.pt2``): only with ``model.trust_checkpoint=true``
  (``torch.export.load`` can unpickle from the file), scored as ``ep.module()``
  (:mod:`imgscore.inference.exported`);
- **PyTorch file** (``torch.save``, zip archive or legacy pickle): ``torch.load(weights_only=True)``
  with the types training scripts commonly store beside tensors allow-listed; whole pickled
  modules only with ``model.trust_checkpoint=true`` (unpickling runs code from the file).

Inside a PyTorch file, the weights are the file itself (a plain ``state_dict``) or a dict under
one of :data:`STATE_DICT_KEYS` (training checkpoints: torchvision references, PyTorch
Lightning's ``state_dict``, hand-written loops). Class names are read from :data:`CLASS_KEYS`
at the top level of the dict, or under Lightning's ``hyper_parameters``.

Every refusal names the file, says what it is (:meth:`Checkpoint.describe`: format, top-level
keys, where the weights are, the prefix stripped) and gives the one fix that applies.
"""

from __future__ import annotations

import argparse
import os
import pickle
import stat
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from imgscore.errors import ModelError
from imgscore.images.decode import warnings_lock
from imgscore.inference.class_names import classes_from_mapping, names_text
from imgscore.inference.exported import ExportedProgramModule, is_torch_export, load_exported

# Keys under which common training scripts (torchvision references, PyTorch Lightning, timm,
# hand-written loops) keep the weights in a checkpoint dict, in the order we look.
STATE_DICT_KEYS = ("model_state_dict", "state_dict", "model", "model_state", "net")
SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit on its JSON header


def _safe_globals() -> list[Any]:
    """Types a training checkpoint commonly holds besides tensors, allowed for weights_only loads."""
    core = getattr(np, "_core", None) or np.core
    allowed: list[Any] = [argparse.Namespace, core.multiarray.scalar, np.dtype]
    allowed += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    return allowed


@dataclass
class Checkpoint:
    """What :func:`read_checkpoint` found in a file.

    ``kind`` is ``state_dict``, ``training_checkpoint``, ``safetensors``, ``torchscript``,
    ``torch_export`` or ``pickled_module``; exactly one of ``state_dict`` (name → tensor) and ``module`` is set.
    ``prefix`` is the key prefix :func:`~imgscore.inference.state_dict.strip_prefix` removed (``""`` when none).
    """

    path: Path
    fmt: str  # "safetensors file", "TorchScript archive", "torch.export archive", "PyTorch zip archive", …
    kind: str
    state_dict: Mapping[str, Any] | None = None  # name → tensor (a module's extra state may be another value)
    module: nn.Module | None = None
    classes: list[str] | None = None
    top_keys: list[str] | None = None  # a training-checkpoint dict's own keys
    weights_key: str | None = None  # where in that dict the weights were
    metadata_keys: list[str] | None = None  # safetensors metadata
    prefix: str = ""
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """What the file is, in one clause: format, container keys, weights, prefix."""
        parts = [f"a {self.fmt}"]
        n = len(self.state_dict) if self.state_dict is not None else None
        if self.kind == "training_checkpoint":
            parts.append(
                f"holding a dict with keys {names_text(self.top_keys or [])}; {n} tensors under {self.weights_key!r}"
            )
        elif self.kind == "safetensors":
            meta = f", metadata keys {names_text(self.metadata_keys)}" if self.metadata_keys else ", no metadata"
            parts.append(f"of {n} tensors{meta}")
        elif self.kind == "state_dict":
            parts.append(f"holding a plain state_dict of {n} tensors")
        elif self.kind == "pickled_module":
            parts.append(f"holding a pickled {type(self.module).__name__} module")
        elif isinstance(self.module, ExportedProgramModule):
            parts.append(f"of a program taking {self.module.input_text()}")
        if self.prefix:
            parts.append(f"key prefix {self.prefix!r} stripped")
        return " ".join(parts[:2]) + "".join(f"; {p}" for p in parts[2:])

    def weights(self) -> Mapping[str, Any]:
        """``state_dict``, for a file read as weights (``module`` is None exactly then).

        Raises:
            ValueError: the file carries a module instead.
        """
        if self.state_dict is None:
            raise ValueError(f"model.checkpoint {str(self.path)!r} holds a module ({self.kind}), not a state_dict")
        return self.state_dict

    def refuse(self, problem: str, fix: str) -> ModelError:
        """A :class:`ModelError` naming the file, what it is, the problem and the fix."""
        return ModelError(f"model.checkpoint {str(self.path)!r} ({self.describe()}): {problem}. {fix}")


# ------------------------------------------------------------------------------------ formats


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
    via = (
        f" (a process substitution or an inherited file descriptor: {os.path.realpath(path)})"
        if str(path).startswith(("/dev/fd/", "/proc/"))
        else ""
    )
    return (
        f"is not a regular file: it is {kind}{via}, which can be read only once and not seeked, while the checkpoint "
        "is "
        "read by every scoring process; copy it to a file first (e.g. cat PATH > model.pt) and point model.checkpoint "
        "at that file"
    )


def is_safetensors(path: Path) -> bool:
    """True when the file starts like safetensors: an 8-byte little-endian header length within
    the format's limit and the file, then a JSON object (``{``)."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return False
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n <= SAFETENSORS_MAX_HEADER and 8 + n <= size and head[8:9] == b"{"


def is_torchscript(path: Path) -> bool:
    """True for a ``torch.jit.save`` archive (a zip with ``constants.pkl`` and ``code/``)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return any(n.endswith("constants.pkl") for n in names) and any("/code/" in n for n in names)


def jit_load(path: Path) -> torch.jit.ScriptModule:
    """``torch.jit.load(path, map_location="cpu")`` without torch's "``torch.jit.load`` is
    deprecated" FutureWarning, which users cannot act on. The filter is scoped to this call and
    taken under the process's warnings lock (``warnings.catch_warnings`` swaps process-wide state).
    """
    with warnings_lock(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated", category=FutureWarning)
        return torch.jit.load(str(path), map_location="cpu")


def _torch_load(path: Path, trust: bool) -> Any:
    """``torch.load`` with weights_only=True and the allow-list; full unpickling only if trusted."""
    try:
        # quantized tensors are rebuilt through TypedStorage, whose deprecation warning users cannot act on
        with torch.serialization.safe_globals(_safe_globals()), warnings_lock(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"TypedStorage is deprecated", category=UserWarning)
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
            last = str(exc).splitlines()[-1] if str(exc) else type(exc).__name__
            raise ModelError(
                f"model.checkpoint {str(path)!r} is not a readable PyTorch file ({last[:300]}); it is not safetensors "
                "or TorchScript either. Point model.checkpoint at a file written by torch.save, torch.jit.save or "
                "safetensors.torch.save_file"
            ) from None
        if trust:
            try:
                return torch.load(path, map_location="cpu", weights_only=False)
            except Exception as exc2:
                raise ModelError(
                    f"model.checkpoint {str(path)!r} could not be unpickled even with model.trust_checkpoint=true: "
                    f"{type(exc2).__name__}: {exc2}"
                ) from None
        allowed = {f"{t.__module__}.{t.__qualname__}" for t in _safe_globals()}
        names = [n for n in names if n not in allowed]  # only what is refused: the allowed ones load
        names = sorted(names, key=lambda n: (n.startswith(("torch.", "collections.", "builtins.")), n))
        what = names_text(names, 5) if names else str(exc).splitlines()[0][:200]
        raise ModelError(
            f"model.checkpoint {str(path)!r} holds pickled Python objects ({what}); loading it runs code "
            "from the file. Set model.trust_checkpoint=true if you trust this file, or save a form that loads "
            "without it: the weights, torch.save(model.state_dict(), path) (with model.arch or model.factory), or "
            "TorchScript, torch.jit.save(torch.jit.script(model), path); from MLflow, "
            "mlflow.pytorch.log_state_dict(model.state_dict(), 'model') rather than log_model(..., "
            'serialization_format="pickle") (its "pt2" format, a torch.export program, needs model.trust_checkpoint '
            "too)"
        ) from None
    except Exception as exc:  # RuntimeError, EOFError, BadZipFile, or what the unpickler hits in garbage (KeyError, …)
        raise ModelError(
            f"model.checkpoint {str(path)!r} is not a readable PyTorch file: {type(exc).__name__}: {exc}. "
            "Point model.checkpoint at a file written by torch.save, torch.jit.save or safetensors.torch.save_file"
        ) from None


# ------------------------------------------------------------------------------------ quantized state dicts


def quantized_keys(sd: Mapping[Any, Any]) -> list[str]:
    """Keys of ``sd`` that only a quantized module holds: ``torch.ao.quantization``'s packed
    Linear/Conv params (``quantize_dynamic``: ``fc._packed_params._packed_params``, a tuple of a
    qint8 weight and a float bias, and ``fc._packed_params.dtype``) and quantized tensors
    (static quantization: ``weight`` as ``torch.qint8`` with ``scale``/``zero_point``)."""
    return [
        str(k) for k, v in sd.items() if "_packed_params" in str(k) or (isinstance(v, torch.Tensor) and v.is_quantized)
    ]


def refuse_quantized(path: Path, fmt: str, obj: Mapping[Any, Any]) -> None:
    """Refuse a quantized state_dict (the file itself, or under one of :data:`STATE_DICT_KEYS`):
    its packed int8 params fit no float module, and ``torch.save(model.state_dict())`` is exactly
    how it was made, so that advice would not help.

    Raises:
        ModelError: naming the file, what it is (the quantized layers) and the fix.
    """
    for where, sd in ((None, obj), *((k, obj[k]) for k in STATE_DICT_KEYS if isinstance(obj.get(k), Mapping))):
        keys = quantized_keys(sd)
        if not keys:
            continue
        layers = sorted(
            {k.split("._packed_params", 1)[0] if "._packed_params" in k else k.rsplit(".", 1)[0] for k in keys}
        )
        packed = any("_packed_params" in k for k in keys)
        kind = (
            "packed int8 Linear params, as torch.ao.quantization.quantize_dynamic writes them"
            if packed
            else "quantized int8 tensors, as torch.ao.quantization.convert writes them"
        )
        inside = f" under {where!r}" if where else ""
        raise ModelError(
            f"model.checkpoint {str(path)!r} (a {fmt}) is a quantized state_dict{inside} ({kind}: {len(layers)} "
            "quantized "
            f"layer(s), e.g. {names_text(layers, 4)}); imgscore scores float models: save the float model's "
            "state_dict before "
            "quantizing (torch.save(model.state_dict(), path) on the model you passed to quantize_dynamic) and point "
            "model.checkpoint at it (with model.arch), or, to score the quantized model itself, save it as TorchScript "
            "(torch.jit.script(qmodel).save(path)), which carries its own module"
        )


# ------------------------------------------------------------------------------------ reading


def _read_safetensors(path: Path) -> Checkpoint:
    """A safetensors file's tensors, and the class names its metadata keeps."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        sd = load_file(str(path), device="cpu")  # each tensor holds its own copy of the bytes
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(
            f"model.checkpoint {str(path)!r} is a safetensors file that cannot be read ({type(exc).__name__}: {exc}); "
            "it may be truncated: copy it again"
        ) from None
    ck = Checkpoint(path, "safetensors file", "safetensors", state_dict=sd, metadata_keys=sorted(metadata))
    ck.classes = classes_from_mapping(metadata, f"model.checkpoint {str(path)!r} (safetensors metadata)")
    return ck


def read_checkpoint(path: Path, trust: bool = False) -> Checkpoint:
    """Read ``path`` (module doc: formats and containers) into a :class:`Checkpoint` on the CPU.

    Raises:
        ModelError: not a readable checkpoint; pickled objects without ``trust``; a dict without
            weights; a class list that cannot be used.
    """
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise ModelError(
            f"model.checkpoint {str(path)!r} is empty (0 bytes): the copy or download that wrote it did not "
            "finish; point model.checkpoint at the complete file"
        )
    if is_safetensors(path):
        return _read_safetensors(path)
    if is_torchscript(path):
        try:
            module = jit_load(path)
        except Exception as exc:
            raise ModelError(
                f"model.checkpoint {str(path)!r} is a TorchScript archive that failed to load: {exc}"
            ) from None
        return Checkpoint(path, "TorchScript archive", "torchscript", module=module)
    if is_torch_export(path):  # before torch.load, which finds no data.pkl and calls it a corrupt file
        if not trust:
            raise ModelError(
                f"model.checkpoint {str(path)!r} is a torch.export archive (torch.export.save); torch.export.load can "
                "run code from the file (it unpickles payloads with torch.load(weights_only=False) and evaluates shape "
                "expressions with sympy). Set model.trust_checkpoint=true if you trust this file, or save the weights "
                "instead: torch.save(model.state_dict(), path)"
            )
        return Checkpoint(path, "torch.export archive", "torch_export", module=load_exported(path))
    obj = _torch_load(path, trust)
    fmt = "PyTorch zip archive" if zipfile.is_zipfile(path) else "legacy PyTorch pickle"
    if isinstance(obj, nn.Module):  # only reachable when trusted
        return Checkpoint(path, fmt, "pickled_module", module=obj)
    if not isinstance(obj, Mapping):
        raise ModelError(
            f"model.checkpoint {str(path)!r} (a {fmt}) holds a {type(obj).__name__}, not weights. "
            "Save the weights with torch.save(model.state_dict(), path)"
        )
    refuse_quantized(path, fmt, obj)
    if all(isinstance(v, torch.Tensor) for v in obj.values()):
        return Checkpoint(path, fmt, "state_dict", state_dict=obj)
    return _training_checkpoint(path, fmt, obj)


def _training_checkpoint(path: Path, fmt: str, obj: Mapping[Any, Any]) -> Checkpoint:
    """A training checkpoint dict: the weights under the first of :data:`STATE_DICT_KEYS` that
    holds some, the class names beside them (or in Lightning's ``hyper_parameters``).

    Raises:
        ModelError: no weights under any of those keys, entries that are not tensors, or a class
            list that cannot be used.
    """
    where = f"model.checkpoint {str(path)!r}"
    key = next((k for k in STATE_DICT_KEYS if isinstance(obj.get(k), (Mapping, nn.Module))), None)
    top = [str(k) for k in obj]
    if key is None:
        raise ModelError(
            f"{where} (a {fmt} holding a dict with keys {names_text(top, 10)}) has no weights under any of "
            f"{', '.join(STATE_DICT_KEYS)}. Save the weights with torch.save(model.state_dict(), path)"
        )
    classes = classes_from_mapping(obj, where)
    hparams = obj.get("hyper_parameters")
    if classes is None and isinstance(hparams, Mapping):  # PyTorch Lightning's save_hyperparameters()
        classes = classes_from_mapping(hparams, f"{where} (hyper_parameters)")
    weights = obj[key]
    if isinstance(weights, nn.Module):  # {"model": module}, only reachable when trusted
        return Checkpoint(path, fmt, "pickled_module", module=weights, classes=classes, top_keys=top, weights_key=key)
    bad = [str(k) for k, v in weights.items() if not isinstance(v, torch.Tensor)]
    ck = Checkpoint(
        path, fmt, "training_checkpoint", state_dict=weights, classes=classes, top_keys=top, weights_key=key
    )
    if bad:
        raise ck.refuse(
            f"the entries under {key!r} are not all tensors ({names_text(bad, 4)})",
            "Save the weights with torch.save(model.state_dict(), path)",
        )
    return ck
