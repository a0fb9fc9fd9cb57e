"""The marginalized model as a drop-in ``potential_fn`` for NumPyro's samplers: ``Potential``.

>>> pot = model.potential(marginalize="all")
>>> kernel = numpyro.infer.NUTS(potential_fn=pot.potential_fn)
>>> mcmc = numpyro.infer.MCMC(kernel, num_warmup=500, num_samples=500, num_chains=4, chain_method="vectorized")
>>> mcmc.run(key, init_params=pot.init_params(key, num_chains=4))
>>> draws = pot.constrain(mcmc.get_samples(group_by_chain=True))   # dict, same keys as model.sample()
>>> effects = pot.recover(draws, key)                               # {"u_<term>": (chains, draws, G, d)}

Sample sites (unconstrained dict keys): b_<fixed>, sigma, sd_<term>__<col>, cor_<term> (Cholesky factor of the
correlation, d > 1), z_<term> (noncentered, or the ε of the conditional parameterization: u = Λ (m(θ) + S(θ) ε),
see lmmarg.marginal.conditional) or u_<term> (centered) for terms left to HMC, and for a sigma formula
b_sigma_<name>, sd_sigma_<term>__<col>, cor_sigma_<term>, z_sigma_<term>. Fixed parameters are not sites.
Outputs of ``constrain`` (leading dims kept): beta (p,), sigma () or (K,) for sigma_by, sd_<term> (d,),
corr_<term> (d, d) for d > 1, u_<term> (G, d) for terms left to HMC; b_sigma, sd_sigma_<term>, corr_sigma_<term>,
u_sigma_<term> for a sigma formula. ``lmmarg.parameters`` makes every name.

Where the parts live: the NumPyro model and its data pytree in ``lmmarg.numpyro_model``, the correlation
transform and LKJ density in ``lmmarg.distributions``, the map from public draws to the engine's arguments in
``lmmarg.parameters.kernel_args``, the compiled programs a potential shares with others of its structure in
``lmmarg.compile.programs``. Also public here: ``default_marginalize_beta`` and ``dense_form`` (sample()'s
defaults).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions.transforms import biject_to
from numpyro.infer.util import constrain_fn, log_density, potential_energy

from . import parameters
from .compile import limits, xla
from .compile.limits import TRACE_LOCK
from .compile.programs import Programs
from .design import column_standardizer
from .statdesign import standardizer
from .families import dispersion_start, glm_fit
from .families import mean as family_mean
from .marginal import blocks, kernels, laplace
from .numpyro_model import ModelParts, beta_prior, make_model_fn, model_data

__all__ = ["Potential", "default_marginalize_beta", "dense_form"]


_PARAMETERIZATIONS = ("centered", "noncentered", "conditional", "laplace")
BATCH_BYTES = 2e8   # working memory of one batch of constrain / recovery draws (fixed batch: one compilation)


def _check_conditional(model, terms: list) -> None:
    """parameterization='conditional' needs the exact Gaussian marginal with a scalar or per-level residual SD."""
    fam = model.family_spec
    if fam.is_glmm:
        raise ValueError(f"parameterization='conditional' (terms {terms}) is for Gaussian families; family "
                         f"{model.family!r} has parameterization='laplace' (every term, marginalize='none') or the "
                         "default noncentered effects")
    if model.sigma_spec.kind not in ("constant", "by"):
        raise ValueError(f"parameterization='conditional' (terms {terms}) supports a scalar residual SD or "
                         "sigma_by=; a sigma= formula is not supported (use 'noncentered' or 'centered')")


def _check_beta_marginal(model, centered: dict) -> None:
    """marginalize_beta=True integrates beta out against its prior: Gaussian families, every fixed effect with a
    normal (not fixed) prior, and no parameterization that conditions on beta."""
    if model.family_spec.is_glmm:
        raise ValueError(f"marginalize_beta=True is for Gaussian families; family {model.family!r} samples beta")
    if not model.fixed_names:
        raise ValueError("marginalize_beta=True: the model has no fixed effects")
    bad = [p for p in (model.priors[parameters.fixed_site(n)] for n in model.fixed_names)
           if p.is_fixed or type(p.dist) is not dist.Normal]
    if bad:
        p = bad[0]
        what = f"is fixed at {p.fixed}" if p.is_fixed else f"has the prior {p.text or type(p.dist).__name__}"
        raise ValueError(f"marginalize_beta=True integrates the fixed effects out against normal priors; "
                         f"{p.label} {what}. Give every fixed effect a normal prior (e.g. priors={{'{p.label}': "
                         f"numpyro.distributions.Normal(0, 10)}}; 'b' names every slope), or sample beta")
    other = sorted(set(centered.values()) & {"conditional", "laplace"})
    if other:
        raise ValueError(f"marginalize_beta=True cannot be combined with parameterization={other[0]!r}")


def default_marginalize_beta(model, marginalize="all", parameterization=None) -> bool:
    """sample()'s default for marginalize_beta: integrate the fixed effects out when every term is integrated out,
    the family is Gaussian and every fixed effect has a normal prior. Measured (``python -m benchmarks.sampler
    --parts beta``, docs/benchmarks.md): with every term marginalized it gave 2.2x the ESS per iteration on eeg,
    1.0-1.5x on dillonE1 and about the same ESS per gradient on a crossed N = 5e5 model; with terms left to HMC
    (InstEval, dept integrated out) it lost 15 % (beta then moves with the sampled effects, and each gradient
    carries its block)."""
    if model.family_spec.is_glmm or not model.fixed_names or parameterization not in (None, "noncentered"):
        return False
    if len(model.resolve_marginalize(marginalize)) != len(model.terms):
        return False
    return all(not p.is_fixed and type(p.dist) is dist.Normal
               for p in (model.priors[parameters.fixed_site(n)] for n in model.fixed_names))


def dense_form(model):
    """The one-level dense form of the sampler's potential (lmmarg.marginal.blocks): PrecisionForm (it never scales
    the dense block by Lambda_D; docs/benchmarks.md) unless a prior fixes a random-effect SD at 0, where Lambda is
    singular and only the ScaledForm holds. Sampled SDs are exp(.) > 0."""
    zero_sd = any(p.kind == "sd" and p.is_fixed and float(np.min(np.asarray(p.fixed))) == 0.0 for p in model.priors)
    return blocks.ScaledForm() if zero_sd else blocks.PrecisionForm()


def _resolve_parameterization(model, hmc: list, parameterization) -> dict:
    names = [t.name for t in model.terms]
    out = {n: "noncentered" for n in hmc}
    if parameterization is None:
        return out
    wants_laplace = parameterization == "laplace" or (isinstance(parameterization, dict)
                                                      and "laplace" in parameterization.values())
    if wants_laplace and len(hmc) != len(names):
        raise ValueError("parameterization='laplace' centres all random effects jointly: use it with "
                         "marginalize='none' and for every term")
    if isinstance(parameterization, str):
        parameterization = {n: parameterization for n in hmc}
    for n, v in parameterization.items():
        if n not in names:
            raise ValueError(f"parameterization: unknown term {n!r}; terms are {names}")
        if v not in _PARAMETERIZATIONS:
            raise ValueError(f"parameterization[{n!r}] must be 'centered', 'noncentered', 'conditional' or "
                             f"'laplace', got {v!r}")
        if n in out:
            out[n] = v
    if "laplace" in out.values():
        if len(out) != len(names) or set(out.values()) != {"laplace"}:
            raise ValueError("parameterization='laplace' centres all random effects jointly: use it with "
                             "marginalize='none' and for every term")
    cond = [n for n, v in out.items() if v == "conditional"]
    if cond:
        _check_conditional(model, cond)
    return out


class Potential:
    """Unnormalized negative log posterior on unconstrained space, plus init / constrain / recover helpers.

    marginalize: "all" | "none" | "auto" | list of term names (terms integrated out analytically).
    parameterization: "centered" | "noncentered" (default) | "conditional" or {term: ...} for terms left to HMC;
    "laplace" (every term, marginalize="none"). "conditional" (Gaussian families, scalar σ or sigma_by): ε-offsets
    from the effects' approximate conditional mean, scaled by their approximate conditional SD given the global
    parameters (exact posterior; lmmarg.marginal.conditional) -- for large terms the data dominate.
    marginalize_beta: integrate the fixed effects out too (Gaussian families, normal priors on every fixed
    effect); ``recover`` then draws beta exactly with the random effects.

    A record of one model's potential, in the spirit of NumPyro's ``ModelInfo``: the functions (``potential_fn``,
    ``density``, ``constrain``, ``init_params``, ``recover``) and the attributes below, fixed at construction.
    """

    model: object                 # the lmmarg.Model
    marg: tuple                   # indices of the marginalized terms in model.terms
    centered: dict                # {term left to HMC: "centered" | "noncentered" | "conditional" | "laplace"}
    marginalize_beta: bool        # the fixed effects are integrated out too
    plan: object                  # the engine's plan (lmmarg.marginal.plan.Plan, or a LaplacePlan for a GLMM)
    parts: ModelParts             # the terms' constant arrays (lmmarg.numpyro_model)
    model_data_fn: object         # the NumPyro model, data as its one argument (numpyro_model.make_model_fn)
    data: dict                    # the argument of every program: plan, parts, priors, log_jac, std, start
    sites: dict                   # {unconstrained sample site: {"support", "shape"}}
    transforms: dict              # {site: NumPyro transform from unconstrained values to its support}
    unc_shapes: dict              # {site: shape of its unconstrained value}
    b_sites: list                 # fixed-effect sites, sampled jointly in standardized coordinates
    output_keys: list             # the public parameters ``constrain`` returns
    marginalized_terms: list      # names of the marginalized terms
    hmc_terms: list               # names of the terms left to HMC

    def __init__(self, model, marginalize="all", parameterization=None, marginalize_beta: bool = False):
        self.model = model
        self.marg = model.resolve_marginalize(marginalize)
        # the engine's plan: exact Gaussian marginal, or the Laplace plan of a GLMM family
        hmc = [t.name for h, t in enumerate(model.terms) if h not in self.marg]
        self.centered = _resolve_parameterization(model, hmc, parameterization)
        self.marginalize_beta = bool(marginalize_beta)
        if self.marginalize_beta:
            _check_beta_marginal(model, self.centered)
        if "laplace" in self.centered.values():   # a plan over every term, centring them jointly
            self.plan = (model.laplace_plan("all") if model.family_spec.is_glmm
                         else model.plan("all", per_obs_sigma=True))
        else:
            self.plan = (model.laplace_plan(marginalize) if model.family_spec.is_glmm
                         else model.plan(marginalize, marginalize_beta=self.marginalize_beta))
        if not model.family_spec.is_glmm:
            self.plan = self.plan.with_dense_form(dense_form(model))
        self.parts = ModelParts(model, self.marg, self.centered)
        # the NumPyro model takes the data as an argument (``data``: plan, term arrays, priors, standardization,
        # start); the compiled programs of lmmarg.inference take it as an argument too (``programs``)
        self.model_data_fn = make_model_fn(model, self.marg, self.centered, self.parts, self.marginalize_beta)
        self.data = model_data(model, self.plan, self.parts)
        # trace abstractly (eager tracing would compile every primitive separately)
        self.sites, det = {}, []

        def _trace(key):
            tr = numpyro.handlers.trace(numpyro.handlers.seed(self.model_data_fn, key)).get_trace(self.data)
            for n, s in tr.items():
                if s["type"] == "sample" and not s["is_observed"]:
                    self.sites[n] = {"support": s["fn"].support, "shape": tuple(jnp.shape(s["value"]))}
                elif s["type"] == "deterministic":
                    det.append(n)
            return 0

        with TRACE_LOCK:   # NumPyro's handler stack is process-global (lmmarg.compile.limits)
            jax.eval_shape(_trace, jax.random.PRNGKey(0))
        self.transforms = {n: biject_to(s["support"]) for n, s in self.sites.items()}
        self.unc_shapes = {n: tuple(self.transforms[n].inverse_shape(s["shape"])) for n, s in self.sites.items()}
        self._kinds = self._site_kinds()
        center, width = self._center()
        self.data["std"] = self._standardization(center, width)
        self.data["start"] = {"center": center, "width": width}
        public = ["beta", "sigma", "b_sigma"] + [d for d in (model.family_spec.dispersion,) if d]
        for sigma_part, terms in self._term_parts():
            for t in terms:
                public += [parameters.sd_site(t.name, sigma_part=sigma_part), parameters.corr_site(t.name, sigma_part),
                           parameters.effects_site(t.name, sigma_part)]
        self.output_keys = [n for n in public if n in self.sites or n in det]
        self.marginalized_terms = [model.terms[h].name for h in self.marg]
        self.hmc_terms = hmc
        self._programs = None
        self._pe_jit = None

    def model_fn(self):
        """The NumPyro model (no arguments) of this data set: for Predictive, SVI, NumPyro's MCMC."""
        return self.model_data_fn(self.data)

    @property
    def programs(self) -> Programs:
        """The jitted programs of this potential (density, constrain, recovery, NUTS drivers), data as an argument;
        shared with every earlier potential of the same structure and shapes (``Programs``)."""
        if self._programs is None:
            self._programs = Programs.of(self)
        return self._programs

    # -- NumPyro interface --------------------------------------------------------------------------------------
    def _in_model_dtype(self, params: dict) -> dict:
        """Cast floating site values to the model's dtype. Samplers may hold them in JAX's default float dtype
        (NumPyro's NUTS builds momenta and mass matrices in it: float64 whenever x64 is on, even for a float32
        model); the model itself then computes in its own dtype."""
        dt = self.model.dtype
        return {k: (v.astype(dt) if jnp.issubdtype(jnp.result_type(v), jnp.floating) else v)
                for k, v in ((k, jnp.asarray(v)) for k, v in params.items())}

    def potential_fn(self, params: dict):
        """-log p(params, y) on unconstrained space (Jacobians included); params: {site: array}. Jit-friendly.

        Computed in the model's dtype; returned in the dtype of ``params`` (what the sampler carries)."""
        return self.density(params, self.data)

    def density(self, params: dict, data: dict):
        """``potential_fn`` with the data as an argument (``self.data`` or another data set of the same structure
        and shapes): -log p(params, y) on unconstrained space. Pure, jit-friendly."""
        # every site value here is a transform of an unconstrained value, in its support by construction: NumPyro's
        # support checks (one reduction kernel per site) would be dead weight in every sampler program. The trace
        # lock: NumPyro's handler stack (and its validation flag) are process-global (lmmarg.compile.limits)
        with TRACE_LOCK, numpyro.validation_enabled(False):
            pe = potential_energy(self.model_data_fn, (data,), {},
                                  self._in_model_dtype(self._to_numpyro(params, data["std"])))
        leaves = jax.tree.leaves(params)
        return pe.astype(jnp.result_type(*leaves)) if leaves else pe

    def log_density(self, values: dict):
        """log joint density at constrained site values (no Jacobian): priors + marginal log-likelihood."""
        with TRACE_LOCK:
            return log_density(self.model_data_fn, (self.data,), {}, self._in_model_dtype(values))[0]

    def unconstrain(self, values: dict) -> dict:
        """Constrained site values -> the sampler's standardized unconstrained coordinates."""
        return self._from_numpyro({n: self.transforms[n].inv(jnp.asarray(values[n])) for n in self.sites})

    def to_constrained(self, params: dict) -> dict:
        """The sampler's coordinates -> constrained site values {site: value} (no deterministic sites)."""
        u = self._to_numpyro(params)
        return {n: self.transforms[n](u[n]) for n in self.sites}

    # -- standardized coordinates -------------------------------------------------------------------------------
    def _standardization(self, center: dict, width: dict) -> dict:
        """Per site (shift, scale): NumPyro's unconstrained value = shift + scale * x for the sampler's x; and for
        the fixed effects jointly (``self.b_sites``): b = b_ols + sd(y) S_X x (``design.column_standardizer``).

        Fixed effects and centred HMC effects live on the scale of y and x; NUTS' step size and its mass-matrix
        adaptation (a diagonal, regularized towards a fixed unit-scale value) then depend on the units the data
        were recorded in (y * 1e-12 froze every SD), and an uncentred covariate (Days + 1e4) correlates the
        intercept with its slope. In the sampler's coordinates the fixed effects are those of the centred,
        unit-scale columns in units of sd(y), so the geometry is unit-free; log-scale sites (SDs, sigma) already
        are, up to a shift. The map is affine: its Jacobian is a constant and the posterior is unchanged.

        Returns {"shift": {site: ()}, "scale": {site: ()}, "b_shift": (k,), "b_map": (k, k), "b_inv": (k, k)}, arrays
        in JAX's default float dtype (part of ``self.data``). center, width: ``_center()``."""
        shift, scale = {}, {}
        for n in self.unc_shapes:
            shift[n], scale[n] = 0.0, 1.0
            if self._kinds.get(n) == "u":
                scale[n] = float(10.0 * float(width[n]))   # width = 0.1 residual SD
            if not np.isfinite(scale[n]) or scale[n] <= 0:
                scale[n] = 1.0
        m = self.model
        cols = [j for j, c in enumerate(m.fixed_names) if parameters.fixed_site(c) in self.sites]
        self.b_sites = [parameters.fixed_site(m.fixed_names[j]) for j in cols]
        b_shift, b_map = np.zeros(0), np.zeros((0, 0))
        if self.b_sites:
            b_shift = np.array([float(center[n]) for n in self.b_sites])
            if m.statistics is None:
                X = np.asarray(m.design.X, dtype=np.float64)[:, cols]
                sy = 1.0 if m.family_spec.is_glmm else (float(np.std(np.asarray(m.y, dtype=np.float64))) or 1.0)
                b_map = sy * column_standardizer(X)            # (k, k): b = b_shift + b_map x
            else:   # the same map from the column moments of the statistics
                my = m.statistics.moments.y
                sy = float(np.sqrt(my.m2[0] / my.n[0])) or 1.0
                b_map = sy * standardizer(m.statistics.moments.X, cols)
            for n in self.b_sites:
                shift.pop(n)
                scale.pop(n)
        wide = jax.dtypes.canonicalize_dtype(np.float64)
        std = {"shift": shift, "scale": scale, "b_shift": b_shift, "b_map": b_map, "b_inv": np.linalg.inv(b_map)}
        return jax.tree.map(lambda v: jnp.asarray(v, wide), std)

    def _to_numpyro(self, params: dict, std: dict | None = None) -> dict:
        """The sampler's coordinates -> NumPyro's unconstrained values (std: ``self.data["std"]`` by default)."""
        std = self.data["std"] if std is None else std
        sh, sc = std["shift"], std["scale"]
        out = {n: (sh[n] + sc[n] * v if n in sh else v) for n, v in params.items()}
        if self.b_sites and self.b_sites[0] in params:
            x = jnp.stack([jnp.asarray(params[n]) for n in self.b_sites], axis=-1)
            # b_map x as a broadcast product (k is small): an XLA:CPU dot is a compiled kernel of its own, twice
            b = std["b_shift"].astype(x.dtype) + jnp.sum(x[..., None, :] * std["b_map"].astype(x.dtype), axis=-1)
            out.update({n: b[..., i] for i, n in enumerate(self.b_sites)})
        return out

    def _from_numpyro(self, params: dict, std: dict | None = None) -> dict:
        """NumPyro's unconstrained values -> the sampler's coordinates (the inverse of ``_to_numpyro``)."""
        std = self.data["std"] if std is None else std
        sh, sc = std["shift"], std["scale"]
        out = {n: ((v - sh[n]) / sc[n] if n in sh else v) for n, v in params.items()}
        if self.b_sites and self.b_sites[0] in params:
            b = jnp.stack([jnp.asarray(params[n]) for n in self.b_sites], axis=-1)
            x = (b - std["b_shift"].astype(b.dtype)) @ std["b_inv"].T.astype(b.dtype)
            out.update({n: x[..., i] for i, n in enumerate(self.b_sites)})
        return out

    def constrain_one(self, params: dict, data: dict) -> dict:
        """One draw in the sampler's coordinates -> the public parameters (``constrain``'s keys), data as an
        argument. Pure, jit-friendly."""
        with TRACE_LOCK:
            values = self._in_model_dtype(self._to_numpyro(params, data["std"]))
            out = constrain_fn(self.model_data_fn, (data,), {}, values, return_deterministic=True)
        return {k: out[k] for k in self.output_keys}

    def _batch(self, most: int, per_obs: int) -> int:
        """Draws per batch of a compiled per-draw program: the largest power of two <= `most` whose working memory
        (per draw: `per_obs` doubles per observation plus the dense block) stays under BATCH_BYTES."""
        per = self.model.n_obs * per_obs + self.plan.dense_size ** 2
        cap = int(max(1, min(most, BATCH_BYTES // (8 * max(per, 1)))))
        return 1 << (cap.bit_length() - 1)

    def _constrain_batch(self) -> int:
        """Draws per batch of ``constrain``: 512, fewer when terms in the conditional parameterization make each
        draw touch the data (their transform runs a few passes over the N observations)."""
        if not self.parts.cond_names:
            return 512
        return self._batch(512, 8 + 2 * sum(t.d for t in self.model.terms))

    def _lead(self, samples: dict) -> tuple:
        n = next(iter(self.sites))
        x = samples[n]
        return tuple(jnp.shape(x)[: jnp.ndim(x) - len(self.unc_shapes[n])])

    def constrain(self, samples: dict) -> dict:
        """Unconstrained samples with any leading dims -> dict of public parameters (numpy), same leading dims."""
        missing = [n for n in self.sites if n not in samples]
        if missing:
            raise KeyError(f"samples lack the site(s) {missing}; sites are {list(self.sites)}")
        lead = self._lead(samples)
        S = math.prod(lead)
        flat = {n: np.reshape(np.asarray(samples[n]), (S,) + tuple(self.unc_shapes[n])) for n in self.sites}
        # fixed-size batches (the last one padded on the host): one compilation serves every number of draws
        bs = self._constrain_batch()
        n_b = max(1, -(-S // bs))
        pad = n_b * bs - S
        if pad:
            flat = {k: np.concatenate([v, np.repeat(v[-1:] if S else np.zeros((1,) + v.shape[1:], v.dtype), pad, 0)])
                    for k, v in flat.items()}
        batches = [{k: v[b * bs:(b + 1) * bs] for k, v in flat.items()} for b in range(n_b)]
        fn = limits.traced(self.programs.constrain, batches[0], self.data)   # traced under the lock, compiled
        res = [fn(b, self.data) for b in batches]
        out = {k: np.concatenate([np.asarray(r[k]) for r in res])[:S] for k in res[0]}
        return {k: v.reshape(lead + v.shape[1:]) for k, v in out.items()}

    def compile_outputs(self, recover: bool) -> None:
        """Compile (without running) the programs that turn raw draws into results: ``constrain``'s batch and, if
        `recover` (or beta is marginalized), the recovery batch. ``sample()`` calls this in a background thread
        while NUTS runs, so that their compilation overlaps the sampling (on a CPU the chains of one device use
        one core; on a GPU the host is idle): the later calls find the executables in JAX's caches. Arguments
        are abstract and shaped exactly as ``constrain`` / ``recover`` pass them; nothing executes."""
        wide = jax.dtypes.canonicalize_dtype(np.float64)
        bs = self._constrain_batch()
        raw = {n: jax.ShapeDtypeStruct((bs,) + tuple(s), wide) for n, s in self.unc_shapes.items()}
        with TRACE_LOCK:
            lowered = self.programs.constrain.lower(raw, self.data)
        lowered.compile()
        if not ((recover and self.marg) or self.marginalize_beta):
            return
        rb, out = self._recover_batch(), self._outputs
        c = {k: jax.ShapeDtypeStruct((rb,) + out[k].shape, out[k].dtype) for k in self._recovery_inputs(out)}
        with TRACE_LOCK:
            lowered = self.programs.recover(rb).lower(jax.random.PRNGKey(0), 0, c, self.data)
        lowered.compile()

    # -- initial values -----------------------------------------------------------------------------------------
    def _term_parts(self) -> tuple:
        """((False, the model's terms), (True, the sigma formula's terms)): the terms of each part of the model."""
        return (False, self.model.terms), (True, getattr(self.model.sigma_spec.design, "terms", []))

    def _site_kinds(self) -> dict:
        """{site: kind}: the kind of the site's prior (``lmmarg.priors.Prior.kind``: "b", "sigma", "sd", "cor",
        "b_sigma", "sd_sigma", "cor_sigma"), or "z" / "u" for the standard-normal / centred effects of a term."""
        kinds = {p.site: p.kind for p in self.model.priors}
        for sigma_part, terms in self._term_parts():
            for t in terms:
                kinds[parameters.standard_site(t.name, sigma_part)] = "z"
                kinds[parameters.effects_site(t.name, sigma_part)] = "u"
        return kinds

    def _center(self) -> tuple[dict, dict]:
        """Data-scaled constrained starting point per site and its unconstrained jitter half-width."""
        m = self.model
        if m.statistics is not None:   # rows known by their sums and column moments
            ols, rsd, sy, sx, rms = _moment_scales(m)
        else:
            X, y = np.asarray(m.design.X), np.asarray(m.y, float)
            sx = np.std(X, axis=0) if X.shape[0] else np.zeros(X.shape[1])
            rms = {parameters.sd_site(t.name, c): float(np.sqrt(np.mean(t.Z[:, j] ** 2)))
                   for t in m.terms for j, c in enumerate(t.columns)}
            if m.family_spec.is_glmm:  # the GLM fit without random effects; unit scale on the link
                ols, rsd, sy = glm_fit(m.family_spec, X, y, m.trials, m.design.offset), 1.0, 1.0
            else:
                ols = np.linalg.lstsq(X, y, rcond=None)[0] if X.shape[1] else np.zeros(0)
                rsd = float(np.std(y - X @ ols)) if len(y) > 1 else 1.0
                rsd = rsd if rsd > 0 else 1.0
                sy = float(np.std(y)) or 1.0
        center, width = {}, {}
        fixed = {parameters.fixed_site(c): j for j, c in enumerate(m.fixed_names)}
        for n, s in self.sites.items():
            shape, kind = s["shape"], self._kinds.get(n)
            if kind == "b_sigma":
                v, w = (np.log(rsd) if n == parameters.fixed_site("Intercept", sigma_part=True) else 0.0), 0.2
            elif kind == "b":
                j = fixed[n]
                v, w = ols[j], 0.1 * sy / (float(sx[j]) if sx[j] > 0 else 1.0)
            elif kind == "sigma":
                v, w = rsd, 0.5
            elif kind == "dispersion":   # the moment estimate at the GLM fit's means
                mu = family_mean(m.family_spec, X @ ols + (0.0 if m.design.offset is None else m.design.offset))
                v, w = dispersion_start(m.family_spec, y, mu), 0.5
            elif kind == "sd_sigma":
                v, w = 0.3, 0.5
            elif kind == "sd":
                r = rms.get(n, 1.0)
                v, w = 0.5 * rsd / (r if r > 0 else 1.0), 0.5
            elif kind in ("cor", "cor_sigma"):
                center[n], width[n] = None, 0.5
                continue
            elif kind == "z":
                v, w = 0.0, 0.5
            elif kind == "u":
                v, w = 0.0, 0.1 * rsd
            else:
                center[n], width[n] = None, 2.0
                continue
            center[n], width[n] = np.full(shape, v), w
        wide = jax.dtypes.canonicalize_dtype(np.float64)
        return center, {n: jnp.asarray(w, wide) for n, w in width.items()}

    def _center_unconstrained(self, name: str, center: dict):
        """The data-scaled centre of one site in NumPyro's unconstrained space (zeros where it has none)."""
        dt = self.model.dtype
        if center[name] is None:
            return jnp.zeros(self.unc_shapes[name], dt)
        return self.transforms[name].inv(jnp.asarray(center[name], dt))

    def start_points(self, key, num_chains: int, data: dict) -> dict:
        """{site: (num_chains, *unconstrained shape)}: the data-scaled centre (``data["start"]``) jittered uniformly
        within its half-width, in the sampler's coordinates; unchecked. Pure, jit-friendly (data an argument)."""
        dt = self.model.dtype
        center, width = data["start"]["center"], data["start"]["width"]
        keys = jax.random.split(key, len(self.sites))
        out = {}
        for k, (name, shape) in zip(keys, self.unc_shapes.items()):
            jitter = jax.random.uniform(k, (num_chains,) + tuple(shape), dt, -1.0, 1.0)
            out[name] = self._center_unconstrained(name, center) + width[name].astype(dt) * jitter
        return self._from_numpyro(out, data["std"])

    def init_params(self, key, num_chains: int | None = 4, check: bool = True) -> dict:
        """Starting points: a data-scaled centre (OLS β, residual SD, ...) jittered in unconstrained space, in the
        sampler's standardized coordinates (``potential_fn``'s arguments; see ``_standardization``).

        check: evaluate the potential at the starts and put chains whose start is invalid at the un-jittered
        centre (False: the caller checks, e.g. sample()'s compiled NUTS init, saving a compilation).

        Returns {site: (num_chains, *unconstrained shape)} (no leading dim if num_chains is None), in JAX's
        default float dtype (what NumPyro's samplers carry; ``potential_fn`` computes in the model's dtype).
        """
        n = 1 if num_chains is None else int(num_chains)
        out = self.start_points(key, n, self.data)
        if check and self._pe_jit is None:
            self._pe_jit = xla.jit(jax.vmap(self.potential_fn), data=self.data)
        bad = ~np.isfinite(np.asarray(limits.traced_call(self._pe_jit, out))) if check else np.zeros(n, bool)
        if bad.any():  # fall back to the un-jittered centre for chains whose start is invalid
            center = self.data["start"]["center"]
            for name, shape in self.unc_shapes.items():
                base = self._from_numpyro({name: self._center_unconstrained(name, center)})[name]
                out[name] = jnp.where(jnp.asarray(bad).reshape((n,) + (1,) * len(shape)), base, out[name])
        wide = jnp.promote_types(self.model.dtype, jax.dtypes.canonicalize_dtype(np.float64))
        out = {k: v.astype(wide) for k, v in out.items()}
        if num_chains is None:
            out = {k: v[0] for k, v in out.items()}
        return out

    # -- recovery of the marginalized random effects -------------------------------------------------------------
    def kernel_args(self, c: dict, data: dict | None = None) -> parameters.KernelArgs:
        """The marginal kernels' arguments at one draw c of the public parameters (``constrain``'s keys, no
        leading dims): ``parameters.kernel_args`` for this potential. Returns KernelArgs(beta (p,), sigma () or
        (N,), scales: Λ_l (d_l, d_l) per marginalized term in ``self.marg`` order, offset (N,) of the terms left to
        HMC or None) -- what ``kernels.log_marginal`` / ``conditional_mean`` / ``conditional_sample`` take with
        ``self.plan``. With beta marginalized (``marginalize_beta``), beta is zeros and ``beta_prior`` gives what
        the kernels integrate it against. data: ``self.data`` (default) or another data set of the same structure
        (the compiled recovery's argument).
        """
        arrays = (self.data if data is None else data)["parts"]
        beta = jnp.zeros((len(self.model.fixed_names),), self.model.dtype) if self.marginalize_beta else None
        return parameters.kernel_args(c, self.model.terms, self.marg, beta=beta,
                                      sigma=lambda draw: self.parts.sigma_obs(draw, arrays),
                                      offset=lambda u: self.parts.offset(u, a=arrays))

    def beta_prior(self, data: dict | None = None):
        """(mean (p,), scale (p, p)) of the fixed effects' normal priors when they are marginalized, else None."""
        if not self.marginalize_beta:
            return None
        return beta_prior(self.model, (self.data if data is None else data)["priors"])

    def conditional_means(self, c: dict) -> tuple:
        """E[u | y, θ] per marginalized term at one constrained draw c (GLMM: the conditional modes û, the mean
        of the Laplace Gaussian): (G_l, d_l) per term in ``self.marg`` order. Jit-friendly."""
        beta, sigma, scales, offset = self.kernel_args(c)
        if isinstance(self.plan, laplace.LaplacePlan):
            return laplace.conditional_modes(self.plan, beta, scales, offset, sigma)   # sigma: the dispersion
        return kernels.conditional_mean(self.plan.with_dense_form(blocks.ScaledForm()), beta, sigma, scales, offset,
                                        self.beta_prior())[:len(self.marg)]

    def recover_one(self, key, c: dict, data: dict):
        """Exact draws of the marginalized effects {"u_<term>": (G, d)} (and "beta" (p,) when it is marginalized)
        given one constrained draw c, data as an argument. Pure, jit-friendly."""
        if not self.marg and not self.marginalize_beta:
            return {}
        beta, sigma, scales, offset = self.kernel_args(c, data)
        plan = data["plan"]
        if isinstance(plan, laplace.LaplacePlan):  # the Laplace Gaussian at the mode (approximate)
            draws = laplace.conditional_sample(plan, key, beta, scales, offset, sigma)   # sigma: the dispersion
        else:                                       # exact, in the scaled form (valid for any Lambda)
            scaled = plan.with_dense_form(blocks.ScaledForm())
            draws = kernels.conditional_sample(scaled, key, beta, sigma, scales, offset, self.beta_prior(data))
        out = {parameters.effects_site(self.model.terms[h].name): v for h, v in zip(self.marg, draws)}
        if self.marginalize_beta:
            out["beta"] = draws[-1]
        return out

    def _recover_batch(self) -> int:
        """Draws per recovery batch, fixed per model (so that runs with any number of draws reuse the compiled
        batch; the last batch is padded): 256, or less to bound the working memory (~N doubles per draw and term).
        """
        return self._batch(256, 2 + sum(t.d for t in self.model.terms))

    def _recovery_inputs(self, draws: dict) -> list:
        """The public parameters the recovery reads, of those in `draws` (in their order): ``constrain``'s outputs."""
        return [k for k in draws if k in self.output_keys]

    def recover(self, draws: dict, key, batch_size: int | None = None) -> dict:
        """Exact draws of every marginalized term's effects given each posterior draw (one key per draw).

        draws: output of ``constrain`` (any leading dims). Returns {"u_<term>": (*lead, G, d)} for every term
        (terms left to HMC are passed through from ``draws``), and "beta" (*lead, p) when it is marginalized.
        """
        n = next(k for k in draws if k in self._outputs)
        lead = tuple(np.shape(draws[n])[: np.ndim(draws[n]) - len(self._outputs[n].shape)])
        S = math.prod(lead)
        out = {}
        if (self.marg or self.marginalize_beta) and S:
            # flattened and padded on the host: eager JAX ops would compile once per number of draws
            flat = {k: np.reshape(np.asarray(draws[k]), (S,) + np.shape(draws[k])[len(lead):])
                    for k in self._recovery_inputs(draws)}
            bs = self._recover_batch() if batch_size is None else int(batch_size)
            n_b = -(-S // bs)
            pad = n_b * bs - S
            if pad:  # repeat the last draw so every batch has the same shape (one compilation)
                flat = {k: np.concatenate([v, np.repeat(v[-1:], pad, 0)]) for k, v in flat.items()}
            fn = self.programs.recover(bs)
            # every batch is dispatched before any result is read, so the device never waits for the host
            res = [fn(key, b, {k: v[b * bs:(b + 1) * bs] for k, v in flat.items()}, self.data) for b in range(n_b)]
            for k in res[0]:
                v = np.concatenate([np.asarray(r[k]) for r in res])[:S]
                out[k] = v.reshape(lead + v.shape[1:])
        for name in self.hmc_terms:
            out[parameters.effects_site(name)] = np.asarray(draws[parameters.effects_site(name)])
        res = {k: out[k] for k in (parameters.effects_site(t.name) for t in self.model.terms)}
        if self.marginalize_beta:
            res["beta"] = out["beta"]
        return res

    @functools.cached_property
    def _outputs(self) -> dict:
        """{public parameter: jax.ShapeDtypeStruct of one draw} (``constrain``'s outputs), from the abstract
        evaluation of one draw's constrain (nothing executes)."""
        wide = jax.dtypes.canonicalize_dtype(np.float64)
        raw = {n: jax.ShapeDtypeStruct(tuple(s), wide) for n, s in self.unc_shapes.items()}
        with TRACE_LOCK:
            return jax.eval_shape(self.constrain_one, raw, self.data)


def _moment_scales(m) -> tuple:
    """(ols (p,), residual SD at the OLS, sd(y), sd of each X column (p,), {sd site: RMS of its Z column}) of a
    model from sufficient statistics: what ``Potential._center`` reads from the rows otherwise (ddof 0)."""
    st = m.statistics
    ols = st.ols_beta()
    n = max(int(st.n_obs), 1)
    rsd = float(np.sqrt(max(float(st.recentred(ols).rr), 0.0) / n)) or 1.0
    my, mx, mz = st.moments.y, st.moments.X, st.moments.Z
    sy = float(np.sqrt(my.m2[0] / my.n[0])) or 1.0
    sx = np.sqrt(np.asarray(mx.m2, float) / np.maximum(np.asarray(mx.n, float), 1.0))
    ms = np.sqrt((np.asarray(mz.m2, float) + np.asarray(mz.n, float) * np.asarray(mz.mean, float) ** 2)
                 / np.maximum(np.asarray(mz.n, float), 1.0))
    sites = [parameters.sd_site(t.name, c) for t in m.terms for c in t.columns]
    return ols, rsd, sy, sx, dict(zip(sites, ms.tolist()))
