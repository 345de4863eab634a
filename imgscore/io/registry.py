"""``model.checkpoint`` in an MLflow model registry or run: ``models:/NAME@ALIAS``,
``models:/NAME/VERSION``, ``runs:/RUN_ID/PATH`` (the ``imgscore[mlflow]`` extra).

- **Where.** ``model.registry_uri`` when set, else what MLflow finds (``MLFLOW_TRACKING_URI``,
  ``MLFLOW_REGISTRY_URI``). Credentials come from MLflow's own variables
  (``MLFLOW_TRACKING_TOKEN``, ``MLFLOW_TRACKING_USERNAME``/``PASSWORD``), never from the config.
- **Identity.** An alias is resolved to its version (:func:`resolve`): the identity of
  ``models:/NAME@ALIAS`` is ``models:/NAME/VERSION``, the version the alias names now; a run's
  artifact is its ``runs:/`` URI. A run pins the identity once, at plan time, so every shard and a
  rerun download that version even after the alias moved (``imgscore.io.fetched``).
- **The checkpoint in a model's folder** (:func:`checkpoint_in`): an MLflow ``pytorch`` flavor's
  ``data/model.pt2`` (a torch.export program, MLflow 3's default) or ``data/model.pth`` (a pickled
  module, refused unless ``model.trust_checkpoint``); else the one file that is not ``MLmodel``,
  an environment file or ``classes.txt``. A ``classes.txt`` beside it gives the class names.

MLflow is imported only here and only when such a URI is used: a run without one needs none of it.
"""

from __future__ import annotations

import os
import re
import ssl
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from imgscore.errors import ModelError

SCHEMES = ("models:/", "runs:/")
CLASSES_FILE = "classes.txt"
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>[^/]+))/?$")
# Files an MLflow model folder holds beside its weights (written by log_model): never the checkpoint.
_NOT_WEIGHTS = frozenset(
    {"MLmodel", "conda.yaml", "python_env.yaml", "requirements.txt", "input_example.json", "serving_input_example.json"}
)
_FLAVOR_FILES = ("data/model.pt2", "data/model.pth")  # mlflow.pytorch: serialization_format pt2 | pickle


def is_registry(source: str) -> bool:
    """Whether ``source`` is an MLflow model or run URI."""
    return source.startswith(SCHEMES)


def resolve(uri: str, registry_uri: str | None, key: str) -> str:
    """The identity of ``uri`` now: ``models:/NAME/VERSION`` (an alias resolved to the version it
    names), or a ``runs:/`` URI as it is.

    Raises:
        ModelError: the extra is not installed; the URI is malformed; the registry cannot be
            reached; no registered model of that name, no such alias or version; access denied.
    """
    if uri.startswith("runs:/"):
        _client(registry_uri, key)  # the registry is reachable; a missing run is named by the download
        return uri.rstrip("/")
    m = _MODEL_URI.match(uri)
    if m is None:
        raise ModelError(
            f"{key} {uri!r} is not an MLflow model URI; write models:/NAME@ALIAS, models:/NAME/VERSION or "
            "runs:/RUN_ID/PATH"
        )
    client = _client(registry_uri, key)
    name, alias, version = m["name"], m["alias"], m["version"]
    where = f"in the registry at {_shown_uri(registry_uri)}"
    _call(
        lambda: client.get_registered_model(name),
        f"{key} {uri!r}: no registered model named {name!r} {where}; register it (docs/checkpoints.md) or fix the name",
        key,
        uri,
        registry_uri,
    )
    if alias is not None:
        mv = _call(
            lambda: client.get_model_version_by_alias(name, alias),
            f"{key} {uri!r}: registered model {name!r} has no alias {alias!r} ({_aliases(client, name)}); set it "
            f"with MlflowClient().set_registered_model_alias({name!r}, {alias!r}, VERSION) or fix the alias",
            key,
            uri,
            registry_uri,
        )
        return f"models:/{name}/{mv.version}"
    if version is None or not version.isdigit():
        raise ModelError(f"{key} {uri!r}: a model version is a number (models:/{name}/3) or an alias (@champion)")
    _call(
        lambda: client.get_model_version(name, version),
        f"{key} {uri!r}: registered model {name!r} has no version {version} {where}; use a version it has or an "
        "alias (models:/NAME@champion)",
        key,
        uri,
        registry_uri,
    )
    return f"models:/{name}/{version}"


def download(identity: str, registry_uri: str | None, dest: Path, key: str) -> Path:
    """Download ``identity`` (a resolved ``models:/NAME/VERSION`` or ``runs:/`` URI) into the new
    folder ``dest``; returns the local file or folder it became.

    Raises:
        ModelError: as :func:`resolve`; the version or run no longer exists (named).
    """
    import mlflow.artifacts

    _client(registry_uri, key)
    # Batch logs stay readable: no progress bar per artifact unless the user asked for one.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    dest.mkdir(parents=True, exist_ok=True)
    got = _call(
        lambda: mlflow.artifacts.download_artifacts(
            artifact_uri=identity, dst_path=str(dest), tracking_uri=registry_uri, registry_uri=registry_uri
        ),
        f"{key}: {identity} does not exist in the registry at {_shown_uri(registry_uri)} (deleted?); restore it, or "
        "start a new run with `imgscore run`",
        key,
        identity,
        registry_uri,
    )
    return Path(got)


def checkpoint_in(local: Path, key: str, uri: str) -> tuple[Path, Path | None]:
    """The checkpoint file a downloaded model or artifact holds, and its ``classes.txt`` if any.

    Raises:
        ModelError: a folder with no checkpoint file, or with several and no MLflow flavor naming one.
    """
    if local.is_file():
        side = local.with_name(CLASSES_FILE)
        return local, side if side.is_file() else None
    classes = local / CLASSES_FILE
    found = classes if classes.is_file() else None
    for rel in _FLAVOR_FILES:
        if (local / rel).is_file():
            return local / rel, found
    files = sorted(p for p in local.rglob("*") if p.is_file() and p.name not in _NOT_WEIGHTS and p.name != CLASSES_FILE)
    if len(files) == 1:
        return files[0], found
    names = ", ".join(str(p.relative_to(local)) for p in files[:8]) or "no file"
    raise ModelError(
        f"{key} {uri!r} holds {names}: imgscore scores one checkpoint file (a state_dict, TorchScript, safetensors or "
        "torch.export .pt2) plus an optional classes.txt; register a folder with one, or point at the file "
        "(runs:/RUN_ID/PATH/FILE)"
    )


def _client(registry_uri: str | None, key: str) -> Any:
    """An ``MlflowClient`` on ``registry_uri`` (or MLflow's default), after checking it answers.

    Why the check: MLflow's REST client retries a refused connection with backoff for minutes;
    an unreachable registry is one line in seconds here.
    """
    try:
        from mlflow import MlflowClient
    except ImportError:
        raise ModelError(
            f"{key} is an MLflow URI but MLflow is not installed here; pip install 'imgscore[mlflow]'"
        ) from None
    import mlflow

    # MLflow retries a 5xx or a refused connection 7 times with backoff (minutes per call); a
    # nightly job refuses in seconds instead, unless the user set these themselves.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    uri = registry_uri or mlflow.get_registry_uri()
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10):
                pass
        except urllib.error.HTTPError as exc:
            if exc.code >= 500:  # up, but its store is not: every call would fail after retries
                raise ModelError(
                    f"{key}: the MLflow registry at {_shown_uri(uri)} answers HTTP {exc.code} (its store is down?); "
                    "try again when it is healthy"
                ) from None
            # 401/403 from a proxy that wants credentials MLflow's client sends, or no /health: the calls tell
        except urllib.error.URLError as exc:
            if not isinstance(exc.reason, ssl.SSLError):  # TLS is MLflow's business (its own CA settings)
                raise _unreachable(key, uri, exc.reason) from None
        except OSError as exc:
            raise _unreachable(key, uri, exc) from None
    return MlflowClient(tracking_uri=registry_uri, registry_uri=registry_uri)


def _unreachable(key: str, uri: str, reason: object) -> ModelError:
    return ModelError(
        f"{key}: the MLflow registry at {_shown_uri(uri)} cannot be reached ({reason}); start it, or fix "
        "model.registry_uri / MLFLOW_TRACKING_URI"
    )


def _call(fn: Any, missing: str, key: str, uri: str, registry_uri: str | None) -> Any:
    """``fn()``, with MLflow's "does not exist" as ``missing`` and its other errors as one line."""
    from mlflow.exceptions import MlflowException

    try:
        return fn()
    except MlflowException as exc:
        code = str(getattr(exc, "error_code", ""))
        if code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            raise ModelError(missing) from None
        if code in ("PERMISSION_DENIED", "UNAUTHENTICATED") or exc.get_http_status_code() in (401, 403):
            raise ModelError(_denied(key, _shown_uri(registry_uri))) from None
        first = str(exc).splitlines()[0] if str(exc) else code
        raise ModelError(f"{key} {uri!r}: the MLflow registry answered {first}") from None
    except Exception as exc:  # the artifact store's client (boto3, azure, gcs): no credentials, no package, …
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ModelError(
            f"{key} {uri!r} could not be read from the registry's artifact store ({type(exc).__name__}: {first}); "
            "check that store's credentials and client package on this machine"
        ) from None


def _denied(key: str, uri: str) -> str:
    return (
        f"{key}: the MLflow registry at {uri} denied access; set MLFLOW_TRACKING_TOKEN or "
        "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD on this machine"
    )


def _aliases(client: Any, name: str) -> str:
    try:
        aliases = client.get_registered_model(name).aliases or {}
    except Exception:  # only for the message
        return "its aliases could not be listed"
    return "its aliases: " + ", ".join(f"@{a} → v{v}" for a, v in sorted(aliases.items())) if aliases else "it has none"


def effective_uri(registry_uri: str | None) -> str:
    """The registry MLflow talks to: ``registry_uri``, else its default (``MLFLOW_TRACKING_URI``, …)."""
    if registry_uri:
        return registry_uri
    import mlflow

    return mlflow.get_registry_uri()


def _shown_uri(registry_uri: str | None) -> str:
    """:func:`effective_uri` without user info (a password in ``MLFLOW_TRACKING_URI`` is not printed)."""
    parts = urllib.parse.urlsplit(effective_uri(registry_uri))
    if parts.username or parts.password:
        parts = parts._replace(netloc=parts.netloc.rsplit("@", 1)[1])
    return urllib.parse.urlunsplit(parts)
