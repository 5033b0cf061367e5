"""Checkpoint files: the format tags, an atomic writer and a safe reader with one-line errors.

Torch only, so the EM training, inference, the napari plugin and the companion tasks share
it without importing each other.

A model file may come from anyone (a colleague, a model zoo), and unpickling can run code.
So bbem's files hold only what ``torch.load(weights_only=True)`` reads without help: tensors,
numbers, strings, lists, tuples and dicts (:func:`save_checkpoint` converts NumPy values and
refuses anything else), and :func:`load_checkpoint` reads with ``weights_only=True``. The one
exception is the NumPy arrays that checkpoints written before this rule held (the global
NumPy RNG state): NumPy's array reconstruction, which builds arrays and runs nothing else, is
allowlisted for them.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bbem.atomic import atomic_output
from bbem.errors import UserError

CHECKPOINT_FORMAT = "bbem-checkpoint-1"
EXPORT_FORMAT = "bbem-export-1"

_PLAIN = (str, int, float, bool, type(None), torch.Tensor, torch.Size, torch.dtype)


def to_plain(obj: Any, where: str = "checkpoint") -> Any:
    """``obj`` with NumPy values as Python numbers and lists; TypeError on any other object."""
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Mapping):
        return {k: to_plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return tuple(to_plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    if isinstance(obj, _PLAIN):
        return obj
    raise TypeError(f"{where} is a {type(obj).__name__}: a bbem file holds only plain values")


def save_torch_file(path: str | os.PathLike, payload: Mapping[str, Any], **output: Any) -> Path:
    """``torch.save`` of plain values, atomically; ``output``: :func:`bbem.atomic.atomic_output`."""
    data = to_plain(dict(payload))
    with atomic_output(path, kind="torch", **output) as tmp:
        torch.save(data, tmp)
    return Path(path)


def save_checkpoint(path: str | os.PathLike, payload: Mapping[str, Any]) -> Path:
    """Write a training checkpoint atomically (temporary name, then rename)."""
    return save_torch_file(path, {"format": CHECKPOINT_FORMAT, **payload}, overwrite=True)


def _legacy_numpy_globals() -> list[Any]:
    """NumPy's array reconstruction: what pre-rule checkpoints need, and nothing that runs code."""
    # numpy >= 2 names the module numpy._core; 1.x (which pyproject allows) numpy.core
    multiarray = getattr(np, "_core", None) or np.core
    multiarray = multiarray.multiarray

    dtypes = [type(np.dtype(t)) for t in (np.uint32, np.uint8, np.int64, np.float64, np.float32)]
    return [multiarray._reconstruct, np.ndarray, np.dtype, *dtypes]


def read_torch_file(path: str | os.PathLike) -> Any:
    """``torch.load(weights_only=True)``: a file that needs other code is refused, never run."""
    p = Path(path)
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(_legacy_numpy_globals()):
            warnings.simplefilter("ignore")  # torch's note on a foreign pickle protocol
            return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.findall(r"GLOBAL ([\w.]+)", str(e)) or re.findall(
            r"Unsupported global: ([\w. ]+)", str(e)
        )
        what = f" ({found[0].removeprefix('GLOBAL ').strip()})" if found else ""
        raise UserError(
            f"{p} holds Python objects{what} that bbem will not unpickle, since loading them "
            "could run code: it is not a file bbem wrote. Re-export a trusted model with "
            "`bbem export`"
        ) from None
    except Exception as e:  # torch raises many types for a corrupt or foreign file
        raise UserError(
            f"{p} cannot be read ({type(e).__name__}): is it a bbem checkpoint or export?"
        ) from None


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint or an export safely; a :class:`UserError` when missing or foreign."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"checkpoint {p} is a folder: pass a run's checkpoints/best.pt or last.pt")
    if not p.is_file():
        raise UserError(f"checkpoint {p} not found: pass a run's checkpoints/best.pt or last.pt")
    data = read_torch_file(p)
    if not isinstance(data, dict) or data.get("format") not in (CHECKPOINT_FORMAT, EXPORT_FORMAT):
        raise UserError(f"{p} is not a bbem checkpoint or export (no bbem format tag)")
    return data


def misfit(last: Path, run: Path, saved: Mapping[str, Any], now: Mapping[str, Any]) -> str:
    """Why ``last.pt`` cannot be loaded into the model ``config.yaml`` describes, and the fix."""

    def changed(section: str) -> list[str]:
        a, b = saved.get(section) or {}, now.get(section) or {}
        return [f"{section}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]

    # the model and BB shape the weights; an optimiser change (a new lr) alone is a legal resume
    diff = changed("model") + changed("bb") or changed("optim")
    what = f" ({', '.join(diff)} changed since it was written)" if diff else ""
    return (
        f"checkpoint {last} does not fit the model config in {run / 'config.yaml'}{what}: restore "
        "the settings the run was trained with, or train a new run with another --run-dir"
    )
