"""bbem.synth: a deterministic, CREMI-like synthetic volume with thin, rare cleft sheets."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from scipy import ndimage as ndi
from scipy.stats import wasserstein_distance

from bbem.cli import main
from bbem.errors import UserError
from bbem.synth import KEYS, SynthConstants, make_synthetic, write_synthetic
from bbem.volumes import open_volume

SHAPE = (16, 224, 224)


@pytest.fixture(scope="module")
def vol() -> dict:
    return make_synthetic(SHAPE, seed=3)


def test_shapes_dtypes_and_determinism(vol: dict) -> None:
    assert vol["raw"].shape == vol["clefts"].shape == vol["neuron_ids"].shape == SHAPE
    assert vol["raw"].dtype == np.uint8
    assert vol["clefts"].dtype == np.uint64
    assert vol["neuron_ids"].dtype == np.uint64
    assert vol["voxel_size"] == (40.0, 4.0, 4.0)
    a, b = make_synthetic((6, 96, 96), seed=3), make_synthetic((6, 96, 96), seed=3)
    for k in ("raw", "clefts", "neuron_ids"):
        np.testing.assert_array_equal(a[k], b[k])
    other = make_synthetic((6, 96, 96), seed=4)
    assert (other["raw"] != a["raw"]).mean() > 0.5


def test_constants_are_frozen_and_shape_the_volume() -> None:
    import dataclasses

    c = SynthConstants()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.electrons = 1.0  # type: ignore[misc]
    base = make_synthetic((6, 64, 64), seed=1)
    same = make_synthetic((6, 64, 64), seed=1, constants=c)
    np.testing.assert_array_equal(base["raw"], same["raw"])
    lost = make_synthetic(
        (6, 64, 64), seed=1, constants=dataclasses.replace(c, missing_section_p=1)
    )
    assert lost["info"]["missing_sections"] == list(range(6))
    bare = dataclasses.replace(c, cleft_fraction=(0.0, 0.0))
    assert not make_synthetic((6, 64, 64), seed=1, constants=bare)["clefts"].any()


def test_clefts_are_rare_instances(vol: dict) -> None:
    c = vol["clefts"]
    frac = (c > 0).mean()
    assert 0.002 < frac < 0.01, frac
    ids = np.unique(c)
    assert ids[0] == 0  # 0, then 1..K
    assert np.array_equal(ids[1:], np.arange(1, len(ids)))
    assert len(ids) - 1 == vol["info"]["synapses"] >= 3


def test_clefts_are_thin_sheets_spanning_sections(vol: dict) -> None:
    c, lab = vol["clefts"], vol["neuron_ids"]
    square = np.ones((1, 3, 3), bool)
    for i in range(1, int(c.max()) + 1):
        m = c == i
        zs = np.unique(np.nonzero(m)[0])
        assert len(zs) >= 2, f"cleft {i} lies in one section"
        # ~3 voxels thick in-plane: two 3x3 erosions leave (almost) nothing
        assert ndi.binary_erosion(m, square, iterations=2).sum() <= 0.03 * m.sum()
        # one connected sheet (unless a shifted section cut it), between exactly two neurons
        if not set(vol["info"]["shifted_sections"]) & set(zs.tolist()):
            assert ndi.label(m, np.ones((3, 3, 3)))[1] == 1
        assert len(np.unique(lab[m])) == 2
    # lying on membranes: every cleft voxel is within 2 px (in-plane) of another neuron
    other = np.zeros(c.shape, bool)
    for dy, dx in ((0, 2), (0, -2), (2, 0), (-2, 0), (0, 1), (0, -1), (1, 0), (-1, 0)):
        other |= np.roll(lab, (dy, dx), axis=(1, 2)) != lab
    assert other[c > 0].mean() > 0.97


def test_lookalikes_and_cells(vol: dict) -> None:
    info = vol["info"]
    assert info["lookalike_contacts"] >= 0.5 * info["synapses"]
    assert info["vesicle_clouds_at_plain_membranes"] >= 1
    sizes = np.bincount(vol["neuron_ids"].ravel())[1:]
    sizes = sizes[sizes > 0]
    assert len(sizes) >= 15
    assert np.percentile(sizes, 90) > 5 * np.percentile(sizes, 10)  # varied cell sizes


def test_looks_like_em(vol: dict, shared_data_or_none: Path | None) -> None:
    raw, lab = vol["raw"].astype(float), vol["neuron_ids"]
    membrane = (np.roll(lab, 1, 1) != lab) | (np.roll(lab, 1, 2) != lab)
    far = ndi.distance_transform_edt(~membrane, sampling=(100, 1, 1)) > 8
    assert raw[far].mean() - raw[membrane].mean() > 50  # dark membranes on lighter cytoplasm
    # near a cleft (postsynaptic density, membranes) it is darker still than a plain membrane
    near_cleft = ndi.binary_dilation(vol["clefts"] > 0, np.ones((1, 3, 3)))
    assert raw[near_cleft].mean() < raw[membrane & ~near_cleft].mean()
    sec = raw.reshape(raw.shape[0], -1).mean(1)
    assert sec.std() > 1.0  # uneven contrast between sections
    assert 100 < raw.mean() < 160
    assert 35 < raw.std() < 75
    if shared_data_or_none is not None:
        real = open_volume(shared_data_or_none / "vnc-stack1-left.hdf")[5:10, :512, :512]
        d = wasserstein_distance(raw[::2, ::4, ::4].ravel(), real[:, ::4, ::4].ravel())
        assert d < 15, f"grey-level histogram {d:.1f} levels away from real EM"
        # as sharp and as finely textured as real EM (not by construction: only the grey-level
        # histogram is calibrated)
        for stat in (_sharpness, _fine_texture):
            want, got = stat(real.astype(float)), stat(raw)
            assert 0.75 < got / want < 1.25, (
                f"{stat.__name__}: synthetic {got:.1f}, real {want:.1f}"
            )


def _sharpness(v: np.ndarray) -> float:
    """Mean in-plane Sobel gradient magnitude (grey levels per pixel)."""
    return float(np.hypot(ndi.sobel(v, 2), ndi.sobel(v, 1)).mean() / 8)


def _fine_texture(v: np.ndarray) -> float:
    """Standard deviation of detail finer than ~2 pixels."""
    return float((v - ndi.gaussian_filter(v, (0, 2, 2))).std())


@pytest.fixture
def shared_data_or_none() -> Path | None:
    from tests.conftest import SHARED_DATA

    return SHARED_DATA if (SHARED_DATA / "vnc-stack1-left.hdf").is_file() else None


def test_write_synthetic_container(tmp_path: Path) -> None:
    out = write_synthetic(tmp_path / "s.zarr", shape=(4, 64, 64), seed=1)
    want = make_synthetic((4, 64, 64), seed=1)
    for name, key in KEYS.items():
        v = open_volume(out, key=key)
        assert v.voxel_size == (40.0, 4.0, 4.0)
        np.testing.assert_array_equal(v.read(), want[name])
        np.testing.assert_array_equal(open_volume(out / key).read(), want[name])
    with pytest.raises(UserError, match="exists"):
        write_synthetic(tmp_path / "s.zarr", shape=(4, 64, 64), seed=2)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out, png = tmp_path / "c.zarr", tmp_path / "p.png"
    argv = ["synth", str(out), "--shape", "6,96,96", "--seed", "2", "--preview", str(png)]
    assert main(argv) == 0
    assert "clefts" in capsys.readouterr().out
    assert open_volume(out).shape == (6, 96, 96)  # no key: volumes/raw
    img = matplotlib.image.imread(png)
    assert img.ndim == 3
    assert img.shape[0] > 200
    # bad input: one line, exit 2, nothing written
    for bad, needle in (
        (argv, "exists"),
        (["synth", str(tmp_path / "z.zarr"), "--shape", "0,64,64"], "shape"),
        (["synth", str(tmp_path / "z.zarr"), "--preview", str(tmp_path / "p.jpg")], ".png"),
    ):
        assert main(bad) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err, err
        assert "\n" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.zarr", "p.png"]
