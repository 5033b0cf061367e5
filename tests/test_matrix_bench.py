"""bench/matrix.py runs a tiny matrix end to end, resumes, filters; bench/table.py's numbers."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from tiny_em import tiny_config, tiny_volumes

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import matrix  # noqa: E402
import table  # noqa: E402


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("matrix")
    steps = {"steps": 2, "eval_every": 2, "checkpoint_every": 2, "threads": 1}
    return tiny_config(tiny_volumes(d), d / "tiny.yaml", train=steps)


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_matrix_runs_writes_rows_and_resumes(config, tmp_path, monkeypatch):
    results = tmp_path / "results" / "tiny.csv"
    argv = [
        "--config", str(config), "--methods", "dense,bb_in", "--densities", "0.5",
        "--seeds", "0", "--results", str(results), "--out", str(tmp_path / "runs"),
        "--set", "bb.refresh_every=1",
    ]  # fmt: skip
    assert matrix.main(argv) == 0
    rows = _rows(results)
    with results.open() as f:
        assert next(csv.reader(f)) == list(matrix.COLUMNS)
    assert [(r["method"], r["density_target"], r["seed"]) for r in rows] == [
        ("baseline_rf", "", "0"),
        ("dense", "", "0"),
        ("bb_in", "0.5", "0"),
    ]
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    rf, dense, bb = rows
    # the baseline row is the forest's own evaluation of the same validation box
    ev = json.loads((Path(rf["run_dir"]) / "evaluation.json").read_text())
    assert float(rf["val_pr_auc"]) == pytest.approx(ev["voxel"]["pr_auc"])
    assert float(rf["object_f1_iou02"]) == pytest.approx(ev["object"]["iou_0.2"]["f1"])
    assert rf["commit"].removesuffix("-dirty") == head
    assert rf["density_achieved"] == rf["seconds_per_step"] == ""
    assert rf["config_hash"] not in (dense["config_hash"], bb["config_hash"])
    for r in (dense, bb):
        assert r["commit"].removesuffix("-dirty") == head
        assert r["steps"] == "2"
        assert "--methods dense,bb_in" in r["command"]
        assert r["machine"]
        assert r["torch"]
        for k in ("val_pr_auc", "val_pr_auc_best", "val_f1_best", "object_f1_iou02"):
            assert 0 <= float(r[k]) <= 1, k
        assert float(r["cremi_score"]) >= 0
        assert float(r["seconds_per_step"]) > 0
        assert 0 <= float(r["decorrelation"]) <= 1
    assert float(dense["density_achieved"]) == 1.0
    assert dense["entropy_mean"] == dense["balance_r2"] == ""
    assert float(bb["density_achieved"]) == pytest.approx(0.5, abs=0.05)
    assert 0 < float(bb["param_density"]) < 1
    assert 0 <= float(bb["entropy_mean"]) <= 1
    assert dense["config_hash"] != bb["config_hash"]

    # the second invocation trains nothing: every run has its row
    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(matrix, "execute", no_training)
    assert matrix.main(argv) == 0
    assert _rows(results) == rows


def test_only_filters_the_matrix(config, tmp_path, monkeypatch):
    trained: list[tuple[str, float | None, int]] = []

    def spy(run, out, command):
        trained.append((run.method.name, run.density, run.seed))
        # a row that matches no run, so every invocation sees the filtered matrix pending
        row = {"config_hash": "x", "method": run.method.name, "seed": run.seed}
        return row | {"val_pr_auc": 0.0, "object_f1_iou02": 0.0, "train_seconds": 0.0}

    monkeypatch.setattr(matrix, "execute", spy)
    base = ["--config", str(config), "--results", str(tmp_path / "r.csv"), "--seeds", "0,1"]
    base += ["--methods", "dense,bb_in,random", "--densities", "0.5,0.1"]
    matrix.main([*base, "--only", "method=random,density=0.1"])
    assert trained == [("random", 0.1, 0), ("random", 0.1, 1)]
    trained.clear()
    matrix.main([*base, "--only", "seed=1,density=0.5", "--dry-run"])
    assert trained == []  # a dry run trains nothing
    trained.clear()
    matrix.main([*base, "--only", "seed=1,density=0.5"])
    # the baseline and dense runs serve every density, so a density filter keeps them
    assert trained == [
        ("baseline_rf", None, 1), ("dense", None, 1), ("bb_in", 0.5, 1), ("random", 0.5, 1)
    ]  # fmt: skip
    trained.clear()
    matrix.main([*base, "--only", "seed=0,density=0.5", "--no-baseline"])
    assert trained == [("dense", None, 0), ("bb_in", 0.5, 0), ("random", 0.5, 0)]


def test_baseline_resume_key_reads_only_the_data_section(config, tmp_path):
    # the forest reads nothing but the boxes: a matrix at other steps or lr reuses its row
    def key(cfg: Path, *sets: str) -> str:
        return matrix.run_hash(matrix.Run(str(cfg), matrix.BASELINE, None, 0, sets))

    assert key(config) == key(config, "train.steps=7", "optim.lr=0.1", "model.dropout=0.1")
    other = yaml.safe_load(config.read_text())
    other["data"]["val"][0]["y_range"] = [0, 16]
    moved = tmp_path / "other.yaml"
    moved.write_text(yaml.safe_dump(other))
    assert key(moved) != key(config)


def test_method_specs():
    assert matrix.parse_method("bb_out").sets == ("bb.method=bb", "bb.mode=out")
    m = matrix.parse_method("noregrow=bb_in:regrow=false")
    assert m.name == "noregrow"
    assert m.sets == ("bb.method=bb", "bb.mode=in", "bb.regrow=false")
    assert matrix.parse_method("bb:probe=output").name == "bb:probe=output"
    assert matrix.parse_method("dense").dense
    with pytest.raises(SystemExit):
        matrix.parse_only("steps=3")


def _write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, matrix.COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


#: PR-AUC per (method, density) over seeds 0, 1, 2
SCORES = {
    ("dense", ""): [0.60, 0.62, 0.64],
    ("bb_in", "0.5"): [0.50, 0.52, 0.54],  # vs magnitude: +0.21, sds 0.02 and 0.01: a win
    ("magnitude", "0.5"): [0.30, 0.31, 0.32],
    ("bb_in", "0.1"): [0.20, 0.30, 0.40],  # vs magnitude: +0.03 within sd 0.1: a tie
    ("magnitude", "0.1"): [0.25, 0.27, 0.29],
    ("baseline_rf", ""): [0.40, 0.41, 0.42],  # bb_in at 0.5 vs it: +0.11, a win
    ("noregrow", "0.1"): [0.10, 0.11, 0.12],  # a named ablation is called too: -0.16, a loss
    # 0.01 under magnitude at every seed: a tie of the means (sds 0.02) but a paired loss
    ("bb_out", "0.1"): [0.24, 0.26, 0.28],
}


def test_table_means_sds_calls_and_plot(tmp_path):
    rows = [
        {"config": "c.yaml", "method": m, "density_target": d, "seed": s, "val_pr_auc": v,
         "object_f1_iou02": v / 2, "steps": 9, "commit": "abc", "machine": "m"}
        for (m, d), vs in SCORES.items()
        for s, v in enumerate(vs)
    ]  # fmt: skip
    # seeds 5 and 6 have no magnitude run: no pairs, the means and sds decide (a tie)
    rows += [
        {"config": "c.yaml", "method": "spread4", "density_target": "0.1", "seed": s,
         "val_pr_auc": v, "steps": 9, "commit": "abc", "machine": "m"}
        for s, v in ((5, 0.26), (6, 0.30))
    ]  # fmt: skip
    path = _write_csv(tmp_path / "r.csv", rows)
    md_path, png = tmp_path / "t.md", tmp_path / "t.png"
    assert table.main([str(path), "--md", str(md_path), "--png", str(png)]) == 0
    md = md_path.read_text()
    for (m, d), vs in SCORES.items():
        mean, sd = np.mean(vs), np.std(vs, ddof=1)
        line = next(x for x in md.splitlines() if x.startswith(f"| {m} | {d or 'all'} |"))
        assert line.split(" | ")[2] == f"{mean:.3f} ± {sd:.3f}"
        o = np.array(vs) / 2
        assert line.split(" | ")[4] == f"{o.mean():.3f} ± {o.std(ddof=1):.3f}"
    calls = {tuple(x.split(" | ")[:2]): x for x in md.splitlines() if "vs" not in x}
    assert "win (+0.210, paired sd 0.010, 3 seeds)" in calls[("| 0.5", "bb_in")]
    assert "tie (+0.030, paired sd 0.080, 3 seeds)" in calls[("| 0.1", "bb_in")]
    # vs baseline
    assert calls[("| 0.5", "bb_in")].endswith("win (+0.110, paired sd 0.010, 3 seeds) |")
    assert "loss (-0.160, paired sd 0.010, 3 seeds)" in calls[("| 0.1", "noregrow")]
    assert "loss (-0.010, paired sd 0.000, 3 seeds)" in calls[("| 0.1", "bb_out")]
    assert table.call([0.24, 0.26, 0.28], [0.25, 0.27, 0.29]).startswith("tie")
    assert "tie (+0.010, sd 0.028)" in calls[("| 0.1", "spread4")]
    assert ("| 0.1", "magnitude") not in calls  # the rivals are columns, not rows
    assert "per-seed differences" in md
    assert "larger of the two seed standard deviations" in md
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_one_seed_makes_no_call():
    assert table.call([0.9], [0.1, 0.2]) == "one seed: no call"
    assert table.call([0.9, 0.8], [0.1, 0.2]).startswith("win")
    assert table.call([0.1, 0.2], [0.9, 0.8]).startswith("loss")


def test_config_hash_does_not_depend_on_the_checkout(tmp_path: Path, monkeypatch):
    # load_config makes data.root absolute (the working directory): a committed row must
    # still be found from another clone
    import matrix

    from bbem.config import load_config

    config = Path("configs/bench/real_bb.yaml").resolve()
    hashes = set()
    for where in (tmp_path / "a", tmp_path / "b"):
        where.mkdir()
        monkeypatch.chdir(where)
        hashes.add(matrix.config_hash(load_config(config, ["train.seed=0"]), dense=True))
    assert len(hashes) == 1


def test_committed_rows_are_found(tmp_path: Path):
    # a key added to the config later (at its default) must not orphan the committed rows
    results = REPO / "bench" / "results" / "vnc-1500.csv"
    config = str(REPO / "configs" / "bench" / "real_bb.yaml")
    # bb.spread's default moved (0.5 of K -> 1.0 of the mean degree): rows that never read it
    # stay found
    methods = [matrix.parse_method(m) for m in ("dense", "bb_tiers", "magnitude", "random")]
    runs = matrix.plan(config, methods, [0.1], [0, 1], ["train.steps=1500"], {})
    assert len(runs) == 8
    assert matrix.pending(runs, results) == []
    # and a changed key is a new run
    tiers = [r for r in runs if r.method.name == "bb_tiers"][:1]
    other = [
        matrix.Run(r.config, r.method, r.density, r.seed, (*r.overrides, "bb.dens_busy=0.2"))
        for r in tiers
    ]
    assert matrix.pending(other, results) == other


def test_a_row_of_the_old_bb_rule_is_not_taken_for_the_new():
    # the committed bb_in_K rows ran with spread 0.5 of K; bb.spread=0.5 now means half the
    # mean degree, the same config text: only the rule's mark in the hash tells them apart
    results = REPO / "bench" / "results" / "vnc-1500.csv"
    config = str(REPO / "configs" / "bench" / "real_bb.yaml")
    old = [r for r in matrix.read_rows(results) if r["method"] == "bb_in_K"]
    assert old
    spec = matrix.parse_method("bb_in_K=bb_in:spread=0.5")
    runs = matrix.plan(config, [spec], [0.1], [0, 1], ["train.steps=1500"], {})
    keys = {matrix.row_key(r) for r in old}
    for run in runs:
        key = (matrix.run_hash(run), "bb_in_K", "0.1", str(run.seed))
        assert key not in keys
    assert {(k[1], k[2], k[3]) for k in keys} >= {("bb_in_K", "0.1", "0"), ("bb_in_K", "0.1", "1")}
    assert matrix.pending(runs, results) == runs


def test_appending_results_does_not_mark_the_commit_dirty(tmp_path: Path, monkeypatch):
    # the results CSV is tracked and the matrix appends to it: only other changes are "dirty"
    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "results" / "r.csv").write_text("a\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", ".")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init")
    monkeypatch.setattr(matrix, "REPO", tmp_path)
    assert not matrix.git_commit().endswith("-dirty")
    (tmp_path / "bench" / "results" / "r.csv").write_text("a\n1\n")
    assert not matrix.git_commit().endswith("-dirty")
    (tmp_path / "code.py").write_text("x = 2\n")
    assert matrix.git_commit().endswith("-dirty")


def test_companion_matrix_rows_and_table(tmp_path: Path, monkeypatch):
    """A companion config runs through the same matrix: its own scores, resume, its table."""
    monkeypatch.chdir(tmp_path)  # the face cache goes under data/ here
    cfg = {
        "task": "faceid",
        "data": {"n_known": 12, "train_per_id": 4, "test_per_id": 2, "n_unseen": 6,
                 "unseen_per_id": 3, "size": 24, "real_check": False},
        "model": {"width": 8, "stages": [[8, 16, 1, 2]], "embed": 16},
        "bb": {"warmup_steps": 2, "ramp_steps": 2, "refresh_every": 1},
        "optim": {"batch_size": 16, "warmup_steps": 1},
        "train": {"steps": 4, "eval_every": 4, "checkpoint_every": 4, "threads": 1},
    }  # fmt: skip
    path = tmp_path / "face.yaml"
    path.write_text(yaml.safe_dump(cfg))
    results = tmp_path / "face.csv"
    argv = ["--config", str(path), "--methods", "dense,bb,magnitude", "--densities", "0.5",
            "--seeds", "0,1", "--results", str(results), "--out", str(tmp_path / "runs")]  # fmt: skip
    assert matrix.main(argv) == 0
    rows = _rows(results)
    with results.open() as f:
        assert next(csv.reader(f)) == list(matrix.columns("faceid"))
    # no forest row: it is the EM pixel classifier
    assert [(r["method"], r["seed"]) for r in rows] == [
        ("dense", "0"), ("bb", "0"), ("magnitude", "0"),
        ("dense", "1"), ("bb", "1"), ("magnitude", "1"),
    ]  # fmt: skip
    for r in rows:
        assert r["task"] == "faceid"
        last = _rows(Path(r["run_dir"]) / "metrics.csv")[-1]
        assert float(r["val_top1"]) == pytest.approx(float(last["val_top1"]))
        assert float(r["val_tar_far1e-3"]) == pytest.approx(float(last["val_tar_far1e-3"]))
    assert float(rows[1]["density_achieved"]) == pytest.approx(0.5, abs=0.02)
    assert matrix.main(argv) == 0  # resumed: nothing left to train
    assert len(_rows(results)) == 6
    md = table.markdown(table.read([results]))
    assert "| top-1 | ROC AUC (unseen ids) | TAR @ FAR 1e-2 | TAR @ FAR 1e-3 |" in md
    assert "baseline_rf" not in md
    png = table.plot(table.read([results]), tmp_path / "face.png")
    assert png.stat().st_size > 0
    with pytest.raises(SystemExit, match="EM pixel classifier"):
        matrix.main([*argv, "--methods", "baseline_rf,dense"])


def test_table_calls_follow_the_tasks_direction():
    # word error rate: lower is better, so the lower mean wins
    assert table.call([0.30, 0.32], [0.50, 0.52], higher_is_better=False).startswith("win")
    assert table.call([0.50, 0.52], [0.30, 0.32], higher_is_better=False).startswith("loss")
    rows = [{"method": "bb", "density_target": "0.1", "seed": "0", "val_wer": "0.3",
             "task": "asr"}, {"method": "dense", "density_target": "", "seed": "0",
             "val_wer": "0.3"}]  # fmt: skip
    with pytest.raises(SystemExit, match="one task per table"):
        table.task_view(rows)


def test_a_bad_config_is_one_line_and_exit_2(tmp_path: Path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: [\n")
    for config in (tmp_path / "missing.yaml", bad):
        argv = ["--config", str(config), "--results", str(tmp_path / "r.csv"), "--dry-run"]
        assert matrix.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: config file")
        assert err.count("\n") == 1
    assert not (tmp_path / "r.csv").exists()


def test_paired_call_needs_three_shared_seeds():
    def rows(vs):
        return [{"seed": str(s), "val_pr_auc": str(v)} for s, v in enumerate(vs)]

    # 0.01 under the rival at every seed: a loss with three seeds, a tie of the means with two
    assert (
        table.paired_call(rows([0.24, 0.26, 0.28]), rows([0.25, 0.27, 0.29]), "val_pr_auc")[:4]
        == "loss"
    )
    two = table.paired_call(rows([0.24, 0.26]), rows([0.25, 0.27]), "val_pr_auc")
    assert two == "tie (-0.010, sd 0.014)"
    # lower is better (WER): the same differences are a win
    assert table.paired_call(
        rows([0.24, 0.26, 0.28]), rows([0.25, 0.27, 0.29]), "val_pr_auc", higher_is_better=False
    ).startswith("win")


def test_table_rewrites_only_its_readme_section(tmp_path):
    """--section replaces the lines between its marks; the prose around stays byte for byte."""
    rows = [
        {"config": "c.yaml", "method": m, "density_target": d, "seed": s, "val_pr_auc": v,
         "steps": 9, "commit": "abc", "machine": "m"}
        for (m, d), vs in SCORES.items()
        for s, v in enumerate(vs)
    ]  # fmt: skip
    path = _write_csv(tmp_path / "r.csv", rows)
    start, end = table.marks("em")
    other = "\n".join(table.marks("other"))
    head = "# Results\n\nThe prose, kept.\n\n"
    tail = "\n\nReading: also kept.\n" + other + "\nanother section, untouched\n"
    readme = tmp_path / "README.md"
    readme.write_text(f"{head}{start}\nan old table\n| x |\n{end}{tail}")
    args = [str(path), "--readme", str(readme), "--section", "em"]
    assert table.main(args) == 0
    text = readme.read_text()
    assert text.startswith(head + start + "\nMean ± sd over seeds")
    assert text.endswith("\n" + end + tail)
    assert "an old table" not in text
    inside = text[len(head + start) : -len(end + tail)].strip("\n")
    assert inside == table.body(table.read([path])).rstrip("\n")
    assert "### " not in inside  # the heading is the README's own
    assert table.main(args) == 0
    assert readme.read_text() == text


@pytest.mark.parametrize("broken", ["no marks at all\n", "{start}\n{end}\n{start}\n{end}\n"])
def test_table_refuses_a_readme_without_one_pair_of_marks(tmp_path, capsys, broken):
    rows = [{"config": "c.yaml", "method": "dense", "density_target": "", "seed": 0,
             "val_pr_auc": 0.5, "steps": 9, "commit": "abc", "machine": "m"}]  # fmt: skip
    path = _write_csv(tmp_path / "r.csv", rows)
    start, end = table.marks("em")
    readme = tmp_path / "README.md"
    readme.write_text(broken.format(start=start, end=end))
    before = readme.read_bytes()
    assert table.main([str(path), "--readme", str(readme), "--section", "em"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("error: the README needs the marks")
    assert readme.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "r.csv"]  # no temporary


def test_pooled_differences_over_densities_match_a_paired_t_test():
    """BB minus magnitude seed by seed over every density both ran, against scipy's ttest_rel."""
    from scipy import stats

    bb = {"0.5": [0.60, 0.62, 0.61], "0.1": [0.58, 0.57, 0.59]}
    mag = {"0.5": [0.61, 0.64, 0.61], "0.1": [0.60, 0.58, 0.62]}
    rows = [
        {"config": "c.yaml", "method": m, "density_target": d, "seed": s, "val_pr_auc": v}
        for m, by_d in (("bb_in", bb), ("magnitude", mag))
        for d, vs in by_d.items()
        for s, v in enumerate(vs)
    ]
    rows += [  # a seed magnitude lacks pairs with nothing; a one-density ablation is not pooled
        {"config": "c.yaml", "method": "bb_in", "density_target": "0.1", "seed": 7,
         "val_pr_auc": 0.9},
        *({"config": "c.yaml", "method": "rank", "density_target": "0.1", "seed": s,
           "val_pr_auc": 0.5} for s in range(3)),
        *({"config": "c.yaml", "method": "dense", "density_target": "", "seed": s,
           "val_pr_auc": 0.6} for s in range(3)),
    ]  # fmt: skip
    lines = table.pooled(rows)
    assert lines[0] == "| BB variant | densities | vs magnitude |"  # no random rows: no column
    assert len(lines) == 3  # bb_in only: rank ran at one density; dense is not a BB variant
    a = bb["0.5"] + bb["0.1"]
    b = mag["0.5"] + mag["0.1"]
    d = np.subtract(a, b)
    lo, hi = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
    p = stats.ttest_rel(a, b).pvalue
    assert lines[2] == (
        f"| bb_in | 0.5, 0.1 | {d.mean():+.3f} [{lo:+.3f}, {hi:+.3f}], p {p:.3f}, 6 pairs |"
    )
    assert "vs dense" not in table.markdown(rows).split("Over the densities")[1]


@pytest.mark.parametrize("section", ["vnc-1500", "demo-1500", "asr-quick", "faceid-1000"])
def test_readme_tables_are_the_committed_results(section):
    """The README's generated sections say what the committed CSVs say (rerun
    ``bench/table.py bench/results/SECTION.csv --section SECTION`` after adding rows)."""
    readme = (REPO / "README.md").read_text()
    start, end = table.marks(section)
    inside = readme.split(start + "\n", 1)[1].split("\n" + end, 1)[0]
    assert inside == table.body(table.read([REPO / "bench" / "results" / f"{section}.csv"])).rstrip(
        "\n"
    )


def test_table_refuses_missing_inputs_and_an_output_over_its_input(tmp_path, capsys):
    csv_path = _write_csv(tmp_path / "r.csv", [{"config": "c.yaml", "method": "dense",
                          "density_target": "", "seed": 0, "val_pr_auc": 0.5}])  # fmt: skip
    assert table.main([str(tmp_path / "none.csv")]) == 2
    assert capsys.readouterr().err.startswith("error: cannot read the results CSV")
    args = [str(csv_path), "--section", "em", "--readme", str(tmp_path / "none.md")]
    assert table.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: cannot read the README {tmp_path / 'none.md'}: "
                   "No such file or directory; --readme names it"]  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.csv"]
    before = csv_path.read_bytes()
    assert table.main([str(csv_path), "--md", str(csv_path)]) == 2  # --md over its own input
    assert "is the input" in capsys.readouterr().err
    assert csv_path.read_bytes() == before
