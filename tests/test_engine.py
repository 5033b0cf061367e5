"""The training engine on a tiny regression task with no EM: the schedule, the refusal of a
diverged step, best.pt for higher- and lower-is-better scores, the thread count, exact resume."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bbem import engine
from bbem.engine import Evaluation, Task, fit, lr_factor
from bbem.errors import UserError


class Tiny(Task):
    """``y = x @ w`` from noisy samples, through a ReLU MLP with dropout (so the global torch RNG
    matters) and BB on both linear layers. ``scores`` scripts the evaluation."""

    name = "tiny"
    score_name = "val_score"
    bb_layers = (nn.Linear,)

    def __init__(self, cfg: dict, higher: bool = True, scores=None, nan_at=None, crash_at=None):
        self.hidden = int(cfg["model"]["hidden"])
        self.higher_is_better = higher
        self.scores = list(scores or [])
        self.nan_at, self.crash_at = nan_at, crash_at
        self.calls = 0
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}  # weights at each evaluation
        self.before_nan: dict[str, torch.Tensor] | None = None
        self.w = torch.linspace(-1, 1, 4)[:, None]
        self.val_x = torch.randn(64, 4, generator=torch.Generator().manual_seed(99))

    def build_model(self) -> nn.Module:
        self.model = nn.Sequential(
            nn.Linear(4, self.hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(self.hidden, 1)
        )
        return self.model

    def batches(self, step: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        while True:
            x = torch.randn(8, 4, generator=g)
            yield x, x @ self.w + 0.1 * torch.randn(8, 1, generator=g)

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.crash_at:
            raise KeyboardInterrupt
        x, y = batch
        loss = F.mse_loss(model(x), y)
        if self.calls == self.nan_at:
            self.before_nan = _weights(model)
            return loss * math.nan
        return loss

    def evaluate(self, model: nn.Module) -> Evaluation:
        mse = float(F.mse_loss(model(self.val_x), self.val_x @ self.w))
        step = len(self.snapshots)
        self.snapshots[step] = _weights(model)
        score = self.scores[step] if step < len(self.scores) else mse
        return Evaluation({"val_mse": mse, "val_score": score})


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _cfg(**train) -> dict:
    return {
        "model": {"hidden": 16},
        "bb": {"method": "bb", "density": 0.5, "refresh_every": 2},
        "optim": {"lr": 0.02, "weight_decay": 0.0, "warmup_steps": 2, "grad_clip": 1.0},
        "train": {
            "steps": 9,
            "eval_every": 3,
            "checkpoint_every": 3,
            "log_every": 1,
            "seed": 0,
            "device": "cpu",
            "threads": 1,
            **train,
        },
    }


def _table(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return [{k: v for k, v in r.items() if k != "time_s"} for r in csv.DictReader(f)]


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=False)


def test_schedule_warms_up_then_decays_to_zero(tmp_path):
    assert [lr_factor(s, 4, 12) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 4, 12) == 1.0  # the cosine starts at the top
    assert lr_factor(8, 4, 12) == pytest.approx(0.5)
    assert lr_factor(12, 4, 12) == pytest.approx(0.0, abs=1e-12)  # no floor
    assert lr_factor(30, 4, 12) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(8, 4, 12, "constant") == 1.0
    assert lr_factor(1, 4, 12, "constant") == 0.5
    assert lr_factor(12, 4, 12, floor=0.05) == pytest.approx(0.05)  # a floor where asked for
    assert lr_factor(8, 4, 12, floor=0.05) == pytest.approx(0.05 + 0.95 * 0.5)
    assert lr_factor(1, 4, 12, floor=0.05) == 0.5  # warm-up ignores it
    # the run follows the rule: loss.csv's lr after step s is the rate of step s (0-based)
    cfg = _cfg()
    fit(Tiny(cfg), cfg, tmp_path / "run", progress=False)
    rows = _table(tmp_path / "run" / "loss.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 10))
    for r in rows:
        want = 0.02 * lr_factor(int(r["step"]), 2, 9)
        assert float(r["lr"]) == pytest.approx(want, abs=1e-12)


def test_a_diverged_step_never_reaches_the_weights(tmp_path):
    cfg = _cfg()
    task = Tiny(cfg, nan_at=5)
    with pytest.raises(UserError, match="diverged at step 5"):
        fit(task, cfg, tmp_path / "run", progress=False)
    after = _weights(task.model)
    assert all(torch.equal(after[k], task.before_nan[k]) for k in after)
    assert _load(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 3
    assert [r["step"] for r in _table(tmp_path / "run" / "loss.csv")] == ["1", "2", "3", "4"]


@pytest.mark.parametrize("higher", [True, False], ids=["higher", "lower"])
def test_best_checkpoint_follows_the_score_direction(tmp_path, higher):
    cfg = _cfg(steps=12)
    task = Tiny(cfg, higher=higher, scores=[0.5, 0.2, 0.9, 0.4])
    out = fit(task, cfg, tmp_path / "run", progress=False)
    step, score = (9, 0.9) if higher else (6, 0.2)
    rows = _table(tmp_path / "run" / "metrics.csv")
    assert [float(r["val_score"]) for r in rows] == [0.5, 0.2, 0.9, 0.4]
    assert (out["best_step"], out["best_score"]) == (step, score)
    best = _load(tmp_path / "run" / "checkpoints" / "best.pt")
    assert (best["step"], best["best_score"]) == (step, score)
    assert best["metrics"]["val_score"] == score
    held = task.snapshots[step // 3 - 1]  # the weights evaluated at that step
    assert all(torch.equal(best["model"][k], held[k]) for k in held)


def test_thread_count_is_restored_on_return_and_on_error(tmp_path):
    before = torch.get_num_threads()
    seen = []
    try:
        torch.set_num_threads(1)
        cfg = _cfg(threads=2, steps=3)
        task = Tiny(cfg)
        evaluate = task.evaluate
        task.evaluate = lambda m: seen.append(torch.get_num_threads()) or evaluate(m)
        fit(task, cfg, tmp_path / "a", progress=False)
        assert seen == [2]
        assert torch.get_num_threads() == 1
        cfg = _cfg(threads=2)
        with pytest.raises(UserError):
            fit(Tiny(cfg, nan_at=2), cfg, tmp_path / "b", progress=False)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_resume_after_a_crash_equals_an_unbroken_run(tmp_path, monkeypatch):
    cfg = _cfg()
    fit(Tiny(cfg), cfg, tmp_path / "whole", progress=False)
    with pytest.raises(KeyboardInterrupt):
        fit(Tiny(cfg, crash_at=5), cfg, tmp_path / "broken", progress=False)
    assert _load(tmp_path / "broken" / "checkpoints" / "last.pt")["step"] == 3
    fit(Tiny(cfg), cfg, tmp_path / "broken", resume=True, progress=False)
    for name in ("metrics.csv", "loss.csv", "bb.csv"):
        assert _table(tmp_path / "broken" / name) == _table(tmp_path / "whole" / name), name
    for ck in ("last", "best"):
        a = _load(tmp_path / "whole" / "checkpoints" / f"{ck}.pt")
        b = _load(tmp_path / "broken" / "checkpoints" / f"{ck}.pt")
        assert a["step"] == b["step"]
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    with pytest.raises(UserError, match="already finished"):
        fit(Tiny(cfg), cfg, tmp_path / "broken", resume=True, progress=False)

    # the check can fail: without the RNG restore, dropout draws differ after the resume
    with pytest.raises(KeyboardInterrupt):
        fit(Tiny(cfg, crash_at=5), cfg, tmp_path / "mutant", progress=False)
    monkeypatch.setattr(engine, "set_rng_state", lambda s: None)
    fit(Tiny(cfg), cfg, tmp_path / "mutant", resume=True, progress=False)
    assert _table(tmp_path / "mutant" / "loss.csv") != _table(tmp_path / "whole" / "loss.csv")


def test_resume_with_another_model_names_what_changed(tmp_path):
    cfg = _cfg(steps=6)
    with pytest.raises(KeyboardInterrupt):
        fit(Tiny(cfg, crash_at=5), cfg, tmp_path / "run", progress=False)
    cfg["model"]["hidden"] = 8
    with pytest.raises(UserError, match=r"does not fit.*model\.hidden changed"):
        fit(Tiny(cfg), cfg, tmp_path / "run", resume=True, progress=False)


def test_checkpoints_from_before_the_engine_keep_their_best():
    saved = engine._saved_best
    assert saved({"best": 0.42}, higher=True) == 0.42  # the EM loop: PR-AUC
    assert saved({"best_val": -0.8}, higher=True) == 0.8  # companions stored -score for max
    assert saved({"best_val": 0.3}, higher=False) == 0.3
    assert saved({"best_val": math.inf}, higher=False) is None  # no evaluation yet
    assert saved({"best_score": None}, higher=True) is None


@pytest.mark.parametrize(
    ("section", "key", "value", "match"),
    [
        ("train", "steps", 0, "train.steps"),
        ("train", "eval_every", 0, "train.eval_every"),
        ("optim", "name", "lbfgs", "optim.name"),
        ("optim", "schedule", "step", "optim.schedule"),
        ("optim", "lr_floor", 1.0, "optim.lr_floor"),
        ("bb", "density", 2.0, "bb section"),
    ],
)
def test_bad_settings_are_user_errors_before_any_folder(tmp_path, section, key, value, match):
    cfg = _cfg()
    cfg[section][key] = value
    with pytest.raises(UserError, match=match):
        fit(Tiny(cfg), cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_engine_and_companions_import_no_em_code():
    em = ("bbem.train", "bbem.data", "bbem.infer", "bbem.volumes", "bbem.model", "bbem.config")
    em += ("bbem.metrics", "bbem.synth", "bbem.architecture", "monai")
    code = (
        "import sys, bbem.engine, bbem.companions.asr, bbem.companions.faceid\n"
        f"em = {em!r}\n"
        "print([m for m in sys.modules if m in em or m.startswith(tuple(e + '.' for e in em))])"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"
