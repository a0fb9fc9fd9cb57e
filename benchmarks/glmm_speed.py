"""GLMM speed: Laplace ML vs glmer, and NUTS efficiency (min bulk ESS per second) vs hand-written NumPyro and Bambi.

    python -m benchmarks.glmm_speed [--quick] [--parts ml,sampling] [--no-bambi] [--no-r]

(i) ML, VerbAgg `r2num ~ Anger + Gender + btype + situ + (1 | id) + (1 | item)` (bernoulli, 7584 rows):
    lmmarg `Model(...)` + `fit_ml()` timed in fresh Python processes (imports and data loading excluded):
    "cold" with the persistent JAX compilation cache off (LMMARG_JAX_CACHE=0; median of 3 processes), "cache fill"
    (a fresh, empty cache directory), "warm" (later processes on that filled cache; median of 3); vs glmer (nAGQ=1)
    with `glmerControl(optimizer = "bobyqa")` and with glmer's default control (bobyqa then Nelder-Mead), timed
    with system.time in one Rscript process (median of 3 fits each). Both logLiks reported.
(ii) sampling, 1 chain × (1000 warmup + 1000 draws), each method in its own fresh process (compilation included,
    the persistent cache off), on VerbAgg (the model above) and grouseticks
    `TICKS ~ YEAR + HEIGHT_c + (1 | BROOD) + (1 | INDEX)` (poisson, HEIGHT_c = standardized HEIGHT):
      lmmarg laplace   `model.sample()` (random effects Laplace-marginalized; approximate, see glmm_validation.md)
      lmmarg exact     `model.sample(marginalize="none", parameterization="laplace")` (exact posterior)
      numpyro-nc       hand-written NumPyro GLMM, non-centered (glmm_validation.reference_model), the harness's
                       NUTS driver (compile + warmup + sampling timed)
      bambi-<backend>  Bambi (``~/bambi-venv`` or $LMMARG_BAMBI_PYTHON; see peers_bambi.py), `noncentered=True`,
                       predictors not centred; skipped when absent
    All with lmmarg's default priors (checked equal in glmm_validation.py) and target acceptance 0.8.
    ESS = ArviZ rank-normalized bulk ESS, minimum over the global parameters (fixed effects and SDs);
    ESS/s = min ESS / wall time of the whole run (model construction, compilation, warmup, sampling, recovery).
Writes benchmarks/results/glmm_speed{_quick}.{csv,md} (and glmm_speed{_quick}_ml.csv).
lmmarg processes run with OPENBLAS_NUM_THREADS=1, as the other benchmarks.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time

import numpy as np
import pandas as pd

from .harness import RESULTS, ROOT, module_command, to_markdown

HERE = os.path.dirname(os.path.abspath(__file__))

BAMBI_PYTHON = os.environ.get("LMMARG_BAMBI_PYTHON", os.path.expanduser("~/bambi-venv/bin/python"))
VERBAGG = "r2num ~ Anger + Gender + btype + situ + (1 | id) + (1 | item)"
GROUSE = "TICKS ~ YEAR + HEIGHT_c + (1 | BROOD) + (1 | INDEX)"
DESIGNS = {"verbagg": dict(formula=VERBAGG, family="bernoulli", factors=["id", "item", "Gender", "btype", "situ"]),
           "grouseticks": dict(formula=GROUSE, family="poisson", factors=["BROOD", "INDEX", "YEAR"])}
METHODS = ["lmmarg laplace", "lmmarg exact", "numpyro-nc", "bambi-pymc", "bambi-numpyro"]

R_SCRIPT = r"""
suppressMessages(library(lme4))
args <- commandArgs(TRUE)
d <- read.csv(args[1])
reps <- as.integer(args[2])
for (v in c("id", "item", "Gender", "btype", "situ")) d[[v]] <- factor(as.character(d[[v]]))
f <- r2num ~ Anger + Gender + btype + situ + (1 | id) + (1 | item)
for (ctl in c("bobyqa", "default")) {
  control <- if (ctl == "bobyqa") glmerControl(optimizer = "bobyqa") else glmerControl()
  times <- numeric(reps)
  for (i in seq_len(reps))
    times[i] <- system.time(fit <- glmer(f, d, family = binomial, control = control))[["elapsed"]]
  vc <- as.data.frame(VarCorr(fit))
  cat(sprintf(paste0('RESULT {"control": "%s", "time_s": %.4f, "times": [%s], "logLik": %.10f, "feval": %d, ',
                     '"optimizer": "%s", "sd_id": %.8f, "sd_item": %.8f}\n'),
              ctl, median(times), paste(sprintf("%.4f", times), collapse = ", "), as.numeric(logLik(fit)),
              as.integer(sum(unlist(fit@optinfo$feval))), paste(fit@optinfo$optimizer, collapse = "+"),
              vc$sdcor[vc$grp == "id"], vc$sdcor[vc$grp == "item"]))
}
cat(sprintf('RESULT {"lme4": "%s", "R": "%s"}\n', packageVersion("lme4"), getRversion()))
"""


def source_commit() -> str:
    """The lmmarg commit benchmarked: `git describe --always --dirty` of this checkout ("-dirty": uncommitted
    changes to tracked files)."""
    try:
        return subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty", "--abbrev=10"],
                              capture_output=True, text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ---------------------------------------------------------------------------------------------- data
def design_data(name: str, quick: bool) -> pd.DataFrame:
    import lmmarg
    if name == "verbagg":
        d = lmmarg.datasets.load("VerbAgg")
        return d[d["id"].astype(int) <= 40].reset_index(drop=True) if quick else d
    d = lmmarg.datasets.load("grouseticks")
    d["HEIGHT_c"] = (d["HEIGHT"] - d["HEIGHT"].mean()) / d["HEIGHT"].std()
    return d


def read_data(path: str, factors) -> pd.DataFrame:
    return pd.read_csv(path, dtype={f: str for f in factors})


# ---------------------------------------------------------------------------------------------- workers
def worker(cfg: dict) -> dict:
    """Runs in a fresh process (python -m benchmarks.glmm_speed --worker cfg.json): one ML fit or one sampling run."""
    import jax
    jax.config.update("jax_enable_x64", True)
    import lmmarg
    spec = DESIGNS[cfg["design"]]
    data = read_data(cfg["data"], spec["factors"])
    if cfg["kind"] == "ml":
        t = time.perf_counter()
        model = lmmarg.Model(spec["formula"], data, family=spec["family"])
        fit = model.fit_ml()
        total = time.perf_counter() - t
        return dict(total_s=total, compile_s=fit.time_compile_s, optimize_s=fit.time_optimize_s, n_eval=fit.n_eval,
                    logLik=fit.loglik, converged=bool(fit.converged),
                    sd={k: float(np.ravel(v)[0]) for k, v in fit.sd.items()})
    from .harness import ess
    method = cfg["method"]
    if method.startswith("lmmarg"):
        import warnings
        kw = dict(marginalize="none", parameterization="laplace") if method == "lmmarg exact" else {}
        t = time.perf_counter()
        model = lmmarg.Model(spec["formula"], data, family=spec["family"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit = model.sample(draws=cfg["draws"], warmup=cfg["warmup"], chains=1, seed=cfg["seed"],
                               progress_bar=False, **kw)
        total = time.perf_counter() - t
        s, d = fit.samples, fit.diagnostics
        info = dict(compile_s=d["time_compile"], divergences=d["divergences"], leapfrog_per_draw=d["mean_n_steps"])
    else:
        from .glmm_validation import reference_model, reference_priors
        from .harness import run_nuts
        from .peers_numpyro import numpyro_target
        model = lmmarg.Model(spec["formula"], data, family=spec["family"])  # the design only, not timed
        t = time.perf_counter()
        tgt = numpyro_target(cfg["design"], method, reference_model(model, reference_priors(model)),
                             canon=("beta", "sd_", "u_"))
        run = run_nuts(tgt, warmup=cfg["warmup"], draws=cfg["draws"], chains=1, seed=cfg["seed"])
        s = tgt.constrain(run["z"])
        total = time.perf_counter() - t
        info = dict(compile_s=run["compile_s"], divergences=int(run["diverging"].sum()),
                    leapfrog_per_draw=float(run["num_steps"].mean()))
    glob = {f"b_{n}": np.asarray(s["beta"])[..., j] for j, n in enumerate(model.fixed_names)}
    glob.update({f"sd_{t.name}": np.asarray(s[f"sd_{t.name}"])[..., 0] for t in model.terms})
    e = {k: float(ess(v[..., None], "bulk")[0]) for k, v in glob.items()}
    worst = min(e, key=e.get)
    return dict(total_s=total, min_ess_bulk=e[worst], worst_param=worst, **info)


def spawn(cfg: dict, env_extra: dict | None = None, timeout=900) -> dict:
    """Run `worker(cfg)` in a fresh Python process; its RESULT line as a dict (or an error row)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(cfg, f)
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "LMMARG_JAX_CACHE": "0", **(env_extra or {})}
    try:
        p = subprocess.run(module_command(__spec__.name, "--worker", f.name), capture_output=True, text=True,
                           env=env, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return dict(error=f"timeout after {timeout}s")
    finally:
        os.unlink(f.name)
    out = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not out:
        return dict(error=("failed: " + p.stderr[-400:]).replace("\n", " "))
    return json.loads(out[-1][7:])


def bambi_spec(design: str, data_path: str, quick: bool) -> dict:
    """Formula, family and lmmarg's default priors in Bambi's terms (per dummy column for factors)."""
    import lmmarg
    spec = DESIGNS[design]
    model = lmmarg.Model(spec["formula"], read_data(data_path, spec["factors"]), family=spec["family"])
    pri, per_term = {}, {}
    for p in model.priors:
        if p.site == "b_Intercept":
            d = p.dist
            pri["Intercept"] = ["StudentT", {"nu": float(d.df), "mu": float(d.loc), "sigma": float(d.scale)}]
        elif p.kind == "b":
            term = p.site[2:].split("[")[0]
            per_term.setdefault(term, []).append(float(p.dist.scale))
    for term, scales in per_term.items():
        pri[term] = ["Normal", {"mu": 0.0, "sigma": scales if len(scales) > 1 else scales[0]}]
    group = {}
    for t in model.terms:
        d = model.priors[f"sd_{t.name}__Intercept"].dist.base_dist
        group[f"1|{t.group}"] = ["HalfStudentT", {"nu": float(d.df), "sigma": float(d.scale)}]
    formula = spec["formula"].replace("(1 | ", "(1|")
    return dict(formula=formula, family=spec["family"], priors=pri, group=group, factors=spec["factors"])


def run_bambi(design, backend, data_path, warmup, draws, seed, quick, timeout=900) -> dict:
    if not os.path.exists(BAMBI_PYTHON):
        return dict(error=f"skipped: no Bambi interpreter at {BAMBI_PYTHON} (see peers_bambi.py)")
    cfg = dict(bambi_spec(design, data_path, quick), data=data_path, backend=backend, seed=seed, warmup=warmup,
               draws=draws, chains=1)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(cfg, f)
    try:
        p = subprocess.run([BAMBI_PYTHON, os.path.join(HERE, "_bambi_glmm_worker.py"), f.name], capture_output=True,
                           text=True, timeout=timeout, env=dict(os.environ, OPENBLAS_NUM_THREADS="1"))
    except subprocess.TimeoutExpired:
        return dict(error=f"timeout after {timeout}s")
    finally:
        os.unlink(f.name)
    out = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not out:
        return dict(error=("bambi failed: " + p.stderr[-400:]).replace("\n", " "))
    r = json.loads(out[-1][7:])
    r.pop("globals", None)
    return r


# ---------------------------------------------------------------------------------------------- parts
def part_ml(data_path: str, quick: bool, use_r: bool) -> tuple[pd.DataFrame, list[str]]:
    reps = 1 if quick else 3
    base = dict(kind="ml", design="verbagg", data=data_path)
    rows = []
    cold = [spawn(base) for _ in range(reps)]
    rows.append(_ml_row("lmmarg fit_ml, cache off (cold)", cold))
    if not quick:
        cache = tempfile.mkdtemp(prefix="lmmarg_jax_cache_")
        try:
            rows.append(_ml_row("lmmarg fit_ml, cache fill (empty cache)", [spawn(base, {"LMMARG_JAX_CACHE": cache})]))
            rows.append(_ml_row("lmmarg fit_ml, cache warm", [spawn(base, {"LMMARG_JAX_CACHE": cache})
                                                               for _ in range(reps)]))
        finally:
            shutil.rmtree(cache, ignore_errors=True)
    notes = []
    if use_r and shutil.which("Rscript"):
        with tempfile.NamedTemporaryFile("w", suffix=".R", delete=False) as f:
            f.write(R_SCRIPT)
        p = subprocess.run(["Rscript", f.name, data_path, str(reps)], capture_output=True, text=True)
        os.unlink(f.name)
        res = [json.loads(ln[7:]) for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if p.returncode or not res:
            notes.append("glmer run failed: " + p.stderr[-300:].replace("\n", " "))
        for r in res:
            if "control" in r:
                what = ("glmerControl(optimizer = \"bobyqa\")" if r["control"] == "bobyqa"
                        else "default glmerControl() (bobyqa, then Nelder_Mead)")
                rows.append(dict(method=f"glmer, {what}", total_s=r["time_s"],
                                 runs=", ".join(f"{x:.2f}" for x in r["times"]), compile_s=0.0, n_eval=r["feval"],
                                 logLik=r["logLik"], converged=True, sd_id=r["sd_id"], sd_item=r["sd_item"]))
            else:
                notes.append(f"lme4 {r['lme4']}, R {r['R']}")
    elif use_r:
        notes.append("Rscript not found: glmer skipped")
    return pd.DataFrame(rows), notes


def _ml_row(label, res) -> dict:
    ok = [r for r in res if "error" not in r]
    if not ok:
        return dict(method=label, error=res[0]["error"])
    return dict(method=label, total_s=float(np.median([r["total_s"] for r in ok])),
                runs=", ".join(f"{r['total_s']:.2f}" for r in ok),
                compile_s=float(np.median([r["compile_s"] for r in ok])),
                optimize_s=float(np.median([r["optimize_s"] for r in ok])), n_eval=ok[0]["n_eval"],
                logLik=ok[0]["logLik"], converged=ok[0]["converged"], sd_id=ok[0]["sd"].get("id"),
                sd_item=ok[0]["sd"].get("item"))


def part_sampling(paths: dict, methods, warmup, draws, quick, seed=0) -> pd.DataFrame:
    rows = []
    for design, path in paths.items():
        for method in methods:
            t = time.perf_counter()
            if method.startswith("bambi"):
                r = run_bambi(design, method.split("-")[1], path, warmup, draws, seed, quick)
            else:
                r = spawn(dict(kind="sample", design=design, data=path, method=method, warmup=warmup, draws=draws,
                               seed=seed))
            r = dict(design=design, method=method, warmup=warmup, draws=draws, **r)
            if "error" not in r:
                r["min_ess_per_s"] = r["min_ess_bulk"] / r["total_s"]
            shown = {k: v for k, v in r.items() if k not in ("design", "method")}
            print(f"  {design:12s} {method:15s} {json.dumps(shown)} ({time.perf_counter() - t:.0f}s)", flush=True)
            rows.append(r)
    df = pd.DataFrame(rows)
    if "min_ess_per_s" in df:
        for ref in ("numpyro-nc", "bambi-pymc", "bambi-numpyro"):
            base = df[df.method == ref].set_index("design")["min_ess_per_s"] if ref in set(df.method) else None
            if base is not None and base.notna().any():
                df[f"ratio_vs_{ref}"] = df["min_ess_per_s"] / df["design"].map(base)
    return df


# ---------------------------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke (< 60 s): ML on VerbAgg ids <= 40, cold only, one glmer fit; sampling 50 + 50 "
                         "iterations on grouseticks, lmmarg laplace and numpyro-nc only")
    ap.add_argument("--parts", default="ml,sampling")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--designs", default="verbagg,grouseticks")
    ap.add_argument("--warmup", type=int, default=1000)
    ap.add_argument("--draws", type=int, default=1000)
    ap.add_argument("--no-bambi", action="store_true")
    ap.add_argument("--no-r", action="store_true")
    ap.add_argument("--report-only", action="store_true", help="rewrite the .md from the saved .csv / .json files")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print("RESULT " + json.dumps(worker(json.load(open(a.worker)))), flush=True)
        return None
    if a.quick:
        a.warmup, a.draws, a.designs, a.methods = 50, 50, "grouseticks", "lmmarg laplace,numpyro-nc"
    methods = [m for m in a.methods.split(",") if not (a.no_bambi and m.startswith("bambi"))]
    tag = "_quick" if a.quick else ""
    out = lambda ext: os.path.join(RESULTS, f"glmm_speed{tag}{ext}")
    if a.report_only:
        ml = pd.read_csv(out("_ml.csv")) if os.path.exists(out("_ml.csv")) else None
        samp = pd.read_csv(out(".csv")) if os.path.exists(out(".csv")) else None
        return report(ml, samp, json.load(open(out("_meta.json"))), tag)
    os.makedirs(RESULTS, exist_ok=True)
    import platform
    import jax
    t_all = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="glmm_speed_")
    meta = dict(warmup=a.warmup, draws=a.draws, designs={}, notes=[], commit=source_commit(),
                machine=f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), jax "
                        f"{jax.__version__}")
    ml = samp = None
    try:
        paths = {}
        for d in a.designs.split(","):
            paths[d] = os.path.join(tmp, f"{d}.csv")
            design_data(d, a.quick).to_csv(paths[d], index=False)
            meta["designs"][d] = len(pd.read_csv(paths[d]))
        if "verbagg" not in paths:
            paths_ml = os.path.join(tmp, "verbagg.csv")
            design_data("verbagg", a.quick).to_csv(paths_ml, index=False)
        else:
            paths_ml = paths["verbagg"]
        meta["ml_n"] = len(pd.read_csv(paths_ml))
        if "ml" in a.parts:
            t = time.perf_counter()
            ml, meta["notes"] = part_ml(paths_ml, a.quick, not a.no_r)
            ml.to_csv(out("_ml.csv"), index=False)
            print(ml.to_string(), flush=True)
            meta["ml_wall_s"] = time.perf_counter() - t
        if "sampling" in a.parts:
            t = time.perf_counter()
            samp = part_sampling(paths, methods, a.warmup, a.draws, a.quick)
            samp.to_csv(out(".csv"), index=False)
            meta["sampling_wall_s"] = time.perf_counter() - t
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    meta["total_s"] = time.perf_counter() - t_all
    with open(out("_meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return report(ml, samp, meta, tag)


def _pivot(samp: pd.DataFrame) -> pd.DataFrame:
    """One row per design: min ESS/s of every method and the ratios of lmmarg's to the peers', side by side."""
    ok = samp[samp["min_ess_per_s"].notna()] if "min_ess_per_s" in samp else samp.iloc[:0]
    rows = []
    for design, g in ok.groupby("design", sort=False):
        v = g.set_index("method")["min_ess_per_s"]
        row = {"design": design, **{f"{m}": v[m] for m in v.index}}
        for mine in ("lmmarg laplace", "lmmarg exact"):
            for peer in ("numpyro-nc", "bambi-pymc"):
                if mine in v and peer in v:
                    row[f"{mine.split()[1]} / {peer}"] = v[mine] / v[peer]
        rows.append(row)
    return pd.DataFrame(rows)


def findings(ml, samp) -> str:
    """A few sentences from the numbers."""
    out = []
    if ml is not None and "logLik" in ml and ml.method.str.startswith("glmer").any():
        lm = ml[ml.method.str.startswith("lmmarg")].set_index("method")
        gl = ml[ml.method.str.startswith("glmer")]
        cold = lm.loc[[m for m in lm.index if "cold" in m][0]]
        warm = [m for m in lm.index if "warm" in m]
        rel = float(np.nanmax([abs(cold[c] / g - 1) for c in ("sd_id", "sd_item") if c in gl for g in gl[c]]
                              or [np.nan]))
        times = ", ".join(f"{r.total_s:.1f} s ({r.method.replace('glmer, ', '')})" for r in gl.itertuples())
        out.append(f"ML: lmmarg's Laplace fit takes {cold.total_s:.1f} s in a fresh process without the compilation "
                   f"cache ({cold.compile_s:.1f} s of it compiling)"
                   + (f" and {lm.loc[warm[0]].total_s:.1f} s with the cache warm" if warm else "")
                   + f", against glmer's {times}; lmmarg's logLik is {cold.logLik - gl.logLik.max():+.1e} above "
                   "glmer's best" + (f", the SDs within {100 * rel:.2g}% of glmer's." if np.isfinite(rel) else "."))
    if samp is not None and "min_ess_per_s" in samp:
        piv = _pivot(samp).set_index("design")
        parts = []
        for d, r in piv.iterrows():
            bits = [f"{k} {v:.2g}×" for k, v in r.items() if " / " in k and np.isfinite(v)]
            parts.append(f"{d}: " + ", ".join(bits))
        out.append("Sampling, min bulk ESS per second of wall time (compilation included), lmmarg's ratio to each "
                   "peer — " + "; ".join(parts) + ".")
        ok = samp[samp.min_ess_per_s.notna()]
        lf = ok.groupby(ok.method.str.startswith("lmmarg laplace"))["leapfrog_per_draw"].agg(["min", "max"])
        if True in lf.index and False in lf.index:
            out.append(f"The Laplace default needs {lf.loc[True, 'min']:.1f}-{lf.loc[True, 'max']:.1f} leapfrog steps "
                       f"per draw against {lf.loc[False, 'min']:.0f}-{lf.loc[False, 'max']:.0f} for the others, at a "
                       "much higher cost per gradient (PIRLS solves).")
        exact = ok[ok.method != "lmmarg laplace"]
        for d, g in exact.groupby("design", sort=False):
            if "lmmarg exact" in set(g.method) and len(g) > 1:
                best = g.loc[g.min_ess_per_s.idxmax()]
                mine = g[g.method == "lmmarg exact"].iloc[0]
                out.append(f"Among the exact samplers on {d}, " + (
                    "lmmarg exact is the fastest." if best.method == "lmmarg exact" else
                    f"{best.method} is the fastest ({best.min_ess_per_s:.3g} vs lmmarg exact's "
                    f"{mine.min_ess_per_s:.3g} ESS/s)."))
        ndiv = int(ok.divergences.fillna(0).sum())
        out.append("No run diverged." if ndiv == 0 else f"{ndiv} divergences in all (see the table).")
    return " ".join(out)


def report(ml, samp, meta: dict, tag: str = ""):
    """glmm_speed{tag}.md from the tables and the run's metadata."""
    md = ["# GLMM speed: Laplace ML vs glmer; NUTS efficiency vs hand-written NumPyro and Bambi", "",
          findings(ml, samp), ""]
    if ml is not None:
        shown = ml.assign(logLik=[f"{v:.10g}" for v in ml.logLik]) if "logLik" in ml else ml
        md += [f"## (i) ML: `{VERBAGG}` (bernoulli, N = {meta['ml_n']})", "",
               "lmmarg: `Model(...)` + `fit_ml()` in fresh processes, imports and data loading excluded "
               "(`runs`: each process; `total_s`: median). glmer (nAGQ = 1): `system.time(glmer(...))` in one "
               "Rscript process, median of its fits (the first includes R's own warm-up).", "",
               to_markdown(shown, [c for c in ["method", "total_s", "runs", "compile_s", "optimize_s", "n_eval",
                                               "logLik", "sd_id", "sd_item", "converged", "error"] if c in ml],
                           ".4g"), ""]
        lm = ml[ml.method.str.startswith("lmmarg")]
        gl = ml[ml.method.str.startswith("glmer")]
        if len(lm) and len(gl) and "logLik" in ml:
            for ref in gl.itertuples():
                md.append(f"- logLik lmmarg − {ref.method}: {lm.logLik.iloc[0] - ref.logLik:+.2e} (positive: "
                          "lmmarg's optimum is higher)")
            for ref in gl.itertuples():
                ratios = ", ".join(f"{r.method.replace('lmmarg fit_ml, ', '')} {ref.total_s / r.total_s:.2f}"
                                   for r in lm.itertuples())
                md.append(f"- {ref.method} time / lmmarg time: {ratios}")
        md += [f"- {x}" for x in meta.get("notes", [])]
        if "ml_wall_s" in meta:
            md.append(f"- part (i) wall time {meta['ml_wall_s']:.0f} s")
        md.append("")
    if samp is not None:
        ratio_cols = [c for c in samp if c.startswith("ratio_vs_")]
        cols = ["design", "method", "total_s", "compile_s", "min_ess_bulk", "min_ess_per_s"] + ratio_cols + \
            ["divergences", "leapfrog_per_draw", "worst_param", "error"]
        piv = _pivot(samp)
        md += [f"## (ii) sampling: 1 chain × ({meta['warmup']} warmup + {meta['draws']} draws), each run in a fresh "
               "process", "",
               "Designs: " + "; ".join(f"**{d}** `{DESIGNS[d]['formula']}` ({DESIGNS[d]['family']}, N = {n})"
                                       for d, n in meta["designs"].items()) + ".", "",
               "`total_s`: wall time of the whole run (model construction, compilation — the persistent JAX "
               "cache off —, warmup, sampling, lmmarg's recovery of the random effects); `min_ess_bulk`: "
               "minimum ArviZ bulk ESS over the fixed effects and SDs; `min_ess_per_s` = min_ess_bulk / total_s; "
               "`ratio_vs_X` = min_ess_per_s / X's. lmmarg laplace samples the Laplace approximation of the "
               "posterior (its biases: glmm_validation.md); the other methods sample the exact posterior. "
               "Bambi: `center_predictors=False`, the same priors, its compiled code cached on disk by "
               "PyTensor/JAX as usual for a user (not cleared). One chain and one seed each: the ESS figures "
               "carry roughly ±20% noise.", "",
               "Min bulk ESS per second, side by side (and lmmarg's ratios to each peer):", "",
               to_markdown(piv, list(piv.columns), ".3g"), "",
               "All runs:", "",
               to_markdown(samp.assign(worst_param=samp["worst_param"].astype(str).str.replace("|", "\\|"))
                           if "worst_param" in samp else samp, [c for c in cols if c in samp], ".3g"), ""]
        if "sampling_wall_s" in meta:
            md += [f"- part (ii) wall time {meta['sampling_wall_s']:.0f} s", ""]
    md.append(f"Total runtime {meta['total_s'] / 60:.1f} min on {meta['machine']}, lmmarg processes with one "
              f"BLAS thread (OPENBLAS_NUM_THREADS=1); lmmarg commit {meta.get('commit', 'unknown')}.")
    with open(os.path.join(RESULTS, f"glmm_speed{tag}.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))
    return ml, samp


if __name__ == "__main__":
    main()
