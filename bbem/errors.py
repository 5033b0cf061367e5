"""The one error type a user can cause and fix, and the OS refusals that are such errors.

The CLI turns a :class:`UserError` into one line on stderr and exit code 2. It subclasses
``ValueError`` so library callers that already catch ``ValueError`` keep working.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path


class UserError(ValueError):
    """A mistake in the user's input (path, key, shape, config value) with the fix in its text."""


#: errno values by which the OS refuses a write the user can fix, and the fix
_REFUSALS = {
    errno.EACCES: "choose a folder you may write to",
    errno.EPERM: "choose a folder you may write to",
    errno.EROFS: "choose a folder on a writable file system",
    errno.ENOSPC: "free some space or choose another disk",
    errno.EDQUOT: "free some space or choose another disk",
    errno.EFBIG: "choose a file system that allows larger files",
    errno.ENOTDIR: "a file stands where a folder must be: choose another path",
    errno.ENAMETOOLONG: "choose a shorter path",
}


def one_line(text: object) -> str:
    """``text`` with its line breaks folded, for messages quoting a library's exception."""
    return " ".join(str(text).split())


@contextlib.contextmanager
def os_refusals(path: str | os.PathLike) -> Iterator[None]:
    """Turn the OS refusing to write ``path`` (permission, read-only, disk full) into a UserError.

    :func:`check_writable` asks the OS beforehand, but its answer can be wrong (root, ACLs,
    network file systems) and a disk can fill up mid-write, so the write itself is guarded too.
    Outputs written through :func:`bbem.atomic.atomic_output` leave no ``.partial`` behind.
    """
    try:
        yield
    except OSError as e:
        fix = _REFUSALS.get(e.errno) if e.errno is not None else None
        if fix is None:
            raise
        where = f" ({e.filename})" if e.filename and str(e.filename) != os.fspath(path) else ""
        raise UserError(f"cannot write {path}{where}: {e.strerror}: {fix}") from None


def check_writable(path: str | os.PathLike) -> None:
    """Refuse, before any work, an output whose folder could not be created or written.

    Looks at the nearest existing ancestor of ``path``: it must be a folder this process may
    write to. Nothing is created.
    """
    anc = Path(path).parent  # relative stays relative, for the message; it ends at "."
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise UserError(f"cannot write {path}: {anc} is a file, not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {path}: the folder {anc} is not writable")
