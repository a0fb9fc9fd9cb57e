"""Sampler benchmarks (issue "Sampler v2"): time to a trustworthy posterior with lmmarg's default ``sample()``.

Every measurement runs in a fresh process, as a user's script would (``--worker``), so compilation and the
persistent compilation cache count as they do for users: "cold" runs get an empty cache directory, "warm" runs
reuse the one a previous identical run filled.

Parts (``--parts``, default all):
  geometry   init="center" (a jittered data-scaled start, unit scales: the sampler before) vs init="mode" (start at
             the posterior mode, whitened by its curvature: the default) on dillonE1, eeg, InstEval and the crossed
             N = 5e5 model: leapfrog steps per draw, min bulk ESS, ESS per iteration, divergences, time.
  beta       the fixed effects sampled (default) vs integrated out and drawn exactly afterwards
             (marginalize_beta=True), normal priors on them in both: dillonE1 (uncorrelated and correlated), eeg,
             InstEval (dept marginalized), the crossed N = 5e5 model.
  dillon     dillonE1 `log(rt) ~ intc + (intc || subj) + (intc || item)` (intc = ±1), 1 chain, 1000 + 2000, wall
             incl. compilation, lmmarg cold and warm vs Bambi-NumPyro (benchmarks/peers_bambi.py), same model and
             priors (the paper's, benchmarks/experiments.py).
  demo       `python -m lmmarg` cold / warm vs the floor: a bare process that imports lmmarg and runs NumPyro NUTS
             (4 vectorized chains, 1000 + 1000) on a 6-dimensional Gaussian.
  crossed    `y ~ x + (1 | a) + (1 | b)`, a 10,000 levels, b 100, N = 5e5: sample(chains=2, warmup=300, draws=300)
             incl. compilation and recovery vs one fit_ml().
  eeg        eeg, default sample() (4 chains x 1000 + 1000), wall incl. compilation: on one device, and with
             lmmarg.use_cores(all cores) (the chains spread over the cores).
  cores      chain_method="vectorized" (4 chains in one program on one device: one after the other on a CPU) vs
             "parallel" (spread over the CPU cores as XLA host devices) in one process with as many host devices
             as cores: sleepstudy, dillonE1, eeg; the second call of each (compiled) is timed.

    OPENBLAS_NUM_THREADS=1 python -m benchmarks.sampler [--parts geometry,dillon,...] [--quick]

Writes results/sampler.md and results/sampler.csv (rows of every part; --quick writes to results/sampler_quick.*).
``--in-process`` (the test suite's smoke run) runs each case's worker in the calling process instead of a fresh one:
the same rows, but compilation then finds the calling process's caches (and the demo, cores and eeg parts, which time
or configure whole processes, still start them).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

import numpy as np
import pandas as pd

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)   # the repository root: worker processes run `python -m benchmarks.sampler` here
RESULTS = os.path.join(HERE, "results")

CROSSED = dict(n=500_000, a=10_000, b=100, seed=1)
DILLON_FORMULA = "rt ~ intc + (intc || subj) + (intc || item)"   # intc = ±1 for int = high / low


# -- workers (run in their own process) ---------------------------------------------------------------------------
def _crossed_data(n, a, b, seed):
    rng = np.random.default_rng(seed)
    ga, gb = rng.integers(0, a, n), rng.integers(0, b, n)
    x = rng.normal(size=n)
    y = 1.0 + 0.5 * x + 0.7 * rng.normal(size=a)[ga] + 0.5 * rng.normal(size=b)[gb] + rng.normal(size=n)
    return pd.DataFrame({"y": y, "x": x, "a": ga.astype(str), "b": gb.astype(str)})


def build_case(case: dict):
    """The lmmarg.Model of a case: data "crossed" (simulated, CROSSED), "sleepstudy" or a benchmark experiment."""
    import lmmarg
    if case["data"] == "crossed":
        priors = None
        if case.get("normal_beta"):   # normal priors on beta (what marginalize_beta integrates against)
            import numpyro.distributions as dist
            priors = {"Intercept": dist.Normal(0.0, 10.0), "b": dist.Normal(0.0, 10.0)}
        return lmmarg.Model("y ~ x + (1 | a) + (1 | b)", _crossed_data(**CROSSED), priors=priors)
    if case["data"] == "sleepstudy":
        return lmmarg.Model("Reaction ~ Days + (Days | Subject)", lmmarg.datasets.load("sleepstudy"))
    from .experiments import build_model
    return build_model(_experiment(case["data"], case.get("formula")))


def _experiment(name: str, formula=None):
    """The benchmark experiment (benchmarks/experiments.py), dillonE1 with the ±1 contrast column intc."""
    from .experiments import EXPERIMENTS
    exp = EXPERIMENTS[name]
    if name == "dillonE1":
        prep = exp.prep

        def with_intc(df):
            df = prep(df)
            return df.assign(intc=np.where(df["int"] == "high", 1.0, -1.0))
        exp = replace(exp, prep=with_intc)
    if formula and "|" in formula and "||" in formula and formula.count("||") == formula.count("|") // 2:
        exp = replace(exp, priors={k: v for k, v in exp.priors.items() if k != "cor"})   # no correlations left
    return replace(exp, formula=formula) if formula else exp


def _global_summary(fit) -> dict:
    s = fit.summary()
    g = s.loc[[i for i in s.index if i.startswith(("b_", "sd_", "cor_", "sigma"))]]
    d = fit.diagnostics
    it = d["chains"] * d["draws"]
    return dict(min_ess_bulk=float(g["ess_bulk"].min()), min_ess_tail=float(g["ess_tail"].min()),
                ess_per_iter=float(g["ess_bulk"].min()) / it, worst_param=str(g["ess_bulk"].idxmin()),
                max_rhat=float(g["r_hat"].max()) if "r_hat" in g else np.nan,
                leapfrog_per_draw=d["mean_n_steps"], divergences=d["divergences"],
                time_compile=d["time_compile"], time_init=d.get("time_init", 0.0), time_mcmc=d["time_mcmc"],
                time_recover=d["time_recover"], init=d.get("init", ""))


def worker(case: dict) -> dict:
    import warnings

    import jax
    if case.get("cores"):   # before JAX starts: that many XLA host devices, the default sample() uses them
        import lmmarg
        lmmarg.use_cores(case["cores"])
    jax.config.update("jax_enable_x64", True)
    warnings.simplefilter("ignore")
    t0 = time.perf_counter()
    model = build_case(case)
    t_model = time.perf_counter() - t0
    if case["kind"] == "fit_ml":
        t1 = time.perf_counter()
        fit = model.fit_ml()
        return dict(wall=time.perf_counter() - t1, t_model=t_model, converged=bool(fit.converged))
    marg = case.get("marginalize", "all")
    t1 = time.perf_counter()
    fit = model.sample(chains=case["chains"], warmup=case["warmup"], draws=case["draws"], seed=case.get("seed", 0),
                       marginalize=marg, init=case.get("init", "mode"), progress_bar=False,
                       marginalize_beta=case.get("marginalize_beta"))
    wall = time.perf_counter() - t1
    out = dict(wall=wall, t_model=t_model, **_global_summary(fit))
    out["min_ess_per_s"] = out["min_ess_bulk"] / wall
    return out


# --in-process: run_case calls worker() in this process (set by main() for the duration of its run)
_IN_PROCESS = {"on": False}


def run_case(case: dict, cache_dir: str) -> dict:
    """worker(case) in a fresh process (cache_dir: its LMMARG_JAX_CACHE) as case + its results, or case + "error".
    With ``--in-process`` (and no "cores" in the case) in this process instead."""
    if _IN_PROCESS["on"] and not case.get("cores"):
        import warnings
        try:
            with warnings.catch_warnings():     # worker() silences warnings: only for its own run here
                return dict(case, **json.loads(json.dumps(worker(case))))
        except Exception as e:  # noqa: BLE001 - an error row, as a failed fresh process gives
            return dict(case, error=f"{type(e).__name__}: {e}"[:400])
    env = dict(os.environ, LMMARG_JAX_CACHE=cache_dir, OPENBLAS_NUM_THREADS="1")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    p = subprocess.run([sys.executable, "-m", __spec__.name, "--worker", json.dumps(case)],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    out = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not out:
        return dict(case, error=p.stderr[-400:].replace("\n", " "))
    return dict(case, **json.loads(out[-1][7:]))


def _timed_process(cmd: list, cache_dir: str) -> float:
    env = dict(os.environ, LMMARG_JAX_CACHE=cache_dir, OPENBLAS_NUM_THREADS="1")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=env, cwd=ROOT)
    return time.perf_counter() - t0


_FLOOR = """
import lmmarg, jax, jax.numpy as jnp, numpy as np
from numpyro.infer import MCMC, NUTS
jax.config.update("jax_enable_x64", True)
A = jnp.asarray(np.diag(np.linspace(0.5, 2.0, 6)))
pe = lambda z: 0.5 * z @ A @ z
mcmc = MCMC(NUTS(potential_fn=pe), num_warmup=1000, num_samples=1000, num_chains=4, chain_method="vectorized",
            progress_bar=False)
mcmc.run(jax.random.PRNGKey(0), init_params=jnp.zeros((4, 6)))
print(np.asarray(mcmc.get_samples()).mean())
"""


# -- parts ----------------------------------------------------------------------------------------------------------
def part_geometry(quick: bool, cache: str) -> list:
    cases = [dict(data="dillonE1", formula=DILLON_FORMULA, chains=1, warmup=1000, draws=2000),
             dict(data="eeg", chains=1, warmup=500, draws=500),
             dict(data="InstEval", chains=1, warmup=300, draws=300, marginalize=["dept"]),
             dict(data="crossed", chains=2, warmup=300, draws=300)]
    if quick:
        cases = [dict(cases[0], warmup=100, draws=100)]
    rows = []
    for c in cases:
        for init in ("center", "mode"):
            rows.append(dict(part="geometry", **run_case(dict(c, kind="sample", init=init), cache)))
            print(rows[-1], flush=True)
    return rows


def part_beta(quick: bool, cache: str) -> list:
    """beta sampled (the default) vs integrated out (marginalize_beta=True), normal priors on beta in both."""
    cases = [dict(data="dillonE1", formula=DILLON_FORMULA, chains=1, warmup=1000, draws=2000),
             dict(data="dillonE1", chains=1, warmup=1000, draws=2000),
             dict(data="eeg", chains=1, warmup=500, draws=500),
             dict(data="InstEval", chains=1, warmup=300, draws=300, marginalize=["dept"]),
             dict(data="crossed", chains=2, warmup=300, draws=300, normal_beta=True)]
    if quick:
        cases = [dict(cases[0], warmup=100, draws=100)]
    rows = []
    for c in cases:
        for seed, mb in [(s, mb) for s in ((0,) if quick or c["data"] == "InstEval" else (0, 1))
                         for mb in (False, True)]:
            r = run_case(dict(c, kind="sample", marginalize_beta=mb, seed=seed), cache)
            rows.append(dict(part="beta", **{"formula": "", **r}))
            print(rows[-1], flush=True)
    return rows


def part_dillon(quick: bool, cache: str) -> list:
    n = (100, 100) if quick else (1000, 2000)
    case = dict(kind="sample", data="dillonE1", formula=DILLON_FORMULA, chains=1, warmup=n[0], draws=n[1])
    rows = []
    with tempfile.TemporaryDirectory() as fresh:
        rows.append(dict(part="dillon", label="lmmarg cold", **run_case(case, fresh)))
        rows.append(dict(part="dillon", label="lmmarg warm", **run_case(case, fresh)))
    from .peers_bambi import run_bambi
    exp = _experiment("dillonE1", DILLON_FORMULA)
    b = run_bambi(exp, "numpyro", warmup=n[0], draws=n[1], chains=1)
    if "error" not in b:
        b = dict(b, wall=b.get("total_s"), min_ess_per_s=b.get("min_ess_per_s_total"))
    rows.append(dict(part="dillon", label="bambi-numpyro", data="dillonE1", **b))
    for r in rows:
        print(r, flush=True)
    return rows


def part_demo(quick: bool, cache: str) -> list:
    args = ["--draws", "100", "--warmup", "100"] if quick else []
    rows = []
    with tempfile.TemporaryDirectory() as fresh:
        for label in ("python -m lmmarg cold", "python -m lmmarg warm"):
            rows.append(dict(part="demo", label=label,
                             wall=_timed_process([sys.executable, "-m", "lmmarg", *args], fresh)))
    with tempfile.TemporaryDirectory() as fresh:
        rows.append(dict(part="demo", label="floor: bare NumPyro NUTS process",
                         wall=_timed_process([sys.executable, "-c", _FLOOR], fresh)))
    for r in rows:
        print(r, flush=True)
    return rows


def part_crossed(quick: bool, cache: str) -> list:
    rows = []
    with tempfile.TemporaryDirectory() as fresh:
        rows.append(dict(part="crossed", label="fit_ml() cold", **run_case(dict(kind="fit_ml", data="crossed"), fresh)))
        case = dict(kind="sample", data="crossed", chains=2, warmup=300, draws=300)
        rows.append(dict(part="crossed", label="sample() cold", **run_case(case, fresh)))
    for r in rows:
        print(r, flush=True)
    return rows


def part_eeg(quick: bool, cache: str) -> list:
    n = (100, 100) if quick else (1000, 1000)
    rows = []
    for cores in (None, os.cpu_count()):
        with tempfile.TemporaryDirectory() as fresh:
            case = dict(kind="sample", data="eeg", chains=4, warmup=n[0], draws=n[1], cores=cores)
            label = "sample() default, cold" + (f", lmmarg.use_cores({cores})" if cores else ", one device")
            rows.append(dict(part="eeg", label=label, **run_case(case, fresh)))
            print(rows[-1], flush=True)
    return rows


_CORES = """
import json, os, sys, time, warnings
import numpyro
numpyro.set_host_device_count(os.cpu_count())
import jax
jax.config.update("jax_enable_x64", True)
warnings.simplefilter("ignore")
from benchmarks.sampler import build_case
case = json.loads(sys.argv[1])
model = build_case(case)
out = {"cores": os.cpu_count(), "devices": jax.local_device_count()}
for cm in ("vectorized", "parallel", "vectorized", "parallel"):
    t = time.perf_counter()
    fit = model.sample(chains=4, warmup=case["warmup"], draws=case["draws"], chain_method=cm, progress_bar=False)
    out[cm] = dict(wall=time.perf_counter() - t, time_mcmc=fit.diagnostics["time_mcmc"],
                   devices=fit.diagnostics["devices"], leapfrog_per_draw=fit.diagnostics["mean_n_steps"])
print("RESULT " + json.dumps(out))
"""


def part_cores(quick: bool, cache: str) -> list:
    n = (100, 100) if quick else (1000, 1000)
    rows = []
    for c in ([dict(data="sleepstudy")] if quick else
              [dict(data="sleepstudy"), dict(data="dillonE1", formula=DILLON_FORMULA),
               dict(data="eeg", warmup=300, draws=300)]):
        c = {"warmup": n[0], "draws": n[1], **c}
        env = dict(os.environ, LMMARG_JAX_CACHE=cache, OPENBLAS_NUM_THREADS="1")
        p = subprocess.run([sys.executable, "-c", _CORES, json.dumps(c)], capture_output=True,
                           text=True, env=env, cwd=ROOT)
        out = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if p.returncode or not out:
            rows.append(dict(part="cores", **c, error=p.stderr[-400:].replace("\n", " ")))
            continue
        r = json.loads(out[-1][7:])
        rows.append(dict(part="cores", **c, cores=r["cores"], devices=r["parallel"]["devices"],
                         wall_vectorized=r["vectorized"]["wall"], wall_parallel=r["parallel"]["wall"],
                         mcmc_vectorized=r["vectorized"]["time_mcmc"], mcmc_parallel=r["parallel"]["time_mcmc"],
                         speedup=r["vectorized"]["wall"] / r["parallel"]["wall"]))
        print(rows[-1], flush=True)
    return rows


PARTS = {"geometry": part_geometry, "beta": part_beta, "dillon": part_dillon, "demo": part_demo,
         "crossed": part_crossed, "eeg": part_eeg, "cores": part_cores}


def report(df: pd.DataFrame) -> str:
    from .harness import to_markdown
    out = ["# Sampler benchmarks (`benchmarks/sampler.py`)", "",
           "Every row is a fresh process with one BLAS thread; wall = the `sample()` call (compilation, mode search, "
           "warmup, sampling, recovery), ESS = min rank-normalized bulk ESS over the global parameters.", ""]
    if "part" not in df:
        return "\n".join(out)
    cols = ["data", "init", "chains", "warmup", "draws", "leapfrog_per_draw", "min_ess_bulk", "ess_per_iter",
            "divergences", "time_compile", "time_init", "time_mcmc", "wall", "min_ess_per_s"]
    g = df[df.part == "geometry"]
    if len(g):
        out += ["## Geometry: init=\"center\" (before) vs init=\"mode\" (default)", "",
                to_markdown(g, [c for c in cols if c in g]), ""]
    b = df[df.part == "beta"]
    if len(b):
        bcols = ["data", "formula", "marginalize_beta", "seed"] + cols[2:] + ["time_recover"]
        out += ["## Fixed effects sampled (default) vs integrated out (`marginalize_beta=True`), normal priors", "",
                to_markdown(b, [c for c in bcols if c in b]), ""]
    for part, title in (("dillon", "dillonE1 (uncorrelated), 1 chain, 1000 + 2000: lmmarg vs Bambi-NumPyro"),
                        ("demo", "`python -m lmmarg` vs the bare-NumPyro floor"),
                        ("crossed", "Crossed N = 5e5 (10,000 x 100): sample(chains=2, 300 + 300) vs fit_ml()"),
                        ("eeg", "eeg, default sample() (4 chains x 1000 + 1000)"),
                        ("cores", "Chains across cores: vectorized vs parallel (4 chains, compiled; eeg 300 + 300)")):
        p = df[df.part == part]
        if len(p):
            shown = ("wall", "min_ess_bulk", "min_ess_per_s", "leapfrog_per_draw", "divergences", "time_compile",
                     "time_mcmc", "time_recover", "converged", "cores", "devices", "wall_vectorized", "wall_parallel",
                     "mcmc_vectorized", "mcmc_parallel", "speedup", "error")
            keep = ["label" if part != "cores" else "data"] + [c for c in shown if c in p and p[c].notna().any()]
            out += [f"## {title}", "", to_markdown(p, keep), ""]
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    ap.add_argument("--in-process", action="store_true",
                    help="run each case in this process (a smoke test: compilation finds warm caches)")
    a = ap.parse_args(argv)
    if a.worker:
        print("RESULT " + json.dumps(worker(json.loads(a.worker))), flush=True)
        return
    stem = a.out or os.path.join(RESULTS, "sampler_quick" if a.quick else "sampler")
    old = pd.read_csv(stem + ".csv") if os.path.exists(stem + ".csv") else pd.DataFrame()
    parts = a.parts.split(",")
    _IN_PROCESS["on"] = a.in_process
    try:
        with tempfile.TemporaryDirectory() as cache:
            rows = [r for p in parts for r in PARTS[p](a.quick, cache)]
    finally:
        _IN_PROCESS["on"] = False
    new = pd.DataFrame(rows)
    if len(old) and "part" in old:  # re-running some parts keeps the others' rows
        old = old[~old.part.isin(parts)]
        new = pd.concat([old, new], ignore_index=True)
    new.to_csv(stem + ".csv", index=False)
    with open(stem + ".md", "w") as f:
        f.write(report(new) + "\n")
    print(report(new))


if __name__ == "__main__":
    main()
