"""The demo's F1 at a validation-chosen threshold, read off the PR curve."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score

from bbem.demo import f1_at
from bbem.metrics.voxel import PRHistogram


@pytest.mark.parametrize("threshold", [0.0, 0.2, 0.5, 0.77, 1.0])
def test_f1_at_matches_sklearn(threshold):
    rng = np.random.default_rng(0)
    truth = rng.random(5000) < 0.05
    prob = np.clip(truth * 0.3 + rng.random(5000) * 0.7, 0, 1)
    levels = np.rint(prob * 255).astype(np.uint8)
    curve = PRHistogram().update(levels, truth).result()["curve"]
    want = f1_score(truth, levels >= np.ceil(threshold * 255 - 1e-9), zero_division=0)
    assert f1_at(curve, threshold) == pytest.approx(want, abs=1e-12)
