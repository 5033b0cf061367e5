"""What only the companion tasks share: their config schema (a YAML file merged over the
task's ``DEFAULTS``), the decorrelation probe, dataset cache keys and the command line.

Training itself is :func:`bbem.engine.fit`, the loop the EM training uses too, so a companion
run directory has the same layout (``config.yaml``, ``metrics.csv``, ``loss.csv``, ``bb.csv``,
``checkpoints/last.pt`` and ``best.pt``) and ``bbem report RUN_DIR`` reads either.
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bbem.bb import METHODS, channel_means, decorrelation
from bbem.configfile import default_run_dir, read_config, resolve_cli
from bbem.errors import UserError

BB_METHODS = ("dense", *METHODS)


# -- config ---------------------------------------------------------------------------------------


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` laid on top, section by section (neither is modified)."""
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_config(
    config: str | os.PathLike | Mapping[str, Any],
    defaults: Mapping[str, Any],
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """A YAML file (or dict) with ``--set`` overrides (:func:`bbem.configfile.read_config`), merged
    over ``defaults``.

    Unknown sections or keys raise :class:`UserError` naming them, so a typo never silently
    falls back to a default. The ``bb`` section goes to :class:`bbem.bb.BBConfig` as is (its
    fields are checked there), except ``method: dense``, which attaches nothing.
    """
    example = f"configs/{defaults.get('task', 'asr')}.yaml"
    raw = read_config(config, overrides, example)
    _check_keys(raw, defaults, "")
    cfg = deep_merge(defaults, raw)
    method = str(cfg.get("bb", {}).get("method", "bb"))
    if method not in BB_METHODS:
        raise UserError(f"bb.method {method!r} is unknown: use one of {', '.join(BB_METHODS)}")
    return cfg


def _check_keys(raw: Mapping[str, Any], defaults: Mapping[str, Any], where: str) -> None:
    for k, v in raw.items():
        if where == "bb.":  # BBConfig validates its own fields
            continue
        if k not in defaults:
            known = ", ".join(sorted(defaults))
            raise UserError(f"config key {where}{k} is unknown: known keys here are {known}")
        if isinstance(v, Mapping) and isinstance(defaults[k], Mapping):
            _check_keys(v, defaults[k], f"{where}{k}.")


def cache_key(obj: Any, n: int = 12) -> str:
    """A short stable hash of a JSON-able object (the cache folder of a generated dataset)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


# -- decorrelation --------------------------------------------------------------------------------


class UnitMeans:
    """Per-sample channel means (:func:`bbem.bb.channel_means`) of the outputs of modules
    matching ``patterns`` (fnmatch on module names), collected while it is active: the input of
    METHOD.md's decorrelation.

    ``channel_dim`` is 1 for conv maps ``[N, C, ...]`` and -1 for sequences ``[N, T, C]``; for
    the latter set ``.valid`` to a ``[N, T]`` bool mask so padding does not count.
    """

    def __init__(self, model: nn.Module, patterns: Sequence[str], channel_dim: int = 1):
        self.valid: torch.Tensor | None = None
        self.means: dict[str, list[torch.Tensor]] = {}
        self._hooks = []
        for name, m in model.named_modules():
            if any(fnmatch.fnmatchcase(name, p) for p in patterns):
                self.means[name] = []
                self._hooks.append(m.register_forward_hook(self._hook(name, channel_dim)))

    def _hook(self, name: str, channel_dim: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, out: torch.Tensor) -> None:
            x = out.detach().float().cpu()
            if self.valid is None or channel_dim == 1:
                self.means[name].append(channel_means(x, channel_dim))
                return
            # padding zeroed, then the mean over all T positions rescaled to the valid ones
            w = self.valid.float().cpu()
            m = channel_means(x * w[..., None], channel_dim)
            self.means[name].append(m * (x.shape[1] / w.sum(1, keepdim=True)))

        return hook

    def decorrelation(self) -> float:
        """Mean over the modules of the mean |Pearson r| between their units (lower: more
        decorrelated), and remove the hooks."""
        for h in self._hooks:
            h.remove()
        vals = [decorrelation(torch.cat(v)) for v in self.means.values() if v]
        vals = [v for v in vals if math.isfinite(v)]
        return float(np.mean(vals)) if vals else float("nan")


# -- the command line -----------------------------------------------------------------------------


def run_from_cli(
    task: str,
    example: str,
    defaults: Mapping[str, Any],
    run: Callable[..., dict[str, Any]],
    config: str | None,
    overrides: Sequence[str] = (),
    run_dir: str | None = None,
    resume: str | None = None,
) -> None:
    """``bbem TASK CONFIG [--set k=v] [--run-dir DIR]`` or ``bbem TASK --resume RUN_DIR``.

    ``run(cfg, run_dir, resume=...)`` trains; a resumed run keeps its saved config unchanged.
    """

    def load(path: str | os.PathLike, over: Sequence[str]) -> dict[str, Any]:
        return load_config(path, defaults, over)

    cfg, resumed = resolve_cli(task, example, config, overrides, resume, load)
    if resumed is not None:
        rd = resumed
    else:
        rd = Path(run_dir) if run_dir else default_run_dir(Path(str(config)).stem)
    print_summary(task, rd, run(cfg, rd, resume=resumed is not None))


def print_summary(task: str, run_dir: Path, row: Mapping[str, Any]) -> None:
    """The last metrics row as one line per value (what a user reads after a run)."""
    from rich.console import Console

    c = Console()
    c.print(f"[bold]{task}[/] finished: {run_dir}")
    for k, v in row.items():
        c.print(f"  {k:<18} {v}")
