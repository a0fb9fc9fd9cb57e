r"""Laplace-marginalized GLMMs: bernoulli, binomial, poisson, negbinomial, gamma and beta responses on the Gaussian
engine.

Model (marginalized classes l, standardized effects v_l ~ N(0, I), u_l = Lambda_l v_l):

    eta = X beta + offset + sum_l Z_l u_l,      y_i ~ p(y_i | eta_i)  (lmmarg.families).

The Laplace approximation at the conditional mode v^ of f(v) = sum_i log p(y_i | eta_i(v)) - |v|^2 / 2 is

    log p(y | beta, Sigma) ~ f(v^) - 1/2 log|I + Zt^T W^ Zt|,   Zt = [Z_l Lambda_l]_l,

with W^ the Fisher weights at eta(v^): glmer's nAGQ = 1 criterion (its logLik, binomial coefficients included).

(For probit, glmer's determinant uses the Fisher weights, not the observed information; so do we. The Newton
steps and the Laplace Gaussian of the draws use the observed information, the true curvature at the mode.
The families with a dispersion parameter (negbinomial, gamma, beta) use the observed information in the
determinant too: glmmTMB's definition, ``families.OBSERVED_LAPLACE``.)

**The dispersion** (negbinomial's shape, gamma's shape, beta's phi) is an argument of every kernel,
``dispersion=`` (a traced scalar > 0, differentiable like beta and the scales; None for the families without one).
It is stored in the plan's ``dispersion`` leaf (``with_dispersion``) for the per-observation pieces.

**The mode** (PIRLS): a Newton step from v is the Gaussian conditional mean of v given the
working residual r = Zt v + s / w with per-observation precisions w (s the score): exactly the engine's
``weighted_solve``, so every step uses the same tree and dense-Schur elimination as the Gaussian model and costs
one factorization, linear in N for nested terms. Steps are halved while f decreases (as lme4's PIRLS does).

**Gradients** by implicit differentiation, not by unrolling the loop: the loop runs on stopped inputs, then one
more step N(v*, theta) is taken differentiably from its result. At the root G(v*, theta) = 0 of the stationarity
condition, dN/dtheta = F^{-1} dG/dtheta = dv^/dtheta (the Newton map's own Jacobian in v vanishes there), so the
derivative of f(N(v*, theta)) - 1/2 log|F(N(v*, theta), theta)| is the exact derivative of the Laplace
criterion. Cost per value-and-gradient: the loop's factorizations (forward only) plus two differentiated ones.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .. import families
from ..families import Family
from .kernels import term_shape, weighted_sample, weighted_solve, weighted_transform
from .plan import Plan

__all__ = ["LaplacePlan", "build_laplace_plan", "conditional_mode", "log_marginal", "conditional_sample",
           "conditional_modes", "laplace_centred", "log_marginal_warm", "predictive_pieces", "ModeInfo",
           "with_dispersion",
           "MAX_NEWTON", "MAX_HALVINGS"]

MAX_NEWTON = 100        # Newton/PIRLS iterations per mode (typically 4-8 from v = 0)
MAX_HALVINGS = 30       # step halvings per iteration before the step is taken as is
# Convergence: a full (unhalved) Newton step moves no v entry by more than V_TOL; the step halving accepts a step
# whose objective is no lower than f - F_TOL (1 + |f|). Newton converges quadratically (observed-information
# weights), so after a step of 1e-6 the mode is within ~1e-12, and every consumer takes one more Newton step from
# it (the differentiable step of log_marginal, the polish of conditional_modes, the draw's mean) to ~1e-16.
_TOLS = {"float64": (1e-12, 1e-4), "float32": (1e-6, 1e-3)}


@dataclass(frozen=True, eq=False)
class LaplacePlan:
    """What the Laplace kernels need (a JAX pytree): the Gaussian engine's plan (built for per-observation
    weights) and the data of the likelihood.

    gauss: Plan; X (N, p); y (N,) successes / counts (0/1 for bernoulli); trials (N,) (ones unless binomial);
    Z: per marginalized class (N, d_l) and codes (N,) int32 in ``gauss.marginalized`` order; offset (N,) the
    formula's offset or None; ref (N,) a reference linear predictor per observation (log y for a poisson count
    y > 0, else 0); log_norm () the constant of log p (log C(n, y), -log y!) plus sum_i log p(y_i | ref_i) without
    it, so that log p = ``_log_lik_rel`` + log_norm; dispersion () the family's dispersion (1 until
    ``with_dispersion`` sets it; unused by the families without one).
    Static: family (Family).

    Why the reference: for large counts (y ~ 1e9) y eta and exp(eta) are each ~2e10 per observation and cancel
    in log p; summed over N they swamp the O(1) differences that decide the mode and the SDs (the PIRLS step
    test compared changes of ~1 against a slack of 1e-12 |f| ~ 4). Relative to the saturated predictor each
    observation contributes y ((eta - ref) - expm1(eta - ref)) ~ -(y - mu)^2 / (2y), computed without cancellation.
    """

    gauss: Plan
    X: jax.Array
    y: jax.Array
    trials: jax.Array
    Z: tuple
    codes: tuple
    offset: Optional[jax.Array]
    ref: jax.Array
    log_norm: jax.Array
    dispersion: jax.Array
    family: Family = Family("bernoulli", "logit")

    @property
    def dtype(self):
        return self.gauss.dtype

    @property
    def dense_size(self) -> int:
        return self.gauss.dense_size

    @property
    def n_obs(self) -> int:
        return self.gauss.n_obs


jax.tree_util.register_dataclass(LaplacePlan, data_fields=["gauss", "X", "y", "trials", "Z", "codes", "offset",
                                                           "ref", "log_norm", "dispersion"],
                                 meta_fields=["family"])


def with_dispersion(lp: LaplacePlan, dispersion) -> tuple[LaplacePlan, jax.Array]:
    """(lp with its dispersion leaf set, ok ()): a family with a dispersion needs a finite value > 0 (an invalid
    one is replaced by 1 and reported by ok = False, so the kernels return -inf / NaN); None is refused for such a
    family (a ValueError while tracing) and ignored for the others."""
    ok = jnp.ones((), bool)
    if lp.family.dispersion is None:
        return lp, ok
    if dispersion is None:
        raise ValueError(f"family {lp.family.name!r} needs its dispersion: pass dispersion= "
                         f"(its {lp.family.dispersion!r})")
    d = jnp.asarray(dispersion, lp.dtype).reshape(())
    ok = jnp.isfinite(d) & (d > 0)
    return dataclasses.replace(lp, dispersion=jnp.where(ok, d, 1.0)), ok


def build_laplace_plan(gauss: Plan, family: Family, X, y, trials, classes, offset=None) -> LaplacePlan:
    """The Laplace plan over a per-observation-weight Gaussian plan; classes: every ClassSpec (term order)."""
    dt = gauss.dtype
    marg = gauss.marginalized
    y = np.asarray(y, np.float64)
    trials = np.asarray(trials, np.float64)
    ref, ref_const = _reference(family, y, trials)
    return LaplacePlan(
        gauss=gauss, X=jnp.asarray(X, dt), y=jnp.asarray(y, dt), trials=jnp.asarray(trials, dt),
        Z=tuple(jnp.asarray(classes[h].Z, dt).reshape(len(y), -1) for h in marg),
        codes=tuple(jnp.asarray(classes[h].codes, jnp.int32) for h in marg),
        offset=None if offset is None else jnp.asarray(offset, dt), ref=jnp.asarray(ref, dt),
        log_norm=jnp.asarray(ref_const, dt), dispersion=jnp.ones((), dt), family=family)


# Above this count, -log y! + y log y - y is Stirling's series (error < 1e-14); gammaln itself would cancel away
# ~eps y log y (at y = 1e18: thousands) of a value that is only -log(2 pi y) / 2.
_STIRLING_MIN = 1e3


def _reference(family: Family, y: np.ndarray, trials: np.ndarray) -> tuple[np.ndarray, float]:
    """(ref (N,), constant ()): the reference predictor of ``_log_lik_rel`` and log_norm + sum_i log p(y_i | ref_i)
    (without log_norm), in float64 on the host. Poisson: ref = log y (y > 0), where log p(y | ref) = y log y - y."""
    if family.name != "poisson":
        return np.zeros_like(y), families.log_norm(family, y, trials)
    from scipy.special import gammaln
    pos = y > 0
    ref = np.where(pos, np.log(np.where(pos, y, 1.0)), 0.0)
    big = y >= _STIRLING_MIN
    yb = np.where(big, y, _STIRLING_MIN)
    stirling = -0.5 * np.log(2 * np.pi * yb) - 1.0 / (12 * yb) + 1.0 / (360 * yb ** 3)
    small = -gammaln(y + 1.0) + np.where(pos, y * ref, 0.0) - y
    return ref, float(np.sum(np.where(big, stirling, small)))


def _log_lik_rel(lp: LaplacePlan, eta):
    """(N,) log p(y_i | eta_i) - log p(y_i | ref_i), both without log_norm (``LaplacePlan``). Poisson:
    y ((eta - ref) - expm1(eta - ref)) for y > 0, -exp(eta) for y = 0; other families: ``families.log_lik``."""
    if lp.family.name != "poisson":
        return families.log_lik(lp.family, lp.y, lp.trials, eta, lp.dispersion)
    d = eta - lp.ref
    return jnp.where(lp.y > 0, lp.y * (d - jnp.expm1(d)), -jnp.exp(eta))


class ModeInfo(NamedTuple):
    """Diagnostics of the mode search: iterations (), converged () bool, objective f(v^) ()."""

    iterations: jax.Array
    converged: jax.Array
    objective: jax.Array


# --------------------------------------------------------------------------- pieces


def _sw(lp: LaplacePlan, eta, observed: bool = False):
    """families.score_weight for the plan's data and dispersion."""
    return families.score_weight(lp.family, lp.y, lp.trials, eta, observed=observed, disp=lp.dispersion)


def _prepare(lp: LaplacePlan, beta, scales, offset):
    """(beta (p,), lams per class, fixed part of eta (N,), ok) with invalid inputs replaced by safe values."""
    dt = lp.dtype
    beta = jnp.asarray(beta, dt).reshape(lp.gauss.n_fixed)
    if len(scales) != len(lp.Z):
        raise ValueError(f"scales must have one entry per marginalized class ({len(lp.Z)}), got {len(scales)}")
    lams = tuple(jnp.asarray(L, dt).reshape(z.shape[1], z.shape[1]) for L, z in zip(scales, lp.Z))
    ok = jnp.all(jnp.isfinite(beta))
    for L in lams:
        ok = ok & jnp.all(jnp.isfinite(L))
    beta = jnp.where(ok, beta, 0.0)
    lams = tuple(jnp.where(ok, L, 0.0) for L in lams)
    eta0 = lp.X @ beta
    for off in (lp.offset, offset):
        if off is not None:
            off = jnp.asarray(off, dt).reshape(-1)
            ok = ok & jnp.all(jnp.isfinite(off))
            eta0 = eta0 + jnp.where(ok, off, 0.0)
    return beta, lams, eta0, ok


def _random_part(lp: LaplacePlan, lams, vs):
    """sum_l Z_l (v_l Lambda_l^T)[codes_l]: (N,)."""
    out = jnp.zeros(lp.y.shape, lp.dtype)
    for Z, codes, L, v in zip(lp.Z, lp.codes, lams, vs):
        out = out + jnp.sum(Z * (v @ L.T)[codes], axis=-1)
    return out


def _objective(lp: LaplacePlan, eta, vs):
    """f(v) = sum_i log p(y_i | eta_i) - |v|^2 / 2 (without the constant log_norm; relative to ``lp.ref``)."""
    pen = sum((jnp.sum(v * v) for v in vs), jnp.zeros((), lp.dtype))
    return jnp.sum(_log_lik_rel(lp, eta)) - 0.5 * pen


def _newton(lp: LaplacePlan, lams, eta0, vs):
    """One Newton step from vs (observed-information weights): (new vs, log|F| at those weights, ok)."""
    zu = _random_part(lp, lams, vs)
    s, w = _sw(lp, eta0 + zu, observed=True)
    return weighted_solve(lp.gauss, zu + s / w, w, lams)


def _zeros(lp: LaplacePlan):
    return tuple(jnp.zeros(term_shape(lp.gauss, h), lp.dtype) for h in range(len(lp.Z)))


def _mode_loop(lp: LaplacePlan, lams, eta0, v0):
    """Damped Newton from v0 to the mode (no derivatives flow through): (vs, ModeInfo)."""
    ftol, vtol = _TOLS[lp.gauss.dtype_name]

    def f_at(vs):
        return _objective(lp, eta0 + _random_part(lp, lams, vs), vs)

    def body(state):
        it, vs, f, _ = state
        cand = _newton(lp, lams, eta0, vs)[0]
        t, new, fn = _halved_step(f_at, vs, cand, f, ftol * (1.0 + jnp.abs(f)))
        step = jnp.max(jnp.stack([jnp.max(jnp.abs(a - b)) for a, b in zip(new, vs)]))
        done = (t == 1.0) & (step <= vtol)
        return it + 1, new, fn, done

    def cond(state):
        it, _, f, done = state
        return (it < MAX_NEWTON) & ~done & jnp.isfinite(f)

    f0 = f_at(v0)
    it, vs, f, done = lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), v0, f0, jnp.zeros((), bool)))
    return vs, ModeInfo(it, done, f)


def _halved_step(f_at, cur, cand, f, slack):
    """The step cur -> cand, halved while the objective ends below f - slack (or is NaN): (t, vs, f(vs)) with t
    the fraction of the step taken."""
    def cond(st):
        t, _, ft = st
        return (t > 0.5 ** MAX_HALVINGS) & ~(ft >= f - slack)

    def body(st):
        t = 0.5 * st[0]
        trial = tuple(c + t * (n - c) for c, n in zip(cur, cand))
        return t, trial, f_at(trial)

    return lax.while_loop(cond, body, (jnp.ones((), f.dtype), cand, f_at(cand)))


# --------------------------------------------------------------------------- public kernels


def conditional_mode(lp: LaplacePlan, beta, scales, offset=None, dispersion=None):
    """The conditional mode: (v^ per marginalized class (G_l, d_l), standardized, u_l = v_l Lambda_l^T;
    ModeInfo).  No derivatives (use :func:`log_marginal` for those)."""
    lp, _ = with_dispersion(lp, dispersion)
    beta, lams, eta0, ok = _prepare(lp, beta, scales, offset)
    lams, eta0 = lax.stop_gradient(lams), lax.stop_gradient(eta0)
    v_star, info = _mode_loop(lp, lams, eta0, _zeros(lp))
    return _newton(lp, lams, eta0, v_star)[0], info      # polished (see _TOLS)


def log_marginal(lp: LaplacePlan, beta, scales, offset=None, dispersion=None):
    """Laplace approximation of log p(y | beta, Sigma) (glmer's nAGQ = 1 logLik) -> scalar; -inf if invalid.

    beta (p,); scales: Lambda_l (d_l, d_l) per marginalized class (Sigma_l = Lambda_l Lambda_l^T); offset (N,) of
    terms left to HMC or None; dispersion () the family's shape / phi (None for the families without one).
    Differentiable (implicitly through the mode, see the module docstring), in the dispersion too.
    """
    lp, okd = with_dispersion(lp, dispersion)
    beta, lams, eta0, ok = _prepare(lp, beta, scales, offset)
    ok = ok & okd
    if not lp.Z:  # nothing marginalized: the plain likelihood (every term's effects are in the offset)
        val = jnp.sum(_log_lik_rel(lp, eta0)) + lp.log_norm
        return jnp.where(ok & jnp.isfinite(val), val, -jnp.inf)
    return _laplace_value(lp, lams, eta0, ok, _zeros(lp))[0]


def log_marginal_warm(lp: LaplacePlan, beta, scales, v0, dispersion=None):
    """:func:`log_marginal` with the mode search started at v0 (standardized, per class), e.g. the mode of the
    previous call of a sequential optimizer: (value, mode v^ per class, no derivatives)."""
    lp, okd = with_dispersion(lp, dispersion)
    beta, lams, eta0, ok = _prepare(lp, beta, scales, None)
    ok = ok & okd
    val, v_star = _laplace_value(lp, lams, eta0, ok, tuple(lax.stop_gradient(v) for v in v0))
    return val, v_star


def _laplace_value(lp: LaplacePlan, lams, eta0, ok, v0):
    """(Laplace value, converged mode) from the start v0; the value is differentiable in lams and eta0."""
    v_star, info = _mode_loop(lp, lax.stop_gradient(lams), lax.stop_gradient(eta0), v0)
    v_star = lax.stop_gradient(v_star)
    v_hat, _, ok1 = _newton(lp, lams, eta0, v_star)        # = v_star in value; carries dv^/dtheta
    eta = eta0 + _random_part(lp, lams, v_hat)
    _, w = _sw(lp, eta, observed=lp.family.name in families.OBSERVED_LAPLACE)
    zero = jnp.zeros_like(eta)
    _, logdet, ok2 = weighted_solve(lp.gauss, zero, w, lams)
    val = _objective(lp, eta, v_hat) + lp.log_norm - 0.5 * logdet
    good = ok & ok1 & ok2 & info.converged & jnp.isfinite(val)
    return jnp.where(good, val, -jnp.inf), v_star


def conditional_sample(lp: LaplacePlan, key, beta, scales, offset=None, dispersion=None):
    """One draw of u from the Laplace Gaussian N(u^, Lambda F^-1 Lambda^T) at the mode: per marginalized class
    (G_l, d_l) in caller order (NaN if the mode search failed)."""
    lp, okd = with_dispersion(lp, dispersion)
    beta, lams, eta0, ok = _prepare(lp, beta, scales, offset)
    ok = ok & okd
    v_star, info = _mode_loop(lp, lams, eta0, _zeros(lp))
    zu = _random_part(lp, lams, v_star)
    s, w = _sw(lp, eta0 + zu, observed=True)
    draws = weighted_sample(lp.gauss, key, zu + s / w, w, lams)
    good = ok & info.converged
    return tuple(jnp.where(good, u, jnp.nan) for u in draws)


def conditional_modes(lp: LaplacePlan, beta, scales, offset=None, dispersion=None):
    """u^ per marginalized class (G_l, d_l) (lme4's ranef for a GLMM), NaN if the mode search failed."""
    lp, okd = with_dispersion(lp, dispersion)
    beta, lams, eta0, ok = _prepare(lp, beta, scales, offset)
    ok = ok & okd
    v_star, info = _mode_loop(lp, lams, eta0, _zeros(lp))
    v_star = _newton(lp, lams, eta0, v_star)[0]          # polish (see _TOLS)
    good = ok & info.converged
    return tuple(jnp.where(good, v @ L.T, jnp.nan) for v, L in zip(v_star, lams))


def laplace_centred(lp: LaplacePlan, beta, scales, eps, offset=None, dispersion=None):
    """The exact joint model in Laplace-centred coordinates (``parameterization="laplace"``).

    The random effects are v = m(theta) + L(theta)^{-T} eps with m the conditional mode (one differentiable Newton
    step from the converged loop) and F = L L^T the curvature there; any deterministic m, L keeps the posterior
    exact, and where the Laplace approximation is good eps | y, theta is close to N(0, I) (no funnel).
    eps: per marginalized class (G_l, d_l). Returns (log p(y | v) - |v|^2 / 2 - log|F| / 2 + |eps|^2 / 2, i.e.
    the log joint of (y, v) with the Jacobian of eps -> v, less eps's own N(0, I) log density (the sampler's
    prior on eps); u per class (G_l, d_l) = v_l Lambda_l^T). -inf for invalid inputs or a failed mode search.
    """
    lp, okd = with_dispersion(lp, dispersion)
    beta, lams, eta0, ok = _prepare(lp, beta, scales, offset)
    ok = ok & okd
    v_star, info = _mode_loop(lp, lax.stop_gradient(lams), lax.stop_gradient(eta0), _zeros(lp))
    v_hat = _newton(lp, lams, eta0, lax.stop_gradient(v_star))[0]
    zu = _random_part(lp, lams, v_hat)
    s, w = _sw(lp, eta0 + zu, observed=True)
    vs, logdet, ok2 = weighted_transform(lp.gauss, zu + s / w, w, lams, eps)
    eta = eta0 + _random_part(lp, lams, vs)
    e2 = sum((jnp.sum(jnp.asarray(e) ** 2) for e in eps), jnp.zeros((), lp.dtype))
    val = _objective(lp, eta, vs) + lp.log_norm - 0.5 * logdet + 0.5 * e2
    good = ok & ok2 & info.converged & jnp.isfinite(val)
    return jnp.where(good, val, -jnp.inf), tuple(v @ L.T for v, L in zip(vs, lams))


def predictive_pieces(lp: LaplacePlan, beta, scales, offset=None, dispersion=None):
    """Per observation, what the integrated leave-one-out density needs (lmmarg.loo): (eta^ (N,) the linear
    predictor at the mode, h (N,) its Laplace posterior variance z~_i^T F^{-1} z~_i, s (N,) the score and
    w (N,) the Newton weight there), F with the Newton weights.  h is the gradient of log|F| in w (one reverse
    pass: d log|F| / d w_i = z~_i^T F^{-1} z~_i), so no F^{-1} is formed."""
    lp, okd = with_dispersion(lp, dispersion)
    beta, lams, eta0, ok = _prepare(lp, beta, scales, offset)
    ok = ok & okd
    if not lp.Z:
        eta = eta0
        s, w = _sw(lp, eta, observed=True)
        return eta, jnp.zeros_like(eta), s, w
    v_star, info = _mode_loop(lp, lams, eta0, _zeros(lp))
    v_star = _newton(lp, lams, eta0, v_star)[0]          # polished (see _TOLS)
    eta = eta0 + _random_part(lp, lams, v_star)
    s, w = _sw(lp, eta, observed=True)
    zero = jnp.zeros_like(eta)
    h = jax.grad(lambda w_: weighted_solve(lp.gauss, zero, w_, lams)[1])(w)
    bad = ~(ok & info.converged)
    return jnp.where(bad, jnp.nan, eta), h, s, w
