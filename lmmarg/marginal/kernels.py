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

How each block is formed is a strategy of the plan (:mod:`lmmarg.marginal.blocks`): for scalar sigma the first
level's fill has a constant structure (``plan.blocks.level1``: its ``schur`` and ``rhs``), and with a single chain
level ``log_marginal`` needs no per-cell work at all (``_one_level_*``: the constants ``plan.blocks.one_level``);
the one-level dense block is formed in ``plan.blocks.dense_form``; per-observation sigma uses each chain level's
``plan.blocks.chain_fills[j]``. ``logdet_gram`` (log|F| and the whitened Gram of k right-hand sides) is the
primitive behind the density, the profiled ML criterion and beta integrated last. The dense block's reverse pass
uses one inverse (``linalg.dense_logdet_gram``) instead of differentiating the Cholesky factorization.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import block_diag, solve_triangular

from .blocks import BetaPlacement, ScaledForm, dense_scale_rows, level1_R
from .linalg import (LOG2PI, bmm, chol, chol_inv, dense_chol, dense_logdet_gram, dense_logdet_quad, matvec,
                     sandwich, small_sandwich, spd_inv_logdet)
from .plan import BETA, Plan

__all__ = ["Factor", "Level", "factorize", "unit_lams", "term_shape",
           "log_marginal", "conditional_mean", "conditional_sample", "chol_inv", "matvec",
           "dense_logdet_gram", "logdet_gram", "residual_precision", "weighted_solve",
           "weighted_sample", "weighted_transform"]



class Level(NamedTuple):
    """One eliminated chain level j: Linv (G_j, d_j, d_j) inverse Cholesky factors of its nodes' blocks, Wm
    (G_j, d_j, rest_j) their coupling to the ancestors' columns, z (G_j, d_j) (or (G_j, d_j, k)) the eliminated
    right-hand sides (None in the matrix part), V (n_cells, d_j, m) the cells' coupling to the dense block or None."""
    Linv: jax.Array
    Wm: jax.Array
    z: Optional[jax.Array]
    V: Optional[jax.Array]


class Factor(NamedTuple):
    """Block Cholesky factor of F and the pieces of the log density.

    levels: per chain level a :class:`Level`;  LD (dense_size, dense_size)
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


# --------------------------------------------------------------------------- terms <-> units


def unit_lams(plan: Plan, scales, beta_scale=None) -> tuple:
    """Per-term Lambda_l (d_l, d_l) in ``plan.structure.marginalized`` order -> per-unit Lambda_u in plan unit order:
    block-diagonal over the terms a unit stacks (terms on one grouping factor); beta_scale (p, p) for the unit of
    marginalized fixed effects."""
    st = plan.structure
    return tuple(beta_scale if src == (BETA,) else (scales[src[0]] if len(src) == 1 else
                                                    block_diag(*(scales[h] for h in src)))
                 for src in st.unit_src)


def _unit_terms(plan: Plan, u: int):
    """(term position h, column slice) of each term stacked in unit u."""
    st = plan.structure
    out, lo = [], 0
    for h in st.unit_src[u]:
        d = st.n_fixed if h == BETA else st.term_dims[h]
        out.append((h, slice(lo, lo + d)))
        lo += d
    return out


def term_shape(plan: Plan, h: int) -> tuple:
    """(G_h, d_h) of marginalized term h."""
    st = plan.structure
    u = next(u for u, src in enumerate(st.unit_src) if h in src)
    return st.unit_groups[u], st.term_dims[h]


def _per_term(plan: Plan, per_unit) -> tuple:
    """Per-unit arrays (G_u, d_u) -> (per marginalized term (G_h, d_h) in caller order, beta's row or None)."""
    out, beta = [None] * len(plan.structure.marginalized), None
    for u, v in enumerate(per_unit):
        for h, cols in _unit_terms(plan, u):
            if h == BETA:
                beta = v[0, cols]
            else:
                out[h] = v[..., cols]
    return tuple(out), beta


def _per_unit(plan: Plan, per_term, units) -> list:
    """Per-term arrays (G_h, d_h) (caller order) -> per-unit (G_u, d_u) for the given units."""
    st = plan.structure
    return [per_term[st.unit_src[u][0]] if len(st.unit_src[u]) == 1 else
            jnp.concatenate([per_term[h] for h in st.unit_src[u]], axis=-1) for u in units]


# --------------------------------------------------------------------------- inputs


def _finite(x):
    return jnp.all(jnp.isfinite(x))


def _prepare(plan: Plan, beta, sigma, scales, offset, beta_prior):
    """Cast and validate inputs; invalid values are replaced by safe ones.

    Returns (beta_res (p,), sigma () or (N,), lams per unit, offset or None,
    mu or None, ok scalar bool).  ``beta_res`` is the beta used in the residual.
    """
    st = plan.structure
    dt = plan.dtype
    p = st.n_fixed
    scales = tuple(scales) if scales is not None else ()
    if len(scales) != len(st.marginalized):
        raise ValueError(
            f"scales must have one entry per marginalized class ({len(st.marginalized)}), "
            f"got {len(scales)}"
        )
    sigma = jnp.asarray(sigma, dt)
    if sigma.ndim not in (0, 1) or (sigma.ndim == 1 and sigma.shape[0] != st.n_obs):
        raise ValueError(f"sigma must be a scalar or ({st.n_obs},), got {sigma.shape}")
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
    sc = unit_lams(plan, tuple(jnp.asarray(s, dt).reshape(d, d) for s, d in zip(scales, st.term_dims)), S)
    for lam in sc:
        ok = ok & _finite(lam)
    if offset is not None:
        offset = jnp.asarray(offset, dt).reshape(st.n_obs)
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
    st = plan.structure
    if len(cols) <= 40:
        return jnp.stack([jax.ops.segment_sum(c, plan.stats.cell, st.n_cells) for c in cols], axis=1)
    return jax.ops.segment_sum(jnp.stack(cols, axis=1), plan.stats.cell, st.n_cells)


def _weighted_gram(plan: Plan, w, r):
    """H_k = sum_i w_i z_i z_i^T (n_cells, D, D) and h_k = sum_i w_i r_i z_i (n_cells, D)."""
    D = plan.structure.D
    iu, ju = np.triu_indices(D)
    T = iu.size
    wz = [w * plan.stats.Zt[:, a] for a in range(D)]
    cols = [wz[a] * plan.stats.Zt[:, b] for a, b in zip(iu, ju)] + [wz[a] * r for a in range(D)]
    S = _segment_columns(plan, cols)
    E = np.zeros((T, D, D))  # symmetric unpacking by a constant matmul
    E[np.arange(T), iu, ju] = 1.0
    E[np.arange(T), ju, iu] = 1.0
    H = (S[:, :T] @ jnp.asarray(E.reshape(T, D * D), S.dtype)).reshape(-1, D, D)
    return H, S[:, T:]


def _residual_ss(plan: Plan, delta):
    """r^T r for r = y - X (beta0 + delta), delta (p,), from the plan's X^T X, X^T r0 and r0^T r0."""
    S = plan.stats
    return S.rr - 2.0 * jnp.sum(delta * S.Xtr) + jnp.sum(delta[:, None] * S.XtX * delta[None, :])


def _offset_residual_sums(plan: Plan, beta, offset):
    """Raw cell sums of Zt^T r (n_cells, D) and r^T r for r = y - X beta - offset (one pass over the data)."""
    r = plan.stats.y - plan.stats.X @ beta - offset
    return _segment_columns(plan, [plan.stats.Zt[:, a] * r for a in range(plan.structure.D)]), r @ r


def _cell_stats(plan: Plan, beta, sigma, lams, offset):
    """Per-cell H~_k (n_cells, D, D), h~_k (n_cells, D); r^T W r; sum log(2 pi sigma_i^2).

    Raw statistics H_k, h_k are aggregated first (only they touch N), then
    standardized with Lambda = blockdiag(lams): H~ = Lambda^T H Lambda, h~ = Lambda^T h.
    """
    N = plan.structure.n_obs
    if sigma.ndim == 0:
        s2 = sigma**2
        log2pi = N * (LOG2PI + jnp.log(s2))
        Hk = plan.stats.S_zz / s2
        if offset is None:
            delta = beta - plan.stats.beta0
            hk = plan.stats.S_zr - matvec(plan.stats.S_zX, delta)
            rr = _residual_ss(plan, delta)
        else:
            hk, rr = _offset_residual_sums(plan, beta, offset)
        hk, rWr = hk / s2, rr / s2
    else:
        w = 1.0 / sigma**2
        log2pi = jnp.sum(LOG2PI - jnp.log(w))
        r = plan.stats.y - plan.stats.X @ beta
        if offset is not None:
            r = r - offset
        Hk, hk = _weighted_gram(plan, w, r)
        rWr = jnp.sum(w * r * r)
    Lam = block_diag(*lams)
    Ht = sandwich(Lam, Hk)
    return Ht, hk @ Lam, rWr, log2pi



def _one_level(plan: Plan, sigma) -> bool:
    """True if the one-level constant-statistics path applies (scalar sigma, one chain level, a dense block)."""
    return plan.blocks.one_level is not None and sigma.ndim == 0


def _leaf_matrices(plan: Plan, lams, s2):
    """I + Lambda_0^T A Lambda_0 / s2 for each leaf of the level-1 fill: per group (G_0, d0, d0), or per class of
    equal A_g for a PooledFill (U, d0, d0)."""
    A0 = plan.blocks.level1.leaf_statistics(plan.blocks.one_level)
    A = small_sandwich(lams[0].T, A0, lams[0]) / s2
    return A + jnp.eye(A.shape[-1], dtype=A.dtype)


def _one_level_leaves(plan: Plan, lams, s2):
    """(Linv = chol(I + Lambda_0^T A Lambda_0 / s2)^{-1}, R = Lambda_0 Linv^T Linv Lambda_0^T, log-determinants)
    per leaf of the level-1 fill. Linv is None where the fill does not use it (R and the log-determinants then
    come from spd_inv_logdet, without the factor)."""
    A = _leaf_matrices(plan, lams, s2)
    if plan.blocks.level1.needs_leaf_factors:
        diag, Linv = chol_inv(A)
        return Linv, level1_R(lams, Linv), 2.0 * jnp.sum(jnp.log(diag), axis=-1)
    Ainv, logdets = spd_inv_logdet(A)
    return None, small_sandwich(lams[0], Ainv, lams[0].T), logdets


def _one_level_matrix(plan: Plan, lams, s2):
    """Matrix part of the one-level path from constants: (R per leaf, the dense block in the plan's dense form,
    log|F_chain| plus the form's shift). The level-1 fill gives M = S_DD / s2 - K / s2^2 (``blocks``); the dense
    form turns it into F_DD = I + Lambda_D^T M Lambda_D (scaled) or F~ = Sigma_D^{-1} + M (precision)."""
    fill = plan.blocks.level1
    Linv, R, logdets = _one_level_leaves(plan, lams, s2)
    M = fill.schur(plan, plan.stats.S_DD, lams, s2, Linv, R)
    F, shift = plan.blocks.dense_form.matrix(plan, lams, M)
    return R, F, fill.logdet(logdets) + shift


def _one_level_offset_residual(plan: Plan, lams, s2, R, beta, offset):
    """(chain Gram (1, 1), x_D (ds, 1), r^T W r) of the one-level path for r = y - X beta - offset: one pass over
    the data for the group and dense sums of Z^T r (an HMC offset is not a sum of constants), then constants."""
    st = plan.structure
    hk, rr = _offset_residual_sums(plan, beta, offset)
    a_raw = jax.ops.segment_sum(hk[:, :st.chain_dim], plan.stats.cell_node[0], st.unit_groups[0])
    x_raw = jnp.zeros(st.dense_size, hk.dtype).at[plan.stats.dense_idx].add(hk[:, st.chain_dim:])
    gram, xt = plan.blocks.level1.rhs_from_sums(plan, plan.blocks.one_level, s2, R, a_raw[:, :, None],
                                                x_raw[:, None])
    return gram, plan.blocks.dense_form.rhs(plan, lams, xt), rr / s2


def _eliminate_matrix(plan: Plan, sigma, lams, Ht):
    """Matrix part of the chain elimination.

    Ht (n_cells, D, D) standardized cell statistics -> (levels: per chain level a Level without z, F_DD (ds, ds)
    or None, chain log-determinant).
    """
    st = plan.structure
    dt = plan.dtype
    K, dims, Dc, m, ds = st.n_chain_units, st.unit_dims, st.chain_dim, st.m, st.dense_size
    idx = plan.stats.dense_idx
    logdet = jnp.zeros((), dt)
    level1 = plan.blocks.level1 if (m and K and sigma.ndim == 0) else None
    F = None
    if m and level1 is None:
        F = jnp.eye(ds, dtype=dt).at[idx[:, :, None], idx[:, None, :]].add(Ht[:, Dc:, Dc:])
    levels = []
    if K:
        A = jax.ops.segment_sum(Ht[:, :Dc, :Dc], plan.stats.cell_node[0], st.unit_groups[0])
        C = Ht[:, :Dc, Dc:]
    for j in range(K):
        d, node = dims[j], plan.stats.cell_node[j]
        diag, Linv = chol_inv(A[:, :d, :d] + jnp.eye(d, dtype=dt))
        Wm = bmm(Linv, A[:, :d, d:])
        logdet = logdet + 2.0 * jnp.sum(jnp.log(diag))
        V = None
        if m:
            V = bmm(Linv[node], C[:, :d, :])
            if level1 is not None and j == 0:   # constant structure: F_DD from the plan's statistics
                F, _ = ScaledForm().matrix(plan, lams, level1.schur(plan, plan.stats.S_DD, lams, sigma**2,
                                                                    level1.leaves(Linv), None))
            else:
                F = plan.blocks.chain_fills[j].fill(plan, j, F, V)
            C = C[:, d:, :] - bmm(jnp.swapaxes(Wm[node], 1, 2), V)
        levels.append(Level(Linv, Wm, None, V))
        if j + 1 < K:
            A = A[:, d:, d:] - jnp.einsum("gia,gib->gab", Wm, Wm)
            A = jax.ops.segment_sum(A, plan.stats.parent[j], st.unit_groups[j + 1])
    return tuple(levels), F, logdet


def _eliminate_rhs(plan: Plan, levels, ht):
    """Right-hand-side part of the chain elimination for k vectors at once (linear in ht).

    ht (n_cells, D, k) standardized cell sums -> (z per chain level (G_j, d_j, k), x_D (ds, k) or None).
    """
    st = plan.structure
    K, dims, Dc, m, ds = st.n_chain_units, st.unit_dims, st.chain_dim, st.m, st.dense_size
    idx = plan.stats.dense_idx
    x = jnp.zeros((ds, ht.shape[-1]), ht.dtype).at[idx].add(ht[:, Dc:, :]) if m else None
    zs = []
    if K:
        a = jax.ops.segment_sum(ht[:, :Dc, :], plan.stats.cell_node[0], st.unit_groups[0])
    for j in range(K):
        d, node = dims[j], plan.stats.cell_node[j]
        Linv, Wm, _, V = levels[j]
        z = bmm(Linv, a[:, :d, :])
        zs.append(z)
        if m:
            x = x.at[idx].add(-jnp.einsum("kim,kic->kmc", V, z[node]))
        if j + 1 < K:
            a = a[:, d:, :] - jnp.einsum("gia,gic->gac", Wm, z)
            a = jax.ops.segment_sum(a, plan.stats.parent[j], st.unit_groups[j + 1])
    return tuple(zs), x


def _eliminate(plan: Plan, beta, sigma, scales, offset=None, beta_prior=None):
    """Chain elimination -> (Factor without the dense factor, F_DD, x_D); F_DD, x_D are None without a dense block."""
    return _eliminate_prepared(plan, _prepare(plan, beta, sigma, scales, offset, beta_prior))


def _eliminate_prepared(plan: Plan, prepared):
    st = plan.structure
    beta, sigma, lams, offset, mu, ok = prepared
    dt = plan.dtype
    zero = jnp.zeros((), dt)
    if st.D == 0 and plan.stats.X is None:   # no terms, a plan from statistics (scalar σ, no offset): the sums
        s2 = sigma**2
        rWr = _residual_ss(plan, beta - plan.stats.beta0) / s2
        return Factor((), None, None, lams, mu, zero, zero, rWr, st.n_obs * (LOG2PI + jnp.log(s2)), ok), None, None
    if st.D == 0:
        r = plan.stats.y - plan.stats.X @ beta - (0.0 if offset is None else offset)
        w = 1.0 / jnp.broadcast_to(sigma, (st.n_obs,)) ** 2
        log2pi = jnp.sum(LOG2PI - jnp.log(w))
        return Factor((), None, None, lams, mu, zero, zero, jnp.sum(w * r * r), log2pi, ok), None, None
    Ht, ht, rWr, log2pi = _cell_stats(plan, beta, sigma, lams, offset)
    mats, F, logdet = _eliminate_matrix(plan, sigma, lams, Ht)
    zs, x = _eliminate_rhs(plan, mats, ht[:, :, None])
    quad = sum((jnp.sum(z * z) for z in zs), zero)
    levels = tuple(lev._replace(z=z[..., 0]) for lev, z in zip(mats, zs))
    fac = Factor(levels, None, None, lams, mu, logdet, quad, rWr, log2pi, ok)
    return (fac, F, x[:, 0]) if st.m else (fac, None, None)


def factorize(plan: Plan, beta, sigma, scales, offset=None, beta_prior=None) -> Factor:
    """Block-Cholesky factorize F = I + Zt^T W Zt (see module docstring) -> Factor."""
    fac, F, x = _eliminate(plan, beta, sigma, scales, offset, beta_prior)
    if F is None:
        return fac
    LD, zD, logdet = dense_chol(F, x)
    return fac._replace(LD=LD, zD=zD, logdet=fac.logdet + logdet, quad=fac.quad + zD @ zD)


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
    if plan.structure.D == 0:   # no random effects: F = I (0 x 0), h empty
        k = c.shape[1]
        return jnp.zeros((), c.dtype), jnp.zeros((k, k), c.dtype)
    if _one_level(plan, sigma):
        R, F, logdet = _one_level_matrix(plan, lams, s2)
        gram, xt = plan.blocks.level1.rhs(plan, plan.blocks.one_level, lams, s2, R, c)
        xD = plan.blocks.dense_form.rhs(plan, lams, xt)
    else:
        Lam = block_diag(*lams)
        Ht = sandwich(Lam, plan.stats.S_zz / s2)
        raw = jnp.einsum("nap,pk->nak", jnp.concatenate([plan.stats.S_zX, plan.stats.S_zr[:, :, None]], axis=2), c) / s2
        ht = jnp.einsum("ab,kac->kbc", Lam, raw)                              # Lambda^T per cell
        mats, F, logdet = _eliminate_matrix(plan, sigma, lams, Ht)
        zs, xD = _eliminate_rhs(plan, mats, ht)
        gram = sum((jnp.einsum("gic,gie->ce", z, z) for z in zs), jnp.zeros((c.shape[1],) * 2, c.dtype))
    if F is not None:
        ldD, GD = dense_logdet_gram(F, xD)
        logdet, gram = logdet + ldD, gram + GD
    return logdet, gram


def _beta_last(plan: Plan, prepared, beta_prior):
    """beta ~ N(mu, S S^T) eliminated after every random effect (BetaPlacement.LAST): with V the marginal
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
    dt, p = plan.dtype, plan.structure.n_fixed
    S = jnp.where(ok, jnp.asarray(beta_prior[1], dt).reshape(p, p), jnp.eye(p, dtype=dt))
    c = (jnp.zeros((p + 1, p + 1), dt).at[:p, :p].set(S).at[:p, p].set(plan.stats.beta0 - mu).at[p, p].set(1.0))
    logdet, gram = logdet_gram(plan, lams, sigma, c)
    M = jnp.block([[plan.stats.XtX, plan.stats.Xtr[:, None]], [plan.stats.Xtr[None, :], plan.stats.rr[None, None]]])
    Q = c.T @ M @ c / sigma**2 - gram
    L = chol(jnp.eye(p, dtype=dt) + Q[:p, :p])
    w = solve_triangular(L, Q[:p, p], lower=True)
    return logdet + 2.0 * jnp.sum(jnp.log(jnp.diagonal(L))), Q[p, p], w @ w, L, w, S


def log_marginal(plan: Plan, beta, sigma, scales, offset=None, beta_prior=None):
    """log N(y; X beta + offset, sum_l Z_l (I kron Sigma_l) Z_l^T + diag(sigma^2)) -> scalar.

    beta (p,) (ignored if the plan marginalizes beta; then beta_prior=(mean (p,),
    scale (p, p)) is integrated), sigma () or (N,), scales: tuple of (d_l, d_l)
    Lambda_l (Sigma_l = Lambda_l Lambda_l^T) in ``plan.structure.marginalized`` order,
    offset (N,) or None.  Returns -inf for invalid inputs or failed factorizations.
    """
    st = plan.structure
    prepared = _prepare(plan, beta, sigma, scales, offset, beta_prior)
    beta, sigma, lams, offset, mu, ok = prepared
    if plan.beta_block is BetaPlacement.LAST:
        logdet, rWr, quad, *_ = _beta_last(plan, prepared, beta_prior)
        log2pi = st.n_obs * (LOG2PI + jnp.log(sigma**2))
        return _log_density(Factor((), None, None, lams, mu, logdet, quad, rWr, log2pi, ok))
    if sigma.ndim == 0 and st.D:
        s2 = sigma**2
        log2pi = st.n_obs * (LOG2PI + jnp.log(s2))
        if offset is None:
            # scalar sigma, no offset: sufficient statistics only, through the engine primitive
            delta = beta - plan.stats.beta0
            rr = _residual_ss(plan, delta)
            c = jnp.concatenate([-delta, jnp.ones((1,), delta.dtype)])[:, None]
            logdet, gram = logdet_gram(plan, lams, sigma, c)
            return _log_density(Factor((), None, None, lams, mu, logdet, gram[0, 0], rr / s2, log2pi, ok))
        if _one_level(plan, sigma):
            # one chain level + dense block with an HMC offset: group sums of the offset residual, then constants
            R, F, logdet = _one_level_matrix(plan, lams, s2)
            gram, xD, rWr = _one_level_offset_residual(plan, lams, s2, R, beta, offset)
            ldq = dense_logdet_quad(F, xD[:, 0])
            return _log_density(Factor((), None, None, lams, mu, logdet + ldq, gram[0, 0], rWr, log2pi, ok))
    fac, F, x = _eliminate_prepared(plan, prepared)
    if F is not None:
        ldq = dense_logdet_quad(F, x)  # logdet_D - quad_D
        fac = fac._replace(logdet=fac.logdet + ldq)
    return _log_density(fac)


# --------------------------------------------------------------------------- recovery


def _backsolve(plan: Plan, fac: Factor, eps_levels, eps_D):
    """Solve L^T v = z + eps root -> leaves; returns per-unit v (G_u, d_u)."""
    st = plan.structure
    K, dims, groups = st.n_chain_units, st.unit_dims, st.unit_groups
    vD = None
    if st.m:
        vD = solve_triangular(fac.LD, fac.zD + eps_D, lower=True, trans="T")
    vs = [None] * K
    for j in reversed(range(K)):
        Linv, Wm, z, V = fac.levels[j]
        rhs = z + eps_levels[j]
        if j + 1 < K:
            anc, mp = [], plan.stats.parent[j]
            for lev in range(j + 1, K):
                anc.append(vs[lev][mp])
                if lev + 1 < K:
                    mp = plan.stats.parent[lev][mp]
            rhs = rhs - matvec(Wm, jnp.concatenate(anc, axis=-1))
        if st.m:
            cv = jnp.einsum("kim,km->ki", V, vD[plan.stats.dense_idx])
            rhs = rhs - jax.ops.segment_sum(cv, plan.stats.cell_node[j], groups[j])
        vs[j] = jnp.einsum("gij,gi->gj", Linv, rhs)
    for u in range(K, len(dims)):
        off = st.dense_offsets[u - K]
        vs.append(vD[off : off + groups[u] * dims[u]].reshape(groups[u], dims[u]))
    return vs


def _to_effects(plan: Plan, fac: Factor, vs):
    """Per-unit standardized v -> tuple (u per marginalized class in caller order[, beta]).

    Invalid inputs (fac.ok False) give NaN effects.
    """
    nan = jnp.asarray(jnp.nan, plan.dtype)
    out, beta = _per_term(plan, [jnp.where(fac.ok, v @ lam.T, nan) for v, lam in zip(vs, fac.lams)])
    return out + (fac.mu + beta,) if plan.beta_block in (BetaPlacement.DENSE, BetaPlacement.CHAIN) else out


def _one_level_draw(plan: Plan, prepared, eps0, eps_D):
    """v = F^{-1} h + L^{-T} eps for a one-level chain + dense block, scalar sigma, no offset, from the plan's
    constants (work in the groups and the dense block; no pass over the N observations or per-cell statistics).

    With F = [[L_0 L_0^T, F_0D], [F_D0, F_DD]] (L_0 per group) and S = L_D L_D^T its Schur complement:
    v_D = L_D^{-T}(L_D^{-1} x_D + eps_D) with x_D the eliminated dense right-hand side, and per group
    v_g = L_g^{-T}(L_g^{-1} Lambda_0^T (a_g - (B^T Lambda_D v_D)_g) / s2 + eps_g), a_g = Z_g^T r (raw group sums,
    constants of beta), B the raw dense-by-group cross sums. eps0 (G_0, d_0), eps_D (ds,). Returns per-unit v.
    """
    beta, sigma, lams, _, mu, ok = prepared
    st, one, fill = plan.structure, plan.blocks.one_level, plan.blocks.level1
    s2 = sigma**2
    Linv = chol_inv(_leaf_matrices(plan, lams, s2))[1]       # the draw needs the leaf factors themselves
    R = level1_R(lams, Linv)
    F, _ = ScaledForm().matrix(plan, lams, fill.schur(plan, plan.stats.S_DD, lams, s2, Linv, R))
    delta = beta - plan.stats.beta0
    c = jnp.concatenate([-delta, jnp.ones((1,), delta.dtype)])[:, None]
    _, xt = fill.rhs(plan, one, lams, s2, R, c)
    xD = dense_scale_rows(plan, lams, xt)
    LD = chol(F)
    vD = solve_triangular(LD, solve_triangular(LD, xD[:, 0], lower=True) + eps_D, lower=True, trans="T")
    K, dense = st.n_chain_units, range(st.n_chain_units, len(st.unit_dims))
    dense_units = [vD[st.dense_offsets[u - K]:st.dense_offsets[u - K] + st.unit_groups[u] * st.unit_dims[u]]
                   .reshape(st.unit_groups[u], st.unit_dims[u]) for u in dense]
    lam_vD = jnp.concatenate([(v @ lams[u].T).reshape(-1) for u, v in zip(dense, dense_units)])
    Linv = fill.per_group(Linv)
    G0, d0 = Linv.shape[0], Linv.shape[-1]
    cross = jax.ops.segment_sum(one.B_vals * lam_vD[one.B_rows], one.B_cols, G0 * d0).reshape(G0, d0)
    a = (one.a_r - matvec(one.a_X, delta) - cross) @ lams[0] / s2              # Lambda_0^T (a_g - cross_g) / s2
    v0 = jnp.einsum("gij,gi->gj", Linv, matvec(Linv, a) + eps0)
    return [v0] + dense_units


def _one_level_recovery(plan: Plan, sigma, offset) -> bool:
    return _one_level(plan, sigma) and offset is None


def conditional_mean(plan: Plan, beta, sigma, scales, offset=None, beta_prior=None):
    """E[u | y, params]: tuple of (n_groups_l, d_l) per marginalized class (plus beta (p,)
    last if the plan marginalizes beta).  Arguments as in :func:`log_marginal`."""
    st = plan.structure
    dt = plan.dtype
    prepared = _prepare(plan, beta, sigma, scales, offset, beta_prior)
    eps = [jnp.zeros((st.unit_groups[j], st.unit_dims[j]), dt) for j in range(st.n_chain_units)]
    eps_D = jnp.zeros(st.dense_size, dt)
    if plan.beta_block is BetaPlacement.LAST:
        return _beta_last_effects(plan, prepared, beta_prior, jnp.zeros((st.n_fixed,), dt), eps, eps_D)
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
        LD, zD, logdet = dense_chol(F, x)
        fac = fac._replace(LD=LD, zD=zD)
    vs = _backsolve(plan, fac, eps, eps_D)
    return _to_effects(plan, fac, vs)


def conditional_sample(plan: Plan, key, beta, sigma, scales, offset=None, beta_prior=None):
    """One exact joint draw of u | y, params (same layout as :func:`conditional_mean`).

    ``key`` is a PRNG key; vmap over (key, params) for many posterior draws.
    """
    st = plan.structure
    dt = plan.dtype
    K = st.n_chain_units
    keys = jax.random.split(key, K + 1 + (plan.beta_block is BetaPlacement.LAST))
    eps = [
        jax.random.normal(keys[j], (st.unit_groups[j], st.unit_dims[j]), dt) for j in range(K)
    ]
    eps_D = jax.random.normal(keys[K], (st.dense_size,), dt)
    prepared = _prepare(plan, beta, sigma, scales, offset, beta_prior)
    if plan.beta_block is BetaPlacement.LAST:
        eps_beta = jax.random.normal(keys[K + 1], (st.n_fixed,), dt)
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
    st = plan.structure
    if plan.marginalize_beta:
        raise ValueError("residual_precision needs a plan without marginalized fixed effects")
    dt = plan.dtype
    _, sigma, lams, _, _, ok = _prepare(plan, jnp.zeros((st.n_fixed,), dt), sigma, scales, None, None)
    w = 1.0 / sigma**2
    N, D, K = st.n_obs, st.D, st.n_chain_units

    def weight(e):
        return (w[:, None] if (w.ndim and e.ndim == 2) else w) * e

    if D == 0:
        return weight, ok
    Hk = plan.stats.S_zz * w if sigma.ndim == 0 else _weighted_gram(plan, w, jnp.zeros((N,), dt))[0]
    Lam = block_diag(*lams)
    mats, F, _ = _eliminate_matrix(plan, sigma, lams, Ht=sandwich(Lam, Hk))
    LD = chol(F) if F is not None else None
    zero = jnp.zeros((), dt)
    eps = [jnp.zeros((st.unit_groups[j], st.unit_dims[j]), dt) for j in range(K)]
    eps_D = jnp.zeros((st.dense_size,), dt)

    def cell_effects(z, xD):
        """One right-hand side: chain z's and dense x_D -> the conditional mean effects per cell (n_cells, D)."""
        levels = tuple(lev._replace(z=zj) for lev, zj in zip(mats, z))
        zD = solve_triangular(LD, xD, lower=True) if LD is not None else None
        vs = _backsolve(plan, Factor(levels, LD, zD, lams, None, zero, zero, zero, zero, ok), eps, eps_D)
        vcell = [vs[j][plan.stats.cell_node[j]] for j in range(K)]
        if st.m:
            vD = jnp.concatenate([v.reshape(-1) for v in vs[K:]])
            vcell.append(vD[plan.stats.dense_idx])
        return jnp.concatenate(vcell, axis=1) @ Lam.T

    def apply(e):
        e = jnp.asarray(e, dt)
        E = e.reshape(N, -1)                                                   # (N, k): one pass for all k
        k = E.shape[1]
        wE = (w[:, None] if w.ndim else w) * E
        hk = jax.ops.segment_sum((plan.stats.Zt[:, :, None] * wE[:, None, :]).reshape(N, D * k), plan.stats.cell,
                                 st.n_cells).reshape(-1, D, k)
        ht = jnp.einsum("cak,ab->cbk", hk, Lam)                                # Lambda^T Z^T W e per cell
        zs, x = _eliminate_rhs(plan, mats, ht)
        ucell = jax.vmap(cell_effects, in_axes=(-1, -1), out_axes=-1)(
            tuple(zs), x if x is not None else jnp.zeros((0, k), dt))          # (n_cells, D, k)
        # not a batched dot (slow on XLA:CPU)
        fit = jnp.sum(plan.stats.Zt[:, :, None] * ucell[plan.stats.cell], axis=1)
        out = wE - (w[:, None] if w.ndim else w) * fit
        return out.reshape(e.shape)

    return apply, ok


# --------------------------------------------------------------------------- weighted solves (the GLMM engine)


def _working_factor(plan: Plan, r, w, scales) -> Factor:
    """Factor of F = I + Zt^T diag(w) Zt for a working residual r (N,) and weights w (N,) (the plan's y replaced
    by r, beta = 0: the Gaussian model r = sum_l Z_l u_l + e, e ~ N(0, diag(1 / w)))."""
    if plan.marginalize_beta:
        raise ValueError("weighted solves need a plan without marginalized fixed effects")
    working = plan.with_response(jnp.asarray(r, plan.dtype))
    beta0 = jnp.zeros((plan.structure.n_fixed,), plan.dtype)
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
    st = plan.structure
    zeros = tuple(jnp.zeros(term_shape(plan, h), plan.dtype) for h in range(len(st.marginalized)))
    return weighted_transform(plan, r, w, scales, zeros)


def _unit_eps(plan: Plan, eps):
    """Per-class standard normals (G_l, d_l) (caller order) -> the backsolve's layout (chain levels, dense)."""
    st = plan.structure
    K = st.n_chain_units
    levels = _per_unit(plan, eps, range(K))
    dense = [e.reshape(-1) for e in _per_unit(plan, eps, range(K, len(st.unit_dims)))]
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
    keys = jax.random.split(key, len(plan.structure.marginalized))
    eps = tuple(jax.random.normal(k, term_shape(plan, h), plan.dtype) for h, k in enumerate(keys))
    vs, _, ok = weighted_transform(plan, r, w, scales, eps)
    nan = jnp.asarray(jnp.nan, plan.dtype)
    return tuple(jnp.where(ok, v @ jnp.asarray(L, plan.dtype).T, nan) for v, L in zip(vs, scales))
