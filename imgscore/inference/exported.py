"""A ``torch.export`` program (``torch.export.save(ep, "model.pt2")``; MLflow 3's default
``mlflow.pytorch.log_model`` writes one as ``data/model.pt2``) as a module that scores.

- **Recognised by content**: a zip whose one top-level folder holds ``archive_format`` reading
  ``pt2`` (what torch writes, ``torch/export/pt2_archive/constants.py``); a ``torch.save`` zip has
  ``data.pkl`` there instead and a TorchScript zip ``constants.pkl`` and ``code/``.
- **Loaded only when trusted**: :func:`~imgscore.inference.checkpoint.read_checkpoint` refuses
  it without ``model.trust_checkpoint`` (:func:`load_exported` says why).
- **A fixed input shape**: the program takes the shape it was exported with, except the
  dimensions declared dynamic (``torch.export.Dim``). :class:`ExportedProgramModule` reads that
  shape from the program's input placeholder and refuses a crop of another size before scoring;
  a batch dimension that is static (MLflow exports a batch of 1 as static) or bounded is met by
  running the batch in chunks the program accepts, so scoring works with any
  ``inference.batch_size``.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imgscore.errors import ModelError

# torch.export.save's marker (torch/export/pt2_archive/constants.py: ARCHIVE_FORMAT_PATH and _VALUE)
_FORMAT_MEMBER, _FORMAT_VALUE = "archive_format", b"pt2"
# the schema arguments that switch an ATen op to its training behaviour (batch_norm, dropout, …)
_TRAINING_ARGS = ("training", "train")

Range = tuple[int, int | None]  # a dimension's sizes the program accepts: (min, max or None for no bound)


def is_torch_export(path: Path) -> bool:
    """True for a ``torch.export.save`` archive: a zip with ``<folder>/archive_format`` reading
    ``pt2``. Reads the zip's directory and that one small member, nothing else."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as z:
            marker = next((i for i in z.infolist() if i.filename.split("/")[-1:] == [_FORMAT_MEMBER]), None)
            return marker is not None and marker.file_size < 64 and z.read(marker).strip() == _FORMAT_VALUE
    except (OSError, zipfile.BadZipFile):
        return False


def _program_names(path: Path) -> list[str]:
    """The programs an archive holds (``<folder>/models/<name>.json``): ``model`` for torch.export.save."""
    with zipfile.ZipFile(path) as z:
        parts = [n.split("/") for n in z.namelist()]
    return sorted(p[-1][: -len(".json")] for p in parts if len(p) == 3 and p[1] == "models" and p[2].endswith(".json"))


def load_exported(path: Path) -> ExportedProgramModule:
    """``torch.export.load(path).module()`` wrapped to score (:class:`ExportedProgramModule`).

    Call only with ``model.trust_checkpoint=true``: ``torch.export.load`` (torch 2.14) can run code
    from the file. The graph is JSON and plain tensors are raw bytes (``_build_file_map``), but
    ``load_pt2`` → ``_load_state_dict``/``_load_constants`` unpickle any payload the archive marks
    ``use_pickle`` with ``torch.load(weights_only=False)``, and opaque constants with
    ``pickle.loads``; the example inputs go through ``deserialize_torch_artifact``, which retries a
    failed ``torch.load(weights_only=True)`` with ``weights_only=False``; shape expressions are
    parsed with ``sympy.sympify`` (``eval``); an ``aotinductor/`` folder's shared library is loaded
    (``_load_aoti``). torch's own docstring says never to load one from an untrusted source.

    Raises:
        ModelError: the archive holds no exported program (an AOTInductor package), or
            ``torch.export.load`` fails on it.
    """
    names = _program_names(path)
    if "model" not in names:
        raise ModelError(
            f"model.checkpoint {str(path)!r} is a torch.export archive without an exported program "
            f"(models/model.json; it holds {', '.join(names) or 'none'}): an AOTInductor package "
            "(torch._inductor.aoti_compile_and_package) is compiled code for one machine. Save the program itself: "
            "torch.export.save(torch.export.export(model.eval(), (example,)), 'model.pt2')"
        )
    try:
        # a file object: torch warns about a path that does not end in .pt2, and we know the format by content
        with open(path, "rb") as f:
            ep = torch.export.load(f)
    except Exception as exc:
        first = str(exc).splitlines()[0][:300] if str(exc) else ""
        raise ModelError(
            f"model.checkpoint {str(path)!r} is a torch.export archive that failed to load "
            f"({type(exc).__name__}: {first}); if another torch version saved it, export it again with torch "
            f"{torch.__version__}"
        ) from None
    return ExportedProgramModule(ep)


def _dim_range(d: Any, ep: torch.export.ExportedProgram) -> Range:
    """The sizes the program accepts for one input dimension: an int is static; a symbol is
    bounded by ``ep.range_constraints``; anything else (a derived expression) is taken as free."""
    if isinstance(d, int):
        return d, d
    expr = d.node.expr
    if expr.is_Integer:
        return int(expr), int(expr)
    vr = ep.range_constraints.get(expr)
    if vr is None:
        return 0, None
    return int(vr.lower) if vr.lower.is_Integer else 0, int(vr.upper) if vr.upper.is_Integer else None


def _range_text(r: Range) -> str:
    lo, hi = r
    return str(lo) if lo == hi else f"{lo}..{hi}" if hi is not None else f"{lo}+"


def _fits(r: Range, n: int) -> bool:
    return r[0] <= n and (r[1] is None or n <= r[1])


def _training_ops(ep: torch.export.ExportedProgram) -> list[str]:
    """ATen ops of the graph called with ``training``/``train`` true: a program exported from a
    model in training mode (BatchNorm with batch statistics, active dropout)."""
    found = []
    for node in ep.graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or schema is None:
            continue
        for i, arg in enumerate(schema.arguments):
            if arg.name in _TRAINING_ARGS:
                value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name, arg.default_value)
                if value is True:
                    found.append(str(node.target))
    return sorted(set(found))


class ExportedProgramModule(nn.Module):
    """``ep.module()`` of a ``torch.export`` program, callable with any batch size.

    ``input_ranges``: per dimension of the one user input (N, C, H, W), the sizes the program
    accepts, ``(min, max)``, ``max`` None when unbounded; a static dimension is ``(n, n)``.
    ``forward`` takes float32 [N, 3, H, W] and returns the program's first output for those N
    (logits [N, C]); a batch the program does not accept runs as chunks it does (at most
    ``max`` each, the last padded to ``min`` with copies of its last image, whose outputs are
    dropped). An exported program's graph is independent per image in eval mode, so chunking
    changes no answer.
    """

    def __init__(self, ep: torch.export.ExportedProgram) -> None:
        super().__init__()
        self.program = ep.module()
        self.training = False  # the graph is fixed as exported; train()/eval() only set this flag
        users = list(ep.graph_signature.user_inputs)
        self.input_names = [str(n) for n in users]
        node = next((n for n in ep.graph.nodes if n.op == "placeholder" and n.name in users[:1]), None)
        val = node.meta.get("val") if node is not None else None
        self.input_dtype = getattr(val, "dtype", None)
        self.input_ranges = [_dim_range(d, ep) for d in val.shape] if isinstance(val, torch.Tensor) else []
        self.training_ops = _training_ops(ep)

    def train(self, mode: bool = True) -> ExportedProgramModule:
        """Only this wrapper's flag: torch refuses ``train()``/``eval()`` on an exported module
        ("not supported yet"), and its graph keeps the mode it was exported in."""
        self.training = mode
        return self

    @property
    def any_batch(self) -> bool:
        """Whether the program's batch dimension is unbounded (declared dynamic). Its lower bound
        may be 2: ``torch.export.Dim.AUTO`` (MLflow's) records ``2..`` for a batch, and such a program,
        re-exported to ONNX, takes a batch of 1 too (measured with torch 2.14)."""
        lo, hi = self.input_ranges[0] if self.input_ranges else (0, None)
        return hi is None and lo <= 2

    def input_text(self) -> str:
        """The exported input, e.g. ``float32 [1, 3, 224, 224]`` (ranges for dynamic dimensions)."""
        dtype = str(self.input_dtype).removeprefix("torch.")
        return f"{dtype} [{', '.join(_range_text(r) for r in self.input_ranges)}]"

    def input_problem(self, crop: int) -> tuple[str, str] | None:
        """Why this program cannot score ``crop``×``crop`` RGB float32 batches, and the fix; None
        when it can (any batch size can: :meth:`forward` chunks)."""
        example = f"torch.zeros(2, 3, {crop}, {crop})"
        export = (
            f"torch.export.save(torch.export.export(model.eval(), ({example},), "
            "dynamic_shapes=({0: torch.export.Dim('batch')},)), 'model.pt2')"
        )
        if self.training_ops:
            return (
                f"it was exported from a model in training mode ({', '.join(self.training_ops[:3])} with training "
                "on: batch statistics, active dropout), so an image's scores would depend on its batch",
                f"Export the model after model.eval(): {export}",
            )
        if len(self.input_names) != 1 or len(self.input_ranges) != 4:
            return (
                f"it takes {len(self.input_names)} input(s) ({', '.join(self.input_names)}: {self.input_text()}), "
                "not one image batch [N, 3, H, W]",
                f"Export the classifier with one example batch: {export}",
            )
        if self.input_dtype != torch.float32 or not _fits(self.input_ranges[1], 3):
            return (
                f"it takes {self.input_text()}, not float32 RGB batches [N, 3, H, W]",
                f"Export it with a float32 RGB example: {export}",
            )
        h, w = self.input_ranges[2:]
        if not (_fits(h, crop) and _fits(w, crop)):
            again = f"export it again at the crop you score at, with a dynamic batch: {export}"
            side = h[0] if h == w and h[0] == h[1] else None
            fix = (
                f"Set preprocess.crop={side} and preprocess.resize={round(side * 256 / 224)} (under models:, the "
                f"model's transform) to score at the exported size, or {again}"
                if side
                else again[:1].upper() + again[1:]
            )
            return (
                f"it was exported for {_range_text(h)}x{_range_text(w)} images but the preprocessing crops "
                f"{crop}x{crop}",
                fix,
            )
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """float32 [N, 3, H, W] → the program's first output for those N images (logits [N, C])."""
        n = x.shape[0]
        lo, hi = self.input_ranges[0] if self.input_ranges else (0, None)
        if _fits((lo, hi), n):
            return _first(self.program(x))
        step = hi or n
        outs = []
        for start in range(0, n, step):
            chunk = x[start : start + step]
            k = chunk.shape[0]
            if k < lo:  # pad with copies of the last image; their outputs are dropped
                chunk = torch.cat([chunk, chunk[-1:].expand(lo - k, *chunk.shape[1:])])
            outs.append(_first(self.program(chunk))[:k])
        return torch.cat(outs)


def _first(out: Any) -> torch.Tensor:
    """The logits of a program that returns several outputs: the first, as scoring takes it."""
    return out[0] if isinstance(out, (tuple, list)) else out
