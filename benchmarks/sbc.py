"""Simulation-based calibration (SBC; Talts et al. 2018) of lmmarg's default sampler, ``model.sample()``.

    OPENBLAS_NUM_THREADS=1 taskset -c 1 python -m benchmarks.sbc [--sims 200] [--models slopes,crossed]
        [--max-minutes 25] [--resume] [--quick] [--out DIR]

For each model a fixed design (covariate and grouping factors, drawn once from ``--seed``) and explicit, proper,
data-independent priors (lmmarg's defaults are scaled by the data, which SBC must not use). Each simulation draws
θ from the prior (NumPy), the random effects given θ and then y; fits ``lmmarg.Model(formula, data, priors=...)``
with the same priors by ``model.sample()`` (marginalized NUTS, every option at its default except the short run:
``chains`` × (``warmup`` + ``ranks`` · ``thin``) iterations, no random-effect recovery, no progress bar); and
records, per global parameter, the rank of the true value among ``ranks`` = L posterior draws (every ``thin``-th
draw, to make them roughly independent; uniform on 0..L if the sampler is calibrated) and whether the true value
lies in the central 50 % and 90 % posterior intervals (quantiles of all draws).

Models (priors: Normal(mean, sd); Gamma(shape, rate); LKJ(eta) on the correlation matrix):
  slopes   y ~ x + (x | g): 20 groups × 10 rows, x ~ N(0, 1). Intercept N(0, 1), b N(0, 1), sigma Gamma(6, 6),
           each SD (sd_g__Intercept, sd_g__x) Gamma(4, 6), cor LKJ(2).
  crossed  y ~ x + (1 | subj) + (1 | item): 12 subjects × 10 items × 2 rows per cell, x ~ N(0, 1) per row.
           Intercept N(0, 1), b N(0, 1), sigma Gamma(6, 6), each SD Gamma(4, 6).
The NumPy generators are checked against the NumPyro distributions handed to ``Model`` (Kolmogorov-Smirnov on
4000 draws each) and every prior in ``model.priors`` must come from the user, before anything runs.

Outputs (in ``--out``, default benchmarks/results; ``--quick`` adds the suffix _quick):
  sbc.csv  one row per simulation and parameter: true value, rank (0..L), posterior mean/sd/quantiles, 50 %/90 %
           hits, bulk ESS of the draws, the fit's divergences, SamplerWarnings and seconds.
  sbc.md   per model: timing and sampler problems; per parameter: coverage of the 50 % and 90 % intervals with the
           Monte Carlo SE sqrt(p(1 - p)/S) at the nominal p, z-scores, a chi-square test of uniform ranks, the mean
           normalized rank (0.5 expected; above 0.5: the posterior sits below the truth).
  sbc.png  rank histograms per parameter with the 99 % band of a bin count under uniform ranks (binomial).
  sbc_meta.json  date, lmmarg commit, command and minutes of the run (``--report-only`` reuses them).

Every data set has the same shapes, so all fits of a model share one set of compiled programs (the data are an
argument of lmmarg's programs, see docs/guide.md "Refitting to new data compiles nothing"): the first fit of each
model compiles (≈ 10-25 s on one core), every later one costs the sampling (a fraction of a second). Full runs
switch JAX's persistent cache off (nothing is gained within a process); ``--quick`` keeps it.
``--max-minutes`` stops cleanly (models interleaved, so they get about the same S) and ``--resume`` continues
a previous run from its CSV with the same settings and seeds.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .harness import RESULTS, ess, to_markdown

SETTINGS = ("warmup", "ranks", "thin", "chains", "seed")


# ---------------------------------------------------------------------------------------------- priors
@dataclass(frozen=True)
class P:
    """A scalar prior given once, drawn in NumPy and handed to lmmarg as the same NumPyro distribution."""

    family: str  # "normal" (mean, sd) | "gamma" (shape, rate)
    a: float
    b: float

    def numpyro(self):
        import numpyro.distributions as dist
        return dist.Normal(self.a, self.b) if self.family == "normal" else dist.Gamma(self.a, self.b)

    def draw(self, rng, size=None):
        if self.family == "normal":
            return rng.normal(self.a, self.b, size)
        return rng.gamma(self.a, 1.0 / self.b, size)

    def __str__(self):
        return f"{self.family}({self.a:g}, {self.b:g})"


def lkj2_draw(eta, rng):
    """The correlation of a 2 × 2 LKJ(eta) matrix: (r + 1) / 2 ~ Beta(eta, eta)."""
    return 2.0 * rng.beta(eta, eta) - 1.0


# ---------------------------------------------------------------------------------------------- models
@dataclass
class Design:
    """A model with its fixed design (``data`` without y) and priors; ``simulate(rng)`` → (truth, y)."""

    name: str
    formula: str
    data: pd.DataFrame
    priors: dict  # lmmarg name -> P | ("lkj", eta)
    params: list  # brms-like parameter names, in table order
    simulate: object = None
    extract: object = None  # fit.samples -> {param: (chains, draws)}
    notes: str = ""
    extra: dict = field(default_factory=dict)

    def lmmarg_priors(self):
        from lmmarg.priors import LKJ
        return {k: (LKJ(v[1]) if isinstance(v, tuple) else v.numpyro()) for k, v in self.priors.items()}


def slopes(seed: int) -> Design:
    """y ~ x + (x | g), 20 groups × 10 rows, correlated random intercepts and slopes."""
    G, n = 20, 10
    rng = np.random.default_rng([seed, 1])
    g = np.repeat(np.arange(G), n)
    x = rng.normal(0.0, 1.0, G * n)
    data = pd.DataFrame({"x": x, "g": [f"g{i:02d}" for i in g]})
    pri = {"Intercept": P("normal", 0, 1), "b": P("normal", 0, 1), "sigma": P("gamma", 6, 6),
           "sd": P("gamma", 4, 6), "cor": ("lkj", 2.0)}
    params = ["b_Intercept", "b_x", "sigma", "sd_g__Intercept", "sd_g__x", "cor_g__Intercept__x"]

    def simulate(r):
        t = {"b_Intercept": pri["Intercept"].draw(r), "b_x": pri["b"].draw(r), "sigma": pri["sigma"].draw(r),
             "sd_g__Intercept": pri["sd"].draw(r), "sd_g__x": pri["sd"].draw(r),
             "cor_g__Intercept__x": lkj2_draw(pri["cor"][1], r)}
        sd = np.array([t["sd_g__Intercept"], t["sd_g__x"]])
        rho = t["cor_g__Intercept__x"]
        L = np.linalg.cholesky(np.outer(sd, sd) * np.array([[1.0, rho], [rho, 1.0]]))
        u = r.normal(size=(G, 2)) @ L.T
        y = t["b_Intercept"] + t["b_x"] * x + u[g, 0] + u[g, 1] * x + t["sigma"] * r.normal(size=G * n)
        return t, y

    def extract(s):
        return {"b_Intercept": s["beta"][..., 0], "b_x": s["beta"][..., 1], "sigma": s["sigma"],
                "sd_g__Intercept": s["sd_g"][..., 0], "sd_g__x": s["sd_g"][..., 1],
                "cor_g__Intercept__x": s["corr_g"][..., 0, 1]}

    return Design("slopes", "y ~ x + (x | g)", data, pri, params, simulate, extract,
                  notes=f"{G} groups × {n} rows, x ~ N(0, 1)")


def crossed(seed: int) -> Design:
    """y ~ x + (1 | subj) + (1 | item), 12 subjects × 10 items × 2 rows per cell."""
    A, B, reps = 12, 10, 2
    rng = np.random.default_rng([seed, 2])
    a = np.repeat(np.arange(A), B * reps)
    b = np.tile(np.repeat(np.arange(B), reps), A)
    x = rng.normal(0.0, 1.0, a.size)
    data = pd.DataFrame({"x": x, "subj": [f"s{i:02d}" for i in a], "item": [f"i{i:02d}" for i in b]})
    pri = {"Intercept": P("normal", 0, 1), "b": P("normal", 0, 1), "sigma": P("gamma", 6, 6),
           "sd": P("gamma", 4, 6)}
    params = ["b_Intercept", "b_x", "sigma", "sd_subj__Intercept", "sd_item__Intercept"]

    def simulate(r):
        t = {"b_Intercept": pri["Intercept"].draw(r), "b_x": pri["b"].draw(r), "sigma": pri["sigma"].draw(r),
             "sd_subj__Intercept": pri["sd"].draw(r), "sd_item__Intercept": pri["sd"].draw(r)}
        us = t["sd_subj__Intercept"] * r.normal(size=A)
        ui = t["sd_item__Intercept"] * r.normal(size=B)
        y = t["b_Intercept"] + t["b_x"] * x + us[a] + ui[b] + t["sigma"] * r.normal(size=a.size)
        return t, y

    def extract(s):
        return {"b_Intercept": s["beta"][..., 0], "b_x": s["beta"][..., 1], "sigma": s["sigma"],
                "sd_subj__Intercept": s["sd_subj"][..., 0], "sd_item__Intercept": s["sd_item"][..., 0]}

    return Design("crossed", "y ~ x + (1 | subj) + (1 | item)", data, pri, params, simulate, extract,
                  notes=f"{A} subjects × {B} items × {reps} rows per cell, x ~ N(0, 1)")


MODELS = {"slopes": slopes, "crossed": crossed}


def check_priors(design: Design, n=4000):
    """The NumPy generators draw from the NumPyro distributions handed to lmmarg (KS test), and lmmarg uses a
    user prior for every parameter (none of the data-scaled defaults)."""
    import jax
    import numpyro.distributions as dist
    from scipy.stats import ks_2samp

    import lmmarg
    rng = np.random.default_rng(12345)
    key = jax.random.PRNGKey(0)
    for name, p in design.priors.items():
        if isinstance(p, tuple):
            mine = np.array([lkj2_draw(p[1], rng) for _ in range(n)])
            theirs = np.asarray(dist.LKJ(2, p[1]).sample(key, (n,)))[:, 0, 1]
        else:
            mine = p.draw(rng, n)
            theirs = np.asarray(p.numpyro().sample(key, (n,)))
        pv = ks_2samp(mine, theirs).pvalue
        if pv < 1e-3:
            raise AssertionError(f"{design.name}: NumPy draws of prior {name} do not match NumPyro's (KS p={pv:.2g})")
    t, y = design.simulate(np.random.default_rng(0))
    model = lmmarg.Model(design.formula, design.data.assign(y=y), priors=design.lmmarg_priors())
    tab = model.priors.table
    if not (tab["source"] == "user").all():
        raise AssertionError(f"{design.name}: parameters left at lmmarg's default priors:\n{tab}")
    labels = set(tab["parameter"])
    expected = {q.split("__")[0] if q.startswith("cor_") else q for q in design.params}  # table: cor_<term>
    if labels != expected:
        raise AssertionError(f"{design.name}: model parameters {sorted(labels)} != {sorted(design.params)}")
    return tab


# ---------------------------------------------------------------------------------------------- one fit
def run_one(design: Design, sim: int, a) -> list[dict]:
    """Simulate data set `sim` of `design`, fit it with model.sample() and return one row per parameter."""
    import lmmarg
    from lmmarg.inference.nuts import SamplerWarning
    r = np.random.default_rng([a.seed, list(MODELS).index(design.name) + 1, 7, sim])
    truth, y = design.simulate(r)
    per_chain = -(-a.ranks // a.chains) * a.thin
    t0 = time.perf_counter()
    model = lmmarg.Model(design.formula, design.data.assign(y=y), priors=design.lmmarg_priors())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = model.sample(draws=per_chain, warmup=a.warmup, chains=a.chains, seed=sim, progress_bar=False,
                           recover=False, compilation_cache=None if a.quick else False)
    fit_s = time.perf_counter() - t0
    sampler_w = [str(w.message) for w in caught if issubclass(w.category, SamplerWarning)]
    for w in caught:
        if not issubclass(w.category, SamplerWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    d = fit.diagnostics
    draws = design.extract(fit.samples)
    rows = []
    for p in design.params:
        x = np.asarray(draws[p], float)  # (chains, draws)
        thinned = x[:, ::a.thin].reshape(-1)[:a.ranks]
        q05, q25, q75, q95 = np.quantile(x, [0.05, 0.25, 0.75, 0.95])
        tv = float(truth[p])
        rows.append(dict(model=design.name, sim=sim, parameter=p, true=tv, rank=int((thinned < tv).sum()),
                         L=a.ranks, post_mean=float(x.mean()), post_sd=float(x.std()), q05=q05, q25=q25, q75=q75,
                         q95=q95, hit50=bool(q25 <= tv <= q75), hit90=bool(q05 <= tv <= q95),
                         ess_bulk=float(ess(x)), divergences=int(d["divergences"]),
                         treedepth_hits=int(d["max_tree_depth_hits"]), sampler_warnings=len(sampler_w),
                         warning_kinds=";".join(sorted({_kind(m) for m in sampler_w})),
                         fit_s=fit_s, compile_s=float(d["time_compile"]), mcmc_s=float(d["time_mcmc"]),
                         **{k: getattr(a, k) for k in SETTINGS}, draws_per_chain=per_chain))
    return rows


def _kind(msg: str) -> str:
    m = msg.lower()
    for k, w in (("divergent", "divergences"), ("tree depth", "treedepth"), ("r-hat", "rhat"), ("ess", "ess")):
        if k in m:
            return w
    return "other"


# ---------------------------------------------------------------------------------------------- summary
def rank_bins(L: int, S: int) -> int:
    """Number of histogram bins: a divisor of L + 1 (equal-width bins of ranks 0..L), at most 20, with at least
    5 expected counts per bin where possible."""
    divs = [b for b in range(2, min(20, L + 1) + 1) if (L + 1) % b == 0] or [L + 1]
    ok = [b for b in divs if S / b >= 5]
    return max(ok) if ok else min(divs)


def rank_counts(ranks: np.ndarray, L: int, B: int) -> np.ndarray:
    return np.bincount(np.asarray(ranks, int) * B // (L + 1), minlength=B)


def summarize(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-parameter coverage/uniformity table and per-model run table."""
    from scipy.stats import chisquare, kstest
    rows = []
    for (m, p), g in df.groupby(["model", "parameter"], sort=False):
        S, L = len(g), int(g["L"].iloc[0])
        B = rank_bins(L, S)
        counts = rank_counts(g["rank"], L, B)
        chi = chisquare(counts).pvalue if S >= 2 else np.nan
        ks = kstest((g["rank"] + 0.5) / (L + 1), "uniform").pvalue  # ranks at the centres of L + 1 cells
        row = dict(model=m, parameter=p, S=S, L=L, bins=B, chi2_p=chi, ks_p=ks,
                   mean_rank=float((g["rank"] / L).mean()), mean_rank_se=float(np.sqrt(1 / 12 / S)))
        worst = 0.0
        for lvl, col in ((50, "hit50"), (90, "hit90")):
            nominal = lvl / 100
            cov = float(g[col].mean())
            se = float(np.sqrt(nominal * (1 - nominal) / S))
            z = (cov - nominal) / se
            worst = max(worst, abs(z))
            row.update({f"cov{lvl}": cov, f"se{lvl}": se, f"z{lvl}": z})
        row["within"] = "yes (2 SE)" if worst <= 2 else ("yes (3 SE)" if worst <= 3 else "NO")
        row["div_per_fit"] = float(g["divergences"].mean())
        row["median_ess"] = float(g["ess_bulk"].median())
        rows.append(row)
    par = pd.DataFrame(rows)
    fits = df.drop_duplicates(["model", "sim"])
    runs = []
    for m, g in fits.groupby("model", sort=False):
        runs.append(dict(model=m, S=len(g), fit_s_median=g["fit_s"].median(), fit_s_mean=g["fit_s"].mean(),
                         compile_s_median=g["compile_s"].median(), mcmc_s_median=g["mcmc_s"].median(),
                         fits_with_divergences=int((g["divergences"] > 0).sum()),
                         divergences_total=int(g["divergences"].sum()),
                         divergences_per_fit=float(g["divergences"].mean()),
                         fits_with_treedepth_hits=int((g["treedepth_hits"] > 0).sum()),
                         fits_with_sampler_warnings=int((g["sampler_warnings"] > 0).sum()),
                         warning_kinds=", ".join(sorted({k for s in g["warning_kinds"] if isinstance(s, str)
                                                         for k in s.split(";") if k})) or "-"))
    return par, pd.DataFrame(runs)


def plot(df: pd.DataFrame, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.stats import binom
    models = list(dict.fromkeys(df["model"]))
    ncol = max(df[df["model"] == m]["parameter"].nunique() for m in models)
    fig, axes = plt.subplots(len(models), ncol, figsize=(2.6 * ncol, 2.3 * len(models)), squeeze=False)
    for i, m in enumerate(models):
        sub = df[df["model"] == m]
        params = list(dict.fromkeys(sub["parameter"]))
        for j in range(ncol):
            ax = axes[i, j]
            if j >= len(params):
                ax.axis("off")
                continue
            g = sub[sub["parameter"] == params[j]]
            S, L = len(g), int(g["L"].iloc[0])
            B = rank_bins(L, S)
            counts = rank_counts(g["rank"], L, B)
            lo, hi = binom.ppf(0.005, S, 1 / B), binom.ppf(0.995, S, 1 / B)
            ax.axhspan(lo, hi, color="0.85", zorder=0)
            ax.axhline(S / B, color="0.5", lw=0.8, zorder=1)
            ax.bar(np.arange(B), counts, width=0.9, color="C0", zorder=2)
            ax.set_title(f"{m}: {params[j]}", fontsize=8)
            ax.set_xticks([0, B - 1])
            ax.set_xticklabels(["0", str(L)], fontsize=7)
            ax.tick_params(axis="y", labelsize=7)
    fig.suptitle("SBC rank histograms (grey: pointwise 99 % band of one bin's count under uniform ranks)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def source_commit() -> str:
    """The commit of the lmmarg package that ran, with "-dirty" when lmmarg/ has uncommitted changes."""
    import lmmarg
    pkg = os.path.dirname(os.path.abspath(lmmarg.__file__))

    def git(*args):
        return subprocess.run(["git", "-C", pkg, *args], capture_output=True, text=True, timeout=10).stdout.strip()
    try:
        head = git("rev-parse", "--short=10", "HEAD")
        return (head + ("-dirty" if git("status", "--porcelain", "--", ".") else "")) if head else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def report(df: pd.DataFrame, out: str, tag: str, meta: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    par, runs = summarize(df)
    designs = {name: MODELS[name](int(df["seed"].iloc[0])) for name in dict.fromkeys(df["model"])}
    first = df.iloc[0]
    lines = [
        "# Simulation-based calibration of `model.sample()`",
        "",
        f"Generated by `benchmarks/sbc.py` ({meta.get('date', '')}; lmmarg {meta.get('commit', 'unknown')}), "
        f"{meta.get('minutes', float('nan')):.0f} min on one core. Command: `{meta.get('command', '')}`.",
        "",
        f"Each fit: `model.sample(chains={int(first['chains'])}, warmup={int(first['warmup'])}, "
        f"draws={int(first['draws_per_chain'])}, recover=False)`, everything else at lmmarg's defaults "
        "(every term marginalized, lmmarg's default initialization, adaptation and NUTS options). Ranks among "
        f"L = {int(first['L'])} draws (the draws thinned by {int(first['thin'])}); 50 % / 90 % central intervals "
        "from all draws. "
        "Data-independent priors passed explicitly (`Model(..., priors=...)`), the same distributions that "
        "simulate θ:",
        "",
    ]
    for name, d in designs.items():
        pri = ", ".join(f"{k} {v if not isinstance(v, tuple) else f'lkj({v[1]:g})'}" for k, v in d.priors.items())
        lines.append(f"* **{name}**: `{d.formula}`, {d.notes}; priors {pri} (`sd`: each SD separately).")
    lines += [
        "",
        "## Runs",
        "",
        to_markdown(runs, ["model", "S", "fit_s_median", "compile_s_median", "mcmc_s_median",
                           "fits_with_divergences", "divergences_per_fit", "fits_with_treedepth_hits",
                           "fits_with_sampler_warnings", "warning_kinds"], floatfmt=".3g"),
        "",
        "`fit_s`: seconds per fit (building the `Model` and `sample()`), on one core; `compile_s`: of which "
        "tracing and XLA compilation: the first fit of each model compiles, the others reuse its programs (lmmarg's "
        "compiled programs take the data as an argument), so the sampling, not the compilation, sets the cost.",
        "",
        "## Coverage and rank uniformity",
        "",
        to_markdown(par.assign(**{"cov50 (SE)": [f"{c:.3f} ({s:.3f})" for c, s in zip(par["cov50"], par["se50"])],
                                  "cov90 (SE)": [f"{c:.3f} ({s:.3f})" for c, s in zip(par["cov90"], par["se90"])],
                                  "mean rank (SE)": [f"{c:.3f} ({s:.3f})" for c, s in
                                                     zip(par["mean_rank"], par["mean_rank_se"])]}),
                    ["model", "parameter", "S", "cov50 (SE)", "z50", "cov90 (SE)", "z90", "within",
                     "chi2_p", "ks_p", "bins", "mean rank (SE)", "median_ess", "div_per_fit"], floatfmt=".3g"),
        "",
        "`covXX`: fraction of simulations whose true value lies in the central XX % posterior interval; SE = "
        "sqrt(p(1 - p)/S) at the nominal p; `zXX` = (coverage − p)/SE; `within`: both |z| ≤ 2 (or ≤ 3). "
        "`chi2_p`: chi-square test of uniform ranks over `bins` equal bins; `ks_p`: Kolmogorov-Smirnov test of "
        "(rank + ½)/(L + 1) against U(0, 1). `mean rank`: mean of rank/L (0.5 "
        "expected, SE sqrt(1/(12 S)); above 0.5 the posterior tends to lie below the truth). `median_ess`: median "
        "bulk ESS of the draws a fit's ranks come from (thinning aims at L roughly independent ones). "
        "With several parameters and tests, a |z| between 2 and 3 somewhere is expected by chance (each is "
        "beyond 2 SE with probability ≈ 5 %).",
        "",
        f"![rank histograms](sbc{tag}.png)",
        "",
    ]
    with open(os.path.join(out, f"sbc{tag}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(df, os.path.join(out, f"sbc{tag}.png"))
    return par, runs


# ---------------------------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sims", type=int, default=200, help="simulations per model (default 200)")
    ap.add_argument("--models", default="slopes,crossed", help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--seed", type=int, default=2024, help="design, simulation and sampler seeds derive from it")
    ap.add_argument("--out", default=RESULTS, help="output directory (default benchmarks/results)")
    ap.add_argument("--quick", action="store_true", help="3 simulations, tiny runs, files sbc_quick.* (smoke test)")
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--ranks", type=int, default=99, help="L: thinned draws per fit that ranks are taken among")
    ap.add_argument("--thin", type=int, default=4, help="keep every thin-th draw for the ranks")
    ap.add_argument("--chains", type=int, default=1)
    ap.add_argument("--max-minutes", type=float, default=None, help="stop (and report) after this much time")
    ap.add_argument("--resume", action="store_true", help="continue the simulations of an existing sbc.csv")
    ap.add_argument("--report-only", action="store_true", help="rewrite sbc.md / sbc.png from sbc.csv")
    a = ap.parse_args(argv)
    if a.quick:
        a.sims, a.warmup, a.ranks, a.thin = min(a.sims, 3), 50, 9, 2
    tag = "_quick" if a.quick else ""
    os.makedirs(a.out, exist_ok=True)
    csv = os.path.join(a.out, f"sbc{tag}.csv")
    meta_path = os.path.join(a.out, f"sbc{tag}_meta.json")
    meta = dict(date=time.strftime("%Y-%m-%d"), commit=source_commit(),
                command="python -m benchmarks.sbc " + " ".join(argv if argv is not None else sys.argv[1:]))
    if a.report_only:  # the table keeps the run's own date, commit and command
        df = pd.read_csv(csv)
        if os.path.exists(meta_path):
            with open(meta_path) as f:
                meta = json.load(f)
        return df, *report(df, a.out, tag, meta)
    names = [m.strip() for m in a.models.split(",") if m.strip()]
    unknown = set(names) - set(MODELS)
    if unknown:
        ap.error(f"unknown models {sorted(unknown)}; choose from {list(MODELS)}")
    designs = [MODELS[n](a.seed) for n in names]
    old = pd.DataFrame()
    if a.resume and os.path.exists(csv):
        old = pd.read_csv(csv)
        for k in SETTINGS:
            if not (old[k] == getattr(a, k)).all():
                raise SystemExit(f"--resume: {csv} was run with other {k} ({sorted(set(old[k]))})")
    for d in designs:
        check_priors(d)
    done = {n: set(old[old["model"] == n]["sim"]) if len(old) else set() for n in names}
    rows = old.to_dict("records")
    t_start = time.perf_counter()
    stopped = False
    for s in range(a.sims):
        for d in designs:
            if s in done[d.name]:
                continue
            if a.max_minutes is not None and time.perf_counter() - t_start > 60 * a.max_minutes:
                stopped = True
                break
            new = run_one(d, s, a)
            rows += new
            print(f"{d.name} sim {s}: {new[0]['fit_s']:.1f} s (compile {new[0]['compile_s']:.1f} s), "
                  f"{new[0]['divergences']} divergences, ranks "
                  + " ".join(str(r["rank"]) for r in new), flush=True)
            pd.DataFrame(rows).to_csv(csv, index=False, float_format="%.6g")
        if stopped:
            print(f"time budget of {a.max_minutes:g} min reached ({len(rows)} rows)", flush=True)
            break
    df = pd.DataFrame(rows)
    df.to_csv(csv, index=False, float_format="%.6g")
    meta["minutes"] = (time.perf_counter() - t_start) / 60
    if len(old) and os.path.exists(meta_path):  # a resumed run: add to the earlier time, keep its first command
        with open(meta_path) as f:
            prev = json.load(f)
        meta["minutes"] += prev.get("minutes", 0.0)
        meta["command"] = prev.get("command", "") + "; then " + meta["command"]
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=1)
    par, runs = report(df, a.out, tag, meta)
    print(to_markdown(runs, list(runs.columns)))
    print(to_markdown(par, ["model", "parameter", "S", "cov50", "z50", "cov90", "z90", "within", "chi2_p",
                            "ks_p", "mean_rank", "div_per_fit"]))
    return df, par, runs


if __name__ == "__main__":
    main()
