"""The marginalized model as a NumPyro model and as a drop-in ``potential_fn`` for NumPyro's samplers.

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
u_sigma_<term> for a sigma formula.
"""
from __future__ import annotations

import functools
import hashlib
import math
import re
import threading
from collections import OrderedDict

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints
from jax.scipy.special import gammaln, multigammaln
from numpyro.distributions.transforms import CorrCholeskyTransform, biject_to
from numpyro.distributions.util import validate_sample
from numpyro.infer.util import constrain_fn, log_density, potential_energy

from .design import column_standardizer
from . import compiled, xla
from .compiled import TRACE_LOCK
from .marginal import conditional, kernels, laplace

__all__ = ["Potential", "Programs", "make_model_fn", "model_data", "signature"]


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
    bad = [p for p in (model.priors[f"b_{n}"] for n in model.fixed_names)
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
               for p in (model.priors[f"b_{n}"] for n in model.fixed_names))


def dense_form(model) -> str:
    """The marginal kernels' dense form for the sampler's potential (lmmarg.marginal.plan.DENSE_FORMS):
    "precision" (measured 0.21 -> 0.15 ms per value-and-gradient on dillonE1) unless a prior fixes a random-effect
    SD at 0, where Lambda is singular and only the scaled form holds. Sampled SDs are exp(.) > 0."""
    zero_sd = any(p.kind == "sd" and p.is_fixed and float(np.min(np.asarray(p.fixed))) == 0.0 for p in model.priors)
    return "scaled" if zero_sd else "precision"


def _beta_prior(model, prior: dict):
    """(mean (p,), scale (p, p)) of the fixed effects' independent normal priors, from the model data's priors."""
    ds = [prior[f"b_{n}"].d for n in model.fixed_names]
    return jnp.stack([d.loc for d in ds]), jnp.diag(jnp.stack([d.scale for d in ds]))


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


class _Parts:
    """Constant arrays and metadata shared by the NumPyro model, recovery and prediction."""

    def __init__(self, model, marg: tuple, centered: dict):
        dt = model.dtype
        self.model, self.marg, self.dtype = model, marg, dt
        self.terms = model.terms
        self.Z = [jnp.asarray(t.Z, dt) for t in self.terms]
        self.codes = [jnp.asarray(t.codes, jnp.int32) for t in self.terms]
        self.centered = centered  # term name -> "centered"/"noncentered"/"conditional"/"laplace", HMC terms only
        # constants of the terms in the conditional parameterization (lmmarg.marginal.conditional)
        self.cond_names = tuple(n for n, v in centered.items() if v == "conditional")
        self.cond_terms = {t.name: conditional.cond_term(t.Z, t.codes, t.n_groups, dt)
                           for t in self.terms if t.name in self.cond_names}
        self.sspec = model.sigma_spec
        if self.sspec.kind == "by":
            self.by_codes = jnp.asarray(self.sspec.codes, jnp.int32)
        if self.sspec.kind == "formula":
            sd_ = self.sspec.design
            self.sX = jnp.asarray(sd_.X, dt)
            self.sZ = [jnp.asarray(t.Z, dt) for t in sd_.terms]
            self.scodes = [jnp.asarray(t.codes, jnp.int32) for t in sd_.terms]

    def arrays(self) -> dict:
        """The data arrays of the terms (what ``offset`` / ``sigma_obs`` / the conditional transform read): an
        argument of the compiled programs, so that models of equal shapes share them."""
        a = {"Z": tuple(self.Z), "codes": tuple(self.codes),
             "cond": {n: (c.Z, c.codes, c.S) for n, c in self.cond_terms.items()}}
        if self.sspec.kind == "by":
            a["by_codes"] = self.by_codes
        if self.sspec.kind == "formula":
            a["sX"], a["sZ"], a["scodes"] = self.sX, tuple(self.sZ), tuple(self.scodes)
        return a

    def cond_term(self, a: dict, name: str) -> conditional.CondTerm:
        """The conditional term `name` built from the arrays ``a`` (its number of groups is static)."""
        Z, codes, S = a["cond"][name]
        return conditional.CondTerm(Z, codes, self.cond_terms[name].n_groups, S)

    def offset(self, u: dict, skip=(), a: dict | None = None):
        """Σ_h Z_h u_h[codes_h] over the terms left to HMC (u: {term name: (G, d)}), those named in skip left out
        -> (N,) or None. a: the arrays (``arrays()``; default this model's)."""
        a = self.arrays() if a is None else a
        off = None
        for h, t in enumerate(self.terms):
            if h not in self.marg and t.name not in skip:
                c = jnp.sum(a["Z"][h] * u[t.name][a["codes"][h]], -1)
                off = c if off is None else off + c
        return off

    def sigma_obs(self, c: dict, a: dict | None = None):
        """Residual SD for the likelihood: scalar, or (N,) for sigma_by / a sigma formula; None for a GLMM family.
        a: the arrays (``arrays()``; default this model's)."""
        k = self.sspec.kind
        if k == "none":
            return None
        if k == "constant":
            return c["sigma"]
        a = self.arrays() if a is None else a
        if k == "by":
            return c["sigma"][a["by_codes"]]
        eta = a["sX"] @ c["b_sigma"]
        for j, t in enumerate(self.sspec.design.terms):
            eta = eta + jnp.sum(a["sZ"][j] * c[f"u_sigma_{t.name}"][a["scodes"][j]], -1)
        return jnp.exp(eta)


# jitted so eager uses (initialize_model, Predictive, tracing) compile the kernel once instead of op by op;
# inlined when called under an outer jit/grad/vmap
_log_marginal_jit = jax.jit(kernels.log_marginal)
_laplace_jit = jax.jit(laplace.log_marginal)
_laplace_centred_jit = jax.jit(laplace.laplace_centred)


def _gaussian_centred(plan, beta, sigma, scales, eps, Z, codes):
    """The Laplace-centred joint of a Gaussian model (exact: the conditional of u is Gaussian, so ε | y, θ is
    exactly N(0, I)): u = E[u | y, θ] + Λ L^{-T} ε. Returns (log N(y | Xβ + Zu, σ²) − ‖v‖²/2 − log|F|/2 + ‖ε‖²/2,
    u per term). plan: a per-observation-σ plan over every term; Z, codes: per term (N, d), (N,)."""
    dt = plan.dtype
    sig = jnp.broadcast_to(jnp.asarray(sigma, dt), (plan.n_obs,))
    w = 1.0 / sig**2
    r = plan.y - plan.X @ beta
    vs, logdet, ok = kernels.weighted_transform(plan, r, w, scales, eps)
    us = tuple(v @ L.T for v, L in zip(vs, scales))
    e = r - sum(jnp.sum(z * u[c], -1) for z, u, c in zip(Z, us, codes))
    v2 = sum(jnp.sum(v * v) for v in vs)
    e2 = sum(jnp.sum(x * x) for x in eps)
    val = jnp.sum(-0.5 * w * e * e - jnp.log(sig)) - 0.5 * plan.n_obs * math.log(2 * math.pi) \
        - 0.5 * v2 - 0.5 * logdet + 0.5 * e2
    good = ok & jnp.isfinite(val) & jnp.all(sig > 0)
    return jnp.where(good, val, -jnp.inf), us


_gaussian_centred_jit = jax.jit(_gaussian_centred)


def _likelihood(plan, beta, sigma, scales, offset, beta_prior=None):
    """The marginal log-likelihood: exact (Gaussian families, a Plan; beta integrated out against beta_prior when
    the plan marginalizes it) or Laplace (GLMM families, a LaplacePlan)."""
    if isinstance(plan, laplace.LaplacePlan):
        return _laplace_jit(plan, beta, scales, offset)
    return _log_marginal_jit(plan, beta, sigma, scales, offset, beta_prior)


UNROLLED_CORR_MAX = 8   # correlation Cholesky factors up to this size: elementwise, unrolled (see below)


def _corr_dim(n_free: int) -> int:
    """d of a (d, d) correlation Cholesky factor with n_free = d (d - 1) / 2 unconstrained values."""
    return int(round((1 + math.sqrt(1 + 8 * n_free)) / 2))


def _signed_stick_breaking(t, d: int):
    """NumPyro's signed stick-breaking (``signed_stick_breaking_tril``) for t (..., d (d - 1) / 2) in (-1, 1), in
    the row-major order of the strictly lower triangle, unrolled: y_ij = t_ij prod_{k<j} (1 - t_ik^2)^(1/2),
    y_ii = prod_{k<i} (1 - t_ik^2)^(1/2). Elementwise only: NumPyro's form (a scatter into the triangle, a
    cumulative product, a padded shift) compiles to scatter loops and window reductions, forward and reverse, in
    every potential with a correlation."""
    eps = jnp.finfo(t.dtype).eps
    t = jnp.clip(t, -1 + eps, 1 - eps)
    one = jnp.ones_like(t[..., 0])
    entries, k = {(0, 0): one}, 0
    for i in range(1, d):
        rest = one                                # rest = prod_{k<j} (1 - t_ik^2)^(1/2)
        for j in range(i):
            entries[i, j] = t[..., k] * rest
            rest = rest * jnp.sqrt(1 - t[..., k] ** 2)
            k += 1
        entries[i, i] = rest
    return _from_entries(entries, d, t.dtype)


def _from_entries(entries: dict, d: int, dtype):
    """The (..., d, d) matrix with the given entries {(i, j): (...,) array} (zeros elsewhere), as a sum of entries
    times constant one-hot matrices: elementwise, so it fuses into its consumers (a stack is a compiled kernel of
    its own, and so is each padded cotangent of its reverse pass)."""
    out = 0.0
    for (i, j), v in entries.items():
        onehot = np.zeros((d, d))
        onehot[i, j] = 1.0
        out = out + v[..., None, None] * jnp.asarray(onehot, dtype)
    return out


class _CorrCholeskyTransform(CorrCholeskyTransform):
    """NumPyro's CorrCholeskyTransform, computed elementwise for d <= UNROLLED_CORR_MAX (the same values), in the
    wider of the input's dtype and float64: NumPyro's transform fills a buffer of JAX's default float dtype (float64
    under x64), which fails for a float32 model in a process where x64 is on; the result has the input's dtype."""

    def __call__(self, x):
        wide = jnp.promote_types(x.dtype, jax.dtypes.canonicalize_dtype(np.float64))
        d = _corr_dim(x.shape[-1])
        if d > UNROLLED_CORR_MAX:
            return super().__call__(x.astype(wide)).astype(x.dtype)
        return _signed_stick_breaking(jnp.tanh(x.astype(wide)), d).astype(x.dtype)

    def log_abs_det_jacobian(self, x, y, intermediates=None):
        """NumPyro's value: the tanh part plus 1/2 sum_i sum_{j <= i - 2} log(1 - sum_{k <= j} y_ik^2)."""
        d = y.shape[-1]
        if d > UNROLLED_CORR_MAX:
            return super().log_abs_det_jacobian(x, y, intermediates)
        stick = jnp.zeros_like(x[..., 0])
        for i in range(2, d):
            left = 1.0
            for j in range(i - 1):
                left = left - y[..., i, j] ** 2
                stick = stick + 0.5 * jnp.log(left)
        return stick - 2.0 * jnp.sum(x + jax.nn.softplus(-2.0 * x) - math.log(2.0), axis=-1)


class _CorrCholeskyConstraint(type(constraints.corr_cholesky)):
    """corr_cholesky, distinct type so that biject_to picks the dtype-preserving transform above."""


_corr_cholesky = _CorrCholeskyConstraint()
biject_to.register(_CorrCholeskyConstraint, lambda c: _CorrCholeskyTransform())


class _LKJCholesky(dist.LKJCholesky):
    """NumPyro's LKJCholesky; for d <= UNROLLED_CORR_MAX the unnormalized log density is a weighted sum of the
    log-diagonal over the whole matrix (NumPyro's gather becomes a scatter loop in the reverse pass, and a read of
    single entries a padded cotangent, a compiled kernel each). Same values, same validation."""

    support = _corr_cholesky

    @validate_sample
    def log_prob(self, value):
        d = self.dimension
        if d > UNROLLED_CORR_MAX:
            return super().log_prob(value)
        eta = jnp.asarray(self.concentration)
        # NumPyro's unnormalized density: sum_{i=1}^{d-1} (2 eta - (3 - d) - i) log L_ii (0-based i)
        on_diag = np.eye(d, dtype=bool)
        ones_after_first = jnp.asarray(np.diag((np.arange(d) > 0).astype(np.float64)), value.dtype)
        index = jnp.asarray(np.diag(np.arange(d, dtype=np.float64)), value.dtype)
        weight = jnp.expand_dims(2.0 * eta - (3 - d), (-2, -1)) * ones_after_first - index
        unnormalized = jnp.sum(weight * jnp.log(jnp.where(on_diag, value, 1.0)), axis=(-2, -1))
        dm1 = d - 1
        alpha = eta + 0.5 * dm1
        normalizer = 0.5 * dm1 * math.log(math.pi) + multigammaln(alpha - 0.5, dm1) - gammaln(alpha) * dm1
        return unnormalized - normalizer


def _lkj(d: int, eta: float, dtype):
    """LKJ prior on a (d, d) correlation Cholesky factor, parameters in the model's dtype."""
    return _LKJCholesky(d, jnp.asarray(eta, dtype))


def _lam(sd, corr_chol):
    return sd[:, None] * corr_chol


class _PriorData:
    """A NumPyro distribution as a pytree whose leaves come in sorted field order. NumPyro flattens a distribution
    in the order of a set of field names, which changes with Python's string-hash seed: the compiled programs'
    argument order, and so the persistent compilation cache's keys, would change from one process to the next."""

    def __init__(self, d):
        self.d = d
        self.flat = None   # (children, aux), computed once: NumPyro's generic flattening costs ~0.1 ms per prior


def _prior_flatten(pd: _PriorData):
    if pd.flat is None:
        cls = type(pd.d)
        vals, aux = pd.d.tree_flatten()
        fields = {n: (_PriorData(v) if isinstance(v, dist.Distribution) else v)
                  for n, v in zip(cls.gather_pytree_data_fields(), vals)}
        keys = tuple(sorted(fields))
        pd.flat = (tuple(fields[k] for k in keys), (cls, keys, aux))
    return pd.flat


def _prior_unflatten(static, children) -> _PriorData:
    cls, keys, aux = static
    by_name = {k: (c.d if isinstance(c, _PriorData) else c) for k, c in zip(keys, children)}
    return _PriorData(cls.tree_unflatten(aux, tuple(by_name[n] for n in cls.gather_pytree_data_fields())))


jax.tree_util.register_pytree_node(_PriorData, _prior_flatten, _prior_unflatten)


def model_data(model, plan, parts: _Parts) -> dict:
    """What the NumPyro model of ``make_model_fn`` reads from the data set, as a pytree of arrays: the plan, the
    terms' arrays, the priors (NumPyro distributions are pytrees of their parameters; fixed values as arrays) and
    the log-Jacobian of the response transformation. Passed as an argument, so that one compiled program serves
    every data set of the same shapes (the model's structure is in the closure, its numbers are here)."""
    dt = model.dtype

    def cast(v):
        return jnp.asarray(v, dt) if jnp.issubdtype(jnp.result_type(v), jnp.floating) else v

    priors = {}
    for p in model.priors:
        if p.is_fixed:
            priors[p.site] = jnp.asarray(p.fixed, dt)
        elif p.kind.startswith("cor"):   # lmmarg.priors.LKJ: its eta
            priors[p.site] = jnp.asarray(p.dist.eta, dt)
        else:
            priors[p.site] = _PriorData(jax.tree.map(cast, p.dist))
    return {"plan": plan, "parts": parts.arrays(), "priors": priors,
            "log_jac": jnp.asarray(float(model.log_jacobian), dt)}


def make_model_fn(model, marg: tuple, centered: dict, parts: _Parts | None = None, marginalize_beta: bool = False):
    """A NumPyro model of the marginalized LMM taking one argument, the data pytree of ``model_data``; the
    marginal log-likelihood is a factor. Only the model's structure is read from ``model`` here.
    marginalize_beta: the fixed effects are integrated out against their normal priors (no beta sites)."""
    pri = model.priors
    parts = parts or _Parts(model, marg, centered)
    dt = model.dtype
    laplace_centred = bool(centered) and set(centered.values()) == {"laplace"}

    def model_fn(data):
        plan, arrays, prior = data["plan"], data["parts"], data["priors"]

        def site(p):
            if p.is_fixed:
                return prior[p.site]
            return numpyro.sample(p.site, prior[p.site].d)

        def term_scale(t, sfx):
            sd = jnp.stack([site(pri[f"sd_{sfx}{t.name}__{c}"]) for c in t.columns])
            numpyro.deterministic(f"sd_{sfx}{t.name}", sd)
            if t.d == 1:
                return _lam(sd, jnp.ones((1, 1), dt))
            pc = pri[f"cor_{sfx}{t.name}"]
            if pc.is_fixed:
                Lc = prior[pc.site]
            else:
                Lc = numpyro.sample(pc.site, _lkj(t.d, prior[pc.site], dt))
            numpyro.deterministic(f"corr_{sfx}{t.name}", Lc @ Lc.T)
            return _lam(sd, Lc)

        def hmc_effect(t, Lam, name, centered_):
            G, d = t.n_groups, t.d
            if centered_:
                return numpyro.sample(f"u_{name}", dist.MultivariateNormal(jnp.zeros(d, dt), scale_tril=Lam)
                                      .expand([G]).to_event(1))
            z = numpyro.sample(f"z_{name}", dist.Normal(jnp.zeros((G, d), dt), 1.0).to_event(2))
            return numpyro.deterministic(f"u_{name}", z @ Lam.T)

        def sigma_sites():
            c = {}
            sk = parts.sspec.kind
            if sk in ("constant", "by"):
                p = pri["sigma"]
                if sk == "constant":
                    c["sigma"] = site(p)
                else:
                    K = len(parts.sspec.levels)
                    c["sigma"] = (jnp.broadcast_to(prior[p.site], (K,)) if p.is_fixed
                                  else numpyro.sample("sigma", prior[p.site].d.expand([K]).to_event(1)))
                if p.is_fixed:
                    numpyro.deterministic("sigma", c["sigma"])
            elif sk == "formula":
                sd_ = parts.sspec.design
                c["b_sigma"] = numpyro.deterministic("b_sigma", jnp.stack([site(pri[f"b_sigma_{n}"])
                                                                           for n in sd_.fixed_names]))
                for t in sd_.terms:
                    c[f"u_sigma_{t.name}"] = hmc_effect(t, term_scale(t, "sigma_"), f"sigma_{t.name}", False)
            return parts.sigma_obs(c, arrays)

        log_jac = data["log_jac"]
        if marginalize_beta:   # integrated out against its prior; recovered exactly with the random effects
            beta, beta_prior = jnp.zeros((len(model.fixed_names),), dt), _beta_prior(model, prior)
        else:
            beta = jnp.stack([site(pri[f"b_{n}"]) for n in model.fixed_names]) if model.fixed_names \
                else jnp.zeros((0,), dt)
            beta_prior = None
            numpyro.deterministic("beta", beta)
        if laplace_centred:   # every term: u = mode(θ) + L(θ)^{-T} ε, an exact reparameterization
            scales = tuple(term_scale(t, "") for t in model.terms)
            eps = tuple(numpyro.sample(f"z_{t.name}", dist.Normal(jnp.zeros((t.n_groups, t.d), dt), 1.0)
                                       .to_event(2)) for t in model.terms)
            if isinstance(plan, laplace.LaplacePlan):
                val, us = _laplace_centred_jit(plan, beta, scales, eps)
            else:
                val, us = _gaussian_centred_jit(plan, beta, sigma_sites(), scales, eps, arrays["Z"],
                                                arrays["codes"])
            for t, u_t in zip(model.terms, us):
                numpyro.deterministic(f"u_{t.name}", u_t)
            numpyro.factor("loglik", val + log_jac)
            return
        scales, u, cond = [], {}, []
        for h, t in enumerate(model.terms):
            Lam = term_scale(t, "")
            if h in marg:
                scales.append(Lam)
            elif centered.get(t.name) == "conditional":
                cond.append((t, Lam))
            else:
                u[t.name] = hmc_effect(t, Lam, t.name, centered.get(t.name) == "centered")
        sigma = sigma_sites()
        if cond:   # u = Λ (m(θ) + S(θ) ε): an exact change of variables (lmmarg.marginal.conditional)
            eps = [numpyro.sample(f"z_{t.name}", dist.Normal(jnp.zeros((t.n_groups, t.d), dt), 1.0).to_event(2))
                   for t, _ in cond]
            vs, logjac = conditional.conditional_transform(
                plan, beta, sigma, tuple(scales), parts.offset(u, skip=parts.cond_names, a=arrays),
                [parts.cond_term(arrays, t.name) for t, _ in cond], [L for _, L in cond], eps)
            for (t, L), v in zip(cond, vs):
                u[t.name] = numpyro.deterministic(f"u_{t.name}", v @ L.T)
            # the prior N(0, I) of v and the Jacobian replace the N(0, I) of the sampled ε
            extra = logjac - 0.5 * sum(jnp.sum(v * v) for v in vs) + 0.5 * sum(jnp.sum(e * e) for e in eps)
            numpyro.factor("conditional", jnp.where(jnp.isfinite(extra), extra, -jnp.inf))
        ll = _likelihood(plan, beta, sigma, tuple(scales), parts.offset(u, a=arrays), beta_prior)
        numpyro.factor("loglik", ll + log_jac)

    return model_fn


class Potential:
    """Unnormalized negative log posterior on unconstrained space, plus init / constrain / recover helpers.

    marginalize: "all" | "none" | "auto" | list of term names (terms integrated out analytically).
    parameterization: "centered" | "noncentered" (default) | "conditional" or {term: ...} for terms left to HMC;
    "laplace" (every term, marginalize="none"). "conditional" (Gaussian families, scalar σ or sigma_by): ε-offsets
    from the effects' approximate conditional mean, scaled by their approximate conditional SD given the global
    parameters (exact posterior; lmmarg.marginal.conditional) -- for large terms the data dominate.
    marginalize_beta: integrate the fixed effects out too (Gaussian families, normal priors on every fixed
    effect); ``recover`` then draws beta exactly with the random effects.
    """

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
        self.parts = _Parts(model, self.marg, self.centered)
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

        with TRACE_LOCK:   # NumPyro's handler stack is process-global (lmmarg.compiled)
            jax.eval_shape(_trace, jax.random.PRNGKey(0))
        self.transforms = {n: biject_to(s["support"]) for n, s in self.sites.items()}
        self.unc_shapes = {n: tuple(self.transforms[n].inverse_shape(s["shape"])) for n, s in self.sites.items()}
        center, width = self._center()
        self.data["std"] = self._standardization(center, width)
        self.data["start"] = {"center": center, "width": width}
        public = ["beta", "sigma", "b_sigma"]
        for sfx, terms in (("", model.terms), ("sigma_", getattr(model.sigma_spec.design, "terms", []))):
            for t in terms:
                public += [f"sd_{sfx}{t.name}", f"corr_{sfx}{t.name}", f"u_{sfx}{t.name}"]
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
        # lock: NumPyro's handler stack (and its validation flag) are process-global (lmmarg.compiled)
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
            if n.startswith("u_"):
                scale[n] = float(10.0 * float(width[n]))   # width = 0.1 residual SD
            if not np.isfinite(scale[n]) or scale[n] <= 0:
                scale[n] = 1.0
        m = self.model
        self.b_sites = [f"b_{c}" for c in m.fixed_names if f"b_{c}" in self.sites]
        b_shift, b_map = np.zeros(0), np.zeros((0, 0))
        if self.b_sites:
            cols = [m.fixed_names.index(n[2:]) for n in self.b_sites]
            X = np.asarray(m.design.X, dtype=np.float64)[:, cols]
            sy = 1.0 if m.family_spec.is_glmm else (float(np.std(np.asarray(m.y, dtype=np.float64))) or 1.0)
            b_shift = np.array([float(center[n]) for n in self.b_sites])
            b_map = sy * column_standardizer(X)            # (k, k): b = b_shift + b_map x
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
        fn = compiled.traced(self.programs.constrain, batches[0], self.data)   # traced under the lock, compiled
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
        c = {k: jax.ShapeDtypeStruct((rb,) + out[k].shape, out[k].dtype) for k in _recovery_inputs(out)}
        with TRACE_LOCK:
            lowered = self.programs.recover(rb).lower(jax.random.PRNGKey(0), 0, c, self.data)
        lowered.compile()

    # -- initial values -----------------------------------------------------------------------------------------
    def _center(self) -> tuple[dict, dict]:
        """Data-scaled constrained starting point per site and its unconstrained jitter half-width."""
        m = self.model
        X, y = np.asarray(m.design.X), np.asarray(m.y, float)
        if m.family_spec.is_glmm:  # the GLM fit without random effects; unit scale on the link
            from .families import glm_fit
            ols, rsd, sy = glm_fit(m.family_spec, X, y, m.trials, m.design.offset), 1.0, 1.0
        else:
            ols = np.linalg.lstsq(X, y, rcond=None)[0] if X.shape[1] else np.zeros(0)
            rsd = float(np.std(y - X @ ols)) if len(y) > 1 else 1.0
            rsd = rsd if rsd > 0 else 1.0
            sy = float(np.std(y)) or 1.0
        center, width = {}, {}
        cols = {f"sd_{t.name}__{c}": t.Z[:, j] for t in m.terms for j, c in enumerate(t.columns)}
        for n, s in self.sites.items():
            shape = s["shape"]
            if n.startswith("b_sigma_"):
                v, w = (np.log(rsd) if n == "b_sigma_Intercept" else 0.0), 0.2
            elif n.startswith("b_"):
                j = m.fixed_names.index(n[2:])
                sx = float(np.std(X[:, j]))
                v, w = ols[j], 0.1 * sy / (sx if sx > 0 else 1.0)
            elif n == "sigma":
                v, w = rsd, 0.5
            elif n.startswith("sd_sigma_"):
                v, w = 0.3, 0.5
            elif n.startswith("sd_"):
                z = cols.get(n)
                rms = float(np.sqrt(np.mean(z**2))) if z is not None else 1.0
                v, w = 0.5 * rsd / (rms if rms > 0 else 1.0), 0.5
            elif n.startswith("cor_"):
                center[n], width[n] = None, 0.5
                continue
            elif n.startswith("z_"):
                v, w = 0.0, 0.5
            elif n.startswith("u_"):
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
        bad = ~np.isfinite(np.asarray(compiled.traced_call(self._pe_jit, out))) if check else np.zeros(n, bool)
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
    def kernel_args(self, c: dict, data: dict | None = None) -> tuple:
        """The one map from constrained parameters to the marginal kernels' arguments.

        c: one draw of the public parameters (``constrain``'s keys, no leading dims). Returns (beta (p,), sigma
        () or (N,), scales: Λ_l = diag(sd_l) chol(corr_l) (d_l, d_l) per marginalized term in ``self.marg`` order,
        offset (N,) of the terms left to HMC or None) -- what ``kernels.log_marginal`` / ``conditional_mean`` /
        ``conditional_sample`` take with ``self.plan``. Used by recovery and by MAP/VI's conditional means.
        With beta marginalized (``marginalize_beta``), beta is zeros and ``beta_prior`` gives what the kernels
        integrate it against. data: ``self.data`` (default) or another data set of the same structure (the
        compiled recovery's argument).
        """
        arrays = (self.data if data is None else data)["parts"]
        c = {k: jnp.asarray(v) for k, v in c.items()}
        scales, u = [], {}
        for h, t in enumerate(self.model.terms):
            sd = c[f"sd_{t.name}"]
            L = jnp.linalg.cholesky(c[f"corr_{t.name}"]) if t.d > 1 else jnp.ones((1, 1), sd.dtype)
            if h in self.marg:
                scales.append(_lam(sd, L))
            else:
                u[t.name] = c[f"u_{t.name}"]
        beta = jnp.zeros((len(self.model.fixed_names),), self.model.dtype) if self.marginalize_beta else c["beta"]
        return beta, self.parts.sigma_obs(c, arrays), tuple(scales), self.parts.offset(u, a=arrays)

    def beta_prior(self, data: dict | None = None):
        """(mean (p,), scale (p, p)) of the fixed effects' normal priors when they are marginalized, else None."""
        if not self.marginalize_beta:
            return None
        return _beta_prior(self.model, (self.data if data is None else data)["priors"])

    def conditional_means(self, c: dict) -> tuple:
        """E[u | y, θ] per marginalized term at one constrained draw c (GLMM: the conditional modes û, the mean
        of the Laplace Gaussian): (G_l, d_l) per term in ``self.marg`` order. Jit-friendly."""
        beta, sigma, scales, offset = self.kernel_args(c)
        if isinstance(self.plan, laplace.LaplacePlan):
            return laplace.conditional_modes(self.plan, beta, scales, offset)
        return kernels.conditional_mean(self.plan.with_dense_form("scaled"), beta, sigma, scales, offset,
                                        self.beta_prior())[:len(self.marg)]

    def recover_one(self, key, c: dict, data: dict):
        """Exact draws of the marginalized effects {"u_<term>": (G, d)} (and "beta" (p,) when it is marginalized)
        given one constrained draw c, data as an argument. Pure, jit-friendly."""
        if not self.marg and not self.marginalize_beta:
            return {}
        beta, sigma, scales, offset = self.kernel_args(c, data)
        plan = data["plan"]
        if isinstance(plan, laplace.LaplacePlan):  # the Laplace Gaussian at the mode (approximate)
            draws = laplace.conditional_sample(plan, key, beta, scales, offset)
        else:                                       # exact, in the scaled form (valid for any Lambda)
            draws = kernels.conditional_sample(plan.with_dense_form("scaled"), key, beta, sigma, scales, offset,
                                               self.beta_prior(data))
        out = {f"u_{self.model.terms[h].name}": v for h, v in zip(self.marg, draws)}
        if self.marginalize_beta:
            out["beta"] = draws[-1]
        return out

    def _recover_batch(self) -> int:
        """Draws per recovery batch, fixed per model (so that runs with any number of draws reuse the compiled
        batch; the last batch is padded): 256, or less to bound the working memory (~N doubles per draw and term).
        """
        return self._batch(256, 2 + sum(t.d for t in self.model.terms))

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
                    for k in _recovery_inputs(draws)}
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
            out[f"u_{name}"] = np.asarray(draws[f"u_{name}"])
        res = {f"u_{t.name}": out[f"u_{t.name}"] for t in self.model.terms}
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


# -- compiled programs, shared between potentials of one structure --------------------------------------------------
# Compiled programs are not free to keep: on XLA:CPU each holds memory mappings of its machine code (about 1,300 for
# one structure's density, constrain, recovery and NUTS programs, measured), and Linux allows 65,530 per process;
# a process that kept every structure and option set it ever compiled crashed inside XLA after a few hundred fits
# (the test suite). So the cache is small, and each structure keeps a few NUTS drivers.
PROGRAM_CACHE_SIZE = 2                # structures whose programs stay cached in a process (least recently used go)
DRIVERS_PER_STRUCTURE = 2             # NUTS drivers (warmup, chains, options) kept per structure (least recent go)
# The programs of a cached structure hold its first potential (their closures read its structure: sites, terms,
# transforms); potentials with more data than this keep their own programs, so a large data set is never pinned
PROGRAM_SHARE_MAX_BYTES = 32 << 20


def _recovery_inputs(draws: dict) -> list:
    """The public parameters the recovery reads, of those in `draws` (in their order)."""
    return [k for k in draws if k in ("beta", "sigma", "b_sigma") or k.startswith(("sd_", "corr_", "u_"))]


def _data_bytes(data) -> int:
    return int(sum(np.size(x) * np.dtype(getattr(x, "dtype", np.float64)).itemsize for x in jax.tree.leaves(data)))


def signature(pot: Potential) -> str:
    """A digest of everything the compiled programs of ``pot`` depend on except the values in ``pot.data``: the
    jaxpr of its density with the data abstract (structure, priors' families, every literal constant), the values
    of any constants captured in it, the data's tree structure (with the plan's static fields) and shapes, and the
    names and shapes of its sites and outputs. Equal signatures: a program compiled for one potential computes the
    other's results when given the other's data."""
    wide = jax.dtypes.canonicalize_dtype(np.float64)
    params = {n: jax.ShapeDtypeStruct(s, wide) for n, s in pot.unc_shapes.items()}
    with TRACE_LOCK:
        closed = jax.make_jaxpr(pot.density)(params, pot.data)
    h = hashlib.sha256()
    text = re.sub(r" at 0x[0-9a-f]+", "", str(closed.jaxpr))   # function reprs inside printed parameters
    h.update(text.encode())
    for c in closed.consts:
        a = np.asarray(c)
        h.update(repr((a.shape, a.dtype.str)).encode())
        h.update(a.tobytes())
    leaves, tree = jax.tree.flatten(pot.data)
    m = pot.model
    static = (str(tree), [(np.shape(x), str(getattr(x, "dtype", type(x)))) for x in leaves],
              list(pot.unc_shapes.items()), pot.output_keys, pot.marg, sorted(pot.centered.items()),
              [(t.name, tuple(t.columns), t.d, t.n_groups) for t in m.terms], list(m.fixed_names), m.family,
              m.dtype.name if hasattr(m.dtype, "name") else str(m.dtype), pot.b_sites)
    h.update(repr(static).encode())
    return h.hexdigest()


class Programs:
    """The jitted programs of one model structure, the data an argument of each (``Potential.data``):

    density(params, data) -> scalar; constrain(params (S, ...), data) -> public parameters (S, ...);
    recover(bs)(key, batch index, draws (bs, ...), data) -> {"u_<term>": (bs, G, d)}; driver(key, make):
    lmmarg.inference.nuts's compiled NUTS drivers, keyed by their options.

    ``Programs.of(pot)`` returns the programs cached for ``signature(pot)`` (up to PROGRAM_CACHE_SIZE structures,
    for potentials with at most PROGRAM_SHARE_MAX_BYTES of data), so that refitting a model to new data of the same
    shapes -- simulation-based calibration, bootstrap, cross-validation folds -- compiles nothing again.

    Thread-safe: one structure's programs (and its NUTS drivers) may serve fits in several threads; every new
    structure counts towards ``lmmarg.compiled.MAX_COMPILED_STRUCTURES`` (``lmmarg.compiled.cache_info()``)."""

    _cache: OrderedDict = OrderedDict()
    _lock = threading.Lock()

    def __init__(self, pot: Potential):
        self.template = pot
        self.density = jax.jit(pot.density)   # also called inside the NUTS programs: no compile options here
        self.constrain = xla.jit(jax.vmap(pot.constrain_one, in_axes=(0, None)), data=pot.data)
        self._recover = {}
        self.drivers = OrderedDict()      # lmmarg.inference.nuts: options -> compiled driver (``driver``)
        self._own_lock = threading.Lock()  # guards drivers and _recover (fits in several threads share them)

    def driver(self, key, make):
        """The NUTS driver cached under `key` (built by make() when missing); at most DRIVERS_PER_STRUCTURE are kept,
        the least recently used dropped."""
        with self._own_lock:   # make() only builds jit wrappers (nothing is traced or compiled here)
            if key in self.drivers:
                self.drivers.move_to_end(key)
                return self.drivers[key]
            d = self.drivers[key] = make()
            while len(self.drivers) > DRIVERS_PER_STRUCTURE:
                self.drivers.popitem(last=False)
            return d

    def recover(self, bs: int):
        """The compiled recovery of a batch of bs draws: (key, batch index, draws, data) -> {"u_<term>": (bs, G,
        d)}; the per-draw keys are derived inside (fold_in the batch index, split)."""
        with self._own_lock:
            if bs not in self._recover:
                one = jax.vmap(self.template.recover_one, in_axes=(0, 0, None))
                self._recover[bs] = xla.jit(
                    lambda key, b, c, data: one(jax.random.split(jax.random.fold_in(key, b), bs), c, data),
                    data=self.template.data)
            return self._recover[bs]

    @classmethod
    def of(cls, pot: Potential) -> Programs:
        if _data_bytes(pot.data) > PROGRAM_SHARE_MAX_BYTES:
            compiled.note_compiled_structure(compiled.SAMPLER_WEIGHT)
            return cls(pot)
        sig = signature(pot)
        with cls._lock:
            if sig in cls._cache:
                cls._cache.move_to_end(sig)
                return cls._cache[sig]
        # counted outside _lock: it may release the compiled caches (Programs.clear takes _lock)
        compiled.note_compiled_structure(compiled.SAMPLER_WEIGHT)
        with cls._lock:
            if sig in cls._cache:            # another thread built it meanwhile
                return cls._cache[sig]
            progs = cls._cache[sig] = cls(pot)
            while len(cls._cache) > PROGRAM_CACHE_SIZE:
                cls._cache.popitem(last=False)
            return progs

    @classmethod
    def clear(cls) -> None:
        """Drop every cached structure's programs (potentials that hold theirs keep them)."""
        with cls._lock:
            cls._cache.clear()


compiled.register_releaser(Programs.clear)
compiled.register_size("programs", lambda: len(Programs._cache))
