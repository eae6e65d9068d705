"""Teacher targets as numbers: full logits to stored top-k, and stored top-k back to probabilities.

The writer keeps per view the k largest logits (float16, sorted), their classes, the argmax and the
logsumexp of the full logits; from those a reader rebuilds exact probabilities of the stored classes
(``exp(logit - lse)``) and the *tail mass* of the rest, spread evenly over the unstored classes. This
is the numpy home of that arithmetic; ``pipeline.train.losses.dense_log_probs_from_topk`` is its torch twin
(tested to agree).
"""

from __future__ import annotations

import numpy as np

from store.layout import label_dtype

TINY_TAIL = 1e-12
"""Floor for the tail mass when float16 rounding makes the stored probabilities sum to >= 1."""


def _topk_order(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest per row, by value descending then class ascending (= a stable sort).

    argpartition finds the candidates in O(C); only rows whose ties straddle the k-th place (where
    the candidate set itself is ambiguous) fall back to a full stable sort.
    """
    if k >= x.shape[1]:
        return np.argsort(-x, axis=1, kind="stable")
    part = np.argpartition(-x, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(x, part, axis=1)
    order = np.take_along_axis(part, np.lexsort((part, -vals), axis=1), axis=1)
    kth = vals.min(axis=1, keepdims=True)
    ambiguous = np.flatnonzero((x == kth).sum(axis=1) > (vals == kth).sum(axis=1))
    if ambiguous.size:
        order[ambiguous] = np.argsort(-x[ambiguous], axis=1, kind="stable")[:, :k]
    return order


def topk_from_logits(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Full (n, C) logits -> (top-k logits float16 sorted descending, their classes, argmax, logsumexp).

    Ties are broken by lowest class id first (a stable sort), so the result is deterministic; the
    argmax is the first of the sorted classes, consistent with ``np.argmax``. logsumexp is of the
    full logits at temperature 1, in float32, so readers can rebuild exact probabilities.
    """
    x = np.asarray(logits)
    if x.ndim != 2 or x.shape[1] < 1:
        raise ValueError(f"topk_from_logits: expected (n, C) logits, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"topk_from_logits: logits must be floating point, got {x.dtype}")
    if not np.isfinite(x).all():
        raise ValueError("topk_from_logits: logits contain NaN or inf")
    x = x.astype(np.float32, copy=False)
    n, c = x.shape
    if k < 1:
        raise ValueError(f"topk_from_logits: k must be >= 1, got {k}")
    k = min(k, c)
    order = _topk_order(x, k)
    top = np.take_along_axis(x, order, axis=1)
    m = x.max(axis=1, keepdims=True)
    # exp in float32 (each term exact to ~1e-7 relative), summed in float64
    lse = (m[:, 0].astype(np.float64) + np.log(np.exp(x - m).sum(axis=1, dtype=np.float64))).astype(
        np.float32
    )
    classes = order.astype(label_dtype(c))
    return top.astype(np.float16), classes, classes[:, 0].copy(), lse


def tail_mass(topk_logits: np.ndarray, logsumexp: np.ndarray) -> np.ndarray:
    """1 - Σ stored probabilities per row (float64, at temperature 1): the mass of the unstored classes.

    Zero in a dense store, up to float16 rounding (which can make it slightly negative)."""
    tl = np.asarray(topk_logits, dtype=np.float64)
    return 1.0 - np.exp(tl - np.asarray(logsumexp, dtype=np.float64)[:, None]).sum(axis=1)


def stored_probs(topk_logits: np.ndarray, logsumexp: np.ndarray) -> np.ndarray:
    """Exact teacher probabilities (temperature 1) of the stored classes: exp(logit - logsumexp)."""
    tl = np.asarray(topk_logits, dtype=np.float32)
    return np.exp(tl - np.asarray(logsumexp, dtype=np.float32)[..., None])


def dense_soft_target(
    topk_logits: np.ndarray,
    topk_classes: np.ndarray,
    logsumexp: np.ndarray,
    num_classes: int,
    tau: float = 1.0,
) -> np.ndarray:
    """(n, C) float32 teacher distribution at temperature ``tau``, rows summing to 1.

    Exact (up to float16 storage) when k == C. When k < C the tail mass 1 - sum(stored probs) is
    spread evenly over the unstored classes at tau = 1 (each gets logit lse + log(tail / (C - k))),
    then the softmax at ``tau`` is taken over all C logits: tau = 1 reproduces the stored
    probabilities exactly and an even tail.
    """
    if tau <= 0:
        raise ValueError(f"dense_soft_target: tau must be > 0, got {tau}")
    tl = np.asarray(topk_logits, dtype=np.float64)
    tc = np.asarray(topk_classes).astype(np.intp)
    lse = np.asarray(logsumexp, dtype=np.float64)
    n, k = tl.shape
    if tc.shape != (n, k) or lse.shape != (n,):
        raise ValueError(
            f"dense_soft_target: shapes do not agree: topk_logits {tl.shape}, topk_classes {tc.shape}, "
            f"logsumexp {lse.shape}"
        )
    if k > num_classes:
        raise ValueError(f"dense_soft_target: k={k} > num_classes={num_classes}")
    z = np.empty((n, num_classes), dtype=np.float64)
    if k < num_classes:
        z[:] = (lse + np.log(np.maximum(tail_mass(tl, lse), TINY_TAIL) / (num_classes - k)))[:, None]
    np.put_along_axis(z, tc, tl, axis=1)
    z /= tau
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    return p.astype(np.float32)
