"""Run config files, task-independent: YAML reading with one-line errors, ``--set a.b=v``
overrides, and the ``CONFIG [--set] [--run-dir]`` / ``--resume RUN_DIR`` contract that
``bbem train``, ``bbem asr`` and ``bbem faceid`` share. No schema here: :mod:`bbem.config`
validates the EM sections, each companion its own.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from bbem.errors import UserError
from bbem.rundir import RunDir


def apply_overrides(d: Mapping[str, Any], overrides: Iterable[str] = ()) -> dict[str, Any]:
    """A new nested dict with each ``a.b.c=value`` override applied.

    ``value`` is parsed with ``yaml.safe_load`` (``[16,32]``, ``0.3``, ``true``, ``null``);
    missing sections are created; a number indexes an existing list item. A path through a
    plain value, or an override without ``=``, is a :class:`UserError`.
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
        node: Any = out
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            index: int | str = part
            if isinstance(node, list):
                if not (part.isdigit() and int(part) < len(node)):
                    where = ".".join(parts[: i + 1])
                    raise UserError(
                        f"override {key}: {where} is not an item of a list of {len(node)}"
                    )
                index = int(part)
            elif not isinstance(node, dict):
                short = repr(node) if len(repr(node)) <= 40 else repr(node)[:37] + "..."
                raise UserError(
                    f"override {key}: {'.'.join(parts[:i])} is a value ({short}), "
                    "not a section with keys"
                )
            elif not last and node.get(part) is None:
                node[part] = {}
            if last:
                node[index] = value
            else:
                node = node[index]
    return out


def read_config(
    source: str | os.PathLike | Mapping[str, Any],
    overrides: Sequence[str] = (),
    example: str = "configs/demo.yaml",
) -> dict[str, Any]:
    """A YAML config file (or a dict) as a dict of sections with ``--set`` overrides applied;
    a missing, unreadable or malformed file is a one-line :class:`UserError`. Each task then
    validates the sections it owns."""
    if isinstance(source, Mapping):
        raw: Any = dict(source)
    else:
        p = Path(source)
        if not p.is_file():
            raise UserError(f"config file {p} not found: pass a YAML config such as {example}")
        try:
            raw = yaml.safe_load(p.read_text())
        except UnicodeDecodeError:
            raise UserError(f"config file {p} is not text: pass a YAML config") from None
        except yaml.YAMLError as e:
            raise UserError(
                f"config file {p} is not valid YAML: {' '.join(str(e).split())}"
            ) from None
        if not isinstance(raw, dict):
            raise UserError(
                f"config file {p} must be a mapping of sections (train, optim, bb, ...)"
            )
    return apply_overrides(raw, overrides)


def resolve_cli(
    command: str,
    example: str,
    config: str | None,
    overrides: Sequence[str],
    resume: str | None,
    load: Callable[[str | os.PathLike, Sequence[str]], Any],
) -> tuple[Any, Path | None]:
    """``bbem COMMAND CONFIG [--set k=v]`` or ``bbem COMMAND --resume RUN_DIR``: the loaded
    config, and the run directory to resume (None for a new run). A resumed run reads its saved
    ``config.yaml`` through the same ``load``, unchanged."""
    if resume is not None:
        if config is not None or list(overrides):
            raise UserError("--resume continues a run with its saved config: drop CONFIG and --set")
        path = RunDir.open(resume, lock=False).path  # refuses a folder without config.yaml
        return load(path / "config.yaml", ()), path
    if config is None:
        raise UserError(f"bbem {command} needs a CONFIG (e.g. {example}) or --resume RUN_DIR")
    return load(config, list(overrides)), None


def default_run_dir(name: str) -> Path:
    """``runs/<name>-<YYYYmmdd-HHMMSS>``."""
    return Path("runs") / f"{name}-{datetime.now():%Y%m%d-%H%M%S}"
