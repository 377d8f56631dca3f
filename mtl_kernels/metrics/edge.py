"""Edge detection: odsF, oisF and AP by boundary matching within a distance tolerance, no MATLAB.

What the survey measures. Its edge numbers come from SEISM (Pont-Tuset and Marques), run in MATLAB
by evaluation/eval_edge.py: each prediction is saved as a PNG of 255 * sigmoid, binarised at 99
thresholds 0.01, 0.02, ..., 0.99 with ``pred >= t`` (read_one_png.m), and every binary map is
compared with the ground-truth boundary map by Piotr Dollar's edgesEvalImg with ``'thin', 0``
(eval_cont.m), which calls the BSDS benchmark's correspondPixels with maxDist = 0.0075 (of the image
diagonal). correspondPixels pairs predicted and ground-truth boundary pixels one to one, only
pairs at Euclidean distance <= maxDist * sqrt(H^2 + W^2) pixels, by a min-cost assignment in
which an unmatched pixel costs 100 * maxDist (far more than any pair), so it returns a maximum
matching. Per image and threshold that gives

    cntR = matched ground-truth pixels,  sumR = ground-truth pixels,
    cntP = matched predicted pixels,     sumP = predicted pixels.

Then (gather_measure.m, general_ods.m, general_ois.m, general_ap.m):

- ODS: counts summed over the dataset per threshold, R = cntR / sumR, P = cntP / sumP (R = 0,
  P = 1 where nothing is predicted; R = 1, P = 0 where there is no ground truth),
  F = 2PR / (P + R) (0 where P + R = 0), odsF = max over thresholds (no interpolation between
  thresholds, unlike the BSDS / edgesEvalDir code).
- OIS: per image the threshold with the best per-image F (the first on ties), the counts at
  those thresholds summed over the dataset, oisF = F of those sums.
- AP: the dataset P(R) curve of the ODS step, duplicate recalls dropped (first threshold kept),
  linearly interpolated at recall 0, 0.01, ..., 1 within the curve's recall range, summed and
  divided by 100 (101 points over 100, so a curve at precision 1 over all recalls gives 1.01;
  kept as is, for numbers comparable with the survey's).

What is done here, and how it differs:

- Matching: a maximum-cardinality bipartite matching between predicted and ground-truth pixels
  joined when their distance is <= maxDist * diagonal (the same neighbourhood test, d^2 <= r^2,
  as correspondPixels), by Hopcroft-Karp, exact: the compiled one of this package
  (metrics/_matching.py), which drops dead ends and grows one matching through the thresholds;
  scipy's maximum_bipartite_matching is the reference (it can take exponential time on the
  layered graphs that line-shaped boundaries give, scipy issue 26147).
  The counts depend only on the size of the matching, and correspondPixels' assignment is a
  maximum matching up to its sparse random outlier graph (it can, rarely, miss an augmenting
  path; it prints a warning then), so the counts are the same or, rarely, a few pixels higher.
  The predicted pixels of successive thresholds are nested, so the candidate pairs are found
  once per image and each threshold uses a prefix of them sorted by prediction value.
- Thinning: none by default, as the survey (SEISM's eval_cont passes 'thin', 0): every predicted
  pixel above the threshold counts, so thick predictions lose precision. ``thin=True`` follows
  the BSDS / edgesEvalImg default instead: each binary map is thinned to one-pixel-wide lines by
  the Lam-Lee-Suen parallel thinning that MATLAB's bwmorph(E, 'thin', inf) implements (two
  sub-iterations with look-up tables, until nothing changes), evaluating only the pixels that
  can change (see thin(); compiled in csrc/cpu/thin.cpp, the numpy version is its reference);
  slower than no thinning for thick predictions (the thinned maps of successive thresholds
  are not nested, so each threshold gets a matching of its own). No non-maximum
  suppression is applied in either case (neither the survey nor edgesEvalImg does; HED-style
  pipelines run NMS on their outputs before the evaluation).
- Thresholds: K thresholds i / (K + 1), i = 1..K (99: 0.01 ... 0.99), or any list; ``pred >= t``.
  The survey's predictions are quantised to 8 bits (PNG); here the probabilities are used as
  given (quantise them first, ``torch.round(p * 255) / 255``, to reproduce that).
- AP: SEISM returns 0 when every threshold gives the same recall (e.g. a binary prediction); here
  that single-point curve gives AP = P * R (the area under a curve of constant precision up to
  that recall), so a perfect prediction has AP = 1.
- Ground truth: one binary boundary map per image (non-zero is an edge; SEISM converts a
  segmentation with seg2bmap, and BSDS averages over several annotators: one annotator here).
  Pixels where the target equals ignore_index (255, the survey's padding) are neither ground
  truth nor predictions. maxDist uses the diagonal of the map given (0.0075 the survey and
  BSDS; 0.011 is the usual value for NYUD-v2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from .. import _backend
from ._checks import as_tensor, map_bhw, nan, same_shape
from ._matching import matching_sizes

MAX_DIST = 0.0075
MAX_DIST_NYUD = 0.011


def edge_thresholds(thresholds: int | Sequence[float] = 99) -> np.ndarray:
    """K evenly spaced thresholds i / (K + 1) (edgesEvalImg's linspace(1/(K+1), 1-1/(K+1), K)), or a list as given."""
    if isinstance(thresholds, (int, np.integer)):
        k = int(thresholds)
        if k < 1:
            raise ValueError(f"EdgeMeter: thresholds must be >= 1, got {k}")
        return np.arange(1, k + 1, dtype=np.float64) / (k + 1)
    t = np.asarray(list(thresholds), dtype=np.float64).reshape(-1)
    if t.size == 0:
        raise ValueError("EdgeMeter: thresholds must not be empty")
    return t


def _offsets(radius: float) -> tuple[np.ndarray, np.ndarray]:
    r = int(math.ceil(radius))
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    keep = dy * dy + dx * dx <= radius * radius
    return dy[keep].astype(np.int64), dx[keep].astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Thinning (Lam, Lee and Suen 1992, the algorithm of MATLAB's bwmorph 'thin')
# ---------------------------------------------------------------------------------------------


def _thin_luts() -> tuple[torch.Tensor, torch.Tensor]:
    """Deletion tables for the two sub-iterations, indexed by the 8-neighbour code.

    Bit i - 1 of the code is neighbour x_i: x1 east, then counter-clockwise x2 north-east, x3 north,
    x4 north-west, x5 west, x6 south-west, x7 south, x8 south-east.
    """
    lut1 = torch.zeros(256, dtype=torch.bool)
    lut2 = torch.zeros(256, dtype=torch.bool)
    for code in range(256):
        x = [None] + [(code >> i) & 1 for i in range(8)] + [code & 1]  # x[1..8], x[9] = x[1]
        xh = sum(1 for i in range(1, 5) if x[2 * i - 1] == 0 and (x[2 * i] or x[2 * i + 1]))
        n1 = sum(1 for k in range(1, 5) if x[2 * k - 1] or x[2 * k])
        n2 = sum(1 for k in range(1, 5) if x[2 * k] or x[2 * k + 1])
        g12 = xh == 1 and 2 <= min(n1, n2) <= 3
        g3 = ((x[2] or x[3] or not x[8]) and x[1]) == 0
        g3p = ((x[6] or x[7] or not x[4]) and x[5]) == 0
        lut1[code] = g12 and g3
        lut2[code] = g12 and g3p
    return lut1, lut2


_LUTS: tuple[torch.Tensor, torch.Tensor] | None = None


def _neighbour_code(x: torch.Tensor) -> torch.Tensor:
    p = torch.nn.functional.pad(x.to(torch.uint8), (1, 1, 1, 1))
    c = p[:, 1:-1, 2:].to(torch.int16)  # x1 east
    c = c | (p[:, :-2, 2:].to(torch.int16) << 1)  # x2 north-east
    c = c | (p[:, :-2, 1:-1].to(torch.int16) << 2)  # x3 north
    c = c | (p[:, :-2, :-2].to(torch.int16) << 3)  # x4 north-west
    c = c | (p[:, 1:-1, :-2].to(torch.int16) << 4)  # x5 west
    c = c | (p[:, 2:, :-2].to(torch.int16) << 5)  # x6 south-west
    c = c | (p[:, 2:, 1:-1].to(torch.int16) << 6)  # x7 south
    c = c | (p[:, 2:, 2:].to(torch.int16) << 7)  # x8 south-east
    return c.long()


def _thin_dense(mask: torch.Tensor) -> torch.Tensor:
    """The plain parallel form of thin(): every pixel of every slice evaluated each sub-iteration (tests use it)."""
    global _LUTS
    if _LUTS is None:
        _LUTS = _thin_luts()
    x = mask.bool().clone()
    luts = [lut.to(x.device) for lut in _LUTS]
    while True:
        changed = False
        for lut in luts:
            delete = x & lut[_neighbour_code(x)]
            if bool(delete.any()):
                changed = True
                x &= ~delete
        if not changed:
            return x


def thin(mask, *, backend: str | None = None):
    """bwmorph(mask, 'thin', inf) of each [H, W] slice of a bool array [..., H, W] (numpy or torch, on the CPU).

    Same result as the parallel algorithm that evaluates every pixel at every sub-iteration, but only
    pixels that can change are evaluated: at first the foreground pixels with a background neighbour,
    then the foreground neighbours of the pixels deleted in the two previous sub-iterations (a pixel
    whose neighbourhood did not change since the last sub-iteration of the same kind keeps its
    verdict). The work is about proportional to the number of deleted pixels, not to area x iterations.
    backend: "cpu" the compiled loop (csrc/cpu/thin.cpp, slices in parallel), "reference" numpy over
    all slices at once; default "auto", the compiled one when built.
    """
    global _LUTS
    if _LUTS is None:
        _LUTS = _thin_luts()
    is_torch = isinstance(mask, torch.Tensor)
    m = mask.detach().cpu().numpy() if is_torch else np.asarray(mask)
    shape = m.shape
    if len(shape) < 2:
        raise ValueError(f"thin: mask must be [..., H, W], got shape {shape}")
    H, W = shape[-2], shape[-1]
    m = m.reshape(-1, H, W).astype(bool)
    if _backend.resolve(backend, torch.device("cpu"), "thin", ("reference", "cpu")) == "cpu":
        out = torch.ops.mtl_kernels.thin(torch.from_numpy(m), *_LUTS).reshape(shape)
        return out if is_torch else out.numpy()
    vol = np.zeros((m.shape[0], H + 2, W + 2), dtype=np.uint8)  # zero border around every slice
    vol[:, 1:-1, 1:-1] = m
    flat = vol.reshape(-1)
    s = W + 2
    offs = np.array([1, -s + 1, -s, -s - 1, -1, s - 1, s, s + 1], dtype=np.int64)  # x1 .. x8
    luts = [lut.numpy() for lut in _LUTS]

    def codes(idx):
        c = np.zeros(idx.size, dtype=np.int64)
        for bit, off in enumerate(offs):
            c |= flat[idx + off].astype(np.int64) << bit
        return c

    scratch = np.empty(flat.size, dtype=np.int32)

    def distinct(idx):  # the distinct values of idx, in O(len) (last writer wins), no sort
        order = np.arange(idx.size, dtype=np.int32)
        scratch[idx] = order
        return idx[scratch[idx] == order]

    fg = np.flatnonzero(flat)
    border = fg[codes(fg) != 255]
    prev, prev2 = border, border  # the first two sub-iterations both look at every border pixel
    step = 0
    while True:
        cand = distinct(np.concatenate([prev, prev2]))
        cand = cand[flat[cand] == 1]
        if cand.size == 0:  # then no later sub-iteration has a candidate either
            break
        delete = cand[luts[step % 2][codes(cand)]]
        flat[delete] = 0
        nb = (delete[:, None] + offs[None, :]).reshape(-1)
        prev2, prev = prev, distinct(nb[flat[nb] == 1])
        step += 1
    out = vol[:, 1:-1, 1:-1].astype(bool).reshape(shape)
    return torch.from_numpy(out) if is_torch else out


# ---------------------------------------------------------------------------------------------
# Per-image counts
# ---------------------------------------------------------------------------------------------


def edge_counts(
    pred,
    gt,
    thresholds: int | Sequence[float] = 99,
    *,
    max_dist: float = MAX_DIST,
    thin_pred: bool = False,
    ignore_index: float = 255.0,
    backend: str | None = None,
) -> np.ndarray:
    """[4, K] int64 counts (cntR, sumR, cntP, sumP) of one image, per threshold.

    pred: [H, W] edge probabilities; gt: [H, W] boundary map (non-zero: edge, ignore_index: left out).
    backend: of the matching and the thinning ("cpu": the compiled Hopcroft-Karp and thinning;
    "reference": scipy's matching, which can take exponential time on line-shaped boundaries, and
    numpy's thinning; default "auto", the compiled ones when built).
    """
    prob = np.asarray(pred.detach().cpu().double() if isinstance(pred, torch.Tensor) else pred, dtype=np.float64)
    g = np.asarray(gt.detach().cpu() if isinstance(gt, torch.Tensor) else gt)
    if prob.ndim != 2 or prob.shape != g.shape:
        raise ValueError(f"edge_counts: pred and gt must be [H, W] of one shape, got {prob.shape} and {g.shape}")
    thr = edge_thresholds(thresholds)
    K = thr.size
    H, W = prob.shape
    valid = g != ignore_index
    gt_edge = (g != 0) & valid
    vals = np.where(valid & ~np.isnan(prob), prob, -np.inf)
    radius = float(max_dist) * math.sqrt(H * H + W * W)
    dy, dx = _offsets(radius)
    gy, gx = np.nonzero(gt_edge)
    n_g = gy.size
    counts = np.zeros((4, K), dtype=np.int64)
    counts[1] = n_g
    if thin_pred:
        masks = thin(vals[None] >= np.maximum(thr, np.finfo(np.float64).eps)[:, None, None], backend=backend)
        counts[3] = masks.reshape(K, -1).sum(1)
        if n_g == 0 or counts[3].max() == 0:
            return counts
        py = gy[:, None] + dy[None, :]
        px = gx[:, None] + dx[None, :]
        inb = (py >= 0) & (py < H) & (px >= 0) & (px < W)
        g_all = np.broadcast_to(np.arange(n_g)[:, None], py.shape)[inb]
        p_all = (py * W + px)[inb]
        for k in range(K):
            hit = masks[k].reshape(-1)[p_all]
            gi, pf = g_all[hit], p_all[hit]
            if gi.size == 0:
                continue
            m = matching_sizes(gi, pf, n_g, H * W, [gi.size], backend=backend)[0]  # pixels as vertex ids
            counts[0, k] = counts[2, k] = m
        return counts
    # no thinning: the predicted sets of decreasing thresholds are nested
    tt = np.maximum(thr, np.finfo(np.float64).eps)
    flat = np.sort(vals.reshape(-1))
    counts[3] = flat.size - np.searchsorted(flat, tt, side="left")
    if n_g == 0 or counts[3].max() == 0:
        return counts
    py = gy[:, None] + dy[None, :]
    px = gx[:, None] + dx[None, :]
    inb = (py >= 0) & (py < H) & (px >= 0) & (px < W)
    g_idx = np.broadcast_to(np.arange(n_g)[:, None], py.shape)[inb]
    p_flat = (py * W + px)[inb]
    p_val = vals.reshape(-1)[p_flat]
    keep = p_val >= tt.min()
    g_idx, p_flat, p_val = g_idx[keep], p_flat[keep], p_val[keep]
    if g_idx.size == 0:
        return counts
    order = np.argsort(-p_val, kind="stable")
    g_idx, p_flat, p_val = g_idx[order], p_flat[order], p_val[order]
    uniq, p_ids = np.unique(p_flat, return_inverse=True)
    # number of candidate pairs whose predicted pixel passes each threshold: a prefix of the sorted
    # pairs, growing as the threshold falls; one matching grows through them (highest threshold first)
    prefix = np.searchsorted(-p_val, -tt, side="right")
    order = np.argsort(prefix, kind="stable")
    sizes = matching_sizes(g_idx, p_ids, n_g, uniq.size, prefix[order], backend=backend)
    counts[0, order] = counts[2, order] = sizes
    return counts


# ---------------------------------------------------------------------------------------------
# Dataset scores
# ---------------------------------------------------------------------------------------------


def _pr(cntR, sumR, cntP, sumP):
    """SEISM's precision / recall from counts (arrays), with its conventions for empty sets."""
    cntR, sumR, cntP, sumP = (np.asarray(a, dtype=np.float64) for a in (cntR, sumR, cntP, sumP))
    R = np.divide(cntR, sumR, out=np.zeros_like(cntR), where=sumR > 0)
    P = np.divide(cntP, sumP, out=np.zeros_like(cntP), where=sumP > 0)
    R = np.where(sumR == 0, 1.0, R)
    P = np.where(sumR == 0, 0.0, P)
    R = np.where((sumP == 0) & (sumR > 0), 0.0, R)
    P = np.where((sumP == 0) & (sumR > 0), 1.0, P)
    return R, P


def _f(R, P):
    s = R + P
    return np.divide(2 * P * R, s, out=np.zeros_like(s), where=s > 0)


def _ap(R: np.ndarray, P: np.ndarray) -> float:
    uniq, first = np.unique(R, return_index=True)
    if uniq.size == 1:
        return float(R[first[0]] * P[first[0]])
    p = P[first]
    grid = np.arange(101) / 100.0
    inside = (grid >= uniq[0]) & (grid <= uniq[-1])
    return float(np.interp(grid[inside], uniq, p).sum() / 100.0)


def edge_scores(counts: np.ndarray, thresholds: np.ndarray) -> dict[str, float]:
    """odsF, oisF, AP (and the ODS/OIS precision, recall, threshold) from counts [N, 4, K]."""
    counts = np.asarray(counts, dtype=np.int64)
    if counts.ndim != 3 or counts.shape[1] != 4 or counts.shape[0] == 0:
        keys = ("odsF", "odsP", "odsR", "ods_threshold", "oisF", "oisP", "oisR", "AP")
        return {k: nan() for k in keys}
    tot = counts.sum(0)
    R, P = _pr(*tot)
    F = _f(R, P)
    k = int(np.argmax(F))
    Ri, Pi = _pr(*counts.transpose(1, 0, 2))  # [N, K]
    best = np.argmax(_f(Ri, Pi), axis=1)
    ois = counts[np.arange(counts.shape[0]), :, best].sum(0)
    Ro, Po = _pr(*ois)
    return {
        "odsF": float(F[k]),
        "odsP": float(P[k]),
        "odsR": float(R[k]),
        "ods_threshold": float(thresholds[k]),
        "oisF": float(_f(Ro, Po)),
        "oisP": float(Po),
        "oisR": float(Ro),
        "AP": _ap(R, P),
    }


class EdgeMeter:
    """odsF, oisF and AP of edge probability maps (the survey's SEISM protocol; see the module doc).

    thresholds: K (default 99: 0.01 ... 0.99) or a list of thresholds; a pixel is predicted at t
        where pred >= t.
    max_dist: matching tolerance as a fraction of the image diagonal (0.0075; 0.011 for NYUD-v2).
    thin: thin each binarised prediction (bwmorph 'thin', as BSDS) before matching; default False
        as the survey.
    logits: pred is a logit, passed through a sigmoid first (default: a probability).
    backend: of the boundary matching, see edge_counts.

    update(pred, gt): pred [B, H, W] or [B, 1, H, W]; gt the same shape, a boundary map (non-zero
    edge, 0 background, ignore_index not evaluated). Matching runs on the CPU, image by image.
    compute() -> {"odsF", "oisF", "AP", "odsP", "odsR", "ods_threshold", "oisP", "oisR"};
    NaN before any image. counts() -> [N, 4, K] per-image (cntR, sumR, cntP, sumP).
    """

    name = "EdgeMeter"

    def __init__(
        self,
        thresholds: int | Sequence[float] = 99,
        *,
        max_dist: float = MAX_DIST,
        thin: bool = False,
        logits: bool = False,
        ignore_index: float = 255.0,
        backend: str | None = None,
    ):
        if not max_dist >= 0:
            raise ValueError(f"{self.name}: max_dist must be >= 0 (a fraction of the image diagonal), got {max_dist}")
        self.thresholds = edge_thresholds(thresholds)
        self.max_dist = float(max_dist)
        self.thin = bool(thin)
        self.logits = bool(logits)
        self.ignore_index = float(ignore_index)
        self.backend = backend
        self.reset()

    def reset(self) -> None:
        self._counts: list[np.ndarray] = []

    @torch.no_grad()
    def update(self, pred, gt) -> None:
        pred = map_bhw(as_tensor(pred, "pred", self.name), "pred", self.name, "edge probabilities")
        gt = map_bhw(as_tensor(gt, "gt", self.name), "gt", self.name, "edge targets")
        same_shape(pred, gt, self.name)
        pred = pred.detach().double()
        if self.logits:
            pred = torch.sigmoid(pred)
        elif pred.numel() and bool(((pred < 0) | (pred > 1)).any()):
            raise ValueError(
                f"{self.name}: pred has values outside [0, 1] (min {float(pred.min()):.4g}, max "
                f"{float(pred.max()):.4g}); it must be probabilities, or pass logits=True for logits"
            )
        pred = pred.cpu().numpy()
        gt = gt.detach().cpu().numpy()
        for b in range(pred.shape[0]):  # one image at a time; each is vectorised
            self._counts.append(
                edge_counts(
                    pred[b],
                    gt[b],
                    self.thresholds,
                    max_dist=self.max_dist,
                    thin_pred=self.thin,
                    ignore_index=self.ignore_index,
                    backend=self.backend,
                )
            )

    def counts(self) -> np.ndarray:
        if not self._counts:
            return np.zeros((0, 4, self.thresholds.size), dtype=np.int64)
        return np.stack(self._counts)

    def compute(self) -> dict[str, float]:
        return edge_scores(self.counts(), self.thresholds)
