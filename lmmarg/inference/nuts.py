"""NUTS on the marginal posterior of the global parameters; random effects recovered exactly afterwards."""
from __future__ import annotations

import contextlib
import time

import jax
import numpy as np
from numpyro.infer import MCMC, NUTS
from tqdm.auto import tqdm

from ._blas import blas_threads

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


class _Driver:
    """NUTS for `chains` vectorized chains, compiled once per (potential, warmup, chains, NUTS options).

    Iterations run as jitted chunks of a `lax.scan` over `kernel.sample` (adaptation happens inside the kernel
    while the iteration count is below `warmup`), so the progress bar costs nothing and a repeated sample() on
    the same model reuses the compiled chunk.
    """

    def __init__(self, pot, warmup: int, chains: int, nuts_kwargs: dict):
        self.kernel = NUTS(potential_fn=pot.potential_fn, **nuts_kwargs)
        self.warmup = warmup
        kernel = self.kernel

        def init(keys, params):
            return jax.vmap(lambda k, p: kernel.init(k, warmup, p, (), {}))(keys, params)

        def chunk(state, n_iter):
            def step(st, _):
                st = jax.vmap(lambda s: kernel.sample(s, (), {}))(st)
                return st, (st.z, st.diverging, st.num_steps, st.adapt_state.step_size, st.accept_prob,
                            st.potential_energy)
            return jax.lax.scan(step, state, None, length=n_iter)

        self.init = jax.jit(init)
        self.chunk = jax.jit(chunk, static_argnums=1)

    def run(self, key, init_params, draws: int, progress_bar: bool):
        chains = next(iter(init_params.values())).shape[0]
        state = self.init(jax.random.split(key, chains), init_params)
        total = self.warmup + draws
        size = max(1, min(total, max(50, total // 20)))
        outs, done = [], 0
        bar = tqdm(total=total, desc="NUTS (warmup)", disable=not progress_bar, leave=False)
        while done < total:
            n = min(size, total - done)
            state, out = self.chunk(state, size)  # fixed chunk length: one compilation
            outs.append(jax.tree.map(lambda x: x[:n], out))
            done += n
            bar.update(n)
            if done >= self.warmup:
                bar.set_description("NUTS (sampling)")
        bar.close()
        out = jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs], 0), *outs)
        # (iterations, chains, ...) -> (chains, draws, ...), warmup dropped
        return jax.tree.map(lambda x: np.swapaxes(x[self.warmup:], 0, 1), out)


def _driver(pot, warmup, chains, nuts_kwargs) -> _Driver:
    """The driver cached on the potential (a fresh one when the options are not hashable)."""
    try:
        key = (warmup, chains, tuple(sorted(nuts_kwargs.items())))
        hash(key)
    except TypeError:  # e.g. an array-valued inverse_mass_matrix
        return _Driver(pot, warmup, chains, nuts_kwargs)
    cache = pot.__dict__.setdefault("_driver_cache", {})
    if key not in cache:
        cache[key] = _Driver(pot, warmup, chains, nuts_kwargs)
    return cache[key]


def _numpyro_mcmc(pot, key, init, warmup, draws, chains, chain_method, progress_bar, nuts_kwargs):
    """NumPyro's own MCMC driver, for chain_method "sequential" / "parallel"."""
    if chains == 1:
        init = {k: v[0] for k, v in init.items()}
    mcmc = MCMC(NUTS(potential_fn=pot.potential_fn, **nuts_kwargs), num_warmup=warmup, num_samples=draws,
                num_chains=chains, chain_method=chain_method, progress_bar=progress_bar)
    mcmc.run(key, init_params=init, extra_fields=_EXTRA)
    ex = mcmc.get_extra_fields(group_by_chain=True)
    raw = jax.tree.map(np.asarray, mcmc.get_samples(group_by_chain=True))
    return raw, *(np.asarray(ex[k]) for k in _EXTRA)


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
    nuts_kwargs.setdefault("target_accept_prob", 0.8)
    t0 = time.perf_counter()
    with blas_threads(pot.plan.dense_size):
        with _compile_timer() as comp:
            if chain_method == "vectorized":
                raw, div, n_steps, step_size, accept, pe = _driver(pot, warmup, chains, nuts_kwargs).run(
                    k_mcmc, init, draws, progress_bar)
            else:
                raw, div, n_steps, step_size, accept, pe = _numpyro_mcmc(
                    pot, k_mcmc, init, warmup, draws, chains, chain_method, progress_bar, nuts_kwargs)
        t2 = time.perf_counter()
        samples = pot.constrain(raw)
        t3 = time.perf_counter()
        if recover:
            samples.update(pot.recover(samples, k_rec))
        t4 = time.perf_counter()

    n_steps = np.asarray(n_steps)
    max_depth = nuts_kwargs.get("max_tree_depth", 10)
    max_depth = max_depth[0] if isinstance(max_depth, tuple) else max_depth
    depth = np.ceil(np.log2(n_steps + 1)).astype(int)
    stats = {
        "diverging": np.asarray(div),
        "n_steps": n_steps,
        "tree_depth": depth,
        "step_size": np.asarray(step_size),
        "acceptance_rate": np.asarray(accept),
        "lp": -np.asarray(pe),
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
