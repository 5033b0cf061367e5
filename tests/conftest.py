"""Shared fixtures: the real EM crops beside the project, and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
#: ../shared/data beside the clone (CI always has it); BBEM_SHARED_DATA overrides.
SHARED_DATA = Path(os.environ.get("BBEM_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture
def shared_data() -> Path:
    """The folder of real EM crops; the test is skipped where it is absent."""
    if not (SHARED_DATA / "vnc-stack1-left.hdf").is_file():
        pytest.skip(f"real EM crops not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def read_only_dir(tmp_path: Path):
    """``tmp_path / "ro"``, a folder this user may not write to; skipped where that cannot be
    made (root writes into read-only folders)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as root: a read-only folder does not stop writes")
        yield ro
    finally:
        ro.chmod(0o755)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def run_bbem(
    *args: object,
    cwd: str | os.PathLike | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 300,
):
    """Run the ``bbem`` command as a user would (a subprocess, one torch thread); the result."""
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "bbem", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def assert_user_error(r, command: str, match: str = "") -> str:
    """Exit 2, one line on stderr naming the command, no traceback; returns the line."""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"bbem {command}: error: "), lines[0]
    assert match.lower() in lines[0].lower(), (match, lines[0])
    return lines[0]


def tree_digest(path: str | os.PathLike) -> dict[str, str]:
    """sha256 of every file under ``path`` (or of the file itself), by relative name."""
    import hashlib

    p = Path(path)
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    return {str(f.relative_to(p)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def first_voxel_instances(mask: np.ndarray, min_size: int) -> np.ndarray:
    """Oracle on the whole volume for bbem's cleft ids: cc3d's 26-components of ``mask != 0``,
    those under ``min_size`` voxels dusted, numbered 1..n in the z-y-x scan order of their first
    voxel (bbem.metrics.label_objects' documented numbering)."""
    import cc3d

    m = np.asarray(mask) != 0
    kept = cc3d.dust(m, threshold=min_size, connectivity=26) if min_size else m
    lab = cc3d.connected_components(kept, connectivity=26).astype(np.int64).ravel()
    at = np.flatnonzero(lab)
    ids, first = np.unique(lab[at], return_index=True)
    lut = np.zeros(int(lab.max()) + 1, np.int64)
    lut[ids[np.argsort(at[first])]] = np.arange(1, ids.size + 1)
    return lut[lab].reshape(m.shape)
