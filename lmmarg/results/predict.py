"""Posterior predictions of a Fit for the fitted rows or new data (the work behind ``Fit.predict`` and
``Fit.conditional_effects``).

Public functions (used by lmmarg.results.fit):

* ``predict(fit, new_data, draws, new_levels, seed, kind, trials)``: draws (n_draws, n_new);
* ``conditional_effects(fit, var, resolution, prob, kind, conditions)``: the grid DataFrame and whether ``var``
  is categorical;
* ``offset(model, new)``: the formula's offset (n,) or None;
* ``categorical_levels(spec, columns)``, ``model_matrix(spec, data, where)``: new data through a fitted formulaic
  model spec, unseen levels refused.
"""
from __future__ import annotations

import re
import warnings

import formulaic
import numpy as np
import pandas as pd
from formulaic.errors import DataMismatchWarning

from .. import families
from .. import parameters
from ..design import DesignError, normalize_dtypes
from ..statdesign import require_rows

__all__ = ["predict", "conditional_effects", "offset", "categorical_levels", "model_matrix"]


def categorical_levels(spec, columns) -> dict:
    """{data column: fitted levels} for the categorical predictors of a formulaic model spec (``x`` or ``C(x)``)."""
    out = {}
    for expr, (kind, state) in getattr(spec, "encoder_state", {}).items():
        if getattr(kind, "value", kind) != "categorical" or "categories" not in state:
            continue
        m = re.fullmatch(r"\s*(?:C|factor)\(\s*`?([^,`)]+)`?\s*(?:,.*)?\)\s*", expr)
        col = expr if expr in columns else (m.group(1).strip() if m else None)
        if col in columns:
            out[col] = list(state["categories"])
    return out


def _check_levels(spec, data: pd.DataFrame, where: str) -> None:
    """Raise naming the column and level when new_data has a level of a categorical predictor that the fitted
    data did not have (formulaic would only warn and encode it as the reference level)."""
    for col, cats in categorical_levels(spec, data.columns).items():
        seen, seen_str = set(cats), {str(c) for c in cats}  # 3.0 matches a fitted level 3, "3" too
        unseen = sorted({str(v) for v in pd.unique(data[col])
                         if not pd.isna(v) and v not in seen and str(v) not in seen_str})
        if unseen:
            raise DesignError(f"new_data column {col!r} has level(s) {unseen} not seen in the fitted data "
                              f"({where}); fitted levels are {cats}")


def model_matrix(spec, data: pd.DataFrame, where: str) -> pd.DataFrame:
    """The model matrix of a fitted formulaic spec for ``data`` (n rows); unseen levels and data mismatches raise
    a DesignError naming ``where``."""
    data = normalize_dtypes(data, data.columns)  # string / Int64 / Arrow columns as in the fitted design
    _check_levels(spec, data, where)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", DataMismatchWarning)  # any other level mismatch: an error, not a guess
            return spec.get_model_matrix(data, na_action="raise")
    except Exception as exc:
        raise DesignError(f"cannot build {where} for new_data: {exc}") from None


def offset(model, new: pd.DataFrame | None):
    """The formula's offset for the fitted rows (new=None) or for new_data: (n,), or None without offsets."""
    d = model.design
    if not getattr(d, "offset_specs", None):
        return None
    if new is None:
        return d.offset
    return sum(np.asarray(model_matrix(sp, new, f"offset({e})"), float)[:, 0]
               for sp, e in zip(d.offset_specs, d.spec.offsets))


def _term_effects(t, u, sd, corr, new: pd.DataFrame, new_levels: str, rng) -> np.ndarray:
    """Σ_c Z_new[:, c] u[draw, level(row), c] for one term: (S, n); unseen levels per ``new_levels``."""
    mm = model_matrix(t.model_spec, new, f"the columns of random-effect term {t.name!r}")
    missing = [c for c in t.columns if c not in mm.columns]
    if missing:
        raise DesignError(f"new_data gives term {t.name!r} no column(s) {missing}")
    Z = np.asarray(mm[t.columns], float)
    for f in t.factors:
        if f not in new.columns:
            raise DesignError(f"new_data lacks grouping column {f!r} of term {t.name!r}")
    index = {k: i for i, k in enumerate(t.level_keys)}
    index_str = {tuple(map(str, k)): i for i, k in enumerate(t.level_keys)}
    keys = list(zip(*[new[f].tolist() for f in t.factors]))
    codes = np.empty(len(keys), np.int64)
    unseen: dict = {}
    for r, k in enumerate(keys):
        i = index.get(k, index_str.get(tuple(map(str, k))))
        if i is None:
            if new_levels == "error":
                raise ValueError(f"new_data has level {':'.join(map(str, k))!r} of grouping factor "
                                 f"{t.group!r} (term {t.name!r}) not seen in the fitted data; pass "
                                 "new_levels='sample' or 'zero' to predict for new groups")
            i = -1 - unseen.setdefault(k, len(unseen))
        codes[r] = i
    S, G, d = u.shape
    if unseen:
        if new_levels == "sample":
            L = sd[:, :, None] * (np.linalg.cholesky(corr) if corr is not None else np.ones((S, 1, 1)))
            eps = rng.standard_normal((S, len(unseen), d))
            extra = np.einsum("sij,skj->ski", L, eps)
        else:
            extra = np.zeros((S, len(unseen), d))
        u = np.concatenate([u, extra], 1)
        codes = np.where(codes < 0, G + (-1 - codes), codes)
    return np.sum(Z[None] * u[:, codes, :], -1)


def predict(fit, new_data=None, draws: int | None = None, new_levels: str = "sample", seed: int = 0,
            kind: str = "response", trials=None) -> np.ndarray:
    """``Fit.predict`` (see there): posterior predictive draws (n_draws, n_new), chain-major."""
    if new_levels not in ("sample", "zero", "error"):
        raise ValueError(f"new_levels must be 'sample', 'zero' or 'error', got {new_levels!r}")
    if kind not in ("response", "mean", "linpred"):
        raise ValueError(f"kind must be 'response', 'mean' or 'linpred', got {kind!r}")
    m = fit.model
    if new_data is None:
        require_rows(m, "predict() on the training rows (pass new_data)")
    new = m.design.data if new_data is None else (pd.DataFrame(new_data) if isinstance(new_data, dict)
                                                  else new_data)
    if not isinstance(new, pd.DataFrame):
        raise TypeError(f"new_data must be a pandas DataFrame or dict of columns, got {type(new).__name__}")
    new = new.rename(columns=str).reset_index(drop=True)
    rng = np.random.default_rng(seed)
    S_all = fit.n_chains * fit.n_draws
    flat = {k: v.reshape((S_all,) + v.shape[2:]) for k, v in fit.samples.items()}
    if draws is None:
        idx = np.arange(S_all)
    else:
        if not isinstance(draws, (int, np.integer)) or not 1 <= draws <= S_all:
            raise ValueError(f"draws must be an integer in [1, {S_all}], got {draws!r}")
        idx = np.sort(rng.choice(S_all, size=draws, replace=False))
    fl = {k: v[idx] for k, v in flat.items()}
    X = model_matrix(m.design.fixed_spec, new, "the fixed-effects matrix")
    X = np.asarray(X[list(m.fixed_names)], float) if m.fixed_names else np.zeros((len(new), 0))
    mu = fl["beta"] @ X.T
    off = offset(m, None if new_data is None else new)
    if off is not None:
        mu = mu + off  # offset(...) terms enter every kind, the linear predictor included

    def effects(terms, sigma_part: bool):
        tot = 0.0
        for t in terms:
            key = parameters.effects_site(t.name, sigma_part)
            if key not in fl:
                raise ValueError(f"samples lack {key!r}: recover the random effects before predicting")
            tot = tot + _term_effects(t, fl[key], fl[parameters.sd_site(t.name, sigma_part=sigma_part)],
                                      fl.get(parameters.corr_site(t.name, sigma_part)), new, new_levels, rng)
        return tot

    mu = mu + effects(m.terms, False)
    if m.family_spec.is_glmm:
        site = m.family_spec.dispersion
        return _glmm_predict(m, mu, None if new_data is None else new, kind, rng, trials,
                             None if site is None else np.asarray(fl[site], float)[:, None])
    sspec = m.sigma_spec
    if sspec.kind == "constant":
        sig = fl["sigma"][:, None]
    elif sspec.kind == "by":
        factors = [f.strip() for f in sspec.by.split(":")]
        index = {tuple(map(str, k)): i for i, k in enumerate(sspec.level_keys)}
        keys = list(zip(*[new[f].tolist() for f in factors]))
        codes = []
        for k in keys:
            i = index.get(tuple(map(str, k)))
            if i is None:
                raise ValueError(f"new_data has level {':'.join(map(str, k))!r} of sigma_by={sspec.by!r} "
                                 "not seen in the fitted data")
            codes.append(i)
        sig = fl["sigma"][:, np.asarray(codes, np.int64)]
    else:
        Xs = model_matrix(sspec.design.fixed_spec, new, "the sigma formula's fixed-effects matrix")
        Xs = np.asarray(Xs[list(sspec.design.fixed_names)], float)
        sig = np.exp(fl["b_sigma"] @ Xs.T + effects(sspec.design.terms, True))
    sig = np.broadcast_to(sig, mu.shape)
    if kind == "linpred":
        return mu
    if kind == "mean":
        return np.exp(mu + 0.5 * sig**2) if m.family == "lognormal" else mu
    y = mu + sig * rng.standard_normal(mu.shape)
    return np.exp(y) if m.family == "lognormal" else y


def _glmm_predict(m, eta, new, kind: str, rng, trials=None, disp=None) -> np.ndarray:
    """predict() of a GLMM family from the linear predictor eta (S, n); disp (S, 1): the dispersion draws of
    negbinomial / gamma (shape) and beta (phi)."""
    if kind == "linpred":
        return eta
    if trials is not None:
        if m.family != "binomial":
            raise ValueError(f"trials= applies to family='binomial', not {m.family!r}")
        n = np.broadcast_to(np.asarray(trials, float), eta.shape[-1:])
        if (n <= 0).any() or (n != np.round(n)).any():
            raise ValueError("trials must be positive integers")
    else:
        n = m.trials if new is None else _new_trials(m, new)
    p = families.mean(m.family_spec, eta)
    if kind == "mean":
        return p * n
    if m.family == "poisson":
        return rng.poisson(p).astype(float)
    if m.family == "negbinomial":   # a gamma-Poisson mixture: Var = μ + μ² / shape
        return rng.poisson(rng.gamma(np.broadcast_to(disp, p.shape), p / disp)).astype(float)
    if m.family == "gamma":
        return rng.gamma(np.broadcast_to(disp, p.shape), p / disp)
    if m.family == "beta":
        return rng.beta(p * disp, (1.0 - p) * disp)
    return rng.binomial(np.broadcast_to(n, p.shape).astype(np.int64), np.clip(p, 0.0, 1.0)).astype(float)


def _new_trials(m, new: pd.DataFrame) -> np.ndarray:
    """(n,) trials of new rows: ones unless binomial; the trials= column or the cbind() sum for binomial."""
    if m.family != "binomial":
        return np.ones(len(new))
    if m.trials_column is not None:
        if m.trials_column not in new.columns:
            raise DesignError(f"new_data needs the trials column {m.trials_column!r} of the binomial model")
        return np.asarray(new[m.trials_column], float)
    spec = m.design.spec
    if spec.failures is None:
        return np.ones(len(new))  # a 0/1 response fitted as binomial: one trial per row
    try:
        mm = formulaic.model_matrix(f"0 + I(({spec.response}) + ({spec.failures}))", new, na_action="raise")
    except Exception as exc:
        raise DesignError(f"new_data needs the columns of cbind({spec.response}, {spec.failures}) for the binomial "
                          f"trials: {exc}") from None
    return np.asarray(mm, float)[:, 0]


def _predictor_columns(m) -> dict:
    """Data columns the model uses: {"fixed": in the fixed effects, "groups": grouping factors, "other": in
    random-effect terms, the sigma formula or sigma_by}."""
    cols = set(map(str, m.design.data.columns))

    def variables(expr, spec=None):
        # a fitted formulaic ModelSpec lists every column its terms read, inside stateful transforms too
        # (scale(x), poly(x, 2), center(x), bs(x)); Formula(...).required_variables leaves those out
        found = set(formulaic.Formula(expr).required_variables)
        found |= set(getattr(spec, "required_variables", None) or ())
        return found & cols

    d = m.design
    fixed = variables(d.spec.fixed, d.fixed_spec)
    offsets = set()
    for i, e in enumerate(d.spec.offsets or []):
        specs = getattr(d, "offset_specs", None) or []
        offsets |= variables(e, specs[i] if i < len(specs) else None)
    groups, other = set(), set()
    sspec = m.sigma_spec
    terms = list(m.terms) + (list(sspec.design.terms) if sspec.kind == "formula" else [])
    for t in terms:
        groups |= set(t.factors)
        other |= variables(t.expr, getattr(t, "model_spec", None))
    if sspec.kind == "formula":
        other |= variables(sspec.design.spec.fixed, sspec.design.fixed_spec)
    if sspec.kind == "by":
        other |= {f.strip() for f in sspec.by.split(":")}
    return {"fixed": fixed, "groups": groups - fixed, "other": other | offsets | (groups - fixed)}


def conditional_effects(fit, var: str, resolution: int = 100, prob: float = 0.95, kind: str = "mean",
                        conditions: dict | None = None) -> tuple[pd.DataFrame, bool]:
    """``Fit.conditional_effects`` without the plot: (DataFrame of ``var``, the other predictors' values,
    estimate, lower, upper; whether ``var`` is categorical)."""
    m = fit.model
    data = m.design.data
    used = _predictor_columns(m)
    if var not in data.columns or var not in used["fixed"]:
        raise ValueError(f"conditional_effects: {var!r} is not a predictor of the fixed effects; they use "
                         f"{sorted(used['fixed'])}")
    conditions = dict(conditions or {})
    unknown = [k for k in conditions if k not in data.columns]
    if unknown:
        raise ValueError(f"conditional_effects: conditions name unknown column(s) {unknown}")
    col = data[var]
    levels = categorical_levels(m.design.fixed_spec, data.columns)  # includes C(x) of a numeric x
    categorical = var in levels
    if categorical:
        grid = levels[var]
    else:
        grid = np.linspace(col.min(), col.max(), resolution)
    new = pd.DataFrame({var: grid})
    for c in sorted(used["fixed"] | used["other"]):
        if c == var:
            continue
        if c in conditions:
            new[c] = conditions[c]
        elif c in used["groups"]:
            new[c] = "lmmarg_new_level_"  # an unseen level: its random effects are zero below
        else:
            s = data[c]
            if c in levels:  # a factor: its reference (first fitted) level
                new[c] = pd.Series([levels[c][0]] * len(new), dtype=s.dtype)
            elif pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
                new[c] = s.mean()
            else:  # a non-numeric column outside the fixed part (random slopes, sigma formula)
                ref = (s.cat.categories[0] if isinstance(s.dtype, pd.CategoricalDtype)
                       else sorted(s.unique(), key=str)[0])
                new[c] = pd.Series([ref] * len(new), dtype=s.dtype)
    # binomial: per trial (the probability of success), as brms with trials = 1
    draws = predict(fit, new, kind=kind, new_levels="zero", trials=1 if m.family == "binomial" else None)
    lo, hi = np.quantile(draws, [(1 - prob) / 2, 1 - (1 - prob) / 2], axis=0)
    out = new.drop(columns=[c for c in used["groups"] if c in new.columns and c not in conditions and c != var])
    return out.assign(estimate=draws.mean(0), lower=lo, upper=hi), categorical
