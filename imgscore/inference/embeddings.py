"""Embeddings: each image's penultimate-layer features, read with a forward hook while it is scored.

The embedding of an image is, by default, the input of the model's classifier head — the
features the last linear layer turns into class scores (for resnet50 the 2048 pooled features
``fc`` reads, for mobilenet_v3_large the 1280 features of ``classifier[3]``, for ViT the class
token ``heads.head`` reads). :func:`find_head` locates that head from the architecture;
``output.embedding_layer`` instead names a module whose *output*, flattened from dimension 1,
is the embedding (``avgpool`` in a resnet gives the same vector as the head's input).

One hook per (module, layer) lives for the process (:func:`tap_for`); it stores what it sees
in thread-local storage, so shards scored on two threads with the same cached model never read
each other's features. :func:`with_embeddings` wraps a forward so it returns probabilities and
features side by side — one tensor, so per-image isolation (``score_isolated``) and its
non-finite check treat them as one answer.
"""

from __future__ import annotations

import difflib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from imgscore.errors import ConfigError
from imgscore.inference.exported import ExportedProgramModule
from imgscore.io.parquet import EMBEDDING_KEYS

# Where torchvision's classifiers keep their head, most specific first ("classifier.-1": the
# last child of an nn.Sequential named classifier). Architectures outside the list fall back to
# the last nn.Linear whose output size is the number of classes.
HEAD_NAMES = ("fc", "heads.head", "head", "classifier.-1", "classifier")


@dataclass(frozen=True)
class Layer:
    """Where the embedding is read: module ``name`` (as in ``named_modules()``) and whether the
    module's input (``"input"``: a classifier head) or its output (``"output"``) is the vector."""

    name: str
    side: str  # "input" | "output"


def _resolve(module: nn.Module, dotted: str) -> tuple[str, nn.Module] | None:
    """``"classifier.-1"`` → ("classifier.3", that module); None when a step is missing."""
    cur, names = module, list[str]()
    for part in dotted.split("."):
        if part.lstrip("-").isdigit() and isinstance(cur, nn.Sequential | nn.ModuleList):
            i = int(part)
            if not -len(cur) <= i < len(cur):
                return None
            i %= len(cur)
            cur, names = cur[i], [*names, str(i)]
        else:
            child = getattr(cur, part, None) if part in dict(cur.named_children()) else None
            if not isinstance(child, nn.Module):
                return None
            cur, names = child, [*names, part]
    return ".".join(names), cur


def _refuse_frozen_graph(module: nn.Module) -> None:
    """A TorchScript archive or a torch.export program has no layer a forward hook can tap: its
    submodules are a graph's containers (an exported program's are empty ``nn.Module``s, whose
    hooks never run), so an embedding could never be read.

    Raises:
        ConfigError: for either, with the fix.
    """
    what = (
        "a TorchScript model"
        if isinstance(module, torch.jit.ScriptModule)
        else "a torch.export program"
        if isinstance(module, ExportedProgramModule)
        else None
    )
    if what is not None:
        raise ConfigError(
            f"output.embeddings: {what} has no hookable layers; save a state_dict and set "
            "model.arch (or model.factory) instead, or set output.embeddings=false"
        )


def find_head(module: nn.Module, num_classes: int | None = None) -> str:
    """The qualified name of ``module``'s classifier head: an ``nn.Linear`` at one of
    :data:`HEAD_NAMES` (``fc``, ``heads.head``, ``head``, ``classifier[-1]``, ``classifier``),
    with ``out_features == num_classes`` when given; else the last ``nn.Linear`` producing
    ``num_classes`` outputs.

    Raises:
        ConfigError: no linear head is found (e.g. squeezenet's 1×1 conv head; the message lists
            the last modules and says to set output.embedding_layer); a TorchScript archive or a
            torch.export program (no hookable layers).
    """
    _refuse_frozen_graph(module)
    fits = lambda m: isinstance(m, nn.Linear) and (num_classes is None or m.out_features == num_classes)  # noqa: E731
    for dotted in HEAD_NAMES:
        hit = _resolve(module, dotted)
        if hit is not None and fits(hit[1]):
            return hit[0]
    linear = [name for name, m in module.named_modules() if fits(m)]
    if linear:
        return linear[-1]
    last = [name for name, _ in module.named_modules() if name][-6:]
    raise ConfigError(
        f"output.embeddings: no linear classifier head{f' with {num_classes} outputs' if num_classes else ''} in this "
        f"model (its last modules: {', '.join(last)}); set output.embedding_layer to the module whose output is the "
        "embedding, e.g. output.embedding_layer=features"
    )


def choose_layer(module: nn.Module, layer: str | None, num_classes: int | None = None) -> Layer:
    """``output.embedding_layer`` checked against ``module`` (its output), or the head's input.

    Raises:
        ConfigError: ``layer`` names no module (with the closest names), no head is found, or the
            model is a TorchScript archive or a torch.export program.
    """
    _refuse_frozen_graph(module)
    if layer is None:
        return Layer(find_head(module, num_classes), "input")
    names = [n for n, _ in module.named_modules() if n]
    hit = _resolve(module, layer)
    if hit is None:
        close = difflib.get_close_matches(layer, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"output.embedding_layer {layer!r} is not a module of this model{hint} (names as in model.named_modules())"
        )
    return Layer(hit[0], "output")


class Tap:
    """A forward hook on one layer that keeps the last features it saw, per thread.

    ``features()`` → float32 [B, D] (flattened from dimension 1) of the last forward on this
    thread; ``None`` before any.
    """

    def __init__(self, module: nn.Module, layer: Layer) -> None:
        self.layer = layer
        self.module_ref = module
        self._local = threading.local()
        target = dict(module.named_modules())[layer.name]
        if layer.side == "input":
            target.register_forward_pre_hook(self._keep_input)
        else:
            target.register_forward_hook(self._keep_output)

    def __deepcopy__(self, memo: dict) -> Tap:
        """A copied module (``copy.deepcopy``, e.g. for the ONNX export) gets its own tap, with
        empty per-thread state: a ``threading.local`` cannot be copied, and features seen by the
        original are not the copy's."""
        import copy

        new = object.__new__(Tap)
        memo[id(self)] = new
        new.layer = self.layer
        new.module_ref = copy.deepcopy(self.module_ref, memo)
        new._local = threading.local()
        return new

    def _keep_input(self, _mod: nn.Module, args: tuple[Any, ...]) -> None:
        self._local.value = args[0]

    def _keep_output(self, _mod: nn.Module, _args: tuple[Any, ...], out: Any) -> None:
        self._local.value = out[0] if isinstance(out, tuple | list) else out

    def take(self) -> torch.Tensor:
        v = getattr(self._local, "value", None)
        self._local.value = None
        if v is None:
            raise RuntimeError(f"embedding layer {self.layer.name} was not called in the forward pass")
        return torch.flatten(v.detach(), 1).float().cpu()


_TAPS: dict[tuple[int, Layer], Tap] = {}
_LOCK = threading.Lock()


def tap_for(module: nn.Module, layer: Layer) -> Tap:
    """The process's :class:`Tap` on ``module``'s ``layer`` (one hook, however many shards)."""
    key = (id(module), layer)
    with _LOCK:
        tap = _TAPS.get(key)
        if tap is None or tap.module_ref is not module:
            tap = _TAPS[key] = Tap(module, layer)
        return tap


def with_embeddings(
    forward: Callable[[torch.Tensor], torch.Tensor], tap: Tap
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``forward`` returning float32 [B, C + D]: its probabilities [B, C], then the tap's features [B, D]."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        probs = forward(x)
        return torch.cat([probs, tap.take()], dim=1)

    return fn


def embedding_dim(module: nn.Module, layer: Layer, crop: int, device: torch.device) -> int:
    """D: the length of the embedding, from one forward of a zero image float32 [1, 3, crop, crop]."""
    tap = tap_for(module, layer)
    with torch.inference_mode():
        module(torch.zeros(1, 3, crop, crop, device=device))
    return int(tap.take().shape[1])


def embeddings_schema(dim: int, dtype: str = "float32") -> pa.Schema:
    """The embeddings table: the key columns (``imgscore.io.parquet.EMBEDDING_KEYS``) and
    ``embedding`` ``fixed_size_list<float32|float16>[dim]`` (non-null)."""
    value = pa.float16() if dtype == "float16" else pa.float32()
    return pa.schema([*EMBEDDING_KEYS, pa.field("embedding", pa.list_(value, dim), nullable=False)])


def embeddings_table(
    keys: list[dict],
    vectors: list[np.ndarray],
    dim: int,
    dtype: str = "float32",
    metadata: dict[str, str] | None = None,
) -> pa.Table:
    """One table in :func:`embeddings_schema`: ``keys`` (rows of the key columns) beside
    ``vectors`` (float32 [dim] each, same order); built column-wise, never by type inference.

    Raises:
        ValueError: a vector is not ``dim`` long.
    """
    schema = embeddings_schema(dim, dtype)
    value_type = schema.field("embedding").type.value_type
    flat = (
        np.concatenate([np.asarray(v, np.float32).reshape(-1) for v in vectors]) if vectors else np.zeros(0, np.float32)
    )
    if flat.size != dim * len(vectors):
        raise ValueError(f"embeddings: expected {len(vectors)} vectors of {dim} values, got {flat.size} values")
    values = pa.array(flat.astype(np.float16 if dtype == "float16" else np.float32), value_type)
    cols = [pa.array([k[f.name] for k in keys], f.type) for f in EMBEDDING_KEYS]
    table = pa.Table.from_arrays([*cols, pa.FixedSizeListArray.from_arrays(values, dim)], schema=schema)
    return table.replace_schema_metadata(metadata) if metadata else table
