"""The result of an ML / REML fit (lmmarg.inference.ml.fit_ml): ``MLFit`` with lme4's printed summary, and
``ConvergenceChecks`` (lme4's checkConv at the optimum).

The printer (``MLFit.summary()``, ``str(fit)``, ``repr(fit)``) follows lme4's ``summary(fit)`` layout: header with
AIC/BIC/logLik (or the REML criterion), scaled residuals, random effects (variances, SDs, correlations), number of
groups, fixed-effects table, singular-fit and convergence notes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import pandas as pd
from scipy.stats import norm

from ..families import mean as family_mean
from ..statdesign import require_rows

__all__ = ["MLFit", "ConvergenceChecks"]


class ConvergenceChecks(NamedTuple):
    """lme4's checkConv at the returned optimum (profiled criterion, standardized coordinates).

    optimizer: the optimizer's own stopping test; max_scaled_gradient: max |C⁻¹g| with H = CCᵀ over the free
    coordinates (lme4's check.conv.grad, tolerance lmmarg.inference.ml.GRAD_TOL); hessian_min_eig /
    hessian_max_eig: extreme eigenvalues of H (check.conv.hess: all must be positive); boundary_ok: at the
    boundary no probe into the interior lowered the criterion and the projected gradient does not point inwards;
    n_boundary: coordinates at the boundary. messages: what failed, in lme4's words.
    """

    optimizer: bool
    max_scaled_gradient: float
    hessian_min_eig: float
    hessian_max_eig: float
    boundary_ok: bool
    n_boundary: int
    messages: tuple

    @property
    def ok(self) -> bool:
        return not self.messages


@dataclass
class MLFit:
    """ML / REML estimates. Arrays: beta, se (p,) in ``fixed_names`` order; cov/sd/corr/ranef keyed by term name
    ((d,d), (d,), (d,d), (G,d)); theta (n_theta,) lme4's relative Cholesky factors, column-wise per term;
    dispersion: the shape (negbinomial, gamma) or phi (beta) of a family that has one, else None."""

    model: object = field(repr=False)
    reml: bool
    beta: np.ndarray
    se: np.ndarray
    sigma: float
    cov: dict
    sd: dict
    corr: dict
    ranef: dict
    theta: np.ndarray
    theta_names: list
    loglik: float
    loglik_ml: float
    deviance: float
    reml_criterion: float | None
    is_singular: bool
    converged: bool
    message: str
    n_iter: int
    n_eval: int
    time_compile_s: float
    time_optimize_s: float
    vcov: np.ndarray = field(repr=False, default=None)
    checks: ConvergenceChecks = field(repr=False, default=None)
    n_restarts: int = 0
    dispersion: float | None = None

    @property
    def fixed_names(self):
        return list(self.model.fixed_names)

    @property
    def theta_lower(self) -> np.ndarray:
        """(n_theta,) lower bounds of θ: 0 for the diagonals of the factors, -inf elsewhere."""
        return np.array([0.0 if i == j else -np.inf for t in self.model.terms
                         for j in range(t.d) for i in range(j, t.d)])   # lme4's θ order, as theta

    @property
    def n_par(self) -> int:
        return len(self.beta) + len(self.theta) + (0 if self.model.family_spec.is_glmm else 1) \
            + (self.dispersion is not None)

    @property
    def aic(self) -> float:
        return -2 * self.loglik + 2 * self.n_par

    @property
    def bic(self) -> float:
        return -2 * self.loglik + np.log(self.model.n_obs) * self.n_par

    def fixef(self):
        """pandas Series of β̂ indexed by fixed-effect name."""
        return pd.Series(self.beta, index=self.fixed_names, name="Estimate")

    def coef_table(self):
        """DataFrame with Estimate, Std. Error, t value (lme4's fixed-effects table; z value and Pr(>|z|) for
        a GLMM, as glmer)."""
        if self.model.family_spec.is_glmm:
            z = self.beta / self.se
            return pd.DataFrame({"Estimate": self.beta, "Std. Error": self.se, "z value": z,
                                 "Pr(>|z|)": 2 * norm.sf(np.abs(z))}, index=self.fixed_names)
        return pd.DataFrame({"Estimate": self.beta, "Std. Error": self.se, "t value": self.beta / self.se},
                            index=self.fixed_names)

    def fitted(self) -> np.ndarray:
        """(N,) Xβ̂ + Σ_l Z_l b̂_l + offset (conditional fitted values, Gaussian scale: log y for lognormal; the
        linear predictor η̂ on the link scale for a GLMM family)."""
        m = self.model
        require_rows(m, "MLFit.fitted")
        f = m.design.X @ self.beta
        for t in m.terms:
            f = f + np.einsum("nd,nd->n", t.Z, self.ranef[t.name][t.codes])
        return f if m.design.offset is None else f + m.design.offset

    def residuals(self, scaled: bool = False) -> np.ndarray:
        """(N,) response minus fitted values (Gaussian scale), divided by σ̂ if ``scaled``. For a GLMM family the
        Pearson residuals (y - n μ̂) / sqrt(Var), as glmer's residuals(type = "pearson")."""
        m = self.model
        require_rows(m, "MLFit.residuals")
        if m.family_spec.is_glmm:
            mu = family_mean(m.family_spec, self.fitted())
            n = m.trials
            k = self.dispersion
            var = {"poisson": n * mu, "negbinomial": mu + mu**2 / (k or 1.0), "gamma": mu**2 / (k or 1.0),
                   "beta": mu * (1 - mu) / (1.0 + (k or 1.0))}.get(m.family, n * mu * (1 - mu))
            return (m.y - n * mu) / np.sqrt(np.maximum(var, 1e-300))
        y = m.y if m.design.offset is None else m.y + m.design.offset   # model.y has the offset taken out
        r = y - self.fitted()
        return r / self.sigma if scaled else r

    def summary(self) -> str:
        """lme4's summary(fit) layout as a string."""
        return _format(self, full=True)

    def __str__(self) -> str:
        return _format(self, full=True)

    def __repr__(self) -> str:
        return _format(self, full=False)


def _fmt_num(x: float, digits: int = 4) -> str:
    return f"{x:.{digits}g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.{digits - 1}e}"


def _col(name: str) -> str:
    return "(Intercept)" if name == "Intercept" else name


def _family_label(family: str, dispersion) -> str:
    """The family as glmer.nb prints it, "Negative Binomial(3.215)"; gamma and beta name their parameter."""
    if dispersion is None:
        return family
    if family == "negbinomial":
        return f"Negative Binomial({dispersion:.4g})"
    return f"{family}({'phi' if family == 'beta' else 'shape'} = {dispersion:.4g})"


def _format(fit: MLFit, full: bool) -> str:
    m = fit.model
    how = "REML" if fit.reml else "maximum likelihood "
    glmm = m.family_spec.is_glmm
    lines = [f"Linear mixed model fit by {how} ['lmerMod']", f"Formula: {m.formula}"]
    if glmm:
        lines = ["Generalized linear mixed model fit by maximum likelihood (Laplace Approximation) ['glmerMod']",
                 f" Family: {_family_label(m.family, fit.dispersion)}  ( {m.link} )", f"Formula: {m.formula}"]
    if fit.reml:
        lines += ["", f"REML criterion at convergence: {fit.reml_criterion:.1f}"]
    else:
        hdr = ["AIC", "BIC", "logLik", "deviance", "df.resid"]
        vals = [f"{fit.aic:.1f}", f"{fit.bic:.1f}", f"{fit.loglik:.1f}", f"{fit.deviance:.1f}",
                str(m.n_obs - fit.n_par)]
        w = [max(len(h), len(v)) + 1 for h, v in zip(hdr, vals)]
        lines += ["", " ".join(h.rjust(k) for h, k in zip(hdr, w)), " ".join(v.rjust(k) for v, k in zip(vals, w))]
    if full and m.statistics is None:   # a model from sufficient statistics has no rows to take residuals of
        q = np.quantile(fit.residuals(scaled=True), [0, 0.25, 0.5, 0.75, 1])
        names = ["Min", "1Q", "Median", "3Q", "Max"]
        vals = [f"{v:.4f}" for v in q]
        w = [max(len(a), len(b)) for a, b in zip(names, vals)]
        lines += ["", "Pearson residuals: " if glmm else "Scaled residuals: ",
                  " ".join(a.rjust(k) for a, k in zip(names, w)), " ".join(b.rjust(k) for b, k in zip(vals, w))]
    # random effects, lme4's order: decreasing number of levels (stable)
    terms = sorted(m.terms, key=lambda t: -t.n_groups)
    rows = []
    for t in terms:
        for i, c in enumerate(t.columns):
            corr = [f"{fit.corr[t.name][i, j]:.2f}" for j in range(i)] if t.d > 1 else []
            rows.append([t.name if i == 0 else "", _col(c), _fmt_num(fit.cov[t.name][i, i]),
                         _fmt_num(fit.sd[t.name][i]), " ".join(corr)])
    if not glmm:
        rows.append(["Residual", "", _fmt_num(fit.sigma ** 2), _fmt_num(fit.sigma), ""])
    has_corr = any(t.d > 1 for t in m.terms)
    head = ["Groups", "Name", "Variance", "Std.Dev."] + (["Corr"] if has_corr else [])
    rows = [r[:len(head)] for r in rows]
    w = [max(len(r[k]) for r in rows + [head]) for k in range(len(head))]
    lines += ["", "Random effects:"]
    for r in [head] + rows:
        lines.append(" " + " ".join(r[k].ljust(w[k]) for k in range(len(head))).rstrip())
    groups = {}
    for t in terms:
        groups.setdefault(t.group, t.n_groups)
    lines.append(f"Number of obs: {m.n_obs}, groups:  " + "; ".join(f"{g}, {n}" for g, n in groups.items()))
    lines += ["", "Fixed effects:"]
    tab = fit.coef_table()
    cells = [[""] + list(tab.columns)]
    for name, row in tab.iterrows():
        cells.append([_col(name), _fmt_num(row["Estimate"], 5), _fmt_num(row["Std. Error"], 4),
                      f"{row.iloc[2]:.2f}"] + ([f"{row.iloc[3]:.3g}"] if glmm else []))
    k_cols = len(cells[0])
    w = [max(len(r[k]) for r in cells) for k in range(k_cols)]
    for r in cells:
        lines.append(r[0].ljust(w[0]) + " " + " ".join(r[k].rjust(w[k]) for k in range(1, k_cols)))
    if fit.is_singular:
        lines += ["", "boundary (singular) fit: see help('isSingular')"]
    if not fit.converged:
        lines += ["", f"optimizer (L-BFGS-B) convergence message: {fit.message}"]
        if fit.checks is not None:
            lines += [f"Model failed to converge: {m}" for m in fit.checks.messages]
    return "\n".join(lines)
