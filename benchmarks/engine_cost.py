"""Cost of one value-and-gradient of the posterior potential: lmmarg (every term integrated out) vs the NumPyro model a
user writes by hand (every random effect sampled, non-centered, same priors), side by side in one run.

dillonE1, `rt ~ int + (int | subj) + (int | item)`, lognormal, the paper's priors (benchmarks/experiments.py).
lmmarg's rows are compiled as lmmarg compiles its programs (lmmarg.compile.xla.jit: XLA options for many small kernels,
chosen for the data); the NumPyro row with XLA's defaults, as a NumPyro user gets it (one more row, for information,
with lmmarg's options).

Three numbers per row:
- compile: the first call of the jitted value_and_grad (tracing, lowering, XLA, one evaluation), each row in a fresh
  process after one warm-up compilation (``measure_compile``: a row compiled after another would find JAX's tracing
  caches warm, and its time would depend on the order);
- ms per call from Python (``jax.block_until_ready(f(params))``), and
- ms per evaluation inside one compiled loop (what NUTS pays per leapfrog step: its chunks are compiled loops, so
  Python's dispatch is not paid per step; lmmarg's data enter as an argument of the loop, as in its sampler).

The 2-core machine's speed drifts by 10-30 % over seconds to minutes, more than the differences measured. So the two
run-time numbers are measured for all rows in one process (``measure_run_time``), in interleaved blocks (each block:
CALLS_PER_BLOCK calls from Python, then one loop of LOOP_ITERS evaluations, row after row), and the ratios are
paired: lmmarg's block over NumPyro's neighbouring block, median over all blocks of all rounds (with the quartiles).
Compile times are the medians over --rounds alternating rounds of fresh processes.
Writes benchmarks/results/engine_cost.{csv,md}.

    OPENBLAS_NUM_THREADS=1 taskset -c 0 python -m benchmarks.engine_cost [--rounds 5] [--blocks 40]

``--same-process`` (the test suite's smoke run) measures every row in the calling process instead, each row built and
compiled once: the same table and files, but its compile times find warm caches and mean nothing.
"""
from __future__ import annotations

import argparse
import functools
import json
import pathlib
import platform
import subprocess
import time

import jax
import numpy as np
import pandas as pd

from lmmarg.compile import xla

from .experiments import EXPERIMENTS, build_model
from .harness import ROOT, evaluation_loop, module_command
from .peers_numpyro import lmm_numpyro, numpyro_target

jax.config.update("jax_enable_x64", True)
HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results"

ROWS = ("lmmarg all marginalized",
        "lmmarg all marginalized, beta integrated out (sample()'s default here)",
        "NumPyro by hand, non-centered",
        "NumPyro by hand, non-centered, lmmarg's XLA options")
LMMARG_ROW, NUMPYRO_ROW = 0, 2     # the rows the ratios compare
CALLS_PER_BLOCK = 100              # calls from Python per timed block
LOOP_ITERS = 100                   # evaluations per compiled loop (one loop per block)


def warm_up() -> None:
    """The first compilation in a process also initializes XLA:CPU's compiler (~0.4 s on the 2-core machine): pay it
    on a tiny program, with both option sets, before anything timed."""
    for jit in (jax.jit, xla.jit):
        jax.block_until_ready(jit(lambda x: jax.numpy.linalg.cholesky(x) @ x)(jax.numpy.eye(3)))


def build_row(experiment: str, row: int):
    """(value_and_grad, loop, params, data) of one row, jitted but not compiled: value_and_grad(params) is what a
    caller from Python runs, loop(params, data) LOOP_ITERS evaluations in one compiled loop."""
    exp = EXPERIMENTS[experiment]
    model = build_model(exp)
    if row < 2:
        pot = model.potential("all", marginalize_beta=row == 1)
        params = pot.init_params(jax.random.PRNGKey(0), num_chains=None)
        jit = functools.partial(xla.jit, data=pot.data)      # as lmmarg's sampler compiles (options for its data)
        return (jit(jax.value_and_grad(pot.potential_fn)), jit(evaluation_loop(pot.density, LOOP_ITERS, True)),
                params, pot.data)
    # the NumPyro row compiles with XLA's defaults (what a NumPyro user gets); the last row, for information, with
    # the options lmmarg compiles its own programs with (lmmarg.compile.xla)
    jit = jax.jit if row == 2 else functools.partial(xla.jit, data=np.asarray(model.y))
    tgt = numpyro_target(experiment, "numpyro-nc", lmm_numpyro(model, dict(exp.priors), centered=False))
    params = tgt.init(jax.random.PRNGKey(0))
    return jit(jax.value_and_grad(tgt.potential_fn)), jit(evaluation_loop(tgt.potential_fn, LOOP_ITERS)), params, None


def measure_compile(experiment: str, row: int, built: dict | None = None) -> dict:
    """Compile time of one row's value_and_grad (first call), in a process of its own (see the module docstring).
    built: a dict {row: build_row(...)} that keeps the row (``--same-process``: measure_run_time reuses it)."""
    warm_up()
    built = {} if built is None else built
    if row not in built:
        built[row] = build_row(experiment, row)
    vg, _, params, _ = built[row]
    t0 = time.perf_counter()
    jax.block_until_ready(vg(params))
    return {"row": row, "compile_s": time.perf_counter() - t0,
            "n_params": int(sum(np.size(v) for v in params.values()))}


def measure_run_time(experiment: str, blocks: int, built: dict | None = None) -> dict:
    """All rows in this process, compiled first, then `blocks` rounds of interleaved blocks; per row and block: ms
    per call from Python (mean of CALLS_PER_BLOCK calls) and ms per evaluation in one compiled loop. built: rows
    already built by measure_compile (``--same-process``)."""
    warm_up()
    built = {} if built is None else built
    rows = [built[row] if row in built else build_row(experiment, row) for row in range(len(ROWS))]
    for vg, loop, params, data in rows:
        jax.block_until_ready(vg(params))
        jax.block_until_ready(loop(params, data))
    call_ms = [[] for _ in rows]
    loop_ms = [[] for _ in rows]
    for _ in range(blocks):
        for k, (vg, loop, params, data) in enumerate(rows):
            t0 = time.perf_counter()
            for _ in range(CALLS_PER_BLOCK):
                jax.block_until_ready(vg(params))
            call_ms[k].append((time.perf_counter() - t0) / CALLS_PER_BLOCK * 1e3)
            t0 = time.perf_counter()
            jax.block_until_ready(loop(params, data))
            loop_ms[k].append((time.perf_counter() - t0) / LOOP_ITERS * 1e3)
    return {"call_ms": call_ms, "loop_ms": loop_ms}


def _in_fresh_process(args: list[str]) -> dict:
    out = subprocess.run(module_command(__spec__.name, *args), check=True, capture_output=True, text=True,
                         cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiment", default="dillonE1")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--blocks", type=int, default=40, help="interleaved blocks per round for the run-time numbers")
    ap.add_argument("--compile-row", type=int, default=None, help=argparse.SUPPRESS)   # internal: one process
    ap.add_argument("--run-time", action="store_true", help=argparse.SUPPRESS)         # internal: one process
    ap.add_argument("--same-process", action="store_true",
                    help="every row in this process, built once (a smoke test: compile times are not measured)")
    a = ap.parse_args(argv)
    if a.compile_row is not None:
        print(json.dumps(measure_compile(a.experiment, a.compile_row)))
        return 0
    if a.run_time:
        print(json.dumps(measure_run_time(a.experiment, a.blocks)))
        return 0
    exp = EXPERIMENTS[a.experiment]
    compiles, call_ms, loop_ms = [], [[] for _ in ROWS], [[] for _ in ROWS]
    built: dict = {}
    for _ in range(a.rounds):
        for row in range(len(ROWS)):
            compiles.append(measure_compile(a.experiment, row, built) if a.same_process else
                            _in_fresh_process(["--experiment", a.experiment, "--compile-row", str(row)]))
        rt = (measure_run_time(a.experiment, a.blocks, built) if a.same_process else
              _in_fresh_process(["--experiment", a.experiment, "--run-time", "--blocks", str(a.blocks)]))
        for k in range(len(ROWS)):
            call_ms[k] += rt["call_ms"][k]
            loop_ms[k] += rt["loop_ms"][k]
    comp = pd.DataFrame(compiles).groupby("row").median()
    tab = pd.DataFrame({"method": ROWS, "n_params": comp["n_params"].astype(int).values,
                        "compile_s": comp["compile_s"].values,
                        "ms_per_value_and_grad": [np.median(c) for c in call_ms],
                        "ms_in_loop": [np.median(t) for t in loop_ms]})

    def paired(ms):   # lmmarg's block over NumPyro's block of the same round and block: drift cancels
        r = np.asarray(ms[LMMARG_ROW]) / np.asarray(ms[NUMPYRO_ROW])
        return np.median(r), *np.quantile(r, [0.25, 0.75])
    ratio_compile = tab.compile_s[LMMARG_ROW] / tab.compile_s[NUMPYRO_ROW]
    by_round = pd.DataFrame(compiles).assign(round=lambda d: np.arange(len(d)) // len(ROWS))
    per_round = by_round.pivot(index="round", columns="row", values="compile_s")
    cq = np.quantile(per_round[LMMARG_ROW] / per_round[NUMPYRO_ROW], [0.25, 0.75])
    rc, rl = paired(call_ms), paired(loop_ms)
    summary = (f"Ratios lmmarg / NumPyro: compile {ratio_compile:.2f}× (medians of {a.rounds} fresh processes each; "
               f"per-round ratios' quartiles {cq[0]:.2f}–{cq[1]:.2f}), "
               f"per call from Python {rc[0]:.2f}× (quartiles {rc[1]:.2f}–{rc[2]:.2f}), in a compiled loop "
               f"{rl[0]:.2f}× (quartiles {rl[1]:.2f}–{rl[2]:.2f}); paired over {a.rounds} × {a.blocks} blocks "
               "(targets ≤ 1.0×).")
    plan = build_model(exp).potential("all").plan.describe()
    print(plan)
    print(tab.to_string(index=False))
    print(summary)
    RESULTS.mkdir(exist_ok=True)
    tab.to_csv(RESULTS / "engine_cost.csv", index=False)
    md = [f"# Engine cost: {a.experiment}, `{exp.formula}` ({exp.family})", "",
          "| method | parameters | compile (s) | ms per value-and-gradient, called from Python | ms per "
          "value-and-gradient in a compiled loop (NUTS) |", "|---|---|---|---|---|"]
    md += [f"| {r.method} | {r.n_params} | {r.compile_s:.2f} | {r.ms_per_value_and_grad:.3f} | {r.ms_in_loop:.3f} |"
           for r in tab.itertuples()]
    md += ["", summary, "",
           "Plan: " + "; ".join(ln.strip() for ln in plan.splitlines()), "",
           f"Machine: {platform.processor() or platform.machine()}, jax {jax.__version__}, one BLAS thread, "
           f"float64. Compile: median over {a.rounds} alternating rounds, each row in a fresh process. Run time: "
           f"all rows in one process per round, {a.blocks} interleaved blocks of {CALLS_PER_BLOCK} calls and one "
           f"{LOOP_ITERS}-evaluation loop per row; the table's times are medians over all blocks."]
    (RESULTS / "engine_cost.md").write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
