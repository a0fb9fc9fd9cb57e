"""NUTS on the marginal posterior of the global parameters; random effects recovered exactly afterwards."""
from __future__ import annotations

import contextlib
import time

import jax
import numpy as np
from numpyro.infer import MCMC, NUTS

__all__ = ["sample"]

_EXTRA = ("diverging", "num_steps", "adapt_state.step_size", "accept_prob", "potential_energy")


@contextlib.contextmanager
def _compile_timer():
    """Seconds JAX spends tracing, lowering and compiling inside the block (via jax.monitoring events)."""
    acc = {"s": 0.0}
    events = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
              "/jax/core/compile/backend_compile_duration")

    def listener(event, duration, **kwargs):
        if event in events:
            acc["s"] += duration

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield acc
    finally:
        try:
            jax.monitoring.unregister_event_duration_listener(listener)
        except (AssertionError, ValueError):
            pass


def sample(model, draws: int = 1000, warmup: int = 1000, chains: int = 4, seed: int = 0, marginalize="all",
           chain_method: str = "vectorized", progress_bar: bool = True, parameterization=None,
           recover: bool = True, **nuts_kwargs):
    """Sample the posterior with NUTS (NumPyro) on the marginal likelihood.

    marginalize: "all" (default) | "none" | "auto" | list of term names integrated out analytically.
    parameterization: "noncentered" (default) | "centered" | {term: ...} for terms left to HMC.
    chain_method: "vectorized" (default; all chains on one device), "sequential" or "parallel".
    nuts_kwargs: passed to numpyro.infer.NUTS (target_accept_prob, max_tree_depth, dense_mass, ...).
    Returns lmmarg.results.Fit; samples have leading dims (chains, draws) and include every "u_<term>".
    """
    for name, v, lo in (("draws", draws, 1), ("warmup", warmup, 0), ("chains", chains, 1)):
        if not isinstance(v, (int, np.integer)) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    from ..results import Fit

    pot = model.potential(marginalize, parameterization)
    if not pot.sites:
        raise ValueError("every parameter is fixed by the priors: nothing to sample")
    k_init, k_mcmc, k_rec = jax.random.split(jax.random.PRNGKey(seed), 3)
    init = pot.init_params(k_init, num_chains=chains)
    if chains == 1:
        init = {k: v[0] for k, v in init.items()}
    nuts_kwargs.setdefault("target_accept_prob", 0.8)
    kernel = NUTS(potential_fn=pot.potential_fn, **nuts_kwargs)
    mcmc = MCMC(kernel, num_warmup=warmup, num_samples=draws, num_chains=chains, chain_method=chain_method,
                progress_bar=progress_bar)
    t0 = time.perf_counter()
    with _compile_timer() as comp:  # one run (warmup + sampling): a separate warmup() would compile twice
        mcmc.run(k_mcmc, init_params=init, extra_fields=_EXTRA)
        raw = mcmc.get_samples(group_by_chain=True)
        jax.block_until_ready(raw)
    t2 = time.perf_counter()
    samples = pot.constrain(raw)
    t3 = time.perf_counter()
    if recover:
        samples.update(pot.recover(samples, k_rec))
    t4 = time.perf_counter()

    extra = mcmc.get_extra_fields(group_by_chain=True)
    n_steps = np.asarray(extra["num_steps"])
    max_depth = nuts_kwargs.get("max_tree_depth", 10)
    max_depth = max_depth[0] if isinstance(max_depth, tuple) else max_depth
    depth = np.ceil(np.log2(n_steps + 1)).astype(int)
    stats = {
        "diverging": np.asarray(extra["diverging"]),
        "n_steps": n_steps,
        "tree_depth": depth,
        "step_size": np.asarray(extra["adapt_state.step_size"]),
        "acceptance_rate": np.asarray(extra["accept_prob"]),
        "lp": -np.asarray(extra["potential_energy"]),
    }
    diagnostics = {
        "divergences": int(stats["diverging"].sum()),
        "divergences_per_chain": stats["diverging"].sum(1).tolist(),
        "max_tree_depth": int(max_depth),
        "max_tree_depth_hits": int((depth >= max_depth).sum()),
        "mean_tree_depth": float(depth.mean()),
        "mean_n_steps": float(n_steps.mean()),
        "step_size": stats["step_size"][:, -1].tolist(),
        "mean_acceptance": float(stats["acceptance_rate"].mean()),
        "time_compile": comp["s"],  # tracing + XLA compilation of the NUTS kernel
        "time_mcmc": t2 - t0 - comp["s"],  # warmup + sampling, compilation excluded
        "time_total": time.perf_counter() - t0,
        "time_constrain": t3 - t2,
        "time_recover": t4 - t3,  # includes compilation of the recovery kernel (first call)
        "chains": chains, "draws": draws, "warmup": warmup, "chain_method": chain_method,
        "marginalized": list(pot.marginalized_terms), "hmc_terms": list(pot.hmc_terms),
    }
    return Fit(model, samples, sample_stats=stats, diagnostics=diagnostics, method="nuts", potential=pot)
