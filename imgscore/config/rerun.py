"""A rerun's config: the run's recorded config with the overrides a rerun allows
(:func:`rerun_config`), and the recorded keys it takes only when the command repeats them
(:data:`CONFIRM_ON_RERUN`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from imgscore.config.fields import RootValue, parse_root
from imgscore.config.loading import build_config, load_config, parse_override, read_config_file
from imgscore.config.schema import Config
from imgscore.errors import ConfigError

# What a rerun's --set may change: these keys, and every key of these sections.
ALLOWED_RERUN_OVERRIDES = ("output.root", "runner.", "inference.", "notify.", "storage.")

# Recorded keys that run code, or send the run or its files somewhere: a rerun reads its config
# back from the manifest under output.root, which others may be able to write (docs/security.md), so
# it takes a non-default value of these only when the command repeats it.
CONFIRM_ON_RERUN: dict[str, str] = {
    "model.factory": "imports that module and runs that function",
    "model.trust_checkpoint": "unpickles whole modules from the checkpoint (runs code from the file)",
    "runner.address": "sends the run to that Dask scheduler (which exchanges pickled data with this process)",
    "inference.cache_dir": "loads and writes model exports in that folder",
    "input.formats": "opens the images with those decoders (the formats outside the default list include decoders "
    "with published vulnerabilities)",
}


def _allowed(key: str) -> bool:
    """Whether a rerun's ``--set`` may change the dotted ``key`` (:data:`ALLOWED_RERUN_OVERRIDES`)."""
    return any(key == a or (a.endswith(".") and key.startswith(a)) for a in ALLOWED_RERUN_OVERRIDES)


def _leaves(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Every value of the nested mapping ``d`` that is not a mapping, with its dotted key."""
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        out += _leaves(v, key + ".") if isinstance(v, dict) else [(key, v)]
    return out


def _get(d: Any, dotted: str) -> Any:
    """The value at the dotted key of the nested mapping ``d``; None when it is not there."""
    for p in dotted.split("."):
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def out_root_of(config_file: Path | None, overrides: list[str]) -> RootValue:
    """The output root to look for the run in: ``--set output.root``, else the config file's,
    else the default (``outputs``); a ``Path``, or an object-store URL string.

    Raises:
        ConfigError: an output root with an unknown URL scheme.
    """
    root = load_config(config_file).output.root if config_file else Config().output.root
    for item in overrides:
        parts, value = parse_override(item)
        if parts == ["output", "root"]:
            try:
                root = parse_root(str(value))
            except ValueError as exc:
                raise ConfigError(f"output.root: {exc}") from None
    return root


def rerun_config(recorded: dict[str, Any], config_file: Path | None, overrides: list[str]) -> Config:
    """The run's recorded config with the allowed overrides applied.

    ``--set`` may name only ``output.root``, ``runner.*``, ``inference.*`` or ``notify.*`` (and
    repeat a :data:`CONFIRM_ON_RERUN` key's recorded value); a ``--config`` file may hold other
    keys only with the values the run recorded (so the run's own config file can be passed
    again). The recorded config comes from the run's manifest: a non-default value of a
    :data:`CONFIRM_ON_RERUN` key (``model.factory``, ``model.trust_checkpoint``,
    ``runner.address``, ``inference.cache_dir``) is used only when ``--set`` or ``--config``
    gives it too. ``notify.*`` is never recorded: pass it again to be notified of the rerun.

    Raises:
        ConfigError: a forbidden override (named, with the recorded value), an unconfirmed
            recorded value of a :data:`CONFIRM_ON_RERUN` key, or an invalid value.
    """
    base = build_config(recorded)
    file_items: list[str] = []
    if config_file is not None:
        raw = read_config_file(config_file)
        build_config(raw)  # validates the file and gives its usual errors
        for key, value in _leaves(raw):
            item = f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
            if _allowed(key):
                file_items.append(item)
            elif build_config(recorded, [item]).to_dict() != base.to_dict():
                raise ConfigError(
                    f"{config_file} sets {key} to {value!r} but run {recorded['run']['run_id']} recorded "
                    f"{_get(base.to_dict(), key)!r}; a rerun keeps the run's config (only output.root, runner.*, "
                    "notify.* and inference.* may change) — start a new run with `imgscore run` to change it"
                )
    given = {".".join(parse_override(item)[0]) for item in file_items}
    for item in overrides:
        parts, _ = parse_override(item)
        key = ".".join(parts)
        given.add(key)
        repeats = key in CONFIRM_ON_RERUN and build_config(recorded, [item]).to_dict() == base.to_dict()
        if not _allowed(key) and not repeats:
            raise ConfigError(
                f"--set {item!r}: a rerun keeps the run's recorded config; only output.root, runner.*, inference.* "
                f"and notify.* may be overridden (recorded {key} = {_get(base.to_dict(), key)!r}); start a new run "
                f"to change {key}"
            )
    if config_file is not None:
        given |= {key for key, _ in _leaves(read_config_file(config_file))}
    _confirmed(base, given, recorded)
    return build_config(recorded, [*file_items, *overrides])


def _confirmed(base: Config, given: set[str], recorded: dict[str, Any]) -> None:
    """Refuse a recorded non-default value of a :data:`CONFIRM_ON_RERUN` key that the command
    (``--set`` or ``--config``) does not repeat."""
    defaults, values = Config().to_dict(), base.to_dict()
    for key, why in CONFIRM_ON_RERUN.items():
        value = _get(values, key)
        if key in given or value == _get(defaults, key):
            continue
        shown = value if isinstance(value, str) else json.dumps(value)
        raise ConfigError(
            f"run {(recorded.get('run') or {}).get('run_id')} recorded {key} = {value!r}, which {why}; a rerun "
            "reads its config back from output.root, which is not trusted for that — pass it again if you mean it: "
            f"--set {key}={shown} (or --config with the run's config file)"
        )
