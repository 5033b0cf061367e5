"""The face companion: identity generator, folder loader, ResNet, verification metrics against
scikit-learn, the real-image check, and a tiny end-to-end run with BB on the 1x1 convs."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from bbem.companions import faceid
from bbem.companions.common import load_config
from bbem.errors import UserError


def tiny_cfg(tmp_path: Path, **over) -> dict:
    raw = {
        "data": {
            "cache_dir": str(tmp_path / "cache"),
            "size": 16,
            "n_known": 6,
            "train_per_id": 4,
            "test_per_id": 2,
            "n_unseen": 4,
            "unseen_per_id": 3,
        },
        "model": {"width": 8, "stages": [[4, 16, 1, 2], [8, 32, 1, 2]], "embed": 16},
        "bb": {"method": "bb", "density": 0.5, "warmup_steps": 2, "refresh_every": 2},
        "optim": {"batch_size": 8, "warmup_steps": 1},
        "train": {"steps": 6, "eval_every": 3, "checkpoint_every": 3, "quiet": True},
    }
    for k, v in over.items():
        raw.setdefault(k, {}).update(v)
    return load_config(raw, faceid.DEFAULTS)


# -- metrics against scikit-learn -----------------------------------------------------------------


def test_roc_auc_matches_sklearn_with_ties(rng):
    from sklearn.metrics import roc_auc_score

    g = np.round(rng.normal(1, 1, 300), 1)  # rounding makes ties
    i = np.round(rng.normal(0, 1, 2000), 1)
    ref = roc_auc_score(np.r_[np.ones(len(g)), np.zeros(len(i))], np.r_[g, i])
    assert faceid.roc_auc(g, i) == pytest.approx(ref, abs=1e-12)
    assert faceid.roc_auc([2.0], [1.0]) == 1.0
    assert faceid.roc_auc([1.0], [1.0]) == 0.5


@pytest.mark.parametrize("far", [1e-2, 1e-1, 1e-4])
def test_tar_at_far_matches_sklearn_roc_curve(rng, far):
    from sklearn.metrics import roc_curve

    g, i = rng.normal(2, 1, 500), rng.normal(0, 1, 3000)
    fpr, tpr, _ = roc_curve(np.r_[np.ones(len(g)), np.zeros(len(i))], np.r_[g, i])
    ref = tpr[fpr <= far + 1e-12].max()
    assert faceid.tar_at_far(g, i, far) == pytest.approx(ref)


def test_pair_scores_split_same_and_different():
    emb = np.array([[1.0, 0], [1, 0.01], [0, 1], [0, 2]])
    same, diff = faceid.pair_scores(emb, np.array([0, 0, 1, 1]))
    assert len(same) == 2
    assert len(diff) == 4
    np.testing.assert_allclose(same, 1.0, atol=1e-3)
    assert faceid.verification(emb, np.array([0, 0, 1, 1]))["auc"] == 1.0


def test_verification_reports_tar_at_both_false_accept_rates(rng):
    labels = np.repeat(np.arange(40), 5)  # 19,500 impostor pairs: FAR 1e-3 lets 19 through
    emb = rng.normal(size=(200, 8)) + 1.5 * rng.normal(size=(40, 8))[labels]
    v = faceid.verification(emb, labels)
    g, i = faceid.pair_scores(emb, labels)
    assert v["tar_far1e-2"] == faceid.tar_at_far(g, i, 1e-2)
    assert v["tar_far1e-3"] == faceid.tar_at_far(g, i, 1e-3)
    assert 0 < v["tar_far1e-3"] < v["tar_far1e-2"] < 1  # stricter FAR, fewer accepted


# -- data -----------------------------------------------------------------------------------------


def test_synth_identities_are_stable_and_distinct():
    x, y = faceid.synth_faces(12, 6, seed=3, size=24)
    assert x.shape == (72, 24, 24)
    assert x.dtype == np.float32
    assert x.min() >= 0
    assert x.max() <= 1
    x2, _ = faceid.synth_faces(12, 3, seed=3, size=24)
    np.testing.assert_array_equal(x2[:3], x[:3])  # identity 0 does not depend on per_id
    # with little nuisance, identity is in the raw pixels (nearest centroid); at full
    # difficulty pose, lighting and noise swamp it, which is what the network must learn past
    for difficulty, lo, hi in ((0.3, 0.7, 1.0), (1.0, 0.0, 0.5)):
        x, y = faceid.synth_faces(12, 6, seed=3, size=24, difficulty=difficulty)
        feats = (x - x.mean((1, 2), keepdims=True)).reshape(len(x), -1)
        first = np.arange(len(y)) % 6 < 4
        centres = np.stack([feats[first & (y == k)].mean(0) for k in range(12)])
        pred = ((feats[~first][:, None] - centres[None]) ** 2).sum(-1).argmin(1)
        assert lo < (pred == y[~first]).mean() <= hi


def test_synth_data_is_cached_with_disjoint_unseen_identities(tmp_path):
    d = tiny_cfg(tmp_path)["data"]
    a = faceid.synth_data(d)
    assert a.train_x.shape == (24, 16, 16)
    assert a.test_x.shape == (12, 16, 16)
    assert a.unseen_x.shape == (12, 16, 16)
    assert a.n_classes == 6
    (cache,) = (tmp_path / "cache").glob("*/faces.npz")
    mtime = cache.stat().st_mtime_ns
    b = faceid.synth_data(d)
    assert cache.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(a.unseen_x, b.unseen_x)
    # unseen identities are other people: no unseen image equals a known one
    assert (
        not np.isin(a.unseen_x.reshape(12, -1)[:, :8], a.train_x.reshape(24, -1)[:, :8])
        .all(1)
        .any()
    )


def write_folder(root: Path, rng) -> None:
    from skimage.io import imsave

    for k, (name, n) in enumerate((("alice", 4), ("bob", 3), ("carol", 1), ("dave", 5))):
        d = root / name
        d.mkdir(parents=True)
        for j in range(n):
            if j % 2:  # RGB and grey, odd sizes: all resized to data.size
                a = (rng.random((20 + j, 18, 3)) * 255).astype(np.uint8)
            else:
                a = np.full((30, 30), 40 * k, np.uint8)
            imsave(d / f"{j:03d}.png", a, check_contrast=False)
        (d / "notes.txt").write_text("not an image")
    (root / "empty").mkdir()


def test_image_folder_loader(tmp_path, rng):
    write_folder(tmp_path, rng)
    x, y, names = faceid.load_image_folder(tmp_path, 16)
    assert names == ["alice", "bob", "carol", "dave"]  # "empty" has no images
    assert x.shape == (13, 16, 16)
    assert x.dtype == np.float32
    assert x.max() <= 1
    assert np.bincount(y).tolist() == [4, 3, 1, 5]
    assert x[y == 1][0].mean() == pytest.approx(40 / 255, abs=1e-3)
    with pytest.raises(UserError, match=r"data\.root"):
        faceid.load_image_folder(tmp_path / "missing", 16)
    with pytest.raises(UserError, match="no images"):
        faceid.load_image_folder(tmp_path / "empty", 16)


def test_split_identities(tmp_path, rng):
    write_folder(tmp_path, rng)
    x, y, _ = faceid.load_image_folder(tmp_path, 16)
    d = faceid.split_identities(x, y, unseen_fraction=0.0, test_per_id=1, seed=0)
    # carol has one image: nothing to hold out, so she is verified, not identified
    assert len(d.unseen_y) == 1
    assert d.n_classes == 3
    assert len(d.test_y) == 3
    assert sorted(np.bincount(d.test_y).tolist()) == [1, 1, 1]
    assert len(d.train_y) == 13 - 1 - 3
    with pytest.raises(UserError, match="test_per_id"):
        faceid.split_identities(x, y, 0.0, test_per_id=9, seed=0)


def test_real_faces_and_augmented_copies():
    real = faceid.real_faces(32)
    if real is None:
        pytest.skip("skimage.data.lfw_subset() is not available offline")
    assert real.shape == (100, 32, 32)
    a, src = faceid.augment_copies(real[:3], 4, seed=0)
    assert a.shape == (12, 32, 32)
    assert src.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    # copies stay close to their source, closer than to other faces
    d_same = np.abs(a[:4] - real[0]).mean()
    d_other = np.abs(a[:4] - real[1]).mean()
    assert d_same < d_other


# -- model and runs -------------------------------------------------------------------------------


def test_resnet_embeds_and_classifies():
    m = faceid.FaceResNet(5, width=8, stages=[(4, 16, 1, 2), (8, 32, 2, 2)], embed=12).eval()
    e = m(torch.randn(3, 1, 16, 16))
    assert e.shape == (3, 12)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(3))
    logits = m.logits(e)
    margin = m.logits(e, torch.tensor([0, 1, 2]))
    assert logits.shape == (3, 5)
    torch.testing.assert_close(logits[0, 0] - margin[0, 0], torch.tensor(m.scale * m.margin))


def test_tiny_bb_run_writes_a_run_directory(tmp_path):
    pytest.importorskip("bbem.bb")
    row = faceid.run(tiny_cfg(tmp_path), tmp_path / "run")
    run = tmp_path / "run"
    with (run / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [3, 6]
    for col in ("time_s", "train_loss", "density", "val_top1", "val_auc", "val_decorrelation"):
        assert col in rows[0]
    if faceid.real_faces(16) is not None:
        assert 0 <= float(rows[-1]["val_real_auc"]) <= 1
    assert row["density"] == pytest.approx(0.5, abs=0.02)
    with (run / "bb.csv").open() as f:
        layers = {r["layer"] for r in csv.DictReader(f)}
    assert layers == {f"stages.{s}.0.conv{c}" for s in (0, 1) for c in (1, 3)}
    ck = torch.load(run / "checkpoints" / "best.pt", weights_only=False)
    assert {"format", "step", "config", "model", "bb", "optimizer", "metrics"} <= set(ck)
    # `bbem report` reads a companion run like an EM one
    report = pytest.importorskip("bbem.report")
    report.make_report(run)
    assert (run / "report" / "curves.png").is_file()
    assert (run / "report" / "balance.png").is_file()


def test_magnitude_and_dense_at_the_same_density(tmp_path):
    pytest.importorskip("bbem.bb")
    cfg = tiny_cfg(
        tmp_path,
        data={"real_check": False},
        bb={"method": "magnitude"},
        train={"steps": 4, "eval_every": 4},
    )
    assert faceid.run(cfg, tmp_path / "mag")["density"] == pytest.approx(0.5, abs=0.02)
    cfg = tiny_cfg(tmp_path, bb={"method": "dense"}, train={"steps": 2, "eval_every": 2})
    assert faceid.run(cfg, tmp_path / "dense")["density"] == 1.0
    assert not (tmp_path / "dense" / "bb.csv").is_file() or not list(
        csv.DictReader((tmp_path / "dense" / "bb.csv").open())
    )


def test_folder_run_and_cli_errors(tmp_path, rng, capsys):
    import yaml

    from bbem.cli import main

    write_folder(tmp_path / "faces", rng)
    cfg = tiny_cfg(
        tmp_path,
        data={
            "source": "folder",
            "root": str(tmp_path / "faces"),
            "test_per_id": 1,
            "unseen_fraction": 0.5,
        },
        bb={"method": "dense"},
        train={"steps": 2, "eval_every": 2},
    )
    path = tmp_path / "f.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["faceid", str(path), "--run-dir", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "checkpoints" / "last.pt").is_file()
    assert main(["faceid", str(path), "--set", "bb.method=pruny"]) == 2
    assert "bb.method 'pruny' is unknown" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_config_learns(tmp_path):
    """The shipped config's dense model identifies most held-out images."""
    cfg = load_config(Path(__file__).parents[1] / "configs" / "faceid.yaml", faceid.DEFAULTS)
    cfg["bb"] = {"method": "dense"}
    cfg["train"]["quiet"] = True
    row = faceid.run(cfg, tmp_path / "run")
    assert row["val_top1"] > 0.5
    assert row["val_auc"] > 0.8


def test_unit_means_decorrelation_matches_numpy():
    from bbem.companions.common import UnitMeans

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 5, 3), torch.nn.ReLU())
    units = UnitMeans(net, ["1"])
    with torch.no_grad():
        m = net(torch.randn(30, 1, 8, 8)).mean((2, 3)).numpy()
    r = np.abs(np.corrcoef(m.T))[~np.eye(5, dtype=bool)].mean()
    assert units.decorrelation() == pytest.approx(r, rel=1e-5)
    assert not net[1]._forward_hooks  # hooks removed


def test_resume_after_a_crash_continues_exactly(tmp_path, monkeypatch):
    from companion_resume import check_exact_resume

    cfg = tiny_cfg(
        tmp_path,
        data={"real_check": False},
        train={"steps": 9, "eval_every": 6, "checkpoint_every": 3},
    )
    check_exact_resume(faceid, "faceid", cfg, tmp_path, monkeypatch)
