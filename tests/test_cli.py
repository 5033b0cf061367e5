import subprocess
import sys

import pytest

from bbem.cli import build_parser, main


def test_help_lists_every_command():
    text = build_parser().format_help()
    for name in (
        "train",
        "infer",
        "export",
        "evaluate",
        "convert",
        "synth",
        "report",
        "asr",
        "faceid",
    ):
        assert name in text


def test_bad_zyx_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["synth", "out.zarr", "--shape", "1,2"])
    assert e.value.code == 2
    assert "z,y,x" in capsys.readouterr().err


def test_console_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "bbem", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "bbem" in r.stdout
