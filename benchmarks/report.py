"""Merge benchmark runs into one table, plots and results/summary.md with the two target comparisons:

  dillonE1: min ESS/s (global parameters) of "all"  vs  best of {marg:<one class>, bambi-numpyro}   (target ≥ 10×)
  InstEval: min ESS/s of "all"                      vs  best of {marg:<one class>}                 (target ≥ 10×)

    python -m benchmarks.report                 # new results/paper_sweep?*.csv partials over results/paper_sweep.csv
    python -m benchmarks.report --sources paper_sweepA.csv,paper_sweepB.csv,paper_sweepC.csv --tag _sweep

Later sources override earlier ones row by row (same experiment, method, seed), so a re-run of some methods can be
layered over a sweep; every row keeps the name of the file it came from in the column `source`. By default the
sources are the merged table results/paper<tag>.csv itself (its rows keep their `source`), then the partial runs
results/paper<tag>?*.csv in name order (`python -m benchmarks.paper ... --tag _sweepM` writes paper_sweepM.csv):
once merged, the partials can be deleted, and merging again changes nothing. Writes results/paper<tag>.{csv,md},
the bar plots paper<tag>_{iter,ess,ess_per_s}.png, the grouseticks pair plot (from the saved draws
grouseticks<tag>?*_draws.npz, if present) and results/summary.md.
"""
from __future__ import annotations

import argparse
import glob
import os

import numpy as np
import pandas as pd

from .harness import RESULTS, to_markdown, versions
from .paper import COLS, summarize

KEY = ["experiment", "method", "seed"]


def merge(sources: list[str]) -> pd.DataFrame:
    """Rows of all sources (CSV names in RESULTS); a later source replaces earlier rows with the same experiment,
    method and seed. `source`: the file a row came from; rows of an earlier merge keep theirs."""
    out = pd.DataFrame()
    for src in sources:
        df = pd.read_csv(os.path.join(RESULTS, src))
        df["source"] = df["source"].fillna(src) if "source" in df else src
        if len(out):
            keys = set(map(tuple, df[KEY].astype(str).values))
            out = out[[tuple(r) not in keys for r in out[KEY].astype(str).values]]
        out = pd.concat([out, df], ignore_index=True)
    return out


def target(s: pd.DataFrame, exp: str, peers_extra=()) -> dict:
    d = s[s.experiment == exp]
    if "error" in d:
        d = d[d["error"].isna()]
    allv = d[d.method == "all"]["min_ess_per_s"]
    base = d[d.method.str.startswith("marg:") | d.method.isin(peers_extra)]
    if not len(allv) or not len(base):
        return dict(experiment=exp, all_min_ess_per_s=np.nan, best_baseline="", baseline_min_ess_per_s=np.nan,
                    ratio=np.nan)
    b = base.loc[base["min_ess_per_s"].idxmax()]
    a = float(allv.iloc[0])
    return dict(experiment=exp, all_min_ess_per_s=a, best_baseline=b["method"],
                baseline_min_ess_per_s=float(b["min_ess_per_s"]), ratio=a / float(b["min_ess_per_s"]))


def best_per_experiment(s: pd.DataFrame) -> pd.DataFrame:
    """Per experiment: lmmarg `all`, the best single-class variant and the best peer, by min ESS/s."""
    ok = s[s["error"].isna()] if "error" in s else s
    rows = []
    for exp, d in ok.groupby("experiment", sort=False):
        def best(mask, d=d):
            x = d[mask]
            return (x.loc[x["min_ess_per_s"].idxmax()] if len(x) and x["min_ess_per_s"].notna().any() else None)

        a = best(d.method == "all")
        m = best(d.method.str.startswith("marg:"))
        p = best(d.method.str.startswith(("numpyro", "bambi")))
        n = best(d.method == "none")
        row = dict(experiment=exp)
        for name, r in [("all", a), ("best_single", m), ("best_peer", p), ("none", n)]:
            if name in ("best_single", "best_peer"):
                row[name] = "" if r is None else r["method"]
            row[f"{name}_ess_s"] = np.nan if r is None else r["min_ess_per_s"]
        row["all_vs_single"] = row["all_ess_s"] / row["best_single_ess_s"]
        row["all_vs_peer"] = row["all_ess_s"] / row["best_peer_ess_s"]
        rows.append(row)
    cols = ["experiment", "all_ess_s", "best_single", "best_single_ess_s", "best_peer", "best_peer_ess_s",
            "none_ess_s", "all_vs_single", "all_vs_peer"]
    return pd.DataFrame(rows)[cols]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sources", default=None,
                    help="comma-separated CSV names in results/, merged in this order (default: paper<tag>.csv, "
                         "then the partials paper<tag>?*.csv)")
    ap.add_argument("--tag", default="_sweep")
    a = ap.parse_args(argv)
    if a.sources:
        sources = a.sources.split(",")
    else:
        merged = f"paper{a.tag}.csv"
        sources = (([merged] if os.path.exists(os.path.join(RESULTS, merged)) else [])
                   + sorted(os.path.basename(f) for f in glob.glob(os.path.join(RESULTS, f"paper{a.tag}?*.csv"))))
    if not sources:
        print("no results yet")
        return
    df = merge(sources)
    sources = list(dict.fromkeys(df["source"]))   # the files the rows came from, in merge order
    df.to_csv(os.path.join(RESULTS, f"paper{a.tag}.csv"), index=False)
    s = summarize(df)
    cols = [c for c in COLS if c in s] + (["error"] if "error" in s else [])
    with open(os.path.join(RESULTS, f"paper{a.tag}.md"), "w") as f:
        f.write(f"# Paper reproduction, merged from {', '.join(sources)}\n\nESS = rank-normalized bulk ESS (ArviZ) "
                "over global parameters; ESS/s uses sampling time (after warmup, excluding compile); "
                "`min_ess_per_s_total` divides by compile+warmup+sampling+recovery. Errors: `timeout` rows ran past "
                f"the per-run budget (partial leapfrog counts and ms/gradient in the message). Versions: {versions()}"
                "\n\n" + to_markdown(s, cols) + "\n")
    t = pd.DataFrame([target(s, "dillonE1", ("bambi-numpyro",)), target(s, "InstEval")])
    b = best_per_experiment(s)
    with open(os.path.join(RESULTS, "summary.md"), "w") as f:
        f.write(f"# Benchmark summary (`python -m benchmarks.report`, sources: {', '.join(sources)})\n\n"
                "## Targets (min ESS/s over global parameters)\n\n" + to_markdown(t, list(t.columns)) +
                "\n\n## Per experiment: `all` vs the best single-class variant and the best peer (min ESS/s)\n\n"
                + to_markdown(b, list(b.columns)) + "\n")
    from .plots import grouse_pairs, paper_plots
    paper_plots(df, a.tag)
    draws = sorted(glob.glob(os.path.join(RESULTS, f"grouseticks{a.tag}?*_draws.npz")))
    if draws:
        z = np.load(draws[-1])
        pairs = {}
        for k in z.files:
            m, name = k.split("|", 1)
            pairs.setdefault(m, {})[name] = z[k]
        grouse_pairs(pairs, a.tag)
    print(to_markdown(t, list(t.columns)))
    print(to_markdown(b, list(b.columns)))


if __name__ == "__main__":
    main()
