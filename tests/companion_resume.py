"""The exact-resume check both companion tasks share."""

from __future__ import annotations

import csv
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from bbem.cli import main


def check_exact_resume(
    module: ModuleType, command: str, cfg: dict[str, Any], tmp_path: Path, monkeypatch
) -> None:
    """Killed at step 5 (checkpoints every 3) and resumed with ``bbem COMMAND --resume``, a
    run writes the metrics, BB rows and weights an unbroken run writes."""
    module.run(cfg, tmp_path / "whole")
    make_task = module.make_task

    def crashing(c, **kw):
        task = make_task(c, **kw)
        calls = iter(range(1, 10**6))

        loss = task.loss

        def crash_at_5(m, batch):
            if next(calls) == 5:
                raise KeyboardInterrupt
            return loss(m, batch)

        task.loss = crash_at_5  # this instance only
        return task

    monkeypatch.setattr(module, "make_task", crashing)
    with pytest.raises(KeyboardInterrupt):
        module.run(cfg, tmp_path / "broken")
    monkeypatch.setattr(module, "make_task", make_task)
    assert main([command, "--resume", str(tmp_path / "broken")]) == 0

    def table(run: str, name: str) -> list[dict[str, str]]:
        with (tmp_path / run / name).open() as f:
            return [{k: v for k, v in r.items() if k != "time_s"} for r in csv.DictReader(f)]

    for name in ("metrics.csv", "bb.csv"):
        assert table("broken", name) == table("whole", name)
    a = torch.load(tmp_path / "whole/checkpoints/last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "broken/checkpoints/last.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # A finished run, or a config given as well: one line, exit 2.
    assert main([command, "--resume", str(tmp_path / "broken")]) == 2
    assert main([command, "x.yaml", "--resume", str(tmp_path / "broken")]) == 2
    # A corrupt last checkpoint: one line, exit 2.
    (tmp_path / "broken/checkpoints/last.pt").write_bytes(b"not a checkpoint")
    assert main([command, "--resume", str(tmp_path / "broken")]) == 2
