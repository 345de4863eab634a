"""Which runtimes this process can run: ONNX Runtime and OpenVINO are optional extras, and both
need the ONNX exporter (``onnx``, ``onnxscript``); a missing one is refused with its pip line."""

from __future__ import annotations

import importlib
import importlib.metadata
from types import ModuleType

from imgscore.errors import ConfigError

BACKENDS = ("torch", "onnxruntime", "openvino")
# What `pip install` line brings each runtime (pyproject.toml optional extras).
EXTRAS = {"onnxruntime": "onnx", "openvino": "openvino"}


class BackendUnavailable(ConfigError):
    """The configured runtime is not installed (exit 2, with the install line)."""


def import_runtime(name: str) -> ModuleType:
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
            import_runtime(name)
            exporter_modules()
        except ConfigError:
            continue
        out.append(name)
    return out


def exporter_modules() -> None:
    """Import the ONNX exporter's packages, or raise :class:`BackendUnavailable` (exit 2) naming
    the pip line that installs them."""
    for mod in ("onnx", "onnxscript"):
        try:
            importlib.import_module(mod)
        except ImportError as exc:
            raise BackendUnavailable(
                f"exporting the model to ONNX needs the {mod} package, which is not installed here ({exc}); "
                "install it with: pip install 'imgscore[onnx]' — or use inference.backend=torch"
            ) from None


def runtime_versions() -> dict[str, str | None]:
    """Installed versions of the runtimes (for manifests and benchmark headers)."""
    out: dict[str, str | None] = {}
    for dist in ("onnxruntime", "openvino", "onnx"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out
