"""Exceptions that mean "refuse before scoring" (CLI exit 2) versus "the run went wrong" (exit 1).

Every message names the bad value and the fix, so the CLI can print ``str(exc)`` as one line
with no traceback.
"""

from __future__ import annotations

import os
from typing import Any


class ImgscoreError(Exception):
    """Base class for the errors imgscore raises on purpose. ``exit_code`` is what the CLI returns."""

    exit_code = 1


class UsageError(ImgscoreError):
    """Bad usage, config, input root or model: refused before any scoring (exit 2)."""

    exit_code = 2


class ConfigError(UsageError):
    """A config file or a ``--set`` override is invalid."""


class InputError(UsageError):
    """``input.root`` is missing, not a folder, or holds no images."""


class ModelError(UsageError):
    """The model cannot be built or its checkpoint cannot be loaded."""


class RunStateError(UsageError, ValueError):
    """A run's ``manifest.json`` is not a manifest (truncated, overwritten, not JSON): refused
    with one line naming the file (exit 2). A ``ValueError`` too, for readers that skip bad runs."""


class ErrorBudgetExceeded(ImgscoreError):
    """The run finished, but more images failed than ``run.max_error_rate`` allows (exit 1)."""

    def __init__(self, message: str, summary: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.summary = summary or {}


class OutputWriteError(ImgscoreError):
    """Writing under ``output.root`` failed — disk full, quota, read-only file system, file too
    large — (exit 1). Nothing is half-written: the temp file is removed, and the part files and
    records already in place stay good; the run ends ``crashed`` and ``imgscore rerun`` finishes
    it once the cause is fixed. ``path`` is the file that could not be written, ``errno`` the OS
    error number."""

    def __init__(self, message: str, path: str | None = None, errno: int | None = None) -> None:
        super().__init__(message)
        self.path, self.errno = path, errno

    @classmethod
    def of(cls, path: str | os.PathLike, exc: OSError) -> OutputWriteError:
        """One line naming ``path`` and the OS error (pyarrow's messages carry the errno but not the path)."""
        why = (
            f"[Errno {exc.errno}] {os.strerror(exc.errno)}"
            if exc.errno
            else f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        )
        where = path if isinstance(path, str) else str(path)  # a remote UPath has no fspath; str() is its URL
        return cls(f"cannot write {where}: {why}", where, exc.errno)

    def __reduce__(self) -> tuple[type[OutputWriteError], tuple[str, str | None, int | None]]:
        # crosses process boundaries (Dask workers) with its fields
        return (type(self), (str(self), self.path, self.errno))


class DriftExceeded(ErrorBudgetExceeded):
    """The run finished, but its night-over-night drift crossed a threshold and ``drift.fail``
    is on (exit 1; everything is written, the summary and report say which threshold)."""


class RunLockedError(UsageError):
    """Another process holds the run's lock (a rerun of the same run is already going)."""


def type_names(*classes: type) -> set[str]:
    """The names of ``classes`` and of all their subclasses (to recognise our own errors in text
    that only carries the type's name, such as Prefect's state messages)."""
    return set().union(*({c.__name__} | type_names(*c.__subclasses__()) for c in classes)) if classes else set()


class ShardStopped(RuntimeError):
    """The run is stopping (SIGINT or SIGTERM reached the flow, :func:`imgscore.runstate.manifest.request_stop`):
    the shard is abandoned before its commit — nothing of it is written, a rerun scores it."""


class ShardError(RuntimeError):
    """A shard could not run at all (model load on its worker, DataLoader worker crash or
    timeout). Not an :class:`ImgscoreError`: Prefect retries the shard's task run, and after the
    last retry the shard is recorded as ``failed`` with this message as its reason."""
