"""A state_dict's keys: the uniform prefix a training wrapper adds (``module.``, ``_orig_mod.``,
Lightning's ``model.``, …) stripped when that makes them fit a module (:func:`strip_prefix`),
and the group of keys that alone would fit (:func:`matching_group`)."""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present


class StateDict(OrderedDict[str, Any]):
    """A state_dict as torch makes one: name → tensor (or a module's extra state), in order; it may
    carry ``_metadata`` (each module's version, which ``load_state_dict`` reads)."""

    _metadata: OrderedDict[str, Any]


def first_components(keys: Iterable[str]) -> Counter[str]:
    """How many keys start with each first dotted component (``"model."``: 122)."""
    return Counter(k.split(".", 1)[0] + "." if "." in k else k for k in keys)


def _strip_one(sd: Mapping[str, Any], prefix: str) -> StateDict:
    """A copy of ``sd`` without ``prefix`` on its keys, ``_metadata`` (module versions) kept and
    re-keyed by torch's own ``consume_prefix_in_state_dict_if_present``."""
    out = StateDict(sd)
    meta = getattr(sd, "_metadata", None)
    if meta is not None:
        out._metadata = OrderedDict(meta)  # consume_prefix re-keys it in place
    consume_prefix_in_state_dict_if_present(out, prefix)
    return out


def strip_prefix(sd: Mapping[str, Any], expected: set[str]) -> tuple[Mapping[str, Any], str]:
    """The state_dict ``sd`` with the uniform leading prefix removed that fits ``expected``.

    Candidates are ``sd`` itself and, while every key shares one first dotted component
    (``model.``, ``net.``, ``backbone.``, ``module.``, ``_orig_mod.`` — whatever the name), ``sd``
    with one more such component stripped. The candidate whose keys overlap the architecture's
    ``expected`` keys most is returned (the least stripped on a tie), so ``model.module.x`` loads
    into a module whose own keys are ``x``. Whether it then loads is for the strict
    ``load_state_dict`` to decide: a prefix is never stripped from only some keys.

    Returns:
        (state_dict, prefix stripped, ``""`` when none). ``_metadata`` is carried over, so the
        BatchNorm version rule of ``load_state_dict`` sees what the file said.
    """
    best, best_prefix, best_hits = sd, "", len(expected.intersection(sd))
    cur, prefix = sd, ""
    while cur and all("." in k for k in cur):
        first = first_components(cur)
        if len(first) != 1:
            break
        p = next(iter(first))
        cur, prefix = _strip_one(cur, p), prefix + p
        hits = len(expected.intersection(cur))
        if hits > best_hits:
            best, best_prefix, best_hits = cur, prefix, hits
    return best, best_prefix


def matching_group(sd: Mapping[str, Any], expected: set[str]) -> str | None:
    """The first component whose keys alone, stripped of it, are exactly ``expected`` (a Lightning
    module holding the network under ``model.`` beside a loss or an EMA copy), or None."""
    for p in first_components(sd):
        if p.endswith(".") and {k[len(p) :] for k in sd if k.startswith(p)} == expected:
            return p
    return None
