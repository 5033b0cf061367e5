"""Speech recognition with BB: a small Transformer encoder with CTC over characters.

``bbem asr configs/asr.yaml`` trains it on a corpus synthesised here with espeak-ng (short
sentences from a Zipf-distributed vocabulary, many voices, speeds, pitches and background
noise; test voices never appear in training), or on LibriSpeech where a user has it
(``data.source: librispeech``, ``data.root``). BB sits on the feed-forward blocks as the
authors did: fan-in mode on the first linear layer (``ff1``), fan-out on the second (``ff2``).

Reported: WER (jiwer), CER, and WER by word-frequency bucket (head, middle, tail thirds of
the vocabulary ranked by training frequency), the rare-event measure of the paper.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bbem.atomic import atomic_output
from bbem.companions import common
from bbem.companions.common import UnitMeans, cache_key
from bbem.engine import Evaluation, Task, fit
from bbem.errors import UserError

SAMPLE_RATE = 16000
#: CTC labels: 0 is the blank, then space, a-z and the apostrophe.
CHARS = " abcdefghijklmnopqrstuvwxyz'"
BLANK = 0
ESPEAK_INSTALL = (
    "espeak-ng is not installed: install it with `sudo apt-get install -y espeak-ng` "
    "(or `make system-deps`), or set data.source=librispeech"
)

DEFAULTS: dict[str, Any] = {
    "task": "asr",
    "data": {
        "source": "synth",  # synth | librispeech
        "root": None,  # LibriSpeech root (holds train-clean-100/, test-clean/, ...)
        "train_split": "train-clean-100",
        "test_split": "test-clean",
        "max_utts": None,  # cap per LibriSpeech split
        "cache_dir": "data/asr",
        "vocab_size": 150,
        "zipf": 1.1,
        "words": [2, 5],
        "n_train": 2400,
        "n_test": 300,
        "test_voices": 0.2,
        "snr_db": [5.0, 30.0],
        "speed": [140, 190],
        "pitch": [25, 75],
        "seed": 0,
        "workers": None,
    },
    "features": {"n_mels": 40, "win_ms": 25.0, "hop_ms": 10.0, "stack": 3},
    "model": {
        "d_model": 128,
        "heads": 4,
        "layers": 4,
        "ff": 512,
        "dropout": 0.1,
        "bb_layers": ["*.ff1", "*.ff2"],
        "bb_modes": {"*.ff2": "out"},
    },
    "augment": {"time_masks": 2, "time_width": 8, "freq_masks": 2, "freq_width": 6},
    "bb": {"method": "bb", "mode": "in", "density": 0.5, "warmup_steps": 300, "refresh_every": 50},
    "optim": {
        "lr": 1.5e-3,
        "weight_decay": 0.01,
        "batch_size": 32,
        "grad_clip": 5.0,
        "warmup_steps": 200,
        # The cosine ends at 5% of lr, not 0, as for faceid (see faceid.DEFAULTS): these short
        # runs from scratch are still learning at the end.
        "lr_floor": 0.05,
    },
    "train": {
        "steps": 2000,
        "eval_every": 250,
        "checkpoint_every": 250,
        "seed": 0,
        "device": "cpu",
        "log_every": 10,
        "threads": None,
        "quiet": False,
    },
}

#: Everyday words first, rarer ones later; the Zipf rank is a seeded shuffle of this list, so
#: frequency does not simply follow word length.
WORDS = """
the a to and of in is it you that he was for on are with as i his they be at one have this
from or had by hot word but what some we can out other were all there when up use your how
said an each she which do their time if will way about many then them write would like so
these her long make thing see him two has look more day could go come did number sound no
most people my over know water than call first who may down side been now find any new work
part take get place made live where after back little only round man year came show every
good me give our under name very through just form sentence great think say help low line
differ turn cause much mean before move right boy old too same tell does set three want air
well also play small end put home read hand port large spell add even land here must big
high such follow act why ask men change went light kind off need house picture try us again
animal point mother world near build self earth father head stand own page should country
found answer school grow study still learn plant cover food sun four between state keep eye
never last let thought city tree cross farm hard start might story saw far sea draw left
late run don't while press close night real life few north open seem together next white
children begin got walk example ease paper group always music those both mark often letter
until mile river car feet care second book carry took science eat room friend began idea
fish mountain stop once base hear horse cut sure watch color face wood main enough plain
girl usual young ready above ever red list though feel talk bird soon body dog family direct
pose leave song measure door product black short numeral class wind question happen complete
ship area half rock order fire south problem piece told knew pass since top whole king space
heard best hour better true during hundred five remember step early hold west ground interest
reach fast verb sing listen six table travel less morning ten simple several vowel toward war
lay against pattern slow center love person money serve appear road map rain rule govern pull
cold notice voice unit power town fine certain fly fall lead cry dark machine note wait plan
figure star box noun field rest correct able pound done beauty drive stood contain front teach
week final gave green oh quick develop ocean warm free minute strong special mind behind clear
tail produce fact street inch multiply nothing course stay wheel full force blue object decide
surface deep moon island foot system busy test record boat common gold possible plane stead
dry wonder laugh thousand ago ran check game shape equate miss brought heat snow tire bring
yes distant fill east paint language among
""".split()  # noqa: SIM905 - a block of words reads and diffs better than 450 quoted ones

ACCENTS = (
    "en-us",
    "en-gb",
    "en-gb-scotland",
    "en-gb-x-rp",
    "en-029",
    "en-us-nyc",
    "en-gb-x-gbcwmd",
)
VARIANTS = (
    *(f"m{i}" for i in range(1, 8)),
    *(f"f{i}" for i in range(1, 6)),
    "klatt",
    "klatt2",
    "klatt3",
    "croak",
    "grandma",
    "grandpa",
    "steph",
    "paul",
    "robert",
    "linda",
)


# -- data -----------------------------------------------------------------------------------------


@dataclass
class Utterance:
    """One utterance: ``audio`` float32 ``[samples]`` at 16 kHz, its text, and who spoke it."""

    audio: np.ndarray
    text: str
    speaker: str


def normalise_text(text: str) -> str:
    """Lower case, only ``CHARS``, single spaces (LibriSpeech transcripts are upper case)."""
    keep = "".join(c if c in CHARS else " " for c in text.lower())
    return " ".join(keep.split())


def encode(text: str) -> list[int]:
    """Characters to CTC labels (1..len(CHARS)); 0 is the blank."""
    return [CHARS.index(c) + 1 for c in text]


def ctc_greedy(log_probs: torch.Tensor, lengths: torch.Tensor) -> list[str]:
    """Best-path decoding of ``log_probs`` ``[B, T, C]``: argmax, merge repeats, drop blanks."""
    best = log_probs.argmax(-1).cpu().numpy()
    out = []
    for b, n in enumerate(lengths.tolist()):
        path = best[b, :n]
        keep = path[np.r_[True, path[1:] != path[:-1]]]
        out.append(" ".join("".join(CHARS[i - 1] for i in keep if i != BLANK).split()))
    return out


def sentences(
    n: int, vocab: Sequence[str], zipf: float, words: Sequence[int], seed: int
) -> list[str]:
    """``n`` sentences of ``words[0]..words[1]`` words drawn with p(rank r) ~ r^-zipf."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, len(vocab) + 1) ** zipf
    p /= p.sum()
    lens = rng.integers(int(words[0]), int(words[1]) + 1, size=n)
    return [" ".join(vocab[i] for i in rng.choice(len(vocab), size=k, p=p)) for k in lens]


def voices(seed: int) -> list[dict[str, Any]]:
    """Every accent x variant pair, each with its own base speed and pitch offsets."""
    rng = np.random.default_rng(seed)
    out = []
    for a in ACCENTS:
        for v in VARIANTS:
            out.append(
                {"voice": f"{a}+{v}", "speed": rng.uniform(-1, 1), "pitch": rng.uniform(-1, 1)}
            )
    return out


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def speak(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """espeak-ng's rendering of ``text`` as float32 audio at 16 kHz."""
    import soundfile as sf
    from scipy.signal import resample_poly

    exe = shutil.which("espeak-ng")
    if exe is None:
        raise UserError(ESPEAK_INSTALL)
    with tempfile.TemporaryDirectory() as d:
        wav = Path(d) / "u.wav"
        r = subprocess.run(
            [exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(wav), text],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0 or not wav.is_file():
            raise UserError(f"espeak-ng failed for voice {voice}: {r.stderr.strip()[:200]}")
        x, sr = sf.read(wav, dtype="float32")
    if x.ndim > 1:
        x = x.mean(1)
    g = math.gcd(SAMPLE_RATE, sr)
    return resample_poly(x, SAMPLE_RATE // g, sr // g).astype(np.float32)


def add_noise(x: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """Mix in coloured background noise (white to brown, plus a hum) at ``snr_db``."""
    n = len(x)
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.maximum(np.fft.rfftfreq(n, 1 / SAMPLE_RATE), 20.0)
    noise = np.fft.irfft(spec / f ** rng.uniform(0.0, 1.0), n)
    t = np.arange(n) / SAMPLE_RATE
    noise = noise / (noise.std() + 1e-9) + rng.uniform(0, 0.5) * np.sin(
        2 * np.pi * rng.choice([50.0, 60.0]) * t + rng.uniform(0, 6.3)
    )
    p_sig = float(np.mean(x**2)) + 1e-12
    noise *= math.sqrt(p_sig / (10 ** (snr_db / 10)) / (float(np.mean(noise**2)) + 1e-12))
    return (x + noise).astype(np.float32)


def synth_corpus(
    data: Mapping[str, Any], progress: bool = True
) -> tuple[list[Utterance], list[Utterance]]:
    """The synthetic train and test sets, made once and cached under ``data.cache_dir/<hash>/``.

    Test utterances are spoken only by held-out voices (``data.test_voices`` of them).
    """
    if not espeak_available():
        raise UserError(ESPEAK_INSTALL)
    keys = (
        "vocab_size",
        "zipf",
        "words",
        "n_train",
        "n_test",
        "test_voices",
        "snr_db",
        "speed",
        "pitch",
        "seed",
    )
    spec = {k: data[k] for k in keys}
    path = Path(data["cache_dir"]) / cache_key({"v": 1, **spec}) / "corpus.npz"
    if not path.is_file():
        _make_corpus(spec, path, data.get("workers"), progress)
    z = np.load(path)
    audio, offsets = z["audio"], z["offsets"]
    utts = [
        Utterance(audio[offsets[i] : offsets[i + 1]].astype(np.float32) / 32767.0, str(t), str(s))
        for i, (t, s) in enumerate(zip(z["texts"], z["speakers"], strict=True))
    ]
    is_test = z["is_test"]
    return [u for u, t in zip(utts, is_test, strict=True) if not t], [
        u for u, t in zip(utts, is_test, strict=True) if t
    ]


def vocabulary(size: int, seed: int) -> list[str]:
    if not 3 <= size <= len(WORDS):
        raise UserError(f"data.vocab_size must be in 3..{len(WORDS)}, got {size}")
    rng = np.random.default_rng(seed)
    return [WORDS[i] for i in rng.permutation(len(WORDS))[:size]]


def _make_corpus(spec: Mapping[str, Any], path: Path, workers: int | None, progress: bool) -> None:
    from bbem.progress import progress_bar

    seed = int(spec["seed"])
    rng = np.random.default_rng(seed + 1)
    vocab = vocabulary(int(spec["vocab_size"]), seed)
    n_train, n_test = int(spec["n_train"]), int(spec["n_test"])
    texts = sentences(n_train + n_test, vocab, float(spec["zipf"]), spec["words"], seed + 2)
    vs = voices(seed)
    order = rng.permutation(len(vs))
    n_tv = max(1, round(float(spec["test_voices"]) * len(vs)))
    test_v, train_v = order[:n_tv], order[n_tv:]
    who = np.r_[rng.choice(train_v, n_train), rng.choice(test_v, n_test)]
    (s0, s1), (p0, p1) = spec["speed"], spec["pitch"]
    jobs = []
    for i, v in enumerate(who):
        base = vs[v]
        # each voice has its own register; each utterance wobbles around it
        speed = (s0 + s1) / 2 + (s1 - s0) / 2 * (0.7 * base["speed"] + 0.3 * rng.uniform(-1, 1))
        pitch = (p0 + p1) / 2 + (p1 - p0) / 2 * (0.7 * base["pitch"] + 0.3 * rng.uniform(-1, 1))
        jobs.append((texts[i], base["voice"], round(speed), round(pitch)))
    snr_lo, snr_hi = (float(v) for v in spec["snr_db"])
    snrs = rng.uniform(snr_lo, snr_hi, size=len(jobs))
    noise_seeds = rng.integers(0, 2**31, size=len(jobs))
    out: list[np.ndarray] = [np.zeros(0, np.float32)] * len(jobs)
    workers = int(workers or max(1, os.cpu_count() or 1) * 2)
    with progress_bar(enabled=progress) as bar, ThreadPoolExecutor(workers) as ex:
        t = bar.add_task(f"espeak-ng: {len(jobs)} utterances", total=len(jobs))
        for i, x in enumerate(ex.map(lambda j: speak(*j), jobs)):
            out[i] = add_noise(x, snrs[i], np.random.default_rng(noise_seeds[i]))
            bar.update(t, advance=1)
    peak = max(float(np.abs(x).max()) for x in out) + 1e-9
    audio = np.concatenate([np.round(x / peak * 32767).astype(np.int16) for x in out])
    offsets = np.r_[0, np.cumsum([len(x) for x in out])]
    with atomic_output(path, overwrite=True) as tmp, tmp.open("wb") as f:
        np.savez(
            f,
            audio=audio,
            offsets=offsets,
            texts=np.array(texts),
            speakers=np.array([vs[v]["voice"] for v in who]),
            is_test=np.r_[np.zeros(n_train, bool), np.ones(n_test, bool)],
        )


def load_librispeech(
    root: str | os.PathLike, split: str, max_utts: int | None = None
) -> list[Utterance]:
    """Utterances of one LibriSpeech split.

    Layout: ``<root>/<split>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac`` beside
    ``<speaker>-<chapter>.trans.txt`` (lines ``<speaker>-<chapter>-<utt> TRANSCRIPT``).
    """
    import soundfile as sf
    from scipy.signal import resample_poly

    base = Path(root) / split
    if not base.is_dir():
        raise UserError(
            f"LibriSpeech split {base} not found: set data.root to the folder holding {split}/ "
            "(from https://www.openslr.org/12)"
        )
    trans = sorted(base.glob("*/*/*.trans.txt"))
    if not trans:
        raise UserError(
            f"no <speaker>-<chapter>.trans.txt files under {base}: is it a LibriSpeech split?"
        )
    out: list[Utterance] = []
    for tf in trans:
        for line in tf.read_text().splitlines():
            uid, _, text = line.strip().partition(" ")
            if not uid:
                continue
            flac = tf.parent / f"{uid}.flac"
            if not flac.is_file():
                raise UserError(f"{tf} lists {uid} but {flac} is missing: re-extract the archive")
            x, sr = sf.read(flac, dtype="float32")
            if x.ndim > 1:
                x = x.mean(1)
            if sr != SAMPLE_RATE:
                g = math.gcd(SAMPLE_RATE, sr)
                x = resample_poly(x, SAMPLE_RATE // g, sr // g).astype(np.float32)
            out.append(Utterance(x, normalise_text(text), uid.split("-")[0]))
            if max_utts is not None and len(out) >= int(max_utts):
                return out
    return out


# -- features -------------------------------------------------------------------------------------


def mel_filterbank(
    n_mels: int, n_fft: int, sr: int = SAMPLE_RATE, fmin: float = 20.0, fmax: float | None = None
) -> np.ndarray:
    """Triangular HTK-mel filters ``[n_mels, n_fft // 2 + 1]``, each peaking at 1."""
    fmax = fmax or sr / 2

    def mel(f: np.ndarray | float) -> np.ndarray:
        return 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)

    def hz(m: np.ndarray) -> np.ndarray:
        return 700.0 * (10 ** (m / 2595.0) - 1.0)

    edges = hz(np.linspace(mel(fmin), mel(fmax), n_mels + 2))
    freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs[None] - lo) / (mid - lo)
    down = (hi - freqs[None]) / (hi - mid)
    return np.maximum(0.0, np.minimum(up, down)).astype(np.float32)


def log_mel(audio: np.ndarray, feats: Mapping[str, Any]) -> torch.Tensor:
    """Normalised log-mel filterbanks ``[frames // stack, n_mels * stack]`` of 16 kHz ``audio``.

    Frames are ``win_ms`` long every ``hop_ms``; each utterance is mean/variance normalised per
    band (the channel and the noise level differ per voice), then ``stack`` consecutive frames
    are concatenated, which cuts the Transformer's sequence length by that factor.
    """
    win = round(SAMPLE_RATE * float(feats["win_ms"]) / 1000)
    hop = round(SAMPLE_RATE * float(feats["hop_ms"]) / 1000)
    n_fft = 1 << (win - 1).bit_length()
    x = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
    if len(x) < n_fft:
        x = torch.nn.functional.pad(x, (0, n_fft - len(x)))
    spec = torch.stft(x, n_fft, hop, win, torch.hann_window(win), center=True, return_complex=True)
    power = spec.abs() ** 2  # [freq, frames]
    fb = torch.from_numpy(mel_filterbank(int(feats["n_mels"]), n_fft))
    m = torch.log(fb @ power + 1e-6).T  # [frames, n_mels]
    m = (m - m.mean(0)) / (m.std(0) + 1e-5)
    k = int(feats["stack"])
    t = (len(m) // k) * k
    if t == 0:
        m, t = torch.nn.functional.pad(m, (0, 0, 0, k - len(m))), k
    return m[:t].reshape(t // k, k * m.shape[1])


# -- model ----------------------------------------------------------------------------------------


class FeedForward(nn.Module):
    """``ff1`` (BB fan-in) -> ReLU -> dropout -> ``ff2`` (BB fan-out): the pruned pair."""

    def __init__(self, d: int, hidden: int, dropout: float):
        super().__init__()
        self.ff1 = nn.Linear(d, hidden)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(dropout)
        self.ff2 = nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ff2(self.drop(self.act(self.ff1(x))))


class Block(nn.Module):
    """Pre-norm Transformer encoder layer (self-attention, then the feed-forward block)."""

    def __init__(self, d: int, heads: int, hidden: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(d)
        self.ffn = FeedForward(d, hidden, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.drop(self.attn(h, h, h, key_padding_mask=pad, need_weights=False)[0])
        return x + self.drop(self.ffn(self.norm2(x)))


class CTCTransformer(nn.Module):
    """Stacked log-mel frames ``[B, T, F]`` -> CTC log-probabilities ``[B, T, len(CHARS) + 1]``."""

    def __init__(
        self,
        n_in: int,
        d_model: int = 128,
        heads: int = 4,
        layers: int = 4,
        ff: int = 512,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.inp = nn.Sequential(
            nn.Linear(n_in, d_model), nn.LayerNorm(d_model), nn.Dropout(dropout)
        )
        self.blocks = nn.ModuleList(Block(d_model, heads, ff, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, len(CHARS) + 1)
        self.d = d_model

    def positions(self, t: int, device: torch.device) -> torch.Tensor:
        pos = torch.arange(t, device=device, dtype=torch.float32)[:, None]
        div = torch.exp(torch.arange(0, self.d, 2, device=device) * (-math.log(1e4) / self.d))
        pe = torch.zeros(t, self.d, device=device)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
        return pe

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        pad = None
        if lengths is not None:
            pad = torch.arange(x.shape[1], device=x.device)[None] >= lengths[:, None]
        h = self.inp(x) + self.positions(x.shape[1], x.device)
        for blk in self.blocks:
            h = blk(h, pad)
        return self.out(self.norm(h)).log_softmax(-1)


def build_model(cfg: Mapping[str, Any]) -> CTCTransformer:
    m, f = cfg["model"], cfg["features"]
    return CTCTransformer(
        int(f["n_mels"]) * int(f["stack"]),
        int(m["d_model"]),
        int(m["heads"]),
        int(m["layers"]),
        int(m["ff"]),
        float(m["dropout"]),
    )


# -- metrics --------------------------------------------------------------------------------------


def frequency_buckets(train_texts: Sequence[str]) -> dict[str, str]:
    """Word -> ``head`` / ``middle`` / ``tail``: thirds of the training vocabulary by frequency.

    Words never seen in training are ``tail`` too (look them up with ``.get(w, "tail")``).
    """
    counts = Counter(w for t in train_texts for w in t.split())
    ranked = sorted(counts, key=lambda w: (-counts[w], w))
    n = len(ranked)
    return {
        w: ("head" if i < n / 3 else "middle" if i < 2 * n / 3 else "tail")
        for i, w in enumerate(ranked)
    }


def wer_report(
    refs: Sequence[str], hyps: Sequence[str], buckets: Mapping[str, str]
) -> dict[str, float]:
    """``wer`` and ``cer`` (jiwer) and ``wer_head/middle/tail``.

    A bucket's WER is (substituted + deleted reference words of that bucket) / (its reference
    words); insertions belong to no reference word, so only the overall WER counts them.
    """
    import jiwer

    keep = [i for i, r in enumerate(refs) if r.strip()]
    refs, hyps = [refs[i] for i in keep], [hyps[i] for i in keep]
    if not refs:
        raise UserError("no non-empty reference transcripts to score")
    words = jiwer.process_words(list(refs), list(hyps))
    out = {"wer": float(words.wer), "cer": float(jiwer.cer(list(refs), list(hyps)))}
    err: Counter[str] = Counter()
    tot: Counter[str] = Counter()
    for ref, chunks in zip(refs, words.alignments, strict=True):
        rw = ref.split()
        for c in chunks:
            for w in rw[c.ref_start_idx : c.ref_end_idx]:
                b = buckets.get(w, "tail")
                tot[b] += 1
                err[b] += c.type != "equal"
    for b in ("head", "middle", "tail"):
        out[f"wer_{b}"] = err[b] / tot[b] if tot[b] else float("nan")
    return out


# -- task -----------------------------------------------------------------------------------------


@dataclass
class Features:
    """Utterances as model inputs: ``x[i]`` ``[T_i, F]``, ``y[i]`` label list, ``text[i]``."""

    x: list[torch.Tensor]
    y: list[list[int]]
    text: list[str]

    @classmethod
    def of(cls, utts: Sequence[Utterance], feats: Mapping[str, Any]) -> Features:
        x = [log_mel(u.audio, feats) for u in utts]
        text = [normalise_text(u.text) for u in utts]
        return cls(x, [encode(t) for t in text], text)

    def batch(
        self, idx: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Padded ``x [B, T, F]``, ``lengths [B]``, concatenated ``targets``, ``target_lengths``."""
        xs = [self.x[i] for i in idx]
        lengths = torch.tensor([len(x) for x in xs])
        x = nn.utils.rnn.pad_sequence(xs, batch_first=True)
        ys = [self.y[i] for i in idx]
        targets = torch.tensor([c for y in ys for c in y], dtype=torch.long)
        return x, lengths, targets, torch.tensor([len(y) for y in ys])


def spec_augment(x: torch.Tensor, aug: Mapping[str, Any], gen: torch.Generator) -> torch.Tensor:
    """Zero random time spans and feature bands of ``x`` ``[B, T, F]`` (SpecAugment-style)."""
    x = x.clone()
    b, t, f = x.shape
    for _ in range(int(aug.get("time_masks", 0))):
        w = torch.randint(0, int(aug["time_width"]) + 1, (b,), generator=gen)
        s = (torch.rand(b, generator=gen) * (t - w).clamp(min=1)).long()
        ar = torch.arange(t)[None]
        x[(ar >= s[:, None]) & (ar < (s + w)[:, None])] = 0
    for _ in range(int(aug.get("freq_masks", 0))):
        w = torch.randint(0, int(aug["freq_width"]) + 1, (b,), generator=gen)
        s = (torch.rand(b, generator=gen) * (f - w).clamp(min=1)).long()
        ar = torch.arange(f)[None]
        band = (ar >= s[:, None]) & (ar < (s + w)[:, None])
        x = x.masked_fill(band[:, None, :], 0)
    return x


def load_data(
    cfg: Mapping[str, Any], progress: bool = True
) -> tuple[list[Utterance], list[Utterance]]:
    d = cfg["data"]
    src = str(d["source"])
    if src == "synth":
        return synth_corpus(d, progress)
    if src == "librispeech":
        if not d.get("root"):
            raise UserError(
                "data.source is librispeech but data.root is not set: point it at the LibriSpeech folder"
            )
        return (
            load_librispeech(d["root"], d["train_split"], d.get("max_utts")),
            load_librispeech(d["root"], d["test_split"], d.get("max_utts")),
        )
    raise UserError(f"data.source {src!r} is unknown: use synth or librispeech")


class AsrTask(Task):
    """CTC training of :class:`CTCTransformer` on log-mel features; best.pt has the lowest WER.

    A batch is ``(x [B, T, F] with SpecAugment applied, lengths [B], targets, target_lengths)``.
    """

    name = "asr"
    score_name = "val_wer"
    higher_is_better = False

    def __init__(self, cfg: Mapping[str, Any], progress: bool = True):
        train_u, test_u = load_data(cfg, progress)
        if not train_u or not test_u:
            raise UserError(
                "the ASR corpus has an empty train or test set: raise data.n_train / n_test"
            )
        self.cfg = cfg
        self.train = Features.of(train_u, cfg["features"])
        self.test = Features.of(test_u, cfg["features"])
        self.buckets = frequency_buckets(self.train.text)
        self.ctc = nn.CTCLoss(blank=BLANK, zero_infinity=True)
        self.gen = torch.Generator()  # SpecAugment's draws, restarted with the batch stream
        self.bb_layers = list(cfg["model"]["bb_layers"])
        self.bb_modes = dict(cfg["model"]["bb_modes"] or {})

    def build_model(self) -> nn.Module:
        return build_model(self.cfg)

    def batches(self, step: int, seed: int) -> Iterator[Any]:
        rng = np.random.default_rng(seed)
        self.gen.manual_seed(seed)
        bs = int(self.cfg["optim"]["batch_size"])
        # bucket by length so a batch pads little
        order = np.argsort([len(x) for x in self.train.x], kind="stable")
        groups = [order[i : i + bs] for i in range(0, len(order), bs)]
        while True:
            for g in rng.permutation(len(groups)):
                x, lengths, targets, tl = self.train.batch(groups[g].tolist())
                yield spec_augment(x, self.cfg["augment"], self.gen), lengths, targets, tl

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        x, lengths, targets, tl = batch
        return self.ctc(model(x, lengths).transpose(0, 1), targets, lengths, tl)

    def evaluate(self, model: nn.Module) -> Evaluation:
        te = self.test
        device = next(model.parameters()).device
        order = np.argsort([len(x) for x in te.x])
        hyps = [""] * len(te.x)
        units = UnitMeans(model, ["*.ffn.act"], channel_dim=-1)  # the feed-forward hidden units
        for i in range(0, len(order), 64):
            idx = order[i : i + 64].tolist()
            x, lengths, _, _ = te.batch(idx)
            units.valid = torch.arange(x.shape[1])[None] < lengths[:, None]
            lp = model(x.to(device), lengths.to(device))
            for j, h in zip(idx, ctc_greedy(lp, lengths), strict=True):
                hyps[j] = h
        out = {f"val_{k}": v for k, v in wer_report(te.text, hyps, self.buckets).items()}
        return Evaluation(out | {"val_decorrelation": units.decorrelation()})


def make_task(cfg: Mapping[str, Any], progress: bool = True) -> AsrTask:
    """Data, features, model, loss and evaluation of one ASR run."""
    return AsrTask(cfg, progress)


def run(cfg: Mapping[str, Any], run_dir: str | os.PathLike, resume: bool = False) -> dict[str, Any]:
    """Train and evaluate one ASR run in ``run_dir`` (or resume it); returns the last metrics row."""
    quiet = bool(cfg["train"].get("quiet", False))
    task = make_task(cfg, progress=not quiet)
    return fit(task, cfg, run_dir, resume=resume, progress=not quiet)


def run_from_cli(
    config: str | None,
    overrides: Sequence[str] = (),
    run_dir: str | None = None,
    resume: str | None = None,
) -> None:
    """``bbem asr CONFIG [--set k=v] [--run-dir DIR]`` or ``bbem asr --resume RUN_DIR``."""
    common.run_from_cli(
        "asr", "configs/asr_quick.yaml", DEFAULTS, run, config, overrides, run_dir, resume
    )
