"""The validated run config: YAML in, a typed :class:`RunConfig` out, one clear line per mistake.

Overrides from the command line (``--set a.b.c=value``) are applied to the raw YAML dict before
validation, so they are checked by the same rules as the file.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import yaml

from bbem.errors import UserError


def apply_overrides(d: Mapping[str, Any], overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Return a new nested dict with each ``a.b.c=value`` override applied.

    ``value`` is parsed with ``yaml.safe_load`` (so ``[16,32]``, ``0.3``, ``true``, ``null``
    become list, float, bool, None); missing intermediate sections are created. A path that runs
    through a non-dict value, or an override without ``=``, raises :class:`UserError`.
    """
    out: dict[str, Any] = copy.deepcopy(dict(d))
    for item in overrides:
        key, sep, text = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"override {item!r} is not key=value: write e.g. --set bb.density=0.3")
        parts = key.split(".")
        if any(not p for p in parts):
            raise UserError(f"override key {key!r} has an empty part: write e.g. bb.density")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as e:
            first = str(e).strip().splitlines()[0]
            raise UserError(f"override {key}: value {text!r} is not valid YAML ({first})") from None
        node = out
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            elif not isinstance(nxt, dict):
                where = ".".join(parts[: i + 1])
                raise UserError(
                    f"override {key}: {where} is a value ({nxt!r}), not a section with keys"
                )
            node = nxt
        node[parts[-1]] = value
    return out
