"""The user-facing model object: formula + data → design → marginal kernels (stage 4 of the pipeline).

>>> import lmmarg
>>> m = lmmarg.Model("Reaction ~ Days + (Days | Subject)", lmmarg.datasets.load("sleepstudy"))
>>> m.fixed_names, [t.name for t in m.terms]
(['Intercept', 'Days'], ['Subject'])
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .design import Design, DesignError, build_design

__all__ = ["Model"]


def _ensure_dtype(dtype: str):
    """float64 (the default) needs JAX's x64 mode; Model turns it on (documented in README, 'Precision')."""
    if dtype not in ("float64", "float32"):
        raise ValueError(f"dtype must be 'float64' or 'float32', got {dtype!r}")
    if dtype == "float64" and not jax.config.jax_enable_x64:
        jax.config.update("jax_enable_x64", True)
    return jnp.float64 if dtype == "float64" else jnp.float32


def _warn_discrete_response(y: np.ndarray, response: str) -> None:
    """Warn when a 0/1 or count response is about to be fitted as Gaussian."""
    if not np.all(y == np.round(y)) or y.min() < 0:
        return
    from ._warnings import warn_user
    if set(np.unique(y)) <= {0.0, 1.0}:
        warn_user(f"response {response!r} only takes the values 0 and 1 but is fitted as gaussian (a linear "
                  "probability model: predictions are not bounded to [0, 1]); use family='bernoulli' for a "
                  "logistic mixed model")
    elif (y == 0).any() and np.median(y) <= 20:
        warn_user(f"response {response!r} looks like counts (non-negative integers with zeros) but is fitted as "
                  "gaussian; use family='poisson' (counts) or family='binomial' with cbind(successes, failures)")


def _glmm_response(design: Design, fam, trials: str | None) -> np.ndarray:
    """The trials (N,) of a GLMM response (ones unless binomial); checks the response against the family."""
    from .families import check_response
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
                              f"({design.failures[row]:g}) at row {row}")
        n = y + design.failures
    elif trials is not None:
        n = np.asarray(design.data[trials], dtype=float)
    elif set(np.unique(y)) <= {0.0, 1.0}:
        n = np.ones_like(y)  # a 0/1 response: bernoulli trials, as glmer's binomial family takes it
    else:
        raise DesignError(f"family='binomial' needs the trials: write cbind({design.response}, failures) or pass "
                          f"trials='<column>' (a 0/1 response needs neither: family='bernoulli')")
    check_response(fam, y, n, design.response, trials if trials is not None else
                   (f"{design.response} + {design.spec.failures}" if design.failures is not None else None))
    return n


def warn_large_dense(plan) -> None:
    """Say what a large dense Schur block costs (measured here), once per plan: slow is allowed, silent is not."""
    from .marginal.plan import LARGE_DENSE, dense_seconds
    n = plan.dense_size
    if n <= LARGE_DENSE:
        return
    from ._warnings import warn_user
    dense = [plan.unit_names[u] for u in range(plan.n_chain_units, len(plan.unit_dims))]
    t = dense_seconds(n)
    warn_user(f"the crossed term(s) {dense} form a dense Schur block of size {n} ({8 * n * n / 2**20:.0f} MB): every "
              f"likelihood evaluation factorizes it, about {t:.2g} s per value and gradient on this machine "
              f"(fit_ml needs 30-100 evaluations, NUTS one per leapfrog step); for NUTS leave some of them to HMC "
              "(marginalize='auto' or a list of term names), with parameterization={term: 'conditional'} for terms "
              "with many observations per level (docs/guide.md, section 4)")


class Model:
    """A linear mixed model given by an lme4 formula, e.g. ``"Reaction ~ Days + (Days | Subject)"``.

    Parameters
    ----------
    formula: lme4 syntax (bars ``|``, ``||``, ``a/b``, ``a:b``; formulaic syntax elsewhere).
    data: pandas DataFrame (or dict of columns).
    na_action: "raise" (default) or "drop" (drop rows with NaN/inf in used columns, with a warning).
    dtype: "float64" (default; turns on ``jax_enable_x64``) or "float32".
    priors: {brms-like name: NumPyro distribution or number (fixes it)}; see lmmarg.priors and ``model.priors``.
    sigma_by: grouping column(s) ("g" or "a:b"): one residual SD per level.
    sigma: distributional formula for log(residual SD), e.g. "~ cond + (cond | subj)".
    family: "gaussian" (default), "lognormal", or a GLMM family whose random effects are Laplace-marginalized
    (docs/glmm.md): "bernoulli" (0/1 response), "binomial" (``cbind(successes, failures) ~ ...`` or
    ``trials=``), "poisson"; a link as ``link="probit"`` or ``"bernoulli(probit)"`` (logit and log by default).
    trials: binomial only, the column of the number of trials (instead of cbind).
    dense_limit: largest dense Schur block (crossed terms) the engine may factorize; default: set by the machine's
    memory (lmmarg.marginal.plan.default_dense_limit, ~11,000 in float64 with 24 GiB). Blocks above
    ``LARGE_DENSE`` are allowed but warn with the measured cost of one evaluation.
    """

    def __init__(self, formula: str, data, *, family: str = "gaussian", link: str | None = None,
                 trials: str | None = None, na_action: str = "raise", dtype: str = "float64",
                 priors: dict | None = None, sigma_by: str | None = None, sigma: str | None = None,
                 dense_limit: int | None = None):
        self.dtype = _ensure_dtype(dtype)
        self.dense_limit = None if dense_limit is None else int(dense_limit)
        from .families import resolve_family
        from .priors import build_priors, build_sigma_spec, sigma_columns
        fam = resolve_family(family, link)
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
        self._plans: dict = {}
        self._jitted: dict = {}
        self.sigma_spec = build_sigma_spec(self.design, sigma_by=sigma_by, sigma=sigma, na_action=na_action,
                                           has_sigma=not fam.is_glmm)
        if self.sigma_spec.kind == "formula" and self.sigma_spec.design.spec.offsets:
            raise ValueError(f"the sigma formula {sigma!r} cannot have an offset() term")
        self._priors = build_priors(self, priors)
        self._potentials: dict = {}

    # -- pickling: caches hold local closures and compiled kernels; they are rebuilt on demand ---------------
    def __getstate__(self) -> dict:
        """Pickle the model without its caches (plans, compiled kernels, potentials, the ML / MAP caches): they
        hold compiled functions and device arrays, and are rebuilt on demand."""
        state = {k: v for k, v in self.__dict__.items() if not k.endswith("_cache")}
        state["_plans"], state["_jitted"], state["_potentials"] = {}, {}, {}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if "family_spec" not in state:  # a model pickled before GLMM families
            from .families import resolve_family
            self.family_spec = resolve_family(self.family)
            self.link, self.trials, self.trials_column = self.family_spec.link, None, None
        self.__dict__.setdefault("dense_limit", None)
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
        return self.design.summary()

    # -- marginal engine --------------------------------------------------------------------------------------
    def resolve_marginalize(self, marginalize="all") -> tuple[int, ...]:
        """Term indices to integrate out: "all", "none", "auto" (largest set with a small dense block) or names."""
        names = [t.name for t in self.terms]
        if isinstance(marginalize, str):
            if marginalize == "all":
                return tuple(range(len(names)))
            if marginalize == "none":
                return ()
            if marginalize == "auto":
                from .marginal import auto_marginalize
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
        from .marginal import ClassSpec
        return [ClassSpec(name=t.name, Z=t.Z, codes=t.codes, n_groups=t.n_groups) for t in self.terms]

    def plan(self, marginalize="all", marginalize_beta: bool = False, per_obs_sigma: bool | None = None):
        """The (cached) precomputed plan of the marginal kernels for this marginalization choice.

        per_obs_sigma: whether kernels will get a per-observation σ (N,); default: the model's σ structure
        (``sigma_by``/``sigma`` formula). Plans for a scalar σ skip index tables only a vector σ needs.
        """
        from .marginal import build_plan
        if per_obs_sigma is None or self.family_spec.is_glmm:  # Laplace: per-observation weights
            per_obs_sigma = self.sigma_spec.kind != "constant"
        key = (self.resolve_marginalize(marginalize), bool(marginalize_beta), bool(per_obs_sigma))
        if key not in self._plans:
            self._plans[key] = build_plan(self.design.X, self.y, self.class_specs(), list(key[0]),
                                          marginalize_beta=key[1], scalar_sigma=not key[2], dtype=self.dtype,
                                          dense_limit=self.dense_limit)
            warn_large_dense(self._plans[key])
        return self._plans[key]

    def laplace_plan(self, marginalize="all"):
        """The (cached) plan of the Laplace kernels (lmmarg.marginal.laplace) of a GLMM family."""
        if not self.family_spec.is_glmm:
            raise ValueError(f"family {self.family!r} is Gaussian: use plan() (exact marginal)")
        from .marginal.laplace import build_laplace_plan
        key = ("laplace", self.resolve_marginalize(marginalize))
        if key not in self._plans:
            self._plans[key] = build_laplace_plan(self.plan(marginalize), self.family_spec, self.design.X,
                                                  self.y, self.trials, self.class_specs(), self.design.offset)
        return self._plans[key]

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
        from .marginal import kernels, laplace
        if name not in self._jitted:
            mod = laplace if self.family_spec.is_glmm else kernels
            names = sorted(n for n in mod.__all__                  # functions, not records or constants
                           if callable(getattr(mod, n)) and not isinstance(getattr(mod, n), type))
            if name not in names:
                raise ValueError(f"{mod.__name__} has no kernel {name!r}; its kernels are {names}")
            self._jitted[name] = jax.jit(getattr(mod, name))   # public: may run inside a user's jit
        return self._jitted[name]

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

    def log_marginal(self, beta, sigma, cov) -> float:
        """log p(y | β, σ, Σ) with every random-effect term integrated out (lme4's ML logLik at its estimates).

        beta: (p,) in `fixed_names` order; sigma: residual SD (None for a GLMM family); cov: {term.name: (d, d)
        covariance}. For family="lognormal" the density is of y itself (Jacobian of log y included). For a GLMM
        family it is the Laplace approximation at the conditional mode (glmer's nAGQ = 1 logLik).
        Returns -inf for a covariance that is not positive semi-definite.
        """
        self._check_sigma(sigma)
        scales = self._scales(cov)
        if scales is None:
            return -np.inf
        beta = self._beta(beta)
        lams = tuple(jnp.asarray(L, self.dtype) for L in scales)
        if self.family_spec.is_glmm:
            return float(self.kernel("log_marginal")(self.laplace_plan(), beta, lams))
        plan = self.plan("all", per_obs_sigma=np.ndim(sigma) > 0)
        val = self.kernel("log_marginal")(plan, beta, jnp.asarray(sigma, self.dtype),
                                          tuple(jnp.asarray(L, self.dtype) for L in scales))
        return float(val) + self.log_jacobian

    def ranef_mean(self, beta, sigma, cov) -> dict:
        """Conditional means E[u | y, β, σ, Σ] (lme4's conditional modes): {term.name: (n_groups, d)}.

        For a GLMM family (sigma=None): the conditional modes û (lme4's ranef), the mean of the Laplace Gaussian."""
        self._check_sigma(sigma)
        scales = self._scales(cov)
        if scales is None:
            raise ValueError("cov is not positive semi-definite")
        beta = self._beta(beta)
        if self.family_spec.is_glmm:
            modes = self.kernel("conditional_modes")(self.laplace_plan(), beta,
                                                     tuple(jnp.asarray(L, self.dtype) for L in scales))
            return {t.name: np.asarray(m) for t, m in zip(self.terms, modes)}
        plan = self.plan("all", per_obs_sigma=np.ndim(sigma) > 0)
        means = self.kernel("conditional_mean")(plan, beta, jnp.asarray(sigma, self.dtype),
                                                tuple(jnp.asarray(L, self.dtype) for L in scales))
        return {t.name: np.asarray(m) for t, m in zip(self.terms, means)}

    # -- Bayesian inference on the marginal ------------------------------------------------------------------
    def potential(self, marginalize="all", parameterization=None, marginalize_beta: bool = False):
        """Drop-in NumPyro potential (lmmarg.potential.Potential): potential_fn, init_params, constrain, recover.
        marginalize_beta: integrate the fixed effects out too (normal priors; drawn exactly by ``recover``)."""
        from .potential import Potential
        key = (self.resolve_marginalize(marginalize), repr(parameterization), bool(marginalize_beta))
        if key not in self._potentials:
            self._potentials[key] = Potential(self, marginalize=marginalize, parameterization=parameterization,
                                              marginalize_beta=marginalize_beta)
        return self._potentials[key]

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
        from .inference.nuts import sample
        return sample(self, draws=draws, warmup=warmup, chains=chains, seed=seed, marginalize=marginalize,
                      chain_method=chain_method, progress_bar=progress_bar, parameterization=parameterization,
                      recover=recover, compilation_cache=compilation_cache, init=init,
                      marginalize_beta=marginalize_beta, **nuts_kwargs)

    # -- inference (each lives in its own module) ---------------------------------------------------------------
    def fit_ml(self, reml: bool = False, **kwargs):
        """Maximum likelihood (or REML) estimates with lme4 parity; see lmmarg.inference.ml."""
        from .inference.ml import fit_ml
        return fit_ml(self, reml=reml, **kwargs)

    def fit_map(self, **kwargs):
        """Posterior mode of the global parameters on the marginal; see lmmarg.inference.mapvi."""
        from .inference.mapvi import fit_map
        return fit_map(self, **kwargs)

    def fit_vi(self, guide: str = "normal", **kwargs):
        """Variational fit (NumPyro SVI, AutoGuide) on the marginal; see lmmarg.inference.mapvi."""
        from .inference.mapvi import fit_vi
        return fit_vi(self, guide=guide, **kwargs)
