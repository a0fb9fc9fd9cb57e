"""Large crossed designs: two crossed factors of A and B levels (default 5,000 x 5,000), N rows, fitted by ML with
every term integrated out (one dense Schur block of size B), and lme4 on the same data when R is available.

    python benchmarks/large_crossed.py [--n 1e6] [--a 5000] [--b 5000] [--no-r] [--r-timeout 3600]

Model: y ~ x + (1 | a) + (1 | b), simulated (SDs 0.7, 0.5, residual 1). Reports the warning lmmarg gives for the
block (its measured cost per evaluation), the wall time of Model() and of fit_ml(), the number of evaluations,
the estimates and logLik, and lme4's time and logLik. Writes benchmarks/results/large_crossed.{csv,md}.
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
from harness import to_markdown

ROOT = pathlib.Path(__file__).resolve().parent

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
    ap.add_argument("--out", default=str(ROOT / "results" / "large_crossed"))
    args = ap.parse_args()
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
            f"(simulated), 2-core CPU, float64. Command: `python benchmarks/large_crossed.py --n {args.n:g} "
            f"--a {args.a} --b {args.b}`.", "", to_markdown(df, list(df.columns), ".6g"), "",
            "Notes (lmmarg's warnings for this design, and lme4's run):", ""] + [f"- {n}" for n in notes]
    out.with_suffix(".md").write_text("\n".join(text) + "\n")
    print("\n".join(text), flush=True)


if __name__ == "__main__":
    main()
