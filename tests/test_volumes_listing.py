"""bbem.volumes.list_volumes: which 3D volumes a container holds, and their kind (no napari)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import zarr
from test_volumes import make_cremi

from bbem.errors import UserError
from bbem.volumes import (
    VolumeEntry,
    create_ome_zarr,
    is_volume_path,
    list_volumes,
    open_volume,
    write_volume,
    write_volumes,
)
from bbem.volumes.zarr_io import ome_attributes

SHAPE = (4, 16, 16)


def entries(*pairs: tuple[str | None, str]) -> list[VolumeEntry]:
    return [VolumeEntry(k, kind) for k, kind in pairs]


def user_error(path: Path, match: str) -> str:
    """The one-line UserError list_volumes raises for ``path``."""
    with pytest.raises(UserError, match=match) as e:
        list_volumes(path)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_cremi_hdf5_skips_annotations(tmp_path: Path, rng: np.random.Generator) -> None:
    path = tmp_path / "sample_A.hdf"
    make_cremi(path, rng.integers(0, 255, SHAPE, dtype=np.uint8), rng)  # with 1D annotations/ids
    with h5py.File(path, "a") as f:
        f.create_dataset("annotations/locations", data=np.zeros((3, 3), np.float32))
    got = list_volumes(path)
    # raw first, neuron ids, then clefts last (drawn on top)
    assert got == entries(
        ("volumes/raw", "image"),
        ("volumes/labels/neuron_ids", "labels"),
        ("volumes/labels/clefts", "labels"),
    )
    for e in got:  # each key is what open_volume takes
        assert open_volume(path, key=e.key).shape == SHAPE


def test_plain_zarr_group(tmp_path: Path) -> None:
    g = zarr.open_group(str(tmp_path / "g.zarr"), mode="w", zarr_format=3)
    g.create_array("volumes/raw", data=np.zeros(SHAPE, np.uint8))
    g.create_array("volumes/labels/clefts", data=np.zeros(SHAPE, np.uint64))
    g.create_array("volumes/labels/neuron_ids", data=np.zeros(SHAPE, np.uint64))
    g.create_array("volumes/pred", data=np.zeros(SHAPE, np.uint8))  # named as a prediction
    g.create_array("volumes/mean", data=np.zeros(SHAPE[1:], np.float32))  # 2D: not a volume
    assert list_volumes(tmp_path / "g.zarr") == entries(
        ("volumes/raw", "image"),
        ("volumes/pred", "probability"),
        ("volumes/labels/neuron_ids", "labels"),
        ("volumes/labels/clefts", "labels"),
    )
    # the same layout as OME images per key (write_volumes) lists the same keys, not levels
    write_volumes(
        tmp_path / "c.zarr",
        {"volumes/raw": np.zeros(SHAPE, np.uint8), "volumes/labels/clefts": np.ones(SHAPE, "u8")},
    )
    assert list_volumes(tmp_path / "c.zarr") == entries(
        ("volumes/raw", "image"), ("volumes/labels/clefts", "labels")
    )


def test_ome_zarr_prediction_with_labels(tmp_path: Path) -> None:
    # the layout bbem infer's store writes: a probability image at the root, labels/clefts
    path = tmp_path / "pred.zarr"
    create_ome_zarr(path, SHAPE, np.uint8, None, name="cleft_probability")
    create_ome_zarr(path / "labels" / "clefts", SHAPE, np.uint8, None, name="clefts")
    zarr.open_group(path / "labels", mode="a").attrs.update({"ome": {"labels": ["clefts"]}})
    got = list_volumes(path)
    assert got == entries((None, "probability"), ("labels/clefts", "labels"))
    assert open_volume(path, key=got[1].key).shape == SHAPE


def test_ome_zarr_channel_axis_and_saved_kind(tmp_path: Path) -> None:
    def ome(name: str, channels: int) -> Path:
        g = zarr.open_group(tmp_path / name, mode="w", zarr_format=3)
        attrs = ome_attributes("em", (40, 4, 4), (0, 0, 0))
        ms = attrs["ome"]["multiscales"][0]
        ms["axes"].insert(0, {"name": "c", "type": "channel"})
        ms["datasets"][0]["coordinateTransformations"] = [
            {"type": "scale", "scale": [1.0, 40.0, 4.0, 4.0]}
        ]
        g.attrs.update(attrs)
        g.create_array("0", data=np.zeros((channels, *SHAPE), np.uint16))
        return tmp_path / name

    assert list_volumes(ome("c1.zarr", 1)) == entries((None, "image"))  # c of length 1: a volume
    user_error(ome("c2.zarr", 2), "holds no 3D volume")  # two channels: not one volume
    # napari-bbem's writer records the layer's kind; it wins over the name and dtype
    path = write_volume(tmp_path / "saved.zarr", np.zeros(SHAPE, np.uint16), name="em")
    group = zarr.open_group(path, mode="r+")
    group.attrs["bbem_layer"] = {"kind": "probability"}
    assert list_volumes(path) == entries((None, "probability"))
    group.attrs["bbem_layer"] = {"kind": "nonsense"}  # not a kind: the usual rules
    assert list_volumes(path) == entries((None, "image"))


def test_tiff_stack_and_2d_tiff(tmp_path: Path) -> None:
    write_volume(tmp_path / "stack.tif", np.zeros(SHAPE, np.uint8))
    assert list_volumes(tmp_path / "stack.tif") == entries((None, "image"))
    write_volume(tmp_path / "clefts.tiff", np.zeros(SHAPE, np.uint16))
    assert list_volumes(tmp_path / "clefts.tiff") == entries((None, "labels"))
    tifffile.imwrite(tmp_path / "flat.tif", np.zeros((20, 20), np.uint8))
    user_error(tmp_path / "flat.tif", "2D image")


def test_not_a_container_unreadable_and_empty(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "folder").mkdir()
    for p in (tmp_path / "notes.txt", tmp_path / "folder", tmp_path / "missing.zarr"):
        assert not is_volume_path(p)
        user_error(p, "neither a zarr store, an hdf5 file nor a tiff stack")
    (tmp_path / "broken.h5").write_bytes(b"not hdf5 at all")
    user_error(tmp_path / "broken.h5", "not a readable hdf5 file")
    (tmp_path / "broken.zarr").mkdir()
    (tmp_path / "broken.zarr" / "zarr.json").write_text("{not json")
    user_error(tmp_path / "broken.zarr", "not a readable zarr store")
    zarr.open_group(tmp_path / "empty.zarr", mode="w", zarr_format=3)
    assert is_volume_path(tmp_path / "empty.zarr")
    user_error(tmp_path / "empty.zarr", "holds no 3D volume")


def test_broken_member_metadata_is_one_line(tmp_path: Path) -> None:
    # the root opens; a member's zarr.json is damaged: still one UserError naming the store
    path = write_volumes(tmp_path / "c.zarr", {"volumes/raw": np.zeros(SHAPE, np.uint8)})
    member = next(path.rglob("raw/zarr.json"))
    member.write_text("{not json")
    user_error(path, "not a readable zarr store")
