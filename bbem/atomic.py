"""Write to a temporary name, rename when complete: an interrupted write never looks finished.

One implementation for every writer in bbem (zarr stores are directories, checkpoints and
reports are files).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from bbem.errors import UserError


def partial_path(path: str | os.PathLike) -> Path:
    """The temporary sibling a write goes to before it is renamed to ``path``."""
    p = Path(path)
    return p.with_name(p.name + ".partial")


def remove(path: str | os.PathLike) -> None:
    """Remove a file or a directory tree, if it exists."""
    p = Path(path)
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


def check_output(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing output unless ``overwrite``; return it as a Path."""
    p = Path(path)
    if p.exists() and not overwrite:
        raise UserError(f"output {p} exists: choose another path or pass --overwrite")
    return p


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write to; on success it replaces ``path``.

    On an exception the temporary is removed and ``path`` is left as it was. The temporary sits
    in the same directory so the final rename stays on one filesystem (atomic for files; for a
    directory the old one is removed just before the rename).
    """
    final = check_output(path, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(final)
    remove(tmp)
    try:
        yield tmp
    except BaseException:
        remove(tmp)
        raise
    if final.is_dir() and not final.is_symlink():
        shutil.rmtree(final)
    os.replace(tmp, final)
