"""The config schema: overrides, loading, validation messages, the shipped configs."""

from __future__ import annotations

import pytest

from bbem.config import apply_overrides
from bbem.errors import UserError


def test_apply_overrides_parses_yaml_values_and_copies():
    base = {"bb": {"density": 0.5}, "model": {"channels": [8, 16]}}
    out = apply_overrides(
        base, ["model.channels=[16,32,64]", "bb.density=0.3", "bb.regrow=false", "new.a.b=x"]
    )
    assert out["model"]["channels"] == [16, 32, 64]
    assert out["bb"]["density"] == 0.3
    assert out["bb"]["regrow"] is False
    assert out["new"] == {"a": {"b": "x"}}
    assert base == {"bb": {"density": 0.5}, "model": {"channels": [8, 16]}}


def test_apply_overrides_errors():
    with pytest.raises(UserError, match=r"bb\.density is a value"):
        apply_overrides({"bb": {"density": 0.5}}, ["bb.density.x=1"])
    with pytest.raises(UserError, match="not key=value"):
        apply_overrides({}, ["bb.density"])
    with pytest.raises(UserError, match="empty part"):
        apply_overrides({}, ["bb..density=1"])
