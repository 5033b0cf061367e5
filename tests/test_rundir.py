import pytest
import torch

from bbem.errors import UserError
from bbem.rundir import BB_COLUMNS, RunDir, bb_rows


class _FakeBB:
    """Stands in for bbem.bb's stats() contract so rundir is tested on its own."""

    def stats(self):
        return {
            "conv1": {
                "mode": "in",
                "on_rate": torch.tensor([0.2, 0.8]),
                "fan_in": torch.tensor([3, 1]),
                "fan_out": torch.tensor([2, 2, 0, 0]),
                "full_fan": 4,
            },
            "conv2": {
                "mode": "out",
                "on_rate": torch.tensor([0.5, 0.1, 0.9]),
                "fan_in": torch.tensor([1, 2]),
                "fan_out": torch.tensor([1, 2, 0]),
            },
        }


def test_create_writes_config_and_refuses_nonempty(tmp_path):
    rd = RunDir.create(tmp_path / "run", {"train": {"steps": 3}, "model": {"strides": (1, 2)}})
    assert rd.config == {"train": {"steps": 3}, "model": {"strides": [1, 2]}}
    (rd.path / "x").write_text("")
    with pytest.raises(UserError, match="--resume"):
        RunDir.create(rd.path, {})
    with pytest.raises(UserError, match="not a run directory"):
        RunDir.open(tmp_path)


def test_metrics_append_widen_and_truncate(tmp_path):
    rd = RunDir.create(tmp_path / "run", {})
    rd.append_metrics({"step": 10, "train_loss": 0.5})
    rd.append_metrics({"step": 20, "train_loss": 0.4, "pr_auc": 0.3})
    rd.append_metrics({"step": 30, "train_loss": 0.3, "pr_auc": float("nan")})
    rows = rd.read_metrics()
    assert [r["step"] for r in rows] == ["10", "20", "30"]
    assert rows[0]["pr_auc"] == ""
    assert rows[1]["pr_auc"] == "0.3"
    assert rows[2]["pr_auc"] == ""
    rd.truncate_after(20)
    assert [r["step"] for r in RunDir.open(rd.path, lock=False).read_metrics()] == ["10", "20"]


def test_bb_rows_follow_the_mode(tmp_path):
    rows = bb_rows(5, _FakeBB().stats())
    assert len(rows) == 2 + 3
    assert rows[1] == {
        "step": 5,
        "layer": "conv1",
        "mode": "in",
        "unit": 1,
        "on_rate": 0.8,
        "degree": 1,
        "full_fan": 4,
        "traffic": 0.8,
    }
    # mode out: fan-out, K = C_out
    assert rows[3]["degree"] == 2
    assert rows[3]["full_fan"] == 2
    rd = RunDir.create(tmp_path / "run", {})
    rd.append_bb(5, _FakeBB())
    rd.append_bb(6, None)  # a dense run leaves the header only
    header = rd.bb_csv.read_text().splitlines()[0]
    assert header == ",".join(BB_COLUMNS)


def test_half_written_row_is_dropped(tmp_path):
    rd = RunDir.create(tmp_path / "run", {})
    rd.append_metrics({"step": 1, "train_loss": 0.5, "density": 1.0})
    with rd.metrics_csv.open("a") as f:
        f.write("2,0.4")  # killed mid-row
    assert [r["step"] for r in rd.read_metrics()] == ["1"]
    rd.truncate_after(1)  # what a resume does first
    rd.append_metrics({"step": 2, "train_loss": 0.4, "density": 1.0})
    assert [r["step"] for r in rd.read_metrics()] == ["1", "2"]


def test_read_bb_table(tmp_path):
    from bbem.errors import UserError
    from bbem.rundir import read_bb_table

    p = tmp_path / "bb.csv"
    assert read_bb_table(p) is None
    p.write_text(
        "step,layer,mode,unit,on_rate,degree,full_fan,traffic\n"
        "10,a,in,0,0.25,3,8,0.75\n"
        "10,a,in,1,0.5,5,8,2.5\n"
        "20,a,in,0,0.3,"  # cut short by a kill
    )
    t = read_bb_table(p)
    assert t["step"].tolist() == [10, 10]
    assert t["degree"].dtype.kind == "i"
    assert t["on_rate"].tolist() == [0.25, 0.5]
    assert t["layer"].tolist() == ["a", "a"]
    p.write_text("step,layer,on_rate\n1,a,0.5\n")
    with pytest.raises(UserError, match="lacks columns"):
        read_bb_table(p)
