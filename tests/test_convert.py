"""bbem convert: streamed, verified, bounded memory, nothing half-written on failure."""

from __future__ import annotations

import importlib
import os
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile

from bbem.cli import main
from bbem.errors import UserError
from bbem.volumes import CLEFT_BACKGROUND, convert, open_volume, write_volume
from bbem.volumes.convert import block_shape

BIG = CLEFT_BACKGROUND
# the module, not the function of the same name that bbem.volumes exports
convert_mod = importlib.import_module("bbem.volumes.convert")


def make_cremi(path: Path, shape=(6, 40, 50), label_shape=None, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 255, shape, dtype=np.uint8)
    clefts = np.full(label_shape or shape, BIG, np.uint64)
    clefts[1:3, 5:8, 10:30] = 4
    neurons = rng.integers(1, 5, label_shape or shape).astype(np.uint64)
    with h5py.File(path, "w") as f:
        for k, d in (
            ("volumes/raw", raw),
            ("volumes/labels/clefts", clefts),
            ("volumes/labels/neuron_ids", neurons),
        ):
            ds = f.create_dataset(k, data=d, chunks=(2, 16, 16))
            ds.attrs["resolution"] = (40.0, 4.0, 4.0)
            ds.attrs["offset"] = (0.0, 40.0, 80.0)
        f.create_dataset("annotations/locations", data=np.zeros((3, 3)))
    return {"raw": raw, "clefts": np.where(clefts == BIG, 0, clefts), "neurons": neurons}


def test_cremi_converts_whole_container(tmp_path: Path) -> None:
    src = make_cremi(tmp_path / "s.hdf")
    outs = convert(tmp_path / "s.hdf", tmp_path / "s.zarr", chunks=(2, 16, 16), progress=False)
    assert set(outs) == {"volumes/raw", "volumes/labels/clefts", "volumes/labels/neuron_ids"}
    for key, want in (
        ("volumes/raw", src["raw"]),
        ("volumes/labels/clefts", src["clefts"]),
        ("volumes/labels/neuron_ids", src["neurons"]),
    ):
        v = open_volume(tmp_path / "s.zarr", key=key)
        assert v.voxel_size == (40.0, 4.0, 4.0)
        assert v.offset == (0.0, 40.0, 80.0)
        assert v.chunks == (2, 16, 16)
        assert v.format == "zarr v3"
        np.testing.assert_array_equal(v.read(), want)
    # the cleft background is stored as 0 in the output, not mapped on read
    import zarr

    stored = zarr.open_array(str(tmp_path / "s.zarr/volumes/labels/clefts/0"), mode="r")[:]
    assert stored.max() == 4
    assert stored.min() == 0
    assert not (tmp_path / "s.zarr.partial").exists()


def test_key_converts_one_volume_to_an_image(tmp_path: Path) -> None:
    src = make_cremi(tmp_path / "s.hdf")
    convert(tmp_path / "s.hdf", tmp_path / "c.zarr", key="volumes/labels/clefts", progress=False)
    v = open_volume(tmp_path / "c.zarr")  # the output root is the image
    np.testing.assert_array_equal(v.read(), src["clefts"])
    convert(f"{tmp_path / 's.hdf'}:volumes/raw", tmp_path / "r.tif", progress=False)
    t = open_volume(tmp_path / "r.tif")
    np.testing.assert_array_equal(t.read(), src["raw"])
    assert t.voxel_size == (40.0, 4.0, 4.0)
    assert t.offset == (0.0, 40.0, 80.0)


def test_tiff_folder_to_zarr(tmp_path: Path) -> None:
    (tmp_path / "secs").mkdir()
    stack = np.arange(5 * 30 * 20, dtype=np.uint16).reshape(5, 30, 20)
    for z in range(5):
        tifffile.imwrite(tmp_path / "secs" / f"{z}.tiff", stack[z])
    convert(tmp_path / "secs", tmp_path / "f.zarr", chunks=(2, 8, 8), progress=False)
    np.testing.assert_array_equal(open_volume(tmp_path / "f.zarr").read(), stack)


def test_block_shape_within_budget() -> None:
    assert block_shape((100, 1000, 1000), (10, 100, 100), 1, 10**9) == (100, 1000, 1000)
    b = block_shape((100, 1000, 1000), (10, 100, 100), 1, 4 * 10**6)  # 4 MB: 4 rows of chunks
    assert b == (10, 400, 1000)
    assert np.prod(b) <= 4 * 10**6
    assert block_shape((100, 1000, 1000), (10, 100, 100), 8, 1) == (10, 100, 100)


def test_memory_bounded_for_a_volume_larger_than_the_cap(tmp_path: Path) -> None:
    """A 32 MB volume converts with a 4 MB cap: peak traced memory stays under the cap."""
    shape = (32, 1024, 1024)
    with h5py.File(tmp_path / "big.h5", "w") as f:
        ds = f.create_dataset("raw", shape=shape, dtype="uint8", chunks=(4, 128, 128))
        for z in range(0, shape[0], 4):  # a gradient: compressible, but every chunk differs
            ds[z : z + 4] = ((np.arange(z, z + 4)[:, None, None] + np.arange(1024)) % 251).astype(
                np.uint8
            )
    cap = 4 * 2**20
    assert np.prod(shape) >= 8 * cap
    tracemalloc.start()
    try:
        convert(tmp_path / "big.h5", tmp_path / "big.zarr", chunks=(4, 128, 128), max_memory=cap)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < cap, f"peak {peak / 2**20:.1f} MB over the {cap / 2**20:.0f} MB cap"
    v = open_volume(tmp_path / "big.zarr")
    with h5py.File(tmp_path / "big.h5", "r") as f:
        np.testing.assert_array_equal(v[5:9, 100:300, 900:1024], f["raw"][5:9, 100:300, 900:1024])


def test_shape_mismatch_refused(tmp_path: Path) -> None:
    make_cremi(tmp_path / "m.hdf", label_shape=(6, 40, 49))
    with pytest.raises(UserError, match="raw and label shapes disagree"):
        convert(tmp_path / "m.hdf", tmp_path / "m.zarr", progress=False)
    assert not (tmp_path / "m.zarr").exists()
    assert not (tmp_path / "m.zarr.partial").exists()


def test_nan_in_raw_refused_nothing_left(tmp_path: Path) -> None:
    data = np.ones((4, 16, 16), np.float32)
    data[3, 15, 15] = np.nan
    tifffile.imwrite(tmp_path / "n.tif", data)
    with pytest.raises(UserError, match="NaN"):
        convert(tmp_path / "n.tif", tmp_path / "n.zarr", chunks=(1, 16, 16), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n.tif"]


def test_failed_verification_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    make_cremi(tmp_path / "s.hdf")
    calls = iter(range(10**6))
    monkeypatch.setattr(convert_mod, "_digest", lambda block: next(calls).to_bytes(8, "little"))
    with pytest.raises(RuntimeError, match="verification failed"):
        convert(tmp_path / "s.hdf", tmp_path / "s.zarr", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.hdf"]


def test_cli_errors_exit_2(tmp_path: Path, capsys) -> None:
    make_cremi(tmp_path / "s.hdf")
    write_volume(tmp_path / "exists.zarr", np.zeros((2, 2, 2), np.uint8))
    cases = [
        ([str(tmp_path / "missing.h5"), str(tmp_path / "o.zarr")], "does not exist"),
        ([str(tmp_path / "s.hdf"), str(tmp_path / "exists.zarr")], "exists"),
        ([str(tmp_path / "s.hdf"), str(tmp_path / "o.zarr"), "--key", "nope"], "volumes/raw"),
    ]
    (tmp_path / "odd.bin").write_bytes(b"\x00" * 16)
    cases.append(([str(tmp_path / "odd.bin"), str(tmp_path / "o.zarr")], "unknown format"))
    for argv, needle in cases:
        assert main(["convert", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0, err
        assert needle in err, err
    assert not (tmp_path / "o.zarr").exists()
    assert (
        main(["convert", str(tmp_path / "s.hdf"), str(tmp_path / "exists.zarr"), "--overwrite"])
        == 0
    )
    assert "verified" in capsys.readouterr().out
    assert open_volume(tmp_path / "exists.zarr", key="volumes/raw").shape == (6, 40, 50)
    assert os.listdir(tmp_path).count("exists.zarr.partial") == 0
