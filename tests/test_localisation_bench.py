"""bench/localisation.py: detection and localisation parts of a cleft prediction's PR-AUC."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from localisation import split_scores


def _sheet() -> np.ndarray:
    clefts = np.zeros((3, 40, 40), np.uint8)
    clefts[:, 10:12, 5:30] = 1  # a sheet 2 px thick along x
    return clefts


def test_a_perfect_prediction_scores_one_everywhere():
    clefts = _sheet()
    s = split_scores(clefts.astype(np.float32), clefts, radius=3)
    assert s["pr_auc"] == s["detection"] == s["localisation"] == pytest.approx(1.0)


def test_painting_the_band_detects_but_does_not_localise():
    from scipy import ndimage as ndi

    clefts = _sheet()
    band = ndi.binary_dilation(clefts > 0, np.ones((1, 7, 7), bool)).astype(np.float32)
    s = split_scores(band, clefts, radius=3)
    assert s["detection"] == pytest.approx(1.0)
    # a constant score inside the band: AP equals the positive fraction there
    assert s["localisation"] == pytest.approx(s["localisation_chance"])
    assert s["pr_auc"] < 0.5


def test_firing_away_from_the_synapse_fails_detection():
    clefts = _sheet()
    pred = np.zeros(clefts.shape, np.float32)
    pred[:, 30:32, 5:30] = 1.0  # a parallel sheet 19 px away
    s = split_scores(pred, clefts, radius=3)
    assert s["detection"] == pytest.approx(s["detection_chance"], abs=0.05)
