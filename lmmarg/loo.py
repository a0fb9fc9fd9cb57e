"""Integrated (marginal) leave-one-out log-likelihoods and model comparison.

For each posterior draw θ = (β, σ, Σ) the random effects are integrated out: y ~ N(Xβ, V) with
V = D + Σ_h Z_h Σ_h Z_hᵀ, D = diag(σ_i²). With P = V⁻¹ and r = y − Xβ, Gaussian conditioning gives

    log p(y_i | y_-i, θ) = −½ log(2π / P_ii) − ½ (P r)_i² / P_ii
    log p(y_g | y_-g, θ) = −(n_g/2) log 2π + ½ log det P_gg − ½ (P r)_gᵀ P_gg⁻¹ (P r)_g   (a group g of rows)

PSIS-LOO over θ on these (``Fit.loo``) has better behaved Pareto k and a smaller p_loo than LOO on the likelihood
conditional on the sampled random effects, where each observation pulls its own group's effect.

How P is applied (Woodbury, per draw): write V = D + W Wᵀ with W = Z Λ (Σ_h = Λ_h Λ_hᵀ) and
M = I + Wᵀ D⁻¹ W (q × q, q = Σ_h G_h d_h, always ≥ I so every factorization below is stable). Then
P = D⁻¹ − D⁻¹ W M⁻¹ Wᵀ D⁻¹, so P r and diag(P) need M⁻¹ applied to the rows w_i of W. The term with the most
random effects ("class 1", G₁ groups of size d₁) gives a block-diagonal corner A of M; the remaining q₂ effects
(all other terms: nested, crossed or further terms on the same factor) form a dense corner C, and M is handled
through the Schur complement S = C − Bᵀ A⁻¹ B (q₂ × q₂):

    w_iᵀ M⁻¹ w_i = w1_iᵀ A_g⁻¹ w1_i + t_iᵀ S⁻¹ t_i,   t_i = c_i − B_gᵀ A_g⁻¹ w1_i.

With a ``sigma=`` formula, σ_i of each draw uses that draw's sampled random effects of the sigma formula; only
the random effects of the mean are integrated out.

Cost per draw: O(N (d₁² + d₁ q₂ + q₂²) + G₁ d₁³ + G₁ d₁² q₂ + q₂³), memory O(N q₂ + G₁ d₁ q₂ + q₂²). With one
term (q₂ = 0) this is linear in N. With several terms it is linear in N for a fixed size q₂ of the other terms,
and the q₂³ / N q₂² parts dominate when those terms have thousands of levels (e.g. a crossed factor with 5,000
items costs about as much as a dense 5,000 × 5,000 Cholesky per draw). ``LooCostError`` is raised when
q₂ > ``MAX_DENSE`` = 4,000 or N q₂ > ``MAX_WORK`` = 5·10⁷ (about 0.4 GB per draw); ``Fit.to_arviz`` then falls back
to the conditional log-likelihood with a warning.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import cho_solve, solve_triangular

from . import xla
from ._warnings import warn_user

__all__ = ["pointwise_loglik", "group_loglik", "compare", "response_scale", "LooCostError", "MAX_DENSE", "MAX_WORK"]

MAX_DENSE = 4000  # largest q₂ (random effects outside the largest term) handled per draw
MAX_WORK = 5e7  # largest N q₂ (floats of the dense per-observation rows t_i, and the N q₂² flops scale)


_CHUNK_FLOATS = 2e7  # memory budget (floats) of one batch of draws (one vmapped call)


class LooCostError(ValueError):
    """The integrated log-likelihood would need a dense block too large for this model (see module doc)."""


def _factor(sd: np.ndarray, corr: np.ndarray | None) -> np.ndarray:
    """Λ with Λ Λᵀ = diag(sd) corr diag(sd), for singular correlations too: (S, d, d).

    The symmetric eigen-decomposition instead of a Cholesky factor keeps a boundary draw (|ρ| = 1) finite.
    """
    S, d = sd.shape
    if corr is None or d == 1:
        return sd[:, :, None] * np.eye(d)[None]
    w, V = np.linalg.eigh(corr)
    return sd[:, :, None] * (V * np.sqrt(np.clip(w, 0, None))[:, None, :])


class _Static:
    """Per-model constants: class-1 term, index tables of the other terms."""

    def __init__(self, model):
        terms = model.terms
        self.terms = terms
        self.N = model.n_obs
        if not terms:
            self.i1 = None
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
        self.q2 = off
        self.cols2 = np.concatenate(cols, 1) if cols else np.zeros((self.N, 0), np.int64)  # (N, k2)
        if self.q2 > MAX_DENSE or self.N * self.q2 > MAX_WORK:
            raise LooCostError(
                f"the integrated log-likelihood needs a dense {self.q2} x {self.q2} block per draw (and {self.N} "
                f"rows of it) for the random effects outside term {t1.name!r} (terms "
                f"{[terms[h].name for h in self.others]}); the limits are q2 <= {MAX_DENSE} and "
                f"N q2 <= {MAX_WORK:.0e}. Use loo(integrated=False) (conditional on the sampled effects).")


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

    Q: (G, nmax, nmax) blocks of W M⁻¹ Wᵀ (None: no random effects); padding rows get an identity block."""
    nmax = safe.shape[1]
    ivb = jnp.where(mask, iv[safe], 0.0)
    eye = jnp.eye(nmax, dtype=iv.dtype)[None]
    P = ivb[:, :, None] * eye
    if Q is not None:
        P = P - ivb[:, :, None] * Q * ivb[:, None, :]
    P = jnp.where(mask[:, :, None] & mask[:, None, :], P, eye)
    L = jnp.linalg.cholesky(P)
    z = solve_triangular(L, jnp.where(mask, Pr[safe], 0.0)[..., None], lower=True)[..., 0]
    logdet = 2 * jnp.sum(jnp.log(jnp.diagonal(L, axis1=1, axis2=2)), 1)
    return -0.5 * n_g * np.log(2 * np.pi) + 0.5 * logdet - 0.5 * jnp.sum(z**2, 1)


def _pieces_fn(st: _Static, dtype, blocks=None):
    """A batched map over draws of one draw's (P r (N,), diag P (N,)) and, with ``blocks`` = (safe, mask, n_g)
    from ``_group_blocks``, the leave-one-group-out log densities (G,). The per-observation rows a_i (d1) and
    u_i (q2) of the quadratic forms stay inside the map (never (draws, N, q2) in memory)."""
    N = st.N
    g1 = jnp.asarray(st.terms[st.i1].codes, jnp.int32)
    Z1 = jnp.asarray(st.terms[st.i1].Z, dtype)
    Zo = [jnp.asarray(st.terms[h].Z, dtype) for h in st.others]
    cols2 = jnp.asarray(st.cols2, jnp.int32)
    G1, d1, q2 = st.G1, st.d1, st.q2
    eye1 = jnp.eye(d1, dtype=dtype)
    if blocks is not None:
        safe, mask, n_g = (jnp.asarray(x) for x in blocks)
        g1b = g1[safe]
        same1 = g1b[:, :, None] == g1b[:, None, :]  # rows in one class-1 group share the A⁻¹ part of M⁻¹

    def one(args):
        r, sig, lam1, lams = args
        iv = 1.0 / sig**2
        w1 = Z1 @ lam1  # rows w1_i = Λ₁ᵀ z_i: (N, d1)
        A = eye1 + jax.ops.segment_sum(w1[:, :, None] * w1[:, None, :] * iv[:, None, None], g1, G1)
        LA = jnp.linalg.cholesky(A)  # (G1, d1, d1)
        a = solve_triangular(LA[g1], w1[..., None], lower=True)[..., 0]  # (N, d1): |a_i|² = w1ᵀ A⁻¹ w1
        v1 = jax.ops.segment_sum(w1 * (r * iv)[:, None], g1, G1)  # (G1, d1) block 1 of Wᵀ D⁻¹ r
        cho1 = jax.vmap(lambda L, b: cho_solve((L, True), b))
        if q2 == 0:
            x1 = cho1(LA, v1)
            Wx = jnp.sum(w1 * x1[g1], -1)
            quad = jnp.sum(a**2, -1)
            u = jnp.zeros((N, 1), dtype)  # no other terms (keeps the block formulas' shapes uniform)
        else:
            vals2 = jnp.concatenate([Z @ lam for Z, lam in zip(Zo, lams)], 1)  # (N, k2) nonzeros of c_i
            B = jnp.zeros((G1, d1, q2), dtype).at[g1[:, None, None], jnp.arange(d1)[None, :, None],
                                                   cols2[:, None, :]].add(
                w1[:, :, None] * vals2[:, None, :] * iv[:, None, None])
            C = jnp.eye(q2, dtype=dtype).at[cols2[:, :, None], cols2[:, None, :]].add(
                vals2[:, :, None] * vals2[:, None, :] * iv[:, None, None])
            E = cho1(LA, B)  # A⁻¹ B: (G1, d1, q2)
            LS = jnp.linalg.cholesky(C - jnp.einsum("gaq,gar->qr", B, E))
            v2 = jnp.zeros(q2, dtype).at[cols2].add(vals2 * (r * iv)[:, None])
            x2 = cho_solve((LS, True), v2 - jnp.einsum("gaq,ga->q", E, v1))
            x1 = cho1(LA, v1) - jnp.einsum("gaq,q->ga", E, x2)
            Wx = jnp.sum(w1 * x1[g1], -1) + jnp.sum(vals2 * x2[cols2], -1)
            c = jnp.zeros((N, q2), dtype).at[jnp.arange(N)[:, None], cols2].add(vals2)
            t = c - jnp.einsum("naq,na->nq", E[g1], w1)
            u = solve_triangular(LS, t.T, lower=True).T  # (N, q2): |u_i|² = t_iᵀ S⁻¹ t_i
            quad = jnp.sum(a**2, -1) + jnp.sum(u**2, -1)
        Pr = (r - Wx) * iv
        Pii = iv - quad * iv**2
        if blocks is None:
            return Pr, Pii
        ab, ub = a[safe], u[safe]
        Q = jnp.einsum("gia,gja->gij", ab, ab) * same1 + jnp.einsum("giq,gjq->gij", ub, ub)
        return Pr, Pii, _block_loglik(Pr, iv, Q, safe, mask, n_g)

    per_draw = N * (d1 * max(q2, 1) + 4 * d1 + max(q2, 1) + 8) + G1 * d1 * max(q2, 1) + q2 * q2
    if blocks is not None:
        Gb, nmax = blocks[0].shape
        per_draw += Gb * nmax * (3 * nmax + d1 + max(q2, 1))
    batch = int(max(1, min(256, _CHUNK_FLOATS // per_draw)))
    return _batched(xla.jit(jax.vmap(one)), batch)


def _batched(f, batch: int):
    """Apply f (jit of a vmapped one-draw function) to every draw, ``batch`` draws per call from a host loop (the
    last batch padded by repeating a draw, so one compilation serves all). A host loop rather than lax.map: XLA:CPU
    could deadlock (every thread idle, the result never ready) running batched LAPACK calls inside the while loop
    that lax.map compiles to."""
    def run(xs):
        S = int(jax.tree_util.tree_leaves(xs)[0].shape[0])
        b = min(batch, S)
        outs = []
        for s0 in range(0, S, b):
            idx = np.minimum(np.arange(s0, s0 + b), S - 1)
            out = f(jax.tree_util.tree_map(lambda a, idx=idx: a[idx], xs))
            outs.append([np.asarray(o)[: min(b, S - s0)] for o in out])
        return tuple(np.concatenate(parts) for parts in zip(*outs))

    return run


def _inputs(fit):
    """Flattened (S, ...) residuals, σ and factors Λ_h from a Fit's draws (every term integrated out)."""
    m, s = fit.model, fit.samples
    S = fit.n_chains * fit.n_draws
    mu = s["beta"].reshape(S, -1) @ np.asarray(m.design.X, float).T  # (S, N)
    r = np.asarray(m.y, float)[None, :] - mu  # model.y is the working response (any offset subtracted)
    sig = fit.residual_sd().reshape(S, -1)
    lams = []
    for t in m.terms:
        sd = s[f"sd_{t.name}"].reshape(S, t.d)
        corr = s.get(f"corr_{t.name}")
        lams.append(_factor(sd, None if corr is None else corr.reshape(S, t.d, t.d)))
    return r, sig, lams


def _run(fit, group: str | None = None):
    """(P r, diag P) per draw, (S, N) each, and with ``group`` the leave-one-group-out densities (S, G)
    (no Jacobian); the compiled map is cached on the fit."""
    m = fit.model
    dtype = m.dtype
    r, sig, lams = _inputs(fit)
    st = _Static(m)
    blocks = None
    if group is not None:
        codes, labels = _group_codes(m, group)
        blocks = _group_blocks(codes, len(labels))
    if st.i1 is None:  # no random effects: P = D⁻¹
        iv = 1.0 / sig**2
        if blocks is None:
            return r * iv, iv
        logo = jax.vmap(lambda a, b: _block_loglik(a, b, None, *blocks))(jnp.asarray(r * iv), jnp.asarray(iv))
        return r * iv, iv, np.asarray(logo)
    key = ("loo", st.i1, group)
    cache = fit.__dict__.setdefault("_loo_cache", {})
    if key not in cache:
        cache[key] = _pieces_fn(st, dtype, blocks)
    lam1 = jnp.asarray(lams[st.i1], dtype)
    others = tuple(jnp.asarray(lams[h], dtype) for h in st.others)
    out = cache[key]((jnp.asarray(r, dtype), jnp.asarray(sig, dtype), lam1, others))
    return tuple(np.asarray(o) for o in out)


def _jacobian(model) -> np.ndarray:
    """Per-observation log-Jacobian to the observed scale: −log y_i for lognormal, else 0: (N,)."""
    if model.family == "lognormal":
        return -np.log(np.asarray(model.design.y, float))
    return np.zeros(model.n_obs)


def pointwise_loglik(fit) -> np.ndarray:
    """log p(y_i | y_-i, θ_s) with every random effect integrated out, per draw: (chain, draw, N).

    For family="lognormal" the density is of the observed y (Jacobian −log y_i included), matching
    ``model.log_marginal``. For a GLMM family, the Laplace cavity approximation (``_glmm_pointwise``)."""
    if fit.model.family_spec.is_glmm:
        return _glmm_pointwise(fit).reshape(fit.n_chains, fit.n_draws, -1)
    Pr, Pii = _run(fit)
    with np.errstate(invalid="ignore", divide="ignore"):
        ll = -0.5 * np.log(2 * np.pi / Pii) - 0.5 * Pr**2 / Pii
    ll = ll + _jacobian(fit.model)[None]
    return ll.reshape(fit.n_chains, fit.n_draws, -1)


GH_NODES = 32  # Gauss-Hermite nodes of the one-dimensional cavity integral (exact for polynomials of degree 63)


def _glmm_pointwise(fit) -> np.ndarray:
    """log p(y_i | y_-i, θ) of a GLMM per draw, (S, N), by the Laplace cavity (Vehtari et al. 2016, JMLR 17):
    the Laplace posterior of η_i is N(η̂_i, h_i); removing observation i's own Gaussian site (precision w_i,
    natural mean w_i η̂_i + s_i at the mode) leaves the cavity N(m_i, 1/τ_i), τ_i = 1/h_i − w_i, and
    p(y_i | y_-i, θ) ≈ ∫ p(y_i | η) N(η; m_i, 1/τ_i) dη, by Gauss-Hermite quadrature."""
    from . import families
    from .marginal import laplace

    m, s = fit.model, fit.samples
    S = fit.n_chains * fit.n_draws
    beta = s["beta"].reshape(S, -1)
    lams = []
    for t in m.terms:
        corr = s.get(f"corr_{t.name}")
        lams.append(_factor(s[f"sd_{t.name}"].reshape(S, t.d), None if corr is None else corr.reshape(S, t.d, t.d)))
    lp = m.laplace_plan("all")
    cache = fit.__dict__.setdefault("_loo_cache", {})
    if "glmm" not in cache:
        one = jax.vmap(lambda a: laplace.predictive_pieces(lp, a[0], a[1]))
        batch = max(1, int(_CHUNK_FLOATS // (8 * max(m.n_obs, 1))))
        cache["glmm"] = _batched(xla.jit(one), batch)
    dt = m.dtype
    eta, h, sc, w = cache["glmm"]((jnp.asarray(beta, dt), tuple(jnp.asarray(L, dt) for L in lams)))
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
    for k in range(0, S, max(1, int(2e7 // (GH_NODES * m.n_obs)))):
        sl = slice(k, min(S, k + max(1, int(2e7 // (GH_NODES * m.n_obs)))))
        nodes = mean[sl, :, None] + sd[sl, :, None] * x
        ll = families.pointwise_log_lik(m.family_spec, y[None, :, None], n[None, :, None], nodes)
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


def group_loglik(fit, group: str) -> tuple[np.ndarray, list]:
    if fit.model.family_spec.is_glmm:
        raise ValueError("leave-one-group-out (loo(group=...)) is not available for GLMM families yet; use "
                         "loo() (leave one observation out, Laplace cavity)")
    return _group_loglik(fit, group)


def _group_loglik(fit, group: str) -> tuple[np.ndarray, list]:
    """log p(y_g | y_-g, θ_s) for every level g of ``group``: ((chain, draw, n_groups), labels).

    Needs the blocks P_gg of V⁻¹ (n_g × n_g): each is built from the same per-draw pieces as the pointwise
    version, O(G n_max² (d₁ + q₂) + G n_max³) extra per draw (groups padded to the largest, n_max rows)."""
    m = fit.model
    codes, labels = _group_codes(m, group)
    G = len(labels)
    out = _run(fit, group)[2]  # (S, G)
    jac = np.bincount(codes, weights=_jacobian(m), minlength=G)
    out = out + jac[None]
    return out.reshape(fit.n_chains, fit.n_draws, G), labels


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
