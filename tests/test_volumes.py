"""bbem.volumes: every format opens lazily through one interface, with its metadata."""

from __future__ import annotations

import pickle
from pathlib import Path

import dask.array as da
import h5py
import numpy as np
import pytest
import tifffile
import zarr
from zarr.storage import LocalStore

from bbem.errors import UserError
from bbem.volumes import (
    CLEFT_BACKGROUND,
    check_same_shape,
    create_ome_zarr,
    list_keys,
    ome_multiscales,
    open_volume,
    write_volume,
    write_volumes,
)

BIG = CLEFT_BACKGROUND


@pytest.fixture
def vol(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 255, size=(6, 40, 50), dtype=np.uint8)


def make_cremi(path: Path, raw: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A CREMI-style hdf5 file: background of the cleft labels is the largest uint64."""
    clefts = np.full(raw.shape, BIG, dtype=np.uint64)
    clefts[2:4, 10:12, 5:30] = 7
    clefts[1:3, 30:33, 20:40] = 12
    with h5py.File(path, "w") as f:
        for key, data in (
            ("volumes/raw", raw),
            ("volumes/labels/clefts", clefts),
            ("volumes/labels/neuron_ids", rng.integers(1, 9, raw.shape).astype(np.uint64)),
        ):
            ds = f.create_dataset(key, data=data, chunks=(2, 16, 16), compression="gzip")
            ds.attrs["resolution"] = (40.0, 4.0, 4.0)
            ds.attrs["offset"] = (80.0, 8.0, 4.0)
        f.create_dataset("annotations/ids", data=np.arange(3))
    return clefts


# -- formats ------------------------------------------------------------------------------------


def test_zarr_v2_array_with_cremi_attributes(tmp_path: Path, vol: np.ndarray) -> None:
    a = zarr.create_array(
        str(tmp_path / "v2.zarr"),
        shape=vol.shape,
        dtype=vol.dtype,
        chunks=(2, 16, 16),
        zarr_format=2,
    )
    a[:] = vol
    a.attrs["resolution"] = [40, 4, 4]
    a.attrs["offset"] = [0, 12, 8]
    v = open_volume(tmp_path / "v2.zarr")
    assert v.shape == vol.shape
    assert v.dtype == np.uint8
    assert v.chunks == (2, 16, 16)
    assert v.voxel_size == (40.0, 4.0, 4.0)
    assert v.offset == (0.0, 12.0, 8.0)
    assert v.format == "zarr v2"
    np.testing.assert_array_equal(v[1:3, 5:20, 7:9], vol[1:3, 5:20, 7:9])
    np.testing.assert_array_equal(v.read(), vol)


def test_ome_zarr_04_v2_multiscale_5d_micrometer(tmp_path: Path, vol: np.ndarray) -> None:
    """An OME-Zarr 0.4 image from another tool: t, c, z, y, x axes, micrometres, 2 levels."""
    g = zarr.open_group(str(tmp_path / "ome.zarr"), mode="w", zarr_format=2)
    l0 = g.create_array("s0", shape=(1, 1, *vol.shape), dtype="uint8", chunks=(1, 1, 3, 20, 20))
    l0[0, 0] = vol
    small = vol[:, ::2, ::2]
    l1 = g.create_array("s1", shape=(1, 1, *small.shape), dtype="uint8", chunks=(1, 1, 3, 20, 20))
    l1[0, 0] = small
    axes = [{"name": "t", "type": "time"}, {"name": "c", "type": "channel"}] + [
        {"name": n, "type": "space", "unit": "micrometer"} for n in "zyx"
    ]
    tr = [{"type": "translation", "translation": [0, 0, 0.1, 0.0, 0.02]}]
    g.attrs["multiscales"] = [
        {
            "version": "0.4",
            "axes": axes,
            "datasets": [
                {
                    "path": "s0",
                    "coordinateTransformations": [
                        {"type": "scale", "scale": [1, 1, 0.04, 0.004, 0.004]},
                        *tr,
                    ],
                },
                {
                    "path": "s1",
                    "coordinateTransformations": [
                        {"type": "scale", "scale": [1, 1, 0.04, 0.008, 0.008]},
                        *tr,
                    ],
                },
            ],
        }
    ]
    v = open_volume(tmp_path / "ome.zarr")
    assert v.shape == vol.shape
    assert v.chunks == (3, 20, 20)
    np.testing.assert_allclose(v.voxel_size, (40, 4, 4))
    np.testing.assert_allclose(v.offset, (100, 0, 20))
    np.testing.assert_array_equal(v[2:5, 3:33, 1:2], vol[2:5, 3:33, 1:2])
    v1 = open_volume(tmp_path / "ome.zarr", level=1)
    np.testing.assert_allclose(v1.voxel_size, (40, 8, 8))
    np.testing.assert_array_equal(v1.read(), small)
    with pytest.raises(UserError, match="level 2 does not exist"):
        open_volume(tmp_path / "ome.zarr", level=2)


def test_one_ome_multiscales_reader() -> None:
    """OME 0.5 nests the metadata under "ome", 0.4 keeps it at the top; a group without a
    (non-empty) list is not an image. The napari plugin reads it through the same function."""
    ms = [{"datasets": [{"path": "0"}]}]
    assert ome_multiscales({"ome": {"version": "0.5", "multiscales": ms}}) == ms
    assert ome_multiscales({"multiscales": ms}) == ms
    assert ome_multiscales({"ome": {"version": "0.5"}, "multiscales": ms}) == ms
    for attrs in ({}, {"multiscales": []}, {"ome": "0.5"}, {"multiscales": "x"}):
        assert ome_multiscales(attrs) is None, attrs
    reader = pytest.importorskip("napari_bbem.reader")
    assert reader.ome_multiscales is ome_multiscales


def test_list_keys_names_ome_images_once(tmp_path: Path, vol: np.ndarray) -> None:
    write_volumes(tmp_path / "c.zarr", {"volumes/raw": vol, "volumes/labels/clefts": vol})
    keys = list_keys(zarr.open_group(str(tmp_path / "c.zarr"), mode="r"))
    assert keys == ["volumes/labels/clefts", "volumes/raw"]  # not their level-0 arrays


def test_zarr_v3_group_keys_and_path_forms(tmp_path: Path, vol: np.ndarray) -> None:
    g = zarr.open_group(str(tmp_path / "g.zarr"), mode="w", zarr_format=3)
    g.create_array("volumes/raw", data=vol, chunks=(2, 16, 16))
    clefts = np.where(vol > 250, 5, BIG).astype(np.uint64)  # CREMI background in a zarr
    g.create_array("volumes/labels/clefts", data=clefts, chunks=(2, 16, 16))
    g.create_array("other", data=vol[:2])
    # no key: the CREMI raw is the default
    assert open_volume(tmp_path / "g.zarr").name.endswith("g.zarr/volumes/raw")
    np.testing.assert_array_equal(open_volume(tmp_path / "g.zarr").read(), vol)
    by_key = open_volume(tmp_path / "g.zarr", key="volumes/labels/clefts")
    assert by_key.name.endswith("g.zarr/volumes/labels/clefts")
    by_path = open_volume(f"{tmp_path}/g.zarr/volumes/labels/clefts")
    np.testing.assert_array_equal(by_key.read(), np.where(vol > 250, 5, 0))
    np.testing.assert_array_equal(by_path.read(), by_key.read())
    assert by_key.format == "zarr v3"
    with pytest.raises(UserError, match=r"key 'nope' is not in .*volumes/labels/clefts"):
        open_volume(tmp_path / "g.zarr", key="nope")
    # a group with several datasets and no CREMI raw: the error lists them
    h = zarr.open_group(str(tmp_path / "h.zarr"), mode="w", zarr_format=3)
    h.create_array("a", data=vol)
    h.create_array("b", data=vol)
    with pytest.raises(UserError, match=r"choose one with --key.*a, b"):
        open_volume(tmp_path / "h.zarr")


def test_write_volume_zarr_round_trip_metadata(tmp_path: Path, rng: np.random.Generator) -> None:
    data = rng.random((7, 33, 45)).astype(np.float32)
    out = write_volume(
        tmp_path / "o.zarr", data, voxel_size=(40, 4, 4), offset=(400, 8, 12), chunks=(4, 16, 16)
    )
    assert out == tmp_path / "o.zarr"
    assert not (tmp_path / "o.zarr.partial").exists()
    v = open_volume(out)
    assert v.voxel_size == (40.0, 4.0, 4.0)
    assert v.offset == (400.0, 8.0, 12.0)
    assert v.chunks == (4, 16, 16)
    assert v.dtype == np.float32
    np.testing.assert_array_equal(v.read(), data)
    # OME-Zarr 0.5 metadata as napari/ome-zarr read it, and zstd on the array
    g = zarr.open_group(str(out), mode="r")
    ms = g.attrs["ome"]["multiscales"][0]
    assert g.attrs["ome"]["version"] == "0.5"
    assert [a["name"] for a in ms["axes"]] == ["z", "y", "x"]
    assert {a["unit"] for a in ms["axes"]} == {"nanometer"}
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [40, 4, 4]
    arr = g["0"]
    assert arr.metadata.zarr_format == 3
    assert arr.metadata.dimension_names == ("z", "y", "x")
    assert any("zstd" in type(c).__name__.lower() for c in arr.compressors)
    # a dask array streams into the same layout
    write_volume(tmp_path / "d.zarr", da.from_array(data, chunks=(3, 20, 20)), chunks=(4, 16, 16))
    np.testing.assert_array_equal(open_volume(tmp_path / "d.zarr").read(), data)


def test_write_volumes_container_layout(tmp_path: Path, vol: np.ndarray) -> None:
    clefts = (vol > 240).astype(np.uint64)
    write_volumes(
        tmp_path / "c.zarr",
        {"volumes/raw": vol, "volumes/labels/clefts": clefts},
        voxel_size=(40, 4, 4),
    )
    for key, data in (("volumes/raw", vol), ("volumes/labels/clefts", clefts)):
        a = open_volume(tmp_path / "c.zarr", key=key)
        b = open_volume(tmp_path / "c.zarr" / key)
        assert a.voxel_size == b.voxel_size == (40.0, 4.0, 4.0)
        np.testing.assert_array_equal(a.read(), data)
        np.testing.assert_array_equal(b.read(), data)
    with pytest.raises(UserError, match="raw and label shapes disagree"):
        write_volumes(tmp_path / "bad.zarr", {"volumes/raw": vol, "volumes/labels/clefts": vol[1:]})
    assert not (tmp_path / "bad.zarr").exists()


def test_create_ome_zarr_opens_as_that_array(tmp_path: Path) -> None:
    arr = create_ome_zarr(
        tmp_path / "p.zarr",
        (10, 64, 64),
        "float32",
        (5, 32, 32),
        voxel_size=(40, 4, 4),
        offset=(40, 0, 0),
    )
    arr[0:5, 0:32, 0:32] = 0.5
    v = open_volume(tmp_path / "p.zarr")
    assert v.shape == (10, 64, 64)
    assert v.chunks == (5, 32, 32)
    assert v.voxel_size == (40.0, 4.0, 4.0)
    assert v.offset == (40.0, 0.0, 0.0)
    got = v.read()
    assert got[:5, :32, :32].min() == 0.5
    assert got[5:].max() == 0.0


def test_multipage_tiff_round_trip(tmp_path: Path, vol: np.ndarray) -> None:
    write_volume(tmp_path / "s.tif", vol, voxel_size=(50, 4.6, 4.6), offset=(100, 0, 9.2))
    v = open_volume(tmp_path / "s.tif")
    assert v.shape == vol.shape
    assert v.format == "tiff"
    np.testing.assert_allclose(v.voxel_size, (50, 4.6, 4.6))
    np.testing.assert_allclose(v.offset, (100, 0, 9.2))
    np.testing.assert_array_equal(v[2:4, 10:20, 3:40], vol[2:4, 10:20, 3:40])


def test_imagej_tiff_voxel_size(tmp_path: Path, vol: np.ndarray) -> None:
    tifffile.imwrite(
        tmp_path / "ij.tif",
        vol,
        imagej=True,
        resolution=(1 / 0.004, 1 / 0.004),
        metadata={"spacing": 0.04, "unit": "um", "axes": "ZYX"},
    )
    v = open_volume(tmp_path / "ij.tif")
    np.testing.assert_allclose(v.voxel_size, (40, 4, 4), rtol=1e-6)
    np.testing.assert_array_equal(v.read(), vol)


def test_folder_of_tiffs_natural_order(tmp_path: Path) -> None:
    folder = tmp_path / "sections"
    folder.mkdir()
    for z in range(12):  # s2 must come before s10: natural, not lexical, order
        tifffile.imwrite(folder / f"s{z}.tif", np.full((20, 30), z, dtype=np.uint16))
    (folder / "notes.txt").write_text("not a section")
    v = open_volume(folder)
    assert v.shape == (12, 20, 30)
    assert v.dtype == np.uint16
    assert v.format == "tiff folder"
    assert [int(v[z, 0, 0]) for z in range(12)] == list(range(12))
    np.testing.assert_array_equal(
        v[3:6, 5:7, 0:2], np.arange(3, 6)[:, None, None] * np.ones((3, 2, 2))
    )


def test_cremi_hdf5_uint64_background(
    tmp_path: Path, vol: np.ndarray, rng: np.random.Generator
) -> None:
    clefts = make_cremi(tmp_path / "s.hdf", vol, rng)
    raw = open_volume(tmp_path / "s.hdf")  # no key: volumes/raw
    assert raw.name.endswith("volumes/raw")
    assert raw.chunks == (2, 16, 16)
    assert raw.voxel_size == (40.0, 4.0, 4.0)
    assert raw.offset == (80.0, 8.0, 4.0)
    np.testing.assert_array_equal(raw.read(), vol)
    c = open_volume(f"{tmp_path / 's.hdf'}:volumes/labels/clefts")
    got = c.read()
    assert got.dtype == np.uint64
    assert set(np.unique(got)) == {0, 7, 12}
    np.testing.assert_array_equal(got > 0, clefts != BIG)
    np.testing.assert_array_equal(
        c[2:3, 10:12, 0:10], np.where(clefts[2:3, 10:12, 0:10] == BIG, 0, 7)
    )
    # the slash form reaches inside the file too
    assert open_volume(tmp_path / "s.hdf" / "volumes/labels/neuron_ids").shape == vol.shape
    # a uint8 cleft mask keeps 255: the CREMI mapping is for 32/64-bit ids only
    write_volume(tmp_path / "clefts_mask.zarr", np.full((2, 3, 4), 255, np.uint8))
    assert open_volume(tmp_path / "clefts_mask.zarr").read().min() == 255
    with pytest.raises(UserError, match=r"'volumes/labels/nope' is not a dataset.*volumes/raw"):
        open_volume(tmp_path / "s.hdf", key="volumes/labels/nope")


def test_block_read_touches_only_its_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 64x256x256 block of a 1 GB (logical) zarr reads exactly the 8 chunks it overlaps."""
    arr = create_ome_zarr(tmp_path / "big.zarr", (256, 2048, 2048), "uint8", (32, 128, 128))
    arr[0:64, 0:256, 0:256] = 3
    arr[200:232, 1024:1152, 0:128] = 9  # far away: must not be read
    reads: list[str] = []
    orig = LocalStore.get

    async def counting_get(self, key, *args, **kwargs):  # type: ignore[no-untyped-def]
        reads.append(key)
        return await orig(self, key, *args, **kwargs)

    monkeypatch.setattr(LocalStore, "get", counting_get)
    v = open_volume(tmp_path / "big.zarr")
    reads.clear()  # metadata reads at open do not count
    block = v[0:64, 0:256, 0:256]
    assert block.shape == (64, 256, 256)
    assert (block == 3).all()
    chunk_reads = [k for k in reads if not k.endswith("zarr.json")]
    assert len(chunk_reads) == 8, chunk_reads
    assert len(set(chunk_reads)) == 8


def test_dask_and_pickle(tmp_path: Path, vol: np.ndarray, rng: np.random.Generator) -> None:
    make_cremi(tmp_path / "s.hdf", vol, rng)
    c = open_volume(tmp_path / "s.hdf", key="volumes/labels/clefts")
    d = c.to_dask(chunks=(2, 20, 25))
    assert d.chunksize == (2, 20, 25)
    np.testing.assert_array_equal(d.compute(), c.read())  # the mapping holds through dask
    c2 = pickle.loads(pickle.dumps(c))  # reopens from its URI (dask workers in other processes)
    assert c2.name == c.name
    assert c2.voxel_size == c.voxel_size
    np.testing.assert_array_equal(c2.read(), c.read())
    c.close()
    c2.close()


# -- bad input ------------------------------------------------------------------------------------


def test_missing_and_unknown(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        open_volume(tmp_path / "nope.zarr")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(UserError, match="unknown format"):
        open_volume(tmp_path / "x.txt")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(UserError, match="unknown format"):
        open_volume(tmp_path / "empty_dir")
    (tmp_path / "broken.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(UserError, match="not a readable hdf5"):
        open_volume(tmp_path / "broken.h5")


def test_not_3d_and_empty(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "flat.tif", np.zeros((20, 20), np.uint8))
    with pytest.raises(UserError, match="2D image"):
        open_volume(tmp_path / "flat.tif")
    zarr.create_array(str(tmp_path / "4d.zarr"), shape=(2, 3, 4, 5), dtype="uint8")
    with pytest.raises(UserError, match="4 dimensions"):
        open_volume(tmp_path / "4d.zarr")
    zarr.create_array(str(tmp_path / "e.zarr"), shape=(0, 4, 5), dtype="uint8")
    with pytest.raises(UserError, match="empty"):
        open_volume(tmp_path / "e.zarr")
    with pytest.raises(UserError, match="empty"):
        write_volume(tmp_path / "e2.zarr", np.zeros((3, 0, 4)))
    with pytest.raises(UserError, match="2 dimensions"):
        write_volume(tmp_path / "e3.zarr", np.zeros((3, 4)))


def test_shapes_disagree(tmp_path: Path, vol: np.ndarray) -> None:
    write_volume(tmp_path / "r.zarr", vol)
    write_volume(tmp_path / "l.zarr", vol[:, :-1].astype(np.uint64))
    with pytest.raises(UserError, match="raw and label shapes disagree"):
        check_same_shape(open_volume(tmp_path / "r.zarr"), open_volume(tmp_path / "l.zarr"))


def test_nan_refused_and_nothing_left(tmp_path: Path) -> None:
    data = np.ones((4, 8, 8), np.float32)
    data[2, 3, 3] = np.nan
    for name in ("n.zarr", "n.tif"):
        with pytest.raises(UserError, match="NaN"):
            write_volume(tmp_path / name, data)
        assert not (tmp_path / name).exists()
        assert not (tmp_path / f"{name}.partial").exists()
    lazy = da.from_array(data, chunks=(1, 8, 8))
    with pytest.raises(UserError, match="NaN"):
        write_volume(tmp_path / "n2.zarr", lazy, chunks=(1, 8, 8))
    assert list(tmp_path.iterdir()) == []


def test_existing_output_refused_unless_overwrite(tmp_path: Path, vol: np.ndarray) -> None:
    write_volume(tmp_path / "o.zarr", vol)
    with pytest.raises(UserError, match=r"exists.*--overwrite"):
        write_volume(tmp_path / "o.zarr", vol[:2])
    assert open_volume(tmp_path / "o.zarr").shape == vol.shape  # untouched
    write_volume(tmp_path / "o.zarr", vol[:2], overwrite=True)
    assert open_volume(tmp_path / "o.zarr").shape == (2, *vol.shape[1:])


def test_interrupted_write_leaves_nothing(tmp_path: Path, vol: np.ndarray) -> None:
    def boom(block: np.ndarray) -> np.ndarray:
        if block[0, 0, 0] == -1:
            raise KeyboardInterrupt
        return block

    data = da.from_array(vol.astype(np.int16), chunks=(1, 40, 50))
    data[3, 0, 0] = -1
    with pytest.raises(KeyboardInterrupt):
        write_volume(tmp_path / "i.zarr", data.map_blocks(boom), chunks=(1, 40, 50))
    assert list(tmp_path.iterdir()) == []


# -- real data ------------------------------------------------------------------------------------


def test_real_crops(shared_data: Path) -> None:
    raw = open_volume(shared_data / "vnc-stack1-left.hdf")
    assert raw.shape == (20, 1024, 512)
    assert raw.dtype == np.uint8
    np.testing.assert_allclose(raw.voxel_size, (50, 4.6, 4.6))
    clefts = open_volume(shared_data / "vnc-stack1-left.hdf", key="volumes/labels/clefts")
    block = clefts[0:20, 0:1024, 0:512]
    ids = np.unique(block)
    assert ids[0] == 0
    assert ids.max() < 1000
    assert len(ids) - 1 == 33  # 33 synapses, background 0
    assert 0.005 < (block > 0).mean() < 0.01
    tif = open_volume(shared_data / "vnc-stack2-raw.tif")
    assert tif.shape == (20, 1024, 1024)
    np.testing.assert_allclose(tif.voxel_size, (50, 4.6, 4.6))


@pytest.mark.parametrize("fmt", ["zarr", "tif", "hdf5", "folder"])
def test_random_blocks_match_numpy(tmp_path: Path, rng: np.random.Generator, fmt: str) -> None:
    """Any block read through a Volume equals the same numpy slice, in every format."""
    data = rng.integers(0, 60000, (9, 37, 41), dtype=np.uint16)
    if fmt == "zarr":
        path = write_volume(tmp_path / "v.zarr", data, chunks=(2, 8, 16))
    elif fmt == "tif":
        path = write_volume(tmp_path / "v.tif", data)
    elif fmt == "hdf5":
        path = tmp_path / "v.h5"
        with h5py.File(path, "w") as f:
            f.create_dataset("raw", data=data, chunks=(3, 10, 10))
    else:
        path = tmp_path / "secs"
        path.mkdir()
        for z in range(data.shape[0]):
            tifffile.imwrite(path / f"{z}.tif", data[z])
    v = open_volume(path)
    for _ in range(25):
        lo = [int(rng.integers(0, s)) for s in data.shape]
        hi = [int(rng.integers(a + 1, s + 1)) for a, s in zip(lo, data.shape, strict=True)]
        sl = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        np.testing.assert_array_equal(v[sl], data[sl])
    np.testing.assert_array_equal(v[4], data[4])  # an int index drops the axis, as numpy does
    np.testing.assert_array_equal(v[..., 3:5], data[..., 3:5])
    np.testing.assert_array_equal(np.asarray(v.to_dask()), data)
