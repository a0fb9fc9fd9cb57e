"""The marginalized model as a NumPyro model: its constant parts, its data pytree and the model function.

A model's structure (terms, priors' families, parameterization) is closed over by the model function; its numbers
(the plan, the terms' arrays, the priors' parameters) are the pytree ``model_data`` returns, passed as the model's
one argument, so that one compiled program serves every data set of the same shapes. Site names come from
``lmmarg.parameters``; ``lmmarg.potential.Potential`` builds on this module.

Documented internal API:

* ``ModelParts(model, marg, centered)``: the terms' constant arrays; ``offset`` / ``sigma_obs`` / ``cond_term``.
* ``model_data(model, plan, parts) -> dict``: the data pytree {"plan", "parts", "priors", "log_jac"}.
* ``make_model_fn(model, marg, centered, parts=None, marginalize_beta=False) -> model_fn(data)``.
* ``beta_prior(model, priors) -> (mean (p,), scale (p, p))``: the fixed effects' normal priors, from the data
  pytree's "priors".
* ``gaussian_centred(plan, beta, sigma, scales, eps, Z, codes) -> (value, u per term)``: the Laplace-centred joint
  of a Gaussian model (exact).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist

from . import distributions, parameters
from .marginal import conditional, kernels, laplace

__all__ = ["ModelParts", "model_data", "make_model_fn", "beta_prior", "gaussian_centred"]


class ModelParts:
    """Constant arrays and metadata of a model's terms, shared by the NumPyro model, recovery and prediction.

    Attributes: model, marg (indices of the marginalized terms), dtype, terms, Z: (N, d_h) per term, codes: (N,)
    int32 per term, centered: {term name: "centered" | "noncentered" | "conditional" | "laplace"} for the terms left
    to HMC, cond_names / cond_terms: the terms in the conditional parameterization and their constants
    (lmmarg.marginal.conditional.CondTerm), sspec: the residual-SD spec (lmmarg.priors.SigmaSpec) and its arrays
    (by_codes (N,) for sigma_by; sX (N, p_σ), sZ, scodes for a sigma formula)."""

    def __init__(self, model, marg: tuple, centered: dict):
        dt = model.dtype
        self.model, self.marg, self.dtype = model, marg, dt
        self.terms = model.terms
        # None for a model from sufficient statistics (no rows; every term is marginalized there)
        self.Z = [None if t.Z is None else jnp.asarray(t.Z, dt) for t in self.terms]
        self.codes = [None if t.codes is None else jnp.asarray(t.codes, jnp.int32) for t in self.terms]
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
        """Residual SD for the likelihood: scalar, or (N,) for sigma_by / a sigma formula; None for a GLMM family;
        the dispersion () (shape / phi) for a GLMM family that has one (the Laplace kernels' ``dispersion``).
        a: the arrays (``arrays()``; default this model's)."""
        k = self.sspec.kind
        if k == "none":
            return None
        if k == "dispersion":
            return c[self.sspec.dispersion]
        if k == "constant":
            return c["sigma"]
        a = self.arrays() if a is None else a
        if k == "by":
            return c["sigma"][a["by_codes"]]
        eta = a["sX"] @ c["b_sigma"]
        for j, t in enumerate(self.sspec.design.terms):
            eta = eta + jnp.sum(a["sZ"][j] * c[parameters.effects_site(t.name, sigma_part=True)][a["scodes"][j]], -1)
        return jnp.exp(eta)


# jitted so eager uses (initialize_model, Predictive, tracing) compile the kernel once instead of op by op;
# inlined when called under an outer jit/grad/vmap
_log_marginal_jit = jax.jit(kernels.log_marginal)
_laplace_jit = jax.jit(laplace.log_marginal)
_laplace_centred_jit = jax.jit(laplace.laplace_centred)


def gaussian_centred(plan, beta, sigma, scales, eps, Z, codes):
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


_gaussian_centred_jit = jax.jit(gaussian_centred)


def _likelihood(plan, beta, sigma, scales, offset, beta_prior=None):
    """The marginal log-likelihood: exact (Gaussian families, a Plan; beta integrated out against beta_prior when
    the plan marginalizes it) or Laplace (GLMM families, a LaplacePlan; sigma is then the dispersion or None)."""
    if isinstance(plan, laplace.LaplacePlan):
        return _laplace_jit(plan, beta, scales, offset, sigma)
    return _log_marginal_jit(plan, beta, sigma, scales, offset, beta_prior)


def beta_prior(model, priors: dict):
    """(mean (p,), scale (p, p)) of the fixed effects' independent normal priors, from the data pytree's priors
    (``model_data(...)["priors"]``)."""
    ds = [priors[parameters.fixed_site(n)].d for n in model.fixed_names]
    return jnp.stack([d.loc for d in ds]), jnp.diag(jnp.stack([d.scale for d in ds]))


class _PriorData:
    """A NumPyro distribution as a pytree whose leaves come in sorted field order. NumPyro flattens a distribution
    in the order of a set of field names, which changes with Python's string-hash seed: the compiled programs'
    argument order, and so the persistent compilation cache's keys, would change from one process to the next."""

    def __init__(self, d):
        self.d = d
        self.flat = None   # (children, aux), computed once: NumPyro's generic flattening is slow and runs per call


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


def model_data(model, plan, parts: ModelParts) -> dict:
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


def make_model_fn(model, marg: tuple, centered: dict, parts: ModelParts | None = None,
                  marginalize_beta: bool = False):
    """A NumPyro model of the marginalized LMM taking one argument, the data pytree of ``model_data``; the
    marginal log-likelihood is a factor. Only the model's structure is read from ``model`` here.
    marginalize_beta: the fixed effects are integrated out against their normal priors (no beta sites)."""
    pri = model.priors
    parts = parts or ModelParts(model, marg, centered)
    dt = model.dtype
    laplace_centred = bool(centered) and set(centered.values()) == {"laplace"}

    def model_fn(data):
        plan, arrays, prior = data["plan"], data["parts"], data["priors"]

        def site(p):
            if p.is_fixed:
                return prior[p.site]
            return numpyro.sample(p.site, prior[p.site].d)

        def term_scale(t, sigma_part=False):
            """Λ (d, d) of term t; its SD and correlation sites and their public deterministic values."""
            sd = jnp.stack([site(pri[parameters.sd_site(t.name, c, sigma_part)]) for c in t.columns])
            numpyro.deterministic(parameters.sd_site(t.name, sigma_part=sigma_part), sd)
            if t.d == 1:
                return parameters.relative_factor(sd, None)
            pc = pri[parameters.cor_prior_site(t.name, sigma_part)]
            if pc.is_fixed:
                Lc = prior[pc.site]
            else:
                Lc = numpyro.sample(pc.site, distributions.lkj_cholesky(t.d, prior[pc.site], dt))
            numpyro.deterministic(parameters.corr_site(t.name, sigma_part), Lc @ Lc.T)
            return parameters.relative_factor(sd, Lc)

        def hmc_effect(t, Lam, centered_, sigma_part=False):
            """The (G, d) effects of term t left to HMC: sampled (centred) or Λ z (noncentred)."""
            G, d = t.n_groups, t.d
            u_site = parameters.effects_site(t.name, sigma_part)
            if centered_:
                return numpyro.sample(u_site, dist.MultivariateNormal(jnp.zeros(d, dt), scale_tril=Lam)
                                      .expand([G]).to_event(1))
            z = numpyro.sample(parameters.standard_site(t.name, sigma_part),
                               dist.Normal(jnp.zeros((G, d), dt), 1.0).to_event(2))
            return numpyro.deterministic(u_site, z @ Lam.T)

        def sigma_sites():
            c = {}
            sk = parts.sspec.kind
            if sk == "dispersion":
                p = pri[parts.sspec.dispersion]
                c[p.site] = site(p)
                if p.is_fixed:
                    numpyro.deterministic(p.site, c[p.site])
            elif sk in ("constant", "by"):
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
                c["b_sigma"] = numpyro.deterministic(
                    "b_sigma", jnp.stack([site(pri[parameters.fixed_site(n, sigma_part=True)])
                                          for n in sd_.fixed_names]))
                for t in sd_.terms:
                    c[parameters.effects_site(t.name, sigma_part=True)] = hmc_effect(
                        t, term_scale(t, sigma_part=True), False, sigma_part=True)
            return parts.sigma_obs(c, arrays)

        log_jac = data["log_jac"]
        if marginalize_beta:   # integrated out against its prior; recovered exactly with the random effects
            beta, beta_prior_ = jnp.zeros((len(model.fixed_names),), dt), beta_prior(model, prior)
        else:
            beta = jnp.stack([site(pri[parameters.fixed_site(n)]) for n in model.fixed_names]) if model.fixed_names \
                else jnp.zeros((0,), dt)
            beta_prior_ = None
            numpyro.deterministic("beta", beta)
        if laplace_centred:   # every term: u = mode(θ) + L(θ)^{-T} ε, an exact reparameterization
            scales = tuple(term_scale(t) for t in model.terms)
            eps = tuple(numpyro.sample(parameters.standard_site(t.name),
                                       dist.Normal(jnp.zeros((t.n_groups, t.d), dt), 1.0).to_event(2))
                        for t in model.terms)
            if isinstance(plan, laplace.LaplacePlan):
                val, us = _laplace_centred_jit(plan, beta, scales, eps, None, sigma_sites())
            else:
                val, us = _gaussian_centred_jit(plan, beta, sigma_sites(), scales, eps, arrays["Z"],
                                                arrays["codes"])
            for t, u_t in zip(model.terms, us):
                numpyro.deterministic(parameters.effects_site(t.name), u_t)
            numpyro.factor("loglik", val + log_jac)
            return
        scales, u, cond = [], {}, []
        for h, t in enumerate(model.terms):
            Lam = term_scale(t)
            if h in marg:
                scales.append(Lam)
            elif centered.get(t.name) == "conditional":
                cond.append((t, Lam))
            else:
                u[t.name] = hmc_effect(t, Lam, centered.get(t.name) == "centered")
        sigma = sigma_sites()
        if cond:   # u = Λ (m(θ) + S(θ) ε): an exact change of variables (lmmarg.marginal.conditional)
            eps = [numpyro.sample(parameters.standard_site(t.name),
                                  dist.Normal(jnp.zeros((t.n_groups, t.d), dt), 1.0).to_event(2)) for t, _ in cond]
            vs, logjac = conditional.conditional_transform(
                plan, beta, sigma, tuple(scales), parts.offset(u, skip=parts.cond_names, a=arrays),
                [parts.cond_term(arrays, t.name) for t, _ in cond], [L for _, L in cond], eps)
            for (t, L), v in zip(cond, vs):
                u[t.name] = numpyro.deterministic(parameters.effects_site(t.name), v @ L.T)
            # the prior N(0, I) of v and the Jacobian replace the N(0, I) of the sampled ε
            extra = logjac - 0.5 * sum(jnp.sum(v * v) for v in vs) + 0.5 * sum(jnp.sum(e * e) for e in eps)
            numpyro.factor("conditional", jnp.where(jnp.isfinite(extra), extra, -jnp.inf))
        ll = _likelihood(plan, beta, sigma, tuple(scales), parts.offset(u, a=arrays), beta_prior_)
        numpyro.factor("loglik", ll + log_jac)

    return model_fn
