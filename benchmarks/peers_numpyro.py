"""Peers: the NumPyro model a user writes by hand today (centered or non-centered random effects).

`lmm_numpyro(model, priors, centered)` is the textbook NumPyro LMM built from an lmmarg.Model's design (X, Z,
codes) and the experiment's priors dict: β vector, σ (or σ per level / a log-σ regression), per term SD vector τ,
LKJ Cholesky factor L, random effects u_g ~ MVN(0, diag(τ) L) (centered) or u = z (diag(τ) L)ᵀ with z ~ N(0, I)
(non-centered), likelihood Normal(Xβ + Σ_terms rowsum(Z ∘ u[codes]), σ) on the Gaussian scale.

Every model exposes deterministic sites with the canonical keys (beta, sigma, sd_<term>, corr_<term>, u_<term>).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions.transforms import biject_to
from numpyro.infer.util import constrain_fn, potential_energy

from .experiments import resolve_prior
from .harness import Target


def _sample_or_fix(name, prior, shape=()):
    if isinstance(prior, (int, float)):
        return jnp.full(shape, float(prior))
    if shape:
        return numpyro.sample(name, prior.expand(shape).to_event(len(shape)))
    return numpyro.sample(name, prior)


def _vector_prior(name, priors_list):
    """Sample a vector whose entries have the given priors (one site if all equal Normal, else one per entry)."""
    if all(isinstance(p, dist.Normal) for p in priors_list):
        loc = jnp.array([float(p.loc) for p in priors_list])
        scale = jnp.array([float(p.scale) for p in priors_list])
        return numpyro.sample(name, dist.Normal(loc, scale).to_event(1))
    return jnp.stack([_sample_or_fix(f"{name}_{i}", p) for i, p in enumerate(priors_list)])


def _term_scale(term, priors, sfx=""):
    """(d, d) scale_tril diag(τ) L of a term under the priors; records sd_/corr_ deterministics."""
    name = sfx + term.name
    sd_pri = [resolve_prior(priors, "sd", term, c, sfx) for c in term.columns]
    if all(p is sd_pri[0] for p in sd_pri) and not isinstance(sd_pri[0], (int, float)):
        tau = numpyro.sample(f"tau_{name}", sd_pri[0].expand([term.d]).to_event(1))
    else:
        tau = jnp.stack([_sample_or_fix(f"tau_{name}_{i}", p) for i, p in enumerate(sd_pri)])
    numpyro.deterministic(f"sd_{name}", tau)
    if term.d > 1 and term.correlated:
        lkj = resolve_prior(priors, "cor", term, sfx=sfx)
        eta = float(np.asarray(getattr(lkj, "concentration", getattr(lkj, "eta", 1.0))))
        L = numpyro.sample(f"L_{name}", dist.LKJCholesky(term.d, eta))
        numpyro.deterministic(f"corr_{name}", L @ L.T)
        return tau[:, None] * L
    return jnp.diag(tau)


def _ranef(name, G, scale_tril, centered):
    d = scale_tril.shape[0]
    if centered:
        if d == 1:
            u = numpyro.sample(f"u_{name}", dist.Normal(0.0, scale_tril[0, 0]).expand([G, 1]).to_event(2))
        else:
            u = numpyro.sample(f"u_{name}", dist.MultivariateNormal(jnp.zeros(d), scale_tril=scale_tril)
                               .expand([G]).to_event(1))
        return u
    z = numpyro.sample(f"z_{name}", dist.Normal(0.0, 1.0).expand([G, d]).to_event(2))
    return numpyro.deterministic(f"u_{name}", z @ scale_tril.T)


def lmm_numpyro(model, priors: dict, centered=True):
    """A NumPyro model function (no arguments) for an lmmarg.Model's LMM, written the textbook way.

    y ~ N(Xβ + Σ_terms rowsum(Z ∘ u[codes]), σ²) on the Gaussian scale (log y for lognormal), σ scalar, one per
    level (sigma_by) or exp(X_σ b_σ + Σ Z_σ u_σ) (sigma formula; its effects follow `centered` too)."""
    X = jnp.asarray(model.design.X)
    y = jnp.asarray(model.y)
    terms = model.terms
    Zs = [jnp.asarray(t.Z) for t in terms]
    codes = [jnp.asarray(t.codes) for t in terms]
    b_pri = [resolve_prior(priors, "b", col=c) for c in model.fixed_names]
    sspec = model.sigma_spec
    if sspec.kind == "formula":
        sdes = sspec.design
        sX = jnp.asarray(sdes.X)
        sZ = [jnp.asarray(t.Z) for t in sdes.terms]
        scodes = [jnp.asarray(t.codes) for t in sdes.terms]
        sb_pri = [resolve_prior(priors, "b", col=c, sfx="sigma_") for c in sdes.fixed_names]
    else:
        s_pri = resolve_prior(priors, "sigma")
    by = jnp.asarray(sspec.codes) if sspec.kind == "by" else None

    def numpyro_model():
        beta = numpyro.deterministic("beta", _vector_prior("b", b_pri))
        mu = X @ beta
        for t, Z, c in zip(terms, Zs, codes):
            u = _ranef(t.name, t.n_groups, _term_scale(t, priors), centered)
            mu = mu + jnp.sum(Z * u[c], axis=-1)
        if sspec.kind == "formula":
            bs = numpyro.deterministic("b_sigma", _vector_prior("bs", sb_pri))
            eta = sX @ bs
            for t, Z, c in zip(sdes.terms, sZ, scodes):
                u = _ranef("sigma_" + t.name, t.n_groups, _term_scale(t, priors, "sigma_"), centered)
                eta = eta + jnp.sum(Z * u[c], axis=-1)
            sigma = jnp.exp(eta)
        elif sspec.kind == "by":
            K = len(sspec.levels)
            s = numpyro.deterministic("sigma", _sample_or_fix("sig", s_pri, (K,)))
            sigma = s[by]
        else:
            sigma = numpyro.deterministic("sigma", _sample_or_fix("sig", s_pri))
        numpyro.sample("y", dist.Normal(mu, sigma), obs=y)
    return numpyro_model


# ---------------------------------------------------------------------------------------------- targets
CANON = ("beta", "sigma", "b_sigma", "sd_", "corr_", "u_")


def numpyro_target(experiment, method, model, note="", canon=CANON, recover=None) -> Target:
    """Wrap a NumPyro model (no arguments) as a harness Target: NumPyro's potential_energy and transforms,
    init_to_uniform-style starts (uniform(−2, 2) on unconstrained space, as NUTS' default)."""
    supports = {}

    def trace_values():  # abstract trace (jax.eval_shape): no eager op-by-op execution
        tr = numpyro.handlers.trace(numpyro.handlers.seed(model, 0)).get_trace()
        sites = {n: s for n, s in tr.items() if s["type"] == "sample" and not s["is_observed"]}
        supports.update({n: s["fn"].support for n, s in sites.items()})
        return {n: s["value"] for n, s in sites.items()}

    values = jax.eval_shape(trace_values)
    shapes = {n: biject_to(supports[n]).inverse_shape(v.shape) for n, v in values.items()}

    def potential_fn(params):
        return potential_energy(model, (), {}, params)

    def init(key):
        keys = jax.random.split(key, len(shapes))
        return {n: jax.random.uniform(k, shp, minval=-2.0, maxval=2.0) for k, (n, shp) in zip(keys, shapes.items())}

    def one(z):
        out = constrain_fn(model, (), {}, z, return_deterministic=True)
        return {k: v for k, v in out.items() if k.startswith(canon) and k != "y"}
    one_jit = jax.jit(jax.vmap(one))

    def constrain(z):
        lead = jax.tree_util.tree_leaves(z)[0].shape[:2]
        flat = jax.tree_util.tree_map(lambda a: a.reshape((-1,) + a.shape[2:]), z)
        return {k: np.asarray(v).reshape(lead + v.shape[1:]) for k, v in one_jit(flat).items()}

    return Target(experiment, method, potential_fn, init, constrain, recover=recover, note=note)


def lmmarg_target(experiment, method, model, marginalize="all", parameterization=None, note="") -> Target:
    """lmmarg's own potential (model.potential) as a harness Target; recovery via pot.recover."""
    pot = model.potential(marginalize=marginalize, parameterization=parameterization)

    def init(key):
        return pot.init_params(key, num_chains=None)

    def recover(z, key):
        c = pot.constrain(z)
        return pot.recover(c, key) if pot.marg else None

    t = Target(experiment, method, pot.potential_fn, init, pot.constrain,
               recover=recover if pot.marg else None, note=note)
    t.extra["potential"] = pot
    return t
