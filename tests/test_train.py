"""Training: every method trains and validates, the run directory, resume after SIGKILL, errors."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tiny_em import tiny_config, tiny_volumes

from bbem.cli import main as cli_main
from bbem.config import load_config
from bbem.data import load_val_volumes
from bbem.model import load_inference_model
from bbem.train import train, validate


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> Path:
    return tiny_volumes(tmp_path_factory.mktemp("vols"))


def _config(volumes: Path, tmp: Path, **bb: Any) -> Path:
    return tiny_config(volumes, tmp / "tiny.yaml", bb=bb)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize(
    "bb",
    [
        {"method": "dense"},
        {"method": "bb", "mode": "in", "density": 0.5, "refresh_every": 2},
        {"method": "bb", "mode": "out", "density": 0.5, "refresh_every": 2},
        {"method": "magnitude", "density": 0.5, "refresh_every": 2},
        {"method": "random", "density": 0.5, "refresh_every": 2},
        {"method": "bb_tiers", "density": 0.5, "refresh_every": 2},
    ],
    ids=lambda b: f"{b['method']}-{b.get('mode', '')}",
)
def test_every_method_trains_and_validates(volumes, tmp_path, bb):
    cfg = load_config(_config(volumes, tmp_path, **bb))
    run = tmp_path / "run"
    result = train(cfg, run_dir=run, progress=False)
    rows = _rows(run / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [3, 6]
    for r in rows:
        assert 0 <= float(r["val_pr_auc"]) <= 1
        assert np.isfinite(float(r["train_loss"]))
    want = 1.0 if bb["method"] == "dense" else bb["density"]
    assert float(rows[-1]["density"]) == pytest.approx(want)
    # best.pt: the evaluation with the highest PR-AUC, holding the weights that scored it
    aucs = [float(r["val_pr_auc"]) for r in rows]
    best_row = rows[aucs.index(max(aucs))]
    assert round(result["best_pr_auc"], 6) == max(aucs)
    assert result["best_step"] == int(best_row["step"])
    assert (
        torch.load(run / "checkpoints/best.pt", weights_only=False)["step"] == result["best_step"]
    )
    model, _ = load_inference_model(run / "checkpoints/best.pt")
    again = validate(model, load_val_volumes(cfg), cfg.data.patch_size, cfg.model.model_dump())
    assert again["pr_auc"] == pytest.approx(float(best_row["val_pr_auc"]), abs=1e-6)
    for name in ("config.yaml", "train.log", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (run / name).is_file(), name
    assert (run / "bb.csv").is_file() == (bb["method"] != "dense")
    ck = torch.load(run / "checkpoints/last.pt", weights_only=False)
    assert ck["step"] == 6
    assert {"model", "optimizer", "scheduler", "bb", "rng"} <= set(ck)
    if bb["method"] != "dense":
        bbrows = _rows(run / "bb.csv")
        assert {int(r["step"]) for r in bbrows} == {3, 6}
        assert {r["mode"] for r in bbrows} == {bb.get("mode", "in")}


def test_bb_actually_prunes_the_unet(volumes, tmp_path):
    cfg = load_config(_config(volumes, tmp_path, method="bb", density=0.3, refresh_every=2))
    train(cfg, run_dir=tmp_path / "run", progress=False)
    model, _ = load_inference_model(tmp_path / "run/checkpoints/last.pt")
    convs = [
        m
        for m in model.modules()
        if isinstance(m, torch.nn.Conv3d) and m.in_channels > 1 and m.out_channels > 1
    ]
    for conv in convs:
        pairs = conv.weight.detach().abs().sum(dim=(2, 3, 4)) > 0
        assert pairs.float().mean().item() == pytest.approx(0.3, abs=1 / conv.in_channels)


def test_same_seed_same_metrics(volumes, tmp_path):
    path = _config(volumes, tmp_path, method="bb", density=0.5, refresh_every=2)
    a = train(load_config(path), run_dir=tmp_path / "a", progress=False)
    b = train(load_config(path), run_dir=tmp_path / "b", progress=False)
    for k in ("val_pr_auc", "train_loss", "val_f1_best"):
        assert a[k] == b[k]


def test_resume_after_sigkill_matches_an_uninterrupted_run(volumes, tmp_path):
    path = _config(volumes, tmp_path, method="bb", density=0.5, refresh_every=2)
    base = tmp_path / "whole"
    train(load_config(path), run_dir=base, progress=False)

    run = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "bbem", "train", str(path), "--run-dir", str(run)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    # kill after the step-4 checkpoint and before the end, mid-flight
    deadline = time.time() + 240
    while time.time() < deadline:
        last = run / "checkpoints/last.pt"
        if last.is_file() and torch.load(last, weights_only=False)["step"] >= 4:
            break
        if proc.poll() is not None:
            pytest.fail(
                f"training ended before it could be killed: {proc.stderr.read().decode()[-500:]}"
            )
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert cli_main(["train", "--resume", str(run)]) == 0

    whole, resumed = _rows(base / "metrics.csv"), _rows(run / "metrics.csv")
    assert [r["step"] for r in resumed] == [r["step"] for r in whole]  # nothing lost or doubled
    for a, b in zip(whole, resumed, strict=True):
        for k in a:
            if k != "time_s":
                assert a[k] == b[k], (k, a[k], b[k])
    assert _rows(base / "bb.csv") == _rows(run / "bb.csv")
    drop_time = [{k: v for k, v in r.items() if k != "time_s"} for r in _rows(base / "loss.csv")]
    assert [r["step"] for r in drop_time] == [str(s) for s in range(1, 7)]
    assert drop_time == [
        {k: v for k, v in r.items() if k != "time_s"} for r in _rows(run / "loss.csv")
    ]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("bb.densty=0.5", "did you mean"),
        ("bb.density=1.5", "bb.density"),
        ("train.steps=0", "train.steps"),
    ],
)
def test_config_errors_exit_2_with_one_line(volumes, tmp_path, capsys, override, message):
    path = _config(volumes, tmp_path, method="bb", density=0.5)
    assert cli_main(["train", str(path), "--set", override, "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "r").exists()  # failed before any work


def test_existing_run_dir_is_refused(volumes, tmp_path, capsys):
    path = _config(volumes, tmp_path)
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "x").write_text("")
    assert cli_main(["train", str(path), "--run-dir", str(tmp_path / "r")]) == 2
    assert "--resume" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(1800)  # 800 steps: about 4 minutes on a quiet 2-core machine, 10+ loaded
def test_demo_config_learns(tmp_path, monkeypatch):
    """The demo config: validation PR-AUC rises well above the cleft fraction."""
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)  # the config's data paths are relative to the repository
    cfg = load_config(root / "configs/demo.yaml")
    result = train(cfg, run_dir=tmp_path / "demo", progress=False)
    rows = _rows(tmp_path / "demo/metrics.csv")
    frac = float(rows[-1]["val_positive_fraction"])
    assert 0 < frac < 0.01  # clefts are rare, as in real EM
    # measured: about 16x the cleft fraction (val PR-AUC 0.08) after 800 steps
    assert result["best_pr_auc"] > 5 * frac


def test_near_weight_up_weights_the_background_beside_a_cleft():
    import torch
    from scipy import ndimage as ndi

    from bbem.train import CleftLoss

    g = torch.Generator().manual_seed(0)
    target = torch.zeros(2, 1, 3, 24, 24)
    target[0, 0, 1, 10:12, 4:20] = 1  # a sheet
    target[1, 0, :, 3, 3] = 1  # a column near a corner: the max filter must not wrap
    logits = torch.randn(target.shape, generator=g)
    loss = CleftLoss(1.0, 0.0, pos_weight=2.0, near_weight=5.0, near_radius=3)
    near = loss.near_mask(target)
    # oracle: scipy's in-plane square dilation, minus the clefts themselves
    t = target.numpy()[:, 0] > 0
    grown = np.stack([ndi.binary_dilation(v, np.ones((1, 7, 7), bool)) for v in t])
    assert np.array_equal(near.numpy()[:, 0], grown & ~t)
    # the loss is the BCE with weight 5 on those voxels, 1 elsewhere
    w = 1.0 + 4.0 * near.float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, target, weight=w, pos_weight=torch.tensor([2.0])
    )
    assert float(loss(logits, target)) == pytest.approx(float(bce), rel=1e-6)
    plain = CleftLoss(1.0, 0.0, pos_weight=2.0)
    assert float(plain(logits, target)) < float(loss(logits, target))
