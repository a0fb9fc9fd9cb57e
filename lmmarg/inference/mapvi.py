"""Point and variational fits of the global parameters on the marginal (random effects integrated out).

``fit_map``: posterior mode of (β, σ, SDs, correlations) under the model's priors, optimized in unconstrained
space (jax.value_and_grad + scipy L-BFGS); random effects are their exact conditional means at the mode.
``fit_vi``: NumPyro SVI with an AutoGuide over the unconstrained global parameters of ``model.numpyro_model()``;
random effects are recovered exactly (one conditional draw per guide draw). Both return ``lmmarg.results.Fit``
with samples of leading dims (chain=1, draw) and the keys of ``model.sample()``.
"""
from __future__ import annotations

import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize
from jax.flatten_util import ravel_pytree

from .. import parameters
from .._warnings import warn_user
from ..compile import xla
from ..compile.limits import TRACE_LOCK, note_compiled_structure, traced
from ..degenerate import check_residual, check_sampler_scales
from .blas import blas_threads
from ..results.fit import Fit
from .derivatives import hessian_from_gradients

__all__ = ["fit_map", "fit_vi"]

_GUIDES = ("normal", "lowrank", "flow")


def _potential(model, marginalize):
    pot = model.potential(marginalize)
    if not pot.sites:
        raise ValueError("every parameter is fixed by the priors: nothing to fit")
    return pot


def _constrained_sites(pot, params: dict) -> dict:
    return pot.to_constrained(params)


def _objective(pot, jacobian: bool):
    """Negative log posterior on unconstrained space (with or without the transforms' log-Jacobians)."""
    if jacobian:
        return pot.potential_fn
    return lambda params: -pot.log_density(_constrained_sites(pot, params))


def _conditional_means(pot, c: dict) -> dict:
    """E[u | y, θ] for every marginalized term at one constrained parameter dict (no leading dims)."""
    if not pot.marg:
        return {}
    means = pot.conditional_means(c)
    return {parameters.effects_site(pot.model.terms[h].name): np.asarray(m) for h, m in zip(pot.marg, means)}


# MAP edge handling: an SD whose log runs far below its start has (numerically) reached the boundary sd = 0.
MAP_EDGE_LOG_DROP = 7.0         # log-units below the start (a factor ~1e-3) that count as "at the boundary"
MAP_MAX_RESTARTS = 3
MAP_GRAD_TOL = 1e-4             # max |∇| on unconstrained coordinates at a converged interior mode
MAP_FD_STEP = 1e-5


def _sd_positions(pot, unravel, size: int) -> np.ndarray:
    """Positions in the flat unconstrained vector of the random-effect SD sites (log scale)."""
    probe = unravel(jnp.arange(size, dtype=jnp.float64 if jax.config.jax_enable_x64 else jnp.float32))
    pos = [np.asarray(v).reshape(-1).astype(int) for n, v in probe.items()
           if n.startswith(parameters.sd_site(""))]
    return np.concatenate(pos) if pos else np.zeros(0, int)


def _minimize_with_edge_restarts(f, x0, sd_pos, maxiter, gtol):
    """L-BFGS-B; when an SD ends at the boundary (log sd ≪ its start), restart with it back at its start and keep
    the better optimum (lme4's restart_edge, on the unconstrained scale)."""
    opts = dict(maxiter=maxiter, gtol=gtol, ftol=1e-15, maxcor=20)
    best = scipy.optimize.minimize(f, x0, jac=True, method="L-BFGS-B", options=opts)
    best.restarts = 0
    for _ in range(MAP_MAX_RESTARTS):
        edge = sd_pos[best.x[sd_pos] < x0[sd_pos] - MAP_EDGE_LOG_DROP]
        if edge.size == 0:
            break
        x1 = np.asarray(best.x, float).copy()
        x1[edge] = x0[edge]
        res = scipy.optimize.minimize(f, x1, jac=True, method="L-BFGS-B", options=opts)
        if not res.fun < best.fun - 1e-10 * max(1.0, abs(best.fun)):
            break
        res.restarts = best.restarts + 1
        best = res
    return best


def _map_checks(f, x, sd_pos, res) -> dict:
    """Gradient and Hessian (finite differences of ∇) checks at the mode, the boundary SDs excluded."""
    v, g = f(x)
    at_edge = np.zeros(x.size, bool)
    at_edge[sd_pos] = np.abs(g[sd_pos]) < MAP_GRAD_TOL   # flat in log sd at sd -> 0: the boundary, not a failure
    at_edge[sd_pos] &= x[sd_pos] < -10.0
    free = np.flatnonzero(~at_edge)
    msgs = []
    gmax = float(np.max(np.abs(g[free]), initial=0.0))
    if not (res.success or gmax < MAP_GRAD_TOL):
        msgs.append(f"max |grad| = {gmax:.3g} (tol = {MAP_GRAD_TOL})")
    lo = np.nan
    if free.size:
        w = np.linalg.eigvalsh(hessian_from_gradients(f, x, g, free, MAP_FD_STEP, central=True))
        lo = float(w[0])
        if lo <= -1e-6 * max(abs(w[-1]), 1e-300):
            msgs.append(f"degenerate Hessian with {int(np.sum(w <= -1e-6 * abs(w[-1])))} negative eigenvalues")
    return {"max_abs_grad": gmax, "hessian_min_eig": lo, "n_boundary": int(at_edge.sum()), "messages": msgs}


def fit_map(model, *, marginalize="all", jacobian: bool = False, starts: int = 1, seed: int = 0, init=None,
            maxiter: int = 5000, gtol: float = 1e-8):
    """Posterior mode of the global parameters; random effects at their conditional means given the mode.

    jacobian: False (default) maximizes the posterior density of the parameters themselves (penalized ML);
      True maximizes the density of the unconstrained parameters (``pot.potential_fn``, Jacobians included),
      whose mode never lies on a variance boundary.
    starts: number of optimizer starts (the first at the data-scaled centre, the rest jittered); the best wins.
    init: optional {site: unconstrained value} for the first start.
    Returns lmmarg.results.Fit (method "map", one chain, one draw); ``fit.mode`` is the constrained mode dict,
    ``fit.unconstrained`` the optimum in unconstrained space, ``fit.diagnostics`` holds the optimizer output.
    """
    if not isinstance(starts, (int, np.integer)) or starts < 1:
        raise ValueError(f"starts must be an integer >= 1, got {starts!r}")
    check_residual(model, "fit_map")
    check_sampler_scales(model, "fit_map")
    pot = _potential(model, marginalize)
    key = jax.random.PRNGKey(seed)
    cands = pot.init_params(key, num_chains=max(starts, 1))
    center = pot.init_params(key, num_chains=None)
    firsts = [init if init is not None else center]
    firsts += [{k: v[i] for k, v in cands.items()} for i in range(1, starts)]
    flat0, unravel = ravel_pytree({n: jnp.asarray(firsts[0][n], model.dtype) for n in pot.sites})
    cache = model.cache.mapvi
    ck = ("map", pot.marg, bool(jacobian))
    if ck not in cache:
        note_compiled_structure()
        obj = _objective(pot, jacobian)
        cache[ck] = xla.jit(jax.value_and_grad(lambda x: obj(unravel(x))), data=pot.data)
    vg = cache[ck]

    def f(x):
        v, g = vg(jnp.asarray(x, model.dtype))
        v, g = float(v), np.asarray(g, dtype=float)
        if not np.isfinite(v) or not np.isfinite(g).all():
            return 1e300, np.zeros_like(x)
        return v, g

    t0 = time.perf_counter()
    vg = traced(vg, flat0)   # traced under lmmarg's trace lock (NumPyro's handlers are process-global), compiled
    jax.block_until_ready(vg(flat0))
    t_compile = time.perf_counter() - t0
    best, runs = None, []
    sd_pos = _sd_positions(pot, unravel, flat0.size)
    with blas_threads(pot.plan.dense_size):
        for st in firsts:
            x0 = np.asarray(ravel_pytree({n: jnp.asarray(st[n], model.dtype) for n in pot.sites})[0], dtype=float)
            res = _minimize_with_edge_restarts(f, x0, sd_pos, maxiter, gtol)
            runs.append(float(res.fun))
            if best is None or res.fun < best.fun:
                best = res
        checks = _map_checks(f, np.asarray(best.x, float), sd_pos, best)
    t_opt = time.perf_counter() - t0 - t_compile
    grad_norm = float(np.max(np.abs(f(best.x)[1]), initial=0.0))
    converged = not checks["messages"]
    if not converged:
        warn_user(f"fit_map: optimizer did not converge ({best.message}): " + "; ".join(checks["messages"]))
    unc = {k: np.asarray(v) for k, v in unravel(jnp.asarray(best.x, model.dtype)).items()}
    draws = pot.constrain({k: v[None, None] for k, v in unc.items()})
    mode = {k: v[0, 0] for k, v in draws.items()}
    means = _conditional_means(pot, mode)
    for k, v in means.items():
        draws[k] = v[None, None]
        mode[k] = v
    diagnostics = {"objective": float(best.fun), "log_posterior": -float(best.fun), "jacobian": bool(jacobian),
                   "converged": converged, "message": str(best.message), "n_iter": int(best.nit),
                   "max_abs_grad": grad_norm, "start_objectives": runs, "time_compile": t_compile,
                   "time_optimize": t_opt, "marginalized": list(pot.marginalized_terms),
                   "restarts": int(getattr(best, "restarts", 0)), "checks": checks}
    fit = Fit(model, draws, diagnostics=diagnostics, method="map", potential=pot)
    fit.mode = mode
    fit.unconstrained = unc
    return fit


def _guide(model_fn, guide: str, init_values: dict, rank, flow_kwargs):
    from numpyro.infer import autoguide, init_to_value

    init = init_to_value(values=init_values)
    if guide == "normal":
        return autoguide.AutoNormal(model_fn, init_loc_fn=init, init_scale=0.1)
    if guide == "lowrank":
        return autoguide.AutoLowRankMultivariateNormal(model_fn, init_loc_fn=init, init_scale=0.1, rank=rank)
    kw = dict(num_flows=2, hidden_dims=[32, 32])
    kw.update(flow_kwargs or {})
    return autoguide.AutoIAFNormal(model_fn, init_loc_fn=init, **kw)


def _whitened_model(pot, model):
    """For flows: x = m + s ε with m the (Jacobian) MAP and s the Laplace SDs, so the flow sees an O(1) target.

    Returns (numpyro model over the site "eps" (n,), map ε ↦ unconstrained dict)."""
    import numpyro
    import numpyro.distributions as dist
    from numpyro.distributions import constraints

    mode = fit_map(model, marginalize=pot.marginalized_terms, jacobian=True).unconstrained
    m, unravel = ravel_pytree({n: jnp.asarray(mode[n], model.dtype) for n in pot.sites})
    with TRACE_LOCK:
        H = jax.hessian(lambda x: pot.potential_fn(unravel(x)))(m)
    try:
        s = np.sqrt(np.clip(np.diag(np.linalg.inv(np.asarray(H))), 1e-8, None))
    except np.linalg.LinAlgError:
        s = np.ones(m.shape[0])
    s = jnp.asarray(np.where(np.isfinite(s), s, 1.0), model.dtype)

    def to_unc(eps):
        return unravel(m + s * eps)

    def model_fn():
        eps = numpyro.sample("eps", dist.ImproperUniform(constraints.real_vector, (), (m.shape[0],)))
        with numpyro.handlers.block():  # the potential runs its own NumPyro trace
            lp = -pot.potential_fn(to_unc(eps))
        numpyro.factor("lp", lp)

    return model_fn, to_unc, jnp.zeros_like(m)


def fit_vi(model, guide: str = "normal", *, steps: int = 5000, draws: int = 1000, seed: int = 0, lr: float = 0.02,
           num_particles: int = 1, marginalize="all", init: str = "center", rank=None, flow_kwargs=None,
           progress_bar: bool = False):
    """Variational fit (NumPyro SVI, Adam, Trace_ELBO) over the unconstrained global parameters.

    guide: "normal" (AutoNormal, mean-field), "lowrank" (AutoLowRankMultivariateNormal, ``rank``) or
      "flow" (AutoIAFNormal, ``flow_kwargs`` e.g. num_flows, hidden_dims).
    init: "center" (data-scaled start of the potential) or "map" (start the guide at the MAP, Jacobian included).
      The flow always runs on whitened coordinates x = MAP + s ε (s: Laplace SDs at the MAP).
    Returns lmmarg.results.Fit (method "vi", one chain of ``draws`` guide draws, random effects recovered exactly);
    ``fit.losses`` is the ELBO loss trace (steps,), ``fit.guide`` / ``fit.params`` the fitted guide.
    """
    import numpyro.optim
    from numpyro.infer import SVI, Trace_ELBO

    if guide not in _GUIDES:
        raise ValueError(f"guide must be one of {_GUIDES}, got {guide!r}")
    check_residual(model, "fit_vi")
    check_sampler_scales(model, "fit_vi")
    for name, v in (("steps", steps), ("draws", draws), ("num_particles", num_particles)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if init not in ("center", "map"):
        raise ValueError(f"init must be 'center' or 'map', got {init!r}")
    pot = _potential(model, marginalize)
    k_init, k_svi, k_draw, k_rec = jax.random.split(jax.random.PRNGKey(seed), 4)
    if guide == "flow":
        model_fn, to_unc, eps0 = _whitened_model(pot, model)
        init_values = {"eps": eps0}
    else:
        model_fn, to_unc = pot.model_fn, None
        if init == "map":
            start = fit_map(model, marginalize=marginalize, jacobian=True, seed=seed).unconstrained
        else:
            start = pot.init_params(k_init, num_chains=None)
        init_values = _constrained_sites(pot, {k: jnp.asarray(v) for k, v in start.items()})
    g = _guide(model_fn, guide, init_values, rank, flow_kwargs)
    svi = SVI(model_fn, g, numpyro.optim.Adam(lr), Trace_ELBO(num_particles=num_particles))
    t0 = time.perf_counter()
    # SVI runs the model and guide under NumPyro's handlers (a process-global stack) as it traces its update:
    # the trace lock is held for the whole run (lmmarg.compile.limits), so concurrent fit_vi calls run one at a time
    with blas_threads(pot.plan.dense_size), TRACE_LOCK:
        res = svi.run(k_svi, steps, progress_bar=progress_bar, stable_update=True)
        jax.block_until_ready(res.losses)  # inside the limit: dispatch is asynchronous
        t_fit = time.perf_counter() - t0
        post = g.sample_posterior(k_draw, res.params, sample_shape=(draws,))
    losses = np.asarray(res.losses)
    if to_unc is not None:
        unc = jax.vmap(to_unc)(post["eps"])
    else:
        unc = jax.vmap(pot.unconstrain)({n: post[n] for n in pot.sites})
    samples = pot.constrain({k: np.asarray(v)[None] for k, v in unc.items()})
    t1 = time.perf_counter()
    samples.update(pot.recover(samples, k_rec))
    tail = losses[-max(1, steps // 10):]
    diagnostics = {"guide": guide, "steps": steps, "lr": lr, "final_loss": float(np.mean(tail)),
                   "loss_sd_tail": float(np.std(tail)), "time_fit": t_fit, "time_recover": time.perf_counter() - t1,
                   "draws": draws, "marginalized": list(pot.marginalized_terms)}
    if not np.isfinite(losses[-1]):
        warnings.warn("fit_vi: the ELBO loss is not finite at the end; try a smaller lr", stacklevel=3)
    fit = Fit(model, samples, diagnostics=diagnostics, method="vi", potential=pot)
    fit.losses, fit.guide, fit.params = losses, g, res.params
    return fit
