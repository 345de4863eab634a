"""A flow run's config parameter: the config inline, or, when too large for Prefect's API, a
temporary file that holds it (:func:`flow_parameters`, read back by :func:`flow_config`)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from imgscore.config.schema import Config
from imgscore.errors import ConfigError

# A config whose JSON is larger than this reaches its flow run as a file reference (``config_file``)
# instead of the ``config`` mapping: Prefect's API refuses flow-run parameters over 512 KB
# (PREFECT_SERVER_API_MAX_PARAMETER_SIZE), and an inline model.classes of 10,000 names is 1.4 MB.
MAX_PARAMETER_BYTES = 128 * 1024


@contextlib.contextmanager
def flow_parameters(cfg: Config) -> Iterator[dict[str, Any]]:
    """The parameters a flow run of ``cfg`` is started with: ``{"config": cfg.to_dict()}``, or,
    when that is over :data:`MAX_PARAMETER_BYTES` as JSON, ``{"config_file": PATH}`` — the config
    written to a private temporary file (mode 0600) that exists while the context is open (the
    flow runs in this process and reads it at its start: :func:`flow_config`). The manifest
    records the whole config either way."""
    text = cfg.model_dump_json()
    if len(text.encode("utf-8")) <= MAX_PARAMETER_BYTES:
        yield {"config": cfg.to_dict()}
        return
    fd, name = tempfile.mkstemp(prefix="imgscore-config-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        yield {"config_file": name}
    finally:
        with contextlib.suppress(OSError):
            os.unlink(name)


def flow_config(config: dict[str, Any] | None, config_file: str | None) -> Config:
    """A flow's config from its parameters (:func:`flow_parameters`): the ``config`` mapping, or
    the JSON file ``config_file`` names.

    Raises:
        ConfigError: neither or both given, or the file cannot be read.
    """
    return Config.model_validate(raw_flow_config({"config": config, "config_file": config_file}))


def raw_flow_config(parameters: dict[str, Any]) -> dict[str, Any]:
    """The config mapping of a flow run's ``parameters``, unvalidated: ``config``, or the JSON
    that ``config_file`` holds (the task runner and the notification hook read it before, or
    without, validating).

    Raises:
        ConfigError: neither or both given, or the file cannot be read.
    """
    config, config_file = parameters.get("config"), parameters.get("config_file")
    if config is not None and config_file is None:
        return config
    if config is not None or config_file is None:  # both given, or neither
        raise ConfigError(
            "a flow run takes its config as config (a mapping) or as config_file (a JSON file), exactly one of them"
        )
    try:
        return json.loads(Path(config_file).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"config_file {config_file!r} cannot be read ({exc}); start the run again") from None
