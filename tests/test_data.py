"""Patch sampling and augmentations: cleft-seeking, determinism, in-plane geometry, EM defects."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bbem import data as bd
from bbem.config import RunConfig, load_config
from bbem.data import (
    PatchDataset,
    PatchSampler,
    RandElasticYXd,
    RandMisalignedSectiond,
    RandMissingSectiond,
    RandMotionBlurd,
    auto_pos_weight,
    build_augment,
    line_kernel,
    source_from_arrays,
)
from bbem.data import sources as data_sources
from bbem.errors import UserError

REPO = Path(__file__).resolve().parents[1]
OFF = {
    "flips": 0,
    "rot90": 0,
    "elastic": 0,
    "intensity": 0,
    "noise": 0,
    "missing_section": 0,
    "misaligned_section": 0,
    "motion_blur": 0,
}


def sparse_volume(rng: np.random.Generator, shape=(20, 160, 160)):
    """uint8 raw and uint64 labels with two small clefts (~0.2% of voxels)."""
    raw = rng.integers(0, 256, shape, dtype=np.uint8)
    lab = np.zeros(shape, np.uint64)
    lab[5:7, 30:34, 40:70] = 3
    lab[14, 120:124, 100:120] = 9
    return raw, lab


def as_item(img: np.ndarray, lab: np.ndarray) -> dict[str, torch.Tensor]:
    return {
        "image": torch.from_numpy(img.astype(np.float32)),
        "label": torch.from_numpy(lab.astype(np.float32)),
    }


# -- sources ------------------------------------------------------------------------------------


@pytest.mark.parametrize("in_memory_mb", [512.0, 0.0])
def test_source_z_range_and_cleft_coordinates(rng, in_memory_mb):
    raw, lab = sparse_volume(rng)
    src = source_from_arrays(raw, lab, z_range=(4, 16), in_memory_mb=in_memory_mb)
    assert src.shape == (12, 160, 160)
    # small volumes are read into memory once; otherwise every patch reads the source
    assert (src.raw is raw) == (in_memory_mb == 0)
    expected = np.argwhere(lab[4:16] != 0)
    assert src.n_cleft == len(expected)
    np.testing.assert_array_equal(np.sort(src.clefts, axis=0), np.sort(expected, axis=0))
    r, m = src.read((1, 25, 35), (4, 16, 48))
    np.testing.assert_allclose(r, raw[5:9, 25:41, 35:83] / 255.0, atol=1e-6)
    np.testing.assert_array_equal(m, lab[5:9, 25:41, 35:83] != 0)
    assert r.dtype == np.float32
    assert m.dtype == bool


def test_source_subsamples_coordinates_but_counts_all(rng, monkeypatch):
    monkeypatch.setattr(data_sources, "MAX_CLEFT_COORDS", 50)
    raw, lab = sparse_volume(rng)
    src = source_from_arrays(raw, lab)
    assert src.n_cleft == int((lab != 0).sum())
    assert len(src.clefts) == 50
    assert all(lab[tuple(c)] != 0 for c in src.clefts)
    f = (lab != 0).mean()
    assert auto_pos_weight([src], max_weight=1e6) == pytest.approx((1 - f) / f)
    assert auto_pos_weight([src]) == 1000.0  # capped


def test_source_errors(rng):
    raw, lab = sparse_volume(rng)
    with pytest.raises(UserError, match=r"z_range \[0, 30\] is outside its 20 sections"):
        source_from_arrays(raw, lab, z_range=(0, 30))
    with pytest.raises(UserError, match="differ"):
        source_from_arrays(raw, lab[:, :10])
    empty = source_from_arrays(raw, np.zeros_like(lab))
    with pytest.raises(UserError, match="no cleft voxels"):
        PatchSampler([empty], (8, 32, 32), pos_fraction=0.5)
    PatchSampler([empty], (8, 32, 32), pos_fraction=0.0)  # uniform sampling needs no clefts


# -- sampling -----------------------------------------------------------------------------------


def test_most_patches_hold_a_cleft(rng):
    raw, lab = sparse_volume(rng)
    sampler = PatchSampler([source_from_arrays(raw, lab)], (8, 48, 48), pos_fraction=0.8)
    n, hits, forced_hits = 400, 0, 0
    for _ in range(n):
        _, start, forced = sampler.sample_box(rng)
        box = tuple(slice(s, s + p) for s, p in zip(start, sampler.patch_size, strict=True))
        has = bool(lab[box].any())
        hits += has
        if forced:
            assert has  # a forced patch always contains its cleft voxel
            forced_hits += 1
    assert hits / n >= 0.8 - 0.06
    # uniform patches alone would rarely find these clefts: the forcing is what works
    uniform = PatchSampler([source_from_arrays(raw, lab)], (8, 48, 48), pos_fraction=0.0)
    u = np.mean([uniform.sample(rng)["label"].any().item() for _ in range(200)])
    assert u < 0.5 < hits / n


@settings(max_examples=60, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 12), st.integers(1, 40), st.integers(1, 40)),
    patch=st.tuples(st.integers(1, 10), st.integers(1, 32), st.integers(1, 32)),
    frac=st.tuples(st.floats(0, 0.999), st.floats(0, 0.999), st.floats(0, 0.999)),
    seed=st.integers(0, 2**16),
)
def test_forced_boxes_always_hold_their_cleft(shape, patch, frac, seed):
    cleft = tuple(int(f * s) for f, s in zip(frac, shape, strict=True))
    lab = np.zeros(shape, np.uint8)
    lab[cleft] = 1
    src = source_from_arrays(np.zeros(shape, np.uint8), lab)
    sampler = PatchSampler([src], patch, pos_fraction=1.0)
    g = np.random.default_rng(seed)
    for _ in range(5):
        _, start, forced = sampler.sample_box(g)
        assert forced
        for c, s0, p, d in zip(cleft, start, patch, shape, strict=True):
            assert s0 <= c < s0 + p  # the cleft voxel is in the patch
            assert s0 >= 0 and s0 + p <= d if p <= d else s0 <= 0  # inside, or centred if bigger
        item = sampler.sample(g)
        assert item["label"].shape == (1, *patch)
        assert item["label"].sum() == 1


def test_patch_dict_shapes_and_values(rng):
    raw, lab = sparse_volume(rng)
    item = PatchSampler([source_from_arrays(raw, lab)], (8, 32, 48), 1.0).sample(rng)
    assert item["image"].shape == item["label"].shape == (1, 8, 32, 48)
    assert item["image"].dtype == item["label"].dtype == torch.float32
    assert item["image"].min() >= 0
    assert item["image"].max() <= 1
    assert set(item["label"].unique().tolist()) <= {0.0, 1.0}


def test_volume_smaller_than_patch_is_padded(rng):
    raw = rng.integers(0, 256, (6, 40, 40), dtype=np.uint8)
    lab = np.zeros(raw.shape, np.uint8)
    lab[2, 20, 20:23] = 1
    sampler = PatchSampler([source_from_arrays(raw, lab)], (8, 64, 64), 1.0)
    item = sampler.sample(rng)
    assert item["image"].shape == (1, 8, 64, 64)
    assert item["label"].sum() == (lab != 0).sum()


def test_volume_choice_follows_size(rng):
    a = source_from_arrays(*sparse_volume(rng, (20, 160, 160)), name="big")
    b = source_from_arrays(*sparse_volume(rng, (20, 160, 40)), name="small")
    sampler = PatchSampler([a, b], (8, 32, 32), pos_fraction=0.0)
    picks = np.array([sampler.sample_box(rng)[0] for _ in range(500)])
    assert (picks == 1).mean() == pytest.approx(0.2, abs=0.06)


def take(ds, n):
    it = iter(ds)
    return [next(it) for _ in range(n)]


def test_dataset_is_deterministic_for_a_seed(rng):
    src = [source_from_arrays(*sparse_volume(rng))]
    aug = {"elastic": 0.0, "missing_section": 0.5, "misaligned_section": 0.5, "motion_blur": 0.5}

    def run(seed):
        return take(PatchDataset(src, (8, 32, 32), 0.8, build_augment(aug), seed=seed), 6)

    a, b, c = run(1), run(1), run(2)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["image"], y["image"])
        assert torch.equal(x["label"], y["label"])
    assert any(not torch.equal(x["image"], z["image"]) for x, z in zip(a, c, strict=True))
    assert type(a[0]["image"]) is torch.Tensor  # plain tensors, not MetaTensors


def test_loader_with_a_worker_batches_and_differs_from_main_process(rng):
    src = [source_from_arrays(*sparse_volume(rng))]
    ds = PatchDataset(lambda: src, (8, 32, 32), 0.8, build_augment(), seed=3)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=1)
    batch = next(iter(loader))
    assert batch["image"].shape == batch["label"].shape == (3, 1, 8, 32, 32)
    again = next(iter(torch.utils.data.DataLoader(ds, batch_size=3, num_workers=1)))
    assert torch.equal(batch["image"], again["image"])


# -- augmentations ------------------------------------------------------------------------------


def patterned(shape=(1, 6, 32, 32), seed=0):
    g = np.random.default_rng(seed)
    img = g.random(shape).astype(np.float32)
    lab = np.zeros(shape, np.float32)
    lab[:, 2:4, 10:14, 8:20] = 1
    return img, lab


def test_rot90_turns_only_the_yx_plane():
    img, lab = patterned()
    t = build_augment({**OFF, "rot90": 1.0})
    seen = set()
    for seed in range(12):
        t.set_random_state(seed)
        out = t(as_item(img, lab))
        o = out["image"].numpy()
        k = next(k for k in range(4) if np.array_equal(o, np.rot90(img, k, axes=(2, 3))))
        np.testing.assert_array_equal(out["label"].numpy(), np.rot90(lab, k, axes=(2, 3)))
        seen.add(k)
    assert seen == {1, 2, 3}  # prob 1: always a turn, never the identity, never about z


def test_flips_and_full_pipeline_keep_shapes_and_pairing():
    img, lab = patterned((1, 8, 48, 48))
    img = np.where(lab > 0, 1.0, 0.2).astype(np.float32)  # the image shows the cleft
    t = build_augment(
        {
            "flips": 1.0,
            "rot90": 1.0,
            "elastic": 1.0,
            "intensity": 0,
            "noise": 0,
            "missing_section": 0,
            "misaligned_section": 1.0,
            "motion_blur": 0,
        }
    )
    for seed in range(4):
        t.set_random_state(seed)
        out = t(as_item(img, lab))
        assert out["image"].shape == out["label"].shape == img.shape
        assert set(out["label"].unique().tolist()) <= {0.0, 1.0}
        # geometry moved image and label together
        agree = ((out["image"] > 0.6) == (out["label"] > 0.5)).float().mean()
        assert agree > 0.99


def test_missing_section_blanks_one_section_of_the_image_only():
    img, lab = patterned()
    t = RandMissingSectiond(prob=1.0)
    t.set_random_state(0)
    out = t(as_item(img, lab))
    o = out["image"].numpy()
    blank = [z for z in range(img.shape[1]) if not o[:, z].any()]
    assert blank == [t.z]
    keep = [z for z in range(img.shape[1]) if z != t.z]
    np.testing.assert_array_equal(o[:, keep], img[:, keep])
    np.testing.assert_array_equal(out["label"].numpy(), lab)


def test_misaligned_section_shifts_image_and_label_together():
    img, lab = patterned((1, 6, 40, 40))
    for seed in range(10):
        t = RandMisalignedSectiond(prob=1.0, max_shift=4)
        t.set_random_state(seed)
        out = t(as_item(img, lab))
        dy, dx = t.shift
        o, ol = out["image"].numpy(), out["label"].numpy()
        untouched = [z for z in range(6) if not t.z0 <= z < t.z1]
        np.testing.assert_array_equal(o[:, untouched], img[:, untouched])
        rolled = np.roll(img, (dy, dx), axis=(2, 3))
        rolled_l = np.roll(lab, (dy, dx), axis=(2, 3))
        inner = (slice(None), slice(t.z0, t.z1), slice(4, -4), slice(4, -4))
        np.testing.assert_array_equal(o[inner], rolled[inner])
        np.testing.assert_array_equal(ol[inner], rolled_l[inner])
        assert (dy, dx) != (0, 0)
        assert max(abs(dy), abs(dx)) <= 4


def test_misaligned_border_keeps_image_and_label_in_agreement():
    lab = np.zeros((1, 6, 40, 40), np.float32)
    lab[:, :, 0:6, 10:30] = 1  # a cleft touching the border the shift uncovers
    lab[:, :, 20:40, 36:40] = 1
    img = np.where(lab > 0, 1.0, 0.25).astype(np.float32)
    for seed in range(10):
        t = RandMisalignedSectiond(prob=1.0, max_shift=6)
        t.set_random_state(seed)
        out = t(as_item(img, lab))
        expected = np.where(out["label"].numpy() > 0, 1.0, 0.25)
        np.testing.assert_array_equal(out["image"].numpy(), expected)


def test_motion_blur_smears_one_section_along_a_line():
    img = np.zeros((1, 4, 33, 33), np.float32)
    img[0, :, 16, 16] = 1.0
    t = RandMotionBlurd(prob=1.0, max_kernel=9)
    for seed in range(5):
        t.set_random_state(seed)
        out = t(as_item(img, np.zeros_like(img)))["image"].numpy()
        z = t.z
        np.testing.assert_array_equal(np.delete(out, z, axis=1), np.delete(img, z, axis=1))
        sec = out[0, z]
        assert sec.sum() == pytest.approx(1.0, abs=1e-5)
        # the point became the kernel, centred where it was
        r = t.kernel.shape[0] // 2
        np.testing.assert_allclose(
            sec[16 - r : 17 + r, 16 - r : 17 + r], t.kernel[::-1, ::-1], atol=1e-6
        )


def test_line_kernel():
    for size in (3, 5, 9):
        for angle in (0.0, 0.4, np.pi / 2):
            k = line_kernel(size, angle)
            assert k.shape == (size, size)
            assert k.sum() == pytest.approx(1.0)
            np.testing.assert_allclose(k, k[::-1, ::-1], atol=1e-6)  # a line through the centre
    assert line_kernel(5, 0.0)[2].sum() == pytest.approx(1.0)
    assert line_kernel(5, np.pi / 2)[:, 2].sum() == pytest.approx(1.0)


def test_elastic_is_the_same_in_every_section_and_keeps_labels_binary():
    img, lab = patterned((1, 4, 64, 64))
    img[:, 1:] = img[:, :1]
    lab[:] = lab[:, 2:3]
    t = RandElasticYXd(prob=1.0, spacing=24, magnitude=(2.0, 4.0), rotate_degrees=10)
    t.set_random_state(1)
    out = t(as_item(img, lab))
    o, ol = out["image"].numpy(), out["label"].numpy()
    assert o.shape == img.shape
    assert not np.allclose(o, img)
    for z in range(1, 4):
        np.testing.assert_allclose(o[:, z], o[:, 0], atol=1e-6)
        np.testing.assert_array_equal(ol[:, z], ol[:, 0])
    assert set(np.unique(ol)) <= {0.0, 1.0}


def test_intensity_and_noise_leave_labels_alone():
    img, lab = patterned()
    t = build_augment({**OFF, "intensity": 1.0, "noise": 1.0})
    t.set_random_state(0)
    out = t(as_item(img, lab))
    np.testing.assert_array_equal(out["label"].numpy(), lab)
    assert not np.allclose(out["image"].numpy(), img)


def test_disabled_augment_is_identity():
    img, lab = patterned()
    out = build_augment({"enabled": False})(as_item(img, lab))
    np.testing.assert_array_equal(out["image"].numpy(), img)
    np.testing.assert_array_equal(out["label"].numpy(), lab)


# -- from a config ------------------------------------------------------------------------------


def write_zarr(path: Path, raw: np.ndarray, lab: np.ndarray) -> None:
    import zarr

    g = zarr.open_group(str(path), mode="w")
    g.create_array("volumes/raw", data=raw, chunks=(4, 64, 64))
    g.create_array("volumes/labels/clefts", data=lab, chunks=(4, 64, 64))


def tiny_config(tmp_path: Path, **data) -> RunConfig:
    return RunConfig.from_dict(
        {
            "name": "t",
            "data": {
                "root": str(tmp_path),
                "train": [{"path": "a.zarr", "z_range": [0, 14]}],
                "val": [{"path": "a.zarr", "z_range": [14, 20]}],
                "patch_size": [8, 32, 32],
                "batch_size": 2,
                **data,
            },
            "model": {"channels": [4, 8, 16, 32]},
            "train": {"steps": 1},
        }
    )


def test_make_loader_and_val_volumes_from_a_zarr_file(tmp_path, rng):
    raw, lab = sparse_volume(rng)
    write_zarr(tmp_path / "a.zarr", raw, lab)
    cfg = tiny_config(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        it = bd.make_loader(cfg, seed=0)
        for _ in range(3):
            b = next(it)
            assert b["image"].shape == b["label"].shape == (2, 1, 8, 32, 32)
            assert b["image"].dtype == torch.float32
            # patches are made on one thread, but the trainer gets its threads back
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    again = bd.make_loader(cfg, seed=0)
    assert torch.equal(next(again)["image"], next(bd.make_loader(cfg, seed=0))["image"])
    ((v_raw, v_lab, vs),) = bd.load_val_volumes(cfg)
    np.testing.assert_allclose(v_raw, raw[14:] / 255.0, atol=1e-6)
    np.testing.assert_array_equal(v_lab, lab[14:] != 0)
    assert v_raw.dtype == np.float32
    assert v_lab.dtype == bool
    assert len(vs) == 3
    src = bd.open_sources(cfg, "train")[0]
    assert src.n_cleft == int((lab[:14] != 0).sum())


def test_worker_reopens_lazy_volumes(tmp_path, rng):
    raw, lab = sparse_volume(rng)
    write_zarr(tmp_path / "a.zarr", raw, lab)
    cfg = tiny_config(tmp_path, workers=1, in_memory_mb=0)
    assert not isinstance(bd.open_sources(cfg)[0].raw, np.ndarray)  # read patch by patch
    b = next(bd.make_loader(cfg, seed=0))
    assert b["image"].shape == (2, 1, 8, 32, 32)
    assert b["label"].sum() > 0


def write_hdf5(path: Path, raw: np.ndarray, lab: np.ndarray) -> None:
    import h5py

    with h5py.File(path, "w") as f:
        f["volumes/raw"] = raw
        f["volumes/labels/clefts"] = lab


def test_worker_reads_hdf5_through_its_own_handle(tmp_path, rng):
    raw, lab = sparse_volume(rng)
    write_hdf5(tmp_path / "a.hdf", raw, lab)
    cfg = tiny_config(tmp_path, train=[{"path": "a.hdf"}], workers=1, in_memory_mb=0)
    (src,) = bd.open_sources(cfg)
    mine = src.reopened()
    assert mine.raw is not src.raw
    assert mine.label is not src.label
    src.raw.close()  # the parent closes its file: the worker's copy must not care
    r, m = mine.read((0, 0, 0), (4, 32, 32))  # still readable: a handle of its own
    np.testing.assert_allclose(r, raw[:4, :32, :32] / 255.0, atol=1e-6)
    np.testing.assert_array_equal(m, lab[:4, :32, :32] != 0)
    b = next(bd.make_loader(cfg, seed=0))
    assert b["image"].shape == (2, 1, 8, 32, 32)


def test_an_unpicklable_source_is_refused_not_shared_across_a_fork(tmp_path, rng):
    import h5py

    raw, lab = sparse_volume(rng)
    write_hdf5(tmp_path / "a.hdf", raw, lab)
    with h5py.File(tmp_path / "a.hdf", "r") as f:
        # an h5py dataset cannot be pickled: a worker would share this process's handle
        src = source_from_arrays(f["volumes/raw"], f["volumes/labels/clefts"], in_memory_mb=0)
        assert not isinstance(src.raw, np.ndarray)
        with pytest.raises(UserError, match="loader worker cannot reopen its Dataset") as e:
            src.reopened()
        assert "data.workers: 0" in str(e.value)
        assert "\n" not in str(e.value)
        ds = PatchDataset([src], (8, 32, 32), 0.8)
        with pytest.raises(UserError, match="cannot reopen"):
            bd.batches(ds, 2, workers=1)  # refused here, before any worker starts
        assert next(bd.batches(ds, 2, workers=0))["image"].shape == (2, 1, 8, 32, 32)


def test_sources_made_in_each_worker_need_no_reopening(tmp_path, rng):
    import h5py

    write_hdf5(tmp_path / "a.hdf", *sparse_volume(rng))

    def open_here():  # called in the worker: its h5py handle never crosses a fork
        f = h5py.File(tmp_path / "a.hdf", "r")
        return [source_from_arrays(f["volumes/raw"], f["volumes/labels/clefts"], in_memory_mb=0)]

    ds = PatchDataset(open_here, (8, 32, 32), 0.8)
    assert next(bd.batches(ds, 2, workers=1))["image"].shape == (2, 1, 8, 32, 32)


def test_synthetic_volumes_are_made_where_data_is_opened(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    synth = {"path": "s.zarr", "synth": {"shape": [4, 64, 64], "seed": 3}}
    cfg = tiny_config(
        tmp_path,
        train=[synth],
        val=[{"path": "s.zarr", "z_range": [2, 4]}],  # the same file, without the spec
        patch_size=[4, 32, 32],
    )
    ((v_raw, _, vs),) = bd.load_val_volumes(cfg)  # makes s.zarr from the train entry's spec
    assert v_raw.shape == (2, 64, 64)
    assert vs == (40.0, 4.0, 4.0)
    assert bd.ensure_volumes(cfg) == [tmp_path / "s.zarr"] * 2
    missing = tiny_config(tmp_path, train=[{"path": "t.zarr", "synth": {"shape": [4, 64, 64]}}])
    with pytest.raises(UserError, match=r"a\.zarr not found"):
        bd.ensure_volumes(missing)  # a.zarr is real and missing: nothing is made
    assert not (tmp_path / "t.zarr").exists()


def test_val_z_range_beyond_the_volume_is_a_user_error(tmp_path, rng):
    write_zarr(tmp_path / "a.zarr", *sparse_volume(rng))
    cfg = tiny_config(tmp_path, val=[{"path": "a.zarr", "z_range": [14, 40]}])
    with pytest.raises(UserError, match="outside its 20 sections"):
        bd.load_val_volumes(cfg)


def test_real_em_bench_config_samples_synapses(shared_data, monkeypatch):
    monkeypatch.chdir(REPO)
    if shared_data.resolve() != (REPO.parent / "shared" / "data").resolve():
        pytest.skip("real data moved by BBEM_SHARED_DATA; the config's relative path differs")
    cfg = load_config(REPO / "configs/bench/real_bb.yaml")
    src = bd.open_sources(cfg, "train")[0]
    assert src.shape == (20, 640, 512)  # split by synapse: y < 640 trains
    # the README: 0.76% of voxels are synapse (CREMI background 2**64-1 is not a cleft)
    assert 0.002 < bd.cleft_fraction([src]) < 0.02
    it = bd.make_loader(cfg, seed=0)
    batches = [next(it) for _ in range(8)]
    assert batches[0]["image"].shape == (2, 1, 8, 128, 128)
    frac = np.mean([b["label"][i].any().item() for b in batches for i in range(2)])
    # pos_fraction of the patches are centred on a synapse; others hit one by chance
    assert frac >= cfg.data.pos_fraction - 0.1
    ((v_raw, v_lab, vs),) = bd.load_val_volumes(cfg)
    assert v_raw.shape == v_lab.shape == (20, 384, 512)
    assert vs == pytest.approx((50.0, 4.6, 4.6))
