"""bbem.infer: block-wise inference, local and on Dask, resumable; and bbem export."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import first_voxel_instances
from scipy import ndimage

from bbem.errors import UserError
from bbem.infer import make_plan, predict_volume, store
from bbem.metrics.threshold import threshold_level
from bbem.model import CHECKPOINT_FORMAT, EXPORT_FORMAT, build_model, load_inference_model
from bbem.volumes import normalize_raw, open_volume

REPO = Path(__file__).resolve().parents[1]
TINY = {"channels": [4, 8, 16], "strides": [[1, 2, 2], [1, 2, 2]], "num_res_units": 1}
ROI = (4, 16, 16)  # the patch size the tiny export "was trained with"
HALO = (1, 4, 4)  # the default: a quarter of the window
VOXEL, OFFSET = (40.0, 4.0, 4.0), (80.0, 8.0, 16.0)


def _save_export(path: Path, model_cfg: dict, state: dict, patch=ROI) -> Path:
    info = {"config": {"data": {"patch_size": list(patch)}, "model": model_cfg}}
    torch.save(
        {"format": EXPORT_FORMAT, "model_config": model_cfg, "state_dict": state, "info": info},
        path,
    )
    return path


@pytest.fixture
def export(tmp_path: Path) -> Path:
    """A tiny random U-Net export (downsampling 1,4,4) whose training patch is ROI."""
    torch.manual_seed(0)
    return _save_export(tmp_path / "tiny.pt", TINY, build_model(TINY).state_dict())


def _raw(rng: np.random.Generator, shape) -> np.ndarray:
    # Smooth blobs, not white noise: the net's output then varies across the volume.
    a = ndimage.gaussian_filter(rng.normal(size=shape), sigma=(0.7, 2.0, 2.0))
    a = (a - a.min()) / (a.max() - a.min())
    return (a * 255).astype(np.uint8)


def _write(path: Path, data: np.ndarray) -> Path:
    from bbem.volumes import write_volume

    return write_volume(path, data, voxel_size=VOXEL, offset=OFFSET)


@pytest.fixture
def raw(tmp_path: Path, rng: np.random.Generator) -> tuple[Path, np.ndarray]:
    data = _raw(rng, (8, 48, 40))
    return _write(tmp_path / "raw.zarr", data), data


def _read(path: Path) -> np.ndarray:
    from bbem.volumes import open_volume

    return open_volume(path).read()


def _whole_volume(model, data: np.ndarray, roi=ROI, halo=HALO, tta=False) -> np.ndarray:
    """The oracle: MONAI's sliding window over the whole volume at once (with bbem's blending
    weights), as uint8."""
    from monai.inferers import sliding_window_inference

    from bbem.infer.region import gaussian_weights

    def predictor(w):
        if not tta:
            return torch.sigmoid(model(w))
        flips = [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]
        outs = [
            torch.sigmoid(model(torch.flip(w, d))).flip(d) if d else torch.sigmoid(model(w))
            for d in flips
        ]
        return torch.stack(outs).mean(0)

    x = torch.from_numpy(data.astype(np.float32) / 255)[None, None]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # intra-op threads spin badly on a busy 2-core machine
    with torch.inference_mode():
        p = sliding_window_inference(
            x,
            roi,
            1,
            predictor,
            overlap=[h / r for h, r in zip(halo, roi, strict=True)],
            mode="gaussian",
            roi_weight_map=gaussian_weights(tuple(roi)),
        )[0, 0].numpy()
    torch.set_num_threads(threads)
    return np.clip(np.rint(p * 255), 0, 255).astype(np.uint8)


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


# -- unit pieces --------------------------------------------------------------------------------


def test_normalize_raw():
    assert normalize_raw(np.array([0, 255], np.uint8)).tolist() == [0.0, 1.0]
    assert normalize_raw(np.array([65535], np.uint16)).tolist() == [1.0]
    f = normalize_raw(np.array([0.25, -1.0], np.float64))
    assert f.dtype == np.float32
    assert f.tolist() == [0.25, -1.0]
    with pytest.raises(UserError, match="dtype int64"):
        normalize_raw(np.array([1], np.int64))


def test_plan_read_box_is_the_span_of_global_windows():
    """Every block's region makes MONAI place exactly the global windows that touch the block."""
    from monai.data.utils import dense_patch_slices

    plan = make_plan((13, 90, 70), (1, 4, 4), block=(5, 40, 33), halo=(1, 10, 8), roi=(4, 32, 32))
    glob = [
        tuple((s.start, s.stop) for s in w)
        for w in dense_patch_slices(plan.shape, plan.roi, plan.step)
    ]
    for index in plan.blocks():
        read, own = plan.read_box(index), plan.block_box(index)
        size = [r.stop - r.start for r in read]
        local = [
            tuple((s.start + r.start, s.stop + r.start) for s, r in zip(w, read, strict=True))
            for w in dense_patch_slices(size, plan.roi, plan.step)
        ]
        touching = [
            w
            for w in glob
            if all(a < o.stop and b > o.start for (a, b), o in zip(w, own, strict=True))
        ]
        assert set(touching) <= set(local) <= set(glob)
    # A block that is a multiple of the step reads one window more: roi - halo before, halo after.
    plan = make_plan((18, 144, 144), (1, 4, 4), block=(6, 48, 48), roi=(4, 32, 32))
    assert plan.halo == (1, 8, 8)
    assert plan.step == (3, 24, 24)
    assert plan.read_box((1, 1, 1)) == (slice(3, 13), slice(24, 104), slice(24, 104))


def test_plan_defaults_and_caps():
    plan = make_plan((20, 1024, 512), (2, 8, 8))
    assert plan.roi == (16, 128, 128)
    assert plan.halo == (4, 32, 32)
    assert plan.block == (20, 288, 288)  # a multiple of the step 12,96,96; z capped
    small = make_plan((3, 30, 50), (1, 4, 4), roi=(4, 32, 32))
    assert small.roi == (3, 28, 32)
    assert small.block == (3, 30, 50)
    assert small.n_blocks == 1


# -- the result ---------------------------------------------------------------------------------


class _EdgeRows(torch.nn.Module):
    """A "network" that is sure of a cleft on its window's first and last y rows only: the
    worst case of a window's edge, where it has the least context."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.full_like(x, -30.0)
        out[..., 0, :] = out[..., -1, :] = 30.0
        return out


def test_window_edges_leave_no_seam():
    from bbem.infer.region import gaussian_weights, predict_region

    roi = (4, 32, 32)
    w = gaussian_weights(roi)
    assert float(w.max()) == pytest.approx(1.0)
    assert float(w.min()) > 0  # every voxel covered
    assert torch.equal(w, w.flip(0, 1, 2))  # symmetric: a flipped window blends the same
    plan = make_plan((4, 104, 32), (1, 8, 8), roi=roi, halo=(0, 8, 0))  # y windows 24 apart
    p = predict_region(_EdgeRows(), np.zeros(plan.shape, np.float32), plan)
    # the edge rows of inner windows lie inside a neighbour's middle: they must not show,
    # in the window's corners either (MONAI's map, floored at 1e-3, lets 0.48 through there)
    assert p[:, 1:-1].max() < 0.01
    assert p[:, [0, -1]].min() > 0.99  # the volume's own edge rows have no other window


def test_block_size_independence_and_metadata(export: Path, raw, tmp_path: Path):
    from bbem.volumes import open_volume

    path, data = raw
    model, _ = load_inference_model(export)
    oracle = _whole_volume(model, data)
    outs = {}
    for block in [(4, 16, 16), (6, 24, 20), None]:
        out = tmp_path / f"pred-{block}.zarr"
        predict_volume(export, path, out, block=block, progress=False)
        outs[block] = _read(out)
        assert _max_diff(outs[block], oracle) <= 1, block
    # Different grids agree with each other as well as with the oracle, and are not constant.
    assert _max_diff(outs[(4, 16, 16)], outs[(6, 24, 20)]) <= 1
    assert outs[None].std() > 1
    vol = open_volume(tmp_path / "pred-(6, 24, 20).zarr")
    assert vol.voxel_size == VOXEL
    assert vol.offset == OFFSET
    assert vol.chunks == (6, 24, 20)
    assert vol.dtype == np.uint8
    assert not list(tmp_path.glob("*.partial"))


def test_tta_and_threshold(export: Path, raw, tmp_path: Path):
    path, data = raw
    model, _ = load_inference_model(export)
    out = predict_volume(
        export,
        path,
        tmp_path / "t.zarr",
        tta=True,
        threshold=0.5,
        progress=False,
    ).output
    prob = _read(out)
    assert _max_diff(prob, _whole_volume(model, data, tta=True)) <= 1
    assert _max_diff(prob, _whole_volume(model, data)) > 1  # the flips do change the result
    labels = _read(out / "labels" / "clefts")
    assert labels.dtype == np.uint32
    # bbem's one rule on the stored levels: 0.5 is level 128; the default min_size drops clefts
    mask = first_voxel_instances(prob >= 128, 100)
    assert np.array_equal(labels > 0, mask > 0)
    assert 0 < (labels > 0).mean() < 1
    # cleft instances: 26-connected components numbered 1..n by their first voxel
    assert np.array_equal(labels, mask)
    assert set(np.unique(labels)) == set(range(int(labels.max()) + 1))


def test_threshold_val_uses_the_checkpoints_validation_threshold(raw, tmp_path: Path):
    path, _ = raw
    torch.manual_seed(0)
    state = build_model(TINY).state_dict()
    ck = _save_export(tmp_path / "tiny.pt", TINY, state)
    payload = torch.load(ck, weights_only=False)
    payload["info"]["metrics"] = {"threshold_best": 0.52}
    torch.save(payload, ck)
    out = predict_volume(ck, path, tmp_path / "v.zarr", threshold="val", progress=False).output
    prob, labels = _read(out), _read(out / "labels" / "clefts")
    # 0.52 * 255 = 132.6: level 133 and above
    assert np.array_equal(labels > 0, first_voxel_instances(prob >= 133, 100) > 0)
    # An export without a recorded threshold, or a bad value: one line, nothing written.
    bare = _save_export(tmp_path / "bare.pt", TINY, state)
    with pytest.raises(UserError, match="--threshold val needs a training checkpoint"):
        predict_volume(bare, path, tmp_path / "w.zarr", threshold="val", progress=False)
    with pytest.raises(UserError, match=r"probability in \[0, 1\] or 'val', got 'half'"):
        predict_volume(bare, path, tmp_path / "w.zarr", threshold="half", progress=False)
    with pytest.raises(UserError, match="probability"):
        predict_volume(bare, path, tmp_path / "w.zarr", threshold=1.5, progress=False)
    assert not (tmp_path / "w.zarr").exists()


def test_tiff_output(export: Path, raw, tmp_path: Path):
    path, _ = raw
    z = predict_volume(export, path, tmp_path / "p.zarr", progress=False).output
    t = predict_volume(export, path, tmp_path / "p.tif", threshold=0.5, progress=False).output
    assert t.is_file()
    assert (tmp_path / "p_clefts.tif").is_file()
    assert np.array_equal(_read(t), _read(z))
    clefts = _read(tmp_path / "p_clefts.tif")  # the cleft ids, as a zarr output holds them
    assert clefts.dtype == np.uint32
    assert np.array_equal(clefts, first_voxel_instances(_read(t) >= 128, 100))
    assert clefts.max() >= 1
    assert not list(tmp_path.glob("p.tif.partial*"))


def test_model_object_and_roi(raw, tmp_path: Path):
    path, data = raw
    torch.manual_seed(1)
    model = build_model(TINY).eval()
    out = predict_volume(
        model, path, tmp_path / "m.zarr", roi_size=(4, 16, 16), block=(4, 16, 16), progress=False
    ).output
    assert _max_diff(_read(out), _whole_volume(model, data)) <= 1
    with pytest.raises(UserError, match="multiple of the network's downsampling"):
        predict_volume(model, path, tmp_path / "bad.zarr", roi_size=(4, 14, 16), progress=False)


@pytest.mark.slow
def test_real_em_hdf5(shared_data: Path, tmp_path: Path):
    """The real CREMI-style crop: hdf5 dataset by key, voxel size carried to the output."""
    from bbem.volumes import open_volume

    torch.manual_seed(0)
    ck = _save_export(tmp_path / "m.pt", TINY, build_model(TINY).state_dict(), patch=(4, 64, 64))
    src = shared_data / "vnc-stack1-left.hdf"
    out = predict_volume(
        ck, src, tmp_path / "real.zarr", key="volumes/raw", threshold=0.5, progress=False
    ).output
    vol, raw = open_volume(out), open_volume(src, key="volumes/raw")
    assert vol.shape == raw.shape == (20, 1024, 512)
    assert vol.voxel_size == raw.voxel_size == (50.0, 4.6, 4.6)
    assert vol.offset == raw.offset
    # Spot check one block against the whole-volume oracle on a sub-volume it does not touch
    # the borders of: the first 4 sections, the first 64 x 64 pixels, are one window.
    model, _ = load_inference_model(ck)
    with torch.inference_mode():
        x = torch.from_numpy(normalize_raw(raw[0:4, 0:64, 0:64]))[None, None]
        p = torch.sigmoid(model(x))[0, 0].numpy()
    got = vol[0:4, 0:64, 0:64].astype(int)
    # Only the corner where no other window reaches is this one window's output alone.
    want = np.rint(p * 255).astype(int)
    assert np.abs(got[:1, :16, :16] - want[:1, :16, :16]).max() <= 1


# -- output protocol ------------------------------------------------------------------------------


def test_existing_output_and_partial_are_refused(export: Path, raw, tmp_path: Path):
    path, _ = raw
    out = tmp_path / "o.zarr"
    first = predict_volume(export, path, out, progress=False)
    assert first.output == out
    assert first.blocks_done == first.blocks_total > 0
    assert first.blocks_skipped == 0
    assert first.model_loads == 1
    assert first.voxels == 8 * 48 * 40
    with pytest.raises(UserError, match=r"exists.*--overwrite"):
        predict_volume(export, path, out, progress=False)
    before = _read(out)
    (out / "0" / "marker").write_text("old")
    predict_volume(export, path, out, on_existing="overwrite", progress=False)
    assert not (out / "0" / "marker").exists()
    assert np.array_equal(_read(out), before)
    # A leftover .partial asks for --resume; resuming a finished output is a no-op.
    (tmp_path / "n.zarr.partial").mkdir()
    with pytest.raises(UserError, match="--resume"):
        predict_volume(export, path, tmp_path / "n.zarr", progress=False)
    again = predict_volume(export, path, out, on_existing="resume", progress=False)
    assert again.output == out
    assert again.blocks_done == 0
    assert again.blocks_skipped == again.blocks_total
    with pytest.raises(UserError, match="on_existing"):
        predict_volume(export, path, out, on_existing="replace", progress=False)


def test_resume_with_other_settings_is_refused(export: Path, raw, tmp_path: Path):
    path, _ = raw
    out = tmp_path / "o.zarr"
    work = tmp_path / "o.zarr.partial"
    plan = make_plan((8, 48, 40), (1, 4, 4), block=(4, 16, 16), roi=ROI)
    store.prepare_work(
        work,
        out,
        store.build_manifest(str(export), str(path), None, plan, False, None),
        open_volume(str(path)),
        plan,
        labels=False,
        resume=False,
    )
    with pytest.raises(UserError, match=r"plan differ.*--overwrite"):
        predict_volume(export, path, out, block=(6, 24, 20), on_existing="resume", progress=False)


def test_resume_after_sigkill_equals_uninterrupted(export: Path, tmp_path: Path, rng):
    path = _write(tmp_path / "big.zarr", _raw(rng, (16, 48, 48)))  # 4 x 3 x 3 blocks
    out = tmp_path / "k.zarr"
    done = tmp_path / "k.zarr.partial" / ".bbem_done"
    cmd = [
        sys.executable,
        "-m",
        "bbem",
        "infer",
        str(export),
        str(path),
        str(out),
        "--block",
        "4,16,16",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while not (done.is_dir() and len(os.listdir(done)) >= 5):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no block finished in time"
            time.sleep(0.005)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    n_total = 4 * 3 * 3
    finished = sorted(os.listdir(done))
    assert 5 <= len(finished) < n_total, "the run must be killed part-way"
    # The chunks of finished blocks must not be rewritten by the resumed run.
    chunk = {m: out.with_name("k.zarr.partial") / "0" / "c" / Path(*m.split("_")) for m in finished}
    stamps = {m: p.stat().st_mtime_ns for m, p in chunk.items() if p.is_file()}
    assert len(stamps) >= 3

    time.sleep(0.05)
    stats = predict_volume(
        export, path, out, block=(4, 16, 16), on_existing="resume", progress=False
    )
    assert stats.blocks_skipped == len(finished)
    assert stats.blocks_done == n_total - len(finished)
    ref = predict_volume(export, path, tmp_path / "ref.zarr", block=(4, 16, 16), progress=False)
    assert np.array_equal(_read(out), _read(ref.output))
    for m, t in stamps.items():
        assert (out / "0" / "c" / Path(*m.split("_"))).stat().st_mtime_ns == t
    assert not (out / ".bbem_done").exists()
    assert not done.parent.exists()


@pytest.mark.parametrize("where", ["rename", "labelling"])
def test_resume_of_a_run_killed_while_finishing(
    export: Path, raw, tmp_path: Path, monkeypatch, where
):
    """Killed after the markers went but before the rename, or while numbering the clefts (some
    slabs written with ids, the rest still 0/1): resume finishes, computes nothing, and ends
    with the labels of an uninterrupted run."""
    from bbem.metrics import objects

    path, _ = raw
    out = tmp_path / "f.zarr"
    block = (4, 16, 16)  # 2 slabs of 4 sections for the numbering
    prob = _read(predict_volume(export, path, tmp_path / "p.zarr", progress=False).output)
    t = float(np.quantile(prob, 0.9)) / 255  # many clefts, many under min_size
    args = dict(block=block, threshold=t, min_size=20, progress=False)

    real_replace, real_label = os.replace, objects.label_objects

    def killed(src, dst):  # the process "dies" at the final rename, and only there
        if Path(dst) == out:
            raise KeyboardInterrupt
        real_replace(src, dst)

    class Dies:
        """The label array, lost after its first slab is written."""

        def __init__(self, a) -> None:
            self.a, self.writes = a, 1
            self.shape, self.dtype = a.shape, a.dtype

        def __getitem__(self, k):
            return self.a[k]

        def __setitem__(self, k, v):
            if not self.writes:
                raise KeyboardInterrupt
            self.writes -= 1
            self.a[k] = v

    def killed_labelling(mask, out=None, **kw):
        return real_label(Dies(mask), None if out is None else Dies(out), **kw)

    if where == "rename":
        monkeypatch.setattr(os, "replace", killed)
    else:
        monkeypatch.setattr(objects, "label_objects", killed_labelling)
    with pytest.raises(KeyboardInterrupt):
        predict_volume(export, path, out, **args)
    monkeypatch.undo()
    work = tmp_path / "f.zarr.partial"
    assert (work / ".bbem_done").exists() == (where == "labelling")
    assert not out.exists()
    left = open_volume(work / "labels" / "clefts").read()
    ref = predict_volume(export, path, tmp_path / "g.zarr", **args).output
    ids = _read(ref / "labels" / "clefts")
    if where == "labelling":  # part numbered, part 0/1, and small clefts still there
        assert 1 < left.max() < ids.max()
        assert (left[:4] == ids[:4]).all()
        assert ((left[4:] > 0) != (ids[4:] > 0)).any()
    stats = predict_volume(export, path, out, on_existing="resume", **args)
    assert stats.blocks_done == 0  # none recomputed
    assert stats.blocks_skipped == stats.blocks_total
    assert out.is_dir()
    assert not work.exists()
    assert np.array_equal(_read(out), _read(ref))
    assert np.array_equal(_read(out / "labels" / "clefts"), ids)
    assert np.array_equal(ids, first_voxel_instances(_read(ref) >= threshold_level(t), 20))
    assert ids.max() > 1


def test_resume_of_a_partial_with_binary_labels_is_refused(export: Path, raw, tmp_path: Path):
    """A .partial from an older bbem (uint8 0/1 labels) is refused with one line, kept as is."""
    import zarr

    path, _ = raw
    out = tmp_path / "o.zarr"
    work = tmp_path / "o.zarr.partial"
    plan = make_plan((8, 48, 40), (1, 4, 4), block=(4, 16, 16), roi=ROI)
    store.prepare_work(
        work,
        out,
        store.build_manifest(str(export), str(path), None, plan, False, 0.5, 100),
        open_volume(str(path)),
        plan,
        labels=True,
        resume=False,
    )
    zarr.create_array(
        work / "labels" / "clefts" / "0",
        shape=plan.shape,
        dtype="uint8",
        chunks=plan.block,
        overwrite=True,
    )
    store.mark_done(work, (0, 0, 0))
    with pytest.raises(UserError, match=r"older bbem.*uint8 0/1 labels.*--overwrite"):
        predict_volume(
            export,
            path,
            out,
            block=(4, 16, 16),
            threshold=0.5,
            on_existing="resume",
            progress=False,
        )
    assert work.is_dir()
    predict_volume(
        export,
        path,
        out,
        block=(4, 16, 16),
        threshold=0.5,
        on_existing="overwrite",
        progress=False,
    )
    assert _read(out / "labels" / "clefts").dtype == np.uint32
    # a finished output of an older bbem: --resume does not call its 0/1 labels complete
    zarr.create_array(
        out / "labels" / "clefts" / "0",
        shape=plan.shape,
        dtype="uint8",
        chunks=plan.block,
        overwrite=True,
    )
    with pytest.raises(UserError, match=r"older bbem.*uint8 0/1.*--overwrite"):
        predict_volume(
            export,
            path,
            out,
            block=(4, 16, 16),
            threshold=0.5,
            on_existing="resume",
            progress=False,
        )


# -- Dask ---------------------------------------------------------------------------------------


def test_local_cluster_equals_threads(export: Path, raw, tmp_path: Path, capsys):
    path, _ = raw
    a = predict_volume(export, path, tmp_path / "a.zarr", block=(4, 16, 16), progress=False)
    b = predict_volume(
        export, path, tmp_path / "b.zarr", block=(4, 16, 16), scheduler="local", workers=2
    )
    assert np.array_equal(_read(a.output), _read(b.output))
    assert a.worker_model_loads == {}
    assert a.model_loads == 1
    # the model is loaded here (to check it) and once by each worker process
    assert sorted(b.worker_model_loads.values()) == [1, 1]
    assert b.model_loads == 3
    assert b.blocks_done == b.blocks_total == 18
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    # 18 blocks on two worker processes on loopback; each loaded the model once.
    assert "Dask tcp://127.0.0.1:" in summary, summary
    assert "2 workers" in summary, summary
    assert "model loaded once per worker" in summary, summary


#: the README's worker command line, less the scheduler's address
WORKER_ARGS = ["--nthreads", "1", "--nworkers", "2", "--preload", "bbem.infer.cluster"]


@pytest.fixture
def dask_cli_cluster(tmp_path: Path):
    """A ``dask scheduler`` and ``dask worker --nworkers 2`` on 127.0.0.1, started as the README
    tells a cluster user to; yields the scheduler's address."""
    from distributed import Client

    dask = Path(sys.executable).with_name("dask")
    info = tmp_path / "scheduler.json"
    common: list[str | Path] = ["--host", "127.0.0.1", "--no-dashboard"]
    procs = [
        subprocess.Popen(
            [dask, "scheduler", "--port", "0", "--scheduler-file", info, *common],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    ]
    try:
        deadline = time.monotonic() + 60
        while not info.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        procs.append(
            subprocess.Popen(
                [dask, "worker", "--scheduler-file", info, *WORKER_ARGS, *common],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        with Client(scheduler_file=str(info), timeout="30s") as client:
            client.wait_for_workers(2, timeout=60)
            yield client.scheduler.address
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_existing_scheduler_loads_model_once_per_worker(
    export: Path, raw, tmp_path: Path, dask_cli_cluster: str
):
    from distributed import Client

    from bbem.infer.cluster import WORKER_PRELOAD

    path, _ = raw
    with Client(dask_cli_cluster) as client:
        # --preload bbem.infer.cluster imported the model code before any run
        ready = client.run(lambda: all(n in sys.modules for n in WORKER_PRELOAD))
        stats = predict_volume(
            export,
            path,
            tmp_path / "d.zarr",
            block=(4, 16, 16),
            scheduler=dask_cli_cluster,
            progress=False,
        )
        # the run's state (model, volume, arrays) left the long-lived workers with the run
        left = client.run(lambda dask_worker: [n for n in dask_worker.plugins if "bbem" in n])
    assert list(ready.values()) == [True, True]
    assert sorted(stats.worker_model_loads.values()) == [1, 1]
    assert all(v == [] for v in left.values()), left
    ref = predict_volume(export, path, tmp_path / "t.zarr", block=(4, 16, 16), progress=False)
    assert np.array_equal(_read(stats.output), _read(ref.output))


def test_local_cluster_workers_import_the_model_code_as_they_start():
    # a block must not pay MONAI's 1.5-2 s import inside the timed run
    from bbem.infer.cluster import WORKER_PRELOAD, _connect

    client, cluster = _connect("local", 1)
    try:
        got = client.run(lambda: sorted(n for n in WORKER_PRELOAD if n in sys.modules))
    finally:
        client.close()
        cluster.close()
    assert list(got.values()) == [sorted(WORKER_PRELOAD)]


_HEAP_PROBE = """
import ctypes, ctypes.util, sys
from bbem.infer.cluster import heap_for_torch, heap_for_worker
libc = ctypes.CDLL(ctypes.util.find_library("c"))
if not hasattr(libc, "mallinfo2"):
    print("skip"); sys.exit()
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def mmapped_while_held(n):
    p = libc.malloc(n)
    got = libc.mallinfo2().hblkhd
    libc.free(p)
    return got
before = mmapped_while_held(4 << 20)
assert heap_for_torch()
during = mmapped_while_held(4 << 20)
heap_for_worker()
print(before >= 4 << 20, during < 4 << 20)
"""


def test_dask_worker_heap_is_fit_for_torch():
    # Dask's nanny sets MALLOC_TRIM_THRESHOLD_, which sends every large allocation to a fresh
    # mmap (torch at half speed); while a run lasts, a worker serves them from its heap.
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "65536"}
    out = subprocess.run(
        [sys.executable, "-c", _HEAP_PROBE], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    if out == ["skip"]:
        pytest.skip("not glibc >= 2.33 (no mallinfo2)")
    assert out == ["True", "True"], out


def test_unreachable_scheduler_fails_fast(export: Path, raw, tmp_path: Path):
    path, _ = raw
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(UserError, match="cannot reach the Dask scheduler"):
        predict_volume(
            export, path, tmp_path / "u.zarr", scheduler=f"tcp://127.0.0.1:{port}", progress=False
        )
    assert time.monotonic() - t0 < 15
    assert not list(tmp_path.glob("u.zarr*"))  # nothing written: not even a .partial
    with pytest.raises(UserError, match="threads, local or tcp"):
        predict_volume(export, path, tmp_path / "v.zarr", scheduler="mpi", progress=False)


def test_scheduler_without_workers_fails_fast(export: Path, raw, tmp_path: Path):
    from distributed import LocalCluster

    path, _ = raw
    with LocalCluster(
        n_workers=0, processes=True, host="127.0.0.1", dashboard_address=None
    ) as cluster:
        t0 = time.monotonic()
        with pytest.raises(UserError, match="has no workers"):
            predict_volume(
                export,
                path,
                tmp_path / "w.zarr",
                progress=False,
                scheduler=cluster.scheduler_address,
            )
    assert time.monotonic() - t0 < 20
    assert not list(tmp_path.glob("w.zarr*"))


# -- bad input ----------------------------------------------------------------------------------


def test_bad_inputs(export: Path, raw, tmp_path: Path):
    import zarr

    path, _ = raw
    out = tmp_path / "x.zarr"
    with pytest.raises(UserError, match=r"not found|does not exist|no such"):
        predict_volume(export, tmp_path / "missing.zarr", out, progress=False)
    with pytest.raises(UserError, match=r"checkpoint .* not found"):
        predict_volume(tmp_path / "missing.pt", path, out, progress=False)
    other = _save_export(
        tmp_path / "other.pt", TINY, build_model({**TINY, "channels": [8, 16, 32]}).state_dict()
    )
    with pytest.raises(UserError, match="does not fit"):
        predict_volume(other, path, out, progress=False)
    flat = tmp_path / "flat.zarr"
    zarr.create_array(str(flat), shape=(64, 64), dtype="uint8", chunks=(32, 32))
    with pytest.raises(UserError, match="3D"):
        predict_volume(export, flat, out, progress=False)
    with pytest.raises(UserError, match="smaller than the network's field of view"):
        predict_volume(export, path, out, block=(2, 8, 8), progress=False)
    with pytest.raises(UserError, match="--workers must be at least 1"):
        predict_volume(export, path, out, workers=0, progress=False)
    with pytest.raises(UserError, match="halo"):
        predict_volume(export, path, out, halo=(4, 4, 4), progress=False)
    with pytest.raises(UserError, match="--device must be auto, cpu or cuda"):
        predict_volume(export, path, out, device="gpu", progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--device is 'cuda' but no CUDA device"):
            predict_volume(export, path, out, device="cuda", progress=False)
    assert not out.exists()
    assert not (tmp_path / "x.zarr.partial").exists()


def test_device_cpu_is_what_auto_gives_here(export: Path, raw, tmp_path: Path):
    path, _ = raw
    a = predict_volume(export, path, tmp_path / "a.zarr", device="cpu", progress=False)
    b = predict_volume(export, path, tmp_path / "b.zarr", device="auto", progress=False)
    if not torch.cuda.is_available():
        np.testing.assert_array_equal(open_volume(a.output)[:], open_volume(b.output)[:])


def test_cli_reports_user_errors(export: Path, raw, tmp_path: Path, capsys):
    from bbem.cli import main

    path, _ = raw
    assert (
        main(["infer", str(export), str(path), str(tmp_path / "c.zarr"), "--block", "1,8,8"]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "field of view" in err[0]
    assert main(["infer", str(export), str(path), str(tmp_path / "c.zarr")]) == 0
    assert "wrote" in capsys.readouterr().out


# -- export ---------------------------------------------------------------------------------------


def test_export_bakes_bb_masks(tmp_path: Path):
    from bbem.model import export_model

    bb_mod = pytest.importorskip("bbem.bb")
    torch.manual_seed(0)
    model = build_model(TINY)
    bb_cfg = {"method": "random", "density": 0.5, "warmup_steps": 0, "refresh_every": 1}
    bb = bb_mod.attach_bb(
        model, bb_mod.BBConfig(**{k: v for k, v in bb_cfg.items()}), layers=(torch.nn.Conv3d,)
    )
    x = torch.rand(1, 1, 4, 16, 16)
    model.train()
    model(x).mean().backward()
    bb.step()
    model.eval()
    with torch.no_grad():
        want = model(x)
    ckpt = tmp_path / "last.pt"
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "step": 1,
            "config": {"model": TINY, "bb": bb_cfg},
            "model": model.state_dict(),
            "bb": bb.state_dict(),
        },
        ckpt,
    )
    from bbem.cli import main

    out = tmp_path / "plain.pt"
    assert main(["export", str(ckpt), str(out)]) == 0  # `bbem export CHECKPOINT OUT`
    assert main(["export", str(ckpt), str(out)]) == 2  # exists: refused without --overwrite
    assert export_model(ckpt, out, overwrite=True) == out
    data = torch.load(out, weights_only=False)
    assert data["format"] == EXPORT_FORMAT
    assert not any("parametrizations" in k for k in data["state_dict"])
    plain, _ = load_inference_model(out)
    with torch.no_grad():
        assert torch.allclose(plain(x), want, atol=1e-5)
    # The masks are in the weights: some whole kernel slabs of a masked conv are zero.
    zero_slabs = sum(
        int((w.flatten(2).abs().sum(-1) == 0).sum())
        for k, w in data["state_dict"].items()
        if w.ndim == 5
    )
    assert zero_slabs > 0


def test_validation_threshold_travels_with_the_prediction(tmp_path, raw, capsys):
    from bbem.metrics import evaluate_from_cli
    from bbem.metrics.threshold import stored_threshold
    from bbem.volumes import write_volume

    torch.manual_seed(0)
    ck = tmp_path / "t.pt"
    info = {"config": {"data": {"patch_size": list(ROI)}}, "metrics": {"threshold_best": 0.3}}
    torch.save(
        {
            "format": EXPORT_FORMAT,
            "model_config": TINY,
            "state_dict": build_model(TINY).state_dict(),
            "info": info,
        },
        ck,
    )
    out = predict_volume(ck, raw[0], tmp_path / "p.zarr", progress=False).output
    assert stored_threshold(out) == pytest.approx(0.3)
    assert stored_threshold(raw[0]) is None  # a volume bbem infer did not write
    truth = np.zeros(raw[1].shape, np.uint8)
    truth[2:5, 10:20, 10:20] = 1
    write_volume(tmp_path / "t.zarr", truth, voxel_size=VOXEL, offset=OFFSET)
    capsys.readouterr()
    r = evaluate_from_cli(str(out), str(tmp_path / "t.zarr"), cremi=False)
    assert r["protocol"]["threshold"] == pytest.approx(0.3)
    assert "stored with the prediction" in capsys.readouterr().out
    r = evaluate_from_cli(str(out), str(tmp_path / "t.zarr"), threshold=0.7, cremi=False)
    assert r["protocol"]["threshold"] == pytest.approx(0.7)


def test_labels_drop_objects_smaller_than_min_size(tmp_path, export, raw):
    import cc3d

    from bbem.volumes import open_volume

    prob = _read(predict_volume(export, raw[0], tmp_path / "p.zarr", progress=False).output)
    t = float(np.quantile(prob, 0.8)) / 255  # a threshold that leaves many small specks

    def sizes(min_size: int) -> np.ndarray:
        out = tmp_path / f"l{min_size}.zarr"
        predict_volume(
            export, raw[0], out, threshold=t, min_size=min_size, block=(4, 16, 16), progress=False
        )
        lab = open_volume(out / "labels" / "clefts").read()
        # the cleft instances of the whole volume, numbered 1..n by first voxel
        assert np.array_equal(
            lab, first_voxel_instances(_read(out) >= threshold_level(t), min_size)
        )
        return np.asarray(cc3d.statistics(cc3d.connected_components(lab > 0))["voxel_counts"][1:])

    everything = sizes(0)
    # objects on both sides of 20 voxels: the test can fail
    assert (everything < 20).any()
    assert (everything >= 20).any()
    kept = sizes(20)
    assert kept.min() >= 20
    assert sorted(kept) == sorted(everything[everything >= 20])


def test_validation_threshold_one_rule():
    from bbem.model import validation_threshold

    assert validation_threshold({"metrics": {"threshold_best": 0.42}}) == 0.42  # checkpoint
    assert validation_threshold({"info": {"metrics": {"threshold_best": 0.3}}}) == 0.3  # export
    assert validation_threshold({"metrics": {}, "info": {"metrics": {"threshold_best": 1}}}) == 1
    for bad in (None, -0.1, 1.5, True, "0.5"):
        assert validation_threshold({"metrics": {"threshold_best": bad}}) is None
    assert validation_threshold({}) is None
