"""Reading a config: YAML file (:func:`imgscore.config.strict_yaml.read_yaml`) → dotted ``--set``
overrides → pydantic (:class:`imgscore.config.schema.Config`), with every validation error
turned into one line that names the key, the value and the fix (:func:`build_config`)."""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from imgscore.config.fields import yaml_boolean_message
from imgscore.config.schema import Config
from imgscore.config.strict_yaml import read_yaml
from imgscore.errors import ConfigError


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``"a.b=value"`` into (["a", "b"], parsed value).

    The value is parsed as YAML, so ``8`` is an int, ``0.5`` a float, ``true`` a bool,
    ``[1, 2]`` a list and ``null`` None; anything else stays the literal string.

    Raises:
        ConfigError: no ``=``, or an empty key.
    """
    if "=" not in item:
        raise ConfigError(f"--set {item!r} is not KEY=VALUE; example: --set input.root=/data/images")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not key.strip() or any(not p for p in parts):
        raise ConfigError(f"--set {item!r} has an empty key; example: --set run.shard_size=500")
    try:
        value = read_yaml(raw, f"--set {key.strip()}") if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if not isinstance(value, str | int | float | bool | list | dict | type(None)):
        value = raw  # dates and other YAML types stay text
    return parts, value


def _section_fields(path: tuple[str | int, ...]) -> list[str]:
    """The keys of the section at ``path`` (``("model",)`` → ``name``, ``arch``, …); [] when
    ``path`` names no section."""
    model: type[BaseModel] = Config
    for part in path:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return list(model.model_fields)


ECHO_LIMIT = 200  # characters of a bad value an error message shows (a 10,000-name list is 1.4 MB)


def _shown(value: Any) -> str:
    """``repr(value)``, cut to :data:`ECHO_LIMIT` characters with the size of what was left out."""
    text = repr(value)
    if len(text) <= ECHO_LIMIT:
        return text
    return f"{text[:ECHO_LIMIT]}… ({len(text):,} characters)"


def _explain(exc: ValidationError) -> str:
    """pydantic's validation errors as one ``; ``-separated line, each naming its dotted key."""
    lines: list[str] = []
    for err in exc.errors():
        # a union's member names ("list[str]", "lax-or-strict[…]") are not keys: left out
        loc = tuple(p for p in err["loc"] if isinstance(p, int) or ("[" not in p and "(" not in p))
        dotted = ".".join(str(p) for p in loc) or "config"
        text_kind = err["type"] in ("string_type", "path_type", "list_type") or loc[-1:] in (("root",), ("checkpoint",))
        if isinstance(err.get("input"), bool) and text_kind:
            said = (
                f"config {yaml_boolean_message(dotted, err['input'])}"  # a name or a path that YAML read as a boolean
            )
            if said not in lines:  # a union (Path | list[str]) reports it once per member
                lines.append(said)
            continue
        if err["type"] == "finite_number":  # inf/nan: JSON cannot carry them to the shards
            unit = " of seconds" if str(loc[-1]).endswith("_s") else ""
            lines.append(f"config {dotted} must be a finite number{unit}, got {_shown(err.get('input'))}")
            continue
        if err["type"] == "extra_forbidden":
            valid = _section_fields(loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            hint = f"; did you mean {'.'.join([*map(str, loc[:-1]), close[0]])}?" if close else ""
            lines.append(f"unknown config key {dotted!r}{hint} (valid keys here: {', '.join(valid)})")
        else:
            msg = err["msg"].removeprefix("Value error, ")  # our validators' messages name the value already
            if msg.startswith("is the "):  # a boolean or a number where the key's kind was meant: the key leads
                lines.append(f"config {dotted} {msg}")
                continue
            got = _shown(err.get("input"))
            never = loc[:2] == ("storage", "options") or "holds a credential" in msg  # never echo a credential
            named = got in msg or "YAML reads unquoted" in msg  # the value is named already
            lines.append(f"config {dotted}: {msg}" + ("" if never or named else f" (got {got})"))
    return "; ".join(lines)


def build_config(raw: dict[str, Any] | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Validate a raw dict plus ``--set`` overrides into a :class:`Config`.

    Raises:
        ConfigError: unknown key (with the closest valid one), wrong type, or bad override syntax.
    """
    data: dict[str, Any] = _deepcopy(raw or {})
    for item in overrides:
        parts, value = parse_override(item)
        node = data
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {item!r}: {p!r} is a value, not a section")
            node = nxt
        node[parts[-1]] = value
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_explain(exc)) from None


# Configs shipped with imgscore, that --config takes by name (`--config nightly`) from any folder.
SHIPPED_CONFIGS = ("demo", "nightly")


def shipped_config(name: str) -> Path:
    """A config file shipped with imgscore (``demo.yaml``, ``nightly.yaml``): package data of
    ``imgscore.configs`` (the source tree's ``configs/``), found wherever imgscore is installed
    and whatever the working directory.

    An editable install made before ``configs/`` became a package maps no ``imgscore.configs``;
    there the source tree's folder, beside this package's, is the same file.
    """
    from importlib.resources import files

    try:
        return Path(str(files("imgscore.configs") / name))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "configs" / name


def load_config(path: str | os.PathLike[str] | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config file (optional; a local path, or the name of a shipped config) and apply
    ``--set`` overrides.

    Raises:
        ConfigError: the file is missing, not a YAML mapping or refused by :func:`read_yaml`,
            or validation fails.
    """
    return build_config(read_config_file(path) if path is not None else {}, overrides)


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A config file's mapping of sections (:func:`read_yaml`); {} for an empty file. ``path``: a
    local file, or the name of a config shipped with imgscore (:data:`SHIPPED_CONFIGS`).

    Raises:
        ConfigError: the file is missing, not valid YAML, not a mapping, or refused by :func:`read_yaml`.
    """
    p = Path(path)
    if not p.is_file() and str(path) in SHIPPED_CONFIGS:
        p = shipped_config(f"{path}.yaml")
    if not p.is_file():
        raise ConfigError(
            f"config file {str(p)!r} does not exist; give the path of a YAML file, or the name of a "
            f"config shipped with imgscore ({', '.join(SHIPPED_CONFIGS)}: --config nightly), or omit --config"
        )
    where = f"config file {str(p)!r}"
    try:
        loaded = read_yaml(p.read_text(encoding="utf-8"), where)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML: {exc}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{where} must hold a mapping of sections, got {type(loaded).__name__}")
    return loaded


def _deepcopy(d: dict[str, Any]) -> dict[str, Any]:
    """``d`` with its nested dicts and lists copied (``--set`` writes into the copy)."""
    return {k: _deepcopy(v) if isinstance(v, dict) else (list(v) if isinstance(v, list) else v) for k, v in d.items()}
