"""Reproduce the 13 experiments of Lai, Domke & Sheldon (NeurIPS 2024) and run the peers side by side.

    python -m benchmarks.paper [--quick] [--seeds N] [--draws N] [--warmup N] [--chains N]
                               [--experiments dillonE1,InstEval] [--methods all,none,marg:subj,numpyro-nc] [--tag T]

Methods (same model, same priors, same NUTS implementation and settings):
  none             lmmarg, nothing marginalized (random effects non-centered in HMC)
  marg:<term>      lmmarg, one class marginalized (paper style), the others non-centered
  marg:<term>:c    same, the others centered (grouseticks only, as in the paper)
  all              lmmarg, every class marginalized (exact crossed elimination)
  numpyro-c/-nc    hand-written NumPyro model, centered / non-centered (peers_numpyro.py)
  bambi-numpyro, bambi-pymc   Bambi in its own virtualenv (peers_bambi.py; uncorrelated terms only)
Writes benchmarks/results/paper{tag}.csv / .md and plots (paper{tag}_iter.png, paper{tag}_ess.png,
grouseticks{tag}_pairs.png).
"""
from __future__ import annotations

import os
import time

import numpy as np
import pandas as pd

from .experiments import EXPERIMENTS, build_model
from .harness import RESULTS, benchmark, parse_args, to_markdown, versions
from .peers_numpyro import lmm_numpyro, lmmarg_target, numpyro_target


def method_names(exp, model) -> list[str]:
    names = ["none"] + [f"marg:{t.name}" for t in model.terms] + ["all", "numpyro-c", "numpyro-nc"]
    if exp.name == "grouseticks":
        names += [f"marg:{t.name}:c" for t in model.terms]
    return names + ["bambi-numpyro", "bambi-pymc"]


def make_target(exp, model, method):
    if method in ("none", "all"):
        return lmmarg_target(exp.name, method, model, method)
    if method.startswith("marg:"):
        parts = method.split(":")
        term = parts[1]
        par = "centered" if len(parts) > 2 else None
        return lmmarg_target(exp.name, method, model, [term], parameterization=par)
    if method in ("numpyro-c", "numpyro-nc"):
        return numpyro_target(exp.name, method, lmm_numpyro(model, exp.priors, centered=method == "numpyro-c"))
    raise KeyError(method)


def select(spec: str, names):
    """Methods named in spec (comma-separated; "marg" = every marg:<term>); "*" or "every" = every method.
    "all" alone is the lmmarg method "all" (every class marginalized), not every method."""
    if spec in ("*", "every"):
        return list(names)
    want = [s.strip() for s in spec.split(",") if s.strip()]
    return [n for n in names if n in want or (n.startswith("marg:") and "marg" in want)]


def main(argv=None):
    a = parse_args(argv, __doc__)
    exps = list(EXPERIMENTS) if a.experiments == "all" else a.experiments.split(",")
    if a.list:
        for e in exps:
            print(e, method_names(EXPERIMENTS[e], build_model(EXPERIMENTS[e], quick=True)))
        return
    os.makedirs(RESULTS, exist_ok=True)
    tag = a.tag or ("_quick" if a.quick else "")
    csv = os.path.join(RESULTS, f"paper{tag}.csv")
    rows, pairs = [], {}
    if os.path.exists(csv) and not a.quick:  # append: runs of different experiments share one table
        rows = pd.read_csv(csv).to_dict("records")
    for name in exps:
        exp = EXPERIMENTS[name]
        model = build_model(exp, quick=a.quick)
        methods = select(a.methods, method_names(exp, model))
        for method in methods:
            if method.startswith("bambi"):
                from .peers_bambi import run_bambi
                for seed in range(a.seeds):
                    r = run_bambi(exp, method.split("-")[1], seed=seed, warmup=a.warmup, draws=a.draws,
                                  chains=a.chains, quick=a.quick,
                                  timeout=3600 if a.max_minutes is None else 120 * a.max_minutes)
                    r.update(n_obs=model.n_obs, warmup=a.warmup, quick=a.quick)
                    rows = [x for x in rows if not (x["experiment"] == name and x["method"] == method
                                                    and x.get("seed") == seed)] + [r]
                    print(_fmt(r), flush=True)
                continue
            t0 = time.perf_counter()
            try:
                target = make_target(exp, model, method)
            except Exception as e:  # noqa: BLE001
                r = dict(experiment=name, method=method, seed=0, error=f"{type(e).__name__}: {e}"[:300])
                rows.append(r)
                print(_fmt(r), flush=True)
                continue
            build_s = time.perf_counter() - t0
            for seed in range(a.seeds):
                r, samples = benchmark(target, seed=seed, warmup=a.warmup, draws=a.draws, chains=a.chains,
                                       max_minutes=a.max_minutes, chunk=a.chunk)
                r.update(n_obs=model.n_obs, warmup=a.warmup, quick=a.quick, build_s=build_s,
                         structure=model.structure.kind if hasattr(model.structure, "kind") else "")
                rows = [x for x in rows if not (x["experiment"] == name and x["method"] == method
                                                and x.get("seed") == seed)] + [r]
                print(_fmt(r), flush=True)
                if name == "grouseticks" and seed == 0 and samples:
                    pairs[method] = samples
            pd.DataFrame(rows).to_csv(csv, index=False)
    df = pd.DataFrame(rows)
    df.to_csv(csv, index=False)
    write_markdown(df, os.path.join(RESULTS, f"paper{tag}.md"), a)
    if pairs:
        np.savez_compressed(os.path.join(RESULTS, f"grouseticks{tag}_draws.npz"),
                            **{f"{m}|{k}": v for m, s in pairs.items() for k, v in s.items()
                               if not k.startswith("u_") or k == "_diverging"})
    if not a.no_plots:
        from .plots import paper_plots
        paper_plots(df, tag, pairs)
    return df


def _fmt(r):
    if "error" in r and isinstance(r.get("error"), str):
        return f"{r['experiment']:12s} {r['method']:18s} seed {r.get('seed')}: ERROR {r['error']}"
    return (f"{r['experiment']:12s} {r['method']:18s} seed {r['seed']}: compile {r['compile_s']:.1f}s "
            f"warmup {r['warmup_s']:.1f}s sample {r['sample_s']:.1f}s it/s {r['iter_per_s']:.1f} "
            f"leapfrog/draw {r['leapfrog_per_draw']:.1f} minESS {r['min_ess_bulk']:.0f} "
            f"minESS/s {r['min_ess_per_s']:.2f} div {r['divergences']}")


COLS = ["experiment", "method", "n_seeds", "draws", "warmup", "iter_per_s", "leapfrog_per_draw", "ms_per_gradient",
        "min_ess_bulk", "min_ess_tail", "mean_ess_bulk", "min_ess_per_s", "mean_ess_per_s", "min_ess_per_s_total",
        "u_median_ess_per_s", "divergences", "compile_s", "max_rhat", "worst_param"]


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Mean over seeds per (experiment, method); errors kept as rows."""
    ok = df[df.get("error").isna()] if "error" in df else df
    num = [c for c in COLS if c in ok and c not in ("experiment", "method", "worst_param", "n_seeds")]
    g = ok.groupby(["experiment", "method"], sort=False)
    out = g[num].mean(numeric_only=True).reset_index()
    out["n_seeds"] = g.size().values
    out["worst_param"] = g["worst_param"].agg(lambda s: s.mode().iloc[0] if len(s.mode()) else "").values \
        if "worst_param" in ok else ""
    if "error" in df:
        err = df[df["error"].notna()].drop_duplicates(["experiment", "method"])
        err = err[["experiment", "method", "error"]]
        out = pd.concat([out, err], ignore_index=True)
    return out


def write_markdown(df, path, a):
    s = summarize(df)
    cols = [c for c in COLS if c in s] + (["error"] if "error" in s else [])
    v = versions()
    head = (f"# Paper reproduction (`benchmarks/paper.py`)\n\nSettings of the last invocation: warmup {a.warmup}, "
            f"draws {a.draws}, chains {a.chains}, seeds {a.seeds}, quick={a.quick}. Rows carry their own draws/"
            f"warmup. ESS = rank-normalized bulk ESS (ArviZ) over global parameters; ESS/s uses sampling time "
            f"(after warmup, excluding compile); `min_ess_per_s_total` divides by compile+warmup+sampling+"
            f"recovery. Versions: {v}\n\n")
    with open(path, "w") as f:
        f.write(head + to_markdown(s, cols) + "\n")


if __name__ == "__main__":
    main()
