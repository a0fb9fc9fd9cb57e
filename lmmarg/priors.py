"""Global parameters of a model, their priors (brms-like names and data-scaled defaults) and the residual scale.

Parameters (site names of the NumPyro model in lmmarg.numpyro_model; lmmarg.parameters makes them):
  b_<fixed name>          one per fixed-effect column (assembled to "beta" (p,))
  sigma                   residual SD (scalar), or (K,) one per level of ``sigma_by``
  sd_<term>__<column>     one SD per random-effect column (assembled to "sd_<term>" (d,))
  cor_<term>              Cholesky factor of the (d, d) correlation matrix, d > 1 (LKJ prior)
  distributional sigma (``sigma="~ x + (x | g)"``, log link): b_sigma_<name>, sd_sigma_<term>__<column>,
  cor_sigma_<term>; its random effects are always sampled (noncentered).

Default priors (weakly informative, scaled to the Gaussian-scale response y; y = log y for lognormal):
  Intercept            student_t(3, median(y), max(2.5, mad(y)))            (brms)
  b_<x>                normal(0, 2.5 sd(y) / sd(x))                         (rstanarm-style; brms uses flat)
  sigma, sd            half-student_t(3, 0, max(2.5, mad(y)))               (brms)
  cor                  lkj(1)                                               (brms)
  sigma formula:       Intercept student_t(3, 0, 2.5); b normal(0, 1 / sd(x)); sd half-student_t(3, 0, 2.5).
GLMM families (bernoulli, binomial, poisson, negbinomial, gamma, beta; no sigma), on the scale of the link:
  Intercept            student_t(3, 0, 2.5) (logit/probit), student_t(3, log(mean rate), 2.5) (log),
                       student_t(3, logit(mean y), 2.5) (beta)                              (brms)
  b_<x>                normal(0, 2.5 / sd(x))                                              (rstanarm)
  sd                   half-student_t(3, 0, 2.5)                                            (brms)
  shape                gamma(0.01, 0.01) (negbinomial, gamma)                               (brms)
  phi                  gamma(0.01, 0.01) (beta)                                             (brms)
Note the intercept prior is on the raw intercept (brms puts it on the intercept of centred predictors).

Override by name (``priors={...}``): "Intercept", "b", "b_<name>", "sigma", "sd", "sd_<term>",
"sd_<term>__<col>", "cor", "cor_<term>", "shape" / "phi" (the dispersion), and for a sigma formula
"Intercept_sigma", "b_sigma", "b_sigma_<name>", "sd_sigma", "sd_sigma_<term>", "sd_sigma_<term>__<col>",
"cor_sigma", "cor_sigma_<term>". The most specific name wins. Names are matched ignoring whitespace and
backticks, with R's ``^`` read as ``**``: ``"b_I(age^2)"`` names the column formulaic writes ``I(age ** 2)``.
A value is a NumPyro distribution (scalar), ``LKJ(eta)`` / a NumPyro LKJ(Cholesky) for correlations, or a number
(or array, for cor) that fixes the parameter.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import numpyro.distributions as dist
import pandas as pd
from numpyro.distributions import constraints

from . import parameters
from .design import DesignError, build_design, grouping_codes, used_columns
from .formula import parse_formula
from .statdesign import moment_summary

__all__ = ["LKJ", "Prior", "PriorSet", "SigmaSpec", "half_student_t", "build_priors", "build_sigma_spec",
           "sigma_columns", "prior_key"]


@dataclass(frozen=True)
class LKJ:
    """LKJ(eta) prior on a correlation matrix (sampled through its Cholesky factor); eta > 0."""

    eta: float = 1.0

    def __post_init__(self):
        try:
            eta = float(self.eta)
        except (TypeError, ValueError):
            eta = np.nan
        if isinstance(self.eta, bool) or not np.isfinite(eta) or eta <= 0:
            raise ValueError(f"LKJ(eta): eta must be a finite number > 0, got {self.eta!r}")


def half_student_t(df: float, scale: float):
    """|t| with t ~ Student-t(df, 0, scale): the brms default for SDs; df > 0, scale > 0."""
    for name, v in (("df", df), ("scale", scale)):
        if not _is_number(v) or not np.isfinite(v) or v <= 0:
            raise ValueError(f"half_student_t(df, scale): {name} must be a finite number > 0, got {v!r}")
    return dist.FoldedDistribution(dist.StudentT(df, 0.0, scale))


@dataclass
class Prior:
    """One scalar (or correlation) parameter: site name, display name, prior or fixed value, where it came from."""

    site: str
    label: str  # brms-like name shown in tables (e.g. sd_Subject__Days)
    kind: str  # "b" | "sigma" | "sd" | "cor" | "b_sigma" | "sd_sigma" | "cor_sigma" | "dispersion"
    dist: object = None  # numpyro distribution (None if fixed)
    fixed: object = None  # number / array if fixed
    source: str = "default"
    text: str = ""
    dim: int = 1  # d for correlation parameters

    @property
    def is_fixed(self) -> bool:
        return self.fixed is not None


@dataclass
class SigmaSpec:
    """Residual scale: kind "constant" | "by" (codes (N,), levels) | "formula" (design of log sigma) | "none"
    (a GLMM family: no residual SD) | "dispersion" (a GLMM family with a dispersion parameter, its site name in
    ``dispersion``: "shape", "phi"; no residual SD)."""

    kind: str = "constant"
    by: str | None = None
    codes: np.ndarray | None = None
    levels: list = field(default_factory=list)
    level_keys: list = field(default_factory=list)
    design: object = None  # lmmarg.design.Design of the sigma formula (dummy response)
    formula: str | None = None
    dispersion: str | None = None


class PriorSet:
    """The model's prior table; ``print(model.priors)`` shows parameter, prior and source (default/user)."""

    def __init__(self, entries: list[Prior]):
        self.entries = entries
        self.by_site = {e.site: e for e in entries}

    def __getitem__(self, site: str) -> Prior:
        return self.by_site[site]

    def __iter__(self):
        return iter(self.entries)

    def __len__(self):
        return len(self.entries)

    @property
    def table(self) -> pd.DataFrame:
        return pd.DataFrame({"parameter": [e.label for e in self.entries],
                             "prior": [e.text for e in self.entries],
                             "source": [e.source for e in self.entries]})

    def __str__(self) -> str:
        return self.table.to_string(index=False)

    __repr__ = __str__

    def _repr_html_(self):
        return self.table.to_html(index=False)


# ---------------------------------------------------------------------------------------------------------------
# text


def _fmt(x) -> str:
    x = float(x)
    return f"{x:.4g}"


def describe(d) -> str:
    """Short brms-like text for a NumPyro distribution."""
    if isinstance(d, dist.FoldedDistribution) and isinstance(d.base_dist, dist.StudentT):
        b = d.base_dist
        return f"half_student_t({_fmt(b.df)}, {_fmt(b.loc)}, {_fmt(b.scale)})"
    if isinstance(d, LKJ):
        return f"lkj({_fmt(d.eta)})"
    names = {dist.StudentT: ("student_t", ["df", "loc", "scale"]), dist.Normal: ("normal", ["loc", "scale"]),
             dist.HalfNormal: ("half_normal", ["scale"]), dist.HalfCauchy: ("half_cauchy", ["scale"]),
             dist.Exponential: ("exponential", ["rate"]), dist.Cauchy: ("cauchy", ["loc", "scale"]),
             dist.Gamma: ("gamma", ["concentration", "rate"]), dist.LogNormal: ("lognormal", ["loc", "scale"])}
    for cls, (name, args) in names.items():
        if type(d) is cls:
            try:
                return f"{name}({', '.join(_fmt(getattr(d, a)) for a in args)})"
            except TypeError:
                break
    params = []
    for a in getattr(d, "arg_constraints", {}):
        v = getattr(d, a, None)
        if v is not None and np.ndim(v) == 0:
            params.append(f"{a}={_fmt(v)}")
    return f"{type(d).__name__}({', '.join(params)})"


# ---------------------------------------------------------------------------------------------------------------
# residual scale


_SIGMA_RESPONSE = "lmmarg_sigma_response_"


def sigma_columns(sigma_by=None, sigma=None) -> dict[str, str]:
    """{data column: where} for the columns ``sigma_by`` / a ``sigma`` formula use, so that the model's design
    checks them and handles their missing values with the formula's (``build_design(extra_columns=...)``).
    Malformed arguments give {} here; ``build_sigma_spec`` reports them."""
    if isinstance(sigma_by, str) and sigma is None:
        return {f.strip(): f"sigma_by={sigma_by!r}" for f in sigma_by.split(":")}
    if isinstance(sigma, str) and "~" in sigma and sigma_by is None:
        rhs = sigma.split("~", 1)[1].strip()
        used = used_columns(parse_formula(f"{_SIGMA_RESPONSE} ~ {rhs}"))
        return {c: f"the sigma formula {sigma!r}" for c in used if c != _SIGMA_RESPONSE}
    return {}


def build_sigma_spec(design, sigma_by=None, sigma=None, na_action: str = "raise", has_sigma: bool = True,
                     dispersion: str | None = None) -> SigmaSpec:
    """Residual-SD structure from ``sigma_by`` (grouping column(s), "a" or "a:b") or ``sigma`` (formula);
    kind "none" without a residual SD (``has_sigma=False``: GLMM families), "dispersion" for a GLMM family with a
    dispersion parameter (``dispersion``: its site name)."""
    if not has_sigma:
        if sigma_by is not None or sigma is not None:
            raise ValueError("sigma_by= and sigma= model a residual SD, which this family has not; they apply to "
                             "family='gaussian' or 'lognormal'")
        return SigmaSpec(kind="none") if dispersion is None else SigmaSpec(kind="dispersion", dispersion=dispersion)
    if sigma_by is not None and sigma is not None:
        raise ValueError("give at most one of sigma_by= and sigma= (a sigma formula can contain the grouping)")
    if sigma_by is not None:
        if not isinstance(sigma_by, str):
            raise TypeError(f"sigma_by must be a column name, got {type(sigma_by).__name__}")
        factors = tuple(f.strip() for f in sigma_by.split(":"))
        for f in factors:
            if f not in design.data.columns:
                raise DesignError(f"unknown column {f!r} in sigma_by; columns are {list(design.data.columns)}")
        codes, labels, keys = grouping_codes(design.data, factors)
        return SigmaSpec(kind="by", by=sigma_by, codes=codes, levels=labels, level_keys=keys)
    if sigma is not None:
        if not isinstance(sigma, str) or "~" not in sigma:
            raise ValueError(f"sigma must be a formula string like '~ x + (x | g)', got {sigma!r}")
        rhs = sigma.split("~", 1)[1].strip()
        dummy = _SIGMA_RESPONSE
        data = design.data.copy()
        data[dummy] = 0.0
        sdesign = build_design(f"{dummy} ~ {rhs}", data, na_action=na_action)
        return SigmaSpec(kind="formula", design=sdesign, formula="~ " + rhs)
    return SigmaSpec()


# ---------------------------------------------------------------------------------------------------------------
# priors


def _mad(y) -> float:
    return float(1.4826 * np.median(np.abs(y - np.median(y))))


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _cor_fixed(v, d: int, where: str) -> np.ndarray:
    """A fixed correlation (number r: all off-diagonals r; or a (d, d) matrix) -> its Cholesky factor."""
    R = np.full((d, d), float(v)) if np.ndim(v) == 0 else np.asarray(v, float)
    if np.ndim(v) == 0:
        np.fill_diagonal(R, 1.0)
    if R.shape != (d, d) or not np.allclose(R, R.T) or not np.allclose(np.diag(R), 1.0):
        raise ValueError(f"fixed value of {where!r} must be a number or a {d}x{d} correlation matrix")
    try:
        return np.linalg.cholesky(R)
    except np.linalg.LinAlgError:
        raise ValueError(f"fixed value of {where!r} is not a positive-definite correlation matrix") from None


def _check_params(d, name: str) -> None:
    """Every parameter of the distribution ``d`` (and of a wrapped base distribution) finite and valid."""
    while d is not None:
        for arg, constraint in getattr(d, "arg_constraints", {}).items():
            value = getattr(d, arg, None)
            if value is None or constraints.is_dependent(constraint):
                continue
            try:
                a = np.asarray(value, dtype=float)
            except (TypeError, ValueError):  # traced or non-numeric parameters cannot be checked here
                continue
            if not np.isfinite(a).all():
                raise ValueError(f"prior {name!r}: parameter {arg}={value} of {type(d).__name__} is not finite")
            if not np.all(np.asarray(constraint(value))):
                raise ValueError(f"prior {name!r}: parameter {arg}={value} of {type(d).__name__} is invalid "
                                 f"(must satisfy {constraint})")
        d = getattr(d, "base_dist", None)


def _check_value(v, kind: str, name: str):
    """Validate a user prior value for a parameter of this kind; returns (dist, fixed)."""
    if kind.startswith("cor"):
        if isinstance(v, LKJ):
            return v, None
        if isinstance(v, (dist.LKJCholesky, dist.LKJ)):
            eta = np.asarray(v.concentration, dtype=float)
            if eta.ndim or not np.isfinite(eta) or eta <= 0:
                raise ValueError(f"prior {name!r}: LKJ concentration must be a finite number > 0, got {eta}")
            return LKJ(float(eta)), None
        if _is_number(v) or isinstance(v, (np.ndarray, list)):
            if not np.isfinite(np.asarray(v, dtype=float)).all():
                raise ValueError(f"prior {name!r}: a fixed correlation must be finite, got {v}")
            return None, v
        raise TypeError(f"prior {name!r}: a correlation prior must be lmmarg.priors.LKJ(eta), a NumPyro LKJ "
                        f"distribution or a fixed correlation, got {type(v).__name__}")
    if _is_number(v):
        v = float(v)
        if not np.isfinite(v):
            raise ValueError(f"prior {name!r}: a fixed value must be finite, got {v}")
        if kind in ("sigma", "sd", "sd_sigma") and v < 0:
            raise ValueError(f"prior {name!r}: a fixed standard deviation must be >= 0, got {v}")
        if kind == "sigma" and v == 0:
            raise ValueError(f"prior {name!r}: the residual SD cannot be fixed at 0")
        if kind == "dispersion" and v <= 0:
            raise ValueError(f"prior {name!r}: a fixed dispersion must be > 0, got {v}")
        return None, v
    if not isinstance(v, dist.Distribution):
        raise TypeError(f"prior {name!r} must be a NumPyro distribution or a number, got {type(v).__name__}")
    if v.batch_shape or v.event_shape:
        raise ValueError(f"prior {name!r} must be a scalar distribution, got batch shape {v.batch_shape} and "
                         f"event shape {v.event_shape}")
    _check_params(v, name)
    if kind in ("sigma", "sd", "sd_sigma", "dispersion"):
        sup = v.support
        if sup not in (constraints.positive, constraints.nonnegative) and not isinstance(
                sup, (constraints.greater_than, type(constraints.positive))):
            what = "a dispersion parameter" if kind == "dispersion" else "a standard deviation"
            raise ValueError(f"prior {name!r} is for {what}: use a distribution on (0, inf) "
                             f"such as dist.HalfNormal or dist.Exponential, not {type(v).__name__}")
    return v, None


def prior_key(name: str) -> str:
    """A prior name reduced to what identifies it: no whitespace or backticks, R's ``^`` as ``**``, so that
    ``b_I(age^2)`` names formulaic's column ``I(age ** 2)`` and ``b_I(`x.1` ** 2)`` the user's ``b_I(x.1^2)``."""
    return re.sub(r"[\s`]", "", str(name)).replace("^", "**")


def _canonical_names(user: dict, valid: list[str]) -> dict:
    """``user`` with every key replaced by the valid name it spells (``prior_key``); unknown names raise,
    listing the valid ones; two keys that spell one name raise."""
    by_key: dict[str, str] = {}
    for v in valid:
        by_key.setdefault(prior_key(v), v)
    out, given = {}, {}
    unknown = []
    for k, v in user.items():
        name = k if k in valid else by_key.get(prior_key(k)) if isinstance(k, str) else None
        if name is None:
            unknown.append(k)
            continue
        if name in out:
            raise ValueError(f"prior names {given[name]!r} and {k!r} both name {name!r}; give one")
        out[name], given[name] = v, k
    if unknown:
        raise ValueError(f"unknown prior name(s) {unknown}; valid names for this model are {valid}")
    return out


def build_priors(model, user: dict | None = None) -> PriorSet:
    """Every global parameter of ``model`` with its prior; ``user`` overrides by brms-like name (see module doc)."""
    user = dict(user or {})
    stats = getattr(model, "statistics", None)
    if stats is None:
        y = np.asarray(model.y, float)
        sy = float(np.std(y, ddof=1)) if len(y) > 1 else 1.0
        s_mad = max(2.5, _mad(y))
        intercept_loc = float(np.median(y))
    else:   # rows known by their moments only: the mean and SD stand for brms's median and MAD (docs/guide.md)
        intercept_loc, sy = moment_summary(stats.moments.y)
        s_mad = max(2.5, sy)
    sy = sy if sy > 0 else 1.0
    if model.family_spec.is_glmm:  # priors on the link scale (brms / rstanarm defaults)
        sy, s_mad = 1.0, 2.5
        rate = float(np.sum(y) / np.sum(model.trials))
        intercept_loc = float(np.log(rate)) if model.link == "log" and rate > 0 else 0.0
        if model.family == "beta":
            intercept_loc = float(np.log(rate / (1.0 - rate)))
    X = model.design.X
    entries: list[tuple[Prior, list[str]]] = []  # (prior, candidate keys most specific first)

    def col_sd(x):
        s = float(np.std(x, ddof=1)) if len(x) > 1 else 0.0
        return s if s > 0 else 1.0

    def fixed_sd(j):
        if stats is None:
            return col_sd(X[:, j])
        s = moment_summary(stats.moments.X, j)[1]
        return s if s > 0 else 1.0

    for j, name in enumerate(model.fixed_names):
        if name == "Intercept":
            d = dist.StudentT(3.0, intercept_loc, s_mad)
            keys = [parameters.fixed_site(name), "Intercept"]
        else:
            d = dist.Normal(0.0, 2.5 * sy / fixed_sd(j))
            keys = [parameters.fixed_site(name), "b"]
        site = parameters.fixed_site(name)
        entries.append((Prior(site=site, label=site, kind="b", dist=d), keys))

    sspec = model.sigma_spec
    if sspec.kind == "constant":
        entries.append((Prior(site="sigma", label="sigma", kind="sigma", dist=half_student_t(3.0, s_mad)), ["sigma"]))
    elif sspec.kind == "by":
        label = f"sigma[{sspec.by}: {len(sspec.levels)} levels]"
        entries.append((Prior(site="sigma", label=label, kind="sigma", dist=half_student_t(3.0, s_mad)), ["sigma"]))
    elif sspec.kind == "dispersion":   # brms's default: gamma(0.01, 0.01) for shape and phi
        entries.append((Prior(site=sspec.dispersion, label=sspec.dispersion, kind="dispersion",
                              dist=dist.Gamma(0.01, 0.01)), [sspec.dispersion]))

    def add_terms(terms, sigma_part: bool, sd_dist):
        # sigma_part: False for the mean part, True for the sigma formula
        kind_sfx = "_sigma" if sigma_part else ""
        for t in terms:
            for c in t.columns:
                keys = [parameters.sd_site(t.name, c, sigma_part), parameters.sd_site(t.name, sigma_part=sigma_part)]
                if t.group != t.name:
                    keys += [parameters.sd_site(t.group, c, sigma_part),
                             parameters.sd_site(t.group, sigma_part=sigma_part)]
                keys.append("sd" + kind_sfx)
                entries.append((Prior(site=parameters.sd_site(t.name, c, sigma_part),
                                      label=parameters.sd_label(t.group, c, sigma_part), kind="sd" + kind_sfx,
                                      dist=sd_dist), keys))
            if t.d > 1:
                keys = [parameters.cor_prior_site(t.name, sigma_part)] + \
                       ([parameters.cor_prior_site(t.group, sigma_part)] if t.group != t.name else []) + \
                       ["cor" + kind_sfx]
                entries.append((Prior(site=parameters.cor_prior_site(t.name, sigma_part),
                                      label=parameters.cor_prior_site(t.group, sigma_part), kind="cor" + kind_sfx,
                                      dist=LKJ(1.0), dim=t.d), keys))

    add_terms(model.terms, False, half_student_t(3.0, s_mad))
    if sspec.kind == "formula":
        sd_ = sspec.design
        for j, name in enumerate(sd_.fixed_names):
            if name == "Intercept":
                d, keys = dist.StudentT(3.0, 0.0, 2.5), [parameters.fixed_site(name, True), "Intercept_sigma"]
            else:
                d, keys = dist.Normal(0.0, 1.0 / col_sd(sd_.X[:, j])), [parameters.fixed_site(name, True), "b_sigma"]
            site = parameters.fixed_site(name, True)
            entries.append((Prior(site=site, label=site, kind="b_sigma", dist=d), keys))
        add_terms(sd_.terms, True, half_student_t(3.0, 2.5))

    valid = sorted({k for _, keys in entries for k in keys})
    user = _canonical_names(user, valid)
    out = []
    for p, keys in entries:
        for k in keys:
            if k in user:
                d, fixed = _check_value(user[k], p.kind, k)
                p.dist, p.fixed, p.source = d, fixed, "user"
                if fixed is not None:
                    p.text = ("fixed " + _fmt(fixed)) if np.ndim(fixed) == 0 else "fixed (matrix)"
                    if p.kind.startswith("cor"):
                        p.fixed = _cor_fixed(fixed, p.dim, k)
                break
        if not p.is_fixed:
            p.text = describe(p.dist)
        out.append(p)
    return PriorSet(out)
