"""Data for which a model's likelihood has no maximum: the checks shared by ``fit_ml``, ``sample``, ``fit_map`` and
``fit_vi``.

* **A response without residual variation** (Gaussian families): the fixed effects reproduce y exactly (a constant
  response, or y = Xb), so the likelihood grows without bound as σ -> 0. No estimate exists, and no posterior
  either (∫ σ^-N p(σ) dσ diverges at 0 for every prior with a positive density there): every method refuses
  (``check_residual``).
* **Separation** (bernoulli, binomial, poisson, negbinomial): a direction d of the fixed effects with x_i·d ≥ 0 wherever
  y_i = n_i (all successes), x_i·d ≤ 0 wherever y_i = 0 and x_i·d = 0 elsewhere (strict somewhere). The
  likelihood then increases along d for ever: the ML estimates are infinite (an all-zero response is the case
  d = -intercept). ``fit_ml`` refuses; ``sample`` warns (a proper prior keeps the posterior proper, but those
  coefficients are informed by the prior alone) and starts its chains at β = 0 instead of the GLM "estimate"
  (|η| ~ 30 and coefficients like 1e4, where the Laplace mode search fails). ``separation`` finds such a
  direction by a linear program (Konis 2007, safeBinaryRegression), with the fewest predictors in L1 norm: the
  predictors to name.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.optimize

from .design import DesignError
from .families import glm_fit, mean as family_mean

__all__ = ["Separation", "separation", "check_residual", "check_separation", "separation_message",
           "check_sampler_scales"]

# The linear program runs only when the GLM fit without random effects (lmmarg.families.glm_fit) has a fitted
# mean within this of its bound (0, or n for binomial): separation drives the separated rows' fitted means there
# (its IRLS stops at |η| = 30 for logit/probit: 1e-13), and the screen costs nothing more than that fit.
SCREEN_TOL = 1e-6
# A direction coefficient below this fraction of the largest is not counted as a predictor of the separation.
SUPPORT_TOL = 1e-7


# The sampler's plan (lmmarg.marginal.plan) holds sums of squares and cross-products of the raw columns of X and Z:
# a column whose largest |value| is below sqrt(tiny) * SCALE_MARGIN has squares in the subnormal range (float64:
# |x| < 1.5e-150), where they lose their digits. fit_ml builds its own plan on standardized columns and is exact.
SCALE_MARGIN = 1e4


class Separation(NamedTuple):
    """A direction along which the likelihood increases without bound.

    columns: the fixed-effect columns of the direction (fewest in L1 norm of the RMS-scaled columns);
    direction: (p,) the direction on the user's columns (``fixed_names`` order); rows: how many observations it
    predicts perfectly (x_i·d ≠ 0); all_bound: the response is 0 (or n) in every row."""

    columns: list
    direction: np.ndarray
    rows: int
    all_bound: bool


def check_residual(model, caller: str) -> None:
    """Raise a ValueError when a Gaussian-family response is reproduced exactly by the fixed effects (a constant
    response or y = Xb: residual SD 0, so neither the likelihood nor the posterior has a maximum or a finite mass
    near σ = 0). caller: the method named in the message ("fit_ml", "sample", ...). No-op for GLMM families."""
    if model.family_spec.is_glmm:
        return
    if model.statistics is not None:
        _check_residual_from_statistics(model, caller)
        return
    X = np.asarray(model.design.X, dtype=np.float64)
    y = np.asarray(model.y, dtype=np.float64)
    scale = max(float(np.max(np.abs(y), initial=0.0)), np.finfo(float).tiny)
    with np.errstate(all="ignore"):
        r = y - X @ np.linalg.lstsq(X, y, rcond=None)[0] if X.shape[1] else y
    if float(np.max(np.abs(r), initial=0.0)) <= 1e-10 * scale:
        what = "constant" if np.ptp(y) <= 1e-12 * scale else "fitted exactly by the fixed effects"
        raise ValueError(f"{caller}: the response {model.design.response!r} is {what} (residual SD 0), so the "
                         "likelihood has no maximum and the posterior of sigma piles up at 0; check the data")


def _check_residual_from_statistics(model, caller: str) -> None:
    """check_residual from the sums: the residual sum of squares at the OLS β against n (max |y|)²."""
    st = model.statistics
    my = st.moments.y
    scale = max(abs(float(my.min[0])), abs(float(my.max[0])), np.finfo(float).tiny)
    rss = max(float(st.recentred(st.ols_beta()).rr), 0.0)
    if rss <= st.n_obs * (1e-10 * scale) ** 2:
        what = "constant" if float(my.max[0] - my.min[0]) <= 1e-12 * scale else "fitted exactly by the fixed effects"
        raise ValueError(f"{caller}: the response {model.design.response!r} is {what} (residual SD 0), so the "
                         "likelihood has no maximum and the posterior of sigma piles up at 0; check the data")


def separation(model) -> Separation | None:
    """The separation of a bernoulli / binomial / poisson model's fixed effects, or None (always None for a
    Gaussian family). Cost: one GLM fit; the linear program (p variables, N constraints) only when the GLM fit
    runs to its bound (SCREEN_TOL)."""
    fam = model.family_spec
    if not fam.is_glmm or not model.fixed_names or fam.name in ("gamma", "beta"):
        return None   # gamma and beta responses lie strictly inside their range: no mean at its bound
    X = np.asarray(model.design.X, dtype=np.float64)
    y = np.asarray(model.y, dtype=np.float64)
    n = np.asarray(model.trials, dtype=np.float64)
    off = model.design.offset
    with np.errstate(all="ignore"):
        beta = glm_fit(fam, X, y, n, off)
        mu = family_mean(fam, X @ beta + (0.0 if off is None else np.asarray(off, np.float64)))
    # the fitted mean's distance to its bound, per trial (poisson: the rate itself)
    near = mu < SCREEN_TOL if fam.name in ("poisson", "negbinomial") else (mu < SCREEN_TOL) | (mu > 1 - SCREEN_TOL)
    if not np.any(near | ~np.isfinite(mu)):
        return None
    return _separating_direction(fam.name, X, y, n, list(model.fixed_names))


def _separating_direction(family: str, X, y, n, names) -> Separation | None:
    """The L1-smallest d (on RMS-scaled columns) with s_i x_i·d ≥ 0 (y_i at a bound: s = +1 all successes, -1
    none), x_i·d = 0 (y_i inside), Σ s_i x_i·d ≥ 1; None when no such d exists (the LP is infeasible)."""
    informative = n > 0
    X, y, n = X[informative], y[informative], n[informative]
    if family in ("poisson", "negbinomial"):
        s = np.where(y == 0, -1.0, 0.0)
    else:
        s = np.where(y == 0, -1.0, np.where(y == n, 1.0, 0.0))
    rms = np.sqrt(np.mean(X ** 2, axis=0))
    rms = np.where(rms > 0, rms, 1.0)
    Xs = X / rms
    # duplicated rows add nothing to the program (factor designs have few distinct rows)
    rows, _ = np.unique(np.column_stack([Xs, s]), axis=0, return_counts=True)
    Xu, su = rows[:, :-1], rows[:, -1]
    p = Xu.shape[1]
    ineq, eq = su != 0, su == 0
    A = su[ineq, None] * Xu[ineq]                              # s_i x_i, want A d ≥ 0 and Σ A d ≥ 1
    split = lambda M: np.hstack([M, -M])                       # noqa: E731 -- d = d⁺ - d⁻, both ≥ 0
    A_ub = np.vstack([-split(A), -split(A.sum(0, keepdims=True))])
    b_ub = np.concatenate([np.zeros(A.shape[0]), [-1.0]])
    A_eq = split(Xu[eq]) if eq.any() else None
    b_eq = np.zeros(int(eq.sum())) if eq.any() else None
    res = scipy.optimize.linprog(np.ones(2 * p), A_ub=A_ub, b_ub=b_ub, A_eq=A_eq, b_eq=b_eq, bounds=(0, None),
                                 method="highs")
    if res.status != 0:            # infeasible (no separation) or a solver failure: report none
        return None
    d = res.x[:p] - res.x[p:]
    support = np.abs(d) > SUPPORT_TOL * np.max(np.abs(d))
    strict = int(np.sum(np.abs(Xs @ d) > 1e-9 * np.max(np.abs(d))))
    return Separation(columns=[names[j] for j in np.flatnonzero(support)], direction=d / rms, rows=strict,
                      all_bound=bool(np.all(s != 0) and np.all(s == s[0])))


def separation_message(model, sep: Separation) -> str:
    """What a separation means, naming the response and the predictors."""
    resp = model.design.response
    if sep.all_bound:
        y0 = float(np.asarray(model.y)[0])
        what = ("0 in every row" if y0 == 0 else "1 in every row" if model.family_spec.name == "bernoulli"
                else "equal to the trials in every row (all successes)")
        return (f"the response {resp!r} is {what}, so the likelihood keeps increasing as the intercept goes to "
                f"{'-' if y0 == 0 else '+'}infinity: the ML estimates do not exist")
    cols = ", ".join(repr(c) for c in sep.columns)
    return (f"the data are separated by the fixed effect(s) {cols}: a combination of them predicts {sep.rows} of "
            f"the {model.n_obs} responses of {resp!r} perfectly, so the likelihood keeps increasing as their "
            "coefficients go to infinity: the ML estimates do not exist")


def check_separation(model, caller: str) -> None:
    """Raise a DesignError naming the predictors (or the all-zero response) when the model's data are separated."""
    sep = separation(model)
    if sep is not None:
        fix = "Check the data" if sep.all_bound else "Remove or merge those predictors"
        raise DesignError(f"{caller}: {separation_message(model, sep)}. {fix}, or use sample(), whose priors keep "
                          "the posterior proper")


def check_sampler_scales(model, caller: str) -> None:
    """Raise a DesignError naming the column when a column of X or of a random-effect term's Z is so small that its
    squares, summed in the sampler's plan, fall into the subnormal range of the model's dtype (float64: values all
    below about 1e-150). caller: the method named in the message ("sample", "fit_map", ...)."""
    tiny = float(np.finfo(np.dtype(model.dtype)).tiny)
    limit = np.sqrt(tiny) * SCALE_MARGIN
    if model.statistics is not None:   # the largest |value| per column from the moments
        mom = model.statistics.moments
        offs = np.concatenate([[0], np.cumsum([t.d for t in model.terms])]).astype(int)
        absmax = lambda m, sl=slice(None): np.maximum(np.abs(m.min[sl]), np.abs(m.max[sl]))  # noqa: E731
        mats = [("fixed effect", model.design.fixed_names, absmax(mom.X))]
        mats += [(f"random-effect term {t.name!r} column", t.columns, absmax(mom.Z, slice(offs[h], offs[h + 1])))
                 for h, t in enumerate(model.terms)]
    else:
        mats = [("fixed effect", model.design.fixed_names, model.design.X)]
        mats += [(f"random-effect term {t.name!r} column", t.columns, t.Z) for t in model.terms]
    for what, names, M in mats:
        M = np.asarray(M, dtype=np.float64)
        if M.ndim == 1:   # already the largest |value| per column
            big = M
        elif M.ndim != 2 or M.shape[0] == 0:
            continue
        else:
            big = np.max(np.abs(M), axis=0)
        for j in np.flatnonzero((big > 0) & (big < limit)):
            k = int(np.ceil(-np.log10(big[j])))
            raise DesignError(f"{caller}: the {what} {names[j]!r} has values of at most {big[j]:.3g} in absolute "
                              f"value: their squares fall below the smallest normal {np.dtype(model.dtype).name} "
                              f"number in the sampler's sums of squares; rescale the column (e.g. multiply it by "
                              f"1e{k}: its coefficient is then divided by 1e{k}); fit_ml() handles it as it is")
