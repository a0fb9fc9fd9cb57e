"""Plan-time sufficient statistics (NumPy, run once per data set, never traced).

Everything the engine needs from the N rows is a sum over rows, grouped by *cell* (the unique combination of the
marginalized classes' groups): S_zz (n_cells, D, D) = Σ Zt_i Zt_iᵀ, S_zr (n_cells, D) = Σ Zt_i r0_i, S_zX
(n_cells, D, p) = Σ Zt_i X_iᵀ around r0 = y − X β0, and from them the one-level constants and the dense block's
own statistics. Public (a documented internal API): aggregate, centre_beta, cell_statistics, same_node_pairs,
level1_B, level1_stats, dense_stats.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp


BINCOUNT_MAX_COLUMNS = 16   # up to this many columns one weighted bincount each beats building a sparse indicator


def aggregate(cell: np.ndarray, n_cells: int, cols: np.ndarray, chunk: int = 1 << 22) -> np.ndarray:
    """Sum rows of ``cols`` (N, k) by cell -> (n_cells, k): one weighted bincount per column for few columns, else
    one sparse indicator product chunked over k."""
    N, k = cols.shape
    if k <= BINCOUNT_MAX_COLUMNS:
        out = np.empty((n_cells, k))
        for j in range(k):
            out[:, j] = np.bincount(cell, weights=cols[:, j], minlength=n_cells)
        return out
    ind = sp.csr_matrix((np.ones(N), (cell, np.arange(N))), shape=(n_cells, N))
    out = np.empty((n_cells, k))
    step = max(1, chunk // max(N, 1))
    for s in range(0, k, step):
        out[:, s : s + step] = ind @ cols[:, s : s + step]
    return out


def centre_beta(X, y) -> np.ndarray:
    """An OLS beta0 (p,) to centre the statistics around: from the normal equations when X^T X is well
    conditioned (one pass, no (N, p) SVD), else least squares. Any beta0 gives exact statistics; a good one only
    keeps r0 = y - X beta0 small (no cancellation in r0^T r0)."""
    XtX, Xty = X.T @ X, X.T @ y
    if np.linalg.cond(XtX) < 1e8:
        return np.linalg.solve(XtX, Xty)
    return np.linalg.lstsq(X, y, rcond=None)[0]


def cell_statistics(cell: np.ndarray, n_cells: int, Zt, X, r0):
    """S_zz (n_cells, D, D), S_zr (n_cells, D), S_zX (n_cells, D, p): cell sums of Zt_i Zt_i^T, Zt_i r0_i, Zt_i X_i^T.

    One weighted np.bincount per distinct product of columns (a sequential pass over N rows into n_cells
    accumulators: no sort, no gather, no index structure); S_zz sums the upper triangle and mirrors it. Columns of
    ones (intercepts, in Z and in X) are recognized once, so that a product with one is the other column and equal
    products are summed once (y ~ x + (1 | a) + (1 | b): 3 passes instead of 9)."""
    D, p = Zt.shape[1], X.shape[1]
    cols = {("z", a): np.ascontiguousarray(Zt[:, a]) for a in range(D)}
    cols.update({("x", j): np.ascontiguousarray(X[:, j]) for j in range(p)})
    cols["r"] = np.asarray(r0)
    ones = {k for k, v in cols.items() if k != "r" and np.all(v == 1.0)}
    memo = {}

    def sums(u, v):
        key = tuple(sorted((k for k in (u, v) if k not in ones), key=str))
        if key not in memo:
            w = None if not key else cols[key[0]] if len(key) == 1 else cols[key[0]] * cols[key[1]]
            memo[key] = np.bincount(cell, weights=w, minlength=n_cells).astype(np.float64)
        return memo[key]

    S_zz = np.zeros((n_cells, D, D))
    for a in range(D):
        for b in range(a, D):
            S_zz[:, a, b] = S_zz[:, b, a] = sums(("z", a), ("z", b))
    S_zr = np.zeros((n_cells, D))
    S_zX = np.zeros((n_cells, D, p))
    for a in range(D):
        S_zr[:, a] = sums(("z", a), "r")
        for j in range(p):
            S_zX[:, a, j] = sums(("z", a), ("x", j))
    return S_zz, S_zr, S_zX


def same_node_pairs(node: np.ndarray, G: int):
    """All ordered pairs (a, b) of cells sharing a node -> two (n_pairs,) arrays."""
    order = np.argsort(node, kind="stable")
    counts = np.bincount(node, minlength=G)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    ns = node[order]
    rep = counts[ns]
    pa = np.repeat(order, rep)
    t = np.arange(rep.sum()) - np.repeat(np.cumsum(rep) - rep, rep)
    pb = order[np.repeat(starts[ns], rep) + t]
    return pa, pb


def level1_B(S_zz, node, dense_idx, d0: int, Dc: int, G0: int, ds: int):
    """The level-1 coupling B (ds, G_0 d_0) as a CSC matrix: B[idx_k b, (g, a)] = sum over the cells k of group g
    of S_k[a, Dc + b]. Returns (B, its entries (rows, cols, vals) in column order)."""
    n_cells, m = dense_idx.shape
    shape = (n_cells, d0, m)  # entries (k, a, b): S_k[a, Dc + b] at row idx_k[b], column (node_k, a)
    vals = S_zz[:, :d0, Dc:].ravel()
    rows = np.broadcast_to(dense_idx[:, None, :], shape).ravel()
    cols = (np.broadcast_to(node[:, None, None] * d0, shape) + np.arange(d0)[None, :, None]).ravel()
    B = sp.csc_matrix((vals, (rows, cols)), shape=(ds, G0 * d0))
    B.sum_duplicates()
    B.eliminate_zeros()
    col = np.repeat(np.arange(G0 * d0), np.diff(B.indptr))
    return B, (B.indices.astype(np.int64), col, B.data)


def level1_stats(S_zz, S_zr, S_zX, node, dense_idx, d0: int, G0: int, ds: int, Bmat):
    """Constants of the one-level path (plan.blocks.one_level): ((A0, B entries), (a_r, a_X, x_r, x_X))."""
    n_cells, m = dense_idx.shape
    p = S_zX.shape[2]
    A0 = aggregate(node, G0, S_zz[:, :d0, :d0].reshape(n_cells, -1)).reshape(G0, d0, d0)
    a_r = aggregate(node, G0, S_zr[:, :d0])
    a_X = aggregate(node, G0, S_zX[:, :d0, :].reshape(n_cells, -1)).reshape(G0, d0, p)
    pos = dense_idx.ravel()
    x_r = aggregate(pos, ds, S_zr[:, d0:].reshape(-1, 1))[:, 0]
    x_X = aggregate(pos, ds, S_zX[:, d0:, :].reshape(n_cells * m, p))
    return (A0, *Bmat), (a_r, a_X, x_r, x_X)


def dense_stats(S_zz, dense_idx, Dc: int, ds: int) -> np.ndarray:
    """Sum_k S_k[D, D] placed at (idx_k, idx_k): (ds, ds), constant."""
    out = np.zeros((ds, ds))
    np.add.at(out, (dense_idx[:, :, None], dense_idx[:, None, :]), S_zz[:, Dc:, Dc:])
    return out
