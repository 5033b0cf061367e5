"""napari-bbem's Train widget: ``bbem train`` in a subprocess, followed and stopped from the
viewer, and its Qt-free helpers."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari_bbem")

from matplotlib.figure import Figure
from napari_bbem.train import (
    Curves,
    plot_training,
    read_csv_columns,
    read_curves,
    train_command,
)
from tiny_em import tiny_config, tiny_volumes

from bbem.errors import UserError

STEPS = 100


@pytest.fixture
def config(tmp_path: Path) -> Path:
    # long enough to be stopped after its first evaluation even on a loaded machine (with
    # the tiny default net, 60 and then 300 steps finished before the stop landed in loaded
    # CI runs), short enough for the suite: a wider net and whole-volume patches
    train = {"steps": STEPS, "eval_every": 10, "checkpoint_every": 5}
    model = {"channels": [16, 32, 64]}
    data = {"patch_size": [8, 48, 48]}
    return tiny_config(
        tiny_volumes(tmp_path / "vols"), tmp_path / "tiny.yaml", train=train, model=model, data=data
    )


def test_train_command_new_resume_and_refusals(tmp_path: Path, config: Path):
    run = tmp_path / "run"
    assert train_command(config, run)[-4:] == ["train", str(config), "--run-dir", str(run)]
    with pytest.raises(UserError, match=r"config .* does not exist"):
        train_command(tmp_path / "missing.yaml", run)
    (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(UserError, match="exists and is not empty"):  # bbem train's own rule
        train_command(config, run)
    (run / "checkpoints" / "last.pt").write_bytes(b"")
    assert train_command(None, run)[-3:] == ["train", "--resume", str(run)]


def test_csv_being_written_and_the_plot(tmp_path: Path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "loss.csv").write_text("step,loss,lr,time_s\n1,0.9,0.001,0.1\n2,0.8,0.001,0.2\n3,0.7,")
    (run / "metrics.csv").write_text("step,val_pr_auc,val_f1_best\n2,0.25,0.4\n")
    curves = read_curves(run)
    np.testing.assert_array_equal(curves.loss["step"], [1, 2])  # the half-written row is left out
    assert curves.last_step == 2
    assert curves.best() == (0.25, 2)
    assert read_csv_columns(run / "absent.csv") == {}
    assert Curves({}, {}).best() is None
    fig = plot_training(Figure(), curves, title="run")
    loss_ax, val_ax = fig.axes
    assert len(loss_ax.lines) == 2  # every row faint, smoothed on top
    assert [line.get_label() for line in val_ax.lines] == ["pr_auc", "f1_best"]


@pytest.mark.skipif(
    not os.environ.get("DISPLAY"), reason="no display for Qt: install xvfb (make system-deps)"
)
def test_train_widget_start_stop_resume(qtbot, tmp_path: Path, config: Path, monkeypatch):
    import napari_bbem._train as train_widget

    errors: list[str] = []
    monkeypatch.setattr(train_widget, "show_error", errors.append)
    widget = train_widget.TrainWidget(None)  # the widget does not draw into the viewer
    assert widget.start() is None  # no run directory yet
    assert widget.status.value.startswith("failed: choose a run directory")
    assert errors == [
        "bbem training failed: choose a run directory: a new (or empty) folder, or a run to resume"
    ]
    errors.clear()
    run = tmp_path / "run"
    widget.config.value = config
    widget.run_dir.value = run
    proc = widget.start()
    assert proc is not None
    assert proc.running()
    assert not widget.start_button.enabled
    assert widget.stop_button.enabled
    # the run's own files, not the widget's once-a-second poll, say when to stop: no race
    qtbot.waitUntil(
        lambda: (
            (run / "metrics.csv").is_file()
            and len((run / "metrics.csv").read_text().splitlines()) >= 2
            and (run / "checkpoints/last.pt").is_file()
        ),
        timeout=120_000,
    )
    qtbot.waitUntil(lambda: not widget.canvas.isHidden(), timeout=10_000)  # drawn by a poll
    widget.stop()
    assert not proc.running()
    assert "bbem train --resume" in widget.status.value
    assert widget.start_button.text == "Resume"
    stopped_at = widget.curves.last_step
    assert 0 < stopped_at < STEPS
    # Resume continues the same run to its end
    proc = widget.start()
    assert proc is not None
    assert "--resume" in proc.command
    qtbot.waitUntil(lambda: widget.status.value.startswith("finished"), timeout=120_000)
    assert widget.curves.last_step == STEPS
    assert widget.curves.metrics["step"][-1] == STEPS
    assert "best val PR-AUC" in widget.status.value
    assert widget.start_button.text == "Start"
    assert errors == []
    # a run that fails says why, in the status and as a napari notification
    widget.config.value = tmp_path / "missing.yaml"
    widget.run_dir.value = tmp_path / "other"
    assert widget.start() is None
    assert errors
    assert errors[-1].startswith("bbem training failed: config")


@pytest.mark.skipif(os.name != "posix", reason="SIGINT dispositions are POSIX")
def test_stop_works_when_napari_was_started_with_sigint_ignored(tmp_path: Path, config: Path):
    # a shell script's background job (nohup napari &) inherits SIGINT ignored; the run it
    # starts must still stop on the Stop button's SIGINT, with bbem's own exit code
    from napari_bbem.train import TrainingProcess

    run = tmp_path / "run"
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        proc = TrainingProcess.start(config, run)
    finally:
        signal.signal(signal.SIGINT, previous)
    deadline = time.monotonic() + 120
    while not (run / "checkpoints" / "last.pt").is_file() and time.monotonic() < deadline:
        assert proc.running(), proc.log.read_text()
        time.sleep(0.01)
    assert proc.stop(timeout=60) == 130, proc.log.read_text()
    assert read_curves(run).last_step < STEPS
