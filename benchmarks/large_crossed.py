"""Large crossed designs: two crossed factors of A and B levels (default 5,000 x 5,000), N rows, fitted by ML with
every term integrated out (one dense Schur block of size B), and lme4 on the same data when R is available.

    python -m benchmarks.large_crossed [--n 1e6] [--a 5000] [--b 5000] [--no-r] [--r-timeout 3600]

Model: y ~ x + (1 | a) + (1 | b), simulated (SDs 0.7, 0.5, residual 1). Reports the warning lmmarg gives for the
block (its measured cost per evaluation), the wall time of Model() and of fit_ml(), the number of evaluations,
the estimates and logLik, and lme4's time and logLik. Writes benchmarks/results/large_crossed.{csv,md}.

    python -m benchmarks.large_crossed --sample [--n 1e6] [--a 5000] [--b 5000] [--warmup 300] [--draws 300]
           [--chains 1] [--nc-warmup 100] [--nc-draws 50] [--nc-minutes 10] [--skip-conditional]

NUTS on the same design with b integrated out and a left to HMC (integrating both out needs the 5,000-column
dense block at ~16 s per gradient): a in the conditional parameterization (``parameterization={"a":
"conditional"}``) by model.sample() (the user path) run to the end, and the default noncentered a for
comparison in a short run of the benchmark harness's NUTS (benchmarks/harness.py: NumPyro's kernel, unit diagonal
metric adapted in warmup) capped at --nc-minutes (a timeout row then carries its leapfrog steps and ms per
gradient). Records ms per value-and-gradient (timed alone and during sampling), leapfrog steps per draw, bulk/tail ESS
of the global parameters, wall time including compilation. Writes benchmarks/results/large_crossed_sample.{csv,md}.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import subprocess
import tempfile
import time
import warnings

import numpy as np
import pandas as pd

from .harness import to_markdown

HERE = pathlib.Path(__file__).resolve().parent

R_SCRIPT = r"""
suppressMessages(library(lme4))
args <- commandArgs(TRUE)
d <- read.csv(args[1]); d$a <- factor(d$a); d$b <- factor(d$b)
tm <- system.time(fit <- lmer(y ~ x + (1 | a) + (1 | b), d, REML = FALSE))
vc <- as.data.frame(VarCorr(fit))
cat(sprintf('{"time_s": %.3f, "logLik": %.10f, "sd_a": %.8f, "sd_b": %.8f, "sigma": %.8f}\n', tm[["elapsed"]],
            as.numeric(logLik(fit)), vc$sdcor[vc$grp == "a"], vc$sdcor[vc$grp == "b"], sigma(fit)))
"""


def simulate(n: int, A: int, B: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    a, b, x = rng.integers(0, A, n), rng.integers(0, B, n), rng.normal(size=n)
    y = 1 + 0.5 * x + 0.7 * rng.normal(size=A)[a] + 0.5 * rng.normal(size=B)[b] + rng.normal(size=n)
    return pd.DataFrame(dict(y=y, x=x, a=a, b=b))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=float, default=1e6)
    ap.add_argument("--a", type=int, default=5000)
    ap.add_argument("--b", type=int, default=5000)
    ap.add_argument("--no-r", action="store_true")
    ap.add_argument("--reuse-lmmarg", action="store_true",
                    help="take lmmarg's row from the existing results .csv (e.g. to rerun only lme4)")
    ap.add_argument("--r-timeout", type=float, default=3600.0, help="seconds before lme4 is recorded as unfinished")
    ap.add_argument("--out", default=None, help="results path without suffix (default results/large_crossed, "
                                                 "results/large_crossed_sample with --sample)")
    ap.add_argument("--sample", action="store_true", help="NUTS with b integrated out and a left to HMC")
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--draws", type=int, default=300)
    ap.add_argument("--chains", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nc-warmup", type=int, default=100)
    ap.add_argument("--nc-draws", type=int, default=50)
    ap.add_argument("--nc-minutes", type=float, default=10.0,
                    help="budget of the noncentered comparison run (0: skip it)")
    ap.add_argument("--skip-conditional", action="store_true", help="only the noncentered comparison")
    args = ap.parse_args()
    if args.out is None:
        args.out = str(HERE / "results" / ("large_crossed_sample" if args.sample else "large_crossed"))
    if args.sample:
        sample_main(args)
        return
    import lmmarg

    d = simulate(int(args.n), args.a, args.b)
    if args.reuse_lmmarg:
        from lmmarg.marginal.plan import dense_seconds
        prev = pd.read_csv(pathlib.Path(args.out).with_suffix(".csv"))
        rows = prev[prev.tool == "lmmarg"].to_dict("records")
        notes = [f"lmmarg's row is from an earlier run of this script (same data); its block of size {args.b} costs "
                 f"about {dense_seconds(args.b):.2g} s per value and gradient here (lmmarg's own estimate)"]
        _run_r(d, rows, args, notes)
        return
    dm = d.assign(a=d.a.astype(str), b=d.b.astype(str))
    rows = []
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        m = lmmarg.Model("y ~ x + (1 | a) + (1 | b)", dm)
        t_model = time.perf_counter() - t0
        t1 = time.perf_counter()
        fit = m.fit_ml()
        t_fit = time.perf_counter() - t1
    notes = [str(x.message) for x in w]
    rows.append(dict(tool="lmmarg", n=int(args.n), A=args.a, B=args.b, model_s=round(t_model, 2),
                     fit_s=round(t_fit, 1), evaluations=fit.n_eval, converged=fit.converged, logLik=fit.loglik,
                     sd_a=float(fit.sd["a"][0]), sd_b=float(fit.sd["b"][0]), sigma=fit.sigma))
    _write(rows, args, notes)  # lmmarg's row first: lme4 may run for a long time on such designs
    _run_r(d, rows, args, notes)


def _run_r(d, rows, args, notes):
    if not args.no_r and shutil.which("Rscript"):
        with tempfile.TemporaryDirectory() as tmp:
            csv, rs = pathlib.Path(tmp) / "d.csv", pathlib.Path(tmp) / "fit.R"
            d.to_csv(csv, index=False)
            rs.write_text(R_SCRIPT)
            try:
                out = subprocess.run(["Rscript", str(rs), str(csv)], capture_output=True, text=True, check=True,
                                     timeout=args.r_timeout)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append(dict(tool="lme4", n=int(args.n), A=args.a, B=args.b, model_s=float("nan"),
                                 fit_s=r["time_s"], evaluations=float("nan"), converged=True, logLik=r["logLik"],
                                 sd_a=r["sd_a"], sd_b=r["sd_b"], sigma=r["sigma"]))
            except subprocess.TimeoutExpired:
                notes.append(f"lme4 (lmer, default control) had not finished after {args.r_timeout:.0f} s")
        _write(rows, args, notes)


def _write(rows, args, notes):
    df = pd.DataFrame(rows)
    out = pathlib.Path(args.out)
    df.to_csv(out.with_suffix(".csv"), index=False)
    text = ["# Large crossed design: ML with every term integrated out", "",
            f"`y ~ x + (1 | a) + (1 | b)`, N = {int(args.n):,}, a: {args.a:,} levels, b: {args.b:,} levels "
            f"(simulated), 2-core CPU, float64. Command: `python -m benchmarks.large_crossed --n {args.n:g} "
            f"--a {args.a} --b {args.b}`.", "", to_markdown(df, list(df.columns), ".6g"), "",
            "Notes (lmmarg's warnings for this design, and lme4's run):", ""] + [f"- {n}" for n in notes]
    out.with_suffix(".md").write_text("\n".join(text) + "\n")
    print("\n".join(text), flush=True)


# ---------------------------------------------------------------------------------------------- --sample
GLOBALS = ["beta[0]", "beta[1]", "sd_a[0]", "sd_b[0]", "sigma"]


def _grad_ms(pot, key, repeats: int = 5) -> tuple[float, float]:
    """(compile + first call s, median ms) of one jitted value-and-gradient of the potential at a start."""
    from .harness import time_potential
    first, sec = time_potential(pot.potential_fn, pot.init_params(key, num_chains=None), repeats)
    return first, 1e3 * sec


def _fit_row(m, label, parameterization, args):
    """model.sample() (the user path: NUTS from the posterior mode in whitened coordinates), run to the end."""
    import jax
    t0 = time.perf_counter()
    pot = m.potential(["b"], parameterization)
    t_pot = time.perf_counter() - t0
    first_s, grad_ms = _grad_ms(pot, jax.random.PRNGKey(args.seed))
    print(f"[{label}] potential built in {t_pot:.1f} s; value-and-gradient {grad_ms:.1f} ms "
          f"(compile + first call {first_s:.1f} s)", flush=True)
    total = args.warmup + args.draws
    t_run = time.perf_counter()

    def progress(phase, done, total_, div):
        print(f"  [{label}] {phase}: {done}/{total_} iterations, {div} divergences, "
              f"{time.perf_counter() - t_run:.0f} s", flush=True)

    fit = m.sample(draws=args.draws, warmup=args.warmup, chains=args.chains, seed=args.seed, marginalize=["b"],
                   parameterization=parameterization, progress_bar=progress)
    wall = time.perf_counter() - t_run + t_pot
    dg = fit.diagnostics
    s = fit.summary()
    g = s.loc[[r for r in s.index if not r.startswith("r_")]]
    row = dict(variant=label, driver="model.sample", n=int(args.n), A=args.a, B=args.b, chains=args.chains,
               warmup=args.warmup, draws=args.draws, grad_ms=grad_ms,
               ms_per_gradient=1e3 * dg["time_mcmc"] / max(total * args.chains * dg["mean_n_steps"], 1.0),
               leapfrog_per_draw=dg["mean_n_steps"], step_size=float(np.mean(dg["step_size"])),
               divergences=dg["divergences"], min_ess_bulk=float(g.ess_bulk.min()), worst_param=g.ess_bulk.idxmin(),
               min_ess_tail=float(g.ess_tail.min()), max_rhat=float(g.r_hat.max()) if args.chains > 1 else np.nan,
               compile_s=dg["time_compile"], init_s=dg.get("time_init", np.nan), mcmc_s=dg["time_mcmc"],
               recover_s=dg.get("time_recover", np.nan), wall_s=wall,
               min_ess_bulk_per_min=60.0 * float(g.ess_bulk.min()) / wall)
    for k in ("sd_a__Intercept", "sd_b__Intercept", "sigma", "b_Intercept", "b_x"):
        row[f"{k}_mean"] = float(g.loc[k, "mean"])
        row[f"{k}_sd"] = float(g.loc[k, "sd"])
    return row


def _harness_row(m, label, parameterization, warmup, draws, args, minutes):
    """The benchmark harness's NUTS (unit metric, data-scaled start), capped at `minutes`."""
    import jax
    from .harness import Target, TimeBudgetExceeded, metrics, run_nuts
    t0 = time.perf_counter()
    pot = m.potential(["b"], parameterization)
    first_s, grad_ms = _grad_ms(pot, jax.random.PRNGKey(args.seed))
    print(f"[{label}] value-and-gradient {grad_ms:.1f} ms (compile + first call {first_s:.1f} s)", flush=True)
    target = Target("large_crossed", label, pot.potential_fn, lambda k: pot.init_params(k, num_chains=None),
                    pot.constrain)
    row = dict(variant=label, driver="harness", n=int(args.n), A=args.a, B=args.b, chains=1, warmup=warmup,
               draws=draws, grad_ms=grad_ms)
    try:
        run = run_nuts(target, warmup=warmup, draws=draws, chains=1, seed=args.seed, max_minutes=minutes)
    except TimeBudgetExceeded as e:
        p = e.partial
        row.update(error=f"timeout after {minutes:g} min ({p['phase']})", iterations_done=p["iterations_done"],
                   leapfrog_per_draw=p["leapfrog_steps"] / max(p["iterations_done"], 1),
                   ms_per_gradient=1e3 * p["run_s"] / max(p["leapfrog_steps"], 1),
                   wall_s=time.perf_counter() - t0)
        return row
    r, _ = metrics(target, run, seed=args.seed, recover=False)
    wall = time.perf_counter() - t0
    row.update({k: r[k] for k in ("ms_per_gradient", "leapfrog_per_draw", "step_size", "divergences",
                                  "min_ess_bulk", "worst_param", "min_ess_tail", "compile_s")},
               mcmc_s=r["warmup_s"] + r["sample_s"], wall_s=wall,
               min_ess_bulk_per_min=60.0 * r["min_ess_bulk"] / wall)
    return row


def sample_main(args):
    import lmmarg
    from lmmarg.marginal import conditional
    d = simulate(int(args.n), args.a, args.b)
    dm = d.assign(a=d.a.astype(str), b=d.b.astype(str))
    t0 = time.perf_counter()
    m = lmmarg.Model("y ~ x + (1 | a) + (1 | b)", dm)
    t_model = time.perf_counter() - t0
    rows = []
    notes = [f"Model() built in {t_model:.1f} s (not in wall_s); conditional parameterization with "
             f"lmmarg.marginal.conditional.SWEEPS = {conditional.SWEEPS} and the coarse space."]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not args.skip_conditional:
            rows.append(_fit_row(m, "conditional", {"a": "conditional"}, args))
            _write_sample(rows, args, notes)
        if args.nc_minutes > 0:
            rows.append(_harness_row(m, "noncentered", None, args.nc_warmup, args.nc_draws, args, args.nc_minutes))
    _write_sample(rows, args, notes)


def _write_sample(rows, args, notes):
    df = pd.DataFrame(rows)
    out = pathlib.Path(args.out)
    df.to_csv(out.with_suffix(".csv"), index=False)
    cols = [c for c in ["variant", "driver", "chains", "warmup", "draws", "grad_ms", "ms_per_gradient",
                        "leapfrog_per_draw", "step_size", "divergences", "min_ess_bulk", "worst_param",
                        "min_ess_tail", "max_rhat", "compile_s", "init_s", "mcmc_s", "wall_s",
                        "min_ess_bulk_per_min", "iterations_done", "error"] if c in df.columns]
    est = [c for c in df.columns if c.endswith(("_mean", "_sd"))]
    cmd = (f"python -m benchmarks.large_crossed --sample --n {args.n:g} --a {args.a} --b {args.b} --warmup "
           f"{args.warmup} --draws {args.draws} --chains {args.chains} --nc-warmup {args.nc_warmup} "
           f"--nc-draws {args.nc_draws} --nc-minutes {args.nc_minutes:g}")
    text = ["# Large crossed design: NUTS with one class integrated out, the other in the conditional "
            "parameterization", "",
            f"`y ~ x + (1 | a) + (1 | b)`, N = {int(args.n):,}, a: {args.a:,} levels, b: {args.b:,} levels "
            f"(simulated: SDs 0.7, 0.5, residual 1), `marginalize=['b']`; a left to HMC. 2-core CPU, float64, one "
            f"core (`taskset -c 1`, `OPENBLAS_NUM_THREADS=1`, XLA single-threaded). Command: `{cmd}`.", "",
            to_markdown(df, cols, ".4g"), "",
            "Columns: driver = `model.sample()` (the user path: NUTS started at the posterior mode, in coordinates "
            "whitened by its curvature, `init='mode'`) or the benchmark harness (NumPyro NUTS from a jittered "
            "data-scaled start, unit metric, capped); grad_ms = one jitted value-and-gradient of the potential "
            "timed alone (median of 5); ms_per_gradient = MCMC time / leapfrog steps (model.sample: assuming the "
            "sampling phase's steps per iteration in warmup too); leapfrog_per_draw = mean NUTS steps per sampling "
            "iteration (harness timeout rows: per iteration so far); min_ess_bulk / min_ess_tail over the global "
            "parameters (b_Intercept, b_x, sd_a, sd_b, sigma); init_s = posterior mode and curvature; wall_s = "
            "potential construction + compilation + mode + warmup + sampling + constraining and recovering the "
            "draws (model.sample) ; a timeout row reports what its partial run measured.", ""]
    if est:
        text += ["Posterior means and SDs (simulated truth: sd_a 0.7, sd_b 0.5, sigma 1, b_x 0.5):", "",
                 to_markdown(df, ["variant"] + est, ".4g"), ""]
    text += ["Notes:", ""] + [f"- {n}" for n in notes]
    out.with_suffix(".md").write_text("\n".join(text) + "\n")
    print("\n".join(text), flush=True)


if __name__ == "__main__":
    main()
