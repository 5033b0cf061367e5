"""bbem report on run directories built with the RunDir API: EM, dense, and companion runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bbem.errors import UserError
from bbem.metrics import voxel_metrics
from bbem.report import make_report
from bbem.rundir import RunDir

BETA, C = 3.0, -1.0  # the balance line the fake on-rates lie on: log((1-a)/a) = BETA k/K + C


class _FakeBB:
    """``stats()`` as bbem.bb gives it, for two masked layers; on-rates on a known line."""

    def __init__(self, step: int, rng: np.random.Generator):
        self.layers = {}
        for name, c_out, c_in in (("model.0.conv", 8, 4), ("model.1.submodule.conv", 16, 8)):
            k = rng.integers(1, c_in + 1, c_out) if step else np.full(c_out, c_in)
            a = 1 / (1 + np.exp(BETA * k / c_in + C))
            self.layers[name] = {
                "mode": "in",
                "full_fan": c_in,
                "on_rate": torch.tensor(a if step else rng.uniform(0.3, 0.7, c_out)),
                "fan_in": torch.tensor(k),
                "fan_out": torch.ones(c_in, dtype=torch.long) * c_out,
            }

    def stats(self):
        return self.layers


def _run_dir(tmp_path, kind: str = "em"):
    cfg = {"name": f"{kind}-test", "bb": {"method": "bb", "density": 0.5}}
    if kind == "dense":
        cfg["bb"] = {"method": "dense"}
    rd = RunDir.create(tmp_path / kind, cfg)
    rng = np.random.default_rng(0)
    for step in (0, 10, 20, 30):
        row = {"step": step, "time_s": step * 1.5, "train_loss": 1 / (step + 1), "density": 0.5}
        if kind == "asr":
            row["val_wer"] = 0.9 - step / 100
        else:
            row.update(
                {
                    "val_pr_auc": 0.1 + step / 100,
                    "val_f1_best": 0.2 + step / 200,
                    "val_threshold_best": 0.9 - step / 100,  # not a score: never "best"
                }
            )
        rd.append_metrics(row)
        if kind != "dense":
            rd.append_bb(step, _FakeBB(step, rng))
    if kind == "em":
        truth = rng.random(2000) < 0.2
        prob = np.clip(truth * 0.4 + rng.random(2000) * 0.6, 0, 1)
        metrics = voxel_metrics(prob, truth)
        torch.save(
            {"format": "bbem-checkpoint-1", "step": 30, "metrics": metrics},
            rd.checkpoint_path("best"),
        )
    if kind == "asr":
        torch.save(
            {"format": "bbem-checkpoint-1", "step": 20, "metrics": {"wer": 0.7}},
            rd.checkpoint_path("best"),
        )
    return rd.path


def test_em_run_report(tmp_path):
    run = _run_dir(tmp_path, "em")
    s = make_report(run)
    rep = run / "report"
    for name in ("curves", "pr_curve", "on_rates", "balance", "density"):
        png = rep / f"{name}.png"
        assert png.read_bytes()[:4] == b"\x89PNG", name
        assert png.stat().st_size > 10_000, name
    on_disk = json.loads((rep / "summary.json").read_text())
    assert on_disk["steps"] == 30
    assert s["steps"] == 30
    assert on_disk["notes"] == []
    assert on_disk["best_of_columns"]["val_pr_auc"] == {
        "value": pytest.approx(0.4),
        "step": 30,
        "higher_is_better": True,
    }
    assert "val_threshold_best" not in on_disk["best_of_columns"]
    assert on_disk["final"]["val_threshold_best"] == pytest.approx(0.6)
    assert on_disk["best_checkpoint"]["step"] == 30
    assert 0 < on_disk["best_checkpoint"]["pr_auc"] < 1
    bb = on_disk["bb"]
    # the on-rates were put on the line exactly (up to bb.csv's 6 decimals)
    assert bb["net_balance"]["slope"] == pytest.approx(BETA, abs=1e-3)
    assert bb["net_balance"]["intercept"] == pytest.approx(C, abs=1e-3)
    assert bb["net_balance"]["r2"] == pytest.approx(1.0, abs=1e-6)
    assert set(bb["layers"]) == {"model.0.conv", "model.1.submodule.conv"}
    layer = bb["layers"]["model.0.conv"]
    assert layer["units"] == 8
    assert layer["full_fan"] == 4
    assert 0 < layer["density"] <= 1
    # density = kept edges / edges, recomputed from bb.csv by hand
    import csv

    with (run / "bb.csv").open() as f:
        last = [r for r in csv.DictReader(f) if r["step"] == "30" and r["layer"] == "model.0.conv"]
    assert layer["density"] == pytest.approx(sum(int(r["degree"]) for r in last) / (8 * 4))
    # per-layer density over steps, against a plain loop over bb.csv rows
    from bbem.report import layer_density
    from bbem.rundir import read_bb_table

    bbd = read_bb_table(run / "bb.csv")
    steps, layers, dens = layer_density(bbd)
    assert layers == ["model.0.conv", "model.1.submodule.conv"]
    assert list(steps) == [0, 10, 20, 30]
    with (run / "bb.csv").open() as f:
        rows = list(csv.DictReader(f))
    for i, name in enumerate(layers):
        for j, st in enumerate(steps):
            sel = [r for r in rows if r["layer"] == name and float(r["step"]) == st]
            ref = sum(int(r["degree"]) for r in sel) / sum(int(r["full_fan"]) for r in sel)
            assert dens[i, j] == pytest.approx(ref)
    assert dens[:, 0].tolist() == [1.0, 1.0]  # step 0 is dense
    # the first step's on-rates were random: a poor fit there
    assert bb["net_balance_first"]["r2"] is None or bb["net_balance_first"]["r2"] < 0.9


def test_dense_run_skips_bb_plots_and_says_so(tmp_path):
    run = _run_dir(tmp_path, "dense")
    s = make_report(run)
    assert s["bb"] is None
    assert s["method"] == "dense"
    assert any("dense" in n for n in s["notes"])
    assert any("best.pt" in n for n in s["notes"])
    assert sorted(p.name for p in (run / "report").glob("*.png")) == ["curves.png"]


def test_companion_run_with_other_columns(tmp_path, capsys):
    from bbem.cli import main

    run = _run_dir(tmp_path, "asr")
    assert main(["report", str(run)]) == 0
    s = json.loads((run / "report" / "summary.json").read_text())
    wer = s["best_of_columns"]["val_wer"]
    assert wer["higher_is_better"] is False
    assert wer["step"] == 30
    assert s["best_checkpoint"] == {"step": 20, "wer": 0.7}
    assert any("PR curve" in n for n in s["notes"])
    assert (run / "report" / "balance.png").is_file()
    assert "wrote" in capsys.readouterr().out


def test_report_of_real_bb_run(tmp_path):
    """bb.csv written from a real attach_bb on a tiny conv net (the format training writes)."""
    from bbem.bb import BBConfig, attach_bb

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv3d(1, 6, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv3d(6, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv3d(8, 1, 1),
    )
    bb = attach_bb(net, BBConfig(density=0.5, refresh_every=2), layers=(torch.nn.Conv3d,))
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    rd = RunDir.create(tmp_path / "real", {"name": "real", "bb": {"method": "bb", "density": 0.5}})
    for step in range(1, 7):
        loss = net(torch.randn(2, 1, 4, 8, 8)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        bb.step()
        if step % 3 == 0:
            rd.append_metrics(
                {
                    "step": step,
                    "time_s": step,
                    "train_loss": loss.item(),
                    "density": bb.summary()["density"],
                }
            )
            rd.append_bb(step, bb)
    s = make_report(rd.path)
    assert s["bb"]["layers"]
    assert s["bb"]["last_step"] == 6
    assert {"on_rates", "balance", "density", "curves"} <= set(s["plots"])


def test_not_a_run_dir_is_a_user_error(tmp_path, capsys):
    from bbem.cli import main

    with pytest.raises(UserError, match="not a run directory"):
        make_report(tmp_path)
    assert main(["report", str(tmp_path)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
