"""Cost of one value-and-gradient of the posterior potential: lmmarg (every term integrated out) vs the NumPyro model a
user writes by hand (every random effect sampled, non-centered, same priors), side by side in one run.

dillonE1, `rt ~ int + (int | subj) + (int | item)`, lognormal, the paper's priors (benchmarks/experiments.py).
lmmarg's rows are compiled as lmmarg compiles its programs (lmmarg.xla.jit: XLA options for many small fusions,
chosen for the data); the NumPyro row with XLA's defaults, as a NumPyro user gets it (one more row, for information,
with lmmarg's options).
Reports compile time (first call of the jitted value_and_grad, block_until_ready), the median time per call from
Python, and the median time per evaluation inside one compiled loop (what NUTS pays per leapfrog step: its chunks
are compiled loops, so Python's dispatch and argument flattening are not paid per step; lmmarg's data enter as an
argument of the loop, as in its sampler).
Each row runs in a fresh process after one warm-up compilation (``measure``); the rows alternate for --rounds
rounds and each number is the median over the rounds (the 2-core machine's speed drifts by 10-30 % between runs).
Writes benchmarks/results/engine_cost.{csv,md}.

    OPENBLAS_NUM_THREADS=1 taskset -c 0 python benchmarks/engine_cost.py [--repeats 2000] [--rounds 3]
"""
from __future__ import annotations

import argparse
import functools
import json
import pathlib
import platform
import subprocess
import sys

import jax
import numpy as np
import pandas as pd

jax.config.update("jax_enable_x64", True)
HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from experiments import EXPERIMENTS, build_model  # noqa: E402
from harness import time_potential, time_potential_loop  # noqa: E402
from peers_numpyro import lmm_numpyro, numpyro_target  # noqa: E402

from lmmarg import xla  # noqa: E402

RESULTS = HERE / "results"


ROWS = ("lmmarg all marginalized",
        "lmmarg all marginalized, beta integrated out (sample()'s default here)",
        "NumPyro by hand, non-centered",
        "NumPyro by hand, non-centered, lmmarg's XLA options")


def warm_up() -> None:
    """The first compilation in a process also initializes XLA:CPU's compiler (~0.4 s on the 2-core machine): pay it
    on a tiny program, with both option sets, before the timed row."""
    for jit in (jax.jit, xla.jit):
        jax.block_until_ready(jit(lambda x: jax.numpy.linalg.cholesky(x) @ x)(jax.numpy.eye(3)))


def measure(experiment: str, row: int, repeats: int) -> dict:
    """One row, in a process of its own: a row measured after another would find JAX's tracing and lowering caches
    (NumPyro's distributions, jax.numpy's jitted helpers) warm, and its compile time would depend on the order."""
    exp = EXPERIMENTS[experiment]
    model = build_model(exp)
    warm_up()
    if row < 2:
        pot = model.potential("all", marginalize_beta=row == 1)
        params = pot.init_params(jax.random.PRNGKey(0), num_chains=None)
        jit = functools.partial(xla.jit, data=pot.data)      # as lmmarg's sampler compiles (options for its data)
        compile_s, call_s = time_potential(pot.potential_fn, params, repeats, jit=jit)
        loop_s = time_potential_loop(pot.density, params, pot.data, jit=jit)
    else:
        # the NumPyro row compiles with XLA's defaults (what a NumPyro user gets); the last row, for information,
        # with the options lmmarg compiles its own programs with (lmmarg.xla)
        jit = jax.jit if row == 2 else functools.partial(xla.jit, data=np.asarray(model.y))
        tgt = numpyro_target(experiment, "numpyro-nc", lmm_numpyro(model, dict(exp.priors), centered=False))
        params = tgt.init(jax.random.PRNGKey(0))
        compile_s, call_s = time_potential(tgt.potential_fn, params, repeats, jit=jit)
        loop_s = time_potential_loop(tgt.potential_fn, params, jit=jit)
    return {"method": ROWS[row], "n_params": int(sum(np.size(v) for v in params.values())),
            "compile_s": compile_s, "ms_per_value_and_grad": call_s * 1e3, "ms_in_loop": loop_s * 1e3}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiment", default="dillonE1")
    ap.add_argument("--repeats", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--row", type=int, default=None, help="measure one row and print it as JSON (internal)")
    a = ap.parse_args(argv)
    if a.row is not None:
        print(json.dumps(measure(a.experiment, a.row, a.repeats)))
        return 0
    exp = EXPERIMENTS[a.experiment]
    model = build_model(exp)
    runs = []
    for _ in range(a.rounds):
        for row in range(len(ROWS)):
            out = subprocess.run([sys.executable, __file__, "--experiment", a.experiment, "--repeats",
                                  str(a.repeats), "--row", str(row)], check=True, capture_output=True, text=True).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
    tab = pd.DataFrame(runs).groupby(["method", "n_params"], sort=False).median().reset_index()
    ratio = tab.iloc[0, 2:] / tab.iloc[2, 2:].values
    print(model.potential("all").plan.describe())
    print(tab.to_string(index=False))
    print(f"ratios lmmarg / NumPyro: compile {ratio['compile_s']:.2f}, per call {ratio['ms_per_value_and_grad']:.2f}, "
          f"in a compiled loop {ratio['ms_in_loop']:.2f}")
    RESULTS.mkdir(exist_ok=True)
    tab.to_csv(RESULTS / "engine_cost.csv", index=False)
    md = [f"# Engine cost: {a.experiment}, `{exp.formula}` ({exp.family})", "",
          "| method | parameters | compile (s) | ms per value-and-gradient, called from Python | ms per "
          "value-and-gradient in a compiled loop (NUTS) |", "|---|---|---|---|---|"]
    md += [f"| {r.method} | {r.n_params} | {r.compile_s:.2f} | {r.ms_per_value_and_grad:.3f} | {r.ms_in_loop:.3f} |"
           for r in tab.itertuples()]
    md += ["", f"Ratios lmmarg / NumPyro: compile {ratio['compile_s']:.2f}×, per call from Python "
               f"{ratio['ms_per_value_and_grad']:.2f}×, in a compiled loop {ratio['ms_in_loop']:.2f}× "
               "(targets ≤ 1.0×).", "",
           "Plan: " + "; ".join(ln.strip() for ln in model.potential("all").plan.describe().splitlines()), "",
           f"Machine: {platform.processor() or platform.machine()}, jax {jax.__version__}, one BLAS thread, "
           f"float64, {a.repeats} timed calls each (median); each row in its own process, median of {a.rounds} "
           "alternating rounds."]
    (RESULTS / "engine_cost.md").write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
