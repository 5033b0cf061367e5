"""bbem.atomic.write_json: the one strict-JSON writer (evaluation results, report summaries)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from bbem.atomic import write_json
from bbem.errors import UserError


def test_strict_json_from_numpy_and_non_finite_values(tmp_path):
    out = write_json(
        {
            "pr_auc": float("nan"),
            "f1": np.float32(0.5),
            "n": np.int64(3),
            "curve": np.array([0.0, np.inf]),
            "box": (1, 2),
            4: True,
        },
        tmp_path / "r.json",
    )
    text = out.read_text()
    assert "NaN" not in text
    assert "Infinity" not in text
    assert json.loads(text) == {
        "pr_auc": None,
        "f1": 0.5,
        "n": 3,
        "curve": [0.0, None],
        "box": [1, 2],
        "4": True,
    }
    assert not math.isnan(json.loads(text)["f1"])


def test_replaces_json_only(tmp_path):
    p = tmp_path / "r.json"
    write_json({"a": 1}, p)
    write_json({"a": 2}, p)  # an earlier JSON result is replaced
    assert json.loads(p.read_text()) == {"a": 2}
    other = tmp_path / "notes.json"
    other.mkdir()  # a folder where the file should go is not ours to replace
    with pytest.raises(UserError):
        write_json({"a": 1}, other)


def test_the_old_import_paths_still_work():
    from bbem.metrics import write_json as from_metrics
    from bbem.metrics.evaluate import write_json as from_evaluate

    assert from_metrics is write_json
    assert from_evaluate is write_json
