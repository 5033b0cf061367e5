"""The speech companion: data (espeak-ng corpus, LibriSpeech layout), features, model, metrics,
and a tiny end-to-end run with BB on the feed-forward blocks."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from bbem.companions import asr
from bbem.companions.common import load_config
from bbem.errors import UserError

needs_espeak = pytest.mark.skipif(not asr.espeak_available(), reason=asr.ESPEAK_INSTALL)


def tiny_cfg(tmp_path: Path, **over) -> dict:
    raw = {
        "data": {
            "cache_dir": str(tmp_path / "cache"),
            "vocab_size": 20,
            "n_train": 16,
            "n_test": 6,
            "words": [1, 3],
        },
        "model": {"d_model": 32, "heads": 2, "layers": 1, "ff": 64},
        "bb": {"method": "bb", "density": 0.5, "warmup_steps": 2, "refresh_every": 2},
        "optim": {"batch_size": 8, "warmup_steps": 1},
        "train": {"steps": 6, "eval_every": 3, "checkpoint_every": 3, "quiet": True},
    }
    for k, v in over.items():
        raw.setdefault(k, {}).update(v)
    return load_config(raw, asr.DEFAULTS)


# -- text, decoding, metrics ----------------------------------------------------------------------


def test_text_normalisation_and_labels():
    assert asr.normalise_text("HELLO,  World's END!") == "hello world's end"
    assert asr.encode("ab c") == [2, 3, 1, 4]  # 0 is the blank, 1 the space


def test_ctc_greedy_merges_repeats_and_drops_blanks():
    # path: h h _ i _ i (i.e. "hii" needs the blank between the two i's), then padding
    c = {ch: asr.CHARS.index(ch) + 1 for ch in "hi "}
    path = [c["h"], c["h"], 0, c["i"], 0, c["i"], c[" "], c["h"], 5, 5]
    lp = torch.full((1, len(path), len(asr.CHARS) + 1), -10.0)
    lp[0, torch.arange(len(path)), torch.tensor(path)] = 0.0
    assert asr.ctc_greedy(lp, torch.tensor([8])) == ["hii h"]


def test_wer_report_matches_jiwer_and_counts_buckets_by_reference_word():
    import jiwer

    buckets = {"the": "head", "a": "head", "cat": "middle", "sat": "middle", "zebra": "tail"}
    refs = ["the cat sat", "a zebra", "the zebra sat"]
    hyps = ["the cat sad", "a zebra extra", "the sat"]
    r = asr.wer_report(refs, hyps, buckets)
    assert r["wer"] == pytest.approx(jiwer.wer(refs, hyps))
    assert r["cer"] == pytest.approx(jiwer.cer(refs, hyps))
    assert r["wer_head"] == 0.0  # the, a, the all correct
    assert r["wer_middle"] == pytest.approx(1 / 3)  # cat ok, sat -> sad wrong, sat ok
    assert r["wer_tail"] == pytest.approx(1 / 2)  # zebra ok once, deleted once


def test_frequency_buckets_follow_training_counts():
    texts = asr.sentences(400, asr.WORDS[:30], 1.2, (2, 5), seed=1)
    b = asr.frequency_buckets(texts)
    from collections import Counter

    counts = Counter(w for t in texts for w in t.split())
    head = [counts[w] for w, k in b.items() if k == "head"]
    tail = [counts[w] for w, k in b.items() if k == "tail"]
    assert min(head) >= max(tail)
    assert set(b.values()) == {"head", "middle", "tail"}


def test_zipf_sentences_make_rare_words():
    texts = asr.sentences(2000, asr.WORDS[:100], 1.1, (2, 5), seed=0)
    from collections import Counter

    c = Counter(w for t in texts for w in t.split())
    # rank 1 should be ~100^1.1 ~ 160x as common as rank 100
    assert c[asr.WORDS[0]] > 50 * max(1, c[asr.WORDS[99]])


# -- features and model ---------------------------------------------------------------------------


def test_mel_filterbank_peaks_at_its_centre_frequency():
    fb = asr.mel_filterbank(20, 512)
    assert fb.shape == (20, 257)
    assert fb.max() == pytest.approx(1.0, abs=0.05)
    centres = fb.argmax(1)
    assert np.all(np.diff(centres) > 0)  # ordered low to high


def test_log_mel_localises_a_tone():
    t = np.arange(16000) / 16000
    feats = {"n_mels": 40, "win_ms": 25.0, "hop_ms": 10.0, "stack": 1}
    lo = asr.log_mel(np.sin(2 * np.pi * 300 * t), feats).mean(0).argmax()
    hi = asr.log_mel(np.sin(2 * np.pi * 3000 * t), feats).mean(0).argmax()
    assert lo < hi
    x = asr.log_mel(np.random.default_rng(0).normal(size=16000), {**feats, "stack": 3})
    assert x.shape == (101 // 3, 120)  # 1 s at 10 ms hops, centred frames, 3 stacked


def test_transformer_ignores_padding():
    torch.manual_seed(0)
    m = asr.CTCTransformer(12, d_model=16, heads=2, layers=2, ff=32, dropout=0.0).eval()
    a = torch.randn(1, 5, 12)
    padded = torch.cat([a, torch.randn(1, 4, 12)], 1)
    with torch.no_grad():
        alone = m(a, torch.tensor([5]))
        inbatch = m(padded, torch.tensor([5]))
    assert alone.shape == (1, 5, len(asr.CHARS) + 1)
    torch.testing.assert_close(alone, inbatch[:, :5], atol=1e-5, rtol=1e-4)


# -- LibriSpeech layout ---------------------------------------------------------------------------


def write_librispeech(root: Path) -> None:
    import soundfile as sf

    rng = np.random.default_rng(0)
    for split, speakers in (("train-clean-100", ("19", "26")), ("test-clean", ("61",))):
        for spk in speakers:
            d = root / split / spk / "198"
            d.mkdir(parents=True)
            lines = []
            for u in range(2):
                uid = f"{spk}-198-{u:04d}"
                sr = 16000 if u == 0 else 8000  # resampled on load
                sf.write(d / f"{uid}.flac", 0.1 * rng.standard_normal(sr // 2), sr)
                lines.append(f"{uid} HELLO, WORLD 4 IT'S A TEST")
            (d / f"{spk}-198.trans.txt").write_text("\n".join(lines) + "\n")


def test_librispeech_loader_reads_the_layout(tmp_path):
    write_librispeech(tmp_path)
    tr = asr.load_librispeech(tmp_path, "train-clean-100")
    te = asr.load_librispeech(tmp_path, "test-clean")
    assert len(tr) == 4
    assert len(te) == 2
    assert {u.speaker for u in tr} == {"19", "26"}
    assert {u.speaker for u in te} == {"61"}
    assert tr[0].text == "hello world it's a test"  # digits and commas are not characters
    assert all(len(u.audio) == 8000 and u.audio.dtype == np.float32 for u in tr)
    assert len(asr.load_librispeech(tmp_path, "train-clean-100", max_utts=3)) == 3


def test_librispeech_errors_name_the_fix(tmp_path):
    with pytest.raises(UserError, match=r"data\.root"):
        asr.load_librispeech(tmp_path, "test-clean")
    write_librispeech(tmp_path)
    next((tmp_path / "test-clean").rglob("*.flac")).unlink()
    with pytest.raises(UserError, match="missing"):
        asr.load_librispeech(tmp_path, "test-clean")


def test_librispeech_run_end_to_end(tmp_path):
    write_librispeech(tmp_path / "ls")
    cfg = tiny_cfg(
        tmp_path,
        data={"source": "librispeech", "root": str(tmp_path / "ls")},
        bb={"method": "dense"},
        train={"steps": 2, "eval_every": 2},
    )
    row = asr.run(cfg, tmp_path / "run")
    assert row["density"] == 1.0
    assert row["val_wer"] >= 0


# -- the espeak-ng corpus and a full run -----------------------------------------------------------


@needs_espeak
def test_speak_renders_audio():
    x = asr.speak("hello there", "en-us+f2", 160, 50)
    assert x.dtype == np.float32
    assert 0.4 < len(x) / asr.SAMPLE_RATE < 3
    assert x.std() > 0.01


@needs_espeak
def test_synth_corpus_holds_out_voices_and_is_cached(tmp_path):
    cfg = tiny_cfg(tmp_path)
    tr, te = asr.synth_corpus(cfg["data"], progress=False)
    assert len(tr) == 16
    assert len(te) == 6
    assert not {u.speaker for u in tr} & {u.speaker for u in te}
    (cache,) = (tmp_path / "cache").glob("*/corpus.npz")
    mtime = cache.stat().st_mtime_ns
    tr2, _ = asr.synth_corpus(cfg["data"], progress=False)
    assert cache.stat().st_mtime_ns == mtime
    assert tr2[0].text == tr[0].text
    np.testing.assert_array_equal(tr2[0].audio, tr[0].audio)


def test_missing_espeak_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setattr(asr.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="apt-get install -y espeak-ng"):
        asr.synth_corpus(tiny_cfg(tmp_path)["data"])


@needs_espeak
def test_tiny_bb_run_writes_a_run_directory(tmp_path):
    pytest.importorskip("bbem.bb")
    cfg = tiny_cfg(tmp_path)
    row = asr.run(cfg, tmp_path / "run")
    run = tmp_path / "run"
    with (run / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [3, 6]
    for col in (
        "time_s",
        "train_loss",
        "density",
        "val_wer",
        "val_wer_tail",
        "val_cer",
        "bb_on_rate_mean",
        "val_decorrelation",
    ):
        assert col in rows[0]
    assert row["density"] == pytest.approx(0.5, abs=0.02)
    with (run / "bb.csv").open() as f:
        bb = list(csv.DictReader(f))
    modes = {(r["layer"], r["mode"]) for r in bb}
    assert modes == {("blocks.0.ffn.ff1", "in"), ("blocks.0.ffn.ff2", "out")}
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert {"format", "step", "config", "model", "bb", "optimizer", "metrics"} <= set(ck)
    assert ck["step"] == 6
    assert ck["bb"] is not None
    assert (run / "checkpoints" / "best.pt").is_file()
    assert yaml.safe_load((run / "config.yaml").read_text())["bb"]["method"] == "bb"


@needs_espeak
def test_cli_runs_and_reports_user_errors(tmp_path, capsys):
    from bbem.cli import main

    cfg = tiny_cfg(tmp_path, bb={"method": "dense"}, train={"steps": 2, "eval_every": 2})
    path = tmp_path / "asr.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["asr", str(path), "--set", "train.steps=1", "--run-dir", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "checkpoints" / "last.pt").is_file()
    assert main(["asr", str(path), "--set", "model.widht=3", "--run-dir", str(tmp_path / "x")]) == 2
    assert "model.widht is unknown" in capsys.readouterr().err
    assert main(["asr", str(tmp_path / "nope.yaml")]) == 2


@pytest.mark.slow
@needs_espeak
def test_quick_config_learns(tmp_path):
    """The shipped config's dense model gets most words right on unseen voices."""
    cfg = load_config(Path(__file__).parents[1] / "configs" / "asr.yaml", asr.DEFAULTS)
    cfg["bb"] = {"method": "dense"}
    cfg["train"]["quiet"] = True
    row = asr.run(cfg, tmp_path / "run")
    assert row["val_wer"] < 0.5


# -- the shared config loader ---------------------------------------------------------------------


def test_load_config_merges_defaults_and_names_mistakes(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: {d_model: 64}\nbb: {method: magnitude, density: 0.3}\n")
    cfg = load_config(p, asr.DEFAULTS, ["train.steps=7", "bb.density=0.25"])
    assert cfg["model"]["d_model"] == 64
    assert cfg["model"]["heads"] == asr.DEFAULTS["model"]["heads"]
    assert cfg["train"]["steps"] == 7
    assert cfg["bb"] == {
        **asr.DEFAULTS["bb"],
        "method": "magnitude",
        "density": 0.25,
    }
    assert asr.DEFAULTS["model"]["d_model"] == 128  # defaults are not modified
    p.write_text("data: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(p, asr.DEFAULTS)
    p.write_text("- a\n- b\n")
    with pytest.raises(UserError, match="mapping of sections"):
        load_config(p, asr.DEFAULTS)
    with pytest.raises(UserError, match="featurs is unknown"):
        load_config({"featurs": {}}, asr.DEFAULTS)
    from bbem.engine import attach_from_config

    with pytest.raises(UserError, match=r"bb section: .*density"):
        attach_from_config(torch.nn.Linear(4, 4), {"density": 2.0}, (torch.nn.Linear,))


def test_unit_means_skip_padding():
    from bbem.companions.common import UnitMeans

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU())
    units = UnitMeans(net, ["0"], channel_dim=-1)
    x = torch.randn(6, 5, 3)
    lengths = torch.tensor([5, 2, 3, 5, 1, 4])
    units.valid = torch.arange(5)[None] < lengths[:, None]
    with torch.no_grad():
        h = net[0](x)
    net(x)
    means = torch.stack([h[i, : lengths[i]].mean(0) for i in range(6)]).numpy()
    r = np.abs(np.corrcoef(means.T))[~np.eye(4, dtype=bool)].mean()
    assert units.decorrelation() == pytest.approx(r, rel=1e-5)


def test_resume_after_a_crash_continues_exactly(tmp_path, monkeypatch):
    from companion_resume import check_exact_resume

    cfg = tiny_cfg(tmp_path, train={"steps": 9, "eval_every": 6, "checkpoint_every": 3})
    check_exact_resume(asr, "asr", cfg, tmp_path, monkeypatch)
