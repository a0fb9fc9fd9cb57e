r"""Kernels: exact Gaussian marginal likelihood and conditionals of random effects.

Model (marginalized classes l, standardized effects v_l ~ N(0, I), u_l = Lambda_l v_l):

    y = X beta + offset + sum_l Z_l u_l + e,      e ~ N(0, diag(sigma^2)).

With W = diag(1 / sigma^2), r = y - X beta - offset, Zt = [Z_l Lambda_l]_l,

    F = I + Zt^T W Zt,     h = Zt^T W r,
    log p(y) = -1/2 [ r^T W r - h^T F^{-1} h + log|F| + sum_i log(2 pi sigma_i^2) ],
    v | y ~ N(F^{-1} h, F^{-1}).

No Sigma^{-1} is formed, so singular Lambda (zero variances) is fine.  If beta is
marginalized, beta = mu + S v_beta is one more class (one group, columns X) and
r uses mu.

F is factorized by block elimination:  per-cell statistics H_k, h_k are summed
to the nodes of a *chain* of nested classes and eliminated level by level
(batched small Cholesky factors, tree message passing to the parents); the
coupling of each cell to the *dense* block (classes not nested in the chain)
yields fill-in on the dense Schur complement F_DD, which is factorized densely.
Sampling/means back-substitute through the same factor (root -> leaves).

For scalar sigma the first level's fill has a constant structure (``_structured_dense``), and with a single
chain level ``log_marginal`` needs no per-cell work at all (``_one_level_*``: group sums, the sparse fill matrix
B and sums of Z^T r0, Z^T X precomputed in the plan).  The dense block's reverse pass uses one inverse
(``_dense_logdet_quad``, ``dense_logdet_gram``) instead of differentiating the Cholesky factorization.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.scipy.linalg import block_diag, solve_triangular

from .plan import BETA, DenseProductFill, PairListFill, Plan, PooledFill

__all__ = ["Factor", "factorize", "unit_lams", "term_shape",
           "log_marginal", "conditional_mean", "conditional_sample", "chol_inv", "matvec",
           "dense_logdet_gram", "logdet_gram", "one_level_rhs_coef", "residual_precision", "weighted_solve",
           "weighted_sample", "weighted_transform"]

_UNROLL_MAX = 6
_LOG2PI = 1.8378770664093453


class Factor(NamedTuple):
    """Block Cholesky factor of F and the pieces of the log density.

    levels: per chain level j, (Linv (G_j, d_j, d_j), Wm (G_j, d_j, rest_j),
    z (G_j, d_j), V (n_cells, d_j, m) or None);  LD (dense_size, dense_size)
    lower Cholesky of the dense Schur block, zD (dense_size,) = LD^{-1} x_D;
    lams: per-unit Lambda (d_u, d_u); mu: beta prior mean (p,) or None;
    logdet, quad, rWr, log2pi: scalars;  ok: scalar bool (inputs valid).
    """

    levels: tuple
    LD: Optional[jax.Array]
    zD: Optional[jax.Array]
    lams: tuple
    mu: Optional[jax.Array]
    logdet: jax.Array
    quad: jax.Array
    rWr: jax.Array
    log2pi: jax.Array
    ok: jax.Array


# --------------------------------------------------------------------------- small linear algebra


def chol_inv(A):
    """Batched Cholesky of SPD (..., d, d) -> (diag L (..., d), L^{-1} (..., d, d)).

    Unrolled elementwise for small d (fast on CPU, differentiable); NaN on failure.
    """
    d = A.shape[-1]
    if d > _UNROLL_MAX:
        L = jnp.linalg.cholesky(A)
        eye = jnp.broadcast_to(jnp.eye(d, dtype=A.dtype), A.shape)
        Linv = lax.linalg.triangular_solve(L, eye, left_side=True, lower=True)
        return jnp.diagonal(L, axis1=-2, axis2=-1), Linv
    L = [[None] * d for _ in range(d)]
    for j in range(d):
        s = A[..., j, j]
        for k in range(j):
            s = s - L[j][k] ** 2
        L[j][j] = jnp.sqrt(s)
        for i in range(j + 1, d):
            t = A[..., i, j]
            for k in range(j):
                t = t - L[i][k] * L[j][k]
            L[i][j] = t / L[j][j]
    Li = [[None] * d for _ in range(d)]
    for i in range(d):
        Li[i][i] = 1.0 / L[i][i]
        for j in range(i):
            t = L[i][j] * Li[j][j]
            for k in range(j + 1, i):
                t = t + L[i][k] * Li[k][j]
            Li[i][j] = -t * Li[i][i]
    zero = jnp.zeros_like(A[..., 0, 0])
    Linv = jnp.stack(
        [jnp.stack([Li[i][j] if j <= i else zero for j in range(d)], axis=-1) for i in range(d)],
        axis=-2,
    )
    return jnp.stack([L[i][i] for i in range(d)], axis=-1), Linv


_SIGNS_2X2 = np.array([[1.0, -1.0], [-1.0, 1.0]])


def _adjugate_det_2x2(A):
    """(adj A, det A) of (..., 2, 2) without reading single entries (the reverse pass of each read would be one
    padded kernel): with rot(A) = A rotated by 180 degrees and S the checkerboard of signs, adj = S * rot(A)^T and
    det = 1/2 sum S * A * rot(A)."""
    rot, signs = jnp.flip(A, axis=(-2, -1)), jnp.asarray(_SIGNS_2X2, A.dtype)
    return signs * jnp.swapaxes(rot, -1, -2), 0.5 * jnp.sum(signs * A * rot, axis=(-2, -1))


def _spd_inv_logdet(A):
    """(A^{-1}, log|A|) for a batch of SPD (..., d, d): closed forms for d <= 2 (intercept-and-slope blocks: a few
    elementwise operations, fused), the unrolled Cholesky above. NaN where A is not positive definite."""
    d = A.shape[-1]
    if d == 1:
        return 1.0 / A, jnp.log(A.reshape(A.shape[:-2]))
    if d == 2:
        adj, det = _adjugate_det_2x2(A)
        det = jnp.where((A[..., 0, 0] > 0) & (det > 0), det, jnp.nan)   # (the condition is not differentiated)
        return adj / det[..., None, None], jnp.log(det)
    diag, Linv = chol_inv(A)
    return _small_mm(jnp.swapaxes(Linv, -1, -2), Linv), 2.0 * jnp.sum(jnp.log(diag), axis=-1)


def _small_precision(lam):
    """(Sigma^{-1}, log|Sigma|, ok) for Sigma = lam lam^T, lam (d, d). ok is False where Sigma is singular; the
    values then come from a finite substitute, so that gradients stay finite (a NaN branch under jnp.where would
    still poison them: 0 * inf). d <= 2 from lam's determinant and adjugate (exact for triangular lam, no
    cancellation in Sigma's determinant; both are polynomials in lam, finite for any finite lam); above, an
    unrolled Cholesky of Sigma after a gradient-free check."""
    d = lam.shape[0]
    eye = jnp.eye(d, dtype=lam.dtype)
    if d <= 2:
        def adjugate_det(m):
            return (jnp.ones_like(m), m.reshape(())) if d == 1 else _adjugate_det_2x2(m)
        det = adjugate_det(lam)[1]
        good = (det != 0) & jnp.isfinite(det)
        adj, det = adjugate_det(jnp.where(good, lam, eye))   # substitute Sigma = I: the dense block stays SPD
        inv = adj / det                                      # lam^{-1}
        return _small_mm(inv.T, inv), 2.0 * jnp.log(jnp.abs(det)), good
    S = _small_mm(lam, lam.T)
    diag, Ci = chol_inv(lax.stop_gradient(S))
    good = jnp.all(diag > 0) & jnp.all(jnp.isfinite(Ci))
    diag, Ci = chol_inv(jnp.where(good, S, eye))                           # Sigma = C C^T, Ci = C^{-1}
    return _small_mm(Ci.T, Ci), 2.0 * jnp.sum(jnp.log(diag)), good


def matvec(A, x):
    """Batched matrix-vector product (..., a, b) x (..., b) -> (..., a)."""
    return jnp.sum(A * x[..., None, :], axis=-1)


def _bmm(A, B):
    """Batched small matmul (..., a, b) x (..., b, c) -> (..., a, c) by broadcasting (XLA:CPU's batched dot is
    slow for tiny matrices and huge batches)."""
    return jnp.sum(A[..., :, :, None] * B[..., None, :, :], axis=-2)


def _small_mm(A, B):
    """A @ B with broadcasting over leading dims; for a short contraction (<= _UNROLL_MAX) as a sum of broadcast
    products. XLA:CPU emits each small dot as its own kernel (one LLVM module, ~10 ms of compile time each, forward
    and reverse); the broadcast form fuses with its neighbours."""
    if A.shape[-1] > _UNROLL_MAX:
        return jnp.matmul(A, B)
    return jnp.sum(A[..., :, :, None] * B[..., None, :, :], axis=-2)


SANDWICH_MAX = 2**20   # elements of the broadcast product in _small_sandwich (one reduction instead of two)


def _small_sandwich(A, X, B):
    """A X_g B for one small A (i, a), B (b, j) and a batch X (G, a, b) -> (G, i, j): one broadcast product
    reduced once (one kernel forward, fewer in reverse) while it stays below SANDWICH_MAX elements, else two
    _small_mm products."""
    if max(A.shape[1], B.shape[0]) > _UNROLL_MAX or X.size * A.shape[0] * B.shape[1] > SANDWICH_MAX:
        return _small_mm(_small_mm(A, X), B)
    return jnp.sum(A[None, :, :, None, None] * X[:, None, :, :, None] * B[None, None, None, :, :], axis=(2, 3))


def _small_left_product(A, B):
    """A @ B_g for one small A (a, d) and a batch B (G, d, k) -> (G, a, k).

    As a sum of broadcast products for small d: XLA:CPU lowers a tiny-d contraction over a long batch written as
    a dot to kernels wrapped in transposes and copies, forward and reverse (dillonE1's dense block: 0.244 ->
    0.217 ms per value-and-gradient; unrolling into scaled slices measured in between)."""
    if B.shape[1] > _UNROLL_MAX:
        return jnp.einsum("ad,gdk->gak", A, B)
    return jnp.sum(A[None, :, :, None] * B[:, None, :, :], axis=2)


@jax.custom_vjp
def _outer_gram(W):
    """W W^T (n, n) for W (n, k): one dense product; its reverse is one product too (autodiff forms two)."""
    return W @ W.T


def _outer_gram_fwd(W):
    return W @ W.T, W


def _outer_gram_bwd(W, g):
    return ((g + g.T) @ W,)


_outer_gram.defvjp(_outer_gram_fwd, _outer_gram_bwd)


def _sandwich(Lam, H):
    """Lam^T H_k Lam for a batch H (k, D, D) and one Lam (D, D), as two plain GEMMs."""
    k, D, _ = H.shape
    T = (H.reshape(k * D, D) @ Lam).reshape(k, D, D)            # H Lam
    return (jnp.swapaxes(T, 1, 2).reshape(k * D, D) @ Lam).reshape(k, D, D).swapaxes(1, 2)


# --------------------------------------------------------------------------- terms <-> units


def unit_lams(plan: Plan, scales, beta_scale=None) -> tuple:
    """Per-term Lambda_l (d_l, d_l) in ``plan.marginalized`` order -> per-unit Lambda_u in plan unit order:
    block-diagonal over the terms a unit stacks (terms on one grouping factor); beta_scale (p, p) for the unit of
    marginalized fixed effects."""
    return tuple(beta_scale if src == (BETA,) else (scales[src[0]] if len(src) == 1 else
                                                    block_diag(*(scales[h] for h in src)))
                 for src in plan.unit_src)


def _unit_terms(plan: Plan, u: int):
    """(term position h, column slice) of each term stacked in unit u."""
    out, lo = [], 0
    for h in plan.unit_src[u]:
        d = plan.n_fixed if h == BETA else plan.term_dims[h]
        out.append((h, slice(lo, lo + d)))
        lo += d
    return out


def term_shape(plan: Plan, h: int) -> tuple:
    """(G_h, d_h) of marginalized term h."""
    u = next(u for u, src in enumerate(plan.unit_src) if h in src)
    return plan.unit_groups[u], plan.term_dims[h]


def _per_term(plan: Plan, per_unit) -> tuple:
    """Per-unit arrays (G_u, d_u) -> (per marginalized term (G_h, d_h) in caller order, beta's row or None)."""
    out, beta = [None] * len(plan.marginalized), None
    for u, v in enumerate(per_unit):
        for h, cols in _unit_terms(plan, u):
            if h == BETA:
                beta = v[0, cols]
            else:
                out[h] = v[..., cols]
    return tuple(out), beta


def _per_unit(plan: Plan, per_term, units) -> list:
    """Per-term arrays (G_h, d_h) (caller order) -> per-unit (G_u, d_u) for the given units."""
    return [per_term[plan.unit_src[u][0]] if len(plan.unit_src[u]) == 1 else
            jnp.concatenate([per_term[h] for h in plan.unit_src[u]], axis=-1) for u in units]


# --------------------------------------------------------------------------- inputs


def _finite(x):
    return jnp.all(jnp.isfinite(x))


def _prepare(plan: Plan, beta, sigma, scales, offset, beta_prior):
    """Cast and validate inputs; invalid values are replaced by safe ones.

    Returns (beta_res (p,), sigma () or (N,), lams per unit, offset or None,
    mu or None, ok scalar bool).  ``beta_res`` is the beta used in the residual.
    """
    dt = plan.dtype
    p = plan.n_fixed
    scales = tuple(scales) if scales is not None else ()
    if len(scales) != len(plan.marginalized):
        raise ValueError(
            f"scales must have one entry per marginalized class ({len(plan.marginalized)}), "
            f"got {len(scales)}"
        )
    sigma = jnp.asarray(sigma, dt)
    if sigma.ndim not in (0, 1) or (sigma.ndim == 1 and sigma.shape[0] != plan.n_obs):
        raise ValueError(f"sigma must be a scalar or ({plan.n_obs},), got {sigma.shape}")
    ok = _finite(sigma) & jnp.all(sigma > 0)
    sigma = jnp.where(ok, sigma, jnp.ones_like(sigma))
    mu, S = None, None
    if plan.marginalize_beta:
        if beta_prior is None:
            raise ValueError("plan marginalizes beta: pass beta_prior=(mean (p,), scale (p, p))")
        mu = jnp.asarray(beta_prior[0], dt).reshape(p)
        S = jnp.asarray(beta_prior[1], dt).reshape(p, p)
        ok = ok & _finite(mu) & _finite(S)
        beta = mu
    else:
        beta = jnp.asarray(beta, dt).reshape(p)
        ok = ok & _finite(beta)
    sc = unit_lams(plan, tuple(jnp.asarray(s, dt).reshape(d, d) for s, d in zip(scales, plan.term_dims)), S)
    for lam in sc:
        ok = ok & _finite(lam)
    if offset is not None:
        offset = jnp.asarray(offset, dt).reshape(plan.n_obs)
        ok = ok & _finite(offset)
    # safe substitutes keep values and gradients finite for invalid inputs
    beta = jnp.where(ok, beta, jnp.zeros_like(beta))
    lams = tuple(jnp.where(ok, lam, jnp.zeros_like(lam)) for lam in sc)
    if offset is not None:
        offset = jnp.where(ok, offset, jnp.zeros_like(offset))
    if mu is not None:
        mu = beta
    return beta, sigma, lams, offset, mu, ok


def _segment_columns(plan: Plan, cols):
    """Sum a list of (N,) columns by cell -> (n_cells, len(cols)).

    Column-wise 1-D segment sums (few columns) or one stacked segment sum; both
    keep XLA:CPU away from slow minor-axis reductions in the backward pass.
    """
    if len(cols) <= 40:
        return jnp.stack([jax.ops.segment_sum(c, plan.cell, plan.n_cells) for c in cols], axis=1)
    return jax.ops.segment_sum(jnp.stack(cols, axis=1), plan.cell, plan.n_cells)


def _weighted_gram(plan: Plan, w, r):
    """H_k = sum_i w_i z_i z_i^T (n_cells, D, D) and h_k = sum_i w_i r_i z_i (n_cells, D)."""
    D = plan.D
    iu, ju = np.triu_indices(D)
    T = iu.size
    wz = [w * plan.Zt[:, a] for a in range(D)]
    cols = [wz[a] * plan.Zt[:, b] for a, b in zip(iu, ju)] + [wz[a] * r for a in range(D)]
    S = _segment_columns(plan, cols)
    E = np.zeros((T, D, D))  # symmetric unpacking by a constant matmul
    E[np.arange(T), iu, ju] = 1.0
    E[np.arange(T), ju, iu] = 1.0
    H = (S[:, :T] @ jnp.asarray(E.reshape(T, D * D), S.dtype)).reshape(-1, D, D)
    return H, S[:, T:]


def _offset_residual_sums(plan: Plan, beta, offset):
    """Raw cell sums of Zt^T r (n_cells, D) and r^T r for r = y - X beta - offset (one pass over the data)."""
    r = plan.y - plan.X @ beta - offset
    return _segment_columns(plan, [plan.Zt[:, a] * r for a in range(plan.D)]), r @ r


def _cell_stats(plan: Plan, beta, sigma, lams, offset):
    """Per-cell H~_k (n_cells, D, D), h~_k (n_cells, D); r^T W r; sum log(2 pi sigma_i^2).

    Raw statistics H_k, h_k are aggregated first (only they touch N), then
    standardized with Lambda = blockdiag(lams): H~ = Lambda^T H Lambda, h~ = Lambda^T h.
    """
    N = plan.n_obs
    if sigma.ndim == 0:
        s2 = sigma**2
        log2pi = N * (_LOG2PI + jnp.log(s2))
        Hk = plan.S_zz / s2
        if offset is None:
            delta = beta - plan.beta0
            hk = plan.S_zr - matvec(plan.S_zX, delta)
            rr = plan.rr - 2.0 * jnp.sum(delta * plan.Xtr) + jnp.sum(delta[:, None] * plan.XtX * delta[None, :])
        else:
            hk, rr = _offset_residual_sums(plan, beta, offset)
        hk, rWr = hk / s2, rr / s2
    else:
        w = 1.0 / sigma**2
        log2pi = jnp.sum(_LOG2PI - jnp.log(w))
        r = plan.y - plan.X @ beta
        if offset is not None:
            r = r - offset
        Hk, hk = _weighted_gram(plan, w, r)
        rWr = jnp.sum(w * r * r)
    Lam = block_diag(*lams)
    Ht = _sandwich(Lam, Hk)
    return Ht, hk @ Lam, rWr, log2pi


# --------------------------------------------------------------------------- factorization


def _fill(plan: Plan, j: int, F, V):
    """Dense fill-in of chain level j: F_DD -= sum over same-node cell pairs (k, k') of V_k^T V_k'.

    V (n_cells, d_j, m) = L_node^{-1} C_k, placed at (idx_k, idx_k').
    """
    idx, node = plan.dense_idx, plan.cell_node[j]
    if plan.fills[j] == "pairs":
        if plan.pairs[j] is None:
            raise ValueError("this plan was built for a scalar sigma (build_plan(..., scalar_sigma=True)); "
                             "build it with scalar_sigma=False for per-observation sigma")
        pa, pb, ia, ib = plan.pairs[j]
        P = jnp.einsum("pim,pin->pmn", V[pa], V[pb])
        return F.at[ia[:, :, None], ib[:, None, :]].add(-P)
    d, G = plan.unit_dims[j], plan.unit_groups[j]
    rows = node[:, None] * d + jnp.arange(d)[None, :]
    M = jnp.zeros((G * d, plan.dense_size), F.dtype)  # row block g: L_g^{-1} C_g
    M = M.at[rows[:, :, None], idx[:, None, :]].add(V)
    return F - M.T @ M


def _dense_lam_vector(plan: Plan, lams):
    """(ds,) diagonal of Lambda_D when every dense unit is scalar (d = 1), else None."""
    units = range(plan.n_chain_units, len(plan.unit_dims))
    if not all(plan.unit_dims[u] == 1 for u in units):
        return None
    return jnp.concatenate([jnp.broadcast_to(lams[u][0, 0], (plan.unit_groups[u],)) for u in units])


def _dense_scale_rows(plan: Plan, lams, x):
    """Lambda_D^T x for x (ds, k) in the dense layout (per dense unit)."""
    lam = _dense_lam_vector(plan, lams)
    if lam is not None:
        return lam[:, None] * x
    K, out = plan.n_chain_units, []
    for u in range(K, len(plan.unit_dims)):
        lo, G, d = plan.dense_offsets[u - K], plan.unit_groups[u], plan.unit_dims[u]
        blk = x[lo:lo + G * d].reshape(G, d, -1)
        out.append(_small_left_product(lams[u].T, blk).reshape(G * d, -1))
    return jnp.concatenate(out, axis=0)


def _dense_scale(plan: Plan, lams, M):
    """Lambda_D^T M Lambda_D for a (ds, ds) matrix in the dense layout: one elementwise pass when every dense unit
    is scalar, else two passes of _dense_scale_rows (no ds^3 work)."""
    lam = _dense_lam_vector(plan, lams)
    if lam is not None:
        return lam[:, None] * M * lam[None, :]
    return _dense_scale_rows(plan, lams, _dense_scale_rows(plan, lams, M).T).T


def _level1_R(lams, Linv):
    """R_g = Lambda_0 A_g^{-1} Lambda_0^T (G_0, d_0, d_0) from Linv = chol(I + A_g)^{-1}."""
    return _small_sandwich(lams[0], _small_mm(jnp.swapaxes(Linv, -1, -2), Linv), lams[0].T)


def _level1_Q(lams, Linv):
    """Q_g = Lambda_0 L_g^{-T} (G_0, d0, d0), so that R_g = Q_g Q_g^T."""
    return _small_mm(lams[0], jnp.swapaxes(Linv, -1, -2))


def _level1_M(plan: Plan, lams, s2, Linv, R=None):
    """M = S_DD / s2 - K / s2^2 (ds, ds): the dense block's statistics after the level-1 fill (scalar sigma), before
    Lambda_D (scaled form) or Sigma_D^{-1} (precision form). A PooledFill holds S_DD as the last row of its
    constants: one matrix-vector product gives M's upper triangle (value and reverse pass).

    Linv: chol(I + Lambda_0^T A_g Lambda_0)^{-1} (G_0, d0, d0) per group, or (U, d0, d0) per pooled class for a
    PooledFill (``_group_leaves``); R: _level1_R(lams, Linv) where the caller has it (one reverse pass for both)."""
    fill = plan.bilinear
    if isinstance(fill, PooledFill):
        R = _level1_R(lams, Linv) if R is None else R
        d = R.shape[-1]
        iu, ju = np.triu_indices(d)
        select = np.zeros((d * d, iu.size))
        select[iu * d + ju, np.arange(iu.size)] = 1.0
        # the upper entries by a one-hot contraction: reading entries would cost a padded kernel each in reverse,
        # a gather a scatter loop
        upper = jnp.sum(R.reshape(-1, d * d, 1) * jnp.asarray(select, R.dtype), axis=1)
        coef = jnp.concatenate([upper.reshape(-1) * (-1.0 / s2**2), (1.0 / s2)[None]])
        return _unpack_symmetric(coef @ fill.K, fill.tri)
    return plan.S_DD / s2 - _level1_K(plan, lams, Linv, R) / s2**2


@jax.custom_vjp
def _unpack_symmetric(t, tri):
    """The symmetric (n, n) matrix whose upper triangle (row-major, T = n (n + 1) / 2 entries) is t: t[tri].

    Reverse pass: the cotangent of entry (i, j), i <= j, is g[i, j] + g[j, i] (once on the diagonal): two gathers,
    where autodiff of the gather would scatter-add n^2 values into T."""
    return t[tri]


def _unpack_fwd(t, tri):
    return t[tri], tri


def _unpack_bwd(tri, g):
    n = g.shape[0]
    iu, ju = np.triu_indices(n)
    gs = g + jnp.where(jnp.eye(n, dtype=bool), 0.0, g.T)
    return gs[iu, ju], None


_unpack_symmetric.defvjp(_unpack_fwd, _unpack_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _eye_kron(P, G: int):
    """I_G kron P (G d, G d) for P (d, d): one broadcast product; reverse pass: the sum of the G diagonal blocks of
    the cotangent (a strided gather), where autodiff would reduce all (G d)^2 entries."""
    d = P.shape[0]
    eye = jnp.eye(G, dtype=P.dtype)
    return (eye[:, None, :, None] * P[None, :, None, :]).reshape(G * d, G * d)


def _eye_kron_fwd(P, G):
    return _eye_kron(P, G), None


def _eye_kron_bwd(G, _, g):
    d = g.shape[0] // G
    g4 = g.reshape(G, d, G, d)
    idx = jnp.arange(G)
    return (jnp.sum(g4[idx, :, idx, :], axis=0),)


_eye_kron.defvjp(_eye_kron_fwd, _eye_kron_bwd)


def _level1_K(plan: Plan, lams, Linv, R=None):
    """K = sum_g B_g R_g B_g^T (ds, ds), the level-1 fill for scalar sigma, for the dense-product and coefficient-list
    fills (a PooledFill forms M directly: ``_level1_M``). Linv: chol(I + Lambda_0^T A_g Lambda_0)^{-1} (G_0, d0, d0);
    R: _level1_R(lams, Linv) if the caller has it."""
    fill, ds = plan.bilinear, plan.dense_size
    if R is None and not isinstance(fill, DenseProductFill):
        R = _level1_R(lams, Linv)
    if isinstance(fill, DenseProductFill):  # K = W W^T, W_g = B_g Q_g (R_g = Q_g Q_g^T): one dense product
        Q = _level1_Q(lams, Linv)
        Bc, d0 = fill.Bc, Q.shape[-1]
        W = jnp.stack([sum(Bc[:, a, :] * Q[None, :, a, b] for a in range(d0)) for b in range(d0)], axis=1)
        return _outer_gram(W.reshape(ds, -1))
    assert isinstance(fill, PairListFill)
    return _bilinear_K(R.reshape(-1), tuple(fill), ds * ds, plan.n_targets).reshape(ds, ds)


def _structured_dense(plan: Plan, lams, s2, Linv, R=None):
    """F_DD after the level-1 fill, for scalar sigma, from constant statistics (no per-pair gathers of V).

    F = I + Lambda_D^T (S_DD / s2 - K / s2^2) Lambda_D from _level1_M (Linv, R as it takes them).
    """
    return _add_identity(_dense_scale(plan, lams, _level1_M(plan, lams, s2, Linv, R)))


def _add_identity(M):
    """M + I for a square M (a diagonal scatter: no n x n identity is materialized)."""
    i = jnp.arange(M.shape[0])
    return M.at[i, i].add(1.0)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _bilinear_K(Rf, bil, size, n_targets):
    """Flat K (size,) = B blockdiag(R_g) B^T from the constant structure bil = (coef, rid, seg, targets, targets_t):
    each upper-triangle target is a sorted segment sum of coef * R[rid], mirrored at targets_t (diagonal dropped)."""
    coef, rid, seg, targets, targets_t = bil
    Ku = jax.ops.segment_sum(coef * Rf[rid], seg, n_targets, indices_are_sorted=True)
    Kf = jnp.zeros(size, coef.dtype).at[targets].add(Ku, indices_are_sorted=True, unique_indices=True)
    return Kf.at[targets_t].add(Ku, mode="drop", unique_indices=True)


def _bilinear_K_fwd(Rf, bil, size, n_targets):
    return _bilinear_K(Rf, bil, size, n_targets), (Rf.shape[0], bil)


def _bilinear_K_bwd(size, n_targets, res, g):
    """Explicit reverse pass: the cotangent of each target (upper + mirrored entry) once, then the sorted entries.

    Measured at the same cost as autodiff's transpose; kept as it was when the benchmarks ran, because the other
    form changes the gradient's last bits and, with fit_ml's ftol = 1e-15 (below the criterion's round-off), the
    InstEval ML fit then takes 40 instead of 27 evaluations to the same optimum."""
    nR, bil = res
    coef, rid, seg, targets, targets_t = bil
    gu = g[targets] + g.at[targets_t].get(mode="fill", fill_value=0.0)
    gu = lax.optimization_barrier(gu)
    gR = jax.ops.segment_sum(coef * gu[seg], rid, nR)
    return gR, jax.tree_util.tree_map(jnp.zeros_like, bil)


_bilinear_K.defvjp(_bilinear_K_fwd, _bilinear_K_bwd)


def _one_level(plan: Plan, sigma) -> bool:
    """True if the one-level constant-statistics path applies (scalar sigma, one chain level, a dense block)."""
    return plan.level1 is not None and sigma.ndim == 0


def _group_leaves(plan: Plan, Linv):
    """Per-group leaf factors (G_0, d0, d0) -> what _level1_M takes: per pooled class for a PooledFill (one group
    each)."""
    return Linv[plan.bilinear.rep] if isinstance(plan.bilinear, PooledFill) else Linv


def _one_level_leaves(plan: Plan, lams, s2):
    """Leaf factors of the one-level path: (Linv = chol(I + Lambda_0^T A_g Lambda_0 / s2)^{-1}, its diagonal's
    log-determinants), per group (G_0, ...) or per class of equal A_g for a PooledFill (U, ...)."""
    diag, Linv = chol_inv(_leaf_matrices(plan, lams, s2))
    return Linv, 2.0 * jnp.sum(jnp.log(diag), axis=-1)


def _leaf_matrices(plan: Plan, lams, s2):
    """I + Lambda_0^T A_g Lambda_0 / s2 per group (G_0, d0, d0), or per pooled class (U, d0, d0)."""
    A0 = plan.bilinear.A if isinstance(plan.bilinear, PooledFill) else plan.level1[0]
    A = _small_sandwich(lams[0].T, A0, lams[0]) / s2
    return A + jnp.eye(A.shape[-1], dtype=A.dtype)


def _one_level_R(plan: Plan, lams, s2):
    """(R = Lambda_0 (I + Lambda_0^T A_g Lambda_0 / s2)^{-1} Lambda_0^T, log|I + Lambda_0^T A_g Lambda_0 / s2|) per
    group (G_0, ...) or per pooled class (U, ...), without the leaf factors (``_spd_inv_logdet``)."""
    Ainv, logdets = _spd_inv_logdet(_leaf_matrices(plan, lams, s2))
    return _small_sandwich(lams[0], Ainv, lams[0].T), logdets


def _one_level_matrix(plan: Plan, lams, s2):
    """Matrix part for a one-level chain + dense block from constants, in the plan's dense form:
    (R, dense block, log|.| of the chain plus the form's shift), with the dense block F_DD (scaled) or
    F~ = Sigma_D^{-1} + M (precision; the shift adds log|Sigma_D|, ``_precision_dense``).

    R is (G_0, d_0, d_0) per group, or (U, d_0, d_0) per class of equal A_g for a PooledFill (whose per-call work
    then never touches the G_0 groups)."""
    if isinstance(plan.bilinear, DenseProductFill):   # its fill uses the leaf factors themselves
        Linv, logdets = _one_level_leaves(plan, lams, s2)
        R = _level1_R(lams, Linv)
    else:
        Linv, (R, logdets) = None, _one_level_R(plan, lams, s2)
    pooled = isinstance(plan.bilinear, PooledFill)
    logdet = jnp.sum(plan.bilinear.count * logdets) if pooled else jnp.sum(logdets)
    if plan.dense_form == "precision":
        F, shift = _precision_dense(plan, lams, s2, Linv, R)
        return R, F, logdet + shift
    return R, _structured_dense(plan, lams, s2, Linv, R), logdet


def _dense_rhs(plan: Plan, lams, xt):
    """Dense right-hand sides (ds, k) in the plan's dense form from x~ of _one_level_rhs: Lambda_D^T x~ (scaled),
    x~ (precision: x_D^T F^{-1} x_D = x~^T F~^{-1} x~ since F = Lambda_D^T F~ Lambda_D)."""
    return xt if plan.dense_form == "precision" else _dense_scale_rows(plan, lams, xt)


def _precision_dense(plan: Plan, lams, s2, Linv, R=None):
    """Precision form of the one-level dense block (scalar sigma): F~ = Sigma_D^{-1} + S_DD / s2 - K / s2^2.

    F_DD = I + Lambda_D^T M Lambda_D = Lambda_D^T F~ Lambda_D with M = S_DD / s2 - K / s2^2 and Sigma_D =
    Lambda_D Lambda_D^T = blockdiag over the dense units of I_{G_u} kron Sigma_u, so log|F_DD| = log|F~| +
    sum_u G_u log|Sigma_u|: the ds x ds block is never scaled by Lambda_D (Sigma_u^{-1} enters its G_u d_u^2
    diagonal-block entries). Returns (F~ (ds, ds), sum_u G_u log|Sigma_u|); the latter is NaN (log_marginal:
    -inf) where a Sigma_u is singular, with finite substitutes so that gradients stay finite."""
    K = plan.n_chain_units
    blocks, shift, ok = [], jnp.zeros((), s2.dtype), jnp.ones((), bool)
    for u in range(K, len(plan.unit_dims)):
        P, logdet, good = _small_precision(lams[u])                        # Sigma_u^{-1}, log|Sigma_u|
        ok = ok & good
        blocks.append(_eye_kron(P, plan.unit_groups[u]))   # no scatter: elementwise, fused with the addition below
        shift = shift + plan.unit_groups[u] * logdet
    Sinv = blocks[0] if len(blocks) == 1 else block_diag(*blocks)
    return _level1_M(plan, lams, s2, Linv, R) + Sinv, jnp.where(ok, shift, jnp.nan)


def _one_level_rhs(plan: Plan, lams, s2, R, a_raw, x_raw):
    """Right-hand sides for the one-level path, k at once, from explicit group sums.

    a_raw (G_0, d_0, k) raw group sums of Z_0^T r, x_raw (ds, k) raw dense sums of Z_D^T r, R from
    _one_level_matrix -> (chain Gram (k, k) = sum_g z_g^T z_g, x~ (ds, k) the eliminated dense right-hand sides
    before Lambda_D: x_D = Lambda_D^T x~ in the scaled form, x~ itself in the precision form (``_dense_rhs``)).
    """
    if isinstance(plan.bilinear, PooledFill):
        R = R[plan.bilinear.cls]
    _, rows, cols, vals = plan.level1
    w = jnp.einsum("gab,gbk->gak", R, a_raw)
    gram = jnp.einsum("gak,gal->kl", a_raw, w) / s2**2
    k = a_raw.shape[-1]
    if isinstance(plan.bilinear, DenseProductFill):   # B w as one dense product instead of a scatter of its entries
        Bw = plan.bilinear.Bc.reshape(plan.dense_size, -1) @ jnp.swapaxes(w, 0, 1).reshape(-1, k)
    else:
        Bw = jax.ops.segment_sum(vals[:, None] * w.reshape(-1, k)[cols], rows, plan.dense_size)
    return gram, (x_raw - Bw / s2) / s2


def one_level_rhs_coef(plan: Plan, lams, s2, R, c):
    """Right-hand sides of the one-level path given as combinations of the constant columns [Z^T X, Z^T r0].

    c (p + 1, k): the k right-hand sides are [X r0] c (e.g. c = [-δ; 1] for r = y - X(β0 + δ)). With a PooledFill
    every term is a contraction of per-class constants (work in U, ds, p; none in G_0, cells or N); otherwise the
    group sums are formed first. Returns (chain Gram (k, k), x~ (ds, k)) as _one_level_rhs.
    """
    a_r, a_X, x_r, x_X = plan.level1_rhs
    x_cols = jnp.concatenate([x_X, x_r[:, None]], axis=1)          # (ds, p + 1)
    fill = plan.bilinear
    if isinstance(fill, PooledFill):
        k0, ds = c.shape[0], plan.dense_size
        rPM = R.reshape(-1) @ fill.PM                                 # one matrix-vector product for both
        Bw_cols, Mc = rPM[:ds * k0].reshape(ds, k0), rPM[ds * k0:].reshape(k0, k0)
        gram = _small_mm(_small_mm(c.T, Mc), c) / s2**2
        return gram, _small_mm(x_cols - Bw_cols / s2, c) / s2
    x_raw = _small_mm(x_cols, c)
    a_raw = jnp.einsum("gak,kl->gal", jnp.concatenate([a_X, a_r[:, :, None]], axis=2), c)
    return _one_level_rhs(plan, lams, s2, R, a_raw, x_raw)


def _one_level_offset_residual(plan: Plan, lams, s2, R, beta, offset):
    """(chain Gram (1, 1), x_D (ds, 1), r^T W r) of the one-level path for r = y - X beta - offset: one pass over
    the data for the group and dense sums of Z^T r (an HMC offset is not a sum of constants), then constants."""
    Dc, G0 = plan.chain_dim, plan.unit_groups[0]
    hk, rr = _offset_residual_sums(plan, beta, offset)
    a_raw = jax.ops.segment_sum(hk[:, :Dc], plan.cell_node[0], G0)
    x_raw = jnp.zeros(plan.dense_size, hk.dtype).at[plan.dense_idx].add(hk[:, Dc:])
    gram, xt = _one_level_rhs(plan, lams, s2, R, a_raw[:, :, None], x_raw[:, None])
    return gram, _dense_rhs(plan, lams, xt), rr / s2


def _eliminate_matrix(plan: Plan, sigma, lams, Ht):
    """Matrix part of the chain elimination.

    Ht (n_cells, D, D) standardized cell statistics -> (levels: per chain level (Linv (G_j, d_j, d_j),
    Wm (G_j, d_j, rest_j), V (n_cells, d_j, m) or None), F_DD (ds, ds) or None, chain log-determinant).
    """
    dt = plan.dtype
    K, dims, Dc, m, ds = plan.n_chain_units, plan.unit_dims, plan.chain_dim, plan.m, plan.dense_size
    idx = plan.dense_idx
    logdet = jnp.zeros((), dt)
    structured = m and K and sigma.ndim == 0 and plan.bilinear is not None
    F = None
    if m and not structured:
        F = jnp.eye(ds, dtype=dt).at[idx[:, :, None], idx[:, None, :]].add(Ht[:, Dc:, Dc:])
    levels = []
    if K:
        A = jax.ops.segment_sum(Ht[:, :Dc, :Dc], plan.cell_node[0], plan.unit_groups[0])
        C = Ht[:, :Dc, Dc:]
    for j in range(K):
        d, node = dims[j], plan.cell_node[j]
        diag, Linv = chol_inv(A[:, :d, :d] + jnp.eye(d, dtype=dt))
        Wm = _bmm(Linv, A[:, :d, d:])
        logdet = logdet + 2.0 * jnp.sum(jnp.log(diag))
        V = None
        if m:
            V = _bmm(Linv[node], C[:, :d, :])
            F = (_structured_dense(plan, lams, sigma**2, _group_leaves(plan, Linv))
                 if (structured and j == 0) else _fill(plan, j, F, V))
            C = C[:, d:, :] - _bmm(jnp.swapaxes(Wm[node], 1, 2), V)
        levels.append((Linv, Wm, V))
        if j + 1 < K:
            A = A[:, d:, d:] - jnp.einsum("gia,gib->gab", Wm, Wm)
            A = jax.ops.segment_sum(A, plan.parent[j], plan.unit_groups[j + 1])
    return tuple(levels), F, logdet


def _eliminate_rhs(plan: Plan, levels, ht):
    """Right-hand-side part of the chain elimination for k vectors at once (linear in ht).

    ht (n_cells, D, k) standardized cell sums -> (z per chain level (G_j, d_j, k), x_D (ds, k) or None).
    """
    K, dims, Dc, m, ds = plan.n_chain_units, plan.unit_dims, plan.chain_dim, plan.m, plan.dense_size
    idx = plan.dense_idx
    x = jnp.zeros((ds, ht.shape[-1]), ht.dtype).at[idx].add(ht[:, Dc:, :]) if m else None
    zs = []
    if K:
        a = jax.ops.segment_sum(ht[:, :Dc, :], plan.cell_node[0], plan.unit_groups[0])
    for j in range(K):
        d, node = dims[j], plan.cell_node[j]
        Linv, Wm, V = levels[j]
        z = _bmm(Linv, a[:, :d, :])
        zs.append(z)
        if m:
            x = x.at[idx].add(-jnp.einsum("kim,kic->kmc", V, z[node]))
        if j + 1 < K:
            a = a[:, d:, :] - jnp.einsum("gia,gic->gac", Wm, z)
            a = jax.ops.segment_sum(a, plan.parent[j], plan.unit_groups[j + 1])
    return tuple(zs), x


def _eliminate(plan: Plan, beta, sigma, scales, offset=None, beta_prior=None):
    """Chain elimination -> (Factor without the dense factor, F_DD, x_D); F_DD, x_D are None without a dense block."""
    return _eliminate_prepared(plan, _prepare(plan, beta, sigma, scales, offset, beta_prior))


def _eliminate_prepared(plan: Plan, prepared):
    beta, sigma, lams, offset, mu, ok = prepared
    dt = plan.dtype
    zero = jnp.zeros((), dt)
    if plan.D == 0:
        r = plan.y - plan.X @ beta - (0.0 if offset is None else offset)
        w = 1.0 / jnp.broadcast_to(sigma, (plan.n_obs,)) ** 2
        log2pi = jnp.sum(_LOG2PI - jnp.log(w))
        return Factor((), None, None, lams, mu, zero, zero, jnp.sum(w * r * r), log2pi, ok), None, None
    Ht, ht, rWr, log2pi = _cell_stats(plan, beta, sigma, lams, offset)
    mats, F, logdet = _eliminate_matrix(plan, sigma, lams, Ht)
    zs, x = _eliminate_rhs(plan, mats, ht[:, :, None])
    quad = sum((jnp.sum(z * z) for z in zs), zero)
    levels = tuple((Linv, Wm, z[..., 0], V) for (Linv, Wm, V), z in zip(mats, zs))
    fac = Factor(levels, None, None, lams, mu, logdet, quad, rWr, log2pi, ok)
    return (fac, F, x[:, 0]) if plan.m else (fac, None, None)


def factorize(plan: Plan, beta, sigma, scales, offset=None, beta_prior=None) -> Factor:
    """Block-Cholesky factorize F = I + Zt^T W Zt (see module docstring) -> Factor."""
    fac, F, x = _eliminate(plan, beta, sigma, scales, offset, beta_prior)
    if F is None:
        return fac
    LD, zD, logdet = _dense_chol(F, x)
    return fac._replace(LD=LD, zD=zD, logdet=fac.logdet + logdet, quad=fac.quad + zD @ zD)


def _chol(F):
    """Lower Cholesky factor of a symmetric F (symmetric by construction: no input symmetrization pass)."""
    return lax.linalg.cholesky(F, symmetrize_input=False)


TRI_INV_BLOCK = 40        # triangular inverses up to this size are one triangular solve; larger ones are halved
                          # (20 ran no faster and compiled twice the kernels: n = 80, 0.23 vs 0.12 s)
TRI_INV_MAX_LEAVES = 8    # ... into at most this many solves (larger leaves for large n: a bounded program size)
BLOCKED_INVERSE_MAX = 512  # above this, LAPACK's triangular solves beat the halving (n = 400: 3.1 vs 5.7 ms,
                           # n = 1500: 207 vs 143 ms on one core)


def _tri_inv_leaf(n: int) -> int:
    """The block size ``_upper_inv`` halves an (n, n) factor down to: TRI_INV_BLOCK, or n / TRI_INV_MAX_LEAVES."""
    return max(TRI_INV_BLOCK, -(-n // TRI_INV_MAX_LEAVES))


def _upper_inv_split(n: int, leaf: int | None = None):
    """Where ``_upper_inv`` halves an (n, n) factor (its result's block [h:, :h] is zero), or None if it does not."""
    return None if n <= (_tri_inv_leaf(n) if leaf is None else leaf) else n // 2


def _upper_inv(U, leaf: int | None = None):
    """U^{-1} for an upper-triangular U (n, n), by halving down to blocks of ``leaf`` (default: TRI_INV_BLOCK, or
    n / TRI_INV_MAX_LEAVES if larger): [[P, Q], [0, R]]^{-1} = [[P^-1, -P^-1 Q R^-1], [0, R^-1]].

    The off-diagonal blocks become GEMMs; XLA:CPU's triangular solve against an identity runs at a fraction of
    GEMM speed (n = 80: ~21 us against 37 us for one solve; 160: 94 against 127)."""
    n = U.shape[0]
    leaf = _tri_inv_leaf(n) if leaf is None else leaf      # fixed by the whole factor's size, down the recursion
    h = _upper_inv_split(n, leaf)
    if h is None:
        return lax.linalg.triangular_solve(U, jnp.eye(n, dtype=U.dtype), left_side=True, lower=False)
    Pi, Ri = _upper_inv(U[:h, :h], leaf), _upper_inv(U[h:, h:], leaf)
    return jnp.block([[Pi, -(Pi @ (U[:h, h:] @ Ri))], [jnp.zeros((n - h, h), U.dtype), Ri]])


def _spd_inverse(L):
    """F^{-1} = X X^T with X = L^{-T}, from the lower Cholesky factor L of F: a blocked triangular inverse, then
    X X^T from X's blocks [[P, Q], [0, R]] by two GEMMs that skip the zero block, in the form XLA:CPU runs fastest
    (A B^T). With the triangular inverse, one core: n = 80: 48 us, 160: 0.22 ms, 400: 2.5 ms, against 76 us,
    0.44 ms and 5.6 ms with one GEMM of the whole X (benchmarks/dense_inverse.py). cho_solve against the identity
    above BLOCKED_INVERSE_MAX."""
    n = L.shape[0]
    if n > BLOCKED_INVERSE_MAX:
        return jax.scipy.linalg.cho_solve((L, True), jnp.zeros((n, n), L.dtype).at[jnp.arange(n), jnp.arange(n)].set(1))
    X = _upper_inv(L.T)
    h = _upper_inv_split(n)
    if h is None:
        return X @ X.T
    # X = [[P, Q], [0, R]]: X X^T = [[P P^T + Q Q^T, Q R^T], [R Q^T, R R^T]] skips the zero block's products
    top = X[:h] @ X[:h].T                                  # (h, h)
    low = X[h:, h:] @ X[:, h:].T                           # (n - h, n) = [R Q^T, R R^T]
    return jnp.concatenate([jnp.concatenate([top, low[:, :h].T], axis=1), low], axis=0)


def _dense_chol(F, x):
    """Cholesky L of the dense block, z = L^{-1} x (x (n,) or (n, k)) and log|F|."""
    L = _chol(F)
    return L, solve_triangular(L, x, lower=True), 2.0 * jnp.sum(jnp.log(jnp.diagonal(L)))


@jax.custom_vjp
def dense_logdet_gram(F, B):
    """(log|F|, B^T F^{-1} B) for SPD F (n, n) and B (n, k).

    Reverse mode via one F^{-1} (JAX's Cholesky VJP is slow on CPU): dF = g_ld F^{-1} - Y G Y^T, dB = 2 Y G with
    Y = F^{-1} B and G the symmetrized cotangent of the Gram matrix."""
    return _gram_fwd(F, B)[0]


def _gram_fwd(F, B):
    L, W, logdet = _dense_chol(F, B)
    return (logdet, W.T @ W), (L, B)


def _gram_bwd(res, g):
    L, B = res
    gl, gG = g
    Finv = _spd_inverse(L)
    Y = Finv @ B
    Gs = 0.5 * (gG + gG.T)
    YG = Y @ Gs
    outer = YG * Y.T if Y.shape[1] == 1 else YG @ Y.T     # k = 1 (the density): elementwise, fused, no GEMM
    return gl * Finv - outer, 2.0 * YG


dense_logdet_gram.defvjp(_gram_fwd, _gram_bwd)


def _dense_logdet_quad(F, x):
    """log|F| - x^T F^{-1} x for SPD F (n, n), x (n,): dense_logdet_gram with one right-hand side."""
    logdet, G = dense_logdet_gram(F, x[:, None])
    return logdet - G[0, 0]


def _log_density(fac: Factor):
    val = -0.5 * (fac.rWr - fac.quad + fac.logdet + fac.log2pi)
    good = fac.ok & jnp.isfinite(val)
    return jnp.where(good, val, -jnp.inf)


def logdet_gram(plan: Plan, lams, sigma, c):
    """The engine primitive for scalar sigma: log|F| and the whitened Gram matrix of k right-hand sides.

    F = I + Zt^T Zt / sigma^2 with Zt = [Z_u Lambda_u]_u (plan units), right-hand sides r_j = [X r0] c[:, j] with
    r0 = y - X beta0 (so c = [-(beta - beta0); 1] gives the residual at beta).  lams: per-unit Lambda (d_u, d_u) in
    plan unit order (any square root of Sigma_u / sigma-free scale); sigma: scalar; c: (p + 1, k).
    Returns (log|F| (), G (k, k)) with G = h^T F^{-1} h, h = Zt^T r / sigma^2 -- the term subtracted from
    r^T r / sigma^2 in the marginal density (log_marginal: k = 1) and in the profiled ML criterion (k = p + 1).
    Every quantity comes from the plan's sufficient statistics: no pass over the N observations.
    """
    s2 = sigma**2
    if _one_level(plan, sigma):
        R, F, logdet = _one_level_matrix(plan, lams, s2)
        gram, xt = one_level_rhs_coef(plan, lams, s2, R, c)
        xD = _dense_rhs(plan, lams, xt)
    else:
        Lam = block_diag(*lams)
        Ht = _sandwich(Lam, plan.S_zz / s2)
        raw = jnp.einsum("nap,pk->nak", jnp.concatenate([plan.S_zX, plan.S_zr[:, :, None]], axis=2), c) / s2
        ht = jnp.einsum("ab,kac->kbc", Lam, raw)                              # Lambda^T per cell
        mats, F, logdet = _eliminate_matrix(plan, sigma, lams, Ht)
        zs, xD = _eliminate_rhs(plan, mats, ht)
        gram = sum((jnp.einsum("gic,gie->ce", z, z) for z in zs), jnp.zeros((c.shape[1],) * 2, c.dtype))
    if F is not None:
        ldD, GD = dense_logdet_gram(F, xD)
        logdet, gram = logdet + ldD, gram + GD
    return logdet, gram


def _beta_last(plan: Plan, prepared, beta_prior):
    """beta ~ N(mu, S S^T) eliminated after every random effect (plan.beta_block == "last"): with V the marginal
    covariance of y given beta and the engine primitive's Gram of the k = p + 1 columns C = [X S, y - X mu],
    Q = C^T V^{-1} C = C^T C / sigma^2 - G (from the plan's X^T X, X^T r0, r0^T r0), A = Q[:p, :p], b = Q[:p, p]:

        log N(y; X mu, V + X S S^T X^T) = -1/2 [Q[p, p] - b^T (I + A)^{-1} b + log|V| + log|I + A| + N log 2 pi]

    (determinant lemma and Woodbury on the p x p block). Returns (log|F| + log|I + A|, Q[p, p], |L^{-1} b|^2,
    L = chol(I + A) (p, p), w = L^{-1} b (p,), S (p, p)); beta | y, theta ~ N(mu + S L^{-T} w, S (I + A)^{-1} S^T).
    """
    _, sigma, lams, offset, mu, ok = prepared
    if sigma.ndim != 0 or offset is not None:
        raise ValueError("this plan integrates beta out last (beta_block='last': scalar sigma, every term "
                         "marginalized, no offset); build the plan with beta_block='unit' for a per-observation "
                         "sigma or an offset")
    dt, p = plan.dtype, plan.n_fixed
    S = jnp.where(ok, jnp.asarray(beta_prior[1], dt).reshape(p, p), jnp.eye(p, dtype=dt))
    c = (jnp.zeros((p + 1, p + 1), dt).at[:p, :p].set(S).at[:p, p].set(plan.beta0 - mu).at[p, p].set(1.0))
    logdet, gram = logdet_gram(plan, lams, sigma, c)
    M = jnp.block([[plan.XtX, plan.Xtr[:, None]], [plan.Xtr[None, :], plan.rr[None, None]]])
    Q = c.T @ M @ c / sigma**2 - gram
    L = _chol(jnp.eye(p, dtype=dt) + Q[:p, :p])
    w = solve_triangular(L, Q[:p, p], lower=True)
    return logdet + 2.0 * jnp.sum(jnp.log(jnp.diagonal(L))), Q[p, p], w @ w, L, w, S


def log_marginal(plan: Plan, beta, sigma, scales, offset=None, beta_prior=None):
    """log N(y; X beta + offset, sum_l Z_l (I kron Sigma_l) Z_l^T + diag(sigma^2)) -> scalar.

    beta (p,) (ignored if the plan marginalizes beta; then beta_prior=(mean (p,),
    scale (p, p)) is integrated), sigma () or (N,), scales: tuple of (d_l, d_l)
    Lambda_l (Sigma_l = Lambda_l Lambda_l^T) in ``plan.marginalized`` order,
    offset (N,) or None.  Returns -inf for invalid inputs or failed factorizations.
    """
    prepared = _prepare(plan, beta, sigma, scales, offset, beta_prior)
    beta, sigma, lams, offset, mu, ok = prepared
    if plan.beta_block == "last":
        logdet, rWr, quad, *_ = _beta_last(plan, prepared, beta_prior)
        log2pi = plan.n_obs * (_LOG2PI + jnp.log(sigma**2))
        return _log_density(Factor((), None, None, lams, mu, logdet, quad, rWr, log2pi, ok))
    if sigma.ndim == 0 and plan.D:
        s2 = sigma**2
        log2pi = plan.n_obs * (_LOG2PI + jnp.log(s2))
        if offset is None:
            # scalar sigma, no offset: sufficient statistics only, through the engine primitive
            delta = beta - plan.beta0
            rr = plan.rr - 2.0 * jnp.sum(delta * plan.Xtr) + jnp.sum(delta[:, None] * plan.XtX * delta[None, :])
            c = jnp.concatenate([-delta, jnp.ones((1,), delta.dtype)])[:, None]
            logdet, gram = logdet_gram(plan, lams, sigma, c)
            return _log_density(Factor((), None, None, lams, mu, logdet, gram[0, 0], rr / s2, log2pi, ok))
        if _one_level(plan, sigma):
            # one chain level + dense block with an HMC offset: group sums of the offset residual, then constants
            R, F, logdet = _one_level_matrix(plan, lams, s2)
            gram, xD, rWr = _one_level_offset_residual(plan, lams, s2, R, beta, offset)
            ldq = _dense_logdet_quad(F, xD[:, 0])
            return _log_density(Factor((), None, None, lams, mu, logdet + ldq, gram[0, 0], rWr, log2pi, ok))
    fac, F, x = _eliminate_prepared(plan, prepared)
    if F is not None:
        ldq = _dense_logdet_quad(F, x)  # logdet_D - quad_D
        fac = fac._replace(logdet=fac.logdet + ldq)
    return _log_density(fac)


# --------------------------------------------------------------------------- recovery


def _backsolve(plan: Plan, fac: Factor, eps_levels, eps_D):
    """Solve L^T v = z + eps root -> leaves; returns per-unit v (G_u, d_u)."""
    K, dims, groups = plan.n_chain_units, plan.unit_dims, plan.unit_groups
    vD = None
    if plan.m:
        vD = solve_triangular(fac.LD, fac.zD + eps_D, lower=True, trans="T")
    vs = [None] * K
    for j in reversed(range(K)):
        Linv, Wm, z, V = fac.levels[j]
        rhs = z + eps_levels[j]
        if j + 1 < K:
            anc, mp = [], plan.parent[j]
            for lev in range(j + 1, K):
                anc.append(vs[lev][mp])
                if lev + 1 < K:
                    mp = plan.parent[lev][mp]
            rhs = rhs - matvec(Wm, jnp.concatenate(anc, axis=-1))
        if plan.m:
            cv = jnp.einsum("kim,km->ki", V, vD[plan.dense_idx])
            rhs = rhs - jax.ops.segment_sum(cv, plan.cell_node[j], groups[j])
        vs[j] = jnp.einsum("gij,gi->gj", Linv, rhs)
    for u in range(K, len(dims)):
        off = plan.dense_offsets[u - K]
        vs.append(vD[off : off + groups[u] * dims[u]].reshape(groups[u], dims[u]))
    return vs


def _to_effects(plan: Plan, fac: Factor, vs):
    """Per-unit standardized v -> tuple (u per marginalized class in caller order[, beta]).

    Invalid inputs (fac.ok False) give NaN effects.
    """
    nan = jnp.asarray(jnp.nan, plan.dtype)
    out, beta = _per_term(plan, [jnp.where(fac.ok, v @ lam.T, nan) for v, lam in zip(vs, fac.lams)])
    return out + (fac.mu + beta,) if plan.beta_block in ("dense", "chain") else out


def _one_level_draw(plan: Plan, prepared, eps0, eps_D):
    """v = F^{-1} h + L^{-T} eps for a one-level chain + dense block, scalar sigma, no offset, from the plan's
    constants (work in the groups and the dense block; no pass over the N observations or per-cell statistics).

    With F = [[L_0 L_0^T, F_0D], [F_D0, F_DD]] (L_0 per group) and S = L_D L_D^T its Schur complement:
    v_D = L_D^{-T}(L_D^{-1} x_D + eps_D) with x_D the eliminated dense right-hand side, and per group
    v_g = L_g^{-T}(L_g^{-1} Lambda_0^T (a_g - (B^T Lambda_D v_D)_g) / s2 + eps_g), a_g = Z_g^T r (raw group sums,
    constants of beta), B the raw dense-by-group cross sums. eps0 (G_0, d_0), eps_D (ds,). Returns per-unit v.
    """
    beta, sigma, lams, _, mu, ok = prepared
    s2 = sigma**2
    Linv, _ = _one_level_leaves(plan, lams, s2)
    R = _level1_R(lams, Linv)
    F = _structured_dense(plan, lams, s2, Linv)
    delta = beta - plan.beta0
    c = jnp.concatenate([-delta, jnp.ones((1,), delta.dtype)])[:, None]
    _, xt = one_level_rhs_coef(plan, lams, s2, R, c)
    xD = _dense_scale_rows(plan, lams, xt)
    LD = _chol(F)
    vD = solve_triangular(LD, solve_triangular(LD, xD[:, 0], lower=True) + eps_D, lower=True, trans="T")
    K = plan.n_chain_units
    dense_units = [vD[plan.dense_offsets[u - K]:plan.dense_offsets[u - K] + plan.unit_groups[u] * plan.unit_dims[u]]
                   .reshape(plan.unit_groups[u], plan.unit_dims[u]) for u in range(K, len(plan.unit_dims))]
    lam_vD = jnp.concatenate([(v @ lams[u].T).reshape(-1) for u, v in zip(range(K, len(plan.unit_dims)), dense_units)])
    if isinstance(plan.bilinear, PooledFill):
        Linv = Linv[plan.bilinear.cls]
    _, rows, cols, vals = plan.level1
    G0, d0 = Linv.shape[0], Linv.shape[-1]
    a_r, a_X = plan.level1_rhs[:2]
    cross = jax.ops.segment_sum(vals * lam_vD[rows], cols, G0 * d0).reshape(G0, d0)
    a = (a_r - matvec(a_X, delta) - cross) @ lams[0] / s2                   # Lambda_0^T (a_g - cross_g) / s2
    v0 = jnp.einsum("gij,gi->gj", Linv, matvec(Linv, a) + eps0)
    return [v0] + dense_units


def _one_level_recovery(plan: Plan, sigma, offset) -> bool:
    return _one_level(plan, sigma) and offset is None


def conditional_mean(plan: Plan, beta, sigma, scales, offset=None, beta_prior=None):
    """E[u | y, params]: tuple of (n_groups_l, d_l) per marginalized class (plus beta (p,)
    last if the plan marginalizes beta).  Arguments as in :func:`log_marginal`."""
    dt = plan.dtype
    prepared = _prepare(plan, beta, sigma, scales, offset, beta_prior)
    eps = [jnp.zeros((plan.unit_groups[j], plan.unit_dims[j]), dt) for j in range(plan.n_chain_units)]
    eps_D = jnp.zeros(plan.dense_size, dt)
    if plan.beta_block == "last":
        return _beta_last_effects(plan, prepared, beta_prior, jnp.zeros((plan.n_fixed,), dt), eps, eps_D)
    return _effects_given_eps(plan, prepared, eps, eps_D)


def _beta_last_effects(plan: Plan, prepared, beta_prior, eps_beta, eps, eps_D):
    """beta eliminated last: beta = mu + S L^{-T} (w + eps_beta) (``_beta_last``), then the random effects given
    that beta (exactly ``_effects_given_eps`` of the plan without beta): a joint draw (the mean for zero eps)."""
    _, sigma, lams, offset, mu, ok = prepared
    *_, L, w, S = _beta_last(plan, prepared, beta_prior)
    b = mu + S @ solve_triangular(L, w + eps_beta, lower=True, trans="T")
    ok = ok & _finite(b)
    effects = _effects_given_eps(plan, (jnp.where(ok, b, mu), sigma, lams, offset, None, ok), eps, eps_D)
    return effects + (jnp.where(ok, b, jnp.nan),)


def _effects_given_eps(plan: Plan, prepared, eps, eps_D):
    """Per-class effects Lambda v with v = F^{-1} h + L^{-T} eps (eps per chain unit, eps_D dense)."""
    beta, sigma, lams, offset, mu, ok = prepared
    if _one_level_recovery(plan, sigma, offset):
        vs = _one_level_draw(plan, prepared, eps[0], eps_D)
        fac = Factor((), None, None, lams, mu, None, None, None, None, ok)
        return _to_effects(plan, fac, vs)
    fac, F, x = _eliminate_prepared(plan, prepared)
    if F is not None:
        LD, zD, logdet = _dense_chol(F, x)
        fac = fac._replace(LD=LD, zD=zD)
    vs = _backsolve(plan, fac, eps, eps_D)
    return _to_effects(plan, fac, vs)


def conditional_sample(plan: Plan, key, beta, sigma, scales, offset=None, beta_prior=None):
    """One exact joint draw of u | y, params (same layout as :func:`conditional_mean`).

    ``key`` is a PRNG key; vmap over (key, params) for many posterior draws.
    """
    dt = plan.dtype
    K = plan.n_chain_units
    keys = jax.random.split(key, K + 1 + (plan.beta_block == "last"))
    eps = [
        jax.random.normal(keys[j], (plan.unit_groups[j], plan.unit_dims[j]), dt) for j in range(K)
    ]
    eps_D = jax.random.normal(keys[K], (plan.dense_size,), dt)
    prepared = _prepare(plan, beta, sigma, scales, offset, beta_prior)
    if plan.beta_block == "last":
        eps_beta = jax.random.normal(keys[K + 1], (plan.n_fixed,), dt)
        return _beta_last_effects(plan, prepared, beta_prior, eps_beta, eps, eps_D)
    return _effects_given_eps(plan, prepared, eps, eps_D)


def residual_precision(plan: Plan, sigma, scales):
    """The map e -> V^{-1} e, V = diag(sigma^2) + sum_l Z_l (I kron Sigma_l) Z_l^T (the marginalized classes),
    with the matrix part factorized once: (apply, ok).

    apply(e) takes (N,) or (N, k) and returns V^{-1} e of the same shape, through the Woodbury form
    V^{-1} e = W (e - sum_l Z_l E[u_l | e]) (the conditional means of the marginalized classes given the residual
    e): per call one pass over the data (cell sums of Z^T W e, a gather of the fitted effects) plus the back
    substitution, no refactorization. sigma () or (N,); scales as :func:`log_marginal`. Without marginalized
    classes V^{-1} = W. Used by the conditional parameterization of the terms left to HMC
    (``lmmarg.marginal.conditional``); pure and differentiable."""
    if plan.marginalize_beta:
        raise ValueError("residual_precision needs a plan without marginalized fixed effects")
    dt = plan.dtype
    _, sigma, lams, _, _, ok = _prepare(plan, jnp.zeros((plan.n_fixed,), dt), sigma, scales, None, None)
    w = 1.0 / sigma**2
    N, D, K = plan.n_obs, plan.D, plan.n_chain_units

    def weight(e):
        return (w[:, None] if (w.ndim and e.ndim == 2) else w) * e

    if D == 0:
        return weight, ok
    Hk = plan.S_zz * w if sigma.ndim == 0 else _weighted_gram(plan, w, jnp.zeros((N,), dt))[0]
    Lam = block_diag(*lams)
    mats, F, _ = _eliminate_matrix(plan, sigma, lams, Ht=_sandwich(Lam, Hk))
    LD = _chol(F) if F is not None else None
    zero = jnp.zeros((), dt)
    eps = [jnp.zeros((plan.unit_groups[j], plan.unit_dims[j]), dt) for j in range(K)]
    eps_D = jnp.zeros((plan.dense_size,), dt)

    def cell_effects(z, xD):
        """One right-hand side: chain z's and dense x_D -> the conditional mean effects per cell (n_cells, D)."""
        levels = tuple((Linv, Wm, zj, V) for (Linv, Wm, V), zj in zip(mats, z))
        zD = solve_triangular(LD, xD, lower=True) if LD is not None else None
        vs = _backsolve(plan, Factor(levels, LD, zD, lams, None, zero, zero, zero, zero, ok), eps, eps_D)
        vcell = [vs[j][plan.cell_node[j]] for j in range(K)]
        if plan.m:
            vD = jnp.concatenate([v.reshape(-1) for v in vs[K:]])
            vcell.append(vD[plan.dense_idx])
        return jnp.concatenate(vcell, axis=1) @ Lam.T

    def apply(e):
        e = jnp.asarray(e, dt)
        E = e.reshape(N, -1)                                                   # (N, k): one pass for all k
        k = E.shape[1]
        wE = (w[:, None] if w.ndim else w) * E
        hk = jax.ops.segment_sum((plan.Zt[:, :, None] * wE[:, None, :]).reshape(N, D * k), plan.cell,
                                 plan.n_cells).reshape(-1, D, k)
        ht = jnp.einsum("cak,ab->cbk", hk, Lam)                                # Lambda^T Z^T W e per cell
        zs, x = _eliminate_rhs(plan, mats, ht)
        ucell = jax.vmap(cell_effects, in_axes=(-1, -1), out_axes=-1)(
            tuple(zs), x if x is not None else jnp.zeros((0, k), dt))          # (n_cells, D, k)
        fit = jnp.sum(plan.Zt[:, :, None] * ucell[plan.cell], axis=1)    # not a batched dot (slow on XLA:CPU)
        out = wE - (w[:, None] if w.ndim else w) * fit
        return out.reshape(e.shape)

    return apply, ok


# --------------------------------------------------------------------------- weighted solves (the GLMM engine)


def _working_factor(plan: Plan, r, w, scales) -> Factor:
    """Factor of F = I + Zt^T diag(w) Zt for a working residual r (N,) and weights w (N,) (the plan's y replaced
    by r, beta = 0: the Gaussian model r = sum_l Z_l u_l + e, e ~ N(0, diag(1 / w)))."""
    if plan.marginalize_beta:
        raise ValueError("weighted solves need a plan without marginalized fixed effects")
    working = dataclasses.replace(plan, y=jnp.asarray(r, plan.dtype))
    beta0 = jnp.zeros((plan.n_fixed,), plan.dtype)
    return factorize(working, beta0, 1.0 / jnp.sqrt(w), scales), working


def _standardized(plan: Plan, vs):
    """Per-unit standardized v -> tuple per marginalized class in caller order (no Lambda applied)."""
    return _per_term(plan, vs)[0]


def weighted_solve(plan: Plan, r, w, scales):
    """The engine primitive with per-observation weights: (v, log|F|, ok) for F = I + Zt^T diag(w) Zt.

    r (N,) working residual, w (N,) positive weights (precisions), scales: Lambda_l (d_l, d_l) per marginalized
    class.  v = F^{-1} Zt^T diag(w) r: tuple of standardized (G_l, d_l) per class in ``plan.marginalized`` order
    (u_l = v_l Lambda_l^T).  One Newton/PIRLS step of a GLMM's conditional mode is this solve at the working
    residual r = Z u + s / w (s the score, w the Fisher weights); log|F| is the Laplace determinant.
    The plan must be built for per-observation sigma (``build_plan(..., scalar_sigma=False)``).
    """
    zeros = tuple(jnp.zeros(term_shape(plan, h), plan.dtype) for h in range(len(plan.marginalized)))
    return weighted_transform(plan, r, w, scales, zeros)


def _unit_eps(plan: Plan, eps):
    """Per-class standard normals (G_l, d_l) (caller order) -> the backsolve's layout (chain levels, dense)."""
    K = plan.n_chain_units
    levels = _per_unit(plan, eps, range(K))
    dense = [e.reshape(-1) for e in _per_unit(plan, eps, range(K, len(plan.unit_dims)))]
    eps_D = jnp.concatenate(dense) if dense else jnp.zeros((0,), plan.dtype)
    return levels, eps_D


def weighted_transform(plan: Plan, r, w, scales, eps):
    """v = F^{-1} Zt^T diag(w) r + L^{-T} eps for F = L L^T (arguments as :func:`weighted_solve`; eps: per
    marginalized class (G_l, d_l)): (v per class, log|F|, ok).  With eps ~ N(0, I), v ~ N(F^{-1} h, F^{-1});
    as a map eps -> v its log-Jacobian is -log|F| / 2 (the Laplace-centred parameterization of a GLMM)."""
    fac, working = _working_factor(plan, r, w, scales)
    levels, eps_D = _unit_eps(plan, tuple(jnp.asarray(e, plan.dtype) for e in eps))
    vs = _backsolve(working, fac, levels, eps_D)
    return _standardized(plan, vs), fac.logdet, fac.ok


def weighted_sample(plan: Plan, key, r, w, scales):
    """One draw of u ~ N(Lambda F^{-1} Zt^T diag(w) r, Lambda F^{-1} Lambda^T) (arguments as
    :func:`weighted_solve`): per marginalized class (G_l, d_l) in caller order -- the Laplace Gaussian of a GLMM
    at its mode; NaN for invalid inputs."""
    keys = jax.random.split(key, len(plan.marginalized))
    eps = tuple(jax.random.normal(k, term_shape(plan, h), plan.dtype) for h, k in enumerate(keys))
    vs, _, ok = weighted_transform(plan, r, w, scales, eps)
    nan = jnp.asarray(jnp.nan, plan.dtype)
    return tuple(jnp.where(ok, v @ jnp.asarray(L, plan.dtype).T, nan) for v, L in zip(vs, scales))
