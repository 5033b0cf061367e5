"""Screenshots of every napari-bbem widget with data, to check them by eye.

    xvfb-run -a .venv/bin/python napari_plugin/scripts/screenshots.py [OUT_DIR]

OUT_DIR defaults to $BBEM_SCREENSHOTS, else ./screenshots. Without a display the script
re-runs itself under ``xvfb-run``. It writes, on napari's dark theme:

- ``sample.png``: File > Open Sample > bbem synthetic EM;
- ``predictions.png``: the Predictions widget after a run of a tiny (untrained) checkpoint;
- ``evaluate.png``: the Evaluate widget scoring a blurred copy of the sample's clefts;
- ``onrates_empty.png``, ``onrates_layer.png``, ``onrates_all_layers.png``,
  ``onrates_training.png``: the On-rates widget before a run, and its three views of a made-up
  bb.csv with a bbem UNet's layer names;
- ``train.png``: the Train widget after a 60-step run of a tiny config on synthetic volumes.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SIZE = (1400, 900)


def _wait(until, timeout: float = 120.0) -> None:
    from qtpy.QtWidgets import QApplication

    end = time.monotonic() + timeout
    while not until():
        QApplication.processEvents()
        if time.monotonic() > end:
            raise TimeoutError("the widget did not finish in time")
        time.sleep(0.02)


def _save(img: np.ndarray, path: Path) -> None:
    import imageio.v3 as iio

    iio.imwrite(path, img)
    print(path)


def _viewer_shot(viewer, path: Path) -> None:
    from qtpy.QtWidgets import QApplication

    viewer.window._qt_window.resize(*SIZE)
    QApplication.processEvents()
    _save(viewer.screenshot(canvas_only=False), path)


def _widget_shot(widget, path: Path, size: tuple[int, int] = (440, 900)) -> None:
    from qtpy.QtWidgets import QApplication

    widget.native.resize(*size)
    QApplication.processEvents()
    widget.native.grab().save(str(path))
    print(path)


def _tiny_checkpoint(folder: Path) -> Path:
    import torch

    from bbem.model import EXPORT_FORMAT, build_model

    config = {"channels": [4, 8], "strides": [[1, 2, 2]], "num_res_units": 1}
    torch.manual_seed(0)
    path = folder / "tiny.pt"
    state = build_model(config).state_dict()
    torch.save(
        {"format": EXPORT_FORMAT, "model_config": config, "state_dict": state, "info": {}}, path
    )
    return path


def _bb_csv(folder: Path) -> Path:
    """A made-up bb.csv over a bbem UNet's layers, logged at steps 15, 30, 45, 60."""
    rng = np.random.default_rng(0)
    layers = [
        ("model.0.conv.unit0.conv", 8, 27),
        ("model.1.submodule.0.conv.unit0.conv", 16, 216),
        ("model.1.submodule.1.submodule.conv.unit0.conv", 32, 432),
        ("model.1.submodule.2.1.conv.unit0.conv", 8, 864),
        ("model.2.1.conv.unit0.conv", 8, 216),
    ]
    lines = ["step,layer,mode,unit,on_rate,degree,full_fan,traffic"]
    for i, step in enumerate((15, 30, 45, 60)):
        for j, (name, units, fan) in enumerate(layers):
            beta = (0.5 + 0.3 * j) / fan * (1 + 0.2 * i)
            k = rng.integers(fan // 4, fan + 1, units)
            a = 1 / (1 + np.exp(beta * k - 0.8 + rng.normal(0, 0.15, units)))
            for u in range(units):
                lines.append(f"{step},{name},in,{u},{a[u]:.4f},{k[u]},{fan},{a[u] * k[u]:.3f}")
    path = folder / "bb.csv"
    path.write_text("\n".join(lines) + "\n")
    return folder


def _tiny_train_config(folder: Path) -> Path:
    """A 60-step config over two small synthetic volumes (made by bbem on first use)."""
    import yaml

    synth = {"shape": [12, 96, 96]}
    cfg = {
        "name": "tiny",
        "data": {
            "root": str(folder),
            "train": [{"path": "train.zarr", "synth": {**synth, "seed": 1}}],
            "val": [{"path": "val.zarr", "synth": {**synth, "seed": 2}}],
            "patch_size": [4, 32, 32],
            "batch_size": 2,
        },
        "model": {"channels": [4, 8, 16], "strides": [[1, 2, 2], [2, 2, 2]]},
        "bb": {"method": "bb", "density": 0.5, "warmup_steps": 10, "refresh_every": 10},
        "train": {"steps": 60, "eval_every": 10, "checkpoint_every": 10, "log_every": 1},
    }
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def main(out: Path) -> None:
    import napari
    from napari_bbem._evaluate import EvaluateWidget
    from napari_bbem._widgets import VIEWS, OnRatesWidget, PredictionsWidget
    from napari_bbem.reader import geometry
    from scipy import ndimage

    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="bbem_shots_"))
    try:
        viewer = napari.Viewer(show=False)
        viewer.open_sample("napari-bbem", "synthetic")
        _viewer_shot(viewer, out / "sample.png")

        _, pred = viewer.window.add_plugin_dock_widget("napari-bbem", "Predictions")
        assert isinstance(pred, PredictionsWidget)
        pred.checkpoint.value = _tiny_checkpoint(tmp)
        pred.start()
        _wait(lambda: pred.run.enabled and "synthetic raw clefts" in viewer.layers)
        _viewer_shot(viewer, out / "predictions.png")
        viewer.close()

        viewer = napari.Viewer(show=False)
        viewer.open_sample("napari-bbem", "synthetic")
        raw, truth = viewer.layers["synthetic raw"], viewer.layers["synthetic clefts"]
        blurred = ndimage.gaussian_filter((np.asarray(truth.data) > 0).astype(float), 1.2)
        prob = (np.clip(blurred * 1.6, 0, 1) * 255).astype(np.uint8)
        prob[5:8, 10:20, 10:20] = 230  # one invented cleft
        viewer.add_image(
            prob,
            name="synthetic probability",
            colormap="magma",
            blending="additive",
            **geometry(raw.scale, raw.translate),
            metadata={"bbem_kind": "probability", "threshold": 0.4},
        )
        _, ev = viewer.window.add_plugin_dock_widget("napari-bbem", "Evaluate")
        assert isinstance(ev, EvaluateWidget)
        ev.min_size.value = 20
        ev.evaluate()
        _viewer_shot(viewer, out / "evaluate.png")
        viewer.close()

        from napari.qt import get_stylesheet

        onrates = OnRatesWidget(None)  # on its own: give it the viewer's dark theme
        onrates.native.setStyleSheet(get_stylesheet("dark"))
        _widget_shot(onrates, out / "onrates_empty.png", (440, 420))
        onrates.run_dir.value = _bb_csv(tmp)
        onrates.layer.value = "model.1.submodule.1.submodule.conv.unit0.conv"
        onrates.step.value = 30
        _widget_shot(onrates, out / "onrates_layer.png")
        onrates.view.value = VIEWS[1]
        _widget_shot(onrates, out / "onrates_all_layers.png")
        onrates.view.value = VIEWS[2]
        _widget_shot(onrates, out / "onrates_training.png")

        from napari_bbem._train import TrainWidget

        train = TrainWidget(None)
        train.native.setStyleSheet(get_stylesheet("dark"))
        train.config.value = _tiny_train_config(tmp)
        train.run_dir.value = tmp / "run"
        train.start()
        _wait(lambda: not train.stop_button.enabled, timeout=600)
        _widget_shot(train, out / "train.png", (440, 700))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    if not os.environ.get("DISPLAY") and shutil.which("xvfb-run"):
        os.execvp("xvfb-run", ["xvfb-run", "-a", sys.executable, *sys.argv])
    target = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("BBEM_SCREENSHOTS", "")
    main(Path(target or "screenshots"))
