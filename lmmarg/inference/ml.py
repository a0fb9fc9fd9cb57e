"""Maximum likelihood and REML fits with lme4 parity (profiled deviance over the relative factors θ).

For relative covariance factors Λ_l(θ) (Σ_l = σ² Λ_lΛ_lᵀ) let V(θ) = I + Σ_l Z_l(I⊗Λ_lΛ_lᵀ)Z_lᵀ.
One call of the engine primitive ``kernels.logdet_gram`` at σ = 1 with the p + 1 right-hand sides x_1..x_p,
r0 = y - Xβ0 at once gives log|V| (= log|F|, determinant lemma) and the whitened Gram matrix, hence the exact
G = [X r0]ᵀ V⁻¹ [X r0] (= [X r0]ᵀ[X r0] minus that Gram matrix, Woodbury).
With C = chol(G):

    A = XᵀV⁻¹X = C_XX C_XXᵀ,  β̂ = β0 + A⁻¹XᵀV⁻¹r0,  penalized RSS Q = C_pp²,
    ML   deviance  = N (1 + log(2π Q / N)) + log|V|                         (σ̂² = Q / N)
    REML criterion = (N-p)(1 + log(2π Q / (N-p))) + log|V| + log|A|         (σ̂² = Q / (N-p))

exactly lme4's profiled criteria.

Optimization (docs/estimation.md): the criterion is minimized over *standardized* factors Λ̃_l with Λ_l = S_l Λ̃_l,
where Z_l S_l has centred (against the term's intercept) and unit-scale columns, and over X S_X likewise for the Gram
matrix; the profiled criterion depends on Λ only through ΛΛᵀ, so this is an exact reparameterization that makes the
optimum independent of the units and offsets of the covariates. scipy's L-BFGS-B (diagonals of Λ̃ ≥ 0) runs on a
jitted ``jax.value_and_grad``, compiled once per model. A boundary optimum is then tested as lme4's ``restart_edge``
does, and more: a column of Λ̃ with a zero diagonal is equivalent to its negative, so the search probes both signs
and the directions of negative curvature into the interior, restarting whenever one lowers the criterion. Finally
lme4's convergence checks (scaled gradient, positive-definite Hessian in the free directions, boundary test) decide
``converged``.
"""
from __future__ import annotations

import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
import scipy.optimize

from .._warnings import warn_user
from ..degenerate import check_residual, check_separation
from ..dense_warning import warn_large_dense
from ..design import column_standardizer
from ..statdesign import standardizer
from ..families import dispersion_start, glm_fit
from ..families import mean as family_mean
from ..compile import persistent
from ..compile import xla
from ..compile.limits import check_address_space, note_compiled_structure
from ..marginal import ClassSpec, build_plan, kernels, laplace, plan_from_statistics
from ..results.ml import ConvergenceChecks, MLFit
from .blas import blas_threads
from .derivatives import hessian_from_gradients

__all__ = ["fit_ml", "profiled_deviance"]

_SINGULAR_TOL = 1e-4
_LOG2PI = float(np.log(2 * np.pi))

# Optimizer constants (standardized coordinates, where a relative SD of 1 means "as large as σ").
START_SCALES = (1.0, 0.3, 0.1)    # candidate starts s·I; the one with the lowest criterion is used
EDGE_TOL = 1e-4                   # a standardized diagonal below this is "at the boundary" (lme4: 1e-4 on θ)
PROBE_STEPS = (1e-3, 1e-2, 0.1, 0.5)  # distances into the interior tried from a boundary optimum
MAX_RESTARTS = 5                  # restarts from better boundary probes before giving up
REL_IMPROVEMENT = 1e-10           # a probe must lower the criterion by this (relative) to trigger a restart
FD_STEP = 1e-5                    # relative step of the finite-difference Hessian (forward differences of ∇)
# lme4's checkConv tolerances
GRAD_TOL = 2e-3                   # max |H⁻½ g| (scaled gradient) in the free directions
HESS_NEG_TOL = 1e-6               # relative: an eigenvalue below -tol·max|λ| counts as negative
BOUNDARY_GRAD_TOL = 1e-3          # scaled projected gradient allowed to point out of the feasible set


# --------------------------------------------------------------------------------------------- θ layout
def _theta_layout(model):
    """Per term: (row, col) index arrays of the column-wise lower triangle (lme4's θ order); lower bounds."""
    layout, lower = [], []
    for t in model.terms:
        rows, cols = [], []
        for j in range(t.d):
            for i in range(j, t.d):
                rows.append(i)
                cols.append(j)
                lower.append(0.0 if i == j else -np.inf)
        # int32: numpy's default int64 indices break jit traces after jax_enable_x64 is switched on mid-process
        layout.append((np.array(rows, np.int32), np.array(cols, np.int32)))
    return layout, np.array(lower)


def _columns(layout) -> list[np.ndarray]:
    """Positions in θ of each column of each factor, diagonal first: one int array per (term, column)."""
    out, k = [], 0
    for rows, cols in layout:
        for j in np.unique(cols):
            out.append(k + np.flatnonzero(cols == j))
        k += len(rows)
    return out


def _lambdas(theta, layout, dims):
    """θ (n_theta,) → tuple of lower-triangular Λ_l (d_l, d_l)."""
    out, k = [], 0
    for (rows, cols), d in zip(layout, dims):
        n = len(rows)
        if isinstance(theta, np.ndarray):  # host-side (results): no tiny XLA compilations
            L = np.zeros((d, d), theta.dtype)
            L[rows, cols] = theta[k:k + n]
            out.append(L)
        else:
            out.append(jnp.zeros((d, d), theta.dtype).at[rows, cols].set(theta[k:k + n]))
        k += n
    return tuple(out)


def _theta_names(model):
    names = []
    for t in model.terms:
        for j in range(t.d):
            for i in range(j, t.d):
                names.append(f"{t.name}.{t.columns[i]}" if i == j else f"{t.name}.{t.columns[i]}.{t.columns[j]}")
    return names


# --------------------------------------------------------------------------------------------- standardization
def _canonical_factor(L: np.ndarray) -> np.ndarray:
    """The lower-triangular factor with non-negative diagonal of L Lᵀ (L any (d, d) square root)."""
    R = np.linalg.qr(L.T, mode="r")
    T = R.T
    sign = np.where(np.diagonal(T) < 0, -1.0, 1.0)
    return T * sign[None, :]


def _pack(lams, layout) -> np.ndarray:
    return np.concatenate([L[rows, cols] for L, (rows, cols) in zip(lams, layout)])


class _Coordinates(NamedTuple):
    """Standardized coordinates: Λ_l = S_l Λ̃_l (θ ↔ φ), X̃ = X S_X (β = β0 + S_X δ̃)."""

    S_terms: tuple      # (d_l, d_l) per term
    S_X: np.ndarray     # (p, p)
    layout: list
    dims: list

    def theta_from_phi(self, phi: np.ndarray) -> np.ndarray:
        """lme4's θ (lower-triangular factor with non-negative diagonal) of the same covariances."""
        lams = _lambdas(np.asarray(phi, float), self.layout, self.dims)
        return _pack([_canonical_factor(S @ L) for S, L in zip(self.S_terms, lams)], self.layout)

    def phi_from_theta(self, theta: np.ndarray) -> np.ndarray:
        lams = _lambdas(np.asarray(theta, float), self.layout, self.dims)
        return _pack([_canonical_factor(np.linalg.solve(S, L)) for S, L in zip(self.S_terms, lams)], self.layout)


def _coordinates(model) -> _Coordinates:
    layout, _ = _theta_layout(model)
    if model.statistics is not None:   # the same coordinates from the column moments of the statistics
        mom = model.statistics.moments
        offs = np.concatenate([[0], np.cumsum([t.d for t in model.terms])]).astype(int)
        return _Coordinates(tuple(standardizer(mom.Z, np.arange(offs[h], offs[h + 1]))
                                  for h in range(len(model.terms))),
                            standardizer(mom.X), layout, [t.d for t in model.terms])
    X = np.asarray(model.design.X, dtype=np.float64)
    return _Coordinates(tuple(column_standardizer(np.asarray(t.Z, dtype=np.float64)) for t in model.terms),
                        column_standardizer(X), layout, [t.d for t in model.terms])


def _standardized_plan(model, coords: _Coordinates):
    """(plan on X̃ = X S_X and Z̃_l = Z_l S_l, raw Gram [X̃ r0]ᵀ[X̃ r0] (p+1, p+1) with r0 = y − X̃ β0 at the plan's
    OLS β0), from the rows or, for a model from sufficient statistics, by transforming the sums."""
    S_X = coords.S_X
    if model.statistics is not None:
        cs = model.statistics.cell_sums()
        S_Z = scipy.linalg.block_diag(*coords.S_terms) if coords.S_terms else np.zeros((0, 0))
        cs = cs._replace(S_zz=np.einsum("ad,cab,be->cde", S_Z, cs.S_zz, S_Z, optimize=True),
                         S_zr=cs.S_zr @ S_Z, S_zX=np.einsum("ad,cab,be->cde", S_Z, cs.S_zX, S_X, optimize=True),
                         XtX=S_X.T @ cs.XtX @ S_X, Xtr=S_X.T @ cs.Xtr, beta0=np.linalg.solve(S_X, cs.beta0))
        plan = plan_from_statistics(cs, dense_limit=model.dense_limit, dtype=model.dtype)
        p = S_X.shape[0]
        raw = np.zeros((p + 1, p + 1))
        raw[:p, :p] = np.asarray(plan.stats.XtX, np.float64)
        raw[:p, p] = raw[p, :p] = np.asarray(plan.stats.Xtr, np.float64)
        raw[p, p] = float(plan.stats.rr)
        return plan, raw
    X = np.asarray(model.design.X, dtype=np.float64) @ S_X
    specs = [ClassSpec(name=t.name, Z=np.asarray(t.Z, dtype=np.float64) @ S, codes=t.codes, n_groups=t.n_groups)
             for t, S in zip(model.terms, coords.S_terms)]
    plan = build_plan(X, model.y, specs, list(range(len(specs))), scalar_sigma=True, dtype=model.dtype,
                      dense_limit=model.dense_limit)
    r0 = np.asarray(model.y, dtype=np.float64) - X @ np.asarray(plan.beta0, dtype=np.float64)
    Vraw = np.column_stack([X, r0])                        # (N, p+1) standardized X and the start residual
    return plan, Vraw.T @ Vraw


# --------------------------------------------------------------------------------------------- criterion
def _build(model):
    """Jitted functions of (plan, φ): the criteria and their gradient, and the profiled statistics."""
    coords = _coordinates(model)
    layout, dims = coords.layout, coords.dims
    N, p = model.n_obs, len(model.fixed_names)
    S_X = coords.S_X
    dt = model.dtype
    # The criterion's own plan is built on the standardized model matrices X̃ = X S_X and Z̃_l = Z_l S_l, so that
    # its sufficient statistics carry no cancellation from the units or offsets of the covariates (Days + 1e4).
    plan, raw_gram = _standardized_plan(model, coords)
    warn_large_dense(plan)
    beta0 = np.asarray(plan.beta0, dtype=np.float64)      # OLS on X̃
    npdt = np.dtype(jnp.dtype(dt).name)
    put = lambda a: jax.device_put(np.asarray(a, dtype=npdt))  # noqa: E731
    consts = dict(beta0=put(beta0), raw_gram=put(raw_gram), c_rhs=put(np.eye(p + 1)))

    def stats(plan, phi, c):
        lams = _lambdas(phi, layout, dims)                                   # Λ̃ per term (standardized)
        lams = kernels.unit_lams(plan, lams)                                 # term order -> engine unit order
        ok = jnp.all(jnp.isfinite(phi))
        # at σ = 1: log|V| = log|F| and [X̃ r0]ᵀV⁻¹[X̃ r0] = [X̃ r0]ᵀ[X̃ r0] - (whitened Gram), one engine call
        logdet, gram = kernels.logdet_gram(plan, lams, jnp.ones((), dt), c["c_rhs"])
        G = c["raw_gram"] - gram
        G = 0.5 * (G + G.T)
        C = jnp.linalg.cholesky(G)
        Cxx = C[:p, :p]
        w = C[p, :p]                                     # X̃ᵀV⁻¹r0 = Cxx w
        delta = jax.scipy.linalg.solve_triangular(Cxx.T, w, lower=False) if p else jnp.zeros((0,), dt)
        Q = C[p, p] ** 2
        logdetA = 2.0 * jnp.sum(jnp.log(jnp.diagonal(Cxx)))   # log|X̃ᵀV⁻¹X̃|
        good = jnp.all(ok) & jnp.all(jnp.isfinite(C))
        return dict(delta=delta, Q=Q, logdetV=logdet, logdetA=logdetA, Cxx=Cxx, good=good)

    logdet_SX = float(np.linalg.slogdet(S_X)[1]) if p else 0.0

    def criterion(plan, phi, c, reml):
        """reml: traced 0./1. flag, so one compilation serves ML and REML. Returns (criterion, stats).

        log|XᵀV⁻¹X| = log|X̃ᵀV⁻¹X̃| - 2 log|S_X|: REML is reported on the user's X, exactly as lme4."""
        s = stats(plan, phi, c)
        n = N - p * reml
        val = n * (1.0 + _LOG2PI + jnp.log(s["Q"] / n)) + s["logdetV"] + reml * (s["logdetA"] - 2.0 * logdet_SX)
        return jnp.where(s["good"] & jnp.isfinite(val), val, jnp.inf), s

    return {
        "plan": plan,
        "consts": consts,
        "coords": coords,
        "logdet_SX": logdet_SX,
        "fn": xla.jit(jax.value_and_grad(criterion, argnums=1, has_aux=True), data=plan),
        "compile_s": None,
    }


def _cache(model):
    """The model's ML objective (built and jitted once per model, kept in ``model.cache.ml``; its compilation
    counts towards lmmarg.compile.limits' bound on compiled structures)."""
    c = model.cache.ml
    if c is None:
        check_address_space("fit_ml()")
        note_compiled_structure()
        c = model.cache.ml = _build(model)
    return c


# --------------------------------------------------------------------------------------------- optimizer
class _Objective:
    """Host-side f(φ) → (value, gradient) over the jitted criterion; counts evaluations, maps failures to +inf."""

    def __init__(self, fn, plan, consts, flag, npdt, verbose: bool):
        self.fn, self.plan, self.consts, self.flag, self.npdt = fn, plan, consts, flag, npdt
        self.verbose = verbose
        self.n_eval = 0

    def raw(self, phi):
        """((criterion, stats), gradient) at φ; the last result is remembered (the optimizer's final point is
        evaluated again by the checks and for the statistics)."""
        key = np.asarray(phi, dtype=self.npdt).tobytes()
        if getattr(self, "_last", (None,))[0] != key:
            self.n_eval += 1
            self._last = (key, self.fn(self.plan, jax.device_put(np.asarray(phi, dtype=self.npdt)), self.consts,
                                       self.flag))
        return self._last[1]

    def __call__(self, phi):
        (v, _), g = self.raw(phi)
        v, g = float(v), np.asarray(g, dtype=float)
        if not np.isfinite(v) or not np.isfinite(g).all():
            return np.inf, np.zeros_like(np.asarray(phi, float))
        if self.verbose:
            print(f"eval {self.n_eval}: {v:.10f}")
        return v, g

    def value(self, phi) -> float:
        return self(phi)[0]


def _lbfgsb(obj: _Objective, phi0, lower, maxiter, gtol, ftol):
    bounds = [(lo if np.isfinite(lo) else None, None) for lo in lower]

    def f(x):
        v, g = obj(x)
        return (1e300, g) if not np.isfinite(v) else (v, g)

    return scipy.optimize.minimize(f, phi0, jac=True, method="L-BFGS-B", bounds=bounds,
                                   options=dict(maxiter=maxiter, gtol=gtol, ftol=ftol, maxcor=20))


def _edge_probes(obj: _Objective, phi: np.ndarray, grad: np.ndarray, columns) -> list[np.ndarray]:
    """Points near a boundary optimum φ that may be better: for each column of Λ̃ whose diagonal is ≈ 0.

    A column c with c_diag = 0 gives the same covariance as -c, so both signs are stepped into the interior
    (first order: one of them descends unless ∂f/∂c_diag = 0). A column that is entirely zero has zero gradient
    by the same symmetry; it is probed along the diagonal and along the most negative curvature direction of
    f restricted to the column (finite differences of the gradient), which is feasible up to the sign.
    """
    out = []
    for col in columns:
        j = col[0]
        if phi[j] > EDGE_TOL:
            continue
        rest = phi[col[1:]]
        signs = (1.0, -1.0) if np.any(np.abs(rest) > 0) else (1.0,)
        for s in signs:
            for h in PROBE_STEPS:
                q = phi.copy()
                q[col[1:]] = s * rest
                q[j] = h
                out.append(q)
        if len(col) > 1 and not np.any(np.abs(rest) > 0):
            w, V = np.linalg.eigh(hessian_from_gradients(obj, phi, grad, col, FD_STEP))
            if w[0] < 0:
                v = V[:, 0] * (1.0 if V[0, 0] >= 0 else -1.0)
                for h in PROBE_STEPS:
                    q = phi.copy()
                    q[col] = h * v
                    out.append(q)
    return out


def _check(obj: _Objective, phi, fval, grad, lower, columns, optimizer_ok: bool, boundary_ok: bool,
           names) -> ConvergenceChecks:
    at_bound = (lower == 0.0) & (phi <= EDGE_TOL)
    # Below a zero diagonal a column only adds to the span of the later columns, so its off-diagonal entries
    # and those columns trade off without changing ΛΛᵀ (a flat direction by construction, not a failure): the
    # Hessian test uses the coordinates of the columns with a positive diagonal; the boundary probes cover the rest.
    redundant = np.zeros(phi.size, bool)
    for col in columns:
        if at_bound[col[0]]:
            redundant[col[1:]] = True
    free = np.flatnonzero(~at_bound & ~redundant)
    msgs = []
    if not optimizer_ok:
        msgs.append("the optimizer stopped before its convergence test held")
    sg, lo, hi = 0.0, np.nan, np.nan
    if free.size:
        H = hessian_from_gradients(obj, phi, grad, free, FD_STEP)
        w, V = np.linalg.eigh(H)
        lo, hi = float(w[0]), float(w[-1])
        scale = max(abs(hi), 1e-300)
        flat = np.abs(w) <= HESS_NEG_TOL * scale
        if lo < -HESS_NEG_TOL * scale:
            msgs.append(f"degenerate Hessian with {int(np.sum(w < -HESS_NEG_TOL * scale))} negative eigenvalues")
        elif flat.any():
            # name the parameters that move along the flat directions (e.g. a term confounded with fixed effects)
            load = np.abs(V[:, flat]).max(axis=1)
            which = sorted({names[int(free[k])] for k in np.flatnonzero(load > 0.3)})
            msgs.append("Hessian is numerically singular: parameters are not uniquely determined"
                        + (f" ({', '.join(which)})" if which else ""))
        else:
            C = np.linalg.cholesky(H)
            scaled = np.linalg.solve(C, grad[free])
            sg = float(np.max(np.abs(scaled)))
            if sg > GRAD_TOL:
                k = int(free[np.argmax(np.abs(scaled))])
                msgs.append(f"failed to converge with max|grad| = {sg:.3g} (tol = {GRAD_TOL}, component {names[k]})")
    inward = grad[at_bound] < 0
    if np.any(inward):
        big = np.abs(grad[at_bound][inward]).max() / max(1.0, abs(fval))
        if big > BOUNDARY_GRAD_TOL:
            boundary_ok = False
    if not boundary_ok:
        msgs.append("the criterion decreases into the interior from the boundary optimum")
    return ConvergenceChecks(bool(optimizer_ok), sg, lo, hi, bool(boundary_ok), int(at_bound.sum()), tuple(msgs))


def _optimize(obj: _Objective, phi0, lower, columns, maxiter, gtol, ftol):
    """L-BFGS-B with boundary probes and restarts. Returns (φ, f, ∇f, scipy result, restarts, boundary_ok)."""
    res = _lbfgsb(obj, phi0, lower, maxiter, gtol, ftol)
    phi, restarts, boundary_ok = np.asarray(res.x, float), 0, True
    fval, grad = obj(phi)
    while True:
        probes = _edge_probes(obj, phi, grad, columns)
        if not probes:
            break
        vals = [obj.value(q) for q in probes]
        k = int(np.argmin(vals))
        if not vals[k] < fval - REL_IMPROVEMENT * max(1.0, abs(fval)):
            break
        if restarts == MAX_RESTARTS:
            boundary_ok = False
            break
        restarts += 1
        res = _lbfgsb(obj, probes[k], lower, maxiter, gtol, ftol)
        phi = np.asarray(res.x, float)
        fval, grad = obj(phi)
    return phi, fval, grad, res, restarts, boundary_ok


def _start(obj: _Objective, layout, theta0, coords: _Coordinates):
    """φ0: the user's θ0 (converted), else the best of s·I over START_SCALES in standardized coordinates."""
    if theta0 is not None:
        return coords.phi_from_theta(theta0)
    eye = np.concatenate([np.where(r == c, 1.0, 0.0) for r, c in layout])
    cands = [s * eye for s in START_SCALES]
    vals = [obj.value(q) for q in cands]
    return cands[int(np.argmin(vals))]


# --------------------------------------------------------------------------------------------- fit
def _compile(obj: _Objective, cache: dict, x) -> float:
    """Compile the criterion (first call at x) once per model; the seconds it took (0 when already compiled)."""
    if cache["compile_s"] is not None:
        return 0.0
    t0 = time.perf_counter()
    jax.block_until_ready(obj.raw(x))
    cache["compile_s"] = time.perf_counter() - t0
    return cache["compile_s"]


def _minimize(obj: _Objective, x0, lower, layout, names, maxiter, gtol, ftol, failure: str):
    """The one optimize flow of ML, REML and Laplace ML: L-BFGS-B with boundary probes and restarts
    (``_optimize``), then lme4's convergence checks. failure: what a non-finite optimum means (the error text).
    Returns (x, fval, grad, res, restarts, checks)."""
    x, fval, grad, res, restarts, boundary_ok = _optimize(obj, x0, lower, _columns(layout), maxiter, gtol, ftol)
    if not np.isfinite(fval):
        raise FloatingPointError(failure)
    # the optimizer's own test: success, or an abnormal line-search end with a tiny projected gradient
    pg = np.where((x <= lower + 1e-12) & (grad > 0), 0.0, grad)
    opt_ok = bool(res.success) or float(np.max(np.abs(pg), initial=0.0)) < 1e-4 * max(1.0, abs(fval)) ** 0.5
    checks = _check(obj, x, fval, grad, lower, _columns(layout), opt_ok, boundary_ok, names)
    return x, fval, grad, res, restarts, checks


def profiled_deviance(model, theta, reml: bool = False) -> float:
    """lme4's profiled criterion at θ (its ``devfun``): the ML deviance, or the REML criterion if ``reml``.

    theta: (n_theta,) relative Cholesky factors in lme4's order (``fit.theta``; column-wise lower triangle per
    term). β and σ are profiled out. The lognormal Jacobian is not included (lme4's ``devfun`` on log y).
    """
    cache = _cache(model)
    theta = np.asarray(theta, dtype=float).reshape(-1)
    _, lower = _theta_layout(model)
    if theta.shape != lower.shape:
        raise ValueError(f"theta must have {lower.size} entries {_theta_names(model)}, got {theta.size}")
    npdt = np.dtype(jnp.dtype(model.dtype).name)
    flag = jax.device_put(np.asarray(1.0 if reml else 0.0, dtype=npdt))
    obj = _Objective(cache["fn"], cache["plan"], cache["consts"], flag, npdt, False)
    with blas_threads(cache["plan"].dense_size):
        return obj.value(cache["coords"].phi_from_theta(theta))


def fit_ml(model, reml: bool = False, *, theta0=None, maxiter: int = 2000, gtol: float = 1e-9,
           ftol: float = 1e-15, verbose: bool = False, compilation_cache=None) -> MLFit:
    """ML (``reml=False``) or REML fit on the profiled criterion; returns :class:`MLFit`.

    theta0: optional start (n_theta,), lme4's θ order (relative Cholesky factors, column-wise per term); default:
      the best of a few multiples of the identity in standardized coordinates (module docstring).
    ``fit.converged`` is True only when lme4's convergence checks hold (``fit.checks``); otherwise a warning says
    which check failed.
    compilation_cache: JAX's persistent compilation cache, as in ``sample()`` (None: lmmarg's default, on).
    """
    if not model.terms:
        raise ValueError("fit_ml needs at least one random-effect term; the formula has none")
    if model.family_spec.is_glmm:
        if reml:
            raise ValueError(f"REML is defined for Gaussian families; family {model.family!r} is fitted by "
                             "(Laplace) maximum likelihood, as glmer does: use reml=False")
        return _fit_laplace(model, theta0=theta0, maxiter=maxiter, verbose=verbose,
                            compilation_cache=compilation_cache)
    p = len(model.fixed_names)
    if reml and model.n_obs <= p:
        raise ValueError(f"REML needs more observations (N={model.n_obs}) than fixed effects (p={p})")
    check_residual(model, "fit_ml")
    persistent.apply(compilation_cache)
    cache = _cache(model)
    coords = cache["coords"]
    layout, lower = _theta_layout(model)
    if theta0 is not None:
        theta0 = np.asarray(theta0, dtype=float).reshape(-1)
        if theta0.shape != lower.shape:
            raise ValueError(f"theta0 must have {lower.size} entries {_theta_names(model)}, got {theta0.size}")
        if not np.isfinite(theta0).all():
            raise ValueError(f"theta0 must be finite, got {theta0}")
    plan, consts = cache["plan"], cache["consts"]
    npdt = np.dtype(jnp.dtype(model.dtype).name)
    flag = jax.device_put(np.asarray(1.0 if reml else 0.0, dtype=npdt))
    obj = _Objective(cache["fn"], plan, consts, flag, npdt, verbose)

    compile_s = _compile(obj, cache, np.concatenate([np.where(r == c, 1.0, 0.0) for r, c in layout]))
    t1 = time.perf_counter()
    with blas_threads(plan.dense_size):
        phi0 = _start(obj, layout, theta0, coords)
        phi, fval, grad, res, restarts, checks = _minimize(
            obj, phi0, lower, layout, _theta_names(model), maxiter, gtol, ftol,
            "fit_ml: the profiled criterion is not finite at the optimum; check the data for a constant response or "
            "columns of extreme scale")
    opt_s = time.perf_counter() - t1
    stats = jax.tree_util.tree_map(np.asarray, obj.raw(phi)[0][1])
    theta = coords.theta_from_phi(phi)
    return _assemble(model, reml, theta, stats, cache, checks, str(res.message), int(res.nit), obj.n_eval,
                     restarts, compile_s, opt_s)


def _vcov_se(S: np.ndarray, inner: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(vcov (p, p) = S inner Sᵀ, se (p,)) from the standardized covariance inner (p, p) and S (p, p).

    se_j = r_j sqrt((S' inner S'ᵀ)_jj) with S' = S / r_j by rows (r_j = max_k |S_jk|): finite even where vcov
    overflows (a covariate × 1e-160 has an SE ~1e159, a variance ~1e318: inf in vcov). NaN where the diagonal is
    negative or NaN (an indefinite Hessian, reported by the convergence checks). No numpy RuntimeWarnings."""
    r = np.max(np.abs(S), axis=1, initial=0.0)
    r = np.where(r > 0, r, 1.0)
    Sn = S / r[:, None]
    with np.errstate(over="ignore", invalid="ignore"):
        vcov = S @ inner @ S.T
        d = np.einsum("ij,jk,ik->i", Sn, inner, Sn)
        se = np.where(d >= 0, r * np.sqrt(np.where(d >= 0, d, 0.0)), np.nan)
    return vcov, se


def _assemble(model, reml, theta, s, cache, checks, message, nit, neval, restarts, compile_s, opt_s) -> MLFit:
    layout, lower = _theta_layout(model)
    dims = [t.d for t in model.terms]
    dt = model.dtype
    plan = cache["plan"]
    N, p = model.n_obs, len(model.fixed_names)
    S_X = cache["coords"].S_X
    Q = float(s["Q"])
    n = N - p if reml else N
    sigma2 = Q / n
    sigma = float(np.sqrt(sigma2))
    beta = S_X @ (np.asarray(cache["consts"]["beta0"], dtype=float) + np.asarray(s["delta"], dtype=float))
    Cxx = np.asarray(s["Cxx"], dtype=float)
    # (XᵀV⁻¹X)⁻¹ σ² = S_X (X̃ᵀV⁻¹X̃)⁻¹ S_Xᵀ σ²
    vcov, se = _vcov_se(S_X, sigma2 * np.linalg.inv(Cxx @ Cxx.T)) if p else (np.zeros((0, 0)), np.zeros(0))
    logdetA = float(s["logdetA"]) - 2.0 * cache["logdet_SX"]
    dev_ml = N * (1.0 + _LOG2PI + np.log(Q / N)) + float(s["logdetV"])   # ML deviance at the ML σ for this θ
    if reml:
        crit = (N - p) * (1.0 + _LOG2PI + np.log(sigma2)) + float(s["logdetV"]) + logdetA
        loglik, reml_crit = -0.5 * crit, crit
        # lme4's logLik(fit, REML=FALSE): ML deviance profiled over σ at the REML θ (β̂ is the same GLS)
        loglik_ml = -0.5 * dev_ml
    else:
        loglik = loglik_ml = -0.5 * dev_ml
        reml_crit = None
    loglik += model.log_jacobian
    loglik_ml += model.log_jacobian
    lams = [np.asarray(L) for L in _lambdas(np.asarray(theta, dtype=float), layout, dims)]
    cov, sd, corr = {}, {}, {}
    for t, L in zip(model.terms, lams):
        S = sigma2 * L @ L.T
        cov[t.name] = S
        sd[t.name] = np.sqrt(np.diag(S))
        with np.errstate(invalid="ignore", divide="ignore"):
            R = S / np.outer(sd[t.name], sd[t.name])
        R = np.where(np.isfinite(R), R, 0.0)
        np.fill_diagonal(R, 1.0)
        corr[t.name] = R
    npdt = np.dtype(jnp.dtype(dt).name)
    put = lambda a: jax.device_put(np.asarray(a, dtype=npdt))  # noqa: E731
    # conditional modes on the criterion's standardized plan: ũ for X̃, Z̃_l = Z_l S_l, then u_l = S_l ũ_l
    coords = cache["coords"]
    beta_t = np.asarray(cache["consts"]["beta0"], dtype=float) + np.asarray(s["delta"], dtype=float)
    lams_t = _lambdas(coords.phi_from_theta(theta), layout, dims)
    means = model.kernel("conditional_mean")(plan, put(beta_t), put(sigma), tuple(put(sigma * L) for L in lams_t))
    ranef = {t.name: np.asarray(mu, dtype=float) @ S.T for t, mu, S in zip(model.terms, means, coords.S_terms)}
    diag = theta[lower == 0.0]
    is_singular = bool(np.any(diag < _SINGULAR_TOL))
    if is_singular:
        warn_user("boundary (singular) fit: see help('isSingular')")
    if not checks.ok:
        warn_user("fit_ml: model failed to converge: " + "; ".join(checks.messages))
    return MLFit(model=model, reml=reml, beta=beta, se=se, sigma=sigma, cov=cov, sd=sd, corr=corr, ranef=ranef,
                 theta=theta, theta_names=_theta_names(model), loglik=float(loglik), loglik_ml=float(loglik_ml),
                 deviance=float(-2 * loglik_ml), reml_criterion=None if reml_crit is None else float(reml_crit),
                 is_singular=is_singular, converged=checks.ok, message=message, n_iter=nit, n_eval=neval,
                 time_compile_s=float(compile_s), time_optimize_s=float(opt_s), vcov=vcov, checks=checks,
                 n_restarts=restarts)


# --------------------------------------------------------------------------------------------- GLMM (Laplace)
def _build_laplace(model):
    """Jitted (plan, x, consts, flag) -> ((deviance, aux), gradient) of the Laplace criterion over x = [φ, δ]:
    φ standardized θ (Λ_l = S_l Λ̃_l), β = β_glm + S_β δ. glmer's nAGQ = 1 optimizes θ and β jointly, as here.

    S_β = S_X diag(c) is set per fit (``_beta_scales``; consts["S_X"] holds it). A family with a dispersion
    (negbinomial, gamma, beta) appends its log, relative to the moment start: dispersion = d0 exp(x[-1]); it is
    optimized jointly with θ and β, as glmmTMB does."""
    coords = _coordinates(model)
    layout, dims = coords.layout, coords.dims
    n_theta = sum(len(r) for r, _ in layout)
    lp = model.laplace_plan("all")
    X = np.asarray(model.design.X, dtype=np.float64)
    beta_glm = glm_fit(model.family_spec, X, np.asarray(model.y, float), model.trials, model.design.offset)
    npdt = np.dtype(jnp.dtype(model.dtype).name)
    put = lambda a: jax.device_put(np.asarray(a, dtype=npdt))  # noqa: E731
    has_disp = model.family_spec.dispersion is not None
    p = X.shape[1]
    eta_glm = X @ beta_glm + (0.0 if model.design.offset is None else model.design.offset)
    disp0 = dispersion_start(model.family_spec, model.y, family_mean(model.family_spec, eta_glm)) if has_disp else 1.0
    consts = dict(beta0=put(beta_glm), S_X=put(coords.S_X), S_terms=tuple(put(S) for S in coords.S_terms),
                  log_disp0=put(np.log(disp0)))

    def criterion(plan, x, c, flag):
        lams = _lambdas(x[:n_theta], layout, dims)
        lams = tuple(S @ L for S, L in zip(c["S_terms"], lams))
        lams = tuple(lams[h] for h in plan.gauss.marginalized)
        beta = c["beta0"] + c["S_X"] @ x[n_theta:n_theta + p]
        disp = jnp.exp(c["log_disp0"] + x[n_theta + p]) if has_disp else None
        ll, mode = laplace.log_marginal_warm(plan, beta, lams, flag, dispersion=disp)
        dev = -2.0 * ll
        return jnp.where(jnp.isfinite(dev), dev, jnp.inf), (beta, mode)

    return {"plan": lp, "consts": consts, "coords": coords, "beta_glm": beta_glm, "n_theta": n_theta,
            "n_disp": int(has_disp),
            "v0": tuple(put(np.zeros((t.n_groups, t.d))) for t in model.terms),
            "fn": xla.jit(jax.value_and_grad(criterion, argnums=1, has_aux=True), data=lp),
            "compile_s": None}


# The largest curvature, per observation, of the deviance in a standardized β coordinate that the Laplace fit
# leaves as it is: binary data (Fisher weights ≤ 1/4: curvature ≤ N/2) never reach it.
BETA_CURVATURE_MAX = 2.0


def _beta_scales(obj: _Objective, x0: np.ndarray, n_theta: int, S_X: np.ndarray, n_obs: int, npdt) -> np.ndarray:
    """S_β (p, p) = S_X diag(c), β = β_glm + S_β δ, put in obj.consts: c_j = sqrt(cap / h_j) where the deviance's
    curvature h_j in δ_j at the start x0 (δ = 0) exceeds cap = BETA_CURVATURE_MAX·N, else 1 (p forward differences).

    Large counts (y ~ 1e9, Fisher weight ~ 1e9 per observation) leave the β directions 1e9 times stiffer than θ:
    L-BFGS-B then never moves θ from its start and the Hessian test calls θ "not uniquely determined". The
    curvature is measured (not taken from the GLM weights) because a random intercept absorbs most of the
    information on the fixed intercept."""
    p = S_X.shape[0]
    v0, grad0 = obj(x0)
    if p == 0 or not np.isfinite(v0):
        return S_X
    h = np.diag(hessian_from_gradients(obj, x0, grad0, n_theta + np.arange(p), FD_STEP))
    cap = BETA_CURVATURE_MAX * n_obs
    big = np.isfinite(h) & (h > cap)
    if not big.any():
        return S_X
    c = np.where(big, np.sqrt(cap / np.where(big, h, 1.0)), 1.0)
    S_beta = S_X * c[None, :]
    obj.consts = {**obj.consts, "S_X": jax.device_put(np.asarray(S_beta, dtype=npdt))}
    return S_beta


class _WarmObjective(_Objective):
    """The Laplace criterion with the mode search of each evaluation started at the previous finite
    evaluation's mode (``flag`` carries it): the optimizer's steps are small, so Newton needs fewer iterations."""

    def raw(self, phi):
        out = super().raw(phi)
        (val, (_, mode)), _ = out
        if np.isfinite(float(val)):
            self.flag = mode
        return out


def _fit_laplace(model, *, theta0=None, maxiter: int = 2000, verbose: bool = False,
                 compilation_cache=None) -> MLFit:
    """Laplace ML of a GLMM (glmer, nAGQ = 1): L-BFGS-B over (θ, β) in standardized coordinates, boundary probes
    and restarts, then the convergence checks of the Gaussian fit on the joint Hessian. Separated data (infinite
    estimates, lmmarg.degenerate) are refused before any compilation."""
    check_separation(model, "fit_ml")
    persistent.apply(compilation_cache)
    cache = model.cache.laplace_ml
    if cache is None:
        check_address_space("fit_ml()")
        note_compiled_structure()
        cache = model.cache.laplace_ml = _build_laplace(model)
    coords, n_theta, plan = cache["coords"], cache["n_theta"], cache["plan"]
    layout, lower_t = _theta_layout(model)
    p = len(model.fixed_names)
    nd = cache["n_disp"]
    lower = np.concatenate([lower_t, np.full(p + nd, -np.inf)])
    npdt = np.dtype(jnp.dtype(model.dtype).name)
    obj = _WarmObjective(cache["fn"], plan, cache["consts"], cache["v0"], npdt, verbose)
    eye = np.concatenate([np.where(r == c, 1.0, 0.0) for r, c in layout])
    compile_s = _compile(obj, cache, np.concatenate([eye, np.zeros(p + nd)]))
    t1 = time.perf_counter()
    names = _theta_names(model) + [f"beta.{n}" for n in model.fixed_names] + \
        ([f"log({model.family_spec.dispersion})"] if nd else [])
    with blas_threads(plan.dense_size):
        if theta0 is not None:
            theta0 = np.asarray(theta0, dtype=float).reshape(-1)
            if theta0.shape != lower_t.shape:
                raise ValueError(f"theta0 must have {lower_t.size} entries {_theta_names(model)}, got {theta0.size}")
            x0 = np.concatenate([coords.phi_from_theta(theta0), np.zeros(p + nd)])
        else:
            cands = [np.concatenate([s * eye, np.zeros(p + nd)]) for s in START_SCALES]
            x0 = cands[int(np.argmin([obj.value(q) for q in cands]))]
        S_beta = _beta_scales(obj, x0, n_theta, coords.S_X, model.n_obs, npdt)
        x, fval, grad, res, restarts, checks = _minimize(
            obj, x0, lower, layout, names, maxiter, 1e-9, 1e-15,
            "fit_ml: the Laplace criterion is not finite at the optimum (the conditional mode search failed); check "
            "the data for complete separation")
        # standard errors of β: the β block of the inverse Hessian of the deviance / 2 (glmer's use.hessian)
        H = hessian_from_gradients(obj, x, grad, np.arange(x.size), FD_STEP, central=True)
        free = np.flatnonzero(~((lower == 0.0) & (x <= EDGE_TOL)))
        Hf = H[np.ix_(free, free)]
        try:
            cov_x = np.full((x.size, x.size), np.nan)
            cov_x[np.ix_(free, free)] = 2.0 * np.linalg.inv(Hf)
            vcov, se = _vcov_se(S_beta, cov_x[n_theta:n_theta + p, n_theta:n_theta + p])
        except np.linalg.LinAlgError:
            vcov, se = np.full((p, p), np.nan), np.full(p, np.nan)
    opt_s = time.perf_counter() - t1
    (_, (beta, mode)), _ = obj.raw(x)
    beta = np.asarray(beta, dtype=float)
    theta = coords.theta_from_phi(x[:n_theta])
    dims = [t.d for t in model.terms]
    lams = [np.asarray(L) for L in _lambdas(np.asarray(theta, dtype=float), layout, dims)]
    cov, sd, corr = {}, {}, {}
    for t, L in zip(model.terms, lams):
        S = L @ L.T
        cov[t.name], sd[t.name] = S, np.sqrt(np.diag(S))
        with np.errstate(invalid="ignore", divide="ignore"):
            R = S / np.outer(sd[t.name], sd[t.name])
        R = np.where(np.isfinite(R), R, 0.0)
        np.fill_diagonal(R, 1.0)
        corr[t.name] = R
    # conditional modes from the criterion's own mode at the optimum (within 1e-8; no further kernel to compile),
    # in the criterion's coordinates u = v (S Λ̃)ᵀ
    lams_std = _lambdas(np.asarray(x[:n_theta], dtype=float), layout, dims)
    ranef = {t.name: np.asarray(v, dtype=float) @ (S @ L).T
             for t, v, S, L in zip(model.terms, mode, coords.S_terms, lams_std)}
    loglik = -0.5 * fval
    dispersion = float(np.exp(float(cache["consts"]["log_disp0"]) + x[-1])) if nd else None
    is_singular = bool(np.any(theta[lower_t == 0.0] < _SINGULAR_TOL))
    if is_singular:
        warn_user("boundary (singular) fit: see help('isSingular')")
    if not checks.ok:
        warn_user("fit_ml: model failed to converge: " + "; ".join(checks.messages))
    return MLFit(model=model, reml=False, beta=beta, se=se, sigma=None, cov=cov, sd=sd,
                 corr=corr, ranef=ranef, theta=theta, theta_names=_theta_names(model), loglik=float(loglik),
                 loglik_ml=float(loglik), deviance=float(fval), reml_criterion=None, is_singular=is_singular,
                 converged=checks.ok, message=str(res.message), n_iter=int(res.nit), n_eval=obj.n_eval,
                 time_compile_s=float(compile_s), time_optimize_s=float(opt_s), vcov=vcov, checks=checks,
                 n_restarts=restarts, dispersion=dispersion)
