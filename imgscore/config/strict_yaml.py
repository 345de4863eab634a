"""``yaml.safe_load`` for configs, stricter where it is silent: a key given twice, an alias bomb
and a recursive alias are refused (:func:`read_yaml`)."""

from __future__ import annotations

from typing import Any

import yaml

from imgscore.errors import ConfigError

# Values that YAML aliases (*name) may add beyond the document's own: a config never needs more,
# and a "billion laughs" document (9 levels of 10 aliases: 10⁹ strings from 1 KB) is refused
# before anything is built from it.
MAX_ALIAS_VALUES = 100_000
_MERGE_TAG = "tag:yaml.org,2002:merge"


def read_yaml(text: str, where: str = "the YAML") -> Any:
    """``yaml.safe_load`` for configs, stricter where it is silent.

    The document is composed into nodes first (aliases are references there, so this is linear in
    the text), then checked: a key given twice in one mapping is refused (YAML keeps the last, so a
    second ``output:`` block silently dropped the first one's keys); aliases that expand to more
    than :data:`MAX_ALIAS_VALUES` values beyond the document's own, or refer to themselves, are
    refused; only then is the document built. ``<<`` merge keys keep their meaning (a key given
    beside a merge overrides the merged one).

    Raises:
        ConfigError: a duplicate key (named, with both lines), an alias bomb or recursive alias,
            or nesting deeper than the parser can follow.
        yaml.YAMLError: not valid YAML.
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_nodes(node, where)
        return loader.construct_document(node)
    except RecursionError:
        raise ConfigError(
            f"{where} nests mappings or lists too deeply to read; a config is a few levels deep"
        ) from None
    finally:
        loader.dispose()


def _children(node: yaml.Node) -> list[yaml.Node]:
    """A mapping's keys and values, a sequence's items; [] for a scalar."""
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_nodes(root: yaml.Node, where: str) -> None:
    """Duplicate keys and alias expansion of a composed document (:func:`read_yaml`), without
    recursion (a deep document must not overflow the stack here) and without expanding anything."""
    seen: set[int] = set()
    stack: list[tuple[yaml.Node, str]] = [(root, "")]
    while stack:
        node, path = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[tuple[str, str], int] = {}
            for key, value in node.value:
                if key.tag == _MERGE_TAG or not isinstance(key, yaml.ScalarNode):
                    stack.append((value, path))
                    continue
                dotted = f"{path}.{key.value}" if path else key.value
                line = key.start_mark.line + 1
                if (key.tag, key.value) in first:
                    raise ConfigError(
                        f"{where} line {line}: key {dotted!r} is given twice (first at line "
                        f"{first[key.tag, key.value]}); YAML would keep only the second and drop the first silently — "
                        "merge the two into one"
                    )
                first[key.tag, key.value] = line
                stack.append((value, dotted))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((child, f"{path}[{i}]") for i, child in enumerate(node.value))
    expanded = _expanded_count(root, where)
    if expanded - len(seen) > MAX_ALIAS_VALUES:
        raise ConfigError(
            f"{where}: its aliases (*name) expand to more than {MAX_ALIAS_VALUES:,} values beyond the file's own "
            f"{len(seen):,} (an alias bomb?); write the values out, or use fewer aliases"
        )


def _expanded_count(root: yaml.Node, where: str) -> int:
    """How many nodes the document has with every alias expanded, counted once per node (post-order,
    memoised); stops counting at :data:`MAX_ALIAS_VALUES` above the distinct nodes' count."""
    size: dict[int, int] = {}
    open_: set[int] = set()
    cap = 1 << 62
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        if done:
            open_.discard(id(node))
            size[id(node)] = min(cap, 1 + sum(size[id(k)] for k in _children(node)))
            continue
        if id(node) in size:
            continue
        if id(node) in open_:
            raise _recursive(where, node)
        open_.add(id(node))
        stack.append((node, True))
        for k in _children(node):
            if id(k) in open_:
                raise _recursive(where, k)
            if id(k) not in size:
                stack.append((k, False))
    return size[id(root)]


def _recursive(where: str, node: yaml.Node) -> ConfigError:
    """The refusal of an alias inside the value it refers to (``node``: the alias's target)."""
    return ConfigError(
        f"{where} line {node.start_mark.line + 1}: an alias refers to the value that holds it (a "
        "recursive structure); a config cannot hold one — write the value out"
    )
