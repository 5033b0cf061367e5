"""User mistakes as a user meets them: `python -m bbem ...` in a subprocess on small files.

Every case must end with exit 2 and one line `bbem <cmd>: error: ...` (no traceback), leave
what was there byte-identical, and leave nothing that blocks the corrected command.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from conftest import assert_user_error, run_bbem, tree_digest
from test_infer import _raw, _write
from test_train import _config
from tiny_em import tiny_volume

#: demo-like strides (downsampling 2,8,8): a 2x8x8 volume reaches the bottleneck as one voxel
MODEL = {"channels": [4, 4, 8, 8], "strides": [[1, 2, 2], [1, 2, 2], [2, 2, 2]], "num_res_units": 0}


@pytest.fixture(scope="module")
def d(tmp_path_factory) -> SimpleNamespace:
    """One tiny trained run (its last.pt is the module's checkpoint), volumes and an output."""
    from bbem.config import load_config
    from bbem.infer import predict_volume
    from bbem.train import train

    root = tmp_path_factory.mktemp("bad")
    tiny_volume(root / "train.zarr", 1)
    tiny_volume(root / "val.zarr", 2)
    cfg = yaml.safe_load(_config(root, root).read_text())
    cfg["model"] = MODEL
    cfg["data"]["batch_size"] = 1
    cfg["train"].update(steps=2, eval_every=2, checkpoint_every=2, threads=1)
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg))
    train(load_config(config), run_dir=root / "run", progress=False)
    rng = np.random.default_rng(0)
    ns = SimpleNamespace(
        root=root,
        config=config,
        run=root / "run",
        ckpt=root / "run" / "checkpoints" / "last.pt",
        raw=_write(root / "raw.zarr", _raw(rng, (8, 48, 48))),
        raw2=_write(root / "raw2.zarr", _raw(rng, (8, 48, 48))),
        afile=root / "afile",
    )
    ns.afile.write_text("not a folder\n")
    ns.done = predict_volume(ns.ckpt, ns.raw, root / "done.zarr", progress=False).output
    return ns


# -- train ---------------------------------------------------------------------------------------


def test_train_run_dir_under_a_file(d):
    err = assert_user_error(
        run_bbem("train", d.config, "--run-dir", d.afile / "sub" / "run"), "train"
    )
    assert "is a file, not a folder" in err
    assert "--run-dir" in err
    assert d.afile.read_text() == "not a folder\n"


def test_train_read_only_run_dir(d, read_only_dir):
    ro = read_only_dir
    err = assert_user_error(run_bbem("train", d.config, "--run-dir", ro / "run"), "train")
    assert "not writable" in err or "Permission denied" in err
    assert list(ro.iterdir()) == []


def test_train_write_refused_by_the_os_is_one_line(d, tmp_path):
    """What root cannot stage with chmod: the OS refusing a write inside the new run dir."""
    code = (
        "import errno, pathlib, sys\n"
        "mkdir = pathlib.Path.mkdir\n"
        "def refuse(self, *a, **k):\n"
        "    if self.name == 'checkpoints':\n"
        "        raise PermissionError(errno.EACCES, 'Permission denied', str(self))\n"
        "    return mkdir(self, *a, **k)\n"
        "pathlib.Path.mkdir = refuse\n"
        "from bbem.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    run = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, "-c", code, "train", str(d.config), "--run-dir", str(run)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    err = assert_user_error(r, "train")
    assert "Permission denied" in err
    assert "choose a writable --run-dir" in err
    assert not run.exists()  # the failed start is gone: the same --run-dir can be used again


def test_train_resume_with_another_model_config(d, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(d.run, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"]["channels"] = [6, 6, 8, 8]
    cfg["train"]["steps"] = 4  # not finished: the mismatch is the only problem
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    before = tree_digest(run)
    err = assert_user_error(run_bbem("train", "--resume", run), "train")
    assert "does not fit the model config" in err
    assert "model.channels" in err
    assert tree_digest(run) == before


def test_train_failed_start_does_not_block_the_corrected_command(d, tmp_path):
    run = tmp_path / "run"
    bad = run_bbem(
        "train", d.config, "--set", "data.val.0.label_key=volumes/nope", "--run-dir", run
    )
    assert "volumes/nope" in assert_user_error(bad, "train")
    assert not run.exists()
    good = run_bbem("train", d.config, "--run-dir", run)
    assert good.returncode == 0, good.stderr
    assert (run / "checkpoints" / "last.pt").is_file()


# -- infer ---------------------------------------------------------------------------------------


def test_infer_volume_smaller_than_a_window(d, tmp_path):
    small = _write(tmp_path / "small.zarr", _raw(np.random.default_rng(1), (2, 8, 8)))
    out = tmp_path / "o.zarr"
    err = assert_user_error(run_bbem("infer", d.ckpt, small, out), "infer")
    assert "too small" in err
    assert "2,16,16" in err
    assert list(tmp_path.iterdir()) == [small]


def test_infer_corrupt_chunk_fails_cleanly_and_leaves_no_partial(d, tmp_path):
    bad = tmp_path / "bad.zarr"
    shutil.copytree(d.raw, bad)
    (bad / "0" / "c" / "0" / "0" / "0").write_bytes(b"\x00garbage, not zstd")
    before = tree_digest(bad)
    out = tmp_path / "o.zarr"
    err = assert_user_error(run_bbem("infer", d.ckpt, bad, out), "infer")
    assert "cannot read" in err
    assert tree_digest(bad) == before
    # no block was finished: no .partial that would ask the corrected command for --overwrite
    assert not out.exists()
    assert not (tmp_path / "o.zarr.partial").exists()
    shutil.rmtree(bad)
    shutil.copytree(d.raw, bad)  # the input restored from a good copy
    assert run_bbem("infer", d.ckpt, bad, out).returncode == 0


def test_infer_failure_after_some_blocks_keeps_the_partial(d, tmp_path):
    """In-process (the CLI line is the test above): finished blocks stay for --resume."""
    from bbem.errors import UserError
    from bbem.infer import predict_volume
    from bbem.volumes import write_volume

    data = _raw(np.random.default_rng(2), (16, 48, 48))
    bad = write_volume(tmp_path / "bad.zarr", data, chunks=(4, 48, 48))
    (bad / "0" / "c" / "3" / "0" / "0").write_bytes(b"\x00garbage")  # z 12-15: read by block 2
    out = tmp_path / "o.zarr"
    with pytest.raises(UserError, match="cannot read"):
        predict_volume(d.ckpt, bad, out, block=(4, 48, 48), workers=1, progress=False)
    markers = {p.name for p in (tmp_path / "o.zarr.partial" / ".bbem_done").iterdir()}
    assert markers == {"0_0_0", "1_0_0"}


def test_infer_output_under_a_file(d):
    err = assert_user_error(run_bbem("infer", d.ckpt, d.raw, d.afile / "o.zarr"), "infer")
    assert "is a file, not a folder" in err
    assert d.afile.read_text() == "not a folder\n"


def test_infer_resume_with_a_damaged_run_record(d, tmp_path):
    work = tmp_path / "o.zarr.partial"
    shutil.copytree(d.done, work)
    (work / ".bbem_run.json").write_text('{"version": 2, "plan": ')
    before = tree_digest(work)
    err = assert_user_error(
        run_bbem("infer", d.ckpt, d.raw, tmp_path / "o.zarr", "--resume"), "infer"
    )
    assert "damaged run record" in err
    assert "--overwrite" in err
    assert tree_digest(work) == before


@pytest.mark.parametrize("address", ["tcp://", "tcp://host:notaport"])
def test_infer_scheduler_address_without_a_port(d, tmp_path, address):
    out = tmp_path / "o.zarr"
    err = assert_user_error(run_bbem("infer", d.ckpt, d.raw, out, "--scheduler", address), "infer")
    assert "tcp://HOST:PORT" in err
    assert list(tmp_path.iterdir()) == []


def test_infer_resume_of_an_output_made_from_another_input(d, tmp_path):
    out = tmp_path / "o.zarr"
    shutil.copytree(d.done, out)
    before = tree_digest(out)
    err = assert_user_error(run_bbem("infer", d.ckpt, d.raw2, out, "--resume"), "infer")
    assert "another input" in err
    assert "--overwrite" in err
    assert tree_digest(out) == before


def test_infer_warns_of_a_costly_halo(d, tmp_path):
    out = tmp_path / "o.zarr"
    r = run_bbem("infer", d.ckpt, d.raw, out, "--halo", "3,24,24")
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("bbem infer: warning: "), r.stderr
    assert "27x" in lines[0]  # windows 1,8,8 apart instead of 3,24,24: 3 * 3 * 3
    assert out.is_dir()


# -- export and report ---------------------------------------------------------------------------


def test_export_under_a_file(d):
    err = assert_user_error(run_bbem("export", d.ckpt, d.afile / "sub" / "x.pt"), "export")
    assert "is a file, not a folder" in err
    assert d.afile.read_text() == "not a folder\n"


def test_report_folder_that_cannot_be_made(d, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(d.run, run)
    (run / "report").symlink_to(tmp_path / "gone" / "report")  # a dangling link: mkdir fails
    before = tree_digest(run)
    err = assert_user_error(run_bbem("report", run), "report")
    assert "cannot create the report folder" in err
    assert tree_digest(run) == before
    assert (run / "report").is_symlink()


def test_train_refuses_a_run_dir_inside_its_data_and_a_val_box_without_clefts(d, tmp_path):
    import yaml

    from bbem.config import load_config
    from bbem.errors import UserError
    from bbem.train import train

    cfg_path = Path(d.config)
    cfg = load_config(cfg_path)
    inside = Path(cfg.data.resolve(cfg.data.train[0].path)) / "run"
    with pytest.raises(UserError, match="lies inside the input"):
        train(cfg, run_dir=inside, progress=False)
    raw = yaml.safe_load(cfg_path.read_text())
    raw["data"]["val"][0]["y_range"] = [0, 1]  # one row with no cleft in it
    raw["data"]["patch_size"] = [4, 16, 16]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError, match="no cleft voxels"):
        train(load_config(tmp_path / "c.yaml"), run_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
