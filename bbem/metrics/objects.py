"""Object-level measures: connected components streamed through z-slabs, one-to-one matching.

A volume is processed as z-slabs of whole sections. Each slab is labelled with cc3d; labels that
touch across a slab face are joined afterwards with a union-find (scipy's graph components), so
the components are exactly those of the whole volume while only one slab is in memory. Per
component we keep its size, coordinate sum (for the centroid) and its overlaps with truth
instances; matching then needs no voxels at all. :func:`label_objects` writes the same
components out as instance ids (the labels of ``bbem infer`` and napari-bbem).
"""

from __future__ import annotations

from typing import Any

import cc3d
import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from bbem.errors import UserError
from bbem.metrics.cremi import coords

_FACE_SHIFTS = {
    6: [(0, 0)],
    18: [(0, 0), (0, 1), (0, -1), (1, 0), (-1, 0)],
    26: [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)],
}


class Objects:
    """Instances of a volume streamed in z-slabs: components of a binary mask, or given label ids.

    ``add(slab, z0)`` returns the slab's instance ids and their offset, so the caller can relate
    them to another :class:`Objects` (see :class:`Overlaps`); component ids are provisional until
    :meth:`finish` joins those that touch across slab faces.
    """

    def __init__(self, kind: str = "components", connectivity: int = 26) -> None:
        if kind not in ("components", "labels"):
            raise ValueError(f"kind must be 'components' or 'labels', got {kind!r}")
        if connectivity not in _FACE_SHIFTS:
            raise UserError(f"connectivity must be 6, 18 or 26, got {connectivity}")
        self.kind, self.connectivity = kind, connectivity
        self._n = 0
        self._sizes: list[np.ndarray] = []
        self._sums: list[np.ndarray] = []
        self._ids: list[np.ndarray] = []  # label mode: the ids each size/sum row belongs to
        self._edges: list[np.ndarray] = []
        self._prev: np.ndarray | None = None
        self._prev_z = -1

    def add(
        self, block: np.ndarray, z0: int, where: np.ndarray | None = None
    ) -> tuple[np.ndarray, int]:
        """Add a slab starting at section ``z0``; returns ``(ids, offset)``.

        components: ``block`` is bool; ``ids`` are the slab's local component labels (uint32),
        provisional global id = local + ``offset`` where local > 0. labels: ``block`` holds label
        ids, ``where`` (bool) the voxels that are instances; ``ids`` is ``block`` and offset 0.
        Local ids with an offset spare a whole-slab int64 copy.
        """
        if self.kind == "labels":
            self._add_labels(np.asarray(block), z0, where)
            return np.asarray(block), 0
        # cc3d's stub takes a Literal connectivity; ours is an int that __init__ checked
        lab, n = cc3d.connected_components(  # type: ignore[call-overload]
            np.asarray(block, dtype=bool),
            connectivity=self.connectivity,
            return_N=True,
            out_dtype=np.uint32,
        )
        offset = self._n
        if n:
            st = cc3d.statistics(lab, no_slice_conversion=True)
            counts = np.asarray(st["voxel_counts"][1:], dtype=np.float64)
            sums = np.asarray(st["centroids"][1:], dtype=np.float64) * counts[:, None]
            sums[:, 0] += z0 * counts
            self._sizes.append(counts)
            self._sums.append(sums)
        first = _globalise(lab[0], offset)
        if self._prev is not None and self._prev_z == z0 - 1:
            self._join(self._prev, first)
        self._n += n
        self._prev, self._prev_z = _globalise(lab[-1], offset), z0 + lab.shape[0] - 1
        return lab, offset

    def _add_labels(self, labels: np.ndarray, z0: int, where: np.ndarray | None) -> None:
        c = coords(labels != 0 if where is None else where, z0)
        ids, inv, counts = np.unique(
            labels[c[:, 0] - z0, c[:, 1], c[:, 2]], return_inverse=True, return_counts=True
        )
        if ids.size:
            sums = np.stack(
                [np.bincount(inv, weights=c[:, a], minlength=ids.size) for a in range(3)], 1
            )
            self._ids.append(ids)
            self._sizes.append(counts.astype(np.float64))
            self._sums.append(sums)

    def _join(self, a: np.ndarray, b: np.ndarray) -> None:
        """Record provisional ids that touch across the face between plane ``a`` and ``b``."""
        h, w = a.shape
        for dy, dx in _FACE_SHIFTS[self.connectivity]:
            sa = a[max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)]
            sb = b[max(0, dy) : h - max(0, -dy), max(0, dx) : w - max(0, -dx)]
            both = (sa > 0) & (sb > 0)
            if both.any():
                self._edges.append(np.unique(np.stack([sa[both], sb[both]], 1), axis=0))

    def n_instances(self) -> int:
        """Distinct label ids seen so far (labels), or provisional components (components)."""
        if self.kind == "labels":
            return int(np.unique(np.concatenate(self._ids)).size) if self._ids else 0
        return self._n

    def finish(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(keys, sizes, centroids, final_id)``.

        ``keys``: the final instance keys (components: 1..n; labels: the label ids), ``sizes`` and
        ``centroids`` (voxel units, z, y, x) per key. ``final_id`` maps a provisional component id
        to its index in ``keys`` (labels: an empty array; ids are their own keys).
        """
        sizes = np.concatenate(self._sizes) if self._sizes else np.zeros(0)
        sums = np.concatenate(self._sums) if self._sums else np.zeros((0, 3))
        if self.kind == "labels":
            ids = np.concatenate(self._ids) if self._ids else np.zeros(0, np.uint64)
            keys, inv = np.unique(ids, return_inverse=True)
            s = np.bincount(inv, weights=sizes, minlength=keys.size)
            c = np.stack(
                [np.bincount(inv, weights=sums[:, a], minlength=keys.size) for a in range(3)], 1
            )
            return keys, s, c / np.maximum(s, 1)[:, None], np.zeros(0, np.int64)
        n = self._n
        if self._edges:
            e = np.concatenate(self._edges) - 1
            g = coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(n, n))
            _, root = connected_components(g, directed=False)
        else:
            root = np.arange(n)
        m = int(root.max()) + 1 if n else 0
        s = np.bincount(root, weights=sizes, minlength=m)
        c = np.stack([np.bincount(root, weights=sums[:, a], minlength=m) for a in range(3)], 1)
        final = np.r_[-1, root].astype(np.int64)  # provisional id 0 (background) -> -1
        return np.arange(1, m + 1), s, c / np.maximum(s, 1)[:, None], final


def label_objects(
    mask: Any,
    out: Any | None = None,
    *,
    min_size: int = 0,
    connectivity: int = 26,
    slab: int = 16,
) -> int:
    """Number the connected components of ``mask`` 1..n into ``out``; returns n.

    ``mask``: a ``[Z, Y, X]`` array (numpy, zarr, ...; nonzero = object). ``out``: a writable
    array of its shape for the ids (uint32 or wider; default: ``mask`` itself, relabelled in
    place). Components of fewer than ``min_size`` voxels become 0. The others are numbered
    1..n in the z-y-x scan order of their first voxel (the one with the smallest ``(z, y, x)``,
    x fastest), so the ids depend on the volume only, never on ``slab``.

    Streamed in z-slabs of ``slab`` sections, one slab in memory: the first pass measures
    every component of the whole volume (:class:`Objects` joins pieces across slab faces) and
    finds its first voxel, the second labels each slab again and writes its final ids.
    In place, a run interrupted in the second pass and run again gives the same ids: the
    written slabs keep the same objects (ids instead of 1), the cleared voxels were parts of
    small components, and the components that stay are numbered among themselves.
    """
    z = int(mask.shape[0])
    plane = int(np.prod(mask.shape[1:], dtype=np.int64))
    slab = max(1, int(slab))
    dest = mask if out is None else out
    objs = Objects("components", connectivity)
    offsets: list[int] = []
    firsts: list[np.ndarray] = []  # per slab: global flat index of each local label's first voxel
    kept: np.ndarray | None = None  # the labels of a volume that is one slab: no second cc3d
    for z0 in range(0, z, slab):
        lab, offset = objs.add(np.asarray(mask[z0 : z0 + slab]) != 0, z0)
        offsets.append(offset)
        firsts.append(_first_voxels(lab, objs.n_instances() - offset) + z0 * plane)
        kept = lab if z <= slab else None
    n_prov = objs.n_instances()
    _, sizes, _, final = objs.finish()
    first = np.full(sizes.size, np.iinfo(np.int64).max, dtype=np.int64)
    if n_prov:
        np.minimum.at(first, final[1:], np.concatenate(firsts))
    keep = np.flatnonzero(sizes >= min_size)
    new_id = np.zeros(sizes.size, dtype=np.uint64)
    new_id[keep[np.argsort(first[keep], kind="stable")]] = np.arange(1, keep.size + 1)
    n = int(keep.size)
    dtype = np.dtype(dest.dtype)
    if dtype.kind not in "ui" or n > np.iinfo(dtype).max:
        raise ValueError(f"{n} objects do not fit the ids' dtype {dtype}")
    lut = np.r_[np.uint64(0), new_id[final[1:]]].astype(dtype)  # provisional id -> final id
    ends = [*offsets[1:], n_prov]
    for z0, offset, end in zip(range(0, z, slab), offsets, ends, strict=True):
        if out is None and end == offset:
            continue  # in place and no object in this slab: it already holds its zeros
        if kept is not None:
            lab = kept
        else:
            lab = cc3d.connected_components(  # type: ignore[call-overload]  # checked by Objects
                np.asarray(mask[z0 : z0 + slab]) != 0,
                connectivity=connectivity,
                out_dtype=np.uint32,
            )
        local = lut[offset : end + 1].copy()  # local label l -> lut[offset + l]
        local[0] = 0
        dest[z0 : z0 + slab] = local[lab]
    return n


def _first_voxels(lab: np.ndarray, n: int) -> np.ndarray:
    """Flat index (in ``lab``, C order) of the first voxel of each label 1..n of a slab."""
    first = np.full(n, -1, dtype=np.int64)
    todo = n
    plane = int(np.prod(lab.shape[1:], dtype=np.int64))
    for i in range(lab.shape[0]):  # a section at a time: index arrays of one section at most
        if not todo:
            break
        sec = lab[i].ravel()
        idx = np.flatnonzero(sec)
        if not idx.size:
            continue
        ids, at = np.unique(sec[idx], return_index=True)
        ids = ids.astype(np.int64) - 1
        new = first[ids] < 0
        first[ids[new]] = idx[at[new]] + i * plane
        todo -= int(new.sum())
    return first


def _globalise(plane: np.ndarray, offset: int) -> np.ndarray:
    g = plane.astype(np.int64)
    g[g > 0] += offset
    return g


class Overlaps:
    """Voxel counts of (prediction instance, truth instance) pairs, accumulated over slabs."""

    def __init__(self) -> None:
        self._pred: list[np.ndarray] = []
        self._truth: list[np.ndarray] = []
        self._counts: list[np.ndarray] = []

    def add(
        self,
        pred_ids: np.ndarray,
        pred_offset: int,
        truth_ids: np.ndarray,
        truth_where: np.ndarray,
        truth_offset: int = 0,
    ) -> None:
        """Count pairs where ``pred_ids > 0`` and ``truth_where``; ids are local + offset."""
        idx = np.flatnonzero((pred_ids > 0) & truth_where)  # one scan, two gathers
        if not idx.size:
            return
        tid = np.ravel(truth_ids)[idx]
        pid = np.ravel(pred_ids)[idx].astype(np.int64) + pred_offset
        tkeys, tinv = np.unique(tid, return_inverse=True)
        pairs, counts = np.unique(
            np.stack([pid, tinv.astype(np.int64)], 1), axis=0, return_counts=True
        )
        # truth label ids keep their dtype (uint64 CREMI ids need not fit int64)
        t = tkeys[pairs[:, 1]]
        self._truth.append(t.astype(np.int64) + truth_offset if truth_offset else t)
        self._pred.append(pairs[:, 0])
        self._counts.append(counts)

    def table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(pred ids, truth ids, voxel counts)``; a pair may repeat (once per slab)."""
        if not self._pred:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(self._pred), np.concatenate(self._truth), np.concatenate(self._counts)


def match(
    candidates: list[tuple[int, int, float]], maximize: bool = True
) -> list[tuple[int, int, float]]:
    """One-to-one matching of candidate (pred, truth, score) pairs.

    The matching has the largest number of pairs, and among those the best total score (largest
    when ``maximize``, else smallest); it is solved exactly by the Hungarian algorithm on each
    connected group of candidates, so it stays small however many objects there are.
    """
    if not candidates:
        return []
    p_keys = sorted({c[0] for c in candidates})
    t_keys = sorted({c[1] for c in candidates})
    pi = {k: i for i, k in enumerate(p_keys)}
    ti = {k: i for i, k in enumerate(t_keys)}
    n_p = len(p_keys)
    rows = np.array([pi[c[0]] for c in candidates])
    cols = np.array([ti[c[1]] for c in candidates]) + n_p
    g = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n_p + len(t_keys),) * 2)
    _, group = connected_components(g, directed=False)
    out: list[tuple[int, int, float]] = []
    scores = np.array([c[2] for c in candidates], dtype=np.float64)
    for gid in np.unique(group[rows]):
        sel = np.flatnonzero(group[rows] == gid)
        r_u, r_inv = np.unique(rows[sel], return_inverse=True)
        c_u, c_inv = np.unique(cols[sel], return_inverse=True)
        s = scores[sel]
        # lexicographic: every match is worth more than any total of score differences
        big = 1.0 + 2 * (np.abs(s).max() if s.size else 0) * (len(sel) + 1)
        w = np.zeros((len(r_u), len(c_u)))
        w[r_inv, c_inv] = big + (s if maximize else -s)
        r, c = linear_sum_assignment(w, maximize=True)
        for a, b in zip(r, c, strict=True):
            if w[a, b] > 0:
                k = sel[(r_inv == a) & (c_inv == b)][0]
                out.append((candidates[k][0], candidates[k][1], float(scores[k])))
    return out


def object_scores(
    pred_sizes: dict[int, float],
    truth_sizes: dict[int, float],
    matches: list[tuple[int, int, float]],
) -> dict[str, Any]:
    """Precision, recall, F1 and counts from a one-to-one matching."""
    tp, n_p, n_t = len(matches), len(pred_sizes), len(truth_sizes)
    precision = tp / n_p if n_p else 0.0
    recall = tp / n_t if n_t else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "tp": tp,
        "spurious": n_p - tp,
        "missed": n_t - tp,
        "n_pred": n_p,
        "n_true": n_t,
    }


def object_metrics(
    pred: Objects,
    truth: Objects,
    overlaps: Overlaps,
    *,
    min_size: int = 100,
    iou_thresholds: tuple[float, ...] = (0.2, 0.5),
    match_distance_nm: float | None = None,
    voxel_size: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> dict[str, Any]:
    """Match predicted components (at least ``min_size`` voxels) to truth instances.

    Reported per rule (``iou_0.2``: IoU > 0.2; ``centroid_<d>nm``: centroid distance <= d nm):
    precision, recall, f1, tp, missed (truth without match), spurious (prediction without
    match). Shared: ``split`` (truth instances touched by 2+ predictions), ``merged``
    (predictions touching 2+ truth instances), ``removed_small``.
    """
    p_keys, p_sizes, p_cent, p_final = pred.finish()
    t_keys, t_sizes, t_cent, t_final = truth.finish()
    pp, tt, counts = overlaps.table()
    # provisional ids -> final keys, then aggregate duplicate pairs
    pp = p_keys[p_final[pp]] if pred.kind == "components" else pp
    if truth.kind == "components":
        tt = t_keys[t_final[tt.astype(np.int64)]]
    agg: dict[tuple[int, int], int] = {}
    for a, b, c in zip(pp.tolist(), tt.tolist(), counts.tolist(), strict=True):
        agg[(a, b)] = agg.get((a, b), 0) + c
    keep = p_sizes >= min_size
    psz = dict(zip(p_keys[keep].tolist(), p_sizes[keep].tolist(), strict=True))
    tsz = {int(k): float(s) for k, s in zip(t_keys, t_sizes, strict=True)}
    overlap = {k: v for k, v in agg.items() if k[0] in psz}
    touched_t: dict[int, int] = {}
    touched_p: dict[int, int] = {}
    for a, b in overlap:
        touched_t[b] = touched_t.get(b, 0) + 1
        touched_p[a] = touched_p.get(a, 0) + 1
    out: dict[str, Any] = {
        "n_pred": len(psz),
        "n_true": len(tsz),
        "removed_small": int((~keep).sum()),
        "split": sum(1 for v in touched_t.values() if v > 1),
        "merged": sum(1 for v in touched_p.values() if v > 1),
    }
    ious = {(a, b): v / (psz[a] + tsz[b] - v) for (a, b), v in overlap.items()}
    for thr in iou_thresholds:
        cand = [(a, b, iou) for (a, b), iou in ious.items() if iou > thr]
        out[f"iou_{thr:g}"] = {"rule": f"IoU > {thr:g}", **object_scores(psz, tsz, match(cand))}
    if match_distance_nm is not None:
        vs = np.asarray(voxel_size, dtype=np.float64)
        pk = np.array(sorted(psz), dtype=np.int64)
        pc = p_cent[np.searchsorted(p_keys, pk)] * vs if pk.size else np.zeros((0, 3))
        cand = []
        if pk.size and t_keys.size:
            tree = cKDTree(t_cent * vs)
            for i, near in enumerate(tree.query_ball_point(pc, r=match_distance_nm)):
                for j in near:
                    d = float(np.linalg.norm(pc[i] - t_cent[j] * vs))
                    cand.append((int(pk[i]), int(t_keys[j]), d))
        out[f"centroid_{match_distance_nm:g}nm"] = {
            "rule": f"centroid distance <= {match_distance_nm:g} nm",
            **object_scores(psz, tsz, match(cand, maximize=False)),
        }
    return out
