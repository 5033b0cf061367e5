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
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
