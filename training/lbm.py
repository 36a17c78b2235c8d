"""LBM: MITR's local bipartite matching distance between two traces of boxes (Meng et al., CVPR 2021).

Mirrors ``captioning/utils/local_optimal_transport.py`` and the trace evaluation in
``captioning/utils/eval_utils_joint.py`` of ``facebookresearch/connect-caption-and-trace``; ``docs/metrics.md``
("LBM") defines it and lists where this implementation differs. NumPy and SciPy only; boxes are XYXY, in any
frame shared by both traces (``training.metrics`` conventions).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import scipy.optimize
import scipy.sparse

from training.metrics import as_boxes

__all__ = ["lbm", "lbm_dataset"]




def _ceil_div(a: int, b: int) -> int:
    return -((-a) // b)


def _local_transport_cost(d: npt.NDArray[np.float64], window: int) -> float:
    """Optimal ``Σ T·D`` of one chunk: ``d`` is ``pxm`` with ``p <= m``.

    Transport ``T ≥ 0`` with rows summing to 1, columns summing to at most 1, and ``T[i, j] = 0`` unless
    ``(i - window)·m/p ≤ j < (i + 1 + window)·m/p``. Only the in-window entries are LP variables (equivalent
    to forcing the others to zero, and smaller).
    """
    p, m = d.shape
    rows: list[int] = []
    cols: list[int] = []
    for i in range(p):
        j_lo = max(0, _ceil_div((i - window) * m, p))
        j_hi = min(m, _ceil_div((i + 1 + window) * m, p))
        rows.extend([i] * (j_hi - j_lo))
        cols.extend(range(j_lo, j_hi))
    r = np.asarray(rows)
    c = np.asarray(cols)
    nvar = len(r)
    var = np.arange(nvar)
    ones = np.ones(nvar)
    a_eq = scipy.sparse.csr_array((ones, (r, var)), shape=(p, nvar))
    a_ub = scipy.sparse.csr_array((ones, (c, var)), shape=(m, nvar))
    result = scipy.optimize.linprog(
        d[r, c],
        A_ub=a_ub,
        b_ub=np.ones(m),
        A_eq=a_eq,
        b_eq=np.ones(p),
        bounds=(0.0, 1.0),
        method="highs",
    )
    # p <= m and every row's window holds >= 1 column, with window-0 windows disjoint: always feasible.
    if result.status != 0:
        raise RuntimeError(f"LBM transport LP failed on a {p}x{m} chunk: {result.message}")
    return float(result.fun)


def lbm(pred: npt.ArrayLike, gt: npt.ArrayLike, chunk_size: int = 20, window: int = 0) -> float:
    """MITR's local bipartite matching (LBM) distance between two traces of boxes; lower is better.

    Definition (Meng et al., CVPR 2021; reference ``captioning/utils/eval_utils_joint.py`` and
    ``captioning/utils/local_optimal_transport.py`` of ``facebookresearch/connect-caption-and-trace``):

    1. Call the shorter trace ``A`` (length ``n1``) and the longer ``B`` (length ``n2``); on equal lengths
       ``A = pred``. ``A`` is cut into ``ceil(n1 / chunk_size)`` consecutive chunks of ``chunk_size`` boxes,
       the last holding the remainder. Chunk ``s`` is matched against the proportional slice
       ``B[floor(s·c) : min(ceil((s+1)·c), n2)]`` with ``c = chunk_size·n2 / n1`` (computed exactly in
       integers), so ``p = len(chunk) ≤ m = len(slice)``.
    2. ``D[i, j]`` = mean over the 4 coordinates of ``|A_chunk[i] - B_slice[j]|``.
    3. A linear program finds the transport ``T`` minimising ``Σ T·D``: ``T ∈ [0, 1]``, every row sums to 1,
       every column to at most 1, and ``T[i, j] = 0`` unless ``(i - window)·m/p ≤ j < (i + 1 + window)·m/p``.
    4. Chunk cost ``Σ T·D / p``; LBM = the unweighted mean of the chunk costs.

    With the reference evaluation's ``window = 0`` the windows of different rows are disjoint, so the column
    constraint never binds and each row simply takes the nearest box of its own window; ``window > 0`` lets
    rows compete for columns (a local re-ordering).

    Args:
        pred: ``nx4`` predicted trace boxes, XYXY, in order. Pass boxes normalised to [0, 1] of the image to
            compare with published numbers (PixelLLM 0.153, MITR 0.163 on Localized Narratives).
        gt: ``mx4`` ground-truth trace boxes, same frame. Words without a trace should be removed by the caller
            (MITR drops its whole-image placeholder boxes from the ground truth before computing LBM).
        chunk_size: chunk length of the shorter trace (MITR: 20).
        window: extra neighbouring windows each row may use (MITR's evaluation: 0).

    Returns:
        The LBM distance, or NaN if either trace is empty (MITR skips such images; see :func:`lbm_dataset`).
    """
    pred = as_boxes(pred, "pred")
    gt = as_boxes(gt, "gt")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int | np.integer) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if isinstance(window, bool) or not isinstance(window, int | np.integer) or window < 0:
        raise ValueError(f"window must be a non-negative integer, got {window!r}")
    if len(pred) == 0 or len(gt) == 0:
        return float("nan")
    short, long = (pred, gt) if len(pred) <= len(gt) else (gt, pred)
    n1, n2 = len(short), len(long)
    chunk_costs = []
    for s in range(_ceil_div(n1, chunk_size)):
        chunk = short[s * chunk_size : (s + 1) * chunk_size]
        lo = (s * chunk_size * n2) // n1
        hi = min(n2, _ceil_div((s + 1) * chunk_size * n2, n1))
        d = np.abs(chunk[:, None, :] - long[None, lo:hi, :]).mean(axis=-1)
        chunk_costs.append(_local_transport_cost(d, int(window)) / len(chunk))
    return float(np.mean(chunk_costs))


def lbm_dataset(
    pairs: Sequence[tuple[npt.ArrayLike, npt.ArrayLike]],
    chunk_size: int = 20,
    window: int = 0,
    empty_cost: float | None = None,
) -> float:
    """Mean :func:`lbm` over images.

    Args:
        pairs: per image ``(pred, gt)``, each an ``nx4`` trace of XYXY boxes (see :func:`lbm`).
        chunk_size: passed to :func:`lbm`.
        window: passed to :func:`lbm`.
        empty_cost: what an image with an empty predicted or ground-truth trace contributes. ``None`` (the
            default, as MITR's evaluation) leaves such images out of the mean; a number (e.g. 1.0) counts them
            at that cost so that a model emitting no trace is not rewarded.

    Returns:
        The mean LBM over the counted images; NaN if none is counted.
    """
    costs = []
    for pred, gt in pairs:
        cost = lbm(pred, gt, chunk_size=chunk_size, window=window)
        if math.isnan(cost):
            if empty_cost is None:
                continue
            cost = float(empty_cost)
        costs.append(cost)
    return float(np.mean(costs)) if costs else float("nan")
