"""Collect every benchmarks/results/paper*.csv into results/summary.md, with the two target comparisons:

  dillonE1: min ESS/s (global parameters) of "all"  vs  best of {marg:<one class>, bambi-numpyro}   (target ≥ 10×)
  InstEval: min ESS/s of "all"                      vs  best of {marg:<one class>}                 (target ≥ 10×)

    python benchmarks/report.py
"""
from __future__ import annotations

import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from harness import RESULTS, to_markdown  # noqa: E402
from paper import COLS, summarize  # noqa: E402


def load() -> pd.DataFrame:
    frames = []
    for f in sorted(glob.glob(os.path.join(RESULTS, "paper*.csv"))):
        if "_quick" in f or "_rerun" in f:  # smoke runs; repeats kept for reference, not averaged in
            continue
        df = pd.read_csv(f)
        df["source"] = os.path.basename(f)
        frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


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


def main():
    df = load()
    if not len(df):
        print("no results yet")
        return
    s = summarize(df)
    cols = [c for c in COLS if c in s] + (["error"] if "error" in s else [])
    t = pd.DataFrame([target(s, "dillonE1", ("bambi-numpyro",)), target(s, "InstEval")])
    with open(os.path.join(RESULTS, "summary.md"), "w") as f:
        f.write("# Benchmark summary (all non-quick runs)\n\n## Targets (min ESS/s over global parameters)\n\n")
        f.write(to_markdown(t, list(t.columns)) + "\n\n## All runs (mean over seeds)\n\n")
        f.write(to_markdown(s, cols) + "\n")
    print(to_markdown(t, list(t.columns)))


if __name__ == "__main__":
    main()
