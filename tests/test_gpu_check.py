"""bench/gpu_check.py: one line and exit 0 without CUDA; the whole path on the CPU (--cpu-smoke)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.py"
sys.path.insert(0, str(REPO / "bench"))

import gpu_check  # noqa: E402


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path), **extra}


def test_without_cuda_one_line_exit_0_and_nothing_heavy(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    # run as the script, then report what it imported
    code = (
        "import runpy, sys\n"
        f"sys.argv = [{str(SCRIPT)!r}]\n"
        "try:\n"
        f"    runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    print('exit', e.code, 'bbem' in sys.modules, 'monai' in sys.modules)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # no data here: it must not be looked for
        timeout=120,
        env=_env(tmp_path, CUDA_VISIBLE_DEVICES="", OUT=str(out)),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert len(lines) == 2, r.stdout
    assert lines[0].startswith("gpu_check: no CUDA device (torch "), lines[0]
    assert lines[0].endswith("cuda available: False); nothing to measure"), lines[0]
    assert lines[1] == "exit 0 False False"  # neither bbem nor MONAI imported
    assert not list(out.iterdir())  # nothing measured, nothing written


def test_cpu_smoke_runs_the_whole_path(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        env=_env(tmp_path),
    )
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    text = r.stdout
    for label in (
        "== bbem gpu_check (cpu-smoke)",
        "step time      median ",
        "ms/step",
        "val PR-AUC     best ",
        "inference      ",
        "voxels/s",
        "peak GPU mem   training -, inference -",
        "wall time      ",
        "step 3/6: val PR-AUC",  # a progress line at each evaluation
    ):
        assert label in text, (label, text)

    res = json.loads((out / "gpu_check.json").read_text())
    assert res["phase"] == "done"
    assert set(gpu_check.FIELDS) <= set(res)
    assert res["mode"] == "cpu-smoke"
    assert res["device"] == "cpu"
    assert res["gpu"] is None
    assert res["train_peak_gpu_mib"] is None
    assert res["torch"]
    assert res["steps_planned"] == 6
    assert res["steps_done"] == 6
    assert res["stopped_early"] is None
    assert res["step_ms_median"] > 0
    assert res["step_ms_p90"] >= res["step_ms_median"]
    assert res["timed_steps"] >= 1
    assert res["data_wait_ms_median"] >= 0
    assert [e["step"] for e in res["evals"]] == [3, 6]
    assert 0 <= res["val_pr_auc_best"] <= 1
    assert res["val_pr_auc_best_step"] in (3, 6)
    assert res["val_pr_auc_best"] == max(e["pr_auc"] for e in res["evals"])
    assert res["infer_shape"] == [16, 96, 96]
    assert res["infer_voxels"] == 16 * 96 * 96
    assert res["infer_voxels_per_second"] > 0
    assert res["infer_seconds"] > 0
    assert res["wall_seconds"] > 0
    assert (out / "gpu_check_metrics.csv").is_file()
    assert (out / "gpu_check_loss.csv").is_file()
    # the work folder (run, volumes, prediction) is a temporary one, removed at the end
    assert not list(tmp_path.glob("bbem-gpu-check-*"))


def test_missing_data_is_one_clear_line(tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU host
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    rc = gpu_check.main(
        [
            "--config",
            str(REPO / "configs" / "vnc.yaml"),
            "--set",
            f"data.root={tmp_path / 'nowhere'}",
            "--work",
            str(tmp_path / "work"),
        ]
    )
    lines = capsys.readouterr().out.splitlines()
    assert rc == 1
    assert len(lines) == 1, lines
    assert lines[0].startswith("gpu_check: data missing: "), lines[0]
    assert "vnc-stack1-left.hdf" in lines[0]
    assert "nothing measured" in lines[0]
    assert not (tmp_path / "out").exists()
