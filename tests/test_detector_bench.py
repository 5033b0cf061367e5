"""The detector benchmark and its baseline run end to end on a tiny crop; boxes split by synapse."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_train import _config

from bbem.config import load_config
from bbem.data import YXCrop, load_val_volumes, open_source
from bbem.errors import UserError

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


@pytest.fixture(scope="module")
def split_config(tmp_path_factory) -> Path:
    """One volume, split in y: the first 32 rows train, the rest validate."""
    from bbem.volumes import write_volumes

    d = tmp_path_factory.mktemp("split")
    rng = np.random.default_rng(0)
    raw = rng.normal(128, 20, size=(8, 64, 48))
    clefts = np.zeros(raw.shape, np.uint64)
    for i, (y, x) in enumerate([(10, 12), (20, 30), (42, 10), (52, 30)]):
        clefts[1:-1, y : y + 2, x - 5 : x + 5] = i + 1
    raw[clefts > 0] -= 60
    raw = np.clip(raw, 0, 255).astype(np.uint8)
    write_volumes(d / "a.zarr", {"volumes/raw": raw, "volumes/labels/clefts": clefts})
    path = _config(d, d)
    cfg = yaml.safe_load(path.read_text())
    cfg["data"]["train"] = [{"path": "a.zarr", "y_range": [0, 32]}]
    cfg["data"]["val"] = [{"path": "a.zarr", "y_range": [32, 64]}]
    cfg["data"]["patch_size"] = [4, 32, 32]
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_yx_crop_reads_only_its_box(rng):
    a = rng.integers(0, 255, (5, 30, 20), dtype=np.uint8)
    c = YXCrop(a, (10, 25), (3, 20))
    assert c.shape == (5, 15, 17)
    assert np.array_equal(c[1:4, 2:9, 0:5], a[1:4, 12:19, 3:8])
    assert np.array_equal(c[2], a[2, 10:25, 3:20])
    assert np.array_equal(c[:], a[:, 10:25, 3:20])
    with pytest.raises(UserError, match="y_range stop 40 is outside"):
        YXCrop(a, (0, 40), None)


def test_config_boxes_select_train_and_val(split_config):
    cfg = load_config(split_config)
    src = open_source(cfg.data.train[0], cfg.data)
    assert src.shape == (8, 32, 48)
    ((raw, lab, _),) = load_val_volumes(cfg)
    assert raw.shape == lab.shape == (8, 32, 48)


def test_baseline_and_detector_bench_run_end_to_end(split_config, tmp_path):
    import detector
    from baseline_rf import run_baseline

    r = run_baseline(split_config, tmp_path / "rf", samples=2000, trees=5, jobs=1)
    assert 0 <= r["voxel"]["pr_auc"] <= 1
    assert "iou_0.2" in r["object"]
    assert (tmp_path / "rf" / "prediction.zarr").is_dir()
    assert "y 0-32" in r["protocol"]["split"]
    assert "y 32-64" in r["protocol"]["split"]
    saved = json.loads((tmp_path / "rf" / "evaluation.json").read_text())
    assert saved["voxel"]["pr_auc"] == pytest.approx(r["voxel"]["pr_auc"])

    out = tmp_path / "det"
    argv = [str(split_config), "--out", str(out), "--set", "train.steps=4", "--threads", "1"]
    argv += ["--rf-samples", "2000", "--rf-trees", "5"]
    assert detector.main(argv) == 0
    rows = json.loads((out / "detector.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["random forest (baseline)", "dense"]
    for row in rows:
        assert 0 <= row["pr_auc"] <= 1
        assert 0 <= row["obj_f1_02"] <= 1
    md = (out / "detector.md").read_text()
    assert "| random forest (baseline) |" in md
    assert "| dense |" in md
