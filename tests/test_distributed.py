"""Training on several processes: torchrun and ``bbem train --nproc``, 2 gloo processes on the CPU.

The hooks in tests/ddp_site/sitecustomize.py let a rank dump what it holds, kill itself at a
given step, or train on its slice of a one-process run's batches.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from tiny_em import tiny_config, tiny_volumes

from bbem import distributed as ddp
from bbem.cli import main as cli_main
from bbem.config import load_config
from bbem.engine import stream_seed
from bbem.errors import UserError
from bbem.train import train

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch without gloo"
)

SITE = Path(__file__).resolve().parent / "ddp_site"


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> Path:
    return tiny_volumes(tmp_path_factory.mktemp("vols"))


def _config(volumes: Path, path: Path, **sections: dict) -> Path:
    bb = {"method": "bb", "mode": "in", "density": 0.5, "refresh_every": 2}
    return tiny_config(volumes, path, bb=bb, **sections)


def _run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """``python ARGS`` with the test hooks on the path and ``BBEM_TEST_*`` from ``env``."""
    path = os.pathsep.join([str(SITE), *filter(None, [os.environ.get("PYTHONPATH")])])
    full = {**os.environ, "PYTHONPATH": path, **{f"BBEM_TEST_{k}": v for k, v in env.items()}}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        full.pop(k, None)
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=full, capture_output=True, text=True, timeout=300
    )


def _torchrun(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    return _run([*launcher, "-m", "bbem", *args], cwd, **env)


def _ok(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 0, r.stderr[-3000:]


def _rows(path: Path, drop: str = "time_s") -> list[dict[str, str]]:
    with open(path) as f:
        return [{k: v for k, v in r.items() if k != drop} for r in csv.DictReader(f)]


def _equal_states(a, b) -> None:
    """Two nested state dicts hold the same values (tensors bit for bit)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _equal_states(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _equal_states(x, y)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


@pytest.fixture(scope="module")
def unbroken(volumes, tmp_path_factory) -> Path:
    """A 2-process run by `torchrun -m bbem train` (no --run-dir: rank 0 names it), each rank
    dumping what it holds at the end."""
    home = tmp_path_factory.mktemp("unbroken")
    cfg = _config(volumes, home / "tiny.yaml")
    _ok(_torchrun(["train", str(cfg)], home, DUMP=str(home)))
    (run,) = (home / "runs").iterdir()
    return run


def test_ranks_hold_the_same_masks_weights_and_moments(unbroken):
    r0 = torch.load(unbroken.parent.parent / "rank0.pt", weights_only=False)
    r1 = torch.load(unbroken.parent.parent / "rank1.pt", weights_only=False)
    _equal_states(r0, r1)  # weights, BB masks, scales and on-rate EMAs, optimiser moments
    layers = r0["bb"]["layers"].values()
    assert r0["bb"]["refreshes"] > 0
    assert all(0 < float(s["mask"].mean()) < 1 for s in layers)  # masks were refreshed
    assert any(not torch.allclose(s["on_rate"], torch.full_like(s["on_rate"], 0.5)) for s in layers)
    last = torch.load(unbroken / "checkpoints/last.pt", weights_only=False)
    _equal_states(last["model"], r0["model"])  # rank 0 wrote what every rank holds
    assert last["world_size"] == 2
    streams = [r["numpy"] for r in last["rng_ranks"]]
    assert streams[0] != streams[1]  # each rank draws its own
    # rank 0 alone wrote the run directory: one run, one log, each evaluation once
    assert [p.name for p in (unbroken.parent).iterdir()] == [unbroken.name]
    assert sorted(p.name for p in unbroken.iterdir()) == [
        "bb.csv",
        "checkpoints",
        "config.yaml",
        "loss.csv",
        "metrics.csv",
        "train.log",
    ]
    assert (unbroken / "train.log").read_text().count("training train on cpu") == 1
    assert [r["step"] for r in _rows(unbroken / "metrics.csv")] == ["3", "6"]
    assert [r["step"] for r in _rows(unbroken / "loss.csv")] == [str(s) for s in range(1, 7)]


def test_two_processes_match_one_process_with_twice_the_batch(volumes, tmp_path):
    """Rank r trains on samples r::2 of the batches of 4 a one-process run draws (the SLICE
    hook). With the mean BCE loss (Dice over a batch does not split into halves) and SGD (Adam
    would hide a gradient scaled by 2), the averaged gradients equal the one-process gradient,
    so the loss curves, BB rows and weights agree to float rounding."""
    plain = {"dice_weight": 0.0, "bce_weight": 1.0}
    cfg = _config(volumes, tmp_path / "tiny.yaml", loss=plain, optim={"name": "sgd", "lr": 0.5})
    train(load_config(cfg, ["data.batch_size=4"]), run_dir=tmp_path / "one", progress=False)
    args = ["-m", "bbem", "train", str(cfg), "--run-dir", str(tmp_path / "two"), "--nproc", "2"]
    _ok(_run(args, tmp_path, SLICE="1"))

    one, two = _rows(tmp_path / "one/loss.csv"), _rows(tmp_path / "two/loss.csv")
    assert [r["step"] for r in two] == [r["step"] for r in one] == [str(s) for s in range(1, 7)]
    loss1, loss2 = ([float(r["loss"]) for r in rows] for rows in (one, two))
    assert loss1[-1] < loss1[0] - 0.01  # it learns, so a wrong step size would show
    assert loss2 == pytest.approx(loss1, rel=1e-4, abs=1e-5)
    b1, b2 = _rows(tmp_path / "one/bb.csv"), _rows(tmp_path / "two/bb.csv")
    assert [r["degree"] for r in b2] == [r["degree"] for r in b1]  # the same masks
    on1, on2 = ([float(r["on_rate"]) for r in rows] for rows in (b1, b2))
    assert on2 == pytest.approx(on1, abs=1e-5)
    w1, w2 = (
        torch.load(tmp_path / run / "checkpoints/last.pt", weights_only=False)["model"]
        for run in ("one", "two")
    )
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)


def test_kill_a_rank_then_resume_matches_an_unbroken_run(unbroken, tmp_path):
    cfg = unbroken / "config.yaml"
    run = tmp_path / "killed"
    r = _torchrun(["train", str(cfg), "--run-dir", str(run)], tmp_path, KILL="1:5")
    assert r.returncode != 0  # rank 1 died as it began step 6
    last = torch.load(run / "checkpoints/last.pt", weights_only=False)
    assert last["step"] == 4
    _ok(_run(["-m", "bbem", "train", "--resume", str(run), "--nproc", "2"], tmp_path))

    for name in ("metrics.csv", "loss.csv", "bb.csv"):
        assert _rows(run / name) == _rows(unbroken / name), name
    a, b = (torch.load(p / "checkpoints/last.pt", weights_only=False) for p in (unbroken, run))
    _equal_states(a["model"], b["model"])
    _equal_states(a["bb"], b["bb"])


def test_resuming_on_another_number_of_processes_is_refused(unbroken, tmp_path, capsys):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(unbroken, run)
    ck = torch.load(run / "checkpoints/last.pt", weights_only=False)
    torch.save({**ck, "step": 4}, run / "checkpoints/last.pt")  # as if killed at step 4
    assert cli_main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "trained on 2 process(es)" in err
    assert "--nproc 2" in err


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--nproc", "0"], {}, "--nproc must be at least 1, got 0"),
        (["--nproc", "-3"], {}, "--nproc must be at least 1"),
        (["--nproc", "2"], {"WORLD_SIZE": "2", "RANK": "0"}, "drop it when running under torchrun"),
        (["--nproc", "2", "--set", "bb.densty=0.5"], {}, "did you mean"),
    ],
)
def test_nproc_mistakes_are_one_line(volumes, tmp_path, capsys, monkeypatch, args, env, message):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    cfg = _config(volumes, tmp_path / "tiny.yaml")
    assert cli_main(["train", str(cfg), "--run-dir", str(tmp_path / "r"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("bbem train: error: ")
    assert message in err
    assert not (tmp_path / "r").exists()


def test_nproc_into_an_existing_run_is_one_line_before_any_launch(volumes, tmp_path, capsys):
    cfg = _config(volumes, tmp_path / "tiny.yaml")
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "x").write_text("")
    assert cli_main(["train", str(cfg), "--run-dir", str(tmp_path / "r"), "--nproc", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "--resume" in err


def test_rank_streams_and_environment():
    assert stream_seed(7, 4, rank=0) == stream_seed(7, 4)  # rank 0 draws the one-process stream
    seeds = {stream_seed(7, 4, rank=r) for r in range(4)}
    assert len(seeds) == 4
    assert ddp.from_env({}) == ddp.Group()  # no torchrun: one process, as before
    assert ddp.from_env({"WORLD_SIZE": "1", "RANK": "0"}) == ddp.Group()
    g = ddp.from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (g.rank, g.size, g.local_rank, g.local_size, g.on, g.main) == (3, 4, 1, 2, True, False)
    with pytest.raises(UserError, match="RANK"):
        ddp.from_env({"WORLD_SIZE": "2"})
    with pytest.raises(UserError, match="outside"):
        ddp.from_env({"WORLD_SIZE": "2", "RANK": "2"})
