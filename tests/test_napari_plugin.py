"""napari-bbem: reader, prediction and on-rate functions without Qt; the widgets in a real viewer.

The Qt tests need an X display for napari's OpenGL canvas: pytest-xvfb starts Xvfb when it is
installed (``make system-deps``); without a display they are skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari_bbem")

import h5py
import torch
from conftest import tree_digest
from matplotlib.figure import Figure
from napari_bbem.onrates import plot_layer_step, read_on_rates
from napari_bbem.predict import best_threshold, threshold_clefts
from napari_bbem.reader import read_bbem
from scipy import ndimage

from bbem.bb import balance_points
from bbem.errors import UserError
from bbem.infer import predict_array, predict_steps
from bbem.model import EXPORT_FORMAT, build_model
from bbem.volumes import VolumeEntry, list_volumes, write_volumes

TINY = {"channels": [4, 8], "strides": [[1, 2, 2]], "num_res_units": 1}
VS = (40.0, 4.0, 4.0)
CLEFT_BG = np.iinfo(np.uint64).max

#: What napari needs to draw a layer: a Qt platform with an OpenGL context. Probed in a child
#: process because Qt aborts the whole process when it cannot open its display.
GL_PROBE = """
from qtpy.QtWidgets import QApplication
app = QApplication([])
from napari._vispy.utils.gl import get_gl_extensions
assert get_gl_extensions(), "no OpenGL extensions"
"""


@pytest.fixture(scope="module")
def gl_display() -> None:
    """Skip unless Qt can open a display with OpenGL (pytest-xvfb provides one when Xvfb is
    installed: ``make system-deps``)."""
    if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        pytest.skip("no display for napari's OpenGL canvas: install xvfb (make system-deps)")
    r = subprocess.run(
        [sys.executable, "-c", GL_PROBE], capture_output=True, text=True, timeout=300
    )
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["Qt aborted"])[-1]
        pytest.skip(f"Qt cannot open an OpenGL display ({last}): install xvfb (make system-deps)")


@pytest.fixture(scope="module")
def volume() -> dict[str, np.ndarray]:
    from bbem.synth import make_synthetic

    return make_synthetic((8, 64, 64), seed=3, voxel_size=VS)


@pytest.fixture(scope="module")
def synth_zarr(tmp_path_factory, volume) -> Path:
    path = tmp_path_factory.mktemp("synth") / "synth.zarr"
    keys = {"raw": "volumes/raw", "clefts": "volumes/labels/clefts"}
    keys["neuron_ids"] = "volumes/labels/neuron_ids"
    return write_volumes(
        path, {k: volume[n] for n, k in keys.items()}, voxel_size=VS, offset=(80, 8, 4)
    )


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_model(TINY)
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    torch.save(
        {
            "format": EXPORT_FORMAT,
            "model_config": TINY,
            "state_dict": model.state_dict(),
            "info": {},
        },
        path,
    )
    return path


# -- reader -----------------------------------------------------------------------------------------


def test_reader_synth_zarr(synth_zarr, volume):
    layers = read_bbem(synth_zarr)
    kinds = [(kw["name"], t) for _, kw, t in layers]
    # raw first, clefts drawn last (on top of the neurons)
    assert kinds == [("raw", "image"), ("neuron_ids", "labels"), ("clefts", "labels")]
    for data, kw, _ in layers:
        assert kw["scale"] == VS
        assert kw["translate"] == (80, 8, 4)
        assert kw["units"] == ("nm", "nm", "nm")
        assert kw["axis_labels"] == ("z", "y", "x")
        assert type(data).__module__.startswith("dask")  # lazy
    raw, clefts = layers[0][0], layers[2][0]
    np.testing.assert_array_equal(raw.compute(), volume["raw"])
    np.testing.assert_array_equal(clefts.compute(), volume["clefts"])
    assert layers[0][1]["contrast_limits"] == (0, 255)


def test_reader_cremi_hdf5(tmp_path):
    raw = np.arange(4 * 16 * 16, dtype=np.uint8).reshape(4, 16, 16)
    clefts = np.full(raw.shape, CLEFT_BG, np.uint64)
    clefts[1:3, 4:6, 4:10] = 7
    path = tmp_path / "sample_A.hdf"
    with h5py.File(path, "w") as f:
        for key, a in (("volumes/raw", raw), ("volumes/labels/clefts", clefts)):
            ds = f.create_dataset(key, data=a, chunks=(2, 8, 8))
            ds.attrs["resolution"] = (40.0, 4.0, 4.0)
            ds.attrs["offset"] = (40.0, 0.0, 8.0)
        f.create_dataset("annotations/ids", data=np.arange(3))  # not a volume
    assert list_volumes(path) == [
        VolumeEntry("volumes/raw", "image"),
        VolumeEntry("volumes/labels/clefts", "labels"),
    ]
    (r, rkw, rt), (c, ckw, ct) = read_bbem(path)
    assert (rt, ct) == ("image", "labels")
    assert rkw["scale"] == ckw["scale"] == (40.0, 4.0, 4.0)
    assert rkw["translate"] == (40.0, 0.0, 8.0)
    np.testing.assert_array_equal(r.compute(), raw)
    # CREMI's "no cleft" (largest uint64) reads as background 0
    np.testing.assert_array_equal(c.compute(), np.where(clefts == CLEFT_BG, 0, clefts))


def test_reader_inference_output(tmp_path, synth_zarr, tiny_export):
    from bbem.infer import predict_volume

    out = predict_volume(
        tiny_export, synth_zarr, tmp_path / "pred.zarr", threshold=0.5, progress=False
    ).output
    layers = read_bbem(out)
    assert [t for _, _, t in layers] == ["image", "labels"]
    (prob, kw, _), (lab, lkw, _) = layers
    assert prob.dtype == np.uint8
    assert lab.dtype == np.uint32  # cleft instance ids, as the Predictions widget shows
    assert kw["colormap"] == "magma"
    assert kw["blending"] == "additive"
    assert kw["contrast_limits"] == (0, 255)
    assert kw["metadata"]["bbem_kind"] == "probability"
    assert kw["metadata"]["threshold"] == 0.5  # the labels' threshold (no validation one)
    assert kw["scale"] == VS
    assert kw["translate"] == (80, 8, 4)
    assert lkw["name"] == "clefts"
    # the viewer's in-memory prediction is exactly what `bbem infer` writes
    np.testing.assert_array_equal(prob.compute(), predict_array(tiny_export, read_raw(synth_zarr)))


def test_reader_multiscale_ome_zarr(tmp_path):
    import zarr

    from bbem.volumes.zarr_io import ome_attributes

    full = np.arange(1 * 4 * 16 * 16, dtype=np.uint16).reshape(1, 4, 16, 16)  # c, z, y, x
    g = zarr.open_group(tmp_path / "ms.zarr", mode="w", zarr_format=3)
    attrs = ome_attributes("em", (30.0, 6.0, 6.0), (0.0, 12.0, 0.0))
    ms = attrs["ome"]["multiscales"][0]
    ms["axes"].insert(0, {"name": "c", "type": "channel"})
    level0 = ms["datasets"][0]
    level0["coordinateTransformations"] = [
        {"type": "scale", "scale": [1.0, 30.0, 6.0, 6.0]},
        {"type": "translation", "translation": [0.0, 0.0, 12.0, 0.0]},
    ]
    ms["datasets"].append(
        {"path": "1", "coordinateTransformations": [{"type": "scale", "scale": [1, 30, 12, 12]}]}
    )
    g.attrs.update(attrs)
    g.create_array("0", data=full)
    g.create_array("1", data=full[:, :, ::2, ::2])
    [(data, kw, kind)] = read_bbem(tmp_path / "ms.zarr")
    assert kind == "image"
    assert kw["multiscale"] is True
    assert kw["name"] == "ms"
    assert [d.shape for d in data] == [(4, 16, 16), (4, 8, 8)]
    assert kw["scale"] == (30.0, 6.0, 6.0)
    assert kw["translate"] == (0.0, 12.0, 0.0)
    assert kw["contrast_limits"] == (0, 65535)
    np.testing.assert_array_equal(data[1].compute(), full[0, :, ::2, ::2])


def test_writer_round_trip_and_evaluate(tmp_path, volume):
    from napari_bbem._reader import napari_get_reader
    from napari_bbem._writer import write_image, write_labels

    from bbem.metrics import evaluate

    prob = (ndimage.gaussian_filter((volume["clefts"] > 0).astype(float), 1) * 255).astype(np.uint8)
    geo = {"scale": VS, "translate": (80.0, 8.0, 4.0)}
    meta = {"name": "raw probability", "metadata": {"bbem_kind": "probability"}, **geo}
    [p_path] = write_image(str(tmp_path / "prob.zarr"), prob, meta)
    [t_path] = write_labels(str(tmp_path / "truth"), volume["clefts"], {"name": "gt", **geo})
    assert t_path.endswith("truth.zarr")  # the extension is added
    for path, data, kind in ((p_path, prob, "image"), (t_path, volume["clefts"], "labels")):
        reader = napari_get_reader(path)
        assert reader is not None
        [(back, kw, layer_type)] = reader(path)
        assert layer_type == kind
        np.testing.assert_array_equal(np.asarray(back), data)
        assert back.dtype == data.dtype
        assert kw["scale"] == VS
        assert kw["translate"] == (80.0, 8.0, 4.0)
    [(_, kw, _)] = read_bbem(p_path)
    assert kw["colormap"] == "magma"  # shown as a probability again
    # what bbem evaluate reads (open_volume on the store) gives the same numbers as the arrays
    from bbem.volumes import open_volume

    got = evaluate(open_volume(p_path), open_volume(t_path), min_size=10, cremi=False)
    want = evaluate(prob, volume["clefts"], voxel_size=VS, min_size=10, cremi=False)
    assert got["voxel"] == want["voxel"]
    assert got["object"] == want["object"]
    assert got["protocol"]["voxel_size_nm"] == list(VS)


def test_writer_replaces_only_its_own_stores(tmp_path, synth_zarr):
    from napari_bbem._writer import write_image

    data = np.zeros((4, 8, 8), np.uint8)
    meta = {"name": "p", "scale": VS}
    [saved] = write_image(str(tmp_path / "p.zarr"), data, meta)
    write_image(saved, data + 1, meta)  # its own earlier save: replaced
    assert int(np.asarray(read_bbem(saved)[0][0]).max()) == 1
    before = tree_digest(synth_zarr)
    with pytest.raises(UserError, match="not saved by napari-bbem"):
        write_image(str(synth_zarr), data, meta)  # a raw volume: never replaced
    assert tree_digest(synth_zarr) == before


def test_reader_tiff(tmp_path):
    import tifffile
    from napari_bbem._reader import napari_get_reader

    stack = np.arange(5 * 12 * 20, dtype=np.uint16).reshape(5, 12, 20)
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, stack)
    reader = napari_get_reader(str(path))
    assert reader is not None
    [(data, kw, layer_type)] = reader(str(path))
    assert layer_type == "image"
    assert kw["name"] == "stack"
    assert data.shape == (5, 12, 20)
    np.testing.assert_array_equal(np.asarray(data), stack)
    assert napari_get_reader(str(tmp_path / "notes.txt")) is None


def read_raw(path: Path) -> np.ndarray:
    from bbem.volumes import open_volume

    return open_volume(path, key="volumes/raw").read()


def test_reader_refuses_other_paths(tmp_path):
    from napari_bbem._reader import napari_get_reader

    (tmp_path / "notes.txt").write_text("x")
    assert napari_get_reader(str(tmp_path / "notes.txt")) is None
    assert napari_get_reader(str(tmp_path)) is None  # a folder without zarr metadata
    empty = tmp_path / "empty.h5"
    with h5py.File(empty, "w") as f:
        f.create_dataset("x", data=np.zeros(3))
    with pytest.raises(UserError, match="no 3D volume"):
        read_bbem(empty)


# -- prediction functions ---------------------------------------------------------------------------


def test_predict_array_checks(tiny_export, tmp_path):
    with pytest.raises(UserError, match="3D volume"):
        predict_array(tiny_export, np.zeros((64, 64), np.uint8))
    with pytest.raises(UserError, match="does not exist"):
        predict_array(tmp_path / "nope.pt", np.zeros((4, 32, 32), np.uint8))
    with pytest.raises(UserError, match="dtype int64"):
        predict_array(tiny_export, np.zeros((4, 32, 32), np.int64))
    p = predict_array(tiny_export, np.full((4, 32, 32), 128, np.uint8))
    assert p.shape == (4, 32, 32)
    assert p.dtype == np.uint8


def test_predict_steps_progress_and_stop(tiny_export, volume):
    steps = predict_steps(tiny_export, volume["raw"], roi_size=(4, 32, 32), block=(4, 32, 32))
    assert next(steps) == "loading model..."  # said before torch and the checkpoint load
    fractions = []
    while True:
        try:
            done, total = next(steps)
        except StopIteration as end:
            prob = end.value
            break
        fractions.append(done / total)
    assert total == 8  # (8, 64, 64) in blocks of (4, 32, 32)
    assert fractions == [k / 8 for k in range(9)]  # 0 before the first block, 1 after the last
    # blocks are bookkeeping only: the same probabilities as one block of the whole volume
    whole = predict_array(tiny_export, volume["raw"], roi_size=(4, 32, 32), block=(8, 64, 64))
    np.testing.assert_array_equal(prob, whole)
    # a caller stops between blocks by not resuming the generator: nothing else runs
    steps = predict_steps(tiny_export, volume["raw"], roi_size=(4, 32, 32), block=(4, 32, 32))
    assert [next(steps), next(steps), next(steps)] == ["loading model...", (0, 8), (1, 8)]
    steps.close()


def test_best_threshold(tmp_path, tiny_export):
    from bbem.model import CHECKPOINT_FORMAT

    assert best_threshold(tiny_export) is None  # an export without metrics
    ck = tmp_path / "best.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "metrics": {"threshold_best": 0.68}}, ck)
    assert best_threshold(ck) == pytest.approx(0.68)


def test_threshold_clefts_matches_scipy(rng):
    prob = (rng.random((6, 24, 24)) ** 4 * 255).astype(np.uint8)
    for t in (0.3, 0.5, 0.8):
        ours = threshold_clefts(prob, t)
        mask = prob >= t * 255
        ref, n = ndimage.label(mask, structure=np.ones((3, 3, 3)))
        assert ours.max() == n
        assert (ours > 0).sum() == mask.sum()
        # same partition of the voxels (label numbers may differ)
        pairs = np.unique(np.stack([ours[mask], ref[mask]]), axis=1)
        assert pairs.shape[1] == n
    assert threshold_clefts(np.array([[[0.2, 0.5, 0.9]]]), 0.5).tolist() == [[[0, 1, 1]]]
    with pytest.raises(UserError, match="probability"):
        threshold_clefts(prob, 1.5)


# -- on-rates ---------------------------------------------------------------------------------------

BB_CSV = textwrap.dedent(
    """\
    step,layer,mode,unit,on_rate,degree,full_fan,traffic
    10,conv1,in,1,0.2,3,4,0.6
    10,conv1,in,0,0.5,4,4,2.0
    10,conv1,in,2,0.9,1,4,0.9
    10,conv2,out,0,0.4,6,8,2.4
    10,conv2,out,1,0.6,2,8,1.2
    20,conv1,in,0,0.4,2,4,0.8
    20,conv1,in,1,0.3,4,4,1.2
    20,conv1,in,2,0.7,2,4,1.4
    20,conv2,out,0,0.5,4,8,2.0
    20,conv2,out,1,
    """
)


@pytest.fixture
def run_dir(tmp_path) -> Path:
    (tmp_path / "bb.csv").write_text(BB_CSV)
    return tmp_path


def test_read_on_rates(run_dir):
    d = read_on_rates(run_dir)
    assert d.layers == ["conv1", "conv2"]
    assert d.steps("conv1") == [10, 20]
    assert d.steps("conv2") == [10, 20]
    s = d.at("conv1", 10)  # rows were out of unit order
    assert s.unit.tolist() == [0, 1, 2]
    assert s.on_rate.tolist() == [0.5, 0.2, 0.9]
    assert s.degree.tolist() == [4, 3, 1]
    assert s.full_fan.tolist() == [4, 4, 4]
    assert s.mode == "in"
    assert s.traffic.tolist() == [2.0, 0.6, 0.9]
    late = d.at("conv2", 20)  # the half-written last row is dropped
    assert late.unit.tolist() == [0]
    assert late.mode == "out"
    with pytest.raises(UserError, match=r"no step 15 .* logged steps are 10, 20"):
        d.at("conv1", 15)
    with pytest.raises(UserError, match="no layer 'fc'"):
        d.steps("fc")


def test_read_on_rates_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_on_rates(tmp_path)
    (tmp_path / "bb.csv").write_text("step,layer,mode,unit,on_rate,degree,full_fan,traffic\n")
    with pytest.raises(UserError, match="no rows"):
        read_on_rates(tmp_path)
    (tmp_path / "bb.csv").write_text("step,layer\n1,a\n")
    with pytest.raises(UserError, match="lacks columns"):
        read_on_rates(tmp_path)


def test_balance_points_and_plot(run_dir):
    s = read_on_rates(run_dir).at("conv1", 20)
    x, y = (t.numpy() for t in balance_points(s.on_rate, s.degree, s.full_fan))
    np.testing.assert_allclose(x, [0.5, 1.0, 0.5])
    np.testing.assert_allclose(y, np.log([0.6 / 0.4, 0.7 / 0.3, 0.3 / 0.7]))
    _, y0 = balance_points(np.array([0.0, 1.0]), np.array([1, 1]), np.array([2, 2]))
    assert bool(torch.isfinite(y0).all())  # clamped like the BB controller
    fit = s.balance()
    slope, intercept = np.polyfit(x, y, 1)
    assert fit["slope"] == pytest.approx(slope)
    assert fit["intercept"] == pytest.approx(intercept)

    fig = plot_layer_step(Figure(), s)
    ax_a, ax_k, ax_b = fig.axes
    assert [p.get_height() for p in ax_a.patches] == pytest.approx(s.on_rate.tolist())
    assert [p.get_height() for p in ax_k.patches] == s.degree.tolist()
    np.testing.assert_allclose(ax_b.collections[0].get_offsets(), np.c_[x, y])


# -- the widgets in a real viewer -------------------------------------------------------------------


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    """Where widget screenshots go: tmp_path, or $BBEM_SCREENSHOTS to keep them for a look."""
    d = Path(os.environ.get("BBEM_SCREENSHOTS") or tmp_path)
    d.mkdir(parents=True, exist_ok=True)
    return d


def test_viewer_opens_with_plugin(gl_display, make_napari_viewer, synth_zarr, shots):
    viewer = make_napari_viewer()
    viewer.open(str(synth_zarr), plugin="napari-bbem")
    assert [(layer.name, type(layer).__name__) for layer in viewer.layers] == [
        ("raw", "Image"),
        ("neuron_ids", "Labels"),
        ("clefts", "Labels"),
    ]
    np.testing.assert_allclose(viewer.layers["raw"].scale, VS)
    np.testing.assert_allclose(viewer.layers["clefts"].translate, (80, 8, 4))
    # a bbem volume is z, y, x in nm, and the viewer's sliders say so
    assert tuple(viewer.dims.axis_labels) == ("z", "y", "x")
    for layer in viewer.layers:
        assert [str(u) for u in layer.units] == ["nanometer"] * 3
        assert tuple(layer.axis_labels) == ("z", "y", "x")
    viewer.window._qt_window.resize(1200, 800)
    _save(viewer.screenshot(canvas_only=False), shots / "napari_reader.png")


def test_predictions_widget(
    gl_display, make_napari_viewer, qtbot, synth_zarr, tiny_export, volume, shots
):
    from napari_bbem._widgets import PredictionsWidget

    viewer = make_napari_viewer()
    viewer.add_image(volume["raw"], name="raw", scale=VS)
    # through the manifest, as the Plugins menu does
    _, widget = viewer.window.add_plugin_dock_widget("napari-bbem", "Predictions")
    assert isinstance(widget, PredictionsWidget)
    assert widget.image.value is viewer.layers["raw"]
    widget.checkpoint.value = tiny_export
    assert widget.start() is not None
    # wait on what the user sees: a signal could fire before a waiter connects
    qtbot.waitUntil(lambda: "raw clefts" in viewer.layers, timeout=60_000)
    qtbot.waitUntil(lambda: widget.run.enabled, timeout=10_000)
    # progress went from 0 to all blocks done, shown in the widget's bar
    assert widget.fractions[0] == 0.0
    assert widget.fractions[-1] == 1.0
    assert widget.fractions == sorted(widget.fractions)
    assert widget.progress.value == widget.progress.max
    assert not widget.cancel.enabled
    prob = viewer.layers["raw probability"]
    assert prob.colormap.name == "magma"
    assert prob.blending == "additive"
    np.testing.assert_allclose(prob.scale, VS)
    for layer in (prob, viewer.layers["raw clefts"]):
        assert [str(u) for u in layer.units] == ["nanometer"] * 3
        assert tuple(layer.axis_labels) == ("z", "y", "x")
    np.testing.assert_array_equal(prob.data, predict_array(tiny_export, volume["raw"]))
    # the slider re-thresholds the same prediction
    widget.threshold.value = 0.0
    assert (viewer.layers["raw clefts"].data > 0).all()
    widget.threshold.value = 0.5
    # the clefts `bbem infer --threshold 0.5` writes: the same ids, small ones dropped
    np.testing.assert_array_equal(
        viewer.layers["raw clefts"].data, threshold_clefts(prob.data, 0.5, min_size=100)
    )
    assert "at p >= 0.50, >= 100 voxels" in widget.status.value
    assert prob.metadata["threshold"] == 0.5  # the slider's threshold travels with the layer
    # outputs are named after their source; a second run replaces them, no "raw clefts [1]"
    names = ["raw", "raw probability", "raw clefts"]
    assert [layer.name for layer in viewer.layers] == names
    first = viewer.layers["raw clefts"]
    widget.start()
    qtbot.waitUntil(lambda: widget.run.enabled, timeout=60_000)
    assert [layer.name for layer in viewer.layers] == names
    assert viewer.layers["raw clefts"] is first
    viewer.window._qt_window.resize(1200, 800)
    _save(viewer.screenshot(canvas_only=False), shots / "napari_predictions.png")


def test_predictions_widget_reports_errors(
    gl_display, make_napari_viewer, qtbot, tmp_path, monkeypatch
):
    import napari_bbem._widgets as widgets

    errors: list[str] = []
    monkeypatch.setattr(widgets, "show_error", errors.append)
    viewer = make_napari_viewer()
    widget = widgets.PredictionsWidget(viewer)
    assert widget.start() is None
    assert "open a volume" in widget.status.value
    viewer.add_image(np.zeros((32, 32), np.uint8), name="section")
    assert widget.start() is None  # a 2D section is not offered
    assert "open a volume" in widget.status.value
    viewer.add_image(np.zeros((4, 32, 32), np.uint8), name="stack")
    bad = tmp_path / "bad.pt"
    torch.save({"weights": 1}, bad)
    widget.checkpoint.value = bad
    assert widget.start() is not None
    qtbot.waitUntil(lambda: widget.status.value.startswith("failed:"), timeout=30_000)
    assert widget.status.value.startswith("failed:")
    assert len(viewer.layers) == 2
    # the failure is also a napari notification, not only the status line
    assert [e.startswith("bbem prediction failed:") for e in errors] == [True]


def test_sample_data(gl_display, make_napari_viewer, shots):
    from napari_bbem._sample import synthetic_em

    (raw, rkw, rt), (clefts, ckw, ct) = synthetic_em()
    assert (rt, ct) == ("image", "labels")
    assert raw.shape == clefts.shape == (16, 128, 128)
    assert raw.dtype == np.uint8
    assert clefts.max() > 0  # a few synapses
    for kw in (rkw, ckw):
        assert kw["units"] == ("nm", "nm", "nm")
        assert kw["axis_labels"] == ("z", "y", "x")
        assert kw["scale"] == (40.0, 4.0, 4.0)
    np.testing.assert_array_equal(synthetic_em()[0][0], raw)  # fixed seed

    viewer = make_napari_viewer()  # File > Open Sample > napari-bbem > bbem synthetic EM
    viewer.open_sample("napari-bbem", "synthetic")
    assert [(layer.name, type(layer).__name__) for layer in viewer.layers] == [
        ("synthetic raw", "Image"),
        ("synthetic clefts", "Labels"),
    ]
    np.testing.assert_array_equal(viewer.layers["synthetic raw"].data, raw)
    assert tuple(viewer.dims.axis_labels) == ("z", "y", "x")
    assert [str(u) for u in viewer.layers["synthetic clefts"].units] == ["nanometer"] * 3
    viewer.window._qt_window.resize(1200, 800)
    _save(viewer.screenshot(canvas_only=False), shots / "napari_sample.png")


def test_predictions_widget_cancel(gl_display, make_napari_viewer, qtbot, tiny_export, volume):
    from napari_bbem._widgets import PredictionsWidget

    viewer = make_napari_viewer()
    viewer.add_image(volume["raw"], name="raw", scale=VS)
    widget = PredictionsWidget(viewer)
    widget.checkpoint.value = tiny_export
    worker = widget.start()
    assert widget.cancel.enabled
    assert not widget.run.enabled
    widget.stop()  # the worker checks its abort flag before every step
    qtbot.waitUntil(lambda: widget.run.enabled, timeout=30_000)
    assert not worker.is_running
    assert widget.status.value.startswith("cancelled")
    assert "predicting" not in widget.status.value
    assert not widget.cancel.enabled
    assert [layer.name for layer in viewer.layers] == ["raw"]  # nothing was added
    assert widget.prob is None


def test_predictions_widget_offers_raw_volumes(gl_display, make_napari_viewer, monkeypatch):
    import napari_bbem._widgets as widgets

    warnings: list[str] = []
    monkeypatch.setattr(widgets, "show_warning", warnings.append)
    viewer = make_napari_viewer()
    widget = widgets.PredictionsWidget(viewer)
    viewer.add_image(np.zeros((4, 16, 16), np.uint8), name="raw")
    viewer.add_image(np.zeros((4, 16, 16, 3), np.uint8), name="rgb", rgb=True)
    viewer.add_image(np.zeros((16, 16), np.uint8), name="section")
    viewer.add_image(np.zeros((2, 4, 16, 16), np.uint8), name="channels")
    viewer.add_image(np.zeros((4, 16, 16), np.uint8), name="raw probability")
    viewer.add_image(np.linspace(0, 255, 4 * 16 * 16).reshape(4, 16, 16), name="unscaled")
    viewer.add_image(np.linspace(0, 1, 4 * 16 * 16).reshape(4, 16, 16), name="scaled")
    assert [name for name, _ in widget._image_layers()] == ["raw", "unscaled", "scaled"]
    assert [c for c in widget.image.choices] == [
        viewer.layers[n] for n in ("raw", "unscaled", "scaled")
    ]
    # float raw far outside [0, 1] is warned about before predicting (the checkpoint is missing:
    # start stops right after the check)
    for name in ("raw", "scaled"):
        widget.image.value = viewer.layers[name]
        widget.start()
    assert warnings == []
    widget.image.value = viewer.layers["unscaled"]
    widget.start()
    [message] = warnings
    assert "'unscaled' is float64 with values in [0, 255]" in message
    assert "uint8 / uint16 raw EM, or float already normalised to [0, 1]" in message


def test_on_rates_widget(gl_display, make_napari_viewer, qtbot, run_dir, tmp_path, shots):
    from napari_bbem._widgets import VIEWS, OnRatesWidget

    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-bbem", "On-rates")
    assert isinstance(widget, OnRatesWidget)
    # before a run is chosen: a hint, no empty figure
    assert not widget.hint.native.isHidden()
    assert widget.canvas.isHidden()
    widget.native.resize(420, 400)
    widget.native.grab().save(str(shots / "napari_onrates_empty.png"))
    widget.load(tmp_path / "missing")
    assert "does not exist" in widget.status.value
    widget.run_dir.value = run_dir  # loads through the changed signal
    assert widget.hint.native.isHidden()
    assert not widget.canvas.isHidden()
    assert widget.layer.choices == ("conv1", "conv2")
    # the slider is the training step, not an index
    assert (widget.step.min, widget.step.max, widget.step.step) == (10, 20, 10)
    assert widget.step.value == 20  # the last step
    ax_a = widget.figure.axes[0]
    assert [p.get_height() for p in ax_a.patches] == pytest.approx([0.4, 0.3, 0.7])
    assert "beta = slope / K = " in widget.status.value
    s = read_on_rates(run_dir).at("conv1", 20)
    assert f"beta = slope / K = {s.balance()['slope'] / 4:.4g}" in widget.status.value
    widget.step.value = 10
    assert [p.get_height() for p in widget.figure.axes[0].patches] == pytest.approx([0.5, 0.2, 0.9])
    widget.step.value = 14  # snaps to the nearest logged step
    assert widget.step.value == 10
    widget.layer.value = "conv2"
    assert "conv2, step 20" in widget.figure.axes[0].get_title()
    widget.step.value = 10
    qtbot.wait(50)
    widget.native.resize(420, 820)
    widget.native.grab().save(str(shots / "napari_onrates.png"))
    assert (shots / "napari_onrates.png").stat().st_size > 0
    widget.view.value = VIEWS[1]  # every layer: one series each
    widget.native.resize(420, 900)
    [ax] = widget.figure.axes
    assert len(ax.collections) == 2
    widget.native.grab().save(str(shots / "napari_onrates_all_layers.png"))
    widget.view.value = VIEWS[2]  # over training
    assert len(widget.figure.axes) == 2
    np.testing.assert_array_equal(widget.figure.axes[0].lines[0].get_xdata(), [10, 20])
    widget.native.grab().save(str(shots / "napari_onrates_training.png"))


def test_on_rates_names_and_plots(run_dir):
    from napari_bbem.onrates import (
        beta_of,
        layer_choices,
        layer_name,
        plot_all_layers,
        plot_over_training,
    )

    assert layer_name("model.0.conv.unit0.conv") == "encoder 1 conv 1"
    assert layer_name("model.1.submodule.1.submodule.0.conv.unit1.conv") == "encoder 3 conv 2"
    assert layer_name("model.1.submodule.0.residual") == "encoder 2 residual"
    assert layer_name("model.1.submodule.1.submodule.conv.unit0.conv") == "bottom 3 conv 1"
    assert layer_name("model.1.submodule.2.0.conv") == "decoder 2 up-conv"
    assert layer_name("model.2.1.conv.unit0.conv") == "decoder 1 conv 1"
    assert layer_name("conv1") == "conv1"
    assert layer_choices(["model.0.conv.unit0.conv", "x"]) == [
        ("encoder 1 conv 1", "model.0.conv.unit0.conv"),
        ("x", "x"),
    ]
    # every Conv3d of a real bbem UNet gets a distinct short name
    model = build_model({"channels": [4, 8, 16], "strides": [[1, 2, 2], [2, 2, 2]]})
    convs = [
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Conv3d | torch.nn.ConvTranspose3d)
    ]
    names = [layer_name(n) for n in convs]
    assert len(set(names)) == len(names)
    assert all(n != c for n, c in zip(names, convs, strict=True))

    d = read_on_rates(run_dir)
    s = d.at("conv1", 20)
    assert beta_of(s) == pytest.approx(s.balance()["slope"] / 4)
    fig = plot_layer_step(Figure(), s)
    legend = [t.get_text() for t in fig.axes[2].get_legend().get_texts()]
    assert any("βK" in t and f"β = slope / K = {beta_of(s):.4f}" in t for t in legend)
    [ax] = plot_all_layers(Figure(), d).axes
    assert len(ax.collections) == len(d.layers)  # one series per layer
    assert [t.get_text() for t in ax.get_legend().get_texts()] == d.layers
    ax_a, ax_k = plot_over_training(Figure(), d, "conv1").axes
    np.testing.assert_allclose(ax_a.lines[0].get_ydata(), [0.5, 0.4])  # medians per step
    np.testing.assert_allclose(ax_k.lines[0].get_ydata(), [0.75, 0.5])


def test_on_rates_widget_error_clears_stale_run(
    gl_display, make_napari_viewer, run_dir, tmp_path, monkeypatch
):
    import napari_bbem._widgets as widgets

    errors: list[str] = []
    monkeypatch.setattr(widgets, "show_error", errors.append)
    viewer = make_napari_viewer()
    widget = widgets.OnRatesWidget(viewer)
    widget.run_dir.value = run_dir
    assert widget.figure.axes
    assert widget.step.max == 20
    assert errors == []
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "bb.csv").write_text(BB_CSV.splitlines()[0] + "\n")
    widget.run_dir.value = tmp_path / "empty"
    [message] = errors
    assert "no rows" in message
    assert "no rows" in widget.status.value
    # nothing of the previous run is left to be misread as this one's
    assert widget.data is None
    assert widget.figure.axes == []
    assert widget.layer.choices == ()
    assert (widget.step.max, widget.step.value) == (0, 0)


def _eval_pair(volume) -> tuple[np.ndarray, np.ndarray]:
    """A blurred copy of the truth as uint8 probabilities, plus one invented cleft."""
    prob = ndimage.gaussian_filter((volume["clefts"] > 0).astype(float), 1) * 255
    prob = prob.astype(np.uint8)
    prob[2:4, 5:10, 5:10] = 250
    return prob, volume["clefts"]


def test_evaluate_functions_match_bbem(volume):
    from napari_bbem.evaluate import evaluate_arrays, mismatches, n_objects, plot_pr, summary_rows

    from bbem.metrics import evaluate

    prob, truth = _eval_pair(volume)
    got = evaluate_arrays(prob, truth, 0.4, 10, voxel_size=VS)
    want = evaluate(prob, truth, threshold=0.4, min_size=10, voxel_size=VS)
    c = want["voxel"]["counts_at_threshold"]
    rows = dict(summary_rows(got))
    assert list(rows.values()) == [
        want["voxel"]["pr_auc"],
        want["voxel"]["f1_best"],
        2 * c["tp"] / (2 * c["tp"] + c["fp"] + c["fn"]),
        want["object"]["iou_0.2"]["f1"],
        want["object"]["iou_0.5"]["f1"],
        want["cremi"]["adgt_mean"],
        want["cremi"]["adf_mean"],
        want["cremi"]["score"],
        want["cremi"]["fscore"],
    ]
    for iou in (0.2, 0.5):
        missed, spurious = mismatches(prob, truth, 0.4, 10, iou=iou)
        assert n_objects(missed) == want["object"][f"iou_{iou:g}"]["missed"]
        assert n_objects(spurious) == want["object"][f"iou_{iou:g}"]["spurious"]
    assert n_objects(spurious) >= 1  # the invented cleft
    fig = plot_pr(Figure(), got)
    [ax] = fig.axes
    np.testing.assert_allclose(ax.lines[4].get_ydata(), want["voxel"]["curve"]["precision"])
    assert fig.get_facecolor()[:3] == pytest.approx((0x26 / 255, 0x29 / 255, 0x30 / 255))


def test_evaluate_widget(gl_display, make_napari_viewer, volume, shots, monkeypatch):
    import napari_bbem._evaluate as ev

    from bbem.metrics import evaluate

    errors: list[str] = []
    monkeypatch.setattr(ev, "show_error", errors.append)
    prob, truth = _eval_pair(volume)
    viewer = make_napari_viewer()
    viewer.add_image(volume["raw"], name="raw", scale=VS)
    viewer.add_image(
        prob,
        name="raw probability",
        scale=VS,
        colormap="magma",
        blending="additive",
        metadata={"bbem_kind": "probability", "threshold": 0.4},
    )
    viewer.add_labels(truth, name="clefts", scale=VS)
    _, widget = viewer.window.add_plugin_dock_widget("napari-bbem", "Evaluate")
    assert isinstance(widget, ev.EvaluateWidget)
    assert widget.prediction.value is viewer.layers["raw probability"]
    assert widget.truth.value is viewer.layers["clefts"]
    assert widget.threshold.value == pytest.approx(0.4)  # stored with the prediction
    assert widget.canvas.isHidden()  # no empty figure before a result
    widget.min_size.value = 10
    result = widget.evaluate()
    assert result is not None
    want = evaluate(prob, truth, threshold=0.4, min_size=10, voxel_size=VS)
    assert result["voxel"] == want["voxel"]
    assert result["object"] == want["object"]
    assert result["cremi"] == want["cremi"]
    assert next(v for _, v in widget.rows) == want["voxel"]["pr_auc"]
    assert widget.table.shape == (len(widget.rows), 1)
    assert not widget.canvas.isHidden()
    assert "raw probability spurious" in viewer.layers
    assert "clefts missed" in viewer.layers
    spurious = viewer.layers["raw probability spurious"]
    np.testing.assert_allclose(spurious.scale, VS)
    assert len(np.unique(spurious.data[spurious.data > 0])) == want["object"]["iou_0.5"]["spurious"]
    assert f"{want['object']['iou_0.5']['spurious']} spurious" in widget.status.value
    n_layers = len(viewer.layers)
    widget.evaluate()  # a second run updates its layers
    assert len(viewer.layers) == n_layers
    viewer.window._qt_window.resize(1300, 900)
    _save(viewer.screenshot(canvas_only=False), shots / "napari_evaluate.png")
    # errors: a status line and a notification, no traceback
    viewer.add_labels(np.zeros((4, 8, 8), np.int32), name="small")
    widget.truth.value = viewer.layers["small"]
    assert widget.evaluate() is None
    assert widget.status.value.startswith("failed:")
    assert "disagree" in widget.status.value
    assert "\n" not in widget.status.value
    widget.truth.value = viewer.layers["clefts"]
    widget.prediction.value = viewer.layers["raw"]
    viewer.layers["raw"].data = volume["raw"].astype(np.int16)
    assert widget.evaluate() is None
    assert widget.status.value.startswith("failed:")
    assert len(errors) == 2
    assert all(e.startswith("bbem evaluate:") for e in errors)


def _save(img: np.ndarray, path: Path) -> None:
    import imageio.v3 as iio

    iio.imwrite(path, img)
