"""Damaged, foreign and unwritable volumes end in one clean line and exit 2, as a user runs bbem.

Every case runs the ``bbem`` command in a subprocess on small files made here, and checks: exit
code 2, exactly one line on stderr (``bbem <cmd>: error: ...``), no traceback, the inputs
byte-identical afterwards and nothing half-written (no output, ``.partial`` or ``.lock``).
"""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import assert_user_error, run_bbem, tree_digest

from bbem.volumes import write_volume

SHAPE = (4, 32, 32)


def refused(tmp_path: Path, command: str, *args: object, leaves: tuple[str, ...] = ()) -> str:
    """Run a command that must be refused; the folder must be as it was (plus ``leaves``)."""
    before = tree_digest(tmp_path)
    r = run_bbem(command, *args, cwd=tmp_path)
    line = assert_user_error(r, command)
    after = tree_digest(tmp_path)
    assert {k: v for k, v in after.items() if k not in leaves} == before, line
    left = [p.name for p in tmp_path.rglob("*") if p.name.endswith((".partial", ".lock"))]
    assert not left, left
    return line


def _labels() -> np.ndarray:
    t = np.zeros(SHAPE, np.uint8)
    t[1:3, 8:16, 4:28] = 1
    return t


def _chunk_files(store: Path) -> list[Path]:
    return sorted(p for p in (store / "0" / "c").rglob("*") if p.is_file())


# -- convert ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["garbage", "garbage_second", "shapes", "dtypes"])
def test_convert_bad_tiff_folder(tmp_path: Path, case: str) -> None:
    d = tmp_path / "sections"
    d.mkdir()
    a = np.arange(32 * 32, dtype=np.uint8).reshape(32, 32)
    second = {"shapes": a[:16], "dtypes": a.astype(np.uint16)}.get(case, a)
    if case == "garbage":
        (d / "s0.tif").write_bytes(b"not a tiff at all")
    else:
        tifffile.imwrite(d / "s0.tif", a)
    if case == "garbage_second":
        (d / "s1.tif").write_bytes(b"not a tiff at all")
    else:
        tifffile.imwrite(d / "s1.tif", second)
    tifffile.imwrite(d / "s2.tif", a)
    line = refused(tmp_path, "convert", "sections", "out.zarr")
    expect = {"garbage": "s0.tif", "garbage_second": "s1.tif"}.get(case, "same shape and dtype")
    assert expect in line
    assert not (tmp_path / "out.zarr").exists()


@pytest.mark.parametrize("content", [b"", b"\x00garbage" * 64], ids=["empty", "garbage"])
def test_convert_bad_hdf5(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "sample.hdf").write_bytes(content)
    line = refused(tmp_path, "convert", "sample.hdf", "out.zarr")
    assert "sample.hdf" in line
    assert ("empty" in line) == (not content)


def test_convert_truncated_tiff(tmp_path: Path) -> None:
    data = np.random.default_rng(0).integers(0, 255, (6, 32, 32), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "stack.tif", data)
    whole = (tmp_path / "stack.tif").read_bytes()
    (tmp_path / "stack.tif").write_bytes(whole[: len(whole) // 2])
    line = refused(tmp_path, "convert", "stack.tif", "out.zarr")
    assert "stack.tif" in line
    assert "truncated" in line


@pytest.mark.parametrize("damage", ["garbage_chunk", "empty_chunk", "broken_zarr_json"])
def test_convert_damaged_zarr(tmp_path: Path, damage: str) -> None:
    data = np.random.default_rng(0).integers(0, 255, SHAPE, dtype=np.uint8)
    write_volume(tmp_path / "in.zarr", data, chunks=(2, 16, 16))
    if damage == "broken_zarr_json":
        (tmp_path / "in.zarr" / "zarr.json").write_text('{"zarr_format": 3, "node_type": ')
    else:
        chunk = _chunk_files(tmp_path / "in.zarr")[3]
        chunk.write_bytes(b"\x13garbage" * 8 if damage == "garbage_chunk" else b"")
    line = refused(tmp_path, "convert", "in.zarr", "out.zarr")
    assert "in.zarr" in line
    assert "damaged" in line
    if damage != "broken_zarr_json":
        assert "block z " in line


def test_convert_into_read_only_folder(tmp_path: Path, read_only_dir: Path) -> None:
    write_volume(tmp_path / "in.zarr", _labels())
    line = refused(tmp_path, "convert", "in.zarr", "ro/out.zarr")
    assert "not writable" in line


def test_convert_under_a_regular_file(tmp_path: Path) -> None:
    write_volume(tmp_path / "in.zarr", _labels())
    (tmp_path / "notes.txt").write_text("keep me\n")
    line = refused(tmp_path, "convert", "in.zarr", "notes.txt/out.zarr")
    assert "notes.txt is a file, not a folder" in line


def test_os_refusing_the_write_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    """Where os.access says yes (root, ACLs, NFS) but the write fails, the error is still clean."""
    from bbem import cli

    convert_mod = sys.modules["bbem.volumes.convert"]  # the package exports a function `convert`
    write_volume(tmp_path / "in.zarr", _labels())

    def refuse(path: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(convert_mod, "create_container", refuse)
    rc = cli.main(["convert", str(tmp_path / "in.zarr"), str(tmp_path / "out.zarr")])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("bbem convert: error: cannot write ")
    assert "Permission denied" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.zarr"]


def test_ctrl_c_during_convert_leaves_nothing(tmp_path: Path) -> None:
    data = np.random.default_rng(0).integers(0, 255, (8, 512, 512), dtype=np.uint8)
    write_volume(tmp_path / "in.zarr", data)
    before = tree_digest(tmp_path)
    partial = tmp_path / "out.zarr.partial"
    p = subprocess.Popen(
        [sys.executable, "-m", "bbem", "convert", "in.zarr", "out.zarr", "--chunks", "1,32,32"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a shell may start background jobs with SIGINT ignored; a terminal's Ctrl-C is not
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 60
    while not partial.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert partial.exists(), "the conversion never started writing"
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "Traceback" not in err, err
    assert err.splitlines() == ["bbem convert: interrupted"], err
    assert tree_digest(tmp_path) == before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["in.zarr"]


@pytest.mark.parametrize("shape", [(32, 32, 3), (4, 32, 32, 3)], ids=["yx3", "zyx3"])
def test_convert_refuses_rgb_tiff(tmp_path: Path, shape: tuple[int, ...]) -> None:
    rgb = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
    tifffile.imwrite(tmp_path / "colour.tif", rgb, photometric="rgb")
    line = refused(tmp_path, "convert", "colour.tif", "out.zarr")
    assert "colour image" in line
    assert "mean(axis=-1)" in line
    assert "ImageJ" in line


def test_infer_refuses_rgb_tiff(tmp_path: Path) -> None:
    import torch

    from bbem.model import EXPORT_FORMAT, build_model

    tiny = {"channels": [4, 8], "strides": [[1, 2, 2]], "num_res_units": 1}
    info = {"config": {"data": {"patch_size": [4, 16, 16]}, "model": tiny}}
    torch.save(
        {
            "format": EXPORT_FORMAT,
            "model_config": tiny,
            "state_dict": build_model(tiny).state_dict(),
            "info": info,
        },
        tmp_path / "tiny.pt",
    )
    rgb = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "colour.tif", rgb, photometric="rgb")
    line = refused(tmp_path, "infer", "tiny.pt", "colour.tif", "pred.zarr")
    assert "colour image" in line
    assert not (tmp_path / "pred.zarr").exists()


# -- synth -----------------------------------------------------------------------------------------


def test_synth_into_read_only_folder(tmp_path: Path, read_only_dir: Path) -> None:
    assert "not writable" in refused(tmp_path, "synth", "ro/s.zarr", "--shape", "2,32,32")
    line = refused(tmp_path, "synth", "s.zarr", "--shape", "2,32,32", "--preview", "ro/p.png")
    assert "ro/p.png" in line
    assert not (tmp_path / "s.zarr").exists()


def test_synth_preview_unwritable_is_refused_before_the_volume(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("keep me\n")
    line = refused(
        tmp_path, "synth", "s.zarr", "--shape", "2,32,32", "--preview", "notes.txt/sub/p.png"
    )
    assert "notes.txt is a file, not a folder" in line
    assert not (tmp_path / "s.zarr").exists()


def test_synth_overwrite_onto_a_regular_file(tmp_path: Path) -> None:
    (tmp_path / "notes").write_text("keep me\n")
    line = refused(tmp_path, "synth", "notes", "--shape", "2,32,32", "--overwrite")
    assert "is a file, not a zarr volume" in line


# -- evaluate --------------------------------------------------------------------------------------


@pytest.fixture
def scene(tmp_path: Path) -> Path:
    """pred.zarr (uint8 levels) and truth.zarr (uint8 labels, mostly background)."""
    t = _labels()
    write_volume(tmp_path / "truth.zarr", t, chunks=(2, 16, 16))
    write_volume(tmp_path / "pred.zarr", (t * 200 + 20).astype(np.uint8), chunks=(2, 16, 16))
    return tmp_path


def test_evaluate_damaged_prediction_chunk(scene: Path) -> None:
    _chunk_files(scene / "pred.zarr")[5].write_bytes(b"\x28\xb5\x2f\xfd garbage")
    line = refused(scene, "evaluate", "pred.zarr", "truth.zarr")
    assert "pred.zarr" in line
    assert "damaged" in line
    assert "block z " in line


@pytest.mark.parametrize("target", ["notes.txt/r.json", "notes.txt/sub/r.json"])
def test_evaluate_json_under_a_regular_file(scene: Path, target: str) -> None:
    (scene / "notes.txt").write_text("keep me\n")
    line = refused(scene, "evaluate", "pred.zarr", "truth.zarr", "--json", target)
    assert "notes.txt is a file, not a folder" in line


def test_evaluate_negative_min_size(scene: Path) -> None:
    line = refused(scene, "evaluate", "pred.zarr", "truth.zarr", "--min-size", "-5")
    assert "--min-size" in line
    assert "-5" in line


@pytest.mark.parametrize("dtype", ["int16", "uint16", "int32"])
def test_evaluate_refuses_non_probability_prediction(scene: Path, dtype: str) -> None:
    write_volume(scene / "p16.zarr", (_labels() * 200 + 20).astype(dtype))
    line = refused(scene, "evaluate", "p16.zarr", "truth.zarr")
    assert f"is {dtype}: a prediction must be uint8 levels" in line


@pytest.mark.parametrize("kind", ["float", "raw_uint8"])
def test_evaluate_refuses_raw_intensities_as_truth(scene: Path, kind: str) -> None:
    rng = np.random.default_rng(0)
    raw = rng.random(SHAPE).astype(np.float32) if kind == "float" else rng.integers(1, 255, SHAPE)
    write_volume(scene / "raw.zarr", raw.astype(np.float32 if kind == "float" else np.uint8))
    line = refused(scene, "evaluate", "pred.zarr", "raw.zarr")
    assert "raw.zarr" in line
    assert "raw intensities" in line
    if kind == "raw_uint8":
        assert "looks like raw intensities, not labels" in line


def test_evaluate_without_cleft_voxels_says_undefined(scene: Path) -> None:
    write_volume(scene / "empty.zarr", np.zeros(SHAPE, np.uint8))
    r = run_bbem(
        "evaluate", "pred.zarr", "empty.zarr", "--json", "r.json", cwd=scene, env={"COLUMNS": "200"}
    )
    assert r.returncode == 0, r.stderr
    assert "undefined (no cleft voxels)" in r.stdout
    assert "-0" not in r.stdout
    assert json.loads((scene / "r.json").read_text())["voxel"]["pr_auc"] is None


def test_pr_auc_without_positives_is_not_negative_zero() -> None:
    from bbem.metrics import PRHistogram

    r = PRHistogram().update(np.array([3, 200], np.uint8), np.zeros(2, bool)).result()
    assert f"{r['pr_auc']:.4g}" == "0"


def test_user_error_messages_are_folded_to_one_line(monkeypatch, capsys) -> None:
    import bbem.volumes
    from bbem import cli
    from bbem.errors import UserError

    def fail(*args: object, **kwargs: object) -> None:
        raise UserError("a library said:\nsomething on two lines")

    monkeypatch.setattr(bbem.volumes, "convert_from_cli", fail)
    assert cli.main(["convert", "a", "b"]) == 2
    assert (
        capsys.readouterr().err == "bbem convert: error: a library said: something on two lines\n"
    )
