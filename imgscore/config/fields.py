"""What every config section shares: the base model, the path and root field types, and the
refusals of values that YAML converted silently (a boolean or a number where a name was meant).

Every section (:class:`Section`) forbids unknown keys, so a typo (``model.arc``) is refused with
the valid names instead of being ignored; it refuses ``inf``/``nan``, and booleans where a
number is meant.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, TypeAlias

from pydantic import (
    BaseModel,
    ConfigDict,
    PlainSerializer,
    PlainValidator,
    ValidationInfo,
    field_validator,
)

from imgscore.io import object_store, storage

# A root's value as configured: a local folder as a ``Path``, an object-store URL as its normalized
# string (a ``Path`` would fold ``s3://`` into ``s3:/``). Code that opens files under a root takes it
# through ``imgscore.io.storage.path``, which gives the one path type for both.
RootValue: TypeAlias = Path | str


def root_value(value: Any) -> RootValue | None:
    """A root as configured (``input.root``, ``output.root``): None and a ``Path`` as they are,
    text as :func:`parse_root` reads it.

    Raises:
        ValueError: as :func:`parse_root` (pydantic reports it against the key).
    """
    if value is None or isinstance(value, Path):
        return value
    return parse_root(value)


def parse_root(value: Any) -> RootValue:
    """A root given as text → a ``Path`` (local path, ``file://`` URL; ``~`` expanded) or the
    normalized URL string (``s3://``, ``gs://``, ``az://``: a ``Path`` would fold ``//``).

    Raises:
        ValueError: not text, empty, or an unknown URL scheme.
    """
    if not isinstance(value, str):
        raise ValueError(f"expected a path or a URL, got {type(value).__name__}")
    if not value.strip():  # Path("") is the working directory: `--set output.root=$OUT` with OUT unset
        raise ValueError(
            "is empty; set it to a folder or a URL (an unset shell variable in --set KEY=$VAR gives an empty value)"
        )
    text = storage.normalize_root(value)
    local = storage.local_path(text)
    return Path(os.path.expanduser(local)) if local is not None else text


def user_path(value: Any) -> Any:
    """A local path key's value with a leading ``~`` / ``~user`` made the home folder
    (``os.path.expanduser``); other values unchanged. ``$VAR`` is not expanded: ``$`` is a legal
    character in file names, and a path must not change with the environment of the process
    that reads the config (a Prefect worker's differs from the shell's)."""
    if isinstance(value, str) and value.startswith("~"):
        return os.path.expanduser(value)
    if isinstance(value, Path) and str(value).startswith("~"):
        return value.expanduser()
    return value


def checkpoint_value(value: Any) -> RootValue | None:
    """``model.checkpoint`` as configured: a local file (``Path``, ``~`` expanded), an object-store URL, an
    ``http(s)://`` URL or an MLflow ``models:/``/``runs:/`` URI (text, fetched into the model cache by
    ``imgscore.io.fetched``).

    Raises:
        ValueError: as :func:`parse_root`; a URL with a credential in it (a password, a presigned
            or SAS query parameter), named without its value.
    """
    if isinstance(value, str) and (what := object_store.credential_in_url(value.strip())) is not None:
        raise ValueError(
            f"holds a credential ({what}); credentials are never written in the config (it is recorded in the "
            "manifest, the Parquet metadata and the flow run's parameters): serve the checkpoint without one, or put "
            "it on a bucket (s3://, gs://, az://) this machine's own credentials can read"
        )
    if isinstance(value, str) and value.strip().lower().startswith(("http://", "https://", "models:/", "runs:/")):
        return value.strip()
    return root_value(value)


def no_credential(value: Any) -> Any:
    """A URL without a credential in it (``model.registry_uri``).

    Raises:
        ValueError: a password, token or signature in the URL, named without its value.
    """
    if isinstance(value, str) and (what := object_store.credential_in_url(value.strip())) is not None:
        raise ValueError(
            f"holds a credential ({what}); credentials are never written in the config: set MLFLOW_TRACKING_TOKEN or "
            "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD on each machine instead"
        )
    return value


# What the docs of every path key say about ~ and $VAR (docs/configuration.md says it too).
PATH_NOTE = "; ~ is your home folder, $VAR is not expanded"


# input.root / output.root: a local folder, or an object-store URL (imgscore.io.storage)
Root = Annotated[
    RootValue,
    PlainValidator(root_value, json_schema_input_type=str),
    PlainSerializer(str, return_type=str, when_used="json"),
]

# model.checkpoint: a local file, an object-store URL or an http(s) URL
Checkpoint = Annotated[
    RootValue,
    PlainValidator(checkpoint_value, json_schema_input_type=str),
    PlainSerializer(str, return_type=str, when_used="json"),
]


def _admits(annotation: Any, kinds: tuple[type, ...]) -> bool:
    """Whether a field's annotation (through ``|``, ``Optional``, ``Annotated``, ``list[...]``,
    ``tuple[...]``) takes a value of one of ``kinds``."""
    if annotation in kinds:
        return True
    return any(_admits(a, kinds) for a in getattr(annotation, "__args__", ()) if not isinstance(a, str))


def _numeric_only(annotation: Any) -> bool:
    """A field of numbers (``float``, ``int | None``, ``list[float]``, ``tuple[int, int, int]``) that
    takes no booleans or text of its own: pydantic's lax mode would read ``true`` there as 1."""
    return _admits(annotation, (int, float)) and not _admits(annotation, (bool, str, Path))


class Section(BaseModel):
    """The base of every config section: unknown keys, ``inf``/``nan`` and booleans given for
    numbers are refused."""

    # allow_inf_nan=False: inf and nan are refused here, not by each shard (JSON writes them as null,
    # so a config that passed this check would fail to load in every shard task).
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True, validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, v: Any, info: ValidationInfo) -> Any:
        """Refuse a boolean where a number is meant (``decode_timeout_s: true`` would be 1.0 seconds)."""
        items = v if isinstance(v, list | tuple) else [v]
        field = cls.model_fields.get(info.field_name or "")
        if any(isinstance(x, bool) for x in items) and field is not None and _numeric_only(field.annotation):
            b = next(x for x in items if isinstance(x, bool))
            raise ValueError(
                f"is the boolean {str(b).lower()}, not a number: YAML reads unquoted "
                "true/false/yes/no/on/off as booleans; give a number"
            )
        return v


def not_a_number(v: Any, info: ValidationInfo) -> Any:
    """Refuse a number where a name is meant: YAML reads ``0123`` (octal) and ``12:30`` (base 60)
    text as numbers, and coercing one back to text would not give what was written (``0123`` →
    ``'83'``). A "before" field validator (``info`` unused: pydantic passes it)."""
    if isinstance(v, int | float) and not isinstance(v, bool):
        raise ValueError(number_message("", v))
    return v


def yaml_boolean_message(what: str, value: bool) -> str:
    """The refusal for a YAML boolean where a name was meant (``classes: [no, yes]``)."""
    word = "yes" if value else "no"
    return (
        f"{what} is the boolean {str(value).lower()}: YAML reads unquoted no/yes/on/off/false/true as "
        f"booleans; quote it: '{word}' (or whichever of those words you wrote)"
    )


def number_message(what: str, value: float) -> str:
    """The refusal for a YAML number where a name was meant (``classes: [001, 010]`` reads as 1 and 8)."""
    return (
        f"{what} is the number {value!r}: YAML reads unquoted 001/010/12:30/1_000 as numbers (010 is octal "
        f"8, 12:30 is 750), so the text you wrote is lost; quote the names: '001'"
    ).lstrip()
