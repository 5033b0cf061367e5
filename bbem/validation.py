"""One clear line per config mistake, from a pydantic ``ValidationError``.

Pydantic reports every error with a location made of field names, list indices and union
branch tags; a person wrote YAML keys. :func:`format_validation_error` names the user's key
path, suggests a close key for a typo, and says what a value must be.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from typing import Any, get_args

from pydantic import BaseModel, ValidationError


def _unwrap_model(tp: Any) -> Any:
    """The pydantic model class inside ``X | None`` / ``list[X]``, or None."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    for arg in get_args(tp):
        found = _unwrap_model(arg)
        if found is not None:
            return found
    return None


def _clean(root: type[BaseModel], loc: tuple[Any, ...]) -> tuple[tuple[Any, ...], str | None]:
    """Split a pydantic location into the user's key path and the union branch tag, if any.

    Pydantic names union branches in the location (``model.strides.1.int``); the user never
    wrote those, so they are dropped from the path and returned separately.
    """
    cls: Any = root
    for n, part in enumerate(loc):
        if isinstance(part, int):
            continue
        if cls is None:  # below a leaf: what follows names a union branch
            return loc[:n], str(part)
        if part not in cls.model_fields:  # an unknown key (extra_forbidden)
            return loc[: n + 1], None
        cls = _unwrap_model(cls.model_fields[part].annotation)
    return loc, None


def _fields_at(root: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the section at ``loc``."""
    cls: Any = root
    for part in loc:
        if isinstance(part, int):
            continue
        if cls is None or part not in cls.model_fields:
            return []
        cls = _unwrap_model(cls.model_fields[part].annotation)
    return list(cls.model_fields) if cls is not None else []


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


_BRANCH = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "str": "a string",
    "tuple[int, int, int]": "a [z, y, x] triple of integers",
    "tuple[int, int]": "a [start, stop] pair of integers",
    "tuple[float, float]": "a [low, high] pair of numbers",
}


def _branch(tag: str) -> str:
    if tag.startswith("literal["):
        return tag.removeprefix("literal[").removesuffix("]")
    return _BRANCH.get(tag, tag)


def format_validation_error(e: ValidationError, root: type[BaseModel]) -> str:
    """The first error as ``config error: <key path> <problem>`` (+ how many more there are).

    ``root`` is the model that was validated: key paths are walked from it.
    """
    # Group by the user's key path: a union value that fits no branch is one problem.
    groups: dict[tuple[Any, ...], list[tuple[str | None, Mapping[str, Any]]]] = {}
    for err in e.errors():
        loc, tag = _clean(root, tuple(err["loc"]))
        groups.setdefault(loc, []).append((tag, err))
    (loc, errs), *rest = groups.items()
    line = "config error: " + _describe(root, loc, errs)
    if rest:
        line += f" (and {len(rest)} more problem{'s' if len(rest) > 1 else ''})"
    return line


def _describe(
    root: type[BaseModel], loc: tuple[Any, ...], errs: list[tuple[str | None, Mapping[str, Any]]]
) -> str:
    path = _path(loc)
    tags = [t for t, _ in errs if t is not None]
    err = errs[0][1]
    kind = err["type"]
    if tags:
        options = list(dict.fromkeys(_branch(t) for t in tags))
        return f"{path} must be {' or '.join(options)}, got {short_repr(err['input'])}"
    if kind == "extra_forbidden":
        valid = _fields_at(root, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        parent = _path(loc[:-1])
        if close:
            return (
                f"{path} is not a field; did you mean {parent + '.' if parent else ''}{close[0]}?"
            )
        where = f" of {parent}" if parent else ""
        return f"{path} is not a field; valid keys{where}: {', '.join(valid)}"
    if kind == "missing" and loc and isinstance(loc[-1], int):
        return f"{_path(loc[:-1])} is too short: item {loc[-1]} is missing"
    if kind == "missing":
        return f"{path} is required"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{path} must be a section (key: value lines), got {short_repr(err['input'])}"
    msg = str(err["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    msg = re.sub(r"^(Input|List|Tuple|String) should", "must", msg).replace(" after validation", "")
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "").replace(" or ", ", ").split(", ")
        options = [x.strip().strip("'\"") for x in expected if x.strip()]
        close = difflib.get_close_matches(str(err.get("input")), options, n=1)
        if close:
            msg += f" (did you mean {close[0]!r}?)"
    if not path or msg.startswith(path):  # a rule that names its own keys
        return msg
    return f"{path} {msg}, got {short_repr(err['input'])}"


def short_repr(v: Any) -> str:
    """``repr(v)``, cut to 60 characters."""
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."
