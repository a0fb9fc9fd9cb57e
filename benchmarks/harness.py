"""Shared benchmark harness: one NUTS implementation (NumPyro's) driven identically for every method.

A `Target` is what gets sampled: an unconstrained potential, an initializer, a map to the canonical constrained
keys ("beta" (…, p), "sigma", "sd_<term>" (…, d), "corr_<term>" (…, d, d), extra globals, "u_<term>" (…, G, d))
and optionally a recovery step for marginalized random effects. `run_nuts` jit-compiles one chunk of NUTS
transitions ahead of time (timed as compile), then runs warmup and sampling as repeated calls of that executable,
so compile, warmup and sampling times are separated exactly. `metrics` turns draws into the benchmark row.
"""
from __future__ import annotations

import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import jax
import numpy as np
import pandas as pd

import lmmarg
from lmmarg import datasets

jax.config.update("jax_enable_x64", True)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)   # the repository root: fresh worker processes run `python -m benchmarks.<name>` here
DATA = os.path.join(HERE, "data")
RESULTS = os.path.join(HERE, "results")


def read_data(file: str) -> pd.DataFrame:
    """A benchmark data set by file name ("dillonE1.csv"): lmmarg's bundled copy when lmmarg ships one of that name
    (``lmmarg.datasets.load``; grouping factors as strings), else ``benchmarks/data/<file>``, so the repository holds
    one copy of each file."""
    stem = os.path.splitext(file)[0]
    if stem in datasets.available():
        return datasets.load(stem)
    return pd.read_csv(os.path.join(DATA, file))


def module_command(module: str, *args: str) -> list[str]:
    """The command line that runs a benchmark module in a fresh process: ``python -m <module> args...``; run it with
    ``cwd=ROOT`` so that the package ``benchmarks`` is importable. module: ``__spec__.name`` of the caller
    ("benchmarks.sampler"), the same whether that module was imported or run with ``python -m``."""
    return [sys.executable, "-m", module, *args]


@dataclass
class Target:
    """Something NUTS samples.

    potential_fn: unconstrained dict → scalar −log density. init(key) → unconstrained dict (one chain).
    constrain(z) → canonical constrained dict; z has leading dims (chains, draws).
    recover(z, key) → {"u_<term>": (chains, draws, G, d)} for marginalized terms, or None.
    """

    experiment: str
    method: str
    potential_fn: Callable
    init: Callable
    constrain: Callable
    recover: Optional[Callable] = None
    note: str = ""
    extra: dict = field(default_factory=dict)


def _nuts_kernels(potential_fn):
    from numpyro.infer.hmc import hmc
    return hmc(potential_fn=potential_fn, algo="NUTS")


class TimeBudgetExceeded(RuntimeError):
    """A run went past its time budget (``max_minutes``); carries what was measured until then."""

    def __init__(self, minutes, iterations, steps, seconds, phase):
        self.partial = dict(iterations_done=iterations, leapfrog_steps=steps, run_s=seconds, phase=phase)
        lf = steps / max(iterations, 1)
        ms = 1e3 * seconds / max(steps, 1)
        super().__init__(f"time budget of {minutes:g} min exceeded in {phase} after {iterations} iterations "
                         f"({lf:.0f} leapfrog steps/iteration, {ms:.3g} ms/gradient)")


def run_nuts(target: Target, *, warmup=1000, draws=2000, chains=1, seed=0, target_accept=0.8,
             max_tree_depth=10, chunk=None, dense_mass=False, max_minutes=None) -> dict:
    """Run `chains` sequential NUTS chains (one compiled executable reused). Returns timings, draws, stats.

    max_minutes: stop (TimeBudgetExceeded) once warmup + sampling of all chains has run this long; checked
    after every chunk of iterations (compile time not counted)."""
    init_kernel, sample_kernel = _nuts_kernels(target.potential_fn)
    chunk = chunk or _chunk(warmup, draws)

    def init(params, key):
        return init_kernel(params, num_warmup=warmup, target_accept_prob=target_accept,
                           max_tree_depth=max_tree_depth, dense_mass=dense_mass, rng_key=key)

    def step(state):
        def body(s, _):
            s = sample_kernel(s)
            return s, (s.z, s.diverging, s.num_steps, s.accept_prob, s.potential_energy)
        return jax.lax.scan(body, state, None, length=chunk)

    key = jax.random.PRNGKey(seed)
    t0 = time.perf_counter()
    k0, key = jax.random.split(key)
    params0 = target.init(k0)
    init_c = jax.jit(init).lower(params0, k0).compile()
    state0 = init_c(params0, k0)
    step_c = jax.jit(step).lower(state0).compile()
    compile_s = time.perf_counter() - t0

    zs, div, nsteps, acc, pe = [], [], [], [], []
    warm_s = samp_s = 0.0
    warm_div = 0
    budget = {"t0": time.perf_counter(), "iters": 0, "steps": 0}

    def check(out, phase):
        budget["iters"] += chunk
        budget["steps"] += int(np.asarray(out[2]).sum())
        spent = time.perf_counter() - budget["t0"]
        if max_minutes is not None and spent > 60 * max_minutes:
            raise TimeBudgetExceeded(max_minutes, budget["iters"], budget["steps"], spent, phase)

    for c in range(chains):
        kc, key = jax.random.split(key)
        ki, kr = jax.random.split(kc)
        state = init_c(target.init(ki) if c else params0, kr)
        jax.block_until_ready(state)
        t = time.perf_counter()
        for _ in range(warmup // chunk):
            state, out = step_c(state)
            warm_div += int(np.asarray(out[1]).sum())
            check(out, "warmup")
        jax.block_until_ready(state)
        warm_s += time.perf_counter() - t
        t = time.perf_counter()
        outs = []
        for _ in range(max(draws // chunk, 1)):
            state, out = step_c(state)
            outs.append(out)
            check(out, "sampling")
        jax.block_until_ready(state)
        samp_s += time.perf_counter() - t
        outs = jax.tree_util.tree_map(lambda *a: np.concatenate([np.asarray(x) for x in a]), *outs)
        for store, part in zip((zs, div, nsteps, acc, pe), outs[:5]):
            store.append(part)
    z = jax.tree_util.tree_map(lambda *a: np.stack(a), *zs)
    return dict(z=z, compile_s=compile_s, warmup_s=warm_s, sample_s=samp_s, diverging=np.stack(div),
                warmup_divergences=warm_div, num_steps=np.stack(nsteps), accept_prob=np.stack(acc),
                potential_energy=np.stack(pe), step_size=float(state.adapt_state.step_size), chunk=chunk,
                draws=int(np.stack(div).shape[1]), chains=chains)


def _chunk(warmup, draws):
    g = math.gcd(warmup, draws) if warmup else draws
    g = g or 1
    while g > 250 and g % 2 == 0:
        g //= 2
    return g


# ---------------------------------------------------------------------------------------------- diagnostics
def ess(x: np.ndarray, method="bulk") -> np.ndarray:
    """Rank-normalized ESS (ArviZ) of x (chains, draws, …) → (…); NaN for constant entries."""
    import arviz as az
    shp = x.shape[2:]
    flat = np.asarray(x, float).reshape(x.shape[0], x.shape[1], -1)
    if flat.shape[1] < 4:
        return np.full(shp, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = az.ess(az.convert_to_dataset({"x": flat}), method=method)["x"].values
        const = np.ptp(flat, axis=(0, 1)) == 0
        out = np.where(const, np.nan, out)
    return out.reshape(shp)


def rhat(x: np.ndarray) -> np.ndarray:
    import arviz as az
    flat = np.asarray(x, float).reshape(x.shape[0], x.shape[1], -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return az.rhat(az.convert_to_dataset({"x": flat}))["x"].values


def global_params(samples: dict) -> dict:
    """Flatten the canonical constrained dict to scalar globals: b[i], sigma, sd_t[j], corr_t[i,j] (i>j), …."""
    out = {}
    for k, v in samples.items():
        if k.startswith("u_") or k.startswith("_"):
            continue
        v = np.asarray(v, float)
        if k.startswith("corr_") and v.ndim >= 4:
            d = v.shape[-1]
            for i in range(d):
                for j in range(i):
                    out[f"{k}[{i},{j}]"] = v[..., i, j]
            continue
        if v.ndim == 2:
            out[k] = v
        else:
            flat = v.reshape(v.shape[0], v.shape[1], -1)
            for i in range(flat.shape[-1]):
                out[f"{k}[{i}]"] = flat[..., i]
    return {k: v for k, v in out.items() if np.ptp(v) > 0}


def metrics(target: Target, run: dict, seed=0, recover=True) -> tuple[dict, dict]:
    """Benchmark row (ESS, ESS/s, divergences, timings) and the constrained samples."""
    samples = dict(target.constrain(run["z"]))
    rec_s = 0.0
    if recover and target.recover is not None:
        t = time.perf_counter()
        rec = target.recover(run["z"], jax.random.PRNGKey(seed + 1000))
        rec = jax.tree_util.tree_map(np.asarray, rec)
        rec_s = time.perf_counter() - t
        samples.update(rec)
    samples = {k: np.asarray(v) for k, v in samples.items()}
    glob = global_params(samples)
    names = sorted(glob)
    bulk = np.array([float(ess(glob[k], "bulk")) for k in names]) if names else np.array([np.nan])
    tail = np.array([float(ess(glob[k], "tail")) for k in names]) if names else np.array([np.nan])
    n_iter = run["draws"] * run["chains"]
    samp = run["sample_s"]
    total = run["compile_s"] + run["warmup_s"] + run["sample_s"] + rec_s
    u_ess = [ess(v, "bulk").ravel() for k, v in samples.items() if k.startswith("u_")]
    u_ess = np.concatenate(u_ess) if u_ess else np.array([np.nan])
    row = dict(
        experiment=target.experiment, method=target.method, seed=seed, chains=run["chains"], draws=run["draws"],
        compile_s=run["compile_s"], warmup_s=run["warmup_s"], sample_s=samp, recover_s=rec_s, total_s=total,
        iter_per_s=n_iter / samp, leapfrog_per_draw=float(run["num_steps"].mean()),
        ms_per_gradient=1e3 * samp / max(float(run["num_steps"].sum()), 1.0),
        step_size=run["step_size"], divergences=int(run["diverging"].sum()),
        warmup_divergences=run["warmup_divergences"],
        n_global=len(names), min_ess_bulk=np.nanmin(bulk), mean_ess_bulk=np.nanmean(bulk),
        min_ess_tail=np.nanmin(tail), mean_ess_tail=np.nanmean(tail),
        worst_param=names[int(np.nanargmin(bulk))] if names else "",
        min_ess_per_s=np.nanmin(bulk) / samp, mean_ess_per_s=np.nanmean(bulk) / samp,
        min_ess_per_s_total=np.nanmin(bulk) / total,
        min_ess_per_iter=np.nanmin(bulk) / n_iter, mean_ess_per_iter=np.nanmean(bulk) / n_iter,
        u_min_ess=np.nanmin(u_ess) if np.isfinite(u_ess).any() else np.nan,
        u_median_ess=np.nanmedian(u_ess) if np.isfinite(u_ess).any() else np.nan,
        u_median_ess_per_s=(np.nanmedian(u_ess) / (samp + rec_s)) if np.isfinite(u_ess).any() else np.nan,
        max_rhat=float(np.nanmax([np.nanmax(rhat(glob[k])) for k in names])) if run["chains"] > 1 and names
        else np.nan,
        note=target.note,
    )
    return row, samples


def benchmark(target: Target, *, seed=0, **kw) -> tuple[dict, dict]:
    """run_nuts + metrics, with failures turned into a row carrying the error message."""
    try:
        run = run_nuts(target, seed=seed, **kw)
        row, samples = metrics(target, run, seed=seed)
        samples["_diverging"] = run["diverging"]
        return row, samples
    except TimeBudgetExceeded as e:
        return dict(experiment=target.experiment, method=target.method, seed=seed, error=f"timeout: {e}"[:300],
                    **e.partial), {}
    except Exception as e:  # noqa: BLE001 — a benchmark row must record failures, not abort the suite
        return dict(experiment=target.experiment, method=target.method, seed=seed,
                    error=f"{type(e).__name__}: {e}"[:300]), {}


def time_potential(potential_fn, params, repeats: int, jit=jax.jit) -> tuple[float, float]:
    """(compile + first call seconds, median seconds per value-and-gradient) of a jitted potential at params.
    jit: jax.jit, or lmmarg.compile.xla.jit (the XLA options lmmarg compiles its own programs with)."""
    f = jit(jax.value_and_grad(potential_fn))
    t0 = time.perf_counter()
    jax.block_until_ready(f(params))
    first = time.perf_counter() - t0
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(params))
        ts.append(time.perf_counter() - t0)
    return first, float(np.median(ts))


def evaluation_loop(potential_fn, iters: int, with_data: bool = False):
    """loop(params, data) -> scalar: `iters` value-and-gradients of potential_fn in one lax.fori_loop (not jitted).
    potential_fn(params), or potential_fn(params, data) with with_data; each evaluation's parameters are shifted
    by 1e-12 * i and every gradient entry feeds the loop's result, so XLA can neither hoist the parameters' work out
    of the loop nor drop any of it (work on the data alone is hoisted, as in the sampler's compiled chunks)."""
    vg = jax.value_and_grad(potential_fn)

    def loop(x, d):
        def body(i, acc):
            xi = jax.tree.map(lambda a: a + 1e-12 * i, x)
            v, g = vg(xi, d) if with_data else vg(xi)
            return acc + v + sum(jax.numpy.sum(leaf) for leaf in jax.tree.leaves(g))
        return jax.lax.fori_loop(0, iters, body, 0.0)
    return loop


def to_markdown(df, cols, floatfmt=".3g") -> str:
    """A plain markdown table (no tabulate dependency)."""
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        cells = []
        for c in cols:
            v = r.get(c, "")
            if isinstance(v, (float, np.floating)):
                cells.append("" if not np.isfinite(v) else format(v, floatfmt))
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None, description="", default_seeds=5):
    import argparse
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--quick", action="store_true", help="tiny warmup/draws, 1 seed, subsampled data (smoke)")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--draws", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--chains", type=int, default=1)
    ap.add_argument("--experiments", default="all", help="comma-separated experiment names")
    ap.add_argument("--methods", default="*",
                    help='comma-separated method names (see --list); "*" = every method; "all" = the method "all"')
    ap.add_argument("--tag", default="", help="suffix for result file names")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="per run (warmup + sampling, compile excluded): stop and record a timeout row after this")
    ap.add_argument("--chunk", type=int, default=None, help="iterations per compiled call (divides warmup, draws)")
    a = ap.parse_args(argv)
    if a.quick:
        a.seeds = a.seeds or 1
        a.draws = a.draws or 20
        a.warmup = a.warmup or 20
    a.seeds = a.seeds or default_seeds
    a.draws = a.draws or 2000
    a.warmup = a.warmup if a.warmup is not None else 1000
    return a


def versions() -> dict:
    import platform
    import numpyro
    out = dict(python=platform.python_version(), jax=jax.__version__, numpyro=numpyro.__version__,
               numpy=np.__version__, cpu=platform.processor() or platform.machine(), cores=os.cpu_count(),
               backend=jax.default_backend())
    out["lmmarg"] = lmmarg.__version__
    return out
