"""Integrated (marginal) leave-one-out log-likelihoods and model comparison.

For each posterior draw θ = (β, σ, Σ) the random effects are integrated out: y ~ N(Xβ, V) with
V = D + Σ_h Z_h Σ_h Z_hᵀ, D = diag(σ_i²). With P = V⁻¹ and r = y − Xβ, Gaussian conditioning gives

    log p(y_i | y_-i, θ) = −½ log(2π / P_ii) − ½ (P r)_i² / P_ii
    log p(y_g | y_-g, θ) = −(n_g/2) log 2π + ½ log det P_gg − ½ (P r)_gᵀ P_gg⁻¹ (P r)_g   (a group g of rows)

PSIS-LOO over θ on these (``Fit.loo``) has better behaved Pareto k and a smaller p_loo than LOO on the likelihood
conditional on the sampled random effects, where each observation pulls its own group's effect. Observations whose
Pareto k stays above 0.7 are refitted without them (``Fit.loo(reloo=...)``, brms's ``reloo``; ``reloo_points``).

How P is applied (Woodbury, per draw): write V = D + W Wᵀ with W = Z Λ (Σ_h = Λ_h Λ_hᵀ) and
M = I + Wᵀ D⁻¹ W (q × q, q = Σ_h G_h d_h, always ≥ I so every factorization below is stable). Then
P = D⁻¹ − D⁻¹ W M⁻¹ Wᵀ D⁻¹, so P r and diag(P) need M⁻¹ applied to the rows w_i of W. The term with the most
random effects ("class 1", G₁ groups of size d₁) gives a block-diagonal corner A of M; the remaining q₂ effects
(all other terms: nested, crossed or further terms on the same factor) form a corner C, and M is handled through
the Schur complement S = C − Bᵀ A⁻¹ B (q₂ × q₂):

    w_iᵀ M⁻¹ w_i = w1_iᵀ A_g⁻¹ w1_i + t_iᵀ S⁻¹ t_i,   t_i = c_i − B_gᵀ A_g⁻¹ w1_i.

B_g (d₁ × q₂) is nonzero only in the k_g columns of the other terms' levels that group g's rows touch, and B is
stored compactly as (G₁, d₁, k_max): in a nested design (class-1 groups inside the levels of every other term)
k_max is the number of other coefficients per row, in a crossed design the number of levels a group meets. So t_i
has at most K = k₂ + k_max nonzeros (k₂: other coefficients of row i), and t_iᵀ S⁻¹ t_i is computed either
"sparse" (K² entries of an explicit S⁻¹: O(N K² + q₂³) per draw, linear in N for nested designs) or "dense" (one
triangular solve with the N rows of t: O(N q₂²)), whichever ``loo_cost`` estimates cheaper.

Cost per draw: O(N (d₁² + d₁ K + K²) + G₁ (d₁³ + d₁² k_max + d₁ k_max²) + q₂³) on the sparse path,
O(N (d₁ + q₂) q₂ + ...) on the dense one; ``loo_cost(fit)`` returns the estimate (flops, memory, path, seconds)
that the computation uses (the dense path is taken when its flops are under 1/DENSE_PENALTY of the sparse
one's). ``LooCostError`` is raised when q₂ > ``MAX_DENSE`` = 4,000, when one draw needs more
than ``MAX_WORK`` = 5·10⁷ floats (about 0.4 GB), or when all draws need more than ``MAX_FLOPS`` (about an hour);
``Fit.to_arviz`` then falls back to the conditional log-likelihood with a warning.

Threads: no program here calls LAPACK on a batch of matrices. jaxlib 0.10's batched CPU LAPACK kernels split the
batch over XLA's intra-op thread pool and block waiting for it; when the runtime runs two such kernels at once
on a 2-thread pool, both threads wait for work that no free thread can take (a deadlock: seen on a crossed
3,435-row model, both pool threads in ``lapack_dtrsm`` under ``ParallelBatchMap``). So the draws run one after the
other (``lax.map``, chunks of draws from a host loop that reports progress), the d₁ × d₁ blocks of A are factorized
by unrolled elementwise code, and the q₂ × q₂ and group blocks go to LAPACK one matrix per call.

The values are computed once per fit and kept on it (``fit.loo_cache``, not pickled): ``loo``, ``compare``,
``log_likelihood`` and ``to_arviz`` reuse them.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import cho_solve, solve_triangular

from .. import families
from .. import parameters
from ..compile import xla
from .._warnings import warn_user
from ..marginal import laplace
from ..marginal.linalg import chol_small

__all__ = ["pointwise_loglik", "group_loglik", "compare", "response_scale", "loo_cost", "reloo_points",
           "LooCostError", "MAX_DENSE", "MAX_WORK", "MAX_FLOPS", "RELOO_K", "RELOO_MAX", "PROGRESS_AFTER",
           "FORCE_PATH"]

MAX_DENSE = 4000  # largest q₂ (random effects outside the largest term) handled per draw
MAX_WORK = 5e7  # largest number of floats one draw needs (the per-observation rows of t, S, S⁻¹)
MAX_FLOPS = 2e12  # largest estimated work over all draws (about an hour at FLOP_RATE)
FLOP_RATE = 5e8  # flops per second the estimate assumes: these programs are gathers and scatters more than GEMMs
# (rounded down from a crossed model's measured draws: docs/benchmarks.md, 'Measurements behind the code')
DENSE_PENALTY = 4.0  # the dense path ran this much slower per estimated flop than the sparse one (same model)
PROGRESS_AFTER = 3.0  # seconds: a progress bar is shown when the remaining draws are estimated to take longer
FORCE_PATH = None  # "sparse" or "dense": the quadratic forms' path for terms beyond the first (None: the cheaper)
RELOO_K = 0.7  # Pareto k above which loo() treats an observation's PSIS estimate as unreliable (brms, loo)
RELOO_MAX = 10  # reloo=None refits automatically when at most this many observations have Pareto k > 0.7
_CHUNK_SECONDS = 0.5  # target time of one call of the compiled program (a chunk of draws, one progress step)
_CHUNK_FLOATS = 2e7  # memory budget (floats) of one chunk's outputs


class LooCostError(ValueError):
    """The integrated log-likelihood would need a dense block too large for this model (see module doc)."""


def _factors(fit) -> list:
    """Λ_h (S, d_h, d_h) per term from the fit's flattened draws (singular correlations too:
    lmmarg.parameters.relative_factor_any)."""
    s, S = fit.samples, fit.n_chains * fit.n_draws
    lams = []
    for t in fit.model.terms:
        corr = s.get(parameters.corr_site(t.name))
        lams.append(parameters.relative_factor_any(s[parameters.sd_site(t.name)].reshape(S, t.d),
                                                   None if corr is None else corr.reshape(S, t.d, t.d)))
    return lams


# ---------------------------------------------------------------------------------------------------------------
# small blocks without LAPACK (see the module doc: no batched LAPACK call in any program here)


def _fwd_small(L, b):
    """L⁻¹ b for lower-triangular L (..., d, d) and b (..., d, m): forward substitution, elementwise."""
    x = []
    for i in range(L.shape[-1]):
        s = b[..., i, :]
        for k in range(i):
            s = s - L[..., i, k, None] * x[k]
        x.append(s / L[..., i, i, None])
    return jnp.stack(x, -2)


def _bwd_small(L, b):
    """L⁻ᵀ b for lower-triangular L (..., d, d) and b (..., d, m): back substitution, elementwise."""
    d = L.shape[-1]
    x = [None] * d
    for i in reversed(range(d)):
        s = b[..., i, :]
        for k in range(i + 1, d):
            s = s - L[..., k, i, None] * x[k]
        x[i] = s / L[..., i, i, None]
    return jnp.stack(x, -2)


# ---------------------------------------------------------------------------------------------------------------
# per-model constants and the cost estimate


class _Static:
    """Per-model constants: class-1 term, index tables of the other terms, the compact B layout, the cost."""

    def __init__(self, model, n_draws: int = 1, group_blocks=None):
        terms = model.terms
        self.terms = terms
        self.N = N = model.n_obs
        self.path, self.flops, self.floats = "none", 4.0 * N, 4.0 * N
        if not terms:
            self.i1 = None
            self._group_cost(group_blocks, 0, 0)
            self.total = n_draws * self.flops
            return
        sizes = [t.n_groups * t.d for t in terms]
        self.i1 = int(np.argmax(sizes))
        t1 = terms[self.i1]
        self.G1, self.d1 = t1.n_groups, t1.d
        self.others = [h for h in range(len(terms)) if h != self.i1]
        cols, off = [], 0
        for h in self.others:
            t = terms[h]
            cols.append(off + t.codes[:, None] * t.d + np.arange(t.d)[None, :])
            off += t.n_groups * t.d
        self.q2 = q2 = off
        self.cols2 = np.concatenate(cols, 1) if cols else np.zeros((N, 0), np.int64)  # (N, k2)
        k2 = self.cols2.shape[1]
        G1, d1 = self.G1, self.d1
        if q2 > MAX_DENSE:
            raise LooCostError(
                f"the integrated log-likelihood needs a dense {q2} x {q2} block per draw for the random effects "
                f"outside term {t1.name!r} (terms {[terms[h].name for h in self.others]}); the limit is "
                f"lmmarg.loo.MAX_DENSE = {MAX_DENSE}. Use loo(integrated=False) (conditional on the sampled effects).")
        if q2:
            # the other-term columns each class-1 group touches, padded with the dummy column q2
            g1 = np.asarray(t1.codes, np.int64)
            key = np.unique((g1[:, None] * (q2 + 1) + self.cols2).ravel())
            kg, kc = key // (q2 + 1), key % (q2 + 1)
            count = np.bincount(kg, minlength=G1)
            self.kmax = kmax = int(count.max())
            start = np.cumsum(count) - count
            pos = np.arange(len(key)) - start[kg]
            self.nzc = np.full((G1, kmax), q2, np.int64)
            self.nzc[kg, pos] = kc
            self.slot = pos[np.searchsorted(key, g1[:, None] * (q2 + 1) + self.cols2)]  # (N, k2) column of B_g
            K = k2 + kmax
            common = N * (3 * d1 * d1 + 2 * d1 * kmax + k2 * k2) + G1 * (d1 ** 3 + 2 * d1 * d1 * kmax
                                                                           + d1 * kmax * kmax)
            sparse = (common + 2.0 * q2 ** 3 + 4.0 * N * K * K, N * (K * K + K + 8) + 2.0 * q2 * q2 + 2 * G1 * kmax
                      * (d1 + kmax))
            dense = (common + q2 ** 3 / 3 + N * q2 * (q2 + 2), 2.0 * N * (q2 + 1) + 1.0 * q2 * q2 + 2 * G1 * kmax
                     * (d1 + kmax) + N * K)
            self.path = FORCE_PATH or ("sparse" if sparse[0] <= DENSE_PENALTY * dense[0] else "dense")
            self.flops, self.floats = sparse if self.path == "sparse" else dense
        else:
            self.kmax = 0
            self.path = "one-term"
            self.flops, self.floats = N * (3 * d1 * d1 + 8) + G1 * d1 ** 3, N * (2 * d1 + 8) + G1 * d1 * d1
        self._group_cost(group_blocks, d1, q2)
        self.total = n_draws * self.flops
        if self.floats > MAX_WORK or self.total > MAX_FLOPS:
            raise LooCostError(
                f"the integrated log-likelihood of this model ({self.path} path, term {t1.name!r} eliminated "
                f"first, {q2} other random effects) needs {self.floats:.2g} floats per draw (limit "
                f"lmmarg.loo.MAX_WORK = {MAX_WORK:.0e}) and about {self.total:.2g} flops for {n_draws} draws "
                f"(~{self.total / FLOP_RATE / 60:.0f} min; limit lmmarg.loo.MAX_FLOPS = {MAX_FLOPS:.0e}). Use "
                f"loo(integrated=False) (conditional on the sampled effects), or raise the limits.")

    def _group_cost(self, blocks, d1, q2):
        """Add the leave-one-group-out blocks' cost: padded groups (G, n_max), Cholesky of each P_gg."""
        if blocks is None:
            return
        Gb, nmax = blocks[0].shape
        K = (self.cols2.shape[1] + self.kmax) if q2 else 0
        inner = q2 if self.path == "dense" else K
        self.flops += Gb * nmax * nmax * (nmax / 3 + d1 + inner + 4) + (self.N * K * q2 if self.path == "sparse"
                                                                        else 0)
        self.floats += Gb * nmax * nmax * (3 + inner) + (self.N * (q2 + 1) if self.path == "sparse" else 0)


def loo_cost(fit, group: str | None = None) -> dict:
    """What the integrated log-likelihood of ``fit`` will cost, as estimated before it runs (the estimate that
    chooses the path and raises ``LooCostError``): {"path": "none" | "one-term" | "sparse" | "dense",
    "flops_per_draw", "floats_per_draw", "flops" (all draws), "seconds" (at FLOP_RATE), "q2", "kmax"}.
    A GLMM reports path "laplace" and no estimate."""
    S = fit.n_chains * fit.n_draws
    if fit.model.family_spec.is_glmm:
        return {"path": "laplace", "flops_per_draw": None, "floats_per_draw": None, "flops": None, "seconds": None,
                "q2": None, "kmax": None}
    blocks = None if group is None else _group_blocks(*_codes_and_count(fit.model, group))
    st = _Static(fit.model, S, blocks)
    return {"path": st.path, "flops_per_draw": float(st.flops), "floats_per_draw": float(st.floats),
            "flops": float(st.total), "seconds": float(st.total / FLOP_RATE), "q2": getattr(st, "q2", 0),
            "kmax": getattr(st, "kmax", 0)}


def _codes_and_count(model, group):
    codes, labels = _group_codes(model, group)
    return codes, len(labels)


def _group_blocks(codes: np.ndarray, G: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of each group padded to the largest: safe (G, nmax) row indices (0 on padding), mask, n_g (G,)."""
    n_g = np.bincount(codes, minlength=G)
    nmax = int(n_g.max())
    order = np.argsort(codes, kind="stable")
    pos = np.arange(len(codes)) - np.repeat(np.cumsum(n_g) - n_g, n_g)  # position within its group (sorted)
    idx = np.full((G, nmax), -1, np.int64)
    idx[codes[order], pos] = order
    mask = idx >= 0
    return np.where(mask, idx, 0), mask, n_g


def _block_loglik(Pr, iv, Q, safe, mask, n_g):
    """log p(y_g | y_-g) for padded groups from P_gg = diag(1/σ²) − diag(1/σ²) Q diag(1/σ²): (G,).

    Q: (G, nmax, nmax) blocks of W M⁻¹ Wᵀ (None: no random effects); padding rows get an identity block. The
    groups are factorized one after the other (lax.map: one matrix per LAPACK call, see the module doc)."""
    nmax = safe.shape[1]
    ivb = jnp.where(mask, iv[safe], 0.0)
    eye = jnp.eye(nmax, dtype=iv.dtype)[None]
    P = ivb[:, :, None] * eye
    if Q is not None:
        P = P - ivb[:, :, None] * Q * ivb[:, None, :]
    P = jnp.where(mask[:, :, None] & mask[:, None, :], P, eye)
    rhs = jnp.where(mask, Pr[safe], 0.0)

    def one(args):
        Pg, bg = args
        L = jnp.linalg.cholesky(Pg)
        z = solve_triangular(L, bg, lower=True)
        return 2 * jnp.sum(jnp.log(jnp.diagonal(L))), jnp.sum(z**2)

    logdet, zz = jax.lax.map(one, (P, rhs))
    return -0.5 * n_g * np.log(2 * np.pi) + 0.5 * logdet - 0.5 * zz


def _draw_fn(st: _Static, dtype, blocks=None):
    """One draw's (P r (N,), diag P (N,)) and, with ``blocks`` = (safe, mask, n_g) from ``_group_blocks``, the
    leave-one-group-out log densities (G,). Arguments: r (N,), σ (N,), Λ₁ (d₁, d₁), (Λ_h (d_h, d_h), ...)."""
    N = st.N
    g1 = jnp.asarray(st.terms[st.i1].codes, jnp.int32)
    Z1 = jnp.asarray(st.terms[st.i1].Z, dtype)
    Zo = [jnp.asarray(st.terms[h].Z, dtype) for h in st.others]
    G1, d1, q2 = st.G1, st.d1, st.q2
    eye1 = jnp.eye(d1, dtype=dtype)
    if q2:
        cols2 = jnp.asarray(st.cols2, jnp.int32)
        nzc = jnp.asarray(st.nzc, jnp.int32)
        slot = jnp.asarray(st.slot, jnp.int32)
        tc = jnp.concatenate([cols2, nzc[g1]], 1)  # (N, K) columns of t_i's nonzeros (dummy column q2: zero)
    if blocks is not None:
        safe, mask, n_g = (jnp.asarray(x) for x in blocks)
        g1b = g1[safe]
        same1 = g1b[:, :, None] == g1b[:, None, :]  # rows in one class-1 group share the A⁻¹ part of M⁻¹

    def cho1(LA, b):  # A_g⁻¹ b for b (G1, d1, m)
        return _bwd_small(LA, _fwd_small(LA, b))

    def one(args):
        r, sig, lam1, lams = args
        iv = 1.0 / sig**2
        w1 = Z1 @ lam1  # rows w1_i = Λ₁ᵀ z_i: (N, d1)
        A = eye1 + jax.ops.segment_sum(w1[:, :, None] * w1[:, None, :] * iv[:, None, None], g1, G1)
        LA = chol_small(A)  # (G1, d1, d1)
        a = _fwd_small(LA[g1], w1[..., None])[..., 0]  # (N, d1): |a_i|² = w1ᵀ A⁻¹ w1
        v1 = jax.ops.segment_sum(w1 * (r * iv)[:, None], g1, G1)  # (G1, d1) block 1 of Wᵀ D⁻¹ r
        xA = cho1(LA, v1[..., None])[..., 0]
        if q2 == 0:
            Wx = jnp.sum(w1 * xA[g1], -1)
            quad = jnp.sum(a**2, -1)
        else:
            vals2 = jnp.concatenate([Z @ lam for Z, lam in zip(Zo, lams)], 1)  # (N, k2) nonzeros of c_i
            # compact B: (G1, d1, kmax), column j of group g is the other-term column nzc[g, j]
            Bc = jnp.zeros((G1, d1, st.kmax), dtype).at[g1[:, None, None], jnp.arange(d1)[None, :, None],
                                                        slot[:, None, :]].add(
                w1[:, :, None] * vals2[:, None, :] * iv[:, None, None])
            Ec = cho1(LA, Bc)  # A⁻¹ B, compact
            C = jnp.eye(q2 + 1, dtype=dtype).at[cols2[:, :, None], cols2[:, None, :]].add(
                vals2[:, :, None] * vals2[:, None, :] * iv[:, None, None])
            S = C.at[nzc[:, :, None], nzc[:, None, :]].add(-jnp.einsum("gak,gal->gkl", Bc, Ec))
            LS = jnp.linalg.cholesky(S)  # (q2 + 1) x (q2 + 1), one matrix (the dummy column: a 1 on the diagonal)
            v2 = jnp.zeros(q2 + 1, dtype).at[cols2].add(vals2 * (r * iv)[:, None])
            v2 = v2.at[nzc].add(-jnp.einsum("gak,ga->gk", Ec, v1))
            x2 = cho_solve((LS, True), v2)
            x1 = xA - jnp.einsum("gak,gk->ga", Ec, x2[nzc])
            Wx = jnp.sum(w1 * x1[g1], -1) + jnp.sum(vals2 * x2[cols2], -1)
            tv = jnp.concatenate([vals2, -jnp.einsum("nak,na->nk", Ec[g1], w1)], 1)  # (N, K) nonzeros of t_i
            if st.path == "dense":
                t = jnp.zeros((N, q2 + 1), dtype).at[jnp.arange(N)[:, None], tc].add(tv)
                u = solve_triangular(LS, t.T, lower=True).T  # (N, q2 + 1): |u_i|² = t_iᵀ S⁻¹ t_i
                quad2 = jnp.sum(u**2, -1)
            else:
                Sinv = cho_solve((LS, True), jnp.eye(q2 + 1, dtype=dtype))
                quad2 = jnp.einsum("nk,nl,nkl->n", tv, tv, Sinv[tc[:, :, None], tc[:, None, :]])
            quad = jnp.sum(a**2, -1) + quad2
        Pr = (r - Wx) * iv
        Pii = iv - quad * iv**2
        if blocks is None:
            return Pr, Pii
        ab = a[safe]
        Q = jnp.einsum("gia,gja->gij", ab, ab) * same1
        if q2 and st.path == "dense":
            ub = u[safe]
            Q = Q + jnp.einsum("giq,gjq->gij", ub, ub)
        elif q2:
            Y = sum(tv[:, k, None] * Sinv[tc[:, k]] for k in range(tc.shape[1]))  # (N, q2 + 1): S⁻¹ t_i
            tcb, tvb = tc[safe], tv[safe]  # (G, nmax, K)
            Q = Q + jnp.einsum("gik,gijk->gij", tvb, Y[safe[:, None, :, None], tcb[:, :, None, :]])
        return Pr, Pii, _block_loglik(Pr, iv, Q, safe, mask, n_g)

    return one


def _map_draws(fit, key, one, xs, S: int, chunk: int, desc: str, progress: bool = True, data=None,
               lapack: bool = True):
    """Apply ``one`` (one draw's outputs) to every draw of ``xs`` (leaves (S, ...)): a compiled program maps a
    chunk of ``chunk`` draws one after the other (lax.map; vmap when ``one`` calls no LAPACK routine, as the
    one-term pointwise program: no batched LAPACK either way), a host loop calls it per chunk (the last padded by
    repeating a draw, so one compilation serves all) and shows a tqdm bar of draws done when the remaining chunks
    are estimated, from the first one's time, to take more than PROGRESS_AFTER seconds. Returns numpy outputs
    (S, ...). The compiled program is kept in the fit's cache under ``key``."""
    cache = fit.loo_cache
    b = max(1, min(chunk, S))
    pkey = ("program", key, b)
    take = lambda s0: jax.tree_util.tree_map(lambda a: a[np.minimum(np.arange(s0, s0 + b), S - 1)], xs)  # noqa: E731
    if pkey not in cache:
        mapped = (lambda x: jax.lax.map(one, x)) if lapack else jax.vmap(one)
        cache[pkey] = xla.jit(mapped, data=data).lower(take(0)).compile()
    prog = cache[pkey]
    outs, bar = [], None
    t0 = time.perf_counter()
    try:
        for s0 in range(0, S, b):
            out = prog(take(s0))
            outs.append([np.asarray(o)[: min(b, S - s0)] for o in out])
            done = min(S, s0 + b)
            if bar is None and progress and s0 == 0 and done < S:
                left = (time.perf_counter() - t0) * (S - done) / done
                if left > PROGRESS_AFTER:
                    from tqdm.auto import tqdm

                    bar = tqdm(total=S, initial=done, desc=desc, unit="draw", leave=False, dynamic_ncols=True)
            elif bar is not None:
                bar.update(done - bar.n)
    finally:
        if bar is not None:
            bar.close()
    return tuple(np.concatenate(parts) for parts in zip(*outs))


def _chunk(flops_per_draw: float, floats_out: float) -> int:
    """Draws per compiled call: about _CHUNK_SECONDS of work, outputs within _CHUNK_FLOATS, at most 256."""
    by_time = _CHUNK_SECONDS * FLOP_RATE / max(flops_per_draw, 1.0)
    by_mem = _CHUNK_FLOATS / max(floats_out, 1.0)
    return int(max(1, min(256, by_time, by_mem)))


def _inputs(fit):
    """Flattened (S, ...) residuals, σ and factors Λ_h from a Fit's draws (every term integrated out)."""
    m, s = fit.model, fit.samples
    S = fit.n_chains * fit.n_draws
    mu = s["beta"].reshape(S, -1) @ np.asarray(m.design.X, float).T  # (S, N)
    r = np.asarray(m.y, float)[None, :] - mu  # model.y is the working response (any offset subtracted)
    sig = fit.residual_sd().reshape(S, -1)
    return r, sig, _factors(fit)


def _run(fit, group: str | None = None, progress: bool = True):
    """(P r, diag P) per draw, (S, N) each, and with ``group`` the leave-one-group-out densities (S, G)
    (no Jacobian); the compiled program is cached on the fit."""
    m = fit.model
    dtype = m.dtype
    S = fit.n_chains * fit.n_draws
    blocks = None
    if group is not None:
        blocks = _group_blocks(*_codes_and_count(m, group))
    st = _Static(m, S, blocks)  # raises LooCostError before any work
    r, sig, lams = _inputs(fit)
    n_out = 2 * st.N + (0 if blocks is None else len(blocks[2]))
    chunk = _chunk(st.flops, n_out)
    desc = "LOO" if group is None else f"LOO by {group}"
    if st.i1 is None:  # no random effects: P = D⁻¹
        iv = 1.0 / sig**2
        if blocks is None:
            return r * iv, iv
        bl = tuple(jnp.asarray(x) for x in blocks)
        out = _map_draws(fit, ("loo-none", group), lambda a: (_block_loglik(a[0], a[1], None, *bl),),
                         (jnp.asarray(r * iv, dtype), jnp.asarray(iv, dtype)), S, chunk, desc, progress)
        return r * iv, iv, out[0]
    one = _draw_fn(st, dtype, blocks)
    xs = (jnp.asarray(r, dtype), jnp.asarray(sig, dtype), jnp.asarray(lams[st.i1], dtype),
          tuple(jnp.asarray(lams[h], dtype) for h in st.others))
    return _map_draws(fit, ("loo", st.i1, group), one, xs, S, chunk, desc, progress,
                      data=[t.Z for t in m.terms], lapack=st.q2 > 0 or blocks is not None)


def _jacobian(model) -> np.ndarray:
    """Per-observation log-Jacobian to the observed scale: −log y_i for lognormal, else 0: (N,)."""
    if model.family == "lognormal":
        return -np.log(np.asarray(model.design.y, float))
    return np.zeros(model.n_obs)


def _frozen(a: np.ndarray) -> np.ndarray:
    """The array made read-only (it is the fit's cached copy: fits are immutable)."""
    a.flags.writeable = False
    return a


def _pointwise(fit, progress: bool = True) -> np.ndarray:
    """log p(y_i | y_-i, θ_s), (S, N), of the draws in ``fit.samples`` (no caching)."""
    if fit.model.family_spec.is_glmm:
        return _glmm_pointwise(fit, progress)
    Pr, Pii = _run(fit, progress=progress)[:2]
    with np.errstate(invalid="ignore", divide="ignore"):
        ll = -0.5 * np.log(2 * np.pi / Pii) - 0.5 * Pr**2 / Pii
    return ll + _jacobian(fit.model)[None]


def pointwise_loglik(fit, progress: bool = True) -> np.ndarray:
    """log p(y_i | y_-i, θ_s) with every random effect integrated out, per draw: (chain, draw, N), read-only.

    Computed once per fit and kept on it (``loo``, ``compare``, ``log_likelihood`` and ``to_arviz`` share it).
    For family="lognormal" the density is of the observed y (Jacobian −log y_i included), matching
    ``model.log_marginal``. For a GLMM family, the Laplace cavity approximation (``_glmm_pointwise``).
    progress: show a progress bar when it takes more than PROGRESS_AFTER seconds."""
    cache = fit.loo_cache
    if "pointwise" not in cache:
        cache["pointwise"] = _frozen(_pointwise(fit, progress).reshape(fit.n_chains, fit.n_draws, -1))
    return cache["pointwise"]


GH_NODES = 32  # Gauss-Hermite nodes of the one-dimensional cavity integral (exact for polynomials of degree 63)


def _glmm_pointwise(fit, progress: bool = True) -> np.ndarray:
    """log p(y_i | y_-i, θ) of a GLMM per draw, (S, N), by the Laplace cavity (Vehtari et al. 2016, JMLR 17):
    the Laplace posterior of η_i is N(η̂_i, h_i); removing observation i's own Gaussian site (precision w_i,
    natural mean w_i η̂_i + s_i at the mode) leaves the cavity N(m_i, 1/τ_i), τ_i = 1/h_i − w_i, and
    p(y_i | y_-i, θ) ≈ ∫ p(y_i | η) N(η; m_i, 1/τ_i) dη, by Gauss-Hermite quadrature."""
    m, s = fit.model, fit.samples
    S = fit.n_chains * fit.n_draws
    beta = s["beta"].reshape(S, -1)
    lams = _factors(fit)
    lp = m.laplace_plan("all")
    dt = m.dtype
    chunk = max(1, min(256, int(_CHUNK_FLOATS // (8 * max(m.n_obs, 1)))))
    site = m.family_spec.dispersion       # the dispersion draws (S,) of negbinomial / gamma / beta, else None
    disp = None if site is None else np.asarray(s[site], float).reshape(S)
    args = (jnp.asarray(beta, dt), tuple(jnp.asarray(L, dt) for L in lams))
    if disp is None:
        eta, h, sc, w = _map_draws(fit, ("glmm",), lambda a: laplace.predictive_pieces(lp, a[0], a[1]),
                                   args, S, chunk, "LOO", progress)
    else:
        eta, h, sc, w = _map_draws(fit, ("glmm", site),
                                   lambda a: laplace.predictive_pieces(lp, a[0], a[1], None, a[2]),
                                   args + (jnp.asarray(disp, dt),), S, chunk, "LOO", progress)
    with np.errstate(divide="ignore", invalid="ignore"):
        tau = np.where(h > 0, 1.0 / h - w, np.inf)
        tau = np.maximum(tau, 1e-12)
        mean = np.where(np.isfinite(tau), (eta * (1.0 / h - w) - sc) / tau, eta)
        mean = np.where(h > 0, mean, eta)
        sd = np.where(h > 0, 1.0 / np.sqrt(tau), 0.0)
    x, wq = np.polynomial.hermite_e.hermegauss(GH_NODES)     # ∫ f(z) φ(z) dz ≈ Σ wq f(x) / sqrt(2π)
    logw = np.log(wq / np.sqrt(2 * np.pi))
    y, n = np.asarray(m.y, float), m.trials
    out = np.empty_like(eta)
    step = max(1, int(2e7 // (GH_NODES * m.n_obs)))
    for k in range(0, S, step):
        sl = slice(k, min(S, k + step))
        nodes = mean[sl, :, None] + sd[sl, :, None] * x
        ll = families.pointwise_log_lik(m.family_spec, y[None, :, None], n[None, :, None], nodes,
                                        None if disp is None else disp[sl, None, None])
        a = ll + logw
        amax = a.max(-1, keepdims=True)
        out[sl] = (amax + np.log(np.exp(a - amax).sum(-1, keepdims=True)))[..., 0]
    return out


def _group_codes(model, group: str) -> tuple[np.ndarray, list]:
    """Codes (N,) and labels of the rows' groups for leave-one-group-out; ``group`` is a term name, a grouping
    expression ("a:b") or data column(s)."""
    for t in model.terms:
        if group in (t.name, t.group):
            return t.codes, list(t.levels)
    factors = tuple(f.strip() for f in group.split(":"))
    data = model.design.data
    missing = [f for f in factors if f not in data.columns]
    if missing:
        raise ValueError(f"loo(group={group!r}): no term or data column {missing[0]!r}; terms are "
                         f"{[t.name for t in model.terms]}")
    keys = data[list(factors)].astype(str).agg(":".join, axis=1)
    labels, codes = np.unique(keys.to_numpy(), return_inverse=True)
    return codes.astype(np.int64), list(labels)


def group_loglik(fit, group: str, progress: bool = True) -> tuple[np.ndarray, list]:
    """log p(y_g | y_-g, θ_s) for every level g of ``group``: ((chain, draw, n_groups) read-only, labels).

    Needs the blocks P_gg of V⁻¹ (n_g × n_g): each is built from the same per-draw pieces as the pointwise
    version, O(G n_max² (d₁ + K) + G n_max³) extra per draw (groups padded to the largest, n_max rows).
    Computed once per fit and group."""
    if fit.model.family_spec.is_glmm:
        raise ValueError("leave-one-group-out (loo(group=...)) is not available for GLMM families yet; use "
                         "loo() (leave one observation out, Laplace cavity)")
    cache = fit.loo_cache
    if ("group", group) not in cache:
        m = fit.model
        codes, labels = _group_codes(m, group)
        G = len(labels)
        out = _run(fit, group, progress)[2]  # (S, G)
        jac = np.bincount(codes, weights=_jacobian(m), minlength=G)
        out = out + jac[None]
        cache[("group", group)] = (_frozen(out.reshape(fit.n_chains, fit.n_draws, G)), labels)
    ll, labels = cache[("group", group)]
    return ll, list(labels)


# ---------------------------------------------------------------------------------------------------------------
# reloo: exact refits for the observations PSIS cannot handle


def _model_without(model, row: int):
    """The same model (formula, family, priors as built for the full data, residual structure) on the data
    without ``row``."""
    data = model.design.data
    if len(data) != model.n_obs:
        raise ValueError(f"reloo: the model's data has {len(data)} rows for {model.n_obs} observations")
    sspec = model.sigma_spec
    priors = {p.site: (p.fixed if p.is_fixed else p.dist) for p in model.priors}
    # type(model): the Model class, without importing lmmarg.model here (it would close an import cycle)
    return type(model)(model.formula, data.drop(index=data.index[row]), family=model.family, link=model.link,
                       trials=model.trials_column, dtype="float64" if model.dtype == jnp.float64 else "float32",
                       priors=priors, sigma_by=sspec.by if sspec.kind == "by" else None,
                       sigma=sspec.formula if sspec.kind == "formula" else None, dense_limit=model.dense_limit)


def reloo_points(fit, rows, progress: bool = True, seed: int = 0) -> dict:
    """Exact leave-one-out log predictive densities of ``rows`` by refitting (brms's ``reloo``): for each row i,
    the model is rebuilt on the data without it (same formula, family and the full fit's priors) and sampled with
    the fit's NUTS settings; elpd_i = log mean_s p(y_i | y_-i, θ_s) over the refit's draws θ_s, the density given
    θ with every random effect integrated out (the full data's integrated LOO program at the refit's draws).

    Returns {row: elpd_i}. Each refit compiles the sampler for N − 1 rows once (the compiled programs are shared
    by structure and shapes, so every refit after the first reuses them) and costs about one fit."""
    rows = [int(i) for i in rows]
    d = fit.diagnostics
    settings = {"draws": int(d.get("draws", fit.n_draws)), "warmup": int(d.get("warmup", fit.n_draws)),
                "chains": int(d.get("chains", fit.n_chains)), "seed": seed, "progress_bar": False}
    if "target_accept_prob" in d:
        settings["target_accept_prob"] = d["target_accept_prob"]
    effects = {parameters.effects_site(t.name) for t in fit.model.terms}
    out = {}
    bar = None
    if progress and rows:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(rows), desc="reloo refits", unit="fit", leave=False, dynamic_ncols=True)
    try:
        for i in rows:
            refit = _model_without(fit.model, i).sample(**settings)
            # the refit's global draws (and sigma-formula effects) on the full model: its u_ may have fewer levels
            at = type(fit)(fit.model, {k: v for k, v in refit.samples.items() if k not in effects}, method="reloo")
            at.loo_cache.update({k: v for k, v in fit.loo_cache.items()
                                 if isinstance(k, tuple) and k[0] == "program"})  # the compiled programs
            ll = _pointwise(at, progress=False)[:, i]
            out[i] = float(np.logaddexp.reduce(ll) - np.log(len(ll)))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return out


# ---------------------------------------------------------------------------------------------------------------
# comparison


def response_scale(fit) -> str:
    """What the log density is a density of: the observed response (lognormal: y itself), e.g. "log(RT)"."""
    return fit.model.design.response


def compare(fits: dict, group: str | None = None, **kwargs):
    """Compare fits by integrated PSIS-LOO: ``arviz.compare`` on ``{name: fit.loo(group)}``.

    fits: {name: Fit or ELPDData}. Warns when the fits' log densities are of different quantities (e.g.
    ``log(RT)`` under the gaussian family vs ``RT`` under ``family="lognormal"``): ELPDs on different scales are
    not comparable (refit with the same response and a family, e.g. both ``family="lognormal"`` on ``RT``).
    Raises if the fits have different numbers of observations. kwargs go to ``arviz.compare``.
    Returns arviz's comparison DataFrame.
    """
    import arviz as az

    if not isinstance(fits, dict) or len(fits) < 2:
        raise ValueError("compare needs a dict {name: fit} of at least two fits")
    elpd, scales, nobs, groups = {}, {}, {}, {}
    for name, f in fits.items():
        if hasattr(f, "loo") and hasattr(f, "model"):
            elpd[name] = f.loo(group=group)
            scales[name] = response_scale(f)
            nobs[name] = f.model.n_obs
        else:
            elpd[name] = f
            attrs = getattr(f, "attrs", {})
            if "lmmarg_scale" in attrs:
                scales[name] = attrs["lmmarg_scale"]
        groups[name] = getattr(elpd[name], "attrs", {}).get("lmmarg_group")
    if len(set(groups.values())) > 1:
        raise ValueError(f"compared LOO results leave out different units {groups} (None: one observation)")
    if len(set(nobs.values())) > 1:
        raise ValueError(f"compared fits have different numbers of observations {nobs}: LOO needs the same data")
    if len(set(scales.values())) > 1:
        warn_user(
            "compared fits model different response scales "
            + ", ".join(f"{k!r}: density of {v!r}" for k, v in scales.items())
            + "; their ELPDs are not comparable (differ by the log-Jacobian of the transform). Fit the same "
            "response, e.g. family='lognormal' on the raw response instead of log(response) under gaussian.")
    return az.compare(elpd, **kwargs)
