"""The dock widgets: thin Qt/magicgui shells over :mod:`napari_bbem.predict` and
:mod:`napari_bbem.onrates`.
"""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from magicgui.types import FileDialogMode
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSlider,
    Label,
    ProgressBar,
    PushButton,
    Slider,
)
from napari.utils.notifications import show_error, show_warning

from bbem.errors import UserError
from bbem.infer import DEFAULT_MIN_SIZE
from napari_bbem.onrates import (
    OnRates,
    beta_of,
    layer_choices,
    layer_name,
    plot_all_layers,
    plot_layer_step,
    plot_over_training,
    read_on_rates,
)
from napari_bbem.predict import (
    best_threshold,
    predict_steps,
    raw_range_warning,
    threshold_clefts,
)
from napari_bbem.reader import geometry

if TYPE_CHECKING:
    import napari


def _message(e: BaseException) -> str:
    # a UserError already says what to do; anything else gets its type for the bug report
    return str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"


def _predict_job(
    checkpoint: str, data: Any, tta: bool
) -> Generator[str | tuple[int, int], None, tuple[np.ndarray, float | None]]:
    """What the worker thread runs: yields status lines and ``(done, total)`` blocks; returns
    the probabilities and the checkpoint's suggested threshold."""
    prob = yield from predict_steps(checkpoint, data, tta=tta)
    return prob, best_threshold(checkpoint)


def is_raw_volume(layer: Any) -> bool:
    """A single-channel 3D image layer that is not a probability map (RGB, 2D, 4D are not)."""
    from napari.layers import Image

    return (
        isinstance(layer, Image)
        and not layer.rgb
        and layer.ndim == 3
        and layer.metadata.get("bbem_kind") != "probability"
        and not layer.name.endswith(" probability")
    )


class PredictionsWidget(Container):
    """Run a checkpoint over an image layer; show probabilities and thresholded clefts.

    Adds ``<image> probability`` (uint8, magma, additive) and ``<image> clefts`` (one
    label per connected cleft at the threshold), with the image's scale and translate. The
    threshold starts at the checkpoint's best validation threshold when it recorded one.
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.checkpoint = FileEdit(
            label="checkpoint", filter="*.pt", mode=FileDialogMode.EXISTING_FILE
        )
        self.image = ComboBox(label="image", choices=self._image_layers)
        self.tta = CheckBox(text="flip averaging (8x slower)", value=False)
        self.run = PushButton(text="Predict")
        self.cancel = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="blocks", min=0, max=1, value=0)
        self.threshold = FloatSlider(label="threshold", min=0.0, max=1.0, step=0.01, value=0.5)
        self.status = Label(value="choose a checkpoint and an image")
        self.status.native.setWordWrap(True)
        buttons = Container(widgets=[self.run, self.cancel], layout="horizontal", labels=False)
        buttons.margins = (0, 0, 0, 0)
        rows = [self.checkpoint, self.image, self.tta, buttons, self.progress, self.threshold]
        self.extend([*rows, self.status])
        self.prob: np.ndarray | None = None
        self.source: Any = None  # the image layer the shown prediction is of
        self.prob_layer: Any = None
        self.clefts_layer: Any = None
        self.worker: Any = None
        #: Fractions of blocks done the running prediction reported, in order.
        self.fractions: list[float] = []
        self._activity: Any = None  # napari's progress bar in the activity dock
        self.run.changed.connect(self.start)
        self.cancel.changed.connect(self.stop)
        self.threshold.changed.connect(self._show_clefts)
        for event in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            event.connect(self.reset_choices)

    def _image_layers(self, _widget: Any = None) -> list[tuple[str, Any]]:
        """Image layers the model can run on: 3D (z, y, x), one channel, not a prediction."""
        return [(layer.name, layer) for layer in self.viewer.layers if is_raw_volume(layer)]

    def start(self) -> Any:
        """Predict in a worker thread (the viewer stays responsive); returns the worker."""
        from napari.qt.threading import thread_worker

        layer = self.image.value
        ckpt = self.checkpoint.value
        if layer is None:
            self.status.value = "no image layer: open a volume first"
            return None
        data = layer.data[0] if layer.multiscale else layer.data
        warning = raw_range_warning(data, f"layer {layer.name!r}")
        if warning:  # predict anyway: the user may know better, but not unwarned
            show_warning(warning)
        if not isinstance(ckpt, Path) or not ckpt.is_file():
            self.status.value = "choose a checkpoint file (.pt)"
            return None
        self.run.enabled = False
        self.cancel.enabled = True
        self.fractions = []
        self.progress.max, self.progress.value = 1, 0
        self.status.value = f"predicting {layer.name} {tuple(data.shape)}..."
        # our own "errored" handler: the message goes to the status line, not a traceback
        worker = thread_worker(_predict_job, connect={"errored": self._failed}, start_thread=False)(
            str(ckpt), data, self.tta.value
        )
        worker.yielded.connect(lambda item: self._progress(layer.name, item))
        worker.returned.connect(lambda result: self._show(layer, *result))
        worker.aborted.connect(self._cancelled)
        worker.finished.connect(self._finished)
        self.worker = worker
        worker.start()
        return worker

    def stop(self, _value: Any = None) -> None:
        """Cancel the running prediction: it stops after the block it is on."""
        if self.worker is not None and self.cancel.enabled:
            self.cancel.enabled = False
            self.status.value = "cancelling (after the current block)..."
            self.worker.quit()

    def _progress(self, name: str, item: str | tuple[int, int]) -> None:
        if isinstance(item, str):
            self.status.value = item
            return
        done, total = item
        self.fractions.append(done / total)
        self.progress.max, self.progress.value = total, done
        self.status.value = f"predicting {name}: {done}/{total} blocks"
        if self._activity is None:
            from napari.utils import progress

            self._activity = progress(total=total, desc=f"bbem prediction of {name}")
        self._activity.update(done - self._activity.n)

    def _cancelled(self) -> None:
        self.status.value = "cancelled: no prediction was added"

    def _finished(self) -> None:
        self.run.enabled = True
        self.cancel.enabled = False
        if self._activity is not None:
            self._activity.close()
            self._activity = None

    def _failed(self, e: BaseException) -> None:
        self.status.value = f"failed: {_message(e)}"
        show_error(f"bbem prediction failed: {_message(e)}")

    def _output(self, name: str, kind: str, source: str) -> Any:
        """This widget's earlier output layer ``name`` for ``source`` (re-used), else None;
        a user's own layer of that name is left alone."""
        if name not in self.viewer.layers:
            return None
        layer = self.viewer.layers[name]
        meta = layer.metadata
        return layer if (meta.get("bbem_kind"), meta.get("bbem_source")) == (kind, source) else None

    def _show(self, source: Any, prob: np.ndarray, threshold: float | None = None) -> None:
        self.prob = prob
        self.source = source
        if threshold is not None:  # start from the checkpoint's best validation threshold
            with self.threshold.changed.blocked():
                self.threshold.value = round(threshold, 2)
        name = f"{source.name} probability"
        self.prob_layer = self._output(name, "probability", source.name)
        if self.prob_layer is not None:
            self.prob_layer.data = prob
        else:
            self.prob_layer = self.viewer.add_image(
                prob,
                name=name,
                colormap="magma",
                blending="additive",
                contrast_limits=(0, 255),
                opacity=0.8,
                metadata={"bbem_kind": "probability", "bbem_source": source.name},
                **geometry(source.scale, source.translate),
            )
        self._show_clefts()

    def _show_clefts(self, _value: Any = None) -> None:
        if self.prob is None or self.source is None:
            return
        # the clefts `bbem infer --threshold` writes: same rule, same smallest size
        clefts = threshold_clefts(self.prob, self.threshold.value, min_size=DEFAULT_MIN_SIZE)
        if self.prob_layer is not None:  # travels with the layer: Evaluate and the writer use it
            self.prob_layer.metadata["threshold"] = float(self.threshold.value)
        n = int(clefts.max())
        source = self.source
        name = f"{source.name} clefts"
        self.clefts_layer = self._output(name, "predicted_clefts", source.name)
        if self.clefts_layer is not None:
            self.clefts_layer.data = clefts
        else:
            self.clefts_layer = self.viewer.add_labels(
                clefts,
                name=name,
                opacity=0.6,
                metadata={"bbem_kind": "predicted_clefts", "bbem_source": source.name},
                **geometry(source.scale, source.translate),
            )
        self.status.value = (
            f"{n} cleft{'' if n == 1 else 's'} at p >= {self.threshold.value:.2f}, "
            f">= {DEFAULT_MIN_SIZE} voxels (max p {self.prob.max() / 255:.2f})"
        )


#: What the On-rates figure shows.
VIEWS = ("layer at a step", "all layers at a step", "layer over training")


class OnRatesWidget(Container):
    """A BB run's ``bb.csv``: per-channel on-rate, kept degree and the balance plot of one layer
    at one logged step; the balance of every layer; one layer's distributions over training."""

    def __init__(self, napari_viewer: napari.viewer.Viewer | None = None) -> None:
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        super().__init__()
        self.viewer = napari_viewer
        self.data: OnRates | None = None
        self.run_dir = FileEdit(label="run directory", mode=FileDialogMode.EXISTING_DIRECTORY)
        self.view = ComboBox(label="view", choices=list(VIEWS), value=VIEWS[0])
        self.layer = ComboBox(label="layer", choices=[])
        self.step = Slider(label="step", min=0, max=0, value=0)
        self.status = Label(value="choose a run directory (with bb.csv)")
        self.status.native.setWordWrap(True)
        self.hint = Label(
            value="Choose the run directory of a BB training run: its bb.csv (written every "
            "logged step) is drawn here, per layer and step."
        )
        self.hint.native.setWordWrap(True)
        self.extend([self.run_dir, self.view, self.layer, self.step, self.status, self.hint])
        self.figure = Figure(figsize=(4.0, 7.0), layout="constrained")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(520)
        self.canvas.setVisible(False)  # the hint, not a big white area, until a run is read
        self.native.layout().addWidget(self.canvas)
        self.run_dir.changed.connect(self.load)
        self.view.changed.connect(self._layer_changed)
        self.layer.changed.connect(self._layer_changed)
        self.step.changed.connect(self._step_changed)

    def load(self, path: Any = None) -> None:
        """Read ``bb.csv`` of the chosen run directory and draw its last step."""
        try:
            self.data = read_on_rates(cast(Path, self.run_dir.value) if path is None else path)
        except UserError as e:
            self._failed(e)
            return
        with self.layer.changed.blocked():
            self.layer.choices = layer_choices(self.data.layers)
            self.layer.value = self.data.layers[0]
        self.hint.visible = False
        self.canvas.setVisible(True)
        self._layer_changed()

    def _failed(self, e: BaseException) -> None:
        """Say what went wrong (status and a notification) and clear the previous run's plot,
        layers and steps, so that nothing stale is read as this run's."""
        self.data = None
        with self.layer.changed.blocked(), self.step.changed.blocked():
            self.layer.choices = []
            self.step.min = 0
            self.step.max = 0
            self.step.value = 0
        self.figure.clear()
        self.canvas.draw_idle()
        self.canvas.setVisible(False)
        self.hint.visible = True
        self.status.value = _message(e)
        show_error(f"bbem on-rates: {_message(e)}")

    def logged_steps(self) -> list[int]:
        """The steps the slider offers: the layer's, or every layer's in the all-layers view."""
        if self.data is None or self.layer.value is None:
            return []
        if self.view.value == VIEWS[1]:
            return sorted({s for layer in self.data.layers for s in self.data.steps(layer)})
        return self.data.steps(self.layer.value)

    def _layer_changed(self, _value: Any = None) -> None:
        if self.data is None or self.layer.value is None:
            return
        self.layer.tooltip = str(self.layer.value)  # the full module path
        steps = self.logged_steps()
        gaps = np.diff(steps)
        with self.step.changed.blocked():
            self.step.min, self.step.max = steps[0], max(steps[-1], steps[0] + 1)
            self.step.step = int(np.gcd.reduce(gaps)) if gaps.size else 1
            self.step.value = steps[-1]
        self.step.enabled = self.view.value != VIEWS[2] and len(steps) > 1
        self.draw()

    def _step_changed(self, _value: Any = None) -> None:
        """Snap the slider to the nearest logged step (steps need not be evenly spaced)."""
        steps = self.logged_steps()
        if steps:
            nearest = min(steps, key=lambda s: abs(s - int(self.step.value)))
            if nearest != self.step.value:
                with self.step.changed.blocked():
                    self.step.value = nearest
        self.draw()

    def draw(self, _value: Any = None) -> None:
        """Redraw the figure for the chosen view, layer and training step."""
        if self.data is None or self.layer.value is None:
            return
        layer = str(self.layer.value)
        step = int(self.step.value)
        try:
            if self.view.value == VIEWS[1]:
                plot_all_layers(self.figure, self.data, step)
                message = f"step {step}: balance of every unit of {len(self.data.layers)} layers"
            elif self.view.value == VIEWS[2]:
                plot_over_training(self.figure, self.data, layer)
                steps = self.data.steps(layer)
                message = f"{layer_name(layer)}: {len(steps)} logged steps, {steps[0]}-{steps[-1]}"
            else:
                ls = self.data.at(layer, step)
                plot_layer_step(self.figure, ls)
                beta = beta_of(ls)
                beta_s = f"{beta:.4g}" if np.isfinite(beta) else "undefined"
                message = (
                    f"step {step}: {ls.unit.size} units, mean on-rate {ls.on_rate.mean():.3f}, "
                    f"density {ls.degree.sum() / ls.full_fan.sum():.3f}, "
                    f"beta = slope / K = {beta_s}"
                )
        except UserError as e:
            self._failed(e)
            return
        self.canvas.draw_idle()
        self.status.value = message
