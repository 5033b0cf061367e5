"""Outputs that never destroy data: temporary name then rename, kind-checked overwrite, locks.

One implementation for every writer in bbem (zarr stores are directories, checkpoints and
reports are files). The rules, from DESIGN.md:

- an existing output is refused unless ``overwrite``;
- ``overwrite`` replaces only a bbem output of the same kind (a zarr volume by a zarr volume,
  a PNG by a PNG, ...), never a folder of other files and never one of the command's inputs;
- an output is written under ``<name>.partial`` and renamed when complete;
- an output being written is locked (:func:`output_lock`), so a second run into it is refused.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import math
import os
import shutil
import socket
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from bbem.errors import UserError

#: what a file's suffix says bbem writes there (anything else is a zarr directory)
_SUFFIX_KINDS = {
    ".tif": "tiff",
    ".tiff": "tiff",
    ".png": "png",
    ".pt": "torch",
    ".pth": "torch",
    ".json": "json",
    ".csv": "text",
    ".yaml": "text",
    ".yml": "text",
    ".log": "text",
    ".txt": "text",
    ".md": "text",
    ".npz": "npz",
    ".h5": "hdf5",
    ".hdf": "hdf5",
    ".hdf5": "hdf5",
}
_KIND_WORDS = {
    "zarr": "a zarr volume",
    "tiff": "a tiff file",
    "png": "a PNG image",
    "torch": "a torch file",
    "json": "a JSON file",
    "text": "a text file",
    "hdf5": "an hdf5 file",
    "npz": "a NumPy archive",
    "directory": "a folder",
    "file": "a file",
    "other": "something that is not a file or folder",
}


#: errno values by which the OS refuses a write the user can fix, and the fix
WRITE_REFUSALS = {
    errno.EACCES: "choose a folder you may write to",
    errno.EPERM: "choose a folder you may write to",
    errno.EROFS: "choose a folder on a writable file system",
    errno.ENOSPC: "free some space or choose another disk",
    errno.EDQUOT: "free some space or choose another disk",
    errno.EFBIG: "choose a file system that allows larger files",
    errno.ENOTDIR: "a file stands where a folder must be: choose another path",
    errno.ENAMETOOLONG: "choose a shorter path",
}


@contextlib.contextmanager
def os_refusals(path: str | os.PathLike) -> Iterator[None]:
    """Turn the OS refusing to write ``path`` (permission, read-only, disk full) into a UserError.

    :func:`check_writable` asks the OS beforehand, but its answer can be wrong (root, ACLs,
    network file systems) and a disk can fill up mid-write, so the write itself is guarded too.
    Outputs written through :func:`atomic_output` leave no ``.partial`` behind.
    """
    try:
        yield
    except OSError as e:
        fix = WRITE_REFUSALS.get(e.errno) if e.errno is not None else None
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


def kind_for(path: str | os.PathLike) -> str:
    """The kind of output bbem writes at ``path``, from its suffix (default: a zarr volume)."""
    return _SUFFIX_KINDS.get(Path(path).suffix.lower(), "zarr")


def sniff_kind(path: str | os.PathLike) -> str | None:
    """What is at ``path`` now (see ``_KIND_WORDS``), from its content; None if nothing."""
    p = Path(path)
    if not (p.exists() or p.is_symlink()):
        return None
    if p.is_dir():
        zarr_marks = ("zarr.json", ".zgroup", ".zarray")
        return "zarr" if any((p / m).is_file() for m in zarr_marks) else "directory"
    if not p.is_file():
        return "other"
    try:
        with p.open("rb") as f:
            head = f.read(4096)
    except OSError:
        return "file"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[:8] == b"\x89HDF\r\n\x1a\n":
        return "hdf5"
    if head[:4] == b"PK\x03\x04":
        if _is_torch_zip(p):
            return "torch"
        return "npz" if p.suffix.lower() == ".npz" else "file"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "file"
    if p.suffix.lower() == ".json" or text.lstrip()[:1] in ("{", "["):
        try:
            json.loads(p.read_text())
            return "json"
        except (ValueError, OSError):
            pass
    return "text" if p.suffix.lower() in _SUFFIX_KINDS else "file"


def _is_torch_zip(p: Path) -> bool:
    """torch.save's zip archive: one folder holding ``data.pkl``."""
    import zipfile

    try:
        with zipfile.ZipFile(p) as z:
            return any(n.endswith("/data.pkl") or n == "data.pkl" for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def describe(path: str | os.PathLike) -> str:
    """A few words on what is at ``path`` ("a folder of 12 entries", "a tiff file")."""
    kind = sniff_kind(path)
    if kind is None:
        return "nothing"
    if kind == "directory":
        n = sum(1 for _ in Path(path).iterdir())
        return f"a folder of {n} entr{'y' if n == 1 else 'ies'}" if n else "an empty folder"
    return _KIND_WORDS[kind]


def _local_path(ref: str | os.PathLike) -> Path | None:
    """The local filesystem path an input reference names (``x.hdf:volumes/raw`` -> x.hdf)."""
    s = os.fspath(ref)
    if "://" in s and not s.startswith("file://"):
        return None
    s = s.removeprefix("file://")
    p = Path(s)
    if not p.exists() and ":" in s:  # path:key, the key naming a dataset inside the container
        head = s.rsplit(":", 1)[0]
        while head and not Path(head).exists() and ":" in head:
            head = head.rsplit(":", 1)[0]
        p = Path(head)
    return p.resolve()


def check_not_input(output: str | os.PathLike, inputs: Iterable[str | os.PathLike | None]) -> None:
    """Refuse an output that is, contains or lies inside one of ``inputs``."""
    out = Path(output).resolve()
    for ref in inputs:
        if ref is None:
            continue
        inp = _local_path(ref)
        if inp is None:
            continue
        if out == inp:
            how = "is"
        elif inp in out.parents:
            how = "lies inside"
        elif out in inp.parents:
            how = "contains"
        else:
            continue
        raise UserError(
            f"output {output} {how} the input {ref}: choose an output path outside the inputs"
        )


def check_output(
    path: str | os.PathLike,
    overwrite: bool,
    kind: str | None = None,
    inputs: Iterable[str | os.PathLike | None] = (),
) -> Path:
    """Refuse an output that would destroy data; return it as a Path.

    Refused: an output that is, contains or lies inside an input; an existing output without
    ``overwrite``; with ``overwrite``, an existing output of another kind than ``kind``
    (default :func:`kind_for` the path), such as a folder of other files.
    """
    p = Path(path)
    check_not_input(p, inputs)
    kind = kind or kind_for(p)
    if not (p.exists() or p.is_symlink()):
        check_writable(p)
        return p
    if not overwrite:
        raise UserError(f"output {p} exists: choose another path or pass --overwrite")
    found = sniff_kind(p)
    if found != kind:
        raise UserError(
            f"output {p} is {describe(p)}, not {_KIND_WORDS[kind]} bbem wrote: --overwrite "
            "replaces only a bbem output of the same kind; move it away or choose another path"
        )
    return p


def _writable_parent(p: Path) -> None:
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"cannot write {p}: a file stands where a folder must be") from None
    except OSError as e:
        raise UserError(f"cannot create the folder {p.parent}: {e.strerror}") from None
    if not os.access(p.parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {p}: the folder {p.parent} is not writable")


@contextlib.contextmanager
def atomic_output(
    path: str | os.PathLike,
    overwrite: bool = False,
    kind: str | None = None,
    inputs: Iterable[str | os.PathLike | None] = (),
) -> Iterator[Path]:
    """Yield a temporary path to write to; on success it replaces ``path``.

    :func:`check_output` decides first whether ``path`` may be written. On an exception the
    temporary is removed and ``path`` is left as it was. The temporary sits in the same
    directory so the final rename stays on one filesystem (atomic for files; for a directory
    the old one is removed just before the rename).
    """
    final = check_output(path, overwrite, kind, inputs)
    tmp = partial_path(final)
    with os_refusals(final):  # the OS may still refuse (root, ACLs, a full disk mid-write)
        _writable_parent(final)
        remove(tmp)
        try:
            yield tmp
            if final.is_dir() and not final.is_symlink():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                remove(tmp)
            raise


def write_json(data: Any, path: str | os.PathLike) -> Path:
    """Write ``data`` as strict JSON, atomically, replacing an earlier JSON file.

    NaN and infinities become null (strict JSON has neither); NumPy scalars and arrays become
    numbers and lists; tuples become lists; keys become strings.
    """
    with atomic_output(path, overwrite=True, kind="json") as tmp:
        tmp.write_text(json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n")
    return Path(path)


def json_safe(x: Any) -> Any:
    """``x`` with only what strict JSON holds (see :func:`write_json`)."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):
        x = x.tolist()  # a NumPy scalar gives a Python number, an array nested lists
        if isinstance(x, list):
            return json_safe(x)
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


# -- locks ----------------------------------------------------------------------------------------


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file beside an output: ``<output>.lock``."""
    p = Path(path)
    return p.with_name(p.name + ".lock")


def _holder(lock: Path) -> str:
    try:
        h = json.loads(lock.read_text())
        return f"pid {h['pid']} on {h['host']} (`{h['command']}`, since {h['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _open_locked(lock: Path, path: str | os.PathLike) -> int:
    """A descriptor of ``lock`` holding its exclusive flock; UserError naming a live holder."""
    import fcntl

    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(
                f"{path} is being written by {_holder(lock)}: wait for that run to finish or "
                "stop it (a lock left by a killed run is taken over automatically)"
            ) from None
        # The holder we waited on may have unlinked the file between our open and flock: then
        # we hold a lock on a name nobody sees, so start again on the new file.
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


@contextlib.contextmanager
def output_lock(path: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive lock on ``path`` (an output or a run directory) while the block runs.

    The lock is ``fcntl.flock`` on ``<path>.lock``, which names its holder. The kernel releases
    a flock when its process dies, so a lock left by a killed run is taken over without asking.
    A second run while the first is alive gets a :class:`UserError` naming the holder.
    """
    lock = lock_path(path)
    with os_refusals(lock):
        _writable_parent(lock)
        fd = _open_locked(lock, path)
    try:
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": " ".join(["bbem", *sys.argv[1:]])[:200],
            "since": _dt.datetime.now().isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        yield lock
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)
