"""Response families: the Gaussian ones (gaussian, lognormal) and the GLMM ones (bernoulli, binomial, poisson, and
negbinomial, gamma, beta with a dispersion parameter).

A family is a small immutable record (``Family``) chosen once, when the model is built (``resolve_family``); the
Laplace engine (:mod:`lmmarg.marginal.laplace`) and the results dispatch on it. For a GLMM family the
per-observation pieces the engine needs are, with η the linear predictor, y the successes / counts and n the trials:

* ``log_lik(y, n, η)`` — log p(y | η) without the constant ``log_norm(y, n)`` (log C(n, y) for binomial,
  −log y! for poisson), which is computed once per data set; lme4's logLik includes it, so does ours;
* ``score_weight(y, n, η)`` — s = ∂ log p / ∂η and the Fisher weight W = n (dμ/dη)² / Var(μ), the IRLS weight
  glmer uses in its PIRLS iterations and in the Laplace determinant (equal to −∂² log p / ∂η² for the canonical
  links logit and log; for probit the expected, not the observed, information, as in glmer);
* ``mean(η)`` — E[y | η] / n (a probability or a rate).

The families with a dispersion parameter (``Family.dispersion`` names its site, brms's names) take it as the last
argument ``disp`` of ``log_lik`` / ``score_weight`` / ``pointwise_log_lik`` (a traced scalar: it is differentiated):

* ``"negbinomial"`` (NB2, log link; lme4's glmer.nb, glmmTMB's nbinom2): Var = μ + μ² / shape;
* ``"gamma"`` (log link; R's ``Gamma(link = "log")``): y ~ Gamma(shape, rate = shape / μ), Var = μ² / shape;
* ``"beta"`` (logit link; glmmTMB's beta_family): y ~ Beta(μφ, (1 − μ)φ), Var = μ(1 − μ) / (1 + φ).

Their links are not canonical, so the observed and the Fisher information differ; the Laplace determinant of these
families uses the observed one (``OBSERVED_LAPLACE``), the exact Hessian of the joint density as glmmTMB (TMB)
does (glmer.nb's PIRLS uses the Fisher weights; its logLik differs from glmmTMB's by that).

>>> resolve_family("bernoulli")
Family(name='bernoulli', link='logit')
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.special
import numpy as np
from jax.scipy.special import log_ndtr, ndtr

from .design import DesignError

__all__ = ["Family", "resolve_family", "GAUSSIAN_FAMILIES", "GLMM_FAMILIES", "DISPERSION_SITES", "log_lik",
           "score_weight", "mean", "log_norm", "check_response", "error_value", "dispersion_start",
           "OBSERVED_LAPLACE"]

GAUSSIAN_FAMILIES = ("gaussian", "lognormal")
GLMM_FAMILIES = ("bernoulli", "binomial", "poisson", "negbinomial", "gamma", "beta")
# the dispersion parameter's site name per family (brms's names)
DISPERSION_SITES = {"negbinomial": "shape", "gamma": "shape", "beta": "phi"}
# families whose Laplace determinant uses the observed information (glmmTMB's definition; see the docstring)
OBSERVED_LAPLACE = tuple(DISPERSION_SITES)
_LINKS = {"gaussian": ("identity",), "lognormal": ("identity",), "bernoulli": ("logit", "probit"),
          "binomial": ("logit", "probit"), "poisson": ("log",), "negbinomial": ("log",), "gamma": ("log",),
          "beta": ("logit",)}
_ALIASES = {"negative_binomial": "negbinomial", "negative.binomial": "negbinomial", "nbinom2": "negbinomial",
            "beta_family": "beta"}
_LOG_SQRT_2PI = 0.9189385332046727
# The smallest Fisher weight, relative to the trials: a fitted probability of exactly 0 or 1 (|η| > ~37 for logit)
# would give W = 0 and an infinite working variance; the floor changes log|F| by less than 1e-10 per observation.
MIN_WEIGHT = 1e-12


class Family(NamedTuple):
    """A response family and its link (hashable: a static argument of jitted kernels)."""

    name: str
    link: str

    @property
    def is_glmm(self) -> bool:
        """True for the families whose random effects are Laplace-marginalized (non-Gaussian likelihood)."""
        return self.name in GLMM_FAMILIES

    @property
    def dispersion(self) -> str | None:
        """The site name of the family's dispersion parameter ("shape", "phi"), None if it has none."""
        return DISPERSION_SITES.get(self.name)

    def __str__(self) -> str:
        return f"{self.name}({self.link})"


def resolve_family(family, link: str | None = None) -> Family:
    """A Family from a name ("bernoulli"), a name with link ("binomial(probit)") or a Family; the link defaults to
    the canonical one (logit, log; identity for the Gaussian families)."""
    if isinstance(family, Family):
        return family
    if not isinstance(family, str):
        # an R / statsmodels family object or class (binomial(), sm.families.Poisson()): name the string to write
        name = str(getattr(family, "name", None) or getattr(family, "__name__", None) or type(family).__name__)
        low = name.lower().replace("_", "").replace(".", "")
        guess = "negbinomial" if "negativebinomial" in low or "nbinom" in low else \
            next((f for f in _LINKS if f in low), None)
        hint = f"; write family={guess!r}" if guess else ""
        raise TypeError(f"family must be a string such as 'bernoulli' (families: {', '.join(_LINKS)}; a link as "
                        f"link='probit' or 'binomial(probit)'), got {type(family).__name__} {family!r}{hint}")
    name = family.strip().lower()
    if "(" in name and name.endswith(")"):
        name, inner = name[:-1].split("(", 1)
        name, inner = name.strip(), inner.strip().strip("'\"")
        inner = inner.split("=", 1)[-1].strip().strip("'\"")      # binomial(link = "probit")
        if link is not None and inner != link:
            raise ValueError(f"family {family!r} and link={link!r} disagree")
        link = inner or None
    name = _ALIASES.get(name, name)
    if name not in _LINKS:
        raise ValueError(f"unknown family {family!r}; families are {list(_LINKS)}")
    link = _LINKS[name][0] if link is None else str(link).lower()
    if link not in _LINKS[name]:
        raise ValueError(f"family {name!r} has no link {link!r}; links are {list(_LINKS[name])}")
    return Family(name, link)


# --------------------------------------------------------------------------- per-observation pieces (JAX)


def _xp(x):
    """numpy for NumPy input (host-side fits, results), jax.numpy otherwise (kernels)."""
    return np if isinstance(x, (np.ndarray, float, int)) else jnp


def _log_ndtr(x):
    if _xp(x) is np:
        from scipy.special import log_ndtr as np_log_ndtr
        return np_log_ndtr(x)
    return log_ndtr(x)


def _softplus(x):
    """log(1 + e^x), stable for both signs."""
    xp = _xp(x)
    return xp.maximum(x, 0.0) + xp.log1p(xp.exp(-xp.abs(x)))


def _lgamma(x):
    if _xp(x) is np:
        from scipy.special import gammaln
        return gammaln(x)
    return jax.scipy.special.gammaln(x)


def _digamma(x, k: int = 0):
    """ψ (k = 0) or ψ' (k = 1)."""
    if _xp(x) is np:
        from scipy.special import polygamma
        return polygamma(k, x)
    return jax.scipy.special.digamma(x) if k == 0 else jax.scipy.special.polygamma(1, x)


def _log_y(fam: Family, y):
    """log y and log(1 - y) (beta) with the boundary values of the other families kept finite."""
    xp = _xp(y)
    pos = y > 0
    ly = xp.where(pos, xp.log(xp.where(pos, y, 1.0)), 0.0)
    if fam.name != "beta":
        return ly, None
    below = y < 1
    return ly, xp.where(below, xp.log1p(-xp.where(below, y, 0.0)), 0.0)


def log_lik(fam: Family, y, n, eta, disp=None):
    """(N,) log p(y_i | η_i) without ``log_norm``; disp: the dispersion () of negbinomial / gamma / beta."""
    xp = _xp(eta)
    if fam.name == "poisson":
        return y * eta - xp.exp(eta)
    if fam.name == "negbinomial":   # lgamma(y + k) - lgamma(k) + k log k + y η - (y + k) log(k + μ), as
        lk = xp.log(disp)            # ... - y log k + y η - (y + k) log(1 + μ / k): no k log k to cancel
        return (_lgamma(y + disp) - _lgamma(disp) - y * lk + y * eta
                - (y + disp) * _softplus(eta - lk))
    if fam.name == "gamma":         # k log k - lgamma(k) + k log y - k η - k y / μ   (-log y in log_norm)
        ly, _ = _log_y(fam, y)
        return disp * (xp.log(disp) + ly - eta - xp.exp(ly - eta)) - _lgamma(disp)
    if fam.name == "beta":          # lgamma(φ) - lgamma(a) - lgamma(b) + a log y + b log(1 - y)
        ly, l1y = _log_y(fam, y)
        mu = 0.5 * xp.tanh(0.5 * eta) + 0.5
        a, b = mu * disp, (1.0 - mu) * disp
        return _lgamma(disp) - _lgamma(a) - _lgamma(b) + a * ly + b * l1y
    if fam.link == "logit":
        return y * eta - n * _softplus(eta)
    return y * _log_ndtr(eta) + (n - y) * _log_ndtr(-eta)


def score_weight(fam: Family, y, n, eta, observed: bool = False, disp=None):
    """(s (N,), W (N,)): the score ∂ log p / ∂η and the Fisher weight, W ≥ MIN_WEIGHT · max(n, 1).

    observed: W = −∂² log p / ∂η² instead (the Newton weight; positive for every family but beta, which is not
    log-concave in η: its observed weight is floored). It equals the Fisher weight for the canonical links; for
    probit the Newton iteration converges quadratically with it and its step has the exact implicit derivative of
    the mode. disp: the dispersion () of negbinomial / gamma / beta."""
    xp = _xp(eta)
    if fam.name == "negbinomial":   # with q = μ / (k + μ): s = y - (y + k) q, observed W = (y + k) q (1 - q)
        t = eta - xp.log(disp)
        q = 0.5 * xp.tanh(0.5 * t) + 0.5
        s = y - (y + disp) * q
        w = (y + disp) * 0.25 / xp.cosh(0.5 * t) ** 2 if observed else disp * q
        return s, xp.maximum(w, MIN_WEIGHT)
    if fam.name == "gamma":         # s = k (y / μ - 1), observed W = k y / μ, Fisher W = k
        ly, _ = _log_y(fam, y)
        r = xp.exp(ly - eta)
        w = disp * r if observed else disp + 0.0 * r
        return disp * (r - 1.0), xp.maximum(w, MIN_WEIGHT)
    if fam.name == "beta":
        ly, l1y = _log_y(fam, y)
        mu = 0.5 * xp.tanh(0.5 * eta) + 0.5
        d1 = 0.25 / xp.cosh(0.5 * eta) ** 2           # dμ/dη = μ (1 - μ)
        a, b = mu * disp, (1.0 - mu) * disp
        g = disp * (ly - l1y - _digamma(a) + _digamma(b))          # ∂ log p / ∂μ
        fisher = disp**2 * (_digamma(a, 1) + _digamma(b, 1)) * d1**2
        w = fisher - g * d1 * (1.0 - 2.0 * mu) if observed else fisher
        return g * d1, xp.maximum(w, MIN_WEIGHT)
    if fam.name == "poisson":
        mu = xp.exp(eta)
        s, w = y - mu, mu
        floor = MIN_WEIGHT
    elif fam.link == "logit":
        mu = 0.5 * xp.tanh(0.5 * eta) + 0.5          # the logistic function
        s, w = y - n * mu, 0.25 * n / xp.cosh(0.5 * eta) ** 2    # n μ (1 − μ) without cancellation
        floor = MIN_WEIGHT * xp.maximum(n, 1.0)
    else:  # probit: φ/Φ(η) and φ/Φ(-η) in logs, stable in both tails
        log_phi = -0.5 * eta**2 - _LOG_SQRT_2PI
        lp, lq = _log_ndtr(eta), _log_ndtr(-eta)
        lam1, lam0 = xp.exp(log_phi - lp), xp.exp(log_phi - lq)
        s = y * lam1 - (n - y) * lam0
        if observed:
            w = y * lam1 * (eta + lam1) + (n - y) * lam0 * (lam0 - eta)
        else:
            w = n * xp.exp(2.0 * log_phi - lp - lq)
        floor = MIN_WEIGHT * xp.maximum(n, 1.0)
    return s, xp.maximum(w, floor)


def mean(fam: Family, eta):
    """E[y | η] / n: the probability (bernoulli, binomial) or the rate (poisson); jnp or np input."""
    xp = _xp(eta)
    if fam.link == "log":
        return xp.exp(eta)
    if fam.link == "logit":
        return 1.0 / (1.0 + xp.exp(-eta))
    if xp is np:
        from scipy.special import ndtr as np_ndtr
        return np_ndtr(eta)
    return ndtr(eta)


# --------------------------------------------------------------------------- data (NumPy, once per data set)


def _constants(fam: Family, y: np.ndarray, n: np.ndarray) -> np.ndarray:
    """The constant part of log p(y_i | η_i) per observation: log C(n_i, y_i) (binomial), −log y_i! (poisson),
    −log y (gamma), −log y − log(1 − y) (beta), 0 else; broadcast over y and n."""
    from scipy.special import gammaln
    if fam.name in ("poisson", "negbinomial"):
        return -gammaln(y + 1.0)
    if fam.name in ("gamma", "beta"):
        with np.errstate(divide="ignore"):
            return -np.log(y) - (np.log1p(-y) if fam.name == "beta" else 0.0)
    if fam.name == "binomial":
        return gammaln(n + 1.0) - gammaln(y + 1.0) - gammaln(n - y + 1.0)
    return np.zeros(np.broadcast(y, n).shape)


def log_norm(fam: Family, y: np.ndarray, n: np.ndarray) -> float:
    """Σ_i of the constant part of log p(y_i | η_i) (``_constants``)."""
    return float(np.sum(_constants(fam, y, n)))


def _first_bad(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def error_value(v) -> str:
    """A value shown in an error message, with all its digits (1.000000000001, not 1 as ':g' would print); whole
    numbers without a trailing .0 (2, -1)."""
    v = float(v)
    return str(int(v)) if v.is_integer() and abs(v) < 2**53 else repr(v)


def check_response(fam: Family, y: np.ndarray, n: np.ndarray, response: str, trials: str | None) -> None:
    """Raise a DesignError naming the column and the first offending row for a response the family cannot take."""
    if fam.name == "bernoulli":
        bad = (y != 0) & (y != 1)
        if bad.any():
            i = _first_bad(bad)
            raise DesignError(f"family='bernoulli' needs a 0/1 response, but {response!r} is "
                              f"{error_value(y[i])} at row {i}; for counts of successes out of trials use "
                              "family='binomial' with cbind(successes, failures) or trials=")
        return
    if fam.name in ("gamma", "beta"):
        bad = (y <= 0) | (y >= 1) if fam.name == "beta" else ~(y > 0)
        if bad.any():
            i = _first_bad(bad)
            what = "a response strictly between 0 and 1" if fam.name == "beta" else "a positive response"
            raise DesignError(f"family={fam.name!r} needs {what}, but {response!r} is {error_value(y[i])} at "
                              f"row {i}" + (" (brms's zero_one_inflated_beta is not available)"
                                            if fam.name == "beta" and y[i] in (0, 1) else ""))
        return
    bad = (y < 0) | (y != np.round(y))
    if bad.any():
        i = _first_bad(bad)
        what = "successes" if fam.name == "binomial" else "counts"
        raise DesignError(f"family={fam.name!r} needs non-negative integer {what}, but {response!r} is "
                          f"{error_value(y[i])} at row {i}")
    if fam.name == "binomial":
        tname = trials or "the trials"
        badn = (n != np.round(n)) | (n <= 0)
        if badn.any():
            i = _first_bad(badn)
            raise DesignError(f"family='binomial' needs positive integer trials, but {tname!r} is "
                              f"{error_value(n[i])} at row {i}"
                              + (" (zero trials carry no information: drop the row)" if n[i] == 0 else ""))
        over = y > n
        if over.any():
            i = _first_bad(over)
            raise DesignError(f"family='binomial': successes {response!r} = {error_value(y[i])} exceed the "
                              f"trials {tname!r} = {error_value(n[i])} at row {i}")


def glm_fit(fam: Family, X: np.ndarray, y: np.ndarray, n: np.ndarray, offset: np.ndarray | None = None,
            max_iter: int = 50, ridge: float = 1e-8) -> np.ndarray:
    """β (p,) of the GLM without random effects by IRLS (NumPy): the starting point of ML and of the chains.

    A tiny ridge keeps separated data (a fitted probability of exactly 0 or 1) finite; the iteration stops at
    |η| ≤ 30 for logit/probit for the same reason. Returns zeros where IRLS fails.
    """
    X = np.asarray(X, np.float64)
    p = X.shape[1]
    if p == 0:
        return np.zeros(0)
    off = np.zeros(len(y)) if offset is None else np.asarray(offset, np.float64)
    if fam.name in ("gamma", "beta"):
        rate = y if fam.name == "gamma" else 0.98 * y + 0.01
    else:
        rate = (y + 0.5) / (n + 1.0)
    eta = np.log(rate) if fam.link == "log" else np.log(rate / (1 - rate))
    # the mean's IRLS: for negbinomial and gamma at any dispersion; for beta the quasi-likelihood of a binomial
    irls = Family("poisson", "log") if fam.name == "negbinomial" else fam
    irls = Family("binomial", "logit") if fam.name == "beta" else irls
    beta = np.zeros(p)
    for _ in range(max_iter):
        s, w = score_weight(irls, y, n, eta, disp=1.0)
        z = eta - off + s / w
        A = X.T @ (w[:, None] * X)
        new = np.linalg.solve(A + ridge * np.trace(A) / p * np.eye(p), X.T @ (w * z))
        if not np.all(np.isfinite(new)):
            return beta
        done = np.max(np.abs(new - beta)) < 1e-8 * (1 + np.max(np.abs(new)))
        beta = new
        eta = off + X @ beta
        if fam.link != "log":
            eta = np.clip(eta, -30, 30)
        if done:
            break
    return beta


def dispersion_start(fam: Family, y: np.ndarray, mu: np.ndarray) -> float:
    """A moment estimate of the dispersion from the GLM fit's means μ (N,) (the start of ML and of the chains):
    negbinomial Σμ² / Σ((y − μ)² − μ), gamma 1 / mean(((y − μ) / μ)²), beta mean(μ(1 − μ)) / mean((y − μ)²) − 1,
    clipped to [0.01, 1e4] (a large shape: little overdispersion)."""
    y, mu = np.asarray(y, float), np.asarray(mu, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        if fam.name == "negbinomial":
            ex = np.sum((y - mu) ** 2 - mu)
            k = np.sum(mu**2) / ex if ex > 0 else 1e4
        elif fam.name == "gamma":
            k = 1.0 / np.mean(((y - mu) / mu) ** 2)
        else:
            k = np.mean(mu * (1 - mu)) / np.mean((y - mu) ** 2) - 1.0
    return float(np.clip(k, 0.01, 1e4)) if np.isfinite(k) else 1.0


def pointwise_log_lik(fam: Family, y: np.ndarray, n: np.ndarray, eta: np.ndarray, disp=None) -> np.ndarray:
    """(..., N) log p(y_i | η_i) with the constants (NumPy): the conditional pointwise log-likelihood; disp: the
    dispersion (scalar, or broadcasting against eta, e.g. (S, 1, 1) per draw) of negbinomial / gamma / beta."""
    eta = np.asarray(eta, np.float64)
    if disp is not None:
        disp = np.asarray(disp, np.float64)
    return log_lik(fam, y, n, eta, disp) + _constants(fam, y, n)
