"""Face identification with BB: a small bottleneck ResNet with a CosFace head.

``bbem faceid configs/faceid.yaml`` trains on faces made here: a generator of many identities,
each with a stable face geometry and skin texture, rendered with per-image pose, lighting,
expression and noise. No identity-labelled face set ships with this machine, so that is the
honest stand-in; real users point ``data.source: folder`` at a folder-per-identity tree
(VGGFace2, LFW, ImageFolder). As a real-image check, the face crops scikit-image bundles
(``skimage.data.lfw_subset()``, no identities) are verified against augmented copies of
themselves with the trained embedding.

BB sits on the 1x1 convolutions of the bottleneck blocks (fan-in mode). Reported: top-1
identification on held-out images of known identities, and verification of unseen
identities (ROC AUC by Mann-Whitney ranks, true accept rate at a false accept rate of 1e-2).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bbem.atomic import atomic_output
from bbem.companions import common
from bbem.companions.common import UnitMeans, cache_key
from bbem.engine import Evaluation, Task, fit
from bbem.errors import UserError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".pgm")

DEFAULTS: dict[str, Any] = {
    "task": "faceid",
    "data": {
        "source": "synth",  # synth | folder
        "root": None,  # folder-per-identity tree for source: folder
        "size": 32,  # images are square, grey, this many pixels a side
        "cache_dir": "data/faceid",
        "n_known": 300,  # identities seen in training
        "train_per_id": 10,
        "test_per_id": 4,  # held-out images of known identities (identification)
        "n_unseen": 100,  # identities never seen in training (verification)
        "unseen_per_id": 6,
        "unseen_fraction": 0.25,  # source: folder: share of identities kept unseen
        "difficulty": 1.0,  # scales pose, lighting, expression and noise
        "real_check": True,  # verify skimage's real face crops against their augmentations
        "seed": 0,
    },
    "model": {
        "width": 24,
        "stages": [[16, 64, 2, 2], [32, 128, 2, 2], [64, 256, 2, 2]],  # mid, out, blocks, stride
        "embed": 128,
        "margin": 0.25,
        "scale": 16.0,
        "bb_layers": ["*.conv1", "*.conv3"],  # the 1x1 convs of every bottleneck block
        "bb_modes": {},
    },
    "augment": {"flip": True, "shift": 2},
    "bb": {"method": "bb", "mode": "in", "density": 0.5, "warmup_steps": 200, "refresh_every": 50},
    "optim": {
        "lr": 2e-3,
        "weight_decay": 5e-4,
        "batch_size": 64,
        "grad_clip": 5.0,
        "warmup_steps": 100,
        # The cosine ends at 5% of lr, not 0: these short from-scratch runs still learn at the
        # end (400 dense steps of configs/faceid.yaml: top-1 0.405 with the floor, 0.372 without).
        "lr_floor": 0.05,
    },
    "train": {
        "steps": 1500,
        "eval_every": 250,
        "checkpoint_every": 250,
        "seed": 0,
        "device": "cpu",
        "log_every": 10,
        "threads": None,
        "quiet": False,
    },
}


# -- synthetic identities -------------------------------------------------------------------------


def identity_params(rng: np.random.Generator) -> dict[str, Any]:
    """The stable look of one identity: geometry, tones, texture and accessories."""
    u = rng.uniform
    return {
        "face_a": u(0.52, 0.72),
        "face_b": u(0.68, 0.88),
        "jaw": u(-0.15, 0.2),  # narrows (or widens) the lower face
        "skin": u(0.45, 0.85),
        "hair": u(0.02, 0.5),
        "hairline": u(-0.62, -0.3),
        "hair_side": u(0.0, 0.2),
        "eye_y": u(-0.22, -0.05),
        "eye_dx": u(0.2, 0.34),
        "eye_r": u(0.06, 0.11),
        "eye_dark": u(0.05, 0.35),
        "brow_dy": u(0.08, 0.16),
        "brow_w": u(0.08, 0.16),
        "brow_t": u(0.015, 0.04),
        "brow_tilt": u(-0.3, 0.3),
        "nose_len": u(0.12, 0.3),
        "nose_w": u(0.04, 0.1),
        "mouth_y": u(0.3, 0.5),
        "mouth_w": u(0.14, 0.3),
        "lip": u(0.15, 0.5),
        "texture": rng.normal(0, 1, (6, 6)),
        "moles": rng.uniform(-0.5, 0.5, (int(rng.integers(0, 4)), 2)),
        "glasses": bool(rng.random() < 0.2),
        "beard": float(u(0.3, 0.8)) if rng.random() < 0.2 else 0.0,
    }


def _soft(d: np.ndarray, edge: float) -> np.ndarray:
    """1 inside (d < 0), 0 outside, with a smooth edge about ``edge`` wide."""
    return 0.5 * (1 - np.tanh(d / edge))


def render_face(
    p: Mapping[str, Any], rng: np.random.Generator, size: int = 32, difficulty: float = 1.0
) -> np.ndarray:
    """One image ``[size, size]`` in [0, 1] of identity ``p`` with a random pose, lighting,
    expression and noise (their ranges scale with ``difficulty``)."""
    from scipy.ndimage import gaussian_filter, zoom

    k = float(difficulty)
    u = rng.uniform
    # pose: in-plane rotation, scale, shift, and yaw (inner features slide sideways)
    rot, scale = u(-0.25, 0.25) * k, 1 + u(-0.1, 0.1) * k
    tx, ty, yaw = u(-0.08, 0.08) * k, u(-0.08, 0.08) * k, u(-0.35, 0.35) * k
    smile, mouth_open = u(-1, 1) * k, max(0.0, u(-0.5, 1)) * k
    eye_open, brow_up = 1 - u(0, 0.6) * k, u(-0.03, 0.05) * k
    edge = 1.5 / size

    g = (np.arange(size) + 0.5) / size * 2 - 1
    yy, xx = np.meshgrid(g, g, indexing="ij")
    c, s = math.cos(rot), math.sin(rot)
    x = (c * (xx - tx) + s * (yy - ty)) / scale
    y = (-s * (xx - tx) + c * (yy - ty)) / scale

    bg = 0.5 + u(-0.4, 0.4) * k + u(-0.2, 0.2) * k * xx
    img = np.array(bg, dtype=np.float64)
    # face oval with a jaw that narrows below the eyes
    width = p["face_a"] * (1 - p["jaw"] * np.clip(y, 0, 1))
    face = _soft(np.sqrt((x / width) ** 2 + (y / p["face_b"]) ** 2) - 1, edge * 2)
    tex = p.get("_tex")
    if tex is None or tex.shape != (size, size):  # cached per identity by synth_faces
        tex = zoom(p["texture"], size / p["texture"].shape[0], order=3)[:size, :size]
    skin = p["skin"] + 0.05 * tex
    img = img * (1 - face) + skin * face
    # hair: the top of the head and the sides
    hair = _soft(y - p["hairline"] - p["hair_side"] * np.abs(x), edge * 2) * _soft(
        np.sqrt((x / (p["face_a"] * 1.08)) ** 2 + (y / (p["face_b"] * 1.08)) ** 2) - 1, edge * 2
    )
    img = img * (1 - hair) + p["hair"] * hair
    fx = x - yaw * 0.15  # inner features shift with yaw
    for side in (-1, 1):
        ex = side * p["eye_dx"] * (1 - 0.3 * yaw * side)
        ey = p["eye_y"]
        eye = _soft(
            np.sqrt(
                ((fx - ex) / p["eye_r"]) ** 2
                + ((y - ey) / (p["eye_r"] * 0.6 * eye_open + 1e-3)) ** 2
            )
            - 1,
            edge,
        )
        img = img * (1 - eye) + p["eye_dark"] * eye
        by = ey - p["brow_dy"] - brow_up + side * p["brow_tilt"] * (fx - ex) * 0.5
        brow = _soft(np.maximum(np.abs(fx - ex) - p["brow_w"], np.abs(y - by) - p["brow_t"]), edge)
        img = img * (1 - 0.8 * brow) + 0.8 * brow * p["hair"]
        if p["glasses"]:
            ring = _soft(
                np.abs(np.sqrt((fx - ex) ** 2 + (y - ey) ** 2) - p["eye_r"] * 1.9) - 0.02, edge
            )
            img = img * (1 - ring) + 0.1 * ring
    # nose: a shaded wedge down the middle
    ny = np.clip((y - p["eye_y"]) / p["nose_len"], 0, 1)
    nose = (
        _soft(np.abs(fx) - p["nose_w"] * ny, edge)
        * (y > p["eye_y"])
        * (y < p["eye_y"] + p["nose_len"])
    )
    img = img - 0.12 * nose * (fx > 0) + 0.06 * nose * (fx <= 0)
    # mouth: a curved band; smiles bend it, opening thickens it
    my = p["mouth_y"] - smile * 0.08 * (1 - (fx / p["mouth_w"]) ** 2)
    mouth = _soft(
        np.maximum(np.abs(fx) - p["mouth_w"], np.abs(y - my) - (0.02 + 0.05 * mouth_open)), edge
    )
    img = img * (1 - mouth) + p["lip"] * (1 - 0.5 * mouth_open) * mouth
    if p["beard"] > 0:
        beard = face * _soft(p["mouth_y"] - 0.12 - y, edge * 3)
        img = img * (1 - p["beard"] * beard) + p["hair"] * p["beard"] * beard
    for mx, my_ in p["moles"]:
        img -= (
            0.25 * face * _soft(np.hypot(x - mx * p["face_a"], y - my_ * p["face_b"]) - 0.03, edge)
        )
    # lighting: a directional gradient and a global gain/gamma
    th = u(0, 2 * math.pi)
    img = img * (1 + u(0, 0.5) * k * (math.cos(th) * xx + math.sin(th) * yy))
    img = np.clip(img * u(1 - 0.3 * k, 1 + 0.2 * k), 0, 1) ** u(1 - 0.3 * k, 1 + 0.4 * k)
    img = gaussian_filter(img, u(0, 0.8) * k)
    img = img + rng.normal(0, u(0.01, 0.05) * k, img.shape)
    return np.clip(img, 0, 1).astype(np.float32)


def synth_faces(
    n_ids: int, per_id: int, seed: int, size: int = 32, difficulty: float = 1.0, id_offset: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``images [n_ids * per_id, size, size]`` float32 and ``labels`` (0..n_ids-1).

    Identity ``i`` looks the same for a given ``seed`` whatever ``per_id`` is; pass
    ``id_offset`` to draw identities disjoint from another call's.
    """
    from scipy.ndimage import zoom

    imgs = np.empty((n_ids * per_id, size, size), np.float32)
    for i in range(n_ids):
        ident = identity_params(np.random.default_rng([seed, id_offset + i, 0]))
        img_rng = np.random.default_rng([seed, id_offset + i, 1])
        ident["_tex"] = zoom(ident["texture"], size / ident["texture"].shape[0], order=3)
        for j in range(per_id):
            imgs[i * per_id + j] = render_face(ident, img_rng, size, difficulty)
    return imgs, np.repeat(np.arange(n_ids), per_id)


@dataclass
class FaceData:
    """Train and identification-test images of known identities, and unseen identities."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    unseen_x: np.ndarray
    unseen_y: np.ndarray

    @property
    def n_classes(self) -> int:
        return int(self.train_y.max()) + 1


def synth_data(d: Mapping[str, Any]) -> FaceData:
    """The generated sets, cached under ``data.cache_dir/<hash>/faces.npz``."""
    keys = (
        "size",
        "n_known",
        "train_per_id",
        "test_per_id",
        "n_unseen",
        "unseen_per_id",
        "difficulty",
        "seed",
    )
    spec = {k: d[k] for k in keys}
    path = Path(d["cache_dir"]) / cache_key({"v": 2, **spec}) / "faces.npz"
    if not path.is_file():
        size, seed, k = int(d["size"]), int(d["seed"]), float(d["difficulty"])
        n_tr, n_te = int(d["train_per_id"]), int(d["test_per_id"])
        x, y = synth_faces(int(d["n_known"]), n_tr + n_te, seed, size, k)
        first = (np.arange(len(y)) % (n_tr + n_te)) < n_tr
        ux, uy = synth_faces(
            int(d["n_unseen"]), int(d["unseen_per_id"]), seed, size, k, id_offset=10**6
        )
        with atomic_output(path, overwrite=True) as tmp, tmp.open("wb") as f:
            np.savez(
                f,
                train_x=x[first],
                train_y=y[first],
                test_x=x[~first],
                test_y=y[~first],
                unseen_x=ux,
                unseen_y=uy,
            )
    z = np.load(path)
    return FaceData(**{k: z[k] for k in z.files})


# -- folder-per-identity data ---------------------------------------------------------------------


def load_image_folder(
    root: str | os.PathLike, size: int
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``<root>/<identity>/<image>`` (VGGFace2, LFW, ImageFolder) as grey ``[N, size, size]``
    float32 in [0, 1], integer labels ``[N]`` and the identity names (label order)."""
    from skimage.color import rgb2gray
    from skimage.io import imread
    from skimage.transform import resize

    base = Path(root)
    if not base.is_dir():
        raise UserError(
            f"image folder {base} not found: set data.root to a folder of <identity>/<image> files"
        )
    names = sorted(p.name for p in base.iterdir() if p.is_dir())
    imgs: list[np.ndarray] = []
    labels: list[int] = []
    kept: list[str] = []
    for name in names:
        files = sorted(f for f in (base / name).iterdir() if f.suffix.lower() in IMAGE_EXTS)
        if not files:
            continue
        label = len(kept)
        kept.append(name)
        for f in files:
            try:
                a = imread(f)
            except Exception as e:
                raise UserError(f"cannot read image {f} ({e}): remove or replace it") from None
            if a.ndim == 3:
                a = rgb2gray(a[..., :3]) if a.shape[-1] in (3, 4) else a.mean(-1)
            a = a.astype(np.float32)
            if a.max() > 1.0:
                a = a / (65535.0 if a.max() > 255 else 255.0)
            imgs.append(resize(a, (size, size), anti_aliasing=True).astype(np.float32))
            labels.append(label)
    if not imgs:
        raise UserError(f"no images ({', '.join(IMAGE_EXTS)}) in <identity>/ folders under {base}")
    return np.stack(imgs), np.asarray(labels), kept


def split_identities(
    x: np.ndarray, y: np.ndarray, unseen_fraction: float, test_per_id: int, seed: int
) -> FaceData:
    """Known identities (train images + ``test_per_id`` held-out images each) and unseen ones.

    Identities with too few images to hold any out go to the unseen (verification) side.
    """
    rng = np.random.default_rng(seed)
    ids = rng.permutation(np.unique(y))
    counts = np.bincount(y)
    n_unseen = round(unseen_fraction * len(ids))
    unseen = set(ids[:n_unseen].tolist()) | {i for i in ids if counts[i] <= test_per_id}
    known = [i for i in ids if i not in unseen]
    if not known:
        raise UserError(f"no identity has more than {test_per_id} images: lower data.test_per_id")
    remap = {old: new for new, old in enumerate(sorted(known))}
    tr, te = [], []
    for i in known:
        idx = rng.permutation(np.flatnonzero(y == i))
        te += idx[:test_per_id].tolist()
        tr += idx[test_per_id:].tolist()
    un = np.flatnonzero(np.isin(y, sorted(unseen)))
    relabel = np.vectorize(remap.get)
    return FaceData(x[tr], relabel(y[tr]), x[te], relabel(y[te]), x[un], np.asarray(y[un]))


# -- model ----------------------------------------------------------------------------------------


class Bottleneck(nn.Module):
    """1x1 reduce (``conv1``) -> 3x3 (``conv2``) -> 1x1 expand (``conv3``), plus the shortcut.

    Each conv is followed by its norm and its own ReLU, registered in that order, so BB finds
    the activation whose on-rate belongs to each layer (``act3`` is after the residual sum).
    """

    def __init__(self, c_in: int, mid: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.act2 = nn.ReLU()
        self.conv3 = nn.Conv2d(mid, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.act3 = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act1(self.bn1(self.conv1(x)))
        h = self.act2(self.bn2(self.conv2(h)))
        return self.act3(self.bn3(self.conv3(h)) + self.shortcut(x))


class FaceResNet(nn.Module):
    """Grey faces ``[B, 1, H, W]`` -> L2-normalised embeddings ``[B, embed]``; ``logits`` adds
    the CosFace classifier over the training identities."""

    def __init__(
        self,
        n_classes: int,
        width: int = 24,
        stages: Sequence[Sequence[int]] = ((16, 64, 2, 2), (32, 128, 2, 2), (64, 256, 2, 2)),
        embed: int = 128,
        margin: float = 0.25,
        scale: float = 16.0,
    ):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        blocks, c = [], width
        for mid, out, n, stride in stages:
            blocks.append(
                nn.Sequential(
                    *(
                        Bottleneck(c if j == 0 else out, mid, out, stride if j == 0 else 1)
                        for j in range(n)
                    )
                )
            )
            c = out
        self.stages = nn.Sequential(*blocks)
        self.embed = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.1), nn.Linear(c, embed), nn.BatchNorm1d(embed)
        )
        self.classes = nn.Parameter(torch.randn(n_classes, embed) * 0.01)
        self.margin, self.scale = float(margin), float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stages(self.stem(x)).mean((2, 3), keepdim=True)
        return F.normalize(self.embed(h), dim=1)

    def logits(self, emb: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Scaled cosines to the class centres, the target one lowered by the margin (CosFace)."""
        cos = emb @ F.normalize(self.classes, dim=1).T
        if labels is not None:
            cos = cos - self.margin * F.one_hot(labels, cos.shape[1])
        return self.scale * cos


def build_model(cfg: Mapping[str, Any], n_classes: int) -> FaceResNet:
    m = cfg["model"]
    return FaceResNet(
        n_classes,
        int(m["width"]),
        [tuple(int(v) for v in s) for s in m["stages"]],
        int(m["embed"]),
        float(m["margin"]),
        float(m["scale"]),
    )


# -- metrics --------------------------------------------------------------------------------------


def roc_auc(genuine: np.ndarray, impostor: np.ndarray) -> float:
    """Area under the ROC curve: P(genuine score > impostor score), ties half (Mann-Whitney U
    from average ranks)."""
    from scipy.stats import rankdata

    g, i = np.asarray(genuine, float).ravel(), np.asarray(impostor, float).ravel()
    if not len(g) or not len(i):
        raise ValueError("roc_auc needs at least one genuine and one impostor score")
    r = rankdata(np.r_[g, i])
    u = r[: len(g)].sum() - len(g) * (len(g) + 1) / 2
    return float(u / (len(g) * len(i)))


def tar_at_far(genuine: np.ndarray, impostor: np.ndarray, far: float = 1e-2) -> float:
    """True accept rate at the most lenient threshold whose false accept rate is <= ``far``.

    Accept means score > threshold; the threshold is the impostor score with ``floor(far * n)``
    impostors above it, so exactly that many are falsely accepted (none when ``far * n < 1``).
    """
    g, i = (
        np.sort(np.asarray(genuine, float).ravel()),
        np.sort(np.asarray(impostor, float).ravel())[::-1],
    )
    k = math.floor(far * len(i) + 1e-9)
    thr = i[k] if k < len(i) else -np.inf
    return float(np.mean(g > thr))


def pair_scores(emb: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarities of every unordered pair: (same-identity scores, different ones)."""
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    s = e @ e.T
    iu = np.triu_indices(len(e), 1)
    same = labels[iu[0]] == labels[iu[1]]
    return s[iu][same], s[iu][~same]


def verification(emb: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """ROC AUC and TAR at FAR 1e-2 and 1e-3 (``tar_far1e-2``, ``tar_far1e-3``) over every pair
    of ``emb`` ``[N, D]``. At 1e-3 a set needs a few thousand impostor pairs (the default
    100 unseen identities of 6 images give 178k) for the threshold to mean anything."""
    g, i = pair_scores(emb, labels)
    return {
        "auc": roc_auc(g, i),
        "tar_far1e-2": tar_at_far(g, i, 1e-2),
        "tar_far1e-3": tar_at_far(g, i, 1e-3),
    }


# -- real-image check ------------------------------------------------------------------------------


def real_faces(size: int) -> np.ndarray | None:
    """The 100 real face crops of ``skimage.data.lfw_subset()`` at ``size``, or None if absent.

    The set ships inside scikit-image (no download); the last 100 of its 200 images are not
    faces and are left out.
    """
    from skimage.transform import resize

    try:
        from skimage.data import lfw_subset

        faces = lfw_subset()[:100]
    except Exception:  # an install without the bundled file would need a download: skip
        return None
    return np.stack([resize(f, (size, size), anti_aliasing=True) for f in faces]).astype(np.float32)


def augment_copies(imgs: np.ndarray, copies: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``copies`` perturbed versions of each image (small rotation, shift, scale, gain, gamma,
    noise): ``[N * copies, H, W]`` and the index of the source image of each."""
    from skimage.transform import AffineTransform, warp

    rng = np.random.default_rng(seed)
    n, h, w = imgs.shape
    out = np.empty((n * copies, h, w), np.float32)
    c = np.array([w / 2 - 0.5, h / 2 - 0.5])
    for i in range(n):
        for j in range(copies):
            t = (
                AffineTransform(translation=-c)
                + AffineTransform(rotation=rng.uniform(-0.15, 0.15), scale=rng.uniform(0.92, 1.08))
                + AffineTransform(translation=c + rng.uniform(-1.5, 1.5, 2))
            )
            a = warp(imgs[i], t.inverse, mode="edge")
            a = np.clip(a * rng.uniform(0.8, 1.2), 0, 1) ** rng.uniform(0.8, 1.25)
            out[i * copies + j] = np.clip(a + rng.normal(0, 0.02, a.shape), 0, 1)
    return out, np.repeat(np.arange(n), copies)


# -- task -----------------------------------------------------------------------------------------


def load_data(cfg: Mapping[str, Any]) -> FaceData:
    d = cfg["data"]
    src = str(d["source"])
    if src == "synth":
        return synth_data(d)
    if src == "folder":
        if not d.get("root"):
            raise UserError(
                "data.source is folder but data.root is not set: point it at <identity>/<image> files"
            )
        x, y, _ = load_image_folder(d["root"], int(d["size"]))
        return split_identities(
            x, y, float(d["unseen_fraction"]), int(d["test_per_id"]), int(d["seed"])
        )
    raise UserError(f"data.source {src!r} is unknown: use synth or folder")


def _embed(m: FaceResNet, x: np.ndarray, bs: int = 256) -> np.ndarray:
    """Embeddings ``[N, embed]`` of images ``[N, H, W]``, computed where the model lives."""
    device = next(m.parameters()).device
    return np.concatenate(
        [m(_tensor(x[i : i + bs]).to(device)).cpu().numpy() for i in range(0, len(x), bs)]
    )


def _tensor(x: np.ndarray) -> torch.Tensor:
    # centred and scaled per image: lighting gain is a nuisance, not identity
    t = torch.from_numpy(np.ascontiguousarray(x))[:, None]
    mean = t.mean((2, 3), keepdim=True)
    return (t - mean) / (t.std((2, 3), keepdim=True) + 1e-3)


class FaceTask(Task):
    """CosFace training of :class:`FaceResNet`; best.pt has the highest top-1 identification.

    A batch is ``(images [B, 1, H, W] normalised and augmented, labels [B])``.
    """

    name = "faceid"
    score_name = "val_top1"
    higher_is_better = True

    def __init__(self, cfg: Mapping[str, Any]):
        self.cfg = cfg
        self.data = load_data(cfg)
        if len(self.data.unseen_x) < 2 or len(np.unique(self.data.unseen_y)) < 2:
            raise UserError(
                "verification needs at least two unseen identities: raise data.n_unseen "
                "(synth) or data.unseen_fraction (folder)"
            )
        real = real_faces(int(cfg["data"]["size"])) if cfg["data"]["real_check"] else None
        seed = int(cfg["train"]["seed"])
        self.real_aug = augment_copies(real, 4, seed) if real is not None else None
        self.bb_layers = list(cfg["model"]["bb_layers"])
        self.bb_modes = dict(cfg["model"]["bb_modes"] or {})

    def build_model(self) -> nn.Module:
        return build_model(self.cfg, self.data.n_classes)

    def batches(self, step: int, seed: int) -> Iterator[Any]:
        data, aug = self.data, self.cfg["augment"]
        rng = np.random.default_rng(seed)
        n = len(data.train_y)
        b = min(int(self.cfg["optim"]["batch_size"]), n)
        while True:
            order = rng.permutation(n)
            for s in range(0, n - b + 1, b):
                idx = order[s : s + b]
                x = _tensor(data.train_x[idx])
                if aug.get("flip"):
                    flip = torch.from_numpy(rng.random(b) < 0.5)
                    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
                sh = int(aug.get("shift", 0))
                if sh:
                    dy, dx = rng.integers(-sh, sh + 1, 2)
                    x = torch.roll(x, (int(dy), int(dx)), (2, 3))
                yield x, torch.from_numpy(data.train_y[idx]).long()

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        net = cast(FaceResNet, model)
        return F.cross_entropy(net.logits(net(x), y), y)

    def evaluate(self, model: nn.Module) -> Evaluation:
        data, model = self.data, cast(FaceResNet, model)
        emb = _embed(model, data.test_x)
        logits = model.logits(torch.from_numpy(emb).to(next(model.parameters()).device))
        top1 = float((logits.argmax(1).cpu().numpy() == data.test_y).mean())
        units = UnitMeans(model, ["*.act1", "*.act3"])  # the units whose fan-in BB prunes
        v = verification(_embed(model, data.unseen_x), data.unseen_y)
        out = {
            "val_top1": top1,
            "val_auc": v["auc"],
            "val_tar_far1e-2": v["tar_far1e-2"],
            "val_tar_far1e-3": v["tar_far1e-3"],
            "val_decorrelation": units.decorrelation(),
        }
        if self.real_aug is not None:
            r = verification(_embed(model, self.real_aug[0]), self.real_aug[1])
            out |= {"val_real_auc": r["auc"], "val_real_tar_far1e-2": r["tar_far1e-2"]}
        return Evaluation(out)


def make_task(cfg: Mapping[str, Any]) -> FaceTask:
    """Data, model, loss and evaluation of one face-identification run."""
    return FaceTask(cfg)


def run(cfg: Mapping[str, Any], run_dir: str | os.PathLike, resume: bool = False) -> dict[str, Any]:
    """Train and evaluate one face-identification run in ``run_dir`` (or resume it); the last row."""
    quiet = bool(cfg["train"].get("quiet", False))
    return fit(make_task(cfg), cfg, run_dir, resume=resume, progress=not quiet)


def run_from_cli(
    config: str | None,
    overrides: Sequence[str] = (),
    run_dir: str | None = None,
    resume: str | None = None,
) -> None:
    """``bbem faceid CONFIG [--set k=v] [--run-dir DIR]`` or ``bbem faceid --resume RUN_DIR``."""
    common.run_from_cli(
        "faceid", "configs/faceid.yaml", DEFAULTS, run, config, overrides, run_dir, resume
    )
