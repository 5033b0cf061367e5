"""Nothing a user types may destroy data: overwrite by kind, never an input, locks, safe loading.

Every CLI case runs ``bbem`` in a subprocess as a user would, and checks the exit code, the one
line on stderr, and that the data at risk is byte-identical afterwards.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import pickle
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_user_error, run_bbem, tree_digest

from bbem.atomic import check_not_input, check_output, lock_path, output_lock, sniff_kind
from bbem.checkpoint import CHECKPOINT_FORMAT, EXPORT_FORMAT, load_checkpoint, save_torch_file
from bbem.errors import UserError
from bbem.model import build_model

TINY = {"channels": [4, 8, 16], "strides": [[1, 2, 2], [1, 2, 2]], "num_res_units": 1}
INFO = {"config": {"data": {"patch_size": [4, 16, 16]}, "model": TINY}}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A tiny export, a training checkpoint, and one raw volume in zarr, tiff and hdf5."""
    import h5py
    import tifffile

    from bbem.volumes import write_volume

    d = tmp_path_factory.mktemp("safety")
    torch.manual_seed(0)
    state = build_model(TINY).state_dict()
    export = save_torch_file(
        d / "tiny.pt",
        {"format": EXPORT_FORMAT, "model_config": TINY, "state_dict": state, "info": INFO},
    )
    ck = save_torch_file(
        d / "last.pt",
        {
            "format": CHECKPOINT_FORMAT,
            "step": 3,
            "config": {**INFO["config"], "bb": {"method": "dense"}},
            "model": state,
        },
    )
    raw = np.random.default_rng(0).integers(0, 255, (4, 32, 32), dtype=np.uint8)
    zarr_path = write_volume(d / "raw.zarr", raw, voxel_size=(40, 4, 4))
    tifffile.imwrite(d / "raw.tif", raw)
    with h5py.File(d / "raw.hdf", "w") as f:
        f["volumes/raw"] = raw
    truth = np.zeros_like(raw)
    truth[1:3, 8:16, 8:16] = 1
    write_volume(d / "truth.zarr", truth, voxel_size=(40, 4, 4))
    return {
        "export": export,
        "checkpoint": ck,
        "zarr": zarr_path,
        "tiff": d / "raw.tif",
        "hdf5": d / "raw.hdf",
        "truth": d / "truth.zarr",
    }


# -- evaluate: outputs follow the same rule as every other output ---------------------------------


@pytest.mark.parametrize("flag", ["--json", "--plot"])
def test_evaluate_never_replaces_a_folder(tmp_path, files, flag):
    out = tmp_path / "results"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "keep.txt").write_text("precious")
    before = tree_digest(out)
    for extra in ([], ["--overwrite"]):
        r = run_bbem("evaluate", files["zarr"], files["truth"], flag, out, "--no-cremi", *extra)
        assert_user_error(r, "evaluate", "exists" if not extra else "folder")
    assert tree_digest(out) == before


def test_evaluate_json_onto_the_prediction_is_refused(files):
    before = tree_digest(files["tiff"])
    r = run_bbem("evaluate", files["tiff"], files["truth"], "--json", files["tiff"], "--overwrite")
    assert_user_error(r, "evaluate", "input")
    assert tree_digest(files["tiff"]) == before


def test_evaluate_refuses_existing_json_without_overwrite(tmp_path, files):
    out = tmp_path / "e.json"
    out.write_text('{"mine": 1}')
    r = run_bbem("evaluate", files["zarr"], files["truth"], "--json", out, "--no-cremi")
    assert_user_error(r, "evaluate", "--overwrite")
    assert json.loads(out.read_text()) == {"mine": 1}
    r = run_bbem(
        "evaluate", files["zarr"], files["truth"], "--json", out, "--no-cremi", "--overwrite"
    )
    assert r.returncode == 0, r.stderr
    assert "voxel" in json.loads(out.read_text())


# -- an output that is, contains or lies inside an input ------------------------------------------


@pytest.mark.parametrize("fmt", ["zarr", "tiff", "hdf5"])
def test_infer_onto_its_input_is_refused(files, fmt):
    src = files[fmt]
    uri = f"{src}:volumes/raw" if fmt == "hdf5" else str(src)
    before = tree_digest(src)
    r = run_bbem("infer", files["export"], uri, src, "--overwrite")
    assert_user_error(r, "infer", "input")
    assert tree_digest(src) == before


def test_outputs_inside_or_around_inputs_are_refused(tmp_path, files):
    before = tree_digest(files["zarr"])
    r = run_bbem("infer", files["export"], files["zarr"], files["zarr"] / "pred.zarr")
    assert_user_error(r, "infer", "inside")
    r = run_bbem("convert", files["zarr"], files["zarr"].parent, "--overwrite")
    assert_user_error(r, "convert", "contains")
    assert tree_digest(files["zarr"]) == before


def test_export_onto_its_checkpoint_is_refused(files):
    before = tree_digest(files["checkpoint"])
    r = run_bbem("export", files["checkpoint"], files["checkpoint"], "--overwrite")
    assert_user_error(r, "export", "input")
    assert tree_digest(files["checkpoint"]) == before


def test_check_not_input_understands_keys(tmp_path):
    (tmp_path / "a.hdf").write_bytes(b"x")
    with pytest.raises(UserError, match="is the input"):
        check_not_input(tmp_path / "a.hdf", [f"{tmp_path / 'a.hdf'}:volumes/raw"])
    check_not_input(tmp_path / "b.zarr", [f"{tmp_path / 'a.hdf'}:volumes/raw", None])
    check_not_input(tmp_path / "b.zarr", ["tcp://remote/x.zarr"])


# -- overwrite replaces only a bbem output of the same kind ---------------------------------------


def test_export_overwrite_keeps_a_folder_and_a_checkpoint(tmp_path, files):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "table.csv").write_text("a,b\n")
    ck_copy = tmp_path / "other.pt"
    ck_copy.write_bytes(files["checkpoint"].read_bytes())
    for target, words in ((folder, "folder"), (ck_copy, "training checkpoint")):
        before = tree_digest(target)
        r = run_bbem("export", files["export"], target, "--overwrite")
        assert_user_error(r, "export", words)
        assert tree_digest(target) == before
    out = tmp_path / "model.pt"
    assert run_bbem("export", files["checkpoint"], out).returncode == 0
    r = run_bbem("export", files["checkpoint"], out, "--overwrite")  # an export: replaced
    assert r.returncode == 0, r.stderr
    assert load_checkpoint(out)["format"] == EXPORT_FORMAT


def test_infer_overwrite_refuses_a_folder_of_other_files(tmp_path, files):
    out = tmp_path / "pred.zarr"
    out.mkdir()
    (out / "notes.txt").write_text("not a volume")
    before = tree_digest(out)
    r = run_bbem("infer", files["export"], files["zarr"], out, "--overwrite")
    assert_user_error(r, "infer", "folder")
    assert tree_digest(out) == before


def test_kinds_are_read_from_content(tmp_path, files):
    assert sniff_kind(files["zarr"]) == "zarr"
    assert sniff_kind(files["tiff"]) == "tiff"
    assert sniff_kind(files["hdf5"]) == "hdf5"
    assert sniff_kind(files["export"]) == "torch"
    fake = tmp_path / "fake.png"
    fake.write_text("not a png")
    assert sniff_kind(fake) == "text"
    with pytest.raises(UserError, match="not a PNG"):
        check_output(fake, overwrite=True, kind="png")
    with pytest.raises(UserError, match="is a file"):
        check_output(fake / "x.json", overwrite=False, kind="json")


# -- locks ----------------------------------------------------------------------------------------


def _hold(path: str, ready, stop) -> None:
    with output_lock(path):
        ready.set()
        stop.wait(60)


def test_lock_refuses_a_second_writer_and_names_the_holder(tmp_path):
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold, args=(str(tmp_path / "out.zarr"), ready, stop))
    p.start()
    try:
        assert ready.wait(60)
        with pytest.raises(UserError, match=f"pid {p.pid}"), output_lock(tmp_path / "out.zarr"):
            pass
    finally:
        stop.set()
        p.join(30)
    with output_lock(tmp_path / "out.zarr"):  # released: free again
        pass
    assert not lock_path(tmp_path / "out.zarr").exists()


def test_lock_of_a_killed_run_is_taken_over(tmp_path):
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold, args=(str(tmp_path / "out.zarr"), ready, stop))
    p.start()
    assert ready.wait(60)
    os.kill(p.pid, signal.SIGKILL)
    p.join(30)
    assert lock_path(tmp_path / "out.zarr").exists()  # left behind by the killed holder
    with output_lock(tmp_path / "out.zarr"):
        pass


@pytest.mark.parametrize("overwrite", [False, True])
def test_second_infer_into_a_locked_output_is_refused(tmp_path, files, overwrite):
    out = tmp_path / "pred.zarr"
    extra = ["--overwrite"] if overwrite else []
    with output_lock(out):
        r = run_bbem("infer", files["export"], files["zarr"], out, *extra)
    assert_user_error(r, "infer", f"pid {os.getpid()}")
    assert not out.exists()
    r = run_bbem("infer", files["export"], files["zarr"], out, *extra)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("command", ["convert", "synth"])
def test_convert_and_synth_take_the_lock(tmp_path, files, command):
    out = tmp_path / "out.zarr"
    args = ["convert", files["zarr"], out] if command == "convert" else ["synth", out]
    with output_lock(out):
        r = run_bbem(*args, "--shape", "4,32,32") if command == "synth" else run_bbem(*args)
    assert_user_error(r, command, "being written")
    assert not out.exists()


def test_train_run_dir_is_locked(tmp_path):
    import yaml
    from test_train import _config
    from tiny_em import tiny_volume

    from bbem.rundir import RunDir

    tiny_volume(tmp_path / "train.zarr", 1)
    tiny_volume(tmp_path / "val.zarr", 2)
    cfg = yaml.safe_load(_config(tmp_path, tmp_path).read_text())
    run = tmp_path / "run"
    with RunDir.create(run, cfg):
        r = run_bbem("train", "--resume", run)
        assert_user_error(r, "train", "being written")
    assert (run / "config.yaml").is_file()


# -- model files are read without running code ----------------------------------------------------


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("writer", ["torch", "pickle"])
@pytest.mark.parametrize("command", ["infer", "export", "report"])
def test_a_model_file_that_would_run_code_is_refused(tmp_path, files, writer, command):
    marker = tmp_path / "pwned"
    payload = {"format": EXPORT_FORMAT, "model_config": TINY, "x": _Evil(marker)}
    evil = tmp_path / "evil.pt"
    if writer == "torch":
        torch.save(payload, evil)
    else:
        evil.write_bytes(pickle.dumps(payload))
    if command == "infer":
        r = run_bbem("infer", evil, files["zarr"], tmp_path / "p.zarr")
    elif command == "export":
        r = run_bbem("export", evil, tmp_path / "m.pt")
    else:
        run = tmp_path / "run"
        (run / "checkpoints").mkdir(parents=True)
        (run / "config.yaml").write_text("name: x\n")
        (run / "metrics.csv").write_text("step,val_pr_auc\n1,0.5\n")
        (run / "checkpoints" / "best.pt").write_bytes(evil.read_bytes())
        r = run_bbem("report", run)
        assert r.returncode == 0, r.stderr  # the report says it skipped the file
        assert "will not unpickle" in r.stdout
    if command != "report":
        assert_user_error(r, command, "will not unpickle")
    assert not marker.exists()


def test_checkpoints_hold_only_plain_values(tmp_path):
    from bbem.engine import rng_state, set_rng_state

    path = save_torch_file(tmp_path / "c.pt", {"format": CHECKPOINT_FORMAT, "rng": rng_state()})
    data = torch.load(path, weights_only=True)  # no allowlist needed
    draws = np.random.random(3)  # noqa: NPY002
    set_rng_state(data["rng"])
    assert np.array_equal(np.random.random(3), draws)  # noqa: NPY002
    with pytest.raises(TypeError, match="plain values"):
        save_torch_file(tmp_path / "d.pt", {"x": _Evil(tmp_path / "m")})


def test_checkpoint_written_before_the_rule_still_loads(tmp_path):
    """Earlier checkpoints held the global NumPy RNG state as an array: they still load."""
    old = tmp_path / "old.pt"
    state = np.random.get_state()  # noqa: NPY002
    torch.save({"format": CHECKPOINT_FORMAT, "rng": {"numpy": state}, "step": 7}, old)
    data = load_checkpoint(old)
    assert data["step"] == 7
    assert np.array_equal(data["rng"]["numpy"][1], state[1])
