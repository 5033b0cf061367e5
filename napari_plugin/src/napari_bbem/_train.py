"""The "Train" dock widget: a thin Qt/magicgui shell over :mod:`napari_bbem.train`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from magicgui.types import FileDialogMode
from magicgui.widgets import Container, FileEdit, Label, PushButton
from napari.utils.notifications import show_error

from bbem.errors import UserError
from napari_bbem.train import Curves, TrainingProcess, can_resume, plot_training, read_curves

if TYPE_CHECKING:
    import napari

#: How often the widget reads the run's CSVs (ms).
POLL_MS = 1000


class TrainWidget(Container):
    """Start ``bbem train`` on a config, follow its loss and validation curves, stop it.

    A stopped run is an ordinary run directory: Resume (or ``bbem train --resume DIR``)
    continues it from its last checkpoint.
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure
        from qtpy.QtCore import QTimer

        super().__init__()
        self.viewer = napari_viewer
        self.config = FileEdit(label="config", filter="*.yaml *.yml")
        self.run_dir = FileEdit(label="run directory", mode=FileDialogMode.EXISTING_DIRECTORY)
        self.start_button = PushButton(text="Start")
        self.stop_button = PushButton(text="Stop", enabled=False)
        self.status = Label(value="choose a config and a new run directory")
        self.status.native.setWordWrap(True)
        self.extend([self.config, self.run_dir, self.start_button, self.stop_button, self.status])
        self.figure = Figure(figsize=(4.0, 4.4), layout="constrained")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(360)
        self.canvas.setVisible(False)  # no empty white area before a run has logged anything
        self.native.layout().addWidget(self.canvas)
        self.process: TrainingProcess | None = None
        self.curves = Curves({}, {})
        self.timer = QTimer()
        self.timer.setInterval(POLL_MS)
        self.timer.timeout.connect(self.poll)
        self.start_button.changed.connect(self.start)
        self.stop_button.changed.connect(self.stop)
        self.run_dir.changed.connect(self._run_dir_changed)
        self.native.destroyed.connect(self._close)

    @staticmethod
    def _path(edit: FileEdit) -> Path | None:
        """A FileEdit's one path, or None while it is empty (magicgui shows "." then)."""
        text = str(edit.value or "")
        return Path(text) if text not in ("", ".") else None

    def _run_dir_changed(self, _value: Any = None) -> None:
        run = self._path(self.run_dir)
        resumable = run is not None and can_resume(run)
        self.start_button.text = "Resume" if resumable else "Start"
        if run is not None and resumable and self.process is None:
            self.curves = read_curves(run)
            self._draw()

    def start(self, _value: Any = None) -> TrainingProcess | None:
        if self.process is not None and self.process.running():
            return self.process
        run = self._path(self.run_dir)
        if run is None:
            self._fail("choose a run directory: a new (or empty) folder, or a run to resume")
            return None
        try:
            self.process = TrainingProcess.start(self._path(self.config), run)
        except (UserError, OSError) as e:
            self._fail(str(e))
            return None
        resuming = "--resume" in self.process.command
        self.status.value = f"{'resuming' if resuming else 'training'}: {run}"
        self.start_button.enabled = False
        self.stop_button.enabled = True
        self.timer.start()
        return self.process

    def poll(self) -> None:
        """Read the run's CSVs, redraw when they grew, and notice when the run ends."""
        proc = self.process
        if proc is None:
            return
        curves = read_curves(proc.run_dir)
        if curves.last_step != self.curves.last_step or len(curves.metrics.get("step", ())) != len(
            self.curves.metrics.get("step", ())
        ):
            self.curves = curves
            self._draw()
        if proc.running():
            if curves.last_step:
                self.status.value = f"training: step {curves.last_step}{self._best()}"
            return
        self.timer.stop()
        self.curves = read_curves(proc.run_dir)
        self._draw()
        code = proc.proc.returncode
        self._idle()
        if code == 0:
            self.status.value = f"finished at step {self.curves.last_step}{self._best()}"
            self.start_button.text = "Start"  # a finished run has nothing to resume
        elif code != 130:  # 130: stopped by the Stop button (stop() already said so)
            self._fail(proc.error_line() or f"bbem train exited with code {code}")

    def stop(self, _value: Any = None) -> None:
        proc = self.process
        if proc is None or not proc.running():
            return
        self.status.value = "stopping..."
        proc.stop()
        self.timer.stop()
        self.curves = read_curves(proc.run_dir)
        self._draw()
        self._idle()
        if can_resume(proc.run_dir):
            self.status.value = (
                f"stopped at step {self.curves.last_step}: Resume continues from the last "
                f"checkpoint (bbem train --resume {proc.run_dir})"
            )
        else:
            self.status.value = "stopped before the first checkpoint: Start begins it again"

    def _idle(self) -> None:
        self.stop_button.enabled = False
        self.start_button.enabled = True
        self._run_dir_changed()

    def _best(self) -> str:
        best = self.curves.best()
        return f", best val PR-AUC {best[0]:.3f} at step {best[1]}" if best else ""

    def _fail(self, message: str) -> None:
        self.status.value = f"failed: {message}"
        show_error(f"bbem training failed: {message}")

    def _draw(self) -> None:
        if not self.curves.loss and not self.curves.metrics:
            return
        run = self.process.run_dir if self.process is not None else self._path(self.run_dir)
        plot_training(self.figure, self.curves, title=run.name if run is not None else "")
        self.canvas.setVisible(True)
        self.canvas.draw_idle()

    def _close(self, *_: Any) -> None:
        # a dock closed with napari must not leave a training process behind
        self.timer.stop()
        if self.process is not None:
            self.process.close()
