"""Every subcommand, fed each of a set of corrupt or wrong files: exit 2, one line, no traceback.

In-process through ``bbem.cli.main`` (an exception escaping it is what a traceback would be),
so the whole cross product stays fast; ``tests/test_output_safety.py`` and
``tests/test_bad_input_*.py`` run the CLI as a subprocess for the individual cases.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bbem.checkpoint import EXPORT_FORMAT, save_torch_file
from bbem.cli import main
from bbem.model import build_model

TINY = {"channels": [4, 8, 16], "strides": [[1, 2, 2], [1, 2, 2]], "num_res_units": 1}


def _bad_files(d: Path) -> dict[str, Path]:
    """Corrupt or wrong files a user may hand bbem, by name."""
    bad: dict[str, Path] = {}

    def file(name: str, content: bytes) -> None:
        (d / name).write_bytes(content)
        bad[name] = d / name

    file("garbage.hdf", b"\x00garbage" * 50)
    file("empty.hdf", b"")
    file("garbage.tif", b"II*\x00" + b"\xff" * 64)
    file("text.tif", b"not a tiff at all\n")
    file("empty.pt", b"")
    file("garbage.pt", np.random.default_rng(0).bytes(512))
    file("notes.zarr", b"a file where a zarr folder should be")
    file("config.yaml", b"name: [unclosed\n")
    (d / "empty.zarr").mkdir()
    bad["empty.zarr"] = d / "empty.zarr"
    broken = d / "broken.zarr"
    broken.mkdir()
    (broken / "zarr.json").write_text("{ not json")
    bad["broken.zarr"] = broken
    (d / "folder").mkdir()
    (d / "folder" / "a.txt").write_text("x")
    bad["folder"] = d / "folder"
    return bad


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    from bbem.volumes import write_volume, write_volumes

    d = tmp_path_factory.mktemp("bad")
    torch.manual_seed(0)
    info = {"config": {"data": {"patch_size": [4, 16, 16]}}}
    good = {
        "ck": save_torch_file(
            d / "tiny.pt",
            {
                "format": EXPORT_FORMAT,
                "model_config": TINY,
                "state_dict": build_model(TINY).state_dict(),
                "info": info,
            },
        ),
        "raw": write_volume(d / "raw.zarr", np.full((4, 32, 32), 100, np.uint8)),
        "pred": write_volume(d / "pred.zarr", np.zeros((4, 32, 32), np.uint8)),
    }
    lab = np.zeros((4, 32, 32), np.uint8)
    lab[1:3, 4:12, 4:12] = 1
    good["truth"] = write_volumes(d / "truth.zarr", {"volumes/labels/clefts": lab})
    return {**good, **{f"bad:{k}": v for k, v in _bad_files(d).items()}}


BAD = [
    "garbage.hdf",
    "empty.hdf",
    "garbage.tif",
    "text.tif",
    "empty.pt",
    "garbage.pt",
    "notes.zarr",
    "config.yaml",
    "empty.zarr",
    "broken.zarr",
    "folder",
]


def _argv(command: str, bad: Path, w: dict[str, Path], out: Path) -> list[str]:
    truth = f"{w['truth']}:volumes/labels/clefts"
    return {
        "convert": ["convert", bad, out / "c.zarr"],
        "infer-input": ["infer", w["ck"], bad, out / "p.zarr"],
        "infer-checkpoint": ["infer", bad, w["raw"], out / "p.zarr"],
        "evaluate-prediction": ["evaluate", bad, truth, "--no-cremi"],
        "evaluate-truth": ["evaluate", w["pred"], bad, "--no-cremi"],
        "export": ["export", bad, out / "m.pt"],
        "train": ["train", bad],
        "train-resume": ["train", "--resume", bad],
        "report": ["report", bad],
        "synth-under": ["synth", bad / "s.zarr", "--shape", "4,32,32"],
    }[command]


COMMANDS = [
    "convert",
    "infer-input",
    "infer-checkpoint",
    "evaluate-prediction",
    "evaluate-truth",
    "export",
    "train",
    "train-resume",
    "report",
    "synth-under",
]


@pytest.mark.parametrize("name", BAD)
@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_refuses_every_bad_file_in_one_line(
    world, tmp_path, capsys, monkeypatch, command, name
):
    monkeypatch.chdir(tmp_path)
    bad = world[f"bad:{name}"]
    before = {p: p.read_bytes() for p in [bad, *bad.rglob("*")] if p.is_file()}
    argv = [str(a) for a in _argv(command, bad, world, tmp_path)]
    if command == "synth-under" and bad.is_dir():
        pytest.skip("a folder is a fine place for a synth output")
    code = main(argv)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2, (argv, err)
    assert len(err) == 1, err
    assert err[0].startswith(f"bbem {argv[0]}: error: "), err
    after = {p: p.read_bytes() for p in [bad, *bad.rglob("*")] if p.is_file()}
    assert after == before  # the bad file itself is left as it was
    assert not any(p.name.endswith(".partial") for p in tmp_path.rglob("*"))
