"""bbem's one threshold rule: infer's labels, evaluate's counts and the plugin's clefts agree.

A probability is stored as the uint8 level L = rint(255 p) and is a cleft at t when
L >= threshold_level(t). The awkward cases sit on either side of a level boundary: p = 0.5005
is stored as 128, a cleft at t = 128/255 although p < t as floats.
"""

from __future__ import annotations

from pathlib import Path

import cc3d
import numpy as np
import pytest
import torch
from conftest import first_voxel_instances

from bbem.errors import UserError
from bbem.infer import predict_volume
from bbem.metrics import evaluate, to_uint8
from bbem.metrics.threshold import binarize, threshold_level
from bbem.volumes import open_volume, write_volume

PROBS = (0.5005, 0.4990, 0.5, 128 / 255, 127 / 255, 0.0, 1.0)
THRESHOLDS = (128 / 255, 0.5, 0.499, 0.0, 1.0)


class _Echo(torch.nn.Module):
    """A "network" whose probability is its input, voxel by voxel (logits = logit(raw)), so
    the prediction is exactly the probabilities the test chose. Downsamples by 1."""

    strides = ((1, 1, 1),)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = x.clamp(1e-7, 1 - 1e-7)
        return torch.log(p) - torch.log1p(-p)


@pytest.fixture(scope="module")
def prob_volume(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """Float probabilities [4, 16, 21]: each of PROBS in blocks of 3 x-columns, in patches."""
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(PROBS), size=(4, 4, 7)).repeat(4, axis=1).repeat(3, axis=2)
    data = np.asarray(PROBS, dtype=np.float32)[idx]
    return write_volume(tmp_path_factory.mktemp("rule") / "p.zarr", data), data


def test_threshold_level_and_binarize():
    assert threshold_level(0) == 0
    assert threshold_level(1) == 255
    assert threshold_level(0.5) == 128
    assert threshold_level(128 / 255) == 128
    assert threshold_level(np.float32(128 / 255)) == 128  # a float32 round trip of a level
    assert threshold_level(127 / 255) == 127
    assert threshold_level(0.499) == 128
    assert threshold_level(1e-3) == 1
    assert threshold_level(254.5 / 255) == 255
    # every level is its own threshold, and the rule is "the smallest level at or above t"
    for level in range(256):
        assert threshold_level(level / 255) == level
    for t in np.linspace(0, 1, 1001):
        lv = threshold_level(t)
        assert lv / 255 >= t - 1e-6
        assert lv == 0 or (lv - 1) / 255 < t
    for bad in (-0.01, 1.01, float("nan"), "half"):
        with pytest.raises(UserError, match=r"probability in \[0, 1\]"):
            threshold_level(bad)  # type: ignore[arg-type]
    levels = np.arange(256, dtype=np.uint8).reshape(4, 8, 8)
    got = binarize(levels, 0.5)
    assert got.dtype == bool
    assert got.shape == levels.shape
    assert np.array_equal(got, levels >= 128)
    assert binarize(levels, 0).all()
    assert binarize(levels, 1).sum() == 1
    with pytest.raises(UserError, match="uint8"):
        binarize(levels / 255, 0.5)  # floats are thresholded only as they are stored


@pytest.mark.parametrize("t", THRESHOLDS)
def test_infer_evaluate_and_plugin_agree(prob_volume, tmp_path, t):
    threshold_clefts = pytest.importorskip("napari_bbem.predict").threshold_clefts
    path, probs = prob_volume
    out = predict_volume(
        _Echo(),
        path,
        tmp_path / "o.zarr",
        roi_size=(2, 8, 8),
        block=(2, 8, 8),
        threshold=t,
        min_size=0,
        progress=False,
    ).output
    levels = open_volume(out).read()
    ids = open_volume(out / "labels" / "clefts").read()
    assert ids.dtype == np.uint32
    labels = ids > 0
    assert np.array_equal(levels, to_uint8(probs))  # the echo network stored what we chose
    # infer: the rule on the stored levels, not on the float probabilities
    assert np.array_equal(labels, levels >= threshold_level(t))
    if t == 128 / 255:
        awkward = probs == np.float32(0.5005)
        assert awkward.any()
        assert (levels[awkward] == 128).all()
        assert labels[awkward].all()
        assert (probs[awkward] < t).all()
    # evaluate, on the levels and on the float probabilities: the same voxels, the same objects
    n_objects = int(cc3d.connected_components(labels, connectivity=26).max())
    for pred in (levels, probs):
        r = evaluate(pred, labels, threshold=t, min_size=0, cremi=False)
        c = r["voxel"]["counts_at_threshold"]
        assert c["tp"] == labels.sum(), c
        assert c["fp"] == 0, c
        assert c["fn"] == 0, c
        assert r["protocol"]["threshold_level_u8"] == threshold_level(t)
        assert r["object"]["n_pred"] == n_objects
        if n_objects:
            assert r["object"]["iou_0.5"]["f1"] == 1.0
    # napari: the viewer's clefts are the same voxels, from levels or from probabilities
    assert ids.max() == n_objects
    for pred in (levels, probs):
        clefts = threshold_clefts(pred, t)
        assert np.array_equal(clefts > 0, labels)
        assert clefts.max() == n_objects
        assert np.array_equal(clefts, ids)  # the same cleft ids as well


def test_infer_labels_are_cleft_instances_whatever_the_block(tmp_path):
    """bbem infer's labels: 26-connected components of the thresholded levels, numbered 1..n by
    first voxel, small ones dropped, the same ids for any block size and in napari."""
    from scipy import ndimage

    threshold_clefts = pytest.importorskip("napari_bbem.predict").threshold_clefts
    rng = np.random.default_rng(3)
    smooth = ndimage.gaussian_filter(rng.normal(size=(12, 40, 36)), sigma=(0.8, 2.0, 2.0))
    probs = ((smooth - smooth.min()) / np.ptp(smooth)).astype(np.float32)
    path = write_volume(tmp_path / "p.zarr", probs)
    t, min_size = 0.62, 8
    mask = to_uint8(probs) >= threshold_level(t)
    want = first_voxel_instances(mask, min_size)
    everything = cc3d.connected_components(mask, connectivity=26)
    sizes = np.bincount(everything.ravel())[1:]
    # the test can fail: many clefts, some too small, some spanning blocks in z, y and x
    assert want.max() >= 5
    assert (sizes < min_size).any()
    got = {}
    for block in ((2, 8, 8), (4, 16, 12), (6, 24, 36)):
        out = predict_volume(
            _Echo(),
            path,
            tmp_path / f"o{block[0]}.zarr",
            roi_size=(2, 8, 8),
            block=block,
            threshold=t,
            min_size=min_size,
            progress=False,
        ).output
        assert np.array_equal(open_volume(out).read(), to_uint8(probs))
        got[block] = open_volume(out / "labels" / "clefts").read()
        assert got[block].dtype == np.uint32
        assert np.array_equal(got[block], want), block
    spans = [i for i in range(1, want.max() + 1) if np.ptp(np.nonzero(want == i)[0]) >= 4]
    assert spans  # a cleft over 3+ sections: several blocks of 2 sections, one id
    assert np.array_equal(threshold_clefts(probs, t, min_size=min_size), want)
