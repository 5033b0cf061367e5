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
    assert r.returncode == 0
    assert "bbem" in r.stdout


def test_evaluate_options_reach_evaluate(tmp_path, monkeypatch):
    import bbem.metrics

    seen = {}

    def fake(**kw):
        seen.update(kw)
        return {}

    monkeypatch.setattr(bbem.metrics, "evaluate_from_cli", fake)
    argv = ["evaluate", "p.zarr", "t.zarr", "--min-size", "5", "--voxel-size", "40,4,4"]
    assert main([*argv, "--match-distance", "150", "--connectivity", "6", "--no-cremi"]) == 0
    assert seen["min_size"] == 5
    assert seen["voxel_size"] == (40.0, 4.0, 4.0)
    assert seen["match_distance_nm"] == 150
    assert seen["connectivity"] == 6
    assert seen["cremi"] is False
