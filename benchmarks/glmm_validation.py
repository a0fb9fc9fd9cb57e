"""Posterior validation of lmmarg's GLMM sampling against an exact reference (same model, same priors).

    OPENBLAS_NUM_THREADS=1 python -m benchmarks.glmm_validation [--quick] [--designs cbpp,verbagg40,grouseticks]

Reference: a hand-written NumPyro model of the unmarginalized GLMM (every random effect sampled, non-centered,
u = sd · z with z ~ N(0, 1)), NUTS (the harness's driver) with long chains (4 × 4000 draws after 1000 warmup,
target acceptance 0.95). Its priors are written here independently of lmmarg — Intercept student_t(3, loc, 2.5)
(loc = 0 for logit, log of the mean rate for poisson), b_x normal(0, 2.5 / sd(x)) (sd with ddof = 1 over the rows
of the design), sd half-student_t(3, 0, 2.5) = |t| with t ~ Student-t(3, 0, 2.5) — and checked against
``model.priors`` (log densities equal at test points) before anything runs.

Methods, 4 chains × 2000 draws after 1000 warmup each, lmmarg's defaults otherwise (target acceptance 0.8):
  laplace   ``model.sample()``: random effects Laplace-marginalized (approximate posterior), u drawn from the
            Laplace Gaussian at the mode
  exact     ``model.sample(marginalize="none", parameterization="laplace")``: every random effect sampled in
            Laplace-centred coordinates (the exact posterior)

Designs: cbpp binomial one-class, a 40-subject subset of VerbAgg (crossed bernoulli, 960 rows, 40 × 24 groups),
grouseticks poisson with an observation-level effect ((1 | BROOD) + (1 | INDEX)).

Per global parameter: reference mean and sd; each method's mean and sd; the mean difference in units of the
combined Monte-Carlo standard error sqrt(mcse_method² + mcse_ref²) (ArviZ mcse, method "mean"), and in units of the
reference posterior sd (the bias relative to the posterior sd); the sd difference in units of its combined MCSE
(ArviZ mcse, method "sd") and as a ratio. Writes benchmarks/results/glmm_validation{_quick}.{csv,md,png}.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pandas as pd

from .harness import RESULTS, ROOT, run_nuts, to_markdown, versions
from .peers_numpyro import numpyro_target

jax.config.update("jax_enable_x64", True)


def source_commit() -> str:
    """The lmmarg commit benchmarked: `git describe --always --dirty` of this checkout ("-dirty": uncommitted
    changes to tracked files)."""
    try:
        return subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty", "--abbrev=10"],
                              capture_output=True, text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ---------------------------------------------------------------------------------------------- designs
def _cbpp():
    import lmmarg
    return lmmarg.datasets.load("cbpp")


def _verbagg40():
    """VerbAgg restricted to the subjects with id <= 40 (40 subjects × 24 items = 960 rows)."""
    import lmmarg
    d = lmmarg.datasets.load("VerbAgg")
    return d[d["id"].astype(int) <= 40].reset_index(drop=True)


def grouseticks_data():
    """grouseticks with HEIGHT_c = standardized HEIGHT (mean 0, sd 1)."""
    import lmmarg
    d = lmmarg.datasets.load("grouseticks")
    d["HEIGHT_c"] = (d["HEIGHT"] - d["HEIGHT"].mean()) / d["HEIGHT"].std()
    return d


DESIGNS = {
    "cbpp": dict(formula="cbind(incidence, size - incidence) ~ period + (1 | herd)", family="binomial",
                 data=_cbpp, text="cbpp, binomial, one class (15 herds, 56 rows)"),
    "verbagg40": dict(formula="r2num ~ Anger + Gender + btype + situ + (1 | id) + (1 | item)", family="bernoulli",
                      data=_verbagg40, text="VerbAgg ids 1-40, bernoulli, crossed (40 × 24, 960 rows)"),
    "grouseticks": dict(formula="TICKS ~ YEAR + HEIGHT_c + (1 | BROOD) + (1 | INDEX)", family="poisson",
                        data=grouseticks_data,
                        text="grouseticks, poisson, BROOD (118) + observation-level INDEX (403 rows)"),
}


def build(name, quick=False):
    import lmmarg
    spec = DESIGNS[name]
    return lmmarg.Model(spec["formula"], spec["data"](), family=spec["family"])


# ---------------------------------------------------------------------------------------------- reference
def half_student_t(df, scale):
    """|t|, t ~ Student-t(df, 0, scale): density 2 t(x) on x > 0 (brms's half-student_t)."""
    return dist.FoldedDistribution(dist.StudentT(df, 0.0, scale))


def reference_priors(model) -> dict:
    """The default priors of lmmarg's GLMM families, written from their definition (module docstring)."""
    X = np.asarray(model.design.X, float)
    y, n = np.asarray(model.y, float), np.asarray(model.trials, float)
    loc = float(np.log(y.sum() / n.sum())) if model.family == "poisson" else 0.0
    pri = {}
    for j, name in enumerate(model.fixed_names):
        pri[f"b_{name}"] = (dist.StudentT(3.0, loc, 2.5) if name == "Intercept"
                            else dist.Normal(0.0, 2.5 / np.std(X[:, j], ddof=1)))
    for t in model.terms:
        pri[f"sd_{t.name}__Intercept"] = half_student_t(3.0, 2.5)
    return pri


def check_priors(model, pri) -> None:
    """The reference priors have lmmarg's log densities (at test points); raises otherwise."""
    theirs = {p.site: p for p in model.priors}
    assert set(theirs) == set(pri), (sorted(theirs), sorted(pri))
    for site, d in pri.items():
        assert not theirs[site].is_fixed, site
        pts = np.array([0.05, 0.3, 1.0, 2.7, 9.0]) if site.startswith("sd_") else np.array([-4.0, -0.7, 0.0, 1.3, 6])
        a = np.asarray(d.log_prob(jnp.asarray(pts)))
        b = np.asarray(theirs[site].dist.log_prob(jnp.asarray(pts)))
        if not np.allclose(a, b, rtol=1e-12, atol=1e-12):
            raise AssertionError(f"prior of {site}: reference {a} vs lmmarg {b} ({theirs[site].text})")


def reference_model(model, pri):
    """The unmarginalized GLMM, non-centered: η = Xβ + Σ_terms sd_t z_t[codes_t], z ~ N(0, 1)."""
    X = jnp.asarray(model.design.X, dtype=jnp.float64)
    y = jnp.asarray(model.y, dtype=jnp.float64)
    trials = jnp.asarray(model.trials, dtype=jnp.float64)
    terms = list(model.terms)
    for t in terms:
        assert t.d == 1 and list(t.columns) == ["Intercept"], "reference handles (1 | g) terms only"
    codes = [jnp.asarray(t.codes) for t in terms]
    fam, link = model.family, model.link
    assert link in ("logit", "log"), link

    def fn():
        beta = jnp.stack([numpyro.sample(f"b_{n}", pri[f"b_{n}"]) for n in model.fixed_names])
        numpyro.deterministic("beta", beta)
        eta = X @ beta
        for t, c in zip(terms, codes):
            tau = numpyro.sample(f"tau_{t.name}", pri[f"sd_{t.name}__Intercept"])
            numpyro.deterministic(f"sd_{t.name}", tau[None])
            z = numpyro.sample(f"z_{t.name}", dist.Normal(0.0, 1.0).expand([t.n_groups]).to_event(1))
            u = numpyro.deterministic(f"u_{t.name}", (tau * z)[:, None])
            eta = eta + u[c, 0]
        if fam == "poisson":
            numpyro.sample("y", dist.Poisson(jnp.exp(eta)), obs=y)
        elif fam == "bernoulli":
            numpyro.sample("y", dist.Bernoulli(logits=eta), obs=y)
        else:
            numpyro.sample("y", dist.Binomial(total_count=trials, logits=eta), obs=y)
    return fn


def run_reference(name, model, chains, warmup, draws, seed=0):
    pri = reference_priors(model)
    check_priors(model, pri)
    tgt = numpyro_target(name, "reference", reference_model(model, pri), canon=("beta", "sd_", "u_"))
    t = time.perf_counter()
    run = run_nuts(tgt, warmup=warmup, draws=draws, chains=chains, seed=seed, target_accept=0.95)
    samples = {k: np.asarray(v) for k, v in tgt.constrain(run["z"]).items()}
    info = dict(time_s=time.perf_counter() - t, divergences=int(run["diverging"].sum()),
                leapfrog_per_draw=float(run["num_steps"].mean()))
    return samples, info


def run_lmmarg(model, method, chains, warmup, draws, seed=1):
    kw = dict(marginalize="none", parameterization="laplace") if method == "exact" else {}
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = model.sample(draws=draws, warmup=warmup, chains=chains, seed=seed, progress_bar=False, **kw)
    d = fit.diagnostics
    info = dict(time_s=time.perf_counter() - t, divergences=d["divergences"], leapfrog_per_draw=d["mean_n_steps"],
                compile_s=d["time_compile"])
    return {k: np.asarray(v) for k, v in fit.samples.items()}, info


# ---------------------------------------------------------------------------------------------- comparison
def globals_of(model, s: dict) -> dict:
    """{brms-like label: (chains, draws)} for the fixed effects and the SDs."""
    out = {f"b_{n}": s["beta"][..., j] for j, n in enumerate(model.fixed_names)}
    for t in model.terms:
        out[f"sd_{t.name}__Intercept"] = s[f"sd_{t.name}"][..., 0]
    return out


def _az(x):
    import arviz as az
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = az.convert_to_dataset({"x": np.asarray(x, float)[..., None] if x.ndim == 2 else np.asarray(x, float)})
        return dict(mcse_mean=az.mcse(ds, method="mean")["x"].values, mcse_sd=az.mcse(ds, method="sd")["x"].values,
                    ess_bulk=az.ess(ds, method="bulk")["x"].values, rhat=az.rhat(ds)["x"].values)


def stats(x):
    """mean, sd, mcse of both, bulk ESS, R-hat over (chains, draws, ...) → arrays over the trailing dims."""
    x = np.asarray(x, float)
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    a = _az(flat)
    return dict(mean=flat.mean((0, 1)), sd=flat.std((0, 1), ddof=1), **{k: np.ravel(v) for k, v in a.items()})


def compare(design, model, ref, runs) -> tuple[list, list]:
    """Per-parameter rows (one per method) and per-run rows (diagnostics, random-effect agreement)."""
    gref = globals_of(model, ref)
    rs = {k: stats(v) for k, v in gref.items()}
    rows = []
    for method, (s, _) in runs.items():
        if method == "reference":
            continue
        g = globals_of(model, s)
        for k, r in rs.items():
            m = stats(g[k])
            mc = np.hypot(m["mcse_mean"], r["mcse_mean"])[0]
            mcs = np.hypot(m["mcse_sd"], r["mcse_sd"])[0]
            rows.append(dict(design=design, parameter=k, method=method, ref_mean=r["mean"][0], ref_sd=r["sd"][0],
                             mean=m["mean"][0], sd=m["sd"][0],
                             dmean_mcse=(m["mean"][0] - r["mean"][0]) / mc,
                             dmean_sd=(m["mean"][0] - r["mean"][0]) / r["sd"][0],
                             dsd_mcse=(m["sd"][0] - r["sd"][0]) / mcs, sd_ratio=m["sd"][0] / r["sd"][0],
                             mcse_comb=mc, mcse_sd_comb=mcs, ess_bulk=m["ess_bulk"][0], ref_ess_bulk=r["ess_bulk"][0],
                             rhat=m["rhat"][0]))
    runs_rows = []
    for method, (s, info) in runs.items():
        row = dict(design=design, method=method, **info)
        g = globals_of(model, s)
        row["min_ess_bulk"] = min(float(stats(v)["ess_bulk"][0]) for v in g.values())
        row["max_rhat"] = max(float(stats(v)["rhat"][0]) for v in g.values())
        if method != "reference":
            z, ratio = [], []
            for t in model.terms:
                a, b = stats(s[f"u_{t.name}"]), stats(ref[f"u_{t.name}"])
                z.append((a["mean"] - b["mean"]) / b["sd"])
                ratio.append(a["sd"] / b["sd"])
            z, ratio = np.abs(np.concatenate(z)), np.concatenate(ratio)
            row.update(u_median_abs_dmean_sd=float(np.median(z)), u_max_abs_dmean_sd=float(z.max()),
                       u_median_sd_ratio=float(np.median(ratio)))
        runs_rows.append(row)
    return rows, runs_rows


# ---------------------------------------------------------------------------------------------- output
def plot(df: pd.DataFrame, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    designs = list(dict.fromkeys(df.design))
    methods = list(dict.fromkeys(df.method))
    colors = {"laplace": "tab:orange", "exact": "tab:blue"}
    fig, axes = plt.subplots(2, len(designs), figsize=(4.2 * len(designs) + 1, 7.5), squeeze=False)
    for j, des in enumerate(designs):
        d = df[df.design == des]
        params = list(dict.fromkeys(d.parameter))
        x = np.arange(len(params))
        for i, m in enumerate(methods):
            dm = d[d.method == m].set_index("parameter").loc[params]
            off = (i - (len(methods) - 1) / 2) * 0.25
            axes[0, j].errorbar(x + off, dm.dmean_sd, yerr=2 * dm.mcse_comb / dm.ref_sd, fmt="o", ms=4, capsize=2,
                                color=colors.get(m), label=m)
            axes[1, j].errorbar(x + off, dm.sd_ratio, yerr=2 * dm.mcse_sd_comb / dm.ref_sd, fmt="o", ms=4, capsize=2,
                                color=colors.get(m), label=m)
        axes[0, j].axhline(0, color="k", lw=0.8)
        axes[1, j].axhline(1, color="k", lw=0.8)
        axes[0, j].set_title(des)
        for ax in axes[:, j]:
            ax.set_xticks(x)
            ax.set_xticklabels(params, rotation=60, ha="right", fontsize=7)
    axes[0, 0].set_ylabel("(mean − reference mean) / reference sd\n(bars: ± 2 combined MCSE)")
    axes[1, 0].set_ylabel("sd / reference sd\n(bars: ± 2 combined MCSE of sd)")
    axes[0, -1].legend(fontsize=8)
    fig.suptitle("lmmarg GLMM posteriors vs exact NumPyro reference (non-centered, long chains)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def findings(df: pd.DataFrame, runs: pd.DataFrame) -> str:
    ex, la = df[df.method == "exact"], df[df.method == "laplace"]
    out = []
    if len(ex):
        z = np.abs(np.r_[ex.dmean_mcse, ex.dsd_mcse])
        w = ex.loc[ex.dmean_sd.abs().idxmax()]
        out.append(f"The exact option (`marginalize=\"none\", parameterization=\"laplace\"`) agrees with the reference "
                   f"within Monte-Carlo error: over {len(ex)} parameters the mean and sd differences are at most "
                   f"{z.max():.1f} combined MCSEs ({(z > 2).sum()} of {len(z)} beyond 2, {(z > 3).sum()} beyond 3), "
                   f"and the largest mean difference is {abs(w.dmean_sd):.3f} posterior sds ({w.parameter}, "
                   f"{w.design}).")
    if len(la):
        sds = la[la.parameter.str.startswith("sd_")]
        bs = la[la.parameter.str.startswith("b_")]
        w = sds.loc[sds.dmean_sd.abs().idxmax()]
        sig = sds[sds.dmean_mcse.abs() > 3]
        sign = "underestimated" if (sds.dmean_sd < 0).all() else "biased"
        out.append(f"The Laplace-marginalized default (`model.sample()`) has small but clear biases in the random-"
                   f"effect SDs: their posterior means are {sign} by {sds.dmean_sd.abs().min():.2f}-"
                   f"{sds.dmean_sd.abs().max():.2f} posterior sds ({len(sig)} of {len(sds)} beyond 3 MCSEs; largest "
                   f"{w.parameter} in {w.design}, {w.dmean_sd:+.3f} sds = {w.dmean_mcse:+.1f} MCSEs, mean "
                   f"{w['mean']:.3f} vs {w.ref_mean:.3f}), while the fixed effects are within "
                   f"{bs.dmean_sd.abs().max():.2f} posterior sds ({(bs.dmean_mcse.abs() > 3).sum()} of {len(bs)} "
                   f"beyond 3 MCSEs) and every posterior sd is within {100 * (la.sd_ratio - 1).abs().max():.0f}% of "
                   "the reference's.")
        per = ", ".join(f"{d} {g.dmean_sd.min():+.3f}" for d, g in sds.groupby("design", sort=False))
        out.append(f"Most negative SD bias (in posterior sds) per design: {per}.")
    ru = runs[runs.method == "laplace"]
    if len(ru) and "u_max_abs_dmean_sd" in ru:
        ue = runs[runs.method == "exact"]
        out.append(f"Its random effects (drawn from the Laplace Gaussian at the mode) differ from the reference by a "
                   f"median {ru.u_median_abs_dmean_sd.min():.2f}-{ru.u_median_abs_dmean_sd.max():.2f} and at most "
                   f"{ru.u_max_abs_dmean_sd.max():.2f} posterior sds per level (exact option: at most "
                   f"{ue.u_max_abs_dmean_sd.max():.2f}).")
    div = runs[runs.method != "reference"]
    if len(div) and div.divergences.sum():
        out.append("Divergences after warmup: " + ", ".join(f"{r.design}/{r.method} {r.divergences}"
                                                           for r in div.itertuples() if r.divergences) + ".")
    return " ".join(out)


COLS = ["design", "parameter", "method", "ref_mean", "ref_sd", "mean", "sd", "dmean_mcse", "dmean_sd", "dsd_mcse",
        "sd_ratio", "ess_bulk", "ref_ess_bulk"]
RUN_COLS = ["design", "method", "time_s", "compile_s", "divergences", "leapfrog_per_draw", "min_ess_bulk", "max_rhat",
            "u_median_abs_dmean_sd", "u_max_abs_dmean_sd", "u_median_sd_ratio"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="cbpp only, short chains (smoke test, < 60 s)")
    ap.add_argument("--designs", default="cbpp,verbagg40,grouseticks")
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--draws", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=1000)
    ap.add_argument("--ref-draws", type=int, default=4000)
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--report-only", action="store_true", help="rewrite the .md and .png from the saved .csv files")
    a = ap.parse_args(argv)
    if a.quick:
        a.designs, a.chains, a.draws, a.warmup, a.ref_draws = "cbpp", 2, 100, 100, 200
    tag = "_quick" if a.quick else ""
    if a.report_only:
        return report(pd.read_csv(os.path.join(RESULTS, f"glmm_validation{tag}.csv")),
                      pd.read_csv(os.path.join(RESULTS, f"glmm_validation{tag}_runs.csv")), a, tag)
    t_all = time.perf_counter()
    rows, run_rows = [], []
    for name in a.designs.split(","):
        model = build(name)
        ref = run_reference(name, model, a.chains, a.warmup, a.ref_draws)
        print(f"{name}: reference {ref[1]}", flush=True)
        runs = {"reference": ref}
        for method in ("laplace", "exact"):
            runs[method] = run_lmmarg(model, method, a.chains, a.warmup, a.draws)
            print(f"{name}: {method} {runs[method][1]}", flush=True)
        r, rr = compare(name, model, ref[0], runs)
        rows += r
        run_rows += rr
    df, runs_df = pd.DataFrame(rows), pd.DataFrame(run_rows)
    runs_df["total_runtime_s"] = time.perf_counter() - t_all
    runs_df["commit"] = source_commit()
    os.makedirs(RESULTS, exist_ok=True)
    df.to_csv(os.path.join(RESULTS, f"glmm_validation{tag}.csv"), index=False)
    runs_df.to_csv(os.path.join(RESULTS, f"glmm_validation{tag}_runs.csv"), index=False)
    return report(df, runs_df, a, tag)


def report(df, runs_df, a, tag=""):
    """glmm_validation{tag}.md (+ .png) from the two tables."""
    if not a.no_plot:
        plot(df, os.path.join(RESULTS, f"glmm_validation{tag}.png"))
    designs = list(dict.fromkeys(df.design))
    md = ["# GLMM posterior validation: lmmarg vs an exact NumPyro reference", "", findings(df, runs_df), "",
          "Designs: " + "; ".join(f"**{n}** `{DESIGNS[n]['formula']}` ({DESIGNS[n]['text']})"
                                  for n in designs) + ".", "",
          f"Reference: hand-written NumPyro GLMM, every random effect sampled (non-centered), NUTS with target "
          f"acceptance 0.95, {a.chains} chains × {a.ref_draws} draws after {a.warmup} warmup; priors written "
          "independently and checked equal to lmmarg's defaults (Intercept student_t(3, loc, 2.5), b normal(0, 2.5 / "
          "sd(x)), sd half-student_t(3, 0, 2.5)). lmmarg: `laplace` = `model.sample()` (random effects "
          "Laplace-marginalized, approximate), `exact` = `model.sample(marginalize=\"none\", parameterization="
          f"\"laplace\")`, {a.chains} chains × {a.draws} draws after {a.warmup} warmup, target acceptance 0.8. "
          "Both methods are compared with the same reference run, so their differences share its Monte-Carlo "
          "error.", "",
          "Columns: `dmean_mcse` = (mean − ref mean) / sqrt(mcse² + mcse_ref²) (ArviZ mcse of the mean); `dmean_sd` "
          "= (mean − ref mean) / ref sd (the bias relative to the posterior sd); `dsd_mcse` = (sd − ref sd) / "
          "combined ArviZ mcse of the sd; `sd_ratio` = sd / ref sd. |dmean_mcse| and |dsd_mcse| are ~N(0, 1) when "
          f"the two posteriors agree. Plot: glmm_validation{tag}.png.", "",
          to_markdown(df, COLS, ".3g"), "",
          "Runs (time_s: wall time of the whole run, compilation included; u_*: agreement of the random effects "
          "over all levels, |Δmean| / ref sd and sd ratio):", "",
          to_markdown(runs_df, [c for c in RUN_COLS if c in runs_df]), ""]
    if "total_runtime_s" in runs_df:
        md.append(f"Total runtime {runs_df.total_runtime_s.iloc[0] / 60:.1f} min. lmmarg commit "
                  f"{runs_df.get('commit', pd.Series(['unknown'])).iloc[0]}. Versions: {versions()}.")
    md.append("")
    with open(os.path.join(RESULTS, f"glmm_validation{tag}.md"), "w") as f:
        f.write("\n".join(md))
    print("\n".join(md))
    return df

if __name__ == "__main__":
    main()
