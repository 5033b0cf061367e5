"""The napari reader contribution: a thin hook over :func:`napari_bbem.reader.read_bbem`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bbem.volumes import is_volume_path
from napari_bbem.reader import LayerData, read_bbem


def napari_get_reader(path: str | list[str]) -> Callable[[Any], list[LayerData]] | None:
    """napari calls this with a path; a reader function if it is a bbem container, else None."""
    paths = [path] if isinstance(path, str) else list(path)
    if not paths or not all(is_volume_path(p) for p in paths):
        return None
    return read_paths


def read_paths(path: str | list[str]) -> list[LayerData]:
    """Layer data of every volume in every container (napari shows a UserError's message)."""
    paths = [path] if isinstance(path, str) else list(path)
    return [layer for p in paths for layer in read_bbem(p)]
