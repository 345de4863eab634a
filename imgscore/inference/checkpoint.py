"""Read a ``model.checkpoint`` file: its weights or module, its class names, and what it is.

Formats are recognised by content, never by extension (a ``.bin`` or ``.pt`` that holds
safetensors is read as safetensors):

- **safetensors** (Hugging Face, timm, most shared fine-tunes): read with
  ``safetensors.torch.load_file`` — no pickle at all; class names from its string metadata;
- **TorchScript archive** (``torch.jit.save``): ``torch.jit.load(map_location="cpu")``;
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
import json
import os
import pickle
import warnings
import zipfile
from collections import Counter, OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from imgscore.errors import ModelError
from imgscore.images.preprocess import warnings_lock
from imgscore.report.evaluate import nfc

# Keys under which common training scripts (torchvision references, PyTorch Lightning, timm,
# hand-written loops) keep the weights in a checkpoint dict, in the order we look.
STATE_DICT_KEYS = ("model_state_dict", "state_dict", "model", "model_state", "net")
# Keys under which training scripts keep class names: a list (index → name), torchvision
# ImageFolder's class_to_idx (name → index), or its inverse.
CLASS_KEYS = ("classes", "class_names", "idx_to_class", "class_to_idx")
SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit on its JSON header


def _safe_globals() -> list:
    """Types a training checkpoint commonly holds besides tensors, allowed for weights_only loads."""
    core = getattr(np, "_core", None) or np.core
    allowed: list = [argparse.Namespace, core.multiarray.scalar, np.dtype]
    allowed += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    return allowed


def _names(items, n: int = 6) -> str:
    items = [str(i) for i in items]
    return ", ".join(items[:n]) + (", …" if len(items) > n else "")


@dataclass
class Checkpoint:
    """What :func:`read_checkpoint` found in a file.

    ``kind`` is ``state_dict``, ``training_checkpoint``, ``safetensors``, ``torchscript`` or
    ``pickled_module``; exactly one of ``state_dict`` (name → tensor) and ``module`` is set.
    ``prefix`` is the key prefix :func:`strip_prefix` removed (``""`` when none).
    """

    path: Path
    fmt: str  # "safetensors file", "TorchScript archive", "PyTorch zip archive", "legacy PyTorch pickle"
    kind: str
    state_dict: dict[str, torch.Tensor] | None = None
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
            parts.append(f"holding a dict with keys {_names(self.top_keys or [])}; {n} tensors under {self.weights_key!r}")
        elif self.kind == "safetensors":
            meta = f", metadata keys {_names(self.metadata_keys)}" if self.metadata_keys else ", no metadata"
            parts.append(f"of {n} tensors{meta}")
        elif self.kind == "state_dict":
            parts.append(f"holding a plain state_dict of {n} tensors")
        elif self.kind == "pickled_module":
            parts.append(f"holding a pickled {type(self.module).__name__} module")
        if self.prefix:
            parts.append(f"key prefix {self.prefix!r} stripped")
        return " ".join(parts[:2]) + "".join(f"; {p}" for p in parts[2:])

    def refuse(self, problem: str, fix: str) -> ModelError:
        """A :class:`ModelError` naming the file, what it is, the problem and the fix."""
        return ModelError(f"model.checkpoint {str(self.path)!r} ({self.describe()}): {problem}. {fix}")


# ------------------------------------------------------------------------------------ formats


def is_safetensors(path: str | Path) -> bool:
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


def is_torchscript(path: str | Path) -> bool:
    """True for a ``torch.jit.save`` archive (a zip with ``constants.pkl`` and ``code/``)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return any(n.endswith("constants.pkl") for n in names) and any("/code/" in n for n in names)


def jit_load(path: str | Path) -> torch.jit.ScriptModule:
    """``torch.jit.load(path, map_location="cpu")`` without torch's "``torch.jit.load`` is
    deprecated" FutureWarning, which users cannot act on. The filter is scoped to this call and
    taken under the process's warnings lock (``warnings.catch_warnings`` swaps process-wide state).
    """
    with warnings_lock(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated", category=FutureWarning)
        return torch.jit.load(str(path), map_location="cpu")


def _torch_load(path: Path, trust: bool):
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
        what = _names(names, 5) if names else str(exc).splitlines()[0][:200]
        raise ModelError(
            f"model.checkpoint {str(path)!r} holds pickled Python objects ({what}); loading it runs code "
            "from the file. Set model.trust_checkpoint=true if you trust this file, or re-save it as "
            "a state_dict: torch.save(model.state_dict(), path)"
        ) from None
    except Exception as exc:  # RuntimeError, EOFError, BadZipFile, or what the unpickler hits in garbage (KeyError, …)
        raise ModelError(
            f"model.checkpoint {str(path)!r} is not a readable PyTorch file: {type(exc).__name__}: {exc}. "
            "Point model.checkpoint at a file written by torch.save, torch.jit.save or safetensors.torch.save_file"
        ) from None


# ------------------------------------------------------------------------------------ quantized state dicts


def quantized_keys(sd: Mapping) -> list[str]:
    """Keys of ``sd`` that only a quantized module holds: ``torch.ao.quantization``'s packed
    Linear/Conv params (``quantize_dynamic``: ``fc._packed_params._packed_params``, a tuple of a
    qint8 weight and a float bias, and ``fc._packed_params.dtype``) and quantized tensors
    (static quantization: ``weight`` as ``torch.qint8`` with ``scale``/``zero_point``)."""
    return [str(k) for k, v in sd.items()
            if "_packed_params" in str(k) or (isinstance(v, torch.Tensor) and v.is_quantized)]


def refuse_quantized(path: Path, fmt: str, obj: Mapping) -> None:
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
        layers = sorted({k.split("._packed_params", 1)[0] if "._packed_params" in k else k.rsplit(".", 1)[0] for k in keys})
        packed = any("_packed_params" in k for k in keys)
        kind = ("packed int8 Linear params, as torch.ao.quantization.quantize_dynamic writes them" if packed
                else "quantized int8 tensors, as torch.ao.quantization.convert writes them")
        inside = f" under {where!r}" if where else ""
        raise ModelError(
            f"model.checkpoint {str(path)!r} (a {fmt}) is a quantized state_dict{inside} ({kind}: {len(layers)} quantized "
            f"layer(s), e.g. {_names(layers, 4)}); imgscore scores float models: save the float model's state_dict before "
            "quantizing (torch.save(model.state_dict(), path) on the model you passed to quantize_dynamic) and point "
            "model.checkpoint at it (with model.arch), or, to score the quantized model itself, save it as TorchScript "
            "(torch.jit.script(qmodel).save(path)), which carries its own module"
        )


# ------------------------------------------------------------------------------------ class names


def classes_from_mapping(container: Mapping, where: str) -> list[str] | None:
    """Class names kept in a checkpoint dict (or safetensors metadata, values as JSON text).

    Looks at :data:`CLASS_KEYS`: ``classes``/``class_names`` (a list, index → name),
    ``idx_to_class`` (index → name, keys int or digit strings, or a list) and ``class_to_idx``
    (torchvision ImageFolder's name → index). Indices must be exactly 0..N-1.

    Returns:
        The names in output order, each in Unicode NFC (so two spellings of ``café`` are one name to
        the duplicate check), or None when none of the keys is there.

    Raises:
        ModelError: a key is there but is not a usable class list, or two of them disagree.
    """
    found: dict[str, list[str]] = {}
    for key in CLASS_KEYS:
        if key not in container:
            continue
        value = container[key]
        if isinstance(value, str):  # safetensors metadata is str → str: JSON inside
            try:
                value = json.loads(value)
            except ValueError:
                raise ModelError(f"{where} has {key!r} but it is not JSON ({value[:80]!r}); set model.classes instead") from None
        found[key] = _as_class_list(key, value, where)
    if not found:
        return None
    lists = list(found.values())
    if any(x != lists[0] for x in lists[1:]):
        raise ModelError(
            f"{where} names its classes twice and the lists disagree ({', '.join(f'{k}: {_names(v, 3)}' for k, v in found.items())}); "
            "set model.classes to the right list"
        )
    return lists[0]


def _as_class_list(key: str, value, where: str) -> list[str]:
    if key in ("classes", "class_names") or (key == "idx_to_class" and isinstance(value, (list, tuple))):
        if isinstance(value, (list, tuple)) and all(isinstance(c, str) for c in value):
            return [nfc(c) for c in value]
    elif isinstance(value, Mapping):
        pairs = [(v, k) for k, v in value.items()] if key == "class_to_idx" else list(value.items())
        try:
            by_index = {int(i): nfc(str(name)) for i, name in pairs}
        except (TypeError, ValueError):
            by_index = {}
        if by_index and sorted(by_index) == list(range(len(by_index))) and len(by_index) == len(pairs):
            return [by_index[i] for i in range(len(by_index))]
        if by_index:
            raise ModelError(
                f"{where}'s {key!r} does not number the classes 0..{len(pairs) - 1} (indices {_names(sorted(by_index), 5)}); "
                "set model.classes to the names in output order"
            )
    raise ModelError(f"{where}'s {key!r} is a {type(value).__name__}, not a list of class names; set model.classes instead")


# ------------------------------------------------------------------------------------ reading


def _read_safetensors(path: Path) -> Checkpoint:
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


def read_checkpoint(path: str | Path, trust: bool = False) -> Checkpoint:
    """Read ``path`` (module doc: formats and containers) into a :class:`Checkpoint` on the CPU.

    Raises:
        ModelError: not a readable checkpoint; pickled objects without ``trust``; a dict without
            weights; a class list that cannot be used.
    """
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise ModelError(f"model.checkpoint {str(path)!r} is empty (0 bytes): the copy or download that wrote it did not "
                         "finish; point model.checkpoint at the complete file")
    if is_safetensors(path):
        return _read_safetensors(path)
    if is_torchscript(path):
        try:
            module = jit_load(path)
        except Exception as exc:
            raise ModelError(f"model.checkpoint {str(path)!r} is a TorchScript archive that failed to load: {exc}") from None
        return Checkpoint(path, "TorchScript archive", "torchscript", module=module)
    obj = _torch_load(path, trust)
    fmt = "PyTorch zip archive" if zipfile.is_zipfile(path) else "legacy PyTorch pickle"
    if isinstance(obj, nn.Module):  # only reachable when trusted
        return Checkpoint(path, fmt, "pickled_module", module=obj)
    if isinstance(obj, Mapping):
        refuse_quantized(path, fmt, obj)
    if not isinstance(obj, Mapping):
        raise ModelError(
            f"model.checkpoint {str(path)!r} (a {fmt}) holds a {type(obj).__name__}, not weights. "
            "Save the weights with torch.save(model.state_dict(), path)"
        )
    if all(isinstance(v, torch.Tensor) for v in obj.values()):
        return Checkpoint(path, fmt, "state_dict", state_dict=obj)
    where = f"model.checkpoint {str(path)!r}"
    key = next((k for k in STATE_DICT_KEYS if isinstance(obj.get(k), (Mapping, nn.Module))), None)
    top = [str(k) for k in obj]
    if key is None:
        raise ModelError(
            f"{where} (a {fmt} holding a dict with keys {_names(top, 10)}) has no weights under any of "
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
    ck = Checkpoint(path, fmt, "training_checkpoint", state_dict=weights, classes=classes, top_keys=top, weights_key=key)
    if bad:
        raise ck.refuse(f"the entries under {key!r} are not all tensors ({_names(bad, 4)})", "Save the weights with torch.save(model.state_dict(), path)")
    return ck


# ------------------------------------------------------------------------------------ key prefixes


def first_components(keys) -> Counter:
    """How many keys start with each first dotted component (``"model."``: 122)."""
    return Counter(k.split(".", 1)[0] + "." if "." in k else k for k in keys)


def _strip_one(sd: Mapping, prefix: str) -> OrderedDict:
    """A copy of ``sd`` without ``prefix`` on its keys, ``_metadata`` (module versions) kept and
    re-keyed by torch's own ``consume_prefix_in_state_dict_if_present``."""
    out = OrderedDict(sd)
    meta = getattr(sd, "_metadata", None)
    if meta is not None:
        out._metadata = OrderedDict(meta)  # consume_prefix re-keys it in place
    consume_prefix_in_state_dict_if_present(out, prefix)
    return out


def strip_prefix(sd: Mapping, expected: set[str]) -> tuple[Mapping, str]:
    """The state_dict ``sd`` with the uniform leading prefix removed that fits ``expected``.

    Candidates are ``sd`` itself and, while every key shares one first dotted component
    (``model.``, ``net.``, ``backbone.``, ``module.``, ``_orig_mod.`` — whatever the name), ``sd``
    with one more such component stripped. The candidate whose keys overlap the architecture's
    ``expected`` keys most is returned (the least stripped on a tie), so ``model.module.x`` loads
    into a module whose own keys are ``x``. Whether it then loads is for the strict
    ``load_state_dict`` to decide: a prefix is never stripped from only some keys.

    Returns:
        (state_dict, prefix stripped, ``""`` when none). ``_metadata`` is carried over, so the
        BatchNorm version rule of ``load_state_dict`` sees what the file said.
    """
    best, best_prefix, best_hits = sd, "", len(expected.intersection(sd))
    cur, prefix = sd, ""
    while cur and all("." in k for k in cur):
        first = first_components(cur)
        if len(first) != 1:
            break
        p = next(iter(first))
        cur, prefix = _strip_one(cur, p), prefix + p
        hits = len(expected.intersection(cur))
        if hits > best_hits:
            best, best_prefix, best_hits = cur, prefix, hits
    return best, best_prefix


def matching_group(sd: Mapping, expected: set[str]) -> str | None:
    """The first component whose keys alone, stripped of it, are exactly ``expected`` (a Lightning
    module holding the network under ``model.`` beside a loss or an EMA copy), or None."""
    for p in first_components(sd):
        if p.endswith(".") and {k[len(p):] for k in sd if k.startswith(p)} == expected:
            return p
    return None
