"""Maximum likelihood and REML fits with lme4 parity (profiled deviance over the relative factors θ).

For relative covariance factors Λ_l(θ) (lower-triangular, Σ_l = σ² Λ_lΛ_lᵀ) let V(θ) = I + Σ_l Z_l(I⊗Λ_lΛ_lᵀ)Z_lᵀ.
One elimination of the engine at σ = 1 with the p + 1 right-hand sides x_1..x_p, r0 = y - Xβ0 at once (the chain
part from ``kernels._eliminate_matrix``/``_eliminate_rhs``, or from constants only for a one-level chain, then
``kernels.dense_logdet_gram`` for the dense block) gives the exact Gram matrix G = [X r0]ᵀ V⁻¹ [X r0]
(= [X r0]ᵀ[X r0] - Σ z_a z_bᵀ with z the whitened engine vectors) and log|V| (= log|F|, determinant lemma).
With C = chol(G):

    A = XᵀV⁻¹X = C_XX C_XXᵀ,  β̂ = β0 + A⁻¹XᵀV⁻¹r0,  penalized RSS Q = C_pp²,
    ML   deviance  = N (1 + log(2π Q / N)) + log|V|                         (σ̂² = Q / N)
    REML criterion = (N-p)(1 + log(2π Q / (N-p))) + log|V| + log|A|         (σ̂² = Q / (N-p))

exactly lme4's profiled criteria. θ is optimized with scipy L-BFGS-B (diagonals ≥ 0) on a jitted
``jax.value_and_grad`` of the criterion, compiled once per model and cached on the model (``model._ml_cache``).
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

from ._blas import blas_threads

__all__ = ["fit_ml", "MLFit"]

_SINGULAR_TOL = 1e-4
_LOG2PI = float(np.log(2 * np.pi))


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
        layout.append((np.array(rows), np.array(cols)))
    return layout, np.array(lower)


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


# --------------------------------------------------------------------------------------------- criterion
def _build(model):
    """Jitted functions of (plan, θ): the criteria and their gradient, and the profiled statistics."""
    from ..marginal import kernels

    layout, _ = _theta_layout(model)
    dims = [t.d for t in model.terms]
    plan = model.plan("all")
    N, p = model.n_obs, len(model.fixed_names)
    X = np.asarray(plan.X, dtype=np.float64)
    beta0 = np.asarray(plan.beta0, dtype=np.float64)
    r0 = np.asarray(plan.y, dtype=np.float64) - X @ beta0
    Vraw = np.column_stack([X, r0])                      # (N, p+1)
    dt = model.dtype
    npdt = np.dtype(jnp.dtype(dt).name)
    put = lambda a: jax.device_put(np.asarray(a, dtype=npdt))  # noqa: E731
    consts = dict(beta0=put(beta0), raw_gram=put(Vraw.T @ Vraw))
    if plan.level1 is not None:  # one chain level + dense block: right-hand sides from constants
        a_r, a_X, x_r, x_X = (np.asarray(a) for a in plan.level1_rhs)
        consts["a_raw"] = put(np.concatenate([a_X, a_r[:, :, None]], axis=2))   # (G_0, d_0, p+1)
        consts["x_raw"] = put(np.column_stack([x_X, x_r]))                       # (ds, p+1)

    def stats(plan, theta, c):
        lams = _lambdas(theta, layout, dims)
        lams = tuple(lams[src] for src in plan.unit_src)                     # term order -> engine unit order
        one = jnp.ones((), dt)
        ok = jnp.all(jnp.isfinite(theta))
        if "a_raw" in c:
            R, F, logdet = kernels._one_level_matrix(plan, lams, one)
            gram_c, xD = kernels._one_level_rhs(plan, lams, one, R, c["a_raw"], c["x_raw"])
            G = c["raw_gram"] - gram_c
        else:
            # standardized cell statistics (σ = 1) and the cell sums of Zᵀ[X r0] for all p + 1 right-hand sides
            Ht, _, _, _ = kernels._cell_stats(plan, c["beta0"], one, lams, None)
            Lam = jax.scipy.linalg.block_diag(*lams)
            raw = jnp.concatenate([plan.S_zX, plan.S_zr[:, :, None]], axis=2)      # (n_cells, D, p+1)
            ht = jnp.einsum("ab,kac->kbc", Lam, raw)                            # Λᵀ per cell
            mats, F, logdet = kernels._eliminate_matrix(plan, one, lams, Ht)
            zs, xD = kernels._eliminate_rhs(plan, mats, ht)
            G = c["raw_gram"]
            for z in zs:                                                     # chain part of [X r0]ᵀV⁻¹[X r0]
                G = G - jnp.einsum("gic,gie->ce", z, z)
        if F is not None:
            # dense block: log|F_DD| and x_Dᵀ F_DD⁻¹ x_D with a one-inverse reverse pass (kernels.dense_logdet_gram)
            ldD, GD = kernels.dense_logdet_gram(F, xD)
            logdet, G = logdet + ldD, G - GD
        G = 0.5 * (G + G.T)
        C = jnp.linalg.cholesky(G)
        Cxx = C[:p, :p]
        w = C[p, :p]                                     # XᵀV⁻¹r0 = Cxx w
        delta = jax.scipy.linalg.solve_triangular(Cxx.T, w, lower=False) if p else jnp.zeros((0,), dt)
        Q = C[p, p] ** 2
        logdetA = 2.0 * jnp.sum(jnp.log(jnp.diagonal(Cxx)))
        good = jnp.all(ok) & jnp.all(jnp.isfinite(C))
        return dict(beta=c["beta0"] + delta, Q=Q, logdetV=logdet, logdetA=logdetA, Cxx=Cxx, good=good)

    def criterion(plan, theta, c, reml):
        """reml: traced 0./1. flag, so one compilation serves ML and REML. Returns (criterion, stats)."""
        s = stats(plan, theta, c)
        n = N - p * reml
        val = n * (1.0 + _LOG2PI + jnp.log(s["Q"] / n)) + s["logdetV"] + reml * s["logdetA"]
        return jnp.where(s["good"] & jnp.isfinite(val), val, jnp.inf), s

    cache = {
        "consts": consts,
        "criterion": criterion,
        "fn": jax.jit(jax.value_and_grad(criterion, argnums=1, has_aux=True)),
        "compile_s": None,
    }
    return cache


def _cache(model):
    c = getattr(model, "_ml_cache", None)
    if c is None:
        c = _build(model)
        model._ml_cache = c
    return c


# --------------------------------------------------------------------------------------------- result
@dataclass
class MLFit:
    """ML / REML estimates. Arrays: beta, se (p,) in ``fixed_names`` order; cov/sd/corr/ranef keyed by term name
    ((d,d), (d,), (d,d), (G,d)); theta (n_theta,) lme4's relative Cholesky factors, column-wise per term."""

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

    @property
    def fixed_names(self):
        return list(self.model.fixed_names)

    @property
    def n_par(self) -> int:
        return len(self.beta) + len(self.theta) + 1

    @property
    def aic(self) -> float:
        return -2 * self.loglik + 2 * self.n_par

    @property
    def bic(self) -> float:
        return -2 * self.loglik + np.log(self.model.n_obs) * self.n_par

    def fixef(self):
        """pandas Series of β̂ indexed by fixed-effect name."""
        import pandas as pd
        return pd.Series(self.beta, index=self.fixed_names, name="Estimate")

    def coef_table(self):
        """DataFrame with Estimate, Std. Error, t value (lme4's fixed-effects table)."""
        import pandas as pd
        return pd.DataFrame({"Estimate": self.beta, "Std. Error": self.se, "t value": self.beta / self.se},
                            index=self.fixed_names)

    def fitted(self) -> np.ndarray:
        """(N,) Xβ̂ + Σ_l Z_l b̂_l (conditional fitted values, Gaussian scale)."""
        m = self.model
        f = m.design.X @ self.beta
        for t in m.terms:
            f = f + np.einsum("nd,nd->n", t.Z, self.ranef[t.name][t.codes])
        return f

    def residuals(self, scaled: bool = False) -> np.ndarray:
        r = self.model.y - self.fitted()
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


def _format(fit: MLFit, full: bool) -> str:
    m = fit.model
    how = "REML" if fit.reml else "maximum likelihood "
    lines = [f"Linear mixed model fit by {how} ['lmerMod']", f"Formula: {m.formula}"]
    if fit.reml:
        lines += ["", f"REML criterion at convergence: {fit.reml_criterion:.1f}"]
    else:
        hdr = ["AIC", "BIC", "logLik", "deviance", "df.resid"]
        vals = [f"{fit.aic:.1f}", f"{fit.bic:.1f}", f"{fit.loglik:.1f}", f"{fit.deviance:.1f}",
                str(m.n_obs - fit.n_par)]
        w = [max(len(h), len(v)) + 1 for h, v in zip(hdr, vals)]
        lines += ["", " ".join(h.rjust(k) for h, k in zip(hdr, w)), " ".join(v.rjust(k) for v, k in zip(vals, w))]
    if full:
        q = np.quantile(fit.residuals(scaled=True), [0, 0.25, 0.5, 0.75, 1])
        names = ["Min", "1Q", "Median", "3Q", "Max"]
        vals = [f"{v:.4f}" for v in q]
        w = [max(len(a), len(b)) for a, b in zip(names, vals)]
        lines += ["", "Scaled residuals: ", " ".join(a.rjust(k) for a, k in zip(names, w)),
                  " ".join(b.rjust(k) for b, k in zip(vals, w))]
    # random effects, lme4's order: decreasing number of levels (stable)
    terms = sorted(m.terms, key=lambda t: -t.n_groups)
    rows = []
    for t in terms:
        for i, c in enumerate(t.columns):
            corr = [f"{fit.corr[t.name][i, j]:.2f}" for j in range(i)] if t.d > 1 else []
            rows.append([t.name if i == 0 else "", _col(c), _fmt_num(fit.cov[t.name][i, i]),
                         _fmt_num(fit.sd[t.name][i]), " ".join(corr)])
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
    cells = [["", "Estimate", "Std. Error", "t value"]]
    for name, row in tab.iterrows():
        cells.append([_col(name), _fmt_num(row["Estimate"], 5), _fmt_num(row["Std. Error"], 4),
                      f"{row['t value']:.2f}"])
    w = [max(len(r[k]) for r in cells) for k in range(4)]
    for r in cells:
        lines.append(r[0].ljust(w[0]) + " " + " ".join(r[k].rjust(w[k]) for k in range(1, 4)))
    if fit.is_singular:
        lines += ["", "boundary (singular) fit: see help('isSingular')"]
    if not fit.converged:
        lines += ["", f"optimizer (L-BFGS-B) convergence message: {fit.message}"]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- fit
def fit_ml(model, reml: bool = False, *, theta0=None, maxiter: int = 2000, gtol: float = 1e-9,
           ftol: float = 1e-15, verbose: bool = False) -> MLFit:
    """ML (``reml=False``) or REML fit on the profiled criterion; returns :class:`MLFit`.

    theta0: optional start (n_theta,), lme4's θ order; default identity factors (lme4's default).
    """
    if not model.terms:
        raise ValueError("fit_ml needs at least one random-effect term; the formula has none")
    if model.family != "gaussian" and model.family != "lognormal":
        raise ValueError(f"fit_ml supports gaussian/lognormal families, not {model.family!r}")
    p = len(model.fixed_names)
    if reml and model.n_obs <= p:
        raise ValueError(f"REML needs more observations (N={model.n_obs}) than fixed effects (p={p})")
    cache = _cache(model)
    layout, lower = _theta_layout(model)
    if theta0 is None:
        theta0 = np.concatenate([np.where(r == c, 1.0, 0.0) for r, c in layout])
    theta0 = np.asarray(theta0, dtype=float).reshape(-1)
    if theta0.shape != lower.shape:
        raise ValueError(f"theta0 must have {lower.size} entries {_theta_names(model)}, got {theta0.size}")
    plan, consts = model.plan("all"), cache["consts"]
    dt = model.dtype
    npdt = np.dtype(jnp.dtype(dt).name)
    flag = jax.device_put(np.asarray(1.0 if reml else 0.0, dtype=npdt))

    def fn(th):
        return cache["fn"](plan, jax.device_put(np.asarray(th, dtype=npdt)), consts, flag)

    compile_s = 0.0
    if cache["compile_s"] is None:
        t0 = time.perf_counter()
        jax.block_until_ready(fn(theta0))
        compile_s = cache["compile_s"] = time.perf_counter() - t0
    n_eval = [0]

    def obj(th):
        n_eval[0] += 1
        (v, _), g = fn(th)
        v, g = float(v), np.asarray(g, dtype=float)
        if not np.isfinite(v) or not np.isfinite(g).all():
            return 1e300, np.zeros_like(th)
        if verbose:
            print(f"eval {n_eval[0]}: {v:.10f}")
        return v, g

    t1 = time.perf_counter()
    bounds = [(lo if np.isfinite(lo) else None, None) for lo in lower]
    with blas_threads(plan.dense_size):
        res = scipy.optimize.minimize(obj, theta0, jac=True, method="L-BFGS-B", bounds=bounds,
                                      options=dict(maxiter=maxiter, gtol=gtol, ftol=ftol, maxcor=20))
    theta = np.asarray(res.x, dtype=float)
    # projected gradient for the convergence check (abnormal line-search ends at the optimum are fine)
    _, g = obj(theta)
    pg = np.where((theta <= lower + 1e-12) & (g > 0), 0.0, g)
    converged = bool(res.success) or float(np.max(np.abs(pg), initial=0.0)) < 1e-4 * max(1.0, abs(res.fun)) ** 0.5
    opt_s = time.perf_counter() - t1
    stats = jax.tree_util.tree_map(np.asarray, fn(theta)[0][1])
    return _assemble(model, reml, theta, stats, converged, str(res.message), int(res.nit), n_eval[0],
                     compile_s, opt_s)


def _assemble(model, reml, theta, s, converged, message, nit, neval, compile_s, opt_s) -> MLFit:
    layout, lower = _theta_layout(model)
    dims = [t.d for t in model.terms]
    dt = model.dtype
    plan = model.plan("all")
    N, p = model.n_obs, len(model.fixed_names)
    Q = float(s["Q"])
    n = N - p if reml else N
    sigma2 = Q / n
    sigma = float(np.sqrt(sigma2))
    beta = np.asarray(s["beta"], dtype=float)
    Cxx = np.asarray(s["Cxx"], dtype=float)
    Ainv = np.linalg.inv(Cxx @ Cxx.T) if p else np.zeros((0, 0))
    vcov = sigma2 * Ainv
    se = np.sqrt(np.diag(vcov))
    dev_ml = N * (1.0 + _LOG2PI + np.log(Q / N)) + float(s["logdetV"])   # ML deviance at the ML σ for this θ
    if reml:
        crit = (N - p) * (1.0 + _LOG2PI + np.log(sigma2)) + float(s["logdetV"]) + float(s["logdetA"])
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
    means = model._kernel("conditional_mean")(plan, put(beta), put(sigma), tuple(put(sigma * L) for L in lams))
    ranef = {t.name: np.asarray(mu, dtype=float) for t, mu in zip(model.terms, means)}
    diag = theta[lower == 0.0]
    is_singular = bool(np.any(diag < _SINGULAR_TOL))
    if is_singular:
        warnings.warn("boundary (singular) fit: see help('isSingular')", stacklevel=3)
    if not converged:
        warnings.warn(f"fit_ml: optimizer did not converge ({message})", stacklevel=3)
    return MLFit(model=model, reml=reml, beta=beta, se=se, sigma=sigma, cov=cov, sd=sd, corr=corr, ranef=ranef,
                 theta=theta, theta_names=_theta_names(model), loglik=float(loglik), loglik_ml=float(loglik_ml),
                 deviance=float(-2 * loglik_ml), reml_criterion=None if reml_crit is None else float(reml_crit),
                 is_singular=is_singular, converged=converged, message=message, n_iter=nit, n_eval=neval,
                 time_compile_s=float(compile_s), time_optimize_s=float(opt_s), vcov=vcov)
