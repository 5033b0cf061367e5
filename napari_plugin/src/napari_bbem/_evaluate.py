"""The "Evaluate" dock widget: a thin Qt/magicgui shell over :mod:`napari_bbem.evaluate`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from magicgui.widgets import ComboBox, Container, FloatSpinBox, Label, PushButton, SpinBox, Table
from napari.utils.notifications import show_error

from bbem.errors import UserError
from napari_bbem.evaluate import (
    default_threshold,
    evaluate_arrays,
    fmt,
    layer_array,
    mismatches,
    n_objects,
    plot_pr,
    summary_rows,
)
from napari_bbem.reader import geometry

if TYPE_CHECKING:
    import napari


class EvaluateWidget(Container):
    """Score a prediction layer against a truth labels layer as ``bbem evaluate`` does.

    Shows the headline numbers in a table, the voxel PR curve, and adds ``<truth> missed``
    (truth clefts without a match) and ``<prediction> spurious`` (predicted clefts without a
    match) at the chosen IoU.
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        super().__init__()
        self.viewer = napari_viewer
        self.prediction = ComboBox(label="prediction", choices=self._prediction_layers)
        self.truth = ComboBox(label="truth labels", choices=self._truth_layers)
        self.threshold = FloatSpinBox(label="threshold", min=0.0, max=1.0, step=0.01, value=0.5)
        self.min_size = SpinBox(label="min size (voxels)", min=0, max=10**9, value=100)
        self.iou = ComboBox(label="marks at IoU >", choices=[0.2, 0.5], value=0.5)
        self.run = PushButton(text="Evaluate")
        self.status = Label(value="choose a prediction and a truth labels layer")
        self.status.native.setWordWrap(True)
        self.table = Table(value={"data": [], "index": [], "columns": ["value"]})
        self.table.min_height = 330
        self.extend(
            [
                self.prediction,
                self.truth,
                self.threshold,
                self.min_size,
                self.iou,
                self.run,
                self.status,
                self.table,
            ]
        )
        self.figure = Figure(figsize=(4.0, 3.6), layout="constrained")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(320)
        self.canvas.setVisible(False)  # no empty white area before the first evaluation
        self.native.layout().addWidget(self.canvas)
        self.result: dict[str, Any] | None = None
        self.rows: list[tuple[str, float | None]] = []
        self.missed_layer: Any = None
        self.spurious_layer: Any = None
        self.run.changed.connect(self.evaluate)
        self.prediction.changed.connect(self._prediction_changed)
        for event in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            event.connect(self.reset_choices)
        self._prediction_changed()

    def _prediction_layers(self, _widget: Any = None) -> list[tuple[str, Any]]:
        """3D single-channel image layers; probability maps first."""
        from napari.layers import Image

        found = [
            layer
            for layer in self.viewer.layers
            if isinstance(layer, Image) and not layer.rgb and layer.ndim == 3
        ]
        found.sort(key=lambda layer: layer.metadata.get("bbem_kind") != "probability")
        return [(layer.name, layer) for layer in found]

    def _truth_layers(self, _widget: Any = None) -> list[tuple[str, Any]]:
        """3D labels layers, not this widget's own marks; named clefts first."""
        from napari.layers import Labels

        found = [
            layer
            for layer in self.viewer.layers
            if isinstance(layer, Labels)
            and layer.ndim == 3
            and layer.metadata.get("bbem_kind") not in ("missed", "spurious")
        ]
        found.sort(key=lambda layer: "cleft" not in layer.name)
        return [(layer.name, layer) for layer in found]

    def _prediction_changed(self, _value: Any = None) -> None:
        layer = self.prediction.value
        if layer is not None:
            self.threshold.value = default_threshold(layer.metadata)

    def evaluate(self, _value: Any = None) -> dict[str, Any] | None:
        """Evaluate the chosen layers; the result, or None (status and a notification say why)."""
        pred, truth = self.prediction.value, self.truth.value
        if pred is None or truth is None:
            self.status.value = "choose a prediction (image) and a truth labels layer"
            return None
        self.status.value = f"evaluating {pred.name} against {truth.name}..."
        try:
            p, t = layer_array(pred), layer_array(truth)
            result = evaluate_arrays(
                p, t, self.threshold.value, self.min_size.value, voxel_size=truth.scale
            )
            missed, spurious = mismatches(
                p, t, self.threshold.value, self.min_size.value, iou=float(self.iou.value)
            )
        except Exception as e:  # shown, never a traceback: wrong layers are a user's mistake
            message = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
            self.status.value = f"failed: {message.splitlines()[0] if message else ''}"
            show_error(f"bbem evaluate: {message}")
            return None
        self.result = result
        self.rows = summary_rows(result)
        self.table.value = {
            "data": [[fmt(v)] for _, v in self.rows],
            "index": [name for name, _ in self.rows],
            "columns": ["value"],
        }
        plot_pr(self.figure, result, title=f"{pred.name} vs {truth.name}")
        self.canvas.setVisible(True)
        self.canvas.draw_idle()
        geo = geometry(truth.scale, truth.translate)
        self.missed_layer = self._marks(f"{truth.name} missed", "missed", missed, truth, geo)
        self.spurious_layer = self._marks(f"{pred.name} spurious", "spurious", spurious, pred, geo)
        self.status.value = (
            f"{n_objects(missed)} missed, {n_objects(spurious)} spurious at IoU > "
            f"{float(self.iou.value):g} (threshold {self.threshold.value:.2f}, "
            f"min size {self.min_size.value})"
        )
        return result

    def _marks(self, name: str, kind: str, data: Any, source: Any, geo: dict[str, Any]) -> Any:
        """Add or update this widget's ``name`` labels layer (a user's layer is left alone)."""
        meta = {"bbem_kind": kind, "bbem_source": source.name}
        if name in self.viewer.layers:
            layer = self.viewer.layers[name]
            if all(layer.metadata.get(k) == v for k, v in meta.items()):
                layer.data = data
                return layer
        return self.viewer.add_labels(data, name=name, opacity=0.7, metadata=meta, **geo)
