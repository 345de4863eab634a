"""A model's class names, in output order: ``model.classes`` (an inline list or a file of one
name a line, :func:`read_classes`), or the list a checkpoint keeps beside its weights
(:func:`classes_from_mapping`). Every name is in Unicode NFC, and a name given twice is refused
(two outputs, one label: the report would count them as one class)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from imgscore.errors import ModelError
from imgscore.report.evaluate import nfc

# Keys under which training scripts keep class names: a list (index → name), torchvision
# ImageFolder's class_to_idx (name → index), or its inverse.
CLASS_KEYS = ("classes", "class_names", "idx_to_class", "class_to_idx")


def names_text(items: Iterable[object], n: int = 6) -> str:
    """The first ``n`` of ``items`` as ``a, b, c, …`` (for messages)."""
    texts = [str(i) for i in items]
    return ", ".join(texts[:n]) + (", …" if len(texts) > n else "")


def read_classes(spec: Path | list[str] | None) -> list[str] | None:
    """``model.classes``: the inline list, or the file's non-blank lines (stripped; a UTF-8 byte order mark
    is not part of the first name), each in Unicode NFC: ``café`` typed with a combining accent is the
    same class as with a precomposed one, and the duplicate check sees it.

    Raises:
        ModelError: the file is missing, or a name is given twice (two outputs one label: the
            report would count them as one class); named with both items or lines.
    """
    if spec is None:
        return None
    if isinstance(spec, list):
        names = [nfc(str(c)) for c in spec]
        if (dup := first_duplicate(names)) is not None:
            name, i, j = dup
            raise ModelError(
                f"model.classes names {name!r} twice (items {i} and {j} of the list); "
                "give each output its own name, in output order"
            )
        return names
    p = Path(spec)
    if not p.is_file():
        raise ModelError(
            f"model.classes file {str(p)!r} does not exist; give a file with one class name a line, or an inline list"
        )
    numbered = [
        (n, nfc(line.strip()))
        for n, line in enumerate(p.read_text(encoding="utf-8-sig").splitlines(), 1)
        if line.strip()
    ]
    if (dup := first_duplicate([name for _, name in numbered])) is not None:
        name, i, j = dup
        raise ModelError(
            f"model.classes file {str(p)!r} names {name!r} twice (lines {numbered[i][0]} and {numbered[j][0]}); "
            "give each output its own name, one a line in output order"
        )
    return [name for _, name in numbered]


def first_duplicate(names: list[str]) -> tuple[str, int, int] | None:
    """The first name given twice in ``names``, with the positions of both, or None."""
    first: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in first:
            return name, first[name], i
        first[name] = i
    return None


def classes_from_mapping(container: Mapping[str, Any], where: str) -> list[str] | None:
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
                raise ModelError(
                    f"{where} has {key!r} but it is not JSON ({value[:80]!r}); set model.classes instead"
                ) from None
        found[key] = _as_class_list(key, value, where)
    if not found:
        return None
    lists = list(found.values())
    if any(x != lists[0] for x in lists[1:]):
        raise ModelError(
            f"{where} names its classes twice and the lists disagree "
            f"({', '.join(f'{k}: {names_text(v, 3)}' for k, v in found.items())}); "
            "set model.classes to the right list"
        )
    return lists[0]


def _as_class_list(key: str, value: Any, where: str) -> list[str]:
    """The names a class-list key holds (``key``: one of :data:`CLASS_KEYS`), in output order.

    Raises:
        ModelError: not a list of names, or indices other than 0..N-1.
    """
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
                f"{where}'s {key!r} does not number the classes 0..{len(pairs) - 1} (indices "
                f"{names_text(sorted(by_index), 5)}); "
                "set model.classes to the names in output order"
            )
    raise ModelError(
        f"{where}'s {key!r} is a {type(value).__name__}, not a list of class names; set model.classes instead"
    )


# ------------------------------------------------------------------------------------ reading
