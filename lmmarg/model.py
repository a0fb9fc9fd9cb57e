"""The user-facing model object: formula + data → design → marginal kernels (stage 4 of the pipeline).

>>> import lmmarg
>>> m = lmmarg.Model("Reaction ~ Days + (Days | Subject)", lmmarg.datasets.load("sleepstudy"))
>>> m.fixed_names, [t.name for t in m.terms]
(['Intercept', 'Days'], ['Subject'])
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from . import saving, sources
from ._warnings import warn_user
from .compile.limits import TRACE_LOCK, check_address_space, note_compiled_structure
from .dense_warning import warn_large_dense
from .design import Design, DesignError, build_design
from .families import check_response, error_value, resolve_family
from .inference.mapvi import fit_map, fit_vi
from .inference.ml import fit_ml
from .inference.nuts import sample
from .marginal import ClassSpec, auto_marginalize, build_plan, kernels, laplace, plan_from_statistics
from .marginal.laplace import build_laplace_plan
from .potential import Potential
from .priors import build_priors, build_sigma_spec, sigma_columns
from .results import Fit
from .statdesign import RowsNeeded, StatisticsDesign, require_rows, statistics_design
from .sufficient import SufficientStatistics

__all__ = ["Model", "ModelCache", "load"]


@dataclass
class ModelCache:
    """What a Model computes once and keeps (``model.cache``): compiled functions and device arrays, so it is not
    pickled or saved (``Model.__getstate__`` starts a new one) and everything in it is rebuilt on demand.

    plans: {(marginalized terms, marginalize_beta, per-observation σ) or ("laplace", terms): Plan}, filled by
    ``Model.plan`` / ``Model.laplace_plan``; kernels: {name: jitted engine kernel}, filled by ``Model.kernel``;
    potentials: {(terms, parameterization, marginalize_beta): Potential}, filled by ``Model.potential``;
    ml / laplace_ml: the jitted ML criterion of a Gaussian / GLMM model and its constants, filled by
    lmmarg.inference.ml; mapvi: {(method, terms, ...): compiled objective}, filled by lmmarg.inference.mapvi.
    """

    plans: dict = field(default_factory=dict)
    kernels: dict = field(default_factory=dict)
    potentials: dict = field(default_factory=dict)
    ml: dict | None = None
    laplace_ml: dict | None = None
    mapvi: dict = field(default_factory=dict)


def _ensure_dtype(dtype: str):
    """float64 (the default) needs JAX's x64 mode; Model turns it on (documented in README, 'Precision')."""
    if dtype not in ("float64", "float32"):
        raise ValueError(f"dtype must be 'float64' or 'float32', got {dtype!r}")
    if dtype == "float64" and not jax.config.jax_enable_x64:
        jax.config.update("jax_enable_x64", True)
    return jnp.float64 if dtype == "float64" else jnp.float32


def looks_like_counts(y: np.ndarray) -> bool:
    """Whether a non-negative integer response y (N,) is plausibly a count (for a Poisson / binomial model) rather
    than a score on a bounded graded scale (a 0-10 rating, a Likert item) that a Gaussian model fits well.

    The rule: y has zeros, and either small values dominate (median <= 2: most observations are 0, 1 or 2, as for
    counts of rare events) or it is right-skewed as counts are (sample skewness >= 0.5, median <= 20). A graded
    score spread around the middle of its scale (skewness near 0, median above 2) does not look like counts.
    """
    if y.size < 3 or not np.all(y == np.round(y)) or y.min() < 0 or not (y == 0).any():
        return False
    med = float(np.median(y))
    if med <= 2:
        return True
    sd = float(np.std(y))
    skew = float(np.mean((y - y.mean()) ** 3)) / sd**3 if sd > 0 else 0.0
    return skew >= 0.5 and med <= 20


def _warn_discrete_response(y: np.ndarray, response: str) -> None:
    """Warn when a 0/1 response, or one that looks like counts (``looks_like_counts``), is about to be fitted as
    Gaussian."""
    if not np.all(y == np.round(y)) or y.min() < 0:
        return
    if set(np.unique(y)) <= {0.0, 1.0}:
        warn_user(f"response {response!r} only takes the values 0 and 1 but is fitted as gaussian (a linear "
                  "probability model: predictions are not bounded to [0, 1]); use family='bernoulli' for a "
                  "logistic mixed model")
    elif looks_like_counts(y):
        warn_user(f"response {response!r} looks like counts (non-negative integers with zeros) but is fitted as "
                  "gaussian; use family='poisson' (counts) or family='binomial' with cbind(successes, failures)")


def _glmm_response(design: Design, fam, trials: str | None) -> np.ndarray:
    """The trials (N,) of a GLMM response (ones unless binomial); checks the response against the family."""
    y = design.y
    if design.failures is not None and fam.name != "binomial":
        raise DesignError(f"cbind(successes, failures) is a binomial response; use family='binomial', "
                          f"not {fam.name!r}")
    if trials is not None and fam.name != "binomial":
        raise ValueError(f"trials= applies to family='binomial', not {fam.name!r}")
    if fam.name != "binomial":
        n = np.ones_like(y)
    elif design.failures is not None:
        if trials is not None:
            raise ValueError("give the trials either by cbind(successes, failures) or by trials=, not both")
        if (design.failures < 0).any():
            row = int(np.flatnonzero(design.failures < 0)[0])
            raise DesignError(f"family='binomial': the failures {design.spec.failures!r} are negative "
                              f"({error_value(design.failures[row])}) at row {row}")
        n = y + design.failures
    elif trials is not None:
        n = np.asarray(design.data[trials], dtype=float)
        if _is_proportion(y):
            raise DesignError(f"family='binomial' with trials={trials!r} needs the number of successes, but "
                              f"{design.response!r} is a proportion ({error_value(y[y != np.round(y)][0])}); "
                              f"multiply it by the trials: 'I({_bare(design.response)} * {trials}) ~ ...', "
                              f"trials={trials!r}")
    elif set(np.unique(y)) <= {0.0, 1.0}:
        n = np.ones_like(y)  # a 0/1 response: bernoulli trials, as glmer's binomial family takes it
    elif _is_proportion(y):
        raise DesignError(_proportion_message(design.response))
    else:
        raise DesignError(f"family='binomial' needs the trials: write cbind({design.response}, failures) or pass "
                          f"trials='<column>' (a 0/1 response needs neither: family='bernoulli')")
    check_response(fam, y, n, design.response, trials if trials is not None else
                   (f"{design.response} + {design.spec.failures}" if design.failures is not None else None))
    return n


def _is_proportion(y: np.ndarray) -> bool:
    """y (N,) in [0, 1] with some non-integer value: a proportion of successes, not their number."""
    return bool(y.size and y.min() >= 0 and y.max() <= 1 and (y != np.round(y)).any())


def _bare(expr: str) -> str:
    """``I(expr)`` -> ``expr`` (the inside of one I() call), else ``expr``."""
    m = re.fullmatch(r"I\((.*)\)", expr.strip(), re.S)
    return m.group(1).strip() if m else expr


def _proportion_message(response: str) -> str:
    """What to write for a binomial model of a proportion response (glmer's proportion + weights=trials)."""
    m = re.fullmatch(r"(?P<s>[^/]+?)\s*/\s*(?P<n>[^/]+)", _bare(response))
    if m:  # successes / trials: name both
        s, n = m["s"].strip(), m["n"].strip()
        how = f"write 'cbind({s}, {n} - {s}) ~ ...', or '{s} ~ ...' with trials={n!r}"
    else:
        how = (f"write cbind(successes, failures) ~ ... (e.g. cbind(incidence, size - incidence)), or give the "
               f"successes with trials=: 'I({_bare(response)} * n) ~ ...', trials='n' for the column n of trials")
    return (f"family='binomial' models counts of successes out of trials, but the response {response!r} is a "
            f"proportion; {how} (glmer's proportion with weights=trials is the same model)")


_SAMPLER_SETTINGS = ("sampler settings belong to the fit: Model(...).sample(draws=, warmup=, chains=, seed=, "
                     "adapt_delta=, max_treedepth=)")
_TO_MODEL_PRIORS = ("priors belong to the model: Model(..., priors={'b': dist.Normal(0, 1), 'sd': ...}); see "
                    "model.priors")
# {entry point: {foreign argument name (lme4, brms, statsmodels, PyMC, CmdStan): what to write in lmmarg}}
_FOREIGN = {
    "Model()": {
        "REML": "REML is a way of fitting: Model(...).fit_ml(reml=True)",
        "reml": "REML is a way of fitting: Model(...).fit_ml(reml=True)",
        "control": "optimizer settings go to fit_ml(maxiter=, gtol=, ftol=), NUTS settings to "
                   "sample(adapt_delta=, max_treedepth=)",
        "subset": "subset the data frame first: Model(formula, data[data['x'] > 0])",
        "offset": "write the offset in the formula: 'y ~ x + offset(log(t)) + (1 | g)'",
        "prior": "Model(..., priors={'b': dist.Normal(0, 1), 'sd': ...}) (a dict by brms-like name; see model.priors)",
        "contrasts": "write the contrast in the formula, e.g. 'y ~ C(x, contr.sum) + (1 | g)'",
        "start": "starting values go to the fit: fit_ml(theta0=...)",
        "verbose": "fit_ml(verbose=True)",
        "nAGQ": "GLMM families use the Laplace approximation (glmer's nAGQ=1) in fit_ml(); sample() can draw the "
                "random effects exactly (docs/glmm.md)",
        "groups": "write the grouping in the formula: 'y ~ x + (1 | g)'",
        "re_formula": "write the random effects in the formula: 'y ~ x + (x | g)'",
        "vc_formula": "write the random effects in the formula: 'y ~ x + (1 | g) + (1 | g:h)'",
        **{k: _SAMPLER_SETTINGS for k in ("iter", "warmup", "chains", "cores", "seed", "thin", "backend", "draws",
                                          "adapt_delta", "max_treedepth", "inits", "refresh", "algorithm")},
    },
    "fit_ml()": {
        "REML": "fit_ml(reml=True)",
        "control": "fit_ml(maxiter=, gtol=, ftol=)",
        "start": "fit_ml(theta0=...) (lme4's theta order)",
        "nAGQ": "GLMM families are fitted by the Laplace approximation (glmer's nAGQ=1)",
        "method": "fit_ml(reml=True) for REML, fit_ml() for ML",
    },
    "sample()": {
        "iter": "draws= (post-warmup draws per chain) and warmup=; brms's iter is warmup + draws",
        "cores": "call lmmarg.use_cores(n) right after import lmmarg (brms's cores / mc.cores): chains then run "
                 "in parallel on n CPU cores (chain_method='parallel', the default)",
        "control": "give NUTS options directly: sample(adapt_delta=0.95, max_treedepth=12)",
        "thin": "there is no thinning: draw fewer (draws=) or thin the arrays of fit.samples",
        "refresh": "progress_bar=True or False",
        "backend": "NumPyro's NUTS is the only backend",
        "num_samples": "draws=", "n_samples": "draws=", "samples": "draws=",
        "num_warmup": "warmup=", "tune": "warmup=", "burn": "warmup=", "burnin": "warmup=",
        "num_chains": "chains=", "random_seed": "seed=", "rng_seed": "seed=",
        "inits": "init='mode' or init='center'",
        "target_accept": "adapt_delta= (or target_accept_prob=)",
        "prior": _TO_MODEL_PRIORS, "priors": _TO_MODEL_PRIORS,
    },
    "fit_map()": {
        "iter": "maxiter=", "maxit": "maxiter=", "max_iter": "maxiter=", "control": "maxiter=, gtol=",
        "prior": _TO_MODEL_PRIORS, "priors": _TO_MODEL_PRIORS,
        "REML": "REML estimates come from fit_ml(reml=True)", "reml": "REML estimates come from fit_ml(reml=True)",
    },
    "fit_vi()": {
        "iter": "steps=", "num_steps": "steps=", "n_iter": "steps=", "max_iter": "steps=",
        "output_samples": "draws=", "num_samples": "draws=", "n_draws": "draws=",
        "algorithm": "guide='normal' (brms's meanfield) or guide='lowrank' (close to fullrank)",
        "learning_rate": "lr=", "eta": "lr=",
        "prior": _TO_MODEL_PRIORS, "priors": _TO_MODEL_PRIORS,
    },
}


def _weights_message(family) -> str:
    fam = str(family).lower()
    if "binomial" in fam or "bernoulli" in fam:
        what = ("for a binomial response, glmer's weights are the trials of a proportion: write "
                "cbind(successes, failures) ~ ..., or give the successes with trials='<column>'")
    elif "poisson" in fam:
        what = "for exposures use an offset in the formula: 'y ~ x + offset(log(exposure)) + (1 | g)'"
    else:
        what = ("for a residual SD that differs between groups or with predictors use sigma_by='g' or a sigma "
                "formula sigma='~ x' (estimated, not known weights); for frequency weights repeat the rows: "
                "data.loc[data.index.repeat(w)]")
    return f"prior weights are not supported; {what}"


def refuse_foreign_arguments(where: str, kwargs: dict, family=None) -> None:
    """Raise a TypeError for a keyword argument of lme4 / brms / statsmodels / PyMC that ``where`` ("Model()",
    "fit_ml()", "sample()", "fit_map()", "fit_vi()") does not take, naming lmmarg's spelling. For "Model()" every
    remaining keyword is refused (listing Model's arguments); for the fits others pass on to the fit function,
    which reports them."""
    for k in kwargs:
        hint = _weights_message(family) if (where == "Model()" and k == "weights") else _FOREIGN[where].get(k)
        if hint is not None:
            raise TypeError(f"{where} got an unexpected keyword argument {k!r} (an lme4/brms name?): {hint}")
    if where == "Model()" and kwargs:
        own = [p for p in inspect.signature(Model.__init__).parameters if p not in ("self", "kwargs")]
        raise TypeError(f"Model() got an unexpected keyword argument {next(iter(kwargs))!r}; its arguments are "
                        f"{', '.join(own)}")


class Model:
    """A linear mixed model given by an lme4 formula, e.g. ``"Reaction ~ Days + (Days | Subject)"``.

    Parameters
    ----------
    formula: lme4 syntax (bars ``|``, ``||``, ``a/b``, ``a:b``; formulaic syntax elsewhere).
    data: pandas DataFrame (or dict of columns); or data that need not fit in memory, summarized by sufficient
    statistics (docs/guide.md, "Large data"): a Parquet / CSV file, a directory, a glob or a list of them, a
    ``pyarrow.dataset.Dataset``, a ``dask.dataframe.DataFrame`` (streamed by ``lmmarg.sources``), or a
    ``lmmarg.sufficient.SufficientStatistics`` (``lmmarg.sufficient_statistics``, saved, loaded, added across
    sites). Such a model has every term integrated out and a scalar σ; what needs the rows raises
    ``lmmarg.statdesign.RowsNeeded`` naming the feature.
    na_action: "raise" (default) or "drop" (drop rows with NaN/inf in used columns, with a warning).
    dtype: "float64" (default; turns on ``jax_enable_x64``) or "float32".
    priors: {brms-like name: NumPyro distribution or number (fixes it)}; see lmmarg.priors and ``model.priors``.
    sigma_by: grouping column(s) ("g" or "a:b"): one residual SD per level.
    sigma: distributional formula for log(residual SD), e.g. "~ cond + (cond | subj)".
    family: "gaussian" (default), "lognormal", or a GLMM family whose random effects are Laplace-marginalized
    (docs/glmm.md): "bernoulli" (0/1 response), "binomial" (``cbind(successes, failures) ~ ...`` or
    ``trials=``), "poisson"; a link as ``link="probit"`` or ``"bernoulli(probit)"`` (logit and log by default).
    trials: binomial only, the column of the number of trials (instead of cbind).
    progress: a progress bar over the chunks of a file / Dask source (None: when stderr is a terminal).
    dense_limit: largest dense Schur block (crossed terms) the engine may factorize; default: set by the machine's
    memory (lmmarg.marginal.plan.default_dense_limit, ~11,000 in float64 with 24 GiB). Blocks above
    ``LARGE_DENSE`` are allowed but warn with the measured cost of one evaluation.

    lme4 / brms argument names (``REML=``, ``weights=``, ``control=``, ``iter=``, ``prior=`` ...) raise a TypeError
    that names lmmarg's way to say the same (``refuse_foreign_arguments``); prior weights are not supported.

    ``model.cache`` (``ModelCache``) keeps what the model and the fitting modules compute once (plans, compiled
    kernels, potentials, ML / MAP objectives); it is not pickled or saved.
    """

    def __init__(self, formula: str, data, *, family: str = "gaussian", link: str | None = None,
                 trials: str | None = None, na_action: str = "raise", dtype: str = "float64",
                 priors: dict | None = None, sigma_by: str | None = None, sigma: str | None = None,
                 dense_limit: int | None = None, progress: bool | None = None, **kwargs):
        if kwargs:  # lme4 / brms habits: say what to write instead of Python's bare TypeError
            refuse_foreign_arguments("Model()", kwargs, family=family)
        if not isinstance(formula, str) and isinstance(data, str):
            raise TypeError(f"Model(formula, data): the formula comes first, then the data, e.g. "
                            f"Model({data!r}, df); got a {type(formula).__name__} as the formula")
        check_address_space("Model()")   # before JAX starts its CPU client (XLA aborts under a low ulimit -v)
        self.dtype = _ensure_dtype(dtype)
        self.dense_limit = None if dense_limit is None else int(dense_limit)
        fam = resolve_family(family, link)
        self.statistics = None   # the SufficientStatistics of a model built without rows, else None
        if isinstance(data, SufficientStatistics) or sources.is_source(data):
            self._init_from_statistics(formula, data, fam, trials=trials, na_action=na_action, priors=priors,
                                       sigma_by=sigma_by, sigma=sigma, progress=progress)
            return
        extra = sigma_columns(sigma_by, sigma)
        if trials is not None:
            extra[trials] = "trials="
        # the residual-scale columns join the formula's in the checks and the missing-value handling
        self.design: Design = build_design(formula, data, na_action=na_action, extra_columns=extra,
                                           residual=not fam.is_glmm)
        self.family_spec = fam
        self.family, self.link = fam.name, fam.link
        y = self.design.y
        self.trials_column = trials
        self.trials = None   # (N,) trials of a GLMM response (ones unless binomial), None for Gaussian families
        if fam.is_glmm:
            self.trials = _glmm_response(self.design, fam, trials)
        elif self.design.failures is not None:
            raise DesignError(f"cbind(successes, failures) is a binomial response; use family='binomial', not "
                              f"{fam.name!r}")
        elif trials is not None:
            raise ValueError(f"trials= applies to family='binomial', not {fam.name!r}")
        if fam.name == "gaussian":
            _warn_discrete_response(y, self.design.response)
        if fam.name == "lognormal":
            if (y <= 0).any():
                row = int(np.flatnonzero(y <= 0)[0])
                raise DesignError(f"family='lognormal' needs a positive response, but {self.design.response!r} "
                                  f"is {y[row]} at row {row}")
            y = np.log(y)
        if self.design.offset is not None and not fam.is_glmm:
            y = y - self.design.offset  # offset(...) terms: a known part of the linear predictor
        # (N,) the Gaussian-scale working response: y (log y for lognormal) minus any offset; for a GLMM family the
        # successes / counts themselves (the offset enters the linear predictor in the Laplace kernels)
        self.y = y
        self.log_jacobian = float(-np.log(self.design.y).sum()) if fam.name == "lognormal" else 0.0
        self.cache = ModelCache()
        self.sigma_spec = build_sigma_spec(self.design, sigma_by=sigma_by, sigma=sigma, na_action=na_action,
                                           has_sigma=not fam.is_glmm, dispersion=fam.dispersion)
        if self.sigma_spec.kind == "formula" and self.sigma_spec.design.spec.offsets:
            raise ValueError(f"the sigma formula {sigma!r} cannot have an offset() term")
        self._priors = build_priors(self, priors)

    def _init_from_statistics(self, formula, data, fam, *, trials, na_action, priors, sigma_by, sigma,
                              progress) -> None:
        """The model of a data set known by its sufficient statistics (``data``: SufficientStatistics or a source
        that ``lmmarg.sources.sufficient_statistics`` streams)."""
        if fam.is_glmm:
            raise RowsNeeded(f"family={fam.name!r} needs the rows of the data (its random effects are integrated out "
                             "by a Laplace approximation at a per-row mode); sufficient statistics serve the Gaussian "
                             "families 'gaussian' and 'lognormal'. Pass a pandas DataFrame (or a sample of one)")
        for arg, value in (("sigma_by=", sigma_by), ("sigma=", sigma), ("trials=", trials)):
            if value is not None:
                raise RowsNeeded(f"{arg} needs the rows of the data (a residual SD that varies over rows); a model "
                                 "from sufficient statistics has one residual SD. Pass a pandas DataFrame")
        stats = data if isinstance(data, SufficientStatistics) else sources.sufficient_statistics(
            formula, data, family=fam.name, na_action=na_action, progress=progress)
        theirs = stats.meta.get("family", "gaussian")
        if theirs != fam.name:
            raise DesignError(f"the statistics were computed for family={theirs!r}, not {fam.name!r} (lognormal "
                              "statistics are sums of log y); compute them again with this family")
        self.statistics = stats
        self.design: StatisticsDesign = statistics_design(formula, stats, spec=getattr(stats, "design_spec", None))
        self.family_spec = fam
        self.family, self.link = fam.name, fam.link
        self.trials_column, self.trials = None, None
        self.y = None   # no rows: the plan reads the statistics
        self.log_jacobian = float(-stats.sum_log_y) if fam.name == "lognormal" else 0.0
        self.cache = ModelCache()
        self.sigma_spec = build_sigma_spec(self.design)
        self._priors = build_priors(self, priors)

    # -- pickling: caches hold local closures and compiled kernels; they are rebuilt on demand ---------------
    def __getstate__(self) -> dict:
        """Pickle the model without its cache (``ModelCache``: plans, compiled kernels, potentials, the ML / MAP
        objectives): it holds compiled functions and device arrays, and is rebuilt on demand."""
        state = dict(self.__dict__)
        state["cache"] = ModelCache()
        return state

    def __setstate__(self, state: dict) -> None:
        # a model pickled by an older lmmarg: its caches under their own names (_plans, _ml_cache, ...) are dropped
        state = {k: v for k, v in state.items() if k not in ("_plans", "_jitted", "_potentials")
                 and not k.endswith("_cache")}
        self.__dict__.update(state)
        self.cache = ModelCache()
        if "family_spec" not in state:  # a model pickled before GLMM families
            self.family_spec = resolve_family(self.family)
            self.link, self.trials, self.trials_column = self.family_spec.link, None, None
        if "dense_limit" not in state:  # a model pickled before dense_limit
            self.dense_limit = None
        if "statistics" not in state:  # a model pickled before models from sufficient statistics
            self.statistics = None
        _ensure_dtype("float64" if self.dtype == jnp.float64 else "float32")

    # -- names (contract) ---------------------------------------------------------------------------------------
    @property
    def formula(self) -> str:
        return self.design.spec.formula

    @property
    def fixed_names(self) -> list[str]:
        return self.design.fixed_names

    @property
    def terms(self):
        return self.design.terms

    @property
    def structure(self):
        return self.design.structure

    @property
    def n_obs(self) -> int:
        return self.design.n_obs

    @property
    def priors(self):
        """The prior table (lmmarg.priors.PriorSet): ``print(model.priors)``."""
        return self._priors

    def __repr__(self) -> str:
        fam = self.family_spec
        title = (f"Generalized linear mixed model ({fam.name}, {fam.link} link)" if fam.is_glmm else
                 "Linear mixed model (lognormal: Gaussian on log y)" if fam.name == "lognormal" else
                 "Linear mixed model")
        return self.design.summary(title=title)

    # -- marginal engine --------------------------------------------------------------------------------------
    def resolve_marginalize(self, marginalize="all") -> tuple[int, ...]:
        """Term indices to integrate out: "all", "none", "auto" (largest set with a small dense block) or names."""
        names = [t.name for t in self.terms]
        if self.statistics is not None and not (isinstance(marginalize, str) and marginalize in ("all", "auto")):
            if isinstance(marginalize, str) or sorted(set(marginalize)) != sorted(names):
                require_rows(self, f"marginalize={marginalize!r} (terms left to HMC)")
            return tuple(range(len(names)))
        if isinstance(marginalize, str):
            if marginalize == "all":
                return tuple(range(len(names)))
            if marginalize == "none":
                return ()
            if marginalize == "auto" and self.statistics is not None:
                return tuple(range(len(names)))
            if marginalize == "auto":
                return tuple(sorted(auto_marginalize(self.class_specs(), dense_limit=self.auto_dense_limit)))
            marginalize = [marginalize]
        out = []
        for name in marginalize:
            if name not in names:
                raise ValueError(f"cannot marginalize unknown term {name!r}; terms are {names}")
            out.append(names.index(name))
        return tuple(sorted(set(out)))

    @property
    def auto_dense_limit(self) -> int:
        """Largest dense Schur block `marginalize="auto"` accepts: max(32, (20 N)^(1/3)), so that its O(n_D³)
        factorization per gradient costs about as much as a linear pass over the data (docs/math.md, 5)."""
        return max(32, int(round((20 * self.n_obs) ** (1 / 3))))

    def class_specs(self):
        """The terms as engine inputs (lmmarg.marginal.ClassSpec), in term order."""
        require_rows(self, "the terms' row matrices (class_specs)")
        return [ClassSpec(name=t.name, Z=t.Z, codes=t.codes, n_groups=t.n_groups) for t in self.terms]

    def plan(self, marginalize="all", marginalize_beta: bool = False, per_obs_sigma: bool | None = None):
        """The (cached) precomputed plan of the marginal kernels for this marginalization choice.

        per_obs_sigma: whether kernels will get a per-observation σ (N,); default: the model's σ structure
        (``sigma_by``/``sigma`` formula). Plans for a scalar σ skip index tables only a vector σ needs.
        """
        if per_obs_sigma is None or self.family_spec.is_glmm:  # Laplace: per-observation weights
            per_obs_sigma = self.sigma_spec.kind != "constant"
        key = (self.resolve_marginalize(marginalize), bool(marginalize_beta), bool(per_obs_sigma))
        plans = self.cache.plans
        if key not in plans and self.statistics is not None:
            if key[2]:
                require_rows(self, "a per-observation sigma")
            plans[key] = plan_from_statistics(self.statistics.engine_arrays(), marginalize_beta=key[1],
                                              dense_limit=self.dense_limit, dtype=self.dtype)
            warn_large_dense(plans[key])
        if key not in plans:
            plans[key] = build_plan(self.design.X, self.y, self.class_specs(), list(key[0]),
                                    marginalize_beta=key[1], scalar_sigma=not key[2], dtype=self.dtype,
                                    dense_limit=self.dense_limit)
            warn_large_dense(plans[key])
        return plans[key]

    def laplace_plan(self, marginalize="all"):
        """The (cached) plan of the Laplace kernels (lmmarg.marginal.laplace) of a GLMM family."""
        if not self.family_spec.is_glmm:
            raise ValueError(f"family {self.family!r} is Gaussian: use plan() (exact marginal)")
        key = ("laplace", self.resolve_marginalize(marginalize))
        plans = self.cache.plans
        if key not in plans:
            plans[key] = build_laplace_plan(self.plan(marginalize), self.family_spec, self.design.X,
                                            self.y, self.trials, self.class_specs(), self.design.offset)
        return plans[key]

    def _scales(self, cov: dict) -> tuple:
        """Lower-triangular factors Λ (Σ = ΛΛᵀ) of the covariance dict, in term order; None if not PSD."""
        missing = [t.name for t in self.terms if t.name not in cov]
        unknown = [k for k in cov if k not in {t.name for t in self.terms}]
        if missing or unknown:
            raise ValueError(f"cov must have one (d, d) matrix per term {[t.name for t in self.terms]}; "
                             f"missing {missing}, unknown {unknown}")
        scales = []
        for t in self.terms:
            S = np.atleast_2d(np.asarray(cov[t.name], dtype=float))
            if S.shape != (t.d, t.d):
                raise ValueError(f"cov[{t.name!r}] must be {t.d}x{t.d} (columns {t.columns}), got {S.shape}")
            if not np.isfinite(S).all() or not np.allclose(S, S.T):
                return None
            try:
                L = np.linalg.cholesky(S)
            except np.linalg.LinAlgError:
                w, V = np.linalg.eigh(S)
                if w.min() < -1e-10 * max(w.max(), 1.0):
                    return None
                L = np.linalg.qr((V * np.sqrt(np.clip(w, 0, None))).T, mode="r").T  # lower-tri, LLᵀ = S
            scales.append(L)
        return tuple(scales)

    def kernel(self, name: str):
        """The jitted engine kernel `name` for this model's family (lmmarg.marginal.kernels for Gaussian models,
        lmmarg.marginal.laplace for GLMMs, e.g. "log_marginal", "conditional_mean"), compiled once per model."""
        jitted = self.cache.kernels
        if name not in jitted:
            mod = laplace if self.family_spec.is_glmm else kernels
            names = sorted(n for n in mod.__all__                  # functions, not records or constants
                           if callable(getattr(mod, n)) and not isinstance(getattr(mod, n), type))
            if name not in names:
                raise ValueError(f"{mod.__name__} has no kernel {name!r}; its kernels are {names}")
            note_compiled_structure()   # JAX keeps its executables per shape (bounded by lmmarg.compile.limits)
            jitted[name] = jax.jit(getattr(mod, name))   # public: may run inside a user's jit
        return jitted[name]

    def _beta(self, beta):
        beta = jnp.asarray(np.asarray(beta, dtype=float).reshape(-1), self.dtype)
        if beta.shape != (len(self.fixed_names),):
            raise ValueError(f"beta must have {len(self.fixed_names)} entries {self.fixed_names}")
        return beta

    def _check_sigma(self, sigma) -> None:
        if self.family_spec.is_glmm and sigma is not None:
            raise ValueError(f"family {self.family!r} has no residual SD: pass sigma=None")
        if not self.family_spec.is_glmm and sigma is None:
            raise ValueError("sigma (the residual SD) is required for a Gaussian family")

    def _dispersion(self, dispersion):
        """The dispersion argument of the Laplace kernels: required by negbinomial / gamma / beta, refused else."""
        site = self.family_spec.dispersion
        if site is None:
            if dispersion is not None:
                raise ValueError(f"family {self.family!r} has no dispersion parameter: pass dispersion=None")
            return None
        if dispersion is None or not np.ndim(dispersion) == 0 or not float(dispersion) > 0:
            raise ValueError(f"family {self.family!r} needs dispersion= (its {site!r}, a number > 0), got "
                             f"{dispersion!r}")
        return jnp.asarray(float(dispersion), self.dtype)

    def log_marginal(self, beta, sigma, cov, *, dispersion=None) -> float:
        """log p(y | β, σ, Σ) with every random-effect term integrated out (lme4's ML logLik at its estimates).

        beta: (p,) in `fixed_names` order; sigma: residual SD (None for a GLMM family); cov: {term.name: (d, d)
        covariance}. For family="lognormal" the density is of y itself (Jacobian of log y included). For a GLMM
        family it is the Laplace approximation at the conditional mode (glmer's nAGQ = 1 logLik); dispersion: the
        shape (negbinomial, gamma) or phi (beta) of the families that have one (glmmTMB's sigma(fit) for
        nbinom2, 1 / sigma(fit)^2 for Gamma, sigma(fit) for beta_family).
        Returns -inf for a covariance that is not positive semi-definite.
        """
        self._check_sigma(sigma)
        disp = self._dispersion(dispersion)
        scales = self._scales(cov)
        if scales is None:
            return -np.inf
        beta = self._beta(beta)
        lams = tuple(jnp.asarray(L, self.dtype) for L in scales)
        if self.family_spec.is_glmm:
            return float(self.kernel("log_marginal")(self.laplace_plan(), beta, lams, dispersion=disp))
        plan = self.plan("all", per_obs_sigma=np.ndim(sigma) > 0)
        val = self.kernel("log_marginal")(plan, beta, jnp.asarray(sigma, self.dtype),
                                          tuple(jnp.asarray(L, self.dtype) for L in scales))
        return float(val) + self.log_jacobian

    def ranef_mean(self, beta, sigma, cov, *, dispersion=None) -> dict:
        """Conditional means E[u | y, β, σ, Σ] (lme4's conditional modes): {term.name: (n_groups, d)}.

        For a GLMM family (sigma=None): the conditional modes û (lme4's ranef), the mean of the Laplace Gaussian;
        dispersion= as in ``log_marginal``."""
        self._check_sigma(sigma)
        disp = self._dispersion(dispersion)
        scales = self._scales(cov)
        if scales is None:
            raise ValueError("cov is not positive semi-definite")
        beta = self._beta(beta)
        if self.family_spec.is_glmm:
            modes = self.kernel("conditional_modes")(self.laplace_plan(), beta,
                                                     tuple(jnp.asarray(L, self.dtype) for L in scales),
                                                     dispersion=disp)
            return {t.name: np.asarray(m) for t, m in zip(self.terms, modes)}
        plan = self.plan("all", per_obs_sigma=np.ndim(sigma) > 0)
        means = self.kernel("conditional_mean")(plan, beta, jnp.asarray(sigma, self.dtype),
                                                tuple(jnp.asarray(L, self.dtype) for L in scales))
        return {t.name: np.asarray(m) for t, m in zip(self.terms, means)}

    # -- Bayesian inference on the marginal ------------------------------------------------------------------
    def potential(self, marginalize="all", parameterization=None, marginalize_beta: bool = False):
        """Drop-in NumPyro potential (lmmarg.potential.Potential): potential_fn, init_params, constrain, recover.
        marginalize_beta: integrate the fixed effects out too (normal priors; drawn exactly by ``recover``)."""
        key = (self.resolve_marginalize(marginalize), repr(parameterization), bool(marginalize_beta))
        potentials = self.cache.potentials
        with TRACE_LOCK:   # threads sharing this model build one potential (its construction traces the model)
            if key not in potentials:
                potentials[key] = Potential(self, marginalize=marginalize, parameterization=parameterization,
                                            marginalize_beta=marginalize_beta)
            return potentials[key]

    def numpyro_model(self, marginalize="all", parameterization=None):
        """A plain NumPyro model (no arguments; marginal log-likelihood as numpyro.factor) for Predictive/SVI."""
        return self.potential(marginalize, parameterization).model_fn

    def sample(self, draws: int = 1000, warmup: int = 1000, chains: int = 4, seed: int = 0, marginalize="all",
               chain_method: str = "parallel", progress_bar=True, parameterization=None, recover: bool = True,
               compilation_cache=None, init: str = "mode", marginalize_beta: bool | None = None, **nuts_kwargs):
        """NUTS on the global parameters, random effects recovered exactly; see lmmarg.inference.nuts.sample.

        parameterization: for terms left to HMC, "noncentered" (default), "centered" or "conditional" (offsets
        from the effects' approximate conditional mean, scaled by their conditional SD: exact, and the right
        geometry when the data dominate, e.g. thousands of levels with hundreds of observations each), one string
        or {term: ...}; "laplace" for GLMM families (docs/glmm.md).

        init: "mode" (default; chains start near the posterior mode and move in coordinates whitened by its
        curvature) or "center" (a jittered data-scaled start, unit scales).
        marginalize_beta: integrate the fixed effects out as well (Gaussian families, a normal prior on every
        fixed effect) and draw them exactly afterwards. None (default): when every term is marginalized and every
        fixed effect has a normal prior (measured to win there; docs/guide.md section 4).
        nuts_kwargs: NUTS options, e.g. adapt_delta / target_accept_prob, max_treedepth / max_tree_depth,
        dense_mass; unknown keywords raise a TypeError listing the valid ones. Diagnostics problems (divergences,
        R-hat, ESS, tree depth) are reported as SamplerWarning after the fit, as brms does.
        """
        refuse_foreign_arguments("sample()", nuts_kwargs)
        return sample(self, draws=draws, warmup=warmup, chains=chains, seed=seed, marginalize=marginalize,
                      chain_method=chain_method, progress_bar=progress_bar, parameterization=parameterization,
                      recover=recover, compilation_cache=compilation_cache, init=init,
                      marginalize_beta=marginalize_beta, **nuts_kwargs)

    # -- inference (each lives in its own module) ---------------------------------------------------------------
    def fit_ml(self, reml: bool = False, **kwargs):
        """Maximum likelihood (or REML) estimates with lme4 parity; see lmmarg.inference.ml."""
        refuse_foreign_arguments("fit_ml()", kwargs)
        return fit_ml(self, reml=reml, **kwargs)

    def fit_map(self, **kwargs):
        """Posterior mode of the global parameters on the marginal; see lmmarg.inference.mapvi."""
        refuse_foreign_arguments("fit_map()", kwargs)
        return fit_map(self, **kwargs)

    def fit_vi(self, guide: str = "normal", **kwargs):
        """Variational fit (NumPyro SVI, AutoGuide) on the marginal; see lmmarg.inference.mapvi."""
        refuse_foreign_arguments("fit_vi()", kwargs)
        return fit_vi(self, guide=guide, **kwargs)


def load(path, allow_pickle: bool = False):
    """Read a fit written by ``Fit.save(path)``, checking its checksums (lmmarg.saving.load_fit) -> Fit.

    allow_pickle=True also reads pickled content (files of lmmarg 0.1, or items ``save`` warned it pickled):
    unpickling runs code stored in the file, so pass it only for files you trust. Defined here, above both the
    Model and its results, because loading rebuilds the Model from the saved formula, data and options."""
    return saving.load_fit(path, allow_pickle=allow_pickle, model_class=Model, fit_class=Fit)
