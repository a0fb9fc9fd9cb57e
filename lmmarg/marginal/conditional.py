r"""The conditional parameterization of random effects left to HMC (``parameterization="conditional"``).

For a term h sampled by HMC (too large to integrate out), with standardized effects v_h (u_{h,g} = Λ_h v_{h,g},
v ~ N(0, I) a priori), the sampler moves ε_h and

    v_h = m_h(θ) + S_h(θ) ε_h,        u_h = v_h Λ_hᵀ,

where θ is everything else the sampler holds (β, σ, the SDs and correlations, the effects of other HMC terms)
and m, S are cheap approximations of the conditional mean and of a square root of the conditional covariance of
v_h given θ and y, with the marginalized terms integrated out. The map is affine in ε for fixed θ, so the joint
density of (θ, ε) is p(θ, v(θ, ε)) |det S(θ)|: the posterior is exact for *any* deterministic m and S, and the
approximations only decide how close to N(0, I) (and how independent of θ) ε is.

Conditional precision of the stacked v (all conditional terms), with V = diag(σ²) + Σ_{l marginalized} Z_l Σ_l Z_lᵀ:

    P = I + Λᵀ Zᵀ V⁻¹ Z Λ,        P m* = b = Λᵀ Zᵀ V⁻¹ (y − Xβ − offset)

(offset: the other HMC terms). Products with V⁻¹ come from ``kernels.residual_precision`` (one pass over the data
each, the marginalized classes' factorization shared). The approximations:

* D: per group the d × d block I + Λᵀ (Σ_{i∈g} w_i z_i z_iᵀ) Λ (w_i = 1/σ_i²), i.e. P with V⁻¹ replaced by W.
  Since V⁻¹ ⪯ W and Z_hᵀ W Z_h is block diagonal by group, P ⪯ D for one term: block Jacobi on P m = b converges.
* Coarse space C: for each term and column j, "every group has v_g = e_j" (the direction a crossed design leaves
  nearly unidentified: shifting every level of a against the intercept and the marginalized crossed class, where
  D⁻¹P has its one small eigenvalue; 0.03 against 0.98-1.0 for the rest on a 500 × 500 crossed design).
* m: ``SWEEPS`` two-level sweeps from m = 0, each a coarse correction m += C (CᵀPC)⁻¹ Cᵀ (b − P m) followed by
  block Gauss-Seidel over the conditional terms, each a block-Jacobi step over the groups of one term,
  m_h += D_h⁻¹ (b − P m)_h. The residual b − P m costs one pass over the data, except the first (m = 0: it is b);
  P C is computed once, in the same pass as b, so the coarse corrections are free. On a 200 × 200 crossed design
  (N = 20,000) the error of m in units of the conditional SD is 0.1 (RMS) after one sweep, 0.003 after two and
  1e-4 after three; without the coarse space it stays at 0.08 (the common shift).
* S = L_D⁻ᵀ T with D = L_D L_Dᵀ and T = I + Q (F_c − I) Qᵀ, Q the orthonormal basis of L_Dᵀ C, F_c F_cᵀ =
  (Qᵀ L_D⁻¹ P L_D⁻ᵀ Q)⁻¹: the scale along the coarse directions is corrected to the exact Rayleigh quotient
  (otherwise ε would have an SD of ~6 along them). log|det S| = −Σ log diag L_D + log|det F_c|, O(G d³ + k³).

Cost per evaluation: one pass over the data with 1 + k right-hand sides (k = Σ d_h coarse vectors), then
SWEEPS · (number of conditional terms) − 1 passes, plus the likelihood's own pass, all differentiated by JAX.
A pass is a segment sum over the marginalized classes' cells, the back substitution, a gather, and a segment sum
over the conditional term's groups. ``SWEEPS = 1``: on the 500 × 500 crossed design (N = 1e5) two sweeps sampled
with the same 15 leapfrog steps per draw and the same ESS as one, at a higher cost per gradient
(docs/benchmarks.md, 'Measurements behind the code').
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import cho_solve, solve_triangular

from . import kernels

__all__ = ["SWEEPS", "CondTerm", "cond_term", "conditional_transform"]

# Two-level sweeps of the conditional mean (each after the first: one pass over the data per conditional term).
SWEEPS = 1


class CondTerm(NamedTuple):
    """One conditional term: Z (N, d), codes (N,), n_groups, and S (G, d, d) = Σ_{i∈g} z_i z_iᵀ (for a scalar σ)."""
    Z: jax.Array
    codes: jax.Array
    n_groups: int
    S: jax.Array


def cond_term(Z, codes, n_groups: int, dtype) -> CondTerm:
    """The constants of one conditional term from its design columns Z (N, d) and group codes (N,)."""
    Z = np.asarray(Z, dtype=np.float64).reshape(len(codes), -1)
    codes = np.asarray(codes, dtype=np.int64)
    S = np.zeros((int(n_groups), Z.shape[1], Z.shape[1]))
    np.add.at(S, codes, Z[:, :, None] * Z[:, None, :])
    return CondTerm(jnp.asarray(Z, dtype), jnp.asarray(codes, jnp.int32), int(n_groups), jnp.asarray(S, dtype))


def _cho_lower(A):
    return jnp.linalg.cholesky(A)


def _mvt(A, x):
    """Batched transposed matrix-vector product A[g]ᵀ x[g] by broadcasting (XLA:CPU's batched dot is slow for
    many tiny matrices)."""
    return jnp.sum(A * x[..., :, None], axis=-2)


def conditional_transform(plan, beta, sigma, scales, offset, terms, lams, eps, sweeps: int | None = None,
                          coarse: bool = True):
    """v_h = m_h + S_h ε_h for every conditional term (see the module docstring).

    plan: the Gaussian plan of the marginalized classes; beta (p,), sigma () or (N,), scales: Λ_l per marginalized
    class (plan order), offset (N,) or None: the other HMC terms; terms: CondTerm per conditional term; lams: Λ_h
    (d_h, d_h) per conditional term; eps: ε_h (G_h, d_h); sweeps: default ``SWEEPS``; coarse: use the coarse
    space (False: D alone). Returns (v per term, log|det ∂v/∂ε|)."""
    sweeps = SWEEPS if sweeps is None else int(sweeps)
    dt = plan.dtype
    sigma = jnp.asarray(sigma, dt)
    w = 1.0 / sigma**2
    apply, _ = kernels.residual_precision(plan, sigma, scales)
    lams = tuple(jnp.asarray(L, dt) for L in lams)
    H = len(terms)
    dims = [t.Z.shape[1] for t in terms]

    def zmul(vs):
        """Σ_h Z_h (v_h Λ_hᵀ)[codes] -> (N,)."""
        return sum(jnp.sum(t.Z * (v @ L.T)[t.codes], axis=-1) for t, v, L in zip(terms, vs, lams))

    def zt(x):
        """Λ_hᵀ Σ_{i∈g} z_i x_i per term -> (G_h, d_h) (x (N,)) or (G_h, d_h, k) (x (N, k))."""
        out = []
        for t, L in zip(terms, lams):
            if x.ndim == 1:
                out.append(jax.ops.segment_sum(t.Z * x[:, None], t.codes, t.n_groups) @ L)
            else:
                s = jax.ops.segment_sum(t.Z[:, :, None] * x[:, None, :], t.codes, t.n_groups)
                out.append(jnp.einsum("gak,ai->gik", s, L))
        return out

    def prec(vs):
        return [a + v for a, v in zip(zt(apply(zmul(vs))), vs)]

    r0 = plan.y - plan.X @ jnp.asarray(beta, dt)
    if offset is not None:
        r0 = r0 - offset
    offs = np.cumsum([0] + dims)
    if coarse:
        # one pass for the right-hand side and P C (the coarse vector (h, j) is v_{h,g} = e_j for every group g,
        # so Z Λ C is Z_h Λ_h[:, j])
        ZLC = jnp.concatenate([t.Z @ L for t, L in zip(terms, lams)], axis=1)                  # (N, k)
        both = zt(apply(jnp.concatenate([r0[:, None], ZLC], axis=1)))
        rhs = [b[:, :, 0] for b in both]
        PC = [b[:, :, 1:].at[:, :, offs[h]:offs[h + 1]].add(jnp.eye(dims[h], dtype=dt))
              for h, b in enumerate(both)]
    else:
        rhs = zt(apply(r0))

    # the block-diagonal approximation D (V^{-1} -> W) and its Cholesky factors
    Ds, Linvs, logdiag = [], [], jnp.zeros((), dt)
    for t, L in zip(terms, lams):
        if w.ndim == 0:
            A = t.S * w
        else:
            A = jax.ops.segment_sum(w[:, None, None] * t.Z[:, :, None] * t.Z[:, None, :], t.codes, t.n_groups)
        Dh = jnp.einsum("ai,gab,bj->gij", L, A, L) + jnp.eye(L.shape[0], dtype=dt)
        diag, Linv = kernels.chol_inv(Dh)
        Ds.append(Dh)
        Linvs.append(Linv)
        logdiag = logdiag + jnp.sum(jnp.log(diag))

    def dinv(h, r):
        return _mvt(Linvs[h], kernels.matvec(Linvs[h], r))

    m = [jnp.zeros_like(r) for r in rhs]
    res = list(rhs)
    if coarse:
        CPC = jnp.concatenate([jnp.sum(p, axis=0) for p in PC], axis=0)                      # (k, k)
        CDC = jax.scipy.linalg.block_diag(*[jnp.sum(Dh, axis=0) for Dh in Ds])
        Lc, Lr = _cho_lower(CPC), _cho_lower(CDC)
    # each sweep: a coarse correction (free: P C is known), then block Gauss-Seidel over the terms; the residual
    # b - P m costs one pass over the data, except at the start (m = 0)
    first = True
    for _ in range(sweeps):
        for h in range(H):
            if not first:
                res = [b - p for b, p in zip(rhs, prec(m))]
            first = False
            if coarse and h == 0:
                alpha = cho_solve((Lc, True), jnp.concatenate([jnp.sum(r, axis=0) for r in res]))   # Cᵀ res
                m = [v + alpha[offs[j]:offs[j + 1]] for j, v in enumerate(m)]
                res = [r - p @ alpha for r, p in zip(res, PC)]
            m[h] = m[h] + dinv(h, res[h])

    base = [_mvt(Linv, jnp.asarray(e, dt)) for Linv, e in zip(Linvs, eps)]                       # L_D^{-T} ε
    logjac = -logdiag
    if coarse:
        # T = I + Q (F_c - I) Qᵀ: L_D^{-T} T ε = L_D^{-T} ε + C (L_c^{-T} L_r^{-1} - (CᵀDC)^{-1}) Cᵀ L_D ε
        y = jnp.concatenate([jnp.sum(kernels.matvec(Dh, b), axis=0) for Dh, b in zip(Ds, base)])
        corr = (solve_triangular(Lc, solve_triangular(Lr, y, lower=True), lower=True, trans="T")
                - cho_solve((Lr, True), y))
        base = [b + corr[offs[h]:offs[h + 1]] for h, b in enumerate(base)]
        logjac = logjac + jnp.sum(jnp.log(jnp.diagonal(Lr))) - jnp.sum(jnp.log(jnp.diagonal(Lc)))
    return tuple(mh + b for mh, b in zip(m, base)), logjac
