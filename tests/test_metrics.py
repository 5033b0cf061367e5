"""bbem.metrics against independent oracles: scikit-learn for PR-AUC/F1, scipy's EDT (the CREMI
reference computation) for cleft distances, hand-built scenes for object matching."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from conftest import first_voxel_instances
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage
from sklearn.metrics import average_precision_score, f1_score, precision_recall_curve

from bbem.errors import UserError
from bbem.metrics import (
    CREMI_BACKGROUND,
    PRHistogram,
    evaluate,
    match,
    to_uint8,
    voxel_metrics,
)

VS = (40.0, 4.0, 4.0)


# -- voxel level: PR-AUC and F1 equal scikit-learn's ------------------------------------------------


def _sk_check(u8: np.ndarray, truth: np.ndarray, r: dict) -> None:
    y, s = truth.ravel().astype(bool), u8.ravel()
    with warnings.catch_warnings():  # sklearn warns on an all-negative truth
        warnings.simplefilter("ignore")
        ap = average_precision_score(y, s)
        prec, rec, thr = precision_recall_curve(y, s)
    assert r["pr_auc"] == pytest.approx(ap, abs=1e-6)
    np.testing.assert_allclose(r["curve"]["precision"], prec, atol=1e-12)
    np.testing.assert_allclose(r["curve"]["recall"], rec, atol=1e-12)
    np.testing.assert_allclose(np.asarray(r["curve"]["thresholds"]) * 255, thr, atol=1e-9)
    pred05 = s >= 128
    assert r["f1_05"] == pytest.approx(f1_score(y, pred05, zero_division=0), abs=1e-12)
    f1 = np.divide(2 * prec * rec, prec + rec, out=np.zeros_like(prec), where=prec + rec > 0)
    assert r["f1_best"] == pytest.approx(f1[:-1].max() if y.any() else 0.0, abs=1e-12)
    assert f1_score(y, s >= r["level_best"], zero_division=0) == pytest.approx(r["f1_best"])
    assert not any(np.isnan(v) for v in r["curve"]["precision"] + r["curve"]["recall"])


@pytest.mark.parametrize("seed", range(5))
def test_pr_auc_equals_sklearn_random(seed):
    rng = np.random.default_rng(seed)
    truth = rng.random((7, 11, 13)) < rng.uniform(0.01, 0.5)
    u8 = np.clip(truth * rng.integers(0, 120) + rng.integers(0, 200, truth.shape), 0, 255)
    u8 = u8.astype(np.uint8)
    r = PRHistogram().update(u8, truth).result()
    _sk_check(u8, truth, r)
    assert r["n_voxels"] == truth.size
    assert r["n_positive"] == truth.sum()


@pytest.mark.parametrize(
    "case",
    ["all_tied", "all_negative", "all_positive", "two_levels", "one_voxel", "perfect", "inverted"],
)
def test_pr_auc_equals_sklearn_adversarial(case, rng):
    truth = rng.random(500) < 0.3
    u8 = rng.integers(0, 256, 500).astype(np.uint8)
    if case == "all_tied":
        u8[:] = 77
    elif case == "all_negative":
        truth[:] = False
    elif case == "all_positive":
        truth[:] = True
    elif case == "two_levels":
        u8 = np.where(rng.random(500) < 0.5, 0, 255).astype(np.uint8)
    elif case == "one_voxel":
        truth, u8 = np.array([True]), np.array([200], np.uint8)
    elif case == "perfect":
        u8 = (truth * 255).astype(np.uint8)
    elif case == "inverted":
        u8 = ((~truth) * 255).astype(np.uint8)
    r = PRHistogram().update(u8, truth).result()
    _sk_check(u8, truth, r)
    if case == "all_negative":
        assert r["pr_auc"] == 0.0
        assert r["f1_best"] == 0.0
        assert r["recall_05"] == 0.0
    if case in ("all_positive", "perfect"):
        assert r["pr_auc"] == 1.0
        assert r["f1_best"] == 1.0


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 255), st.booleans()), min_size=1, max_size=60),
)
def test_pr_auc_property(pairs):
    u8 = np.array([p[0] for p in pairs], np.uint8)
    truth = np.array([p[1] for p in pairs])
    _sk_check(u8, truth, PRHistogram().update(u8, truth).result())


def test_blockwise_merge_and_mask_equal_whole(rng):
    truth = rng.random((12, 20, 20)) < 0.1
    u8 = rng.integers(0, 256, truth.shape).astype(np.uint8)
    mask = rng.random(truth.shape) < 0.7
    whole = PRHistogram().update(u8, truth, mask).result()
    parts = [
        PRHistogram().update(u8[z : z + 5], truth[z : z + 5], mask[z : z + 5]) for z in (0, 5, 10)
    ]
    merged = parts[0].merge(parts[1]).merge(parts[2]).result()
    assert merged == whole
    assert whole["pr_auc"] == pytest.approx(
        average_precision_score(truth[mask], u8[mask]), abs=1e-6
    )


def test_to_uint8_rounding_and_errors():
    p = np.array([0.0, 0.5, 1.0, 1 / 255, 127.5 / 255, 1.0000001, -1e-7], np.float32)
    np.testing.assert_array_equal(to_uint8(p), [0, 128, 255, 1, 128, 255, 0])
    assert to_uint8(np.float64(0.5)).dtype == np.uint8
    with pytest.raises(UserError, match="NaN"):
        to_uint8(np.array([0.2, np.nan]))
    with pytest.raises(UserError, match="logits"):
        to_uint8(np.array([-3.0, 2.0]))
    with pytest.raises(UserError, match="float"):
        to_uint8(np.array([1, 2]))


def test_voxel_metrics_float_equals_uint8_and_handles_labels(rng):
    prob = rng.random((4, 8, 8)).astype(np.float32)
    labels = np.where(rng.random(prob.shape) < 0.2, 7, 0).astype(np.uint64)
    labels[0, 0, :4] = CREMI_BACKGROUND  # CREMI background is not a cleft
    a = voxel_metrics(prob, labels)
    b = voxel_metrics(to_uint8(prob), labels == 7)
    assert a == b
    with pytest.raises(UserError, match="disagree"):
        voxel_metrics(prob, labels[:2])
    with pytest.raises(UserError, match=r"\[0, 255\]"):
        voxel_metrics(prob.astype(np.int32) + 300, labels)


# -- CREMI distances: perfect, shifted, and against scipy's whole-volume EDT ------------------------


def _sheet_scene() -> np.ndarray:
    """Three synapse-like sheets (1 section thick, different sizes) in a 20 x 48 x 48 volume."""
    t = np.zeros((20, 48, 48), np.uint64)
    t[5, 5:25, 5:9] = 3
    t[12, 30:44, 20:40] = 9
    t[12:16, 3:6, 35:45] = 11
    return t


def test_perfect_prediction_scores_one_and_distance_zero():
    truth = _sheet_scene()
    r = evaluate((truth > 0).astype(np.float32), truth, voxel_size=VS, min_size=1)
    assert r["voxel"]["pr_auc"] == 1.0
    assert r["voxel"]["f1_best"] == 1.0
    assert r["voxel"]["f1_05"] == 1.0
    for rule in ("iou_0.2", "iou_0.5"):
        assert r["object"][rule]["f1"] == 1.0
        assert r["object"][rule]["tp"] == 3
    c = r["cremi"]
    assert c["fp"] == c["fn"] == 0
    assert c["fscore"] == 1.0
    assert c["adf"]["max"] == 0.0
    assert c["adgt"]["max"] == 0.0
    assert c["score"] == 0.0
    assert r["protocol"]["objects"]["truth_instances"] == "labels"


@pytest.mark.parametrize(("sections", "expect_far"), [(1, False), (6, True)])
def test_prediction_shifted_by_sections_gives_expected_distance(sections, expect_far):
    truth = np.zeros((20, 32, 32), np.uint8)
    truth[5, 8:20, 8:20] = 1
    pred = np.roll(truth, sections, axis=0).astype(np.float32) * 0.9
    r = evaluate(pred, truth, voxel_size=VS, min_size=1)["cremi"]
    d = 40.0 * sections
    for k in ("adf", "adgt"):
        assert r[k]["mean"] == pytest.approx(d)
        assert r[k]["max"] == pytest.approx(d)
        assert r[k]["std"] == pytest.approx(0.0, abs=1e-9)
    assert r["score"] == pytest.approx(d)
    assert r["adf_mean"] == pytest.approx(d)
    n = 12 * 12
    assert (r["fp"], r["fn"]) == ((n, n) if expect_far else (0, 0))


def _cremi_reference(pred_b, truth_b, scored, vs, thr=200.0):
    """The CREMI evaluation code's computation: whole-volume EDT with sampling in nm."""
    dt_truth = ndimage.distance_transform_edt(~truth_b, sampling=vs)
    dt_pred = ndimage.distance_transform_edt(~pred_b, sampling=vs)
    d_pred = dt_truth[pred_b & scored]
    d_truth = dt_pred[truth_b & scored]
    return {
        "fp": int((d_pred > thr).sum()),
        "fn": int((d_truth > thr).sum()),
        "adf": d_pred,
        "adgt": d_truth,
    }


@pytest.mark.parametrize("margin", [None, (2, 5, 3)])
def test_cremi_distances_equal_whole_volume_edt(rng, margin):
    shape = (16, 90, 80)
    truth_b = ndimage.binary_dilation(rng.random(shape) < 0.001, iterations=2)
    truth_b[:, :, 30:] = False  # so predictions on the right are more than 200 nm away
    pred_b = ndimage.binary_dilation(rng.random(shape) < 0.003, iterations=1)
    pred_b[3:5, :10, :10] = True  # and a blob touching the border
    truth = truth_b.astype(np.uint8)
    prob = np.where(pred_b, 0.8, 0.1).astype(np.float32)
    scored = np.ones(shape, bool)
    if margin:
        mz, my, mx = margin
        scored[:] = False
        scored[mz : shape[0] - mz, my : shape[1] - my, mx : shape[2] - mx] = True
    # small slabs: many slab faces cut through the objects
    r = evaluate(prob, truth, voxel_size=VS, margin=margin, slab_voxels=3 * 90 * 80)
    ref = _cremi_reference(pred_b, truth_b, scored, VS, thr=200.0)
    c = r["cremi"]
    assert (c["fp"], c["fn"]) == (ref["fp"], ref["fn"])
    for k in ("adf", "adgt"):
        d = ref[k]
        assert c[k]["count"] == d.size
        assert c[k]["mean"] == pytest.approx(d.mean(), rel=1e-9)
        assert c[k]["std"] == pytest.approx(d.std(), rel=1e-9, abs=1e-9)
        assert c[k]["median"] == pytest.approx(np.median(d))
        assert c[k]["max"] == pytest.approx(d.max())
    assert c["score"] == pytest.approx((ref["adf"].mean() + ref["adgt"].mean()) / 2)
    # a threshold of 200 nm with 40 nm sections: some voxels must be on each side to mean anything
    assert 0 < c["fp"] < c["n_pred"]


def test_cremi_no_prediction_is_defined_not_nan():
    truth = _sheet_scene()
    r = evaluate(np.zeros(truth.shape, np.uint8), truth, voxel_size=VS)
    c = r["cremi"]
    assert c["adgt"] is None
    assert c["adf"] is None
    assert c["score"] is None
    assert c["fp"] == 0
    assert c["fn"] == int((truth > 0).sum())
    assert c["fscore"] == 0.0
    assert r["object"]["iou_0.5"]["f1"] == 0.0
    assert r["object"]["iou_0.5"]["missed"] == 3
    json.dumps(r, allow_nan=False)  # every number is finite or null


def test_cremi_skips_with_reason_when_too_many_points():
    truth = _sheet_scene()
    r = evaluate(np.ones(truth.shape, np.float32), truth, voxel_size=VS, max_cremi_points=100)
    assert "raise the threshold" in r["cremi"]["skipped"]
    assert r["cremi"]["score"] is None


# -- objects: hand-built split / merged / missed / spurious -----------------------------------------


def _object_scene():
    """Truth: A (split by the prediction), B and C (merged), D (missed), F (found); prediction:
    also a spurious blob E and a tiny speck."""
    t = np.zeros((10, 60, 60), np.uint16)
    p = np.zeros(t.shape, np.float32)
    t[2:6, 2:12, 2:22] = 1  # A: 800 voxels
    p[2:6, 2:12, 2:11] = 0.9  # A split in two halves, IoU 0.45 each
    p[2:6, 2:12, 13:22] = 0.9
    t[2:6, 20:30, 2:8] = 2  # B
    t[2:6, 20:30, 10:16] = 3  # C
    p[2:6, 20:30, 2:16] = 0.9  # one prediction over B and C (and the gap): IoU 240/560
    t[2:6, 40:50, 40:50] = 4  # D: missed
    t[6:9, 35:45, 5:15] = 5  # F: found, but the prediction is shifted a little (IoU 0.4)
    p[6:9, 39:49, 5:15] = 0.9
    p[2:6, 52:58, 30:40] = 0.7  # E: spurious
    p[0, 0, 59] = 0.9  # a one-voxel speck: dropped by min_size
    return t, p


def test_object_matching_hand_built_cases():
    t, p = _object_scene()
    r = evaluate(p, t, voxel_size=VS, min_size=10)
    o = r["object"]
    assert o["n_true"] == 5
    assert o["n_pred"] == 5
    assert o["removed_small"] == 1
    assert o["split"] == 1
    assert o["merged"] == 1
    # IoU > 0.2: one half of A, B (or C) in the merge, F: 3 matched
    lo = o["iou_0.2"]
    assert (lo["tp"], lo["missed"], lo["spurious"]) == (3, 2, 2)
    assert lo["precision"] == pytest.approx(3 / 5)
    assert lo["recall"] == pytest.approx(3 / 5)
    # IoU > 0.5: nothing overlaps that well
    hi = o["iou_0.5"]
    assert (hi["tp"], hi["missed"], hi["spurious"]) == (0, 5, 5)
    assert hi["f1"] == 0.0


def test_object_results_do_not_depend_on_slabs_or_instances_mode():
    t, p = _object_scene()
    whole = evaluate(p, t, voxel_size=VS, min_size=10)
    sliced = evaluate(p, t, voxel_size=VS, min_size=10, slab_voxels=60 * 60)  # one section each
    assert whole["object"] == sliced["object"]
    assert whole["voxel"] == sliced["voxel"]
    # binary truth: instances are its components; B and C are apart, so the same objects
    binary = evaluate(p, t > 0, voxel_size=VS, min_size=10)
    assert binary["protocol"]["objects"]["truth_instances"] == "components"
    assert binary["object"] == whole["object"]


@pytest.mark.parametrize("connectivity", [6, 18, 26])
def test_streamed_components_equal_whole_volume_cc3d(rng, connectivity):
    """Slab-by-slab labelling joined across faces gives cc3d's whole-volume components."""
    import cc3d

    from bbem.metrics import Objects

    b = rng.random((12, 30, 30)) < 0.25  # dense enough for diagonal-only contacts everywhere
    whole = cc3d.connected_components(b, connectivity=connectivity)
    expect = np.sort(np.bincount(whole.ravel())[1:])
    for depth in (1, 5):
        obj = Objects("components", connectivity)
        for z0 in range(0, 12, depth):
            obj.add(b[z0 : z0 + depth], z0)
        _, sizes, cents, _ = obj.finish()
        np.testing.assert_array_equal(np.sort(sizes), expect)
        # centroids: the mean coordinate of each component, as scipy computes it
        ref = ndimage.center_of_mass(b, whole, range(1, whole.max() + 1))
        np.testing.assert_allclose(np.sort(cents[:, 0]), np.sort([c[0] for c in ref]), rtol=1e-9)


def test_labels_keep_touching_instances_apart():
    t = np.zeros((4, 20, 20), np.uint32)
    t[1:3, 2:10, 2:10] = 1
    t[1:3, 2:10, 10:18] = 2  # touches instance 1
    p = (t == 1).astype(np.float32)
    o = evaluate(p, t, min_size=1)["object"]
    assert o["n_true"] == 2
    assert o["iou_0.5"]["tp"] == 1
    assert o["iou_0.5"]["missed"] == 1
    o = evaluate(p, t, min_size=1, truth_instances="components")["object"]
    assert o["n_true"] == 1
    assert o["iou_0.5"]["tp"] == 0  # IoU exactly 0.5 is not above 0.5


def test_centroid_matching_in_nm():
    t = np.zeros((10, 40, 40), np.uint8)
    t[4, 10:20, 10:20] = 1
    t[4, 25:35, 25:35] = 2
    p = np.zeros(t.shape, np.float32)
    p[6, 10:20, 10:20] = 0.9  # 2 sections = 80 nm from truth 1, no overlap
    p[4, 25:35, 2:12] = 0.9  # 23 px * 4 nm = 92 nm from truth 2
    o = evaluate(p, t, voxel_size=VS, min_size=1, match_distance_nm=85)["object"]
    c = o["centroid_85nm"]
    assert (c["tp"], c["missed"], c["spurious"]) == (1, 1, 1)
    assert o["iou_0.2"]["tp"] == 0


def test_match_is_one_to_one_and_maximal():
    # greedy on score would take (1, a) and leave b unmatched; the optimum matches both
    cand = [(1, "a", 0.9), (1, "b", 0.8), (2, "a", 0.3)]
    m = match(cand)
    assert sorted((p, t) for p, t, _ in m) == [(1, "b"), (2, "a")]
    assert match([]) == []


# -- bad input: a clear UserError ---------------------------------------------------------------


def test_bad_inputs_raise_user_errors():
    truth = _sheet_scene()
    good = (truth > 0).astype(np.float32)
    with pytest.raises(UserError, match="disagree"):
        evaluate(good[:10], truth)
    # no cleft voxel in the truth: evaluated, with PR-AUC undefined (None, null in the JSON)
    assert evaluate(good, np.zeros_like(truth))["voxel"]["pr_auc"] is None
    with pytest.raises(UserError, match=r"sections 0-19.*\[0, 1\]"):
        evaluate(good * 3, truth)
    with pytest.raises(UserError, match=r"\[0, 255\]"):
        evaluate(good.astype(np.int16) * 300, truth)
    bad = good.copy()
    bad[3, 3, 3] = np.nan
    with pytest.raises(UserError, match="NaN"):
        evaluate(bad, truth)
    with pytest.raises(UserError, match="margin"):
        evaluate(good, truth, margin=(10, 0, 0))
    with pytest.raises(UserError, match="threshold"):
        evaluate(good, truth, threshold=1.5)
    with pytest.raises(UserError, match="mask shape"):
        evaluate(good, truth, mask=np.ones((1, 2, 3)))
    with pytest.raises(UserError, match="3D"):
        evaluate(good[0], truth[0])


def test_cremi_background_and_mask():
    truth = _sheet_scene()
    raw = np.where(truth == 0, CREMI_BACKGROUND, truth).astype(np.uint64)
    prob = (truth > 0).astype(np.float32)
    a, b = evaluate(prob, raw, voxel_size=VS), evaluate(prob, truth, voxel_size=VS)
    assert a["voxel"] == b["voxel"]
    assert a["cremi"] == b["cremi"]
    mask = np.zeros(truth.shape, np.uint8)
    mask[:10] = 1  # only the first sheet is scored
    r = evaluate(prob, truth, mask=mask, voxel_size=VS, min_size=1)
    assert r["voxel"]["n_voxels"] == mask.sum()
    assert r["object"]["n_true"] == 1
    assert r["protocol"]["mask"] == "mask"


# -- real EM labels and the command line -----------------------------------------------------------


def test_real_labels_against_themselves(shared_data):
    from bbem.volumes import open_volume

    truth = open_volume(shared_data / "vnc-stack1-left.hdf", key="volumes/labels/clefts")
    pred = truth[:, :, :] > 0  # a bool prediction: levels 0 and 255
    r = evaluate(pred, truth, voxel_size=None, min_size=1)
    assert r["voxel"]["pr_auc"] == 1.0
    assert r["cremi"]["score"] == 0.0
    assert r["object"]["iou_0.5"]["f1"] == 1.0
    assert r["object"]["n_true"] == 33
    assert r["protocol"]["voxel_size_nm"] == [50.0, 4.6, 4.6]
    assert r["voxel"]["positive_fraction"] == pytest.approx(0.0076, abs=0.0005)


def _write(path, arr, vs=VS):
    from bbem.volumes import write_volume

    write_volume(path, arr, voxel_size=vs)
    return str(path)


def test_cli_writes_json_and_plot(tmp_path, capsys):
    from bbem.cli import main

    truth = _sheet_scene().astype(np.uint32)
    rng = np.random.default_rng(1)
    prob = np.clip((truth > 0) * 0.6 + rng.random(truth.shape) * 0.5, 0, 1).astype(np.float32)
    pred = _write(tmp_path / "pred.zarr", prob)
    lab = _write(tmp_path / "truth.zarr", truth)
    out, png = tmp_path / "r.json", tmp_path / "pr.png"
    code = main(
        ["evaluate", pred, lab, "--json", str(out), "--plot", str(png), "--margin", "1,2,2"]
    )
    assert code == 0
    shown = capsys.readouterr().out
    assert "PR-AUC" in shown
    assert "protocol" in shown
    r = json.loads(out.read_text())
    for k in ("pr_auc", "f1_best", "threshold_best", "f1_05", "precision_05", "recall_05"):
        assert 0 <= r["voxel"][k] <= 1
    for k in ("fp", "fn", "adf", "adgt", "score"):
        assert k in r["cremi"]
    assert r["protocol"]["margin_voxels"] == [1, 2, 2]
    assert r["protocol"]["voxel_size_nm"] == list(VS)
    assert png.stat().st_size > 10_000
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys):
    from bbem.cli import main

    truth = _sheet_scene().astype(np.uint32)
    pred = _write(tmp_path / "pred.zarr", np.full((20, 48, 40), 0.5, np.float32))
    lab = _write(tmp_path / "truth.zarr", truth)
    assert main(["evaluate", pred, lab]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "disagree" in err[0]


def test_dask_input_and_cremi_off():
    import dask.array as da

    truth = _sheet_scene()
    prob = (truth > 0).astype(np.float32)
    r = evaluate(
        da.from_array(prob, chunks=(4, 24, 24)), da.from_array(truth), cremi=False, min_size=1
    )
    assert r["voxel"]["pr_auc"] == 1.0
    assert r["object"]["iou_0.5"]["tp"] == 3
    assert r["cremi"]["skipped"].startswith("not requested")
    assert r["cremi"]["score"] is None


@pytest.mark.parametrize(
    ("dtype", "ids"), [(np.int32, (-5, 7)), (np.uint64, (2**63 + 5, 3)), (np.int64, (1, 2**40))]
)
def test_any_label_ids_are_instances(dtype, ids):
    t = np.zeros((6, 20, 20), dtype)
    t[1:4, 2:8, 2:8] = ids[0]
    t[1:4, 10:18, 10:18] = ids[1]
    o = evaluate((t != 0).astype(np.float32), t, min_size=1)["object"]
    assert o["n_true"] == 2
    assert o["iou_0.5"]["tp"] == 2
    assert o["iou_0.5"]["f1"] == 1.0


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    depth=st.integers(1, 7),
    vs=st.tuples(st.sampled_from([1.0, 4.0, 40.0, 50.0]), st.sampled_from([1.0, 4.0, 4.6])),
    density=st.sampled_from([0.01, 0.05, 0.3]),
)
def test_cremi_property_any_slab_depth(seed, depth, vs, density):
    """Exact against scipy's EDT for any slab depth, voxel size and density of the sets."""
    r_ = np.random.default_rng(seed)
    shape = (7, 9, 8)
    truth_b = r_.random(shape) < density
    truth_b[r_.integers(0, 7), r_.integers(0, 9), r_.integers(0, 8)] = True
    pred_b = r_.random(shape) < density
    voxel = (vs[0], vs[1], vs[1])
    r = evaluate(
        pred_b.astype(np.uint8) * 255,
        truth_b,
        voxel_size=voxel,
        slab_voxels=depth * 9 * 8,
        cremi_distance_nm=3 * vs[1],
    )["cremi"]
    ref = _cremi_reference(pred_b, truth_b, np.ones(shape, bool), voxel, thr=3 * vs[1])
    assert (r["fp"], r["fn"]) == (ref["fp"], ref["fn"])
    if ref["adgt"].size and pred_b.any():
        assert r["adgt"]["mean"] == pytest.approx(ref["adgt"].mean(), rel=1e-9, abs=1e-12)
        assert r["adgt"]["max"] == pytest.approx(ref["adgt"].max())
    if ref["adf"].size:
        assert r["adf"]["mean"] == pytest.approx(ref["adf"].mean(), rel=1e-9, abs=1e-12)
        assert r["adf"]["median"] == pytest.approx(np.median(ref["adf"]))


@pytest.mark.parametrize("slab", [1, 3, 7, 13, 40])
def test_label_objects_matches_cc3d_dust_and_numbers_by_first_voxel(rng, slab):
    import cc3d

    from bbem.metrics import label_objects

    for density in (0.05, 0.3):
        for min_size in (0, 6):
            m = (rng.random((13, 24, 20)) < density).astype(np.uint8)
            want = first_voxel_instances(m, min_size)
            got = np.zeros(m.shape, np.uint32)
            n = label_objects(m, got, min_size=min_size, slab=slab)
            assert np.array_equal(got, want)
            assert n == want.max()
            assert set(np.unique(got)) == set(range(n + 1))  # consecutive, background 0
            # the same partition as cc3d's own numbering, small components gone
            ref = cc3d.connected_components(
                cc3d.dust(m.astype(bool), threshold=min_size, connectivity=26), connectivity=26
            )
            pairs = np.unique(np.stack([got[got > 0], ref[got > 0]]), axis=1)
            assert pairs.shape[1] == n == ref.max()
            # in place, on a uint32 mask: the same ids
            inplace = m.astype(np.uint32)
            assert label_objects(inplace, min_size=min_size, slab=slab) == n
            assert np.array_equal(inplace, want)


def test_label_objects_joins_across_slabs_and_diagonals():
    from bbem.metrics import label_objects

    m = np.zeros((9, 6, 6), np.uint8)
    m[0:9, 1, 1] = 1  # one column through every slab
    m[4, 4, 4] = 1  # touches the next only at a corner: 26-connected, one object
    m[5, 5, 5] = 1
    m[8, 5, 0] = 1  # alone, and last in scan order
    m[0, 0, 5] = 1  # alone, and first in scan order: (0, 0, 5) comes before (0, 1, 1)
    for slab in (1, 2, 4, 9):
        got = np.zeros(m.shape, np.uint32)
        assert label_objects(m, got, slab=slab) == 4
        assert got[0, 0, 5] == 1
        assert set(got[0:9, 1, 1].tolist()) == {2}
        assert got[4, 4, 4] == got[5, 5, 5] == 3
        assert got[8, 5, 0] == 4
        assert (got[m == 0] == 0).all()
        got = np.zeros(m.shape, np.uint32)
        assert label_objects(m, got, min_size=2, slab=slab) == 2  # the single voxels go
        assert got[0, 0, 5] == got[8, 5, 0] == 0
        assert got[0, 1, 1] == 1
        assert got[4, 4, 4] == 2
    # 6-connectivity: the diagonal pair is two objects
    got = np.zeros(m.shape, np.uint32)
    assert label_objects(m, got, connectivity=6, slab=2) == 5
    assert got[4, 4, 4] == 3
    assert got[5, 5, 5] == 4
    # 300 objects do not fit uint8 ids: refused, not wrapped around
    stripes = np.broadcast_to((np.arange(600) % 2).astype(np.uint8)[None, :, None], (1, 600, 2))
    with pytest.raises(ValueError, match="fit"):
        label_objects(stripes, np.zeros(stripes.shape, np.uint8))


def test_label_objects_interrupted_in_place_and_run_again_gives_the_same_ids(rng):
    """A finish killed while writing ids (some slabs numbered, some still 0/1, small objects
    partly cleared) and run again ends with the ids an uninterrupted run writes."""
    from bbem.metrics import label_objects

    m = (rng.random((12, 20, 20)) < 0.15).astype(np.uint32)
    want = first_voxel_instances(m, 4)
    assert want.max() > 1
    assert (want[m > 0] == 0).any()

    class Dies:
        def __init__(self, a: np.ndarray, writes: int) -> None:
            self.a, self.writes = a, writes
            self.shape, self.dtype = a.shape, a.dtype

        def __getitem__(self, k):
            return self.a[k]

        def __setitem__(self, k, v):
            if not self.writes:
                raise KeyboardInterrupt
            self.writes -= 1
            self.a[k] = v

    for writes in range(1, 4):
        a = m.copy()
        with pytest.raises(KeyboardInterrupt):
            label_objects(Dies(a, writes), min_size=4, slab=3)
        assert not np.array_equal(a, m)
        assert not np.array_equal(a, want)
        label_objects(a, min_size=4, slab=5)  # another slab, even
        assert np.array_equal(a, want)
