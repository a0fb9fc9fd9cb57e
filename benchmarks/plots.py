"""Plots like the paper's: iterations/s and ESS/iteration per dataset and method; grouseticks pair plots."""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .harness import RESULTS, to_markdown  # noqa: E402


ORDER = ["none", "best single class", "all", "numpyro-c", "numpyro-nc", "bambi-numpyro", "bambi-pymc"]


def collapse_single(df: pd.DataFrame) -> pd.DataFrame:
    """Replace the marg:<class> rows of each experiment by its best one (max min ESS/s), labelled
    "best single class", so the bar plots have one fixed colour per kind of method."""
    if "min_ess_per_s" not in df:
        return df
    rows = []
    for _, d in df.groupby("experiment", sort=False):
        single = d[d.method.str.startswith("marg:")]
        rest = d[~d.method.str.startswith("marg:")]
        rows.append(rest)
        if len(single) and single["min_ess_per_s"].notna().any():
            best = single.loc[[single["min_ess_per_s"].idxmax()]].copy()
            best["method"] = "best single class"
            rows.append(best)
    return pd.concat(rows, ignore_index=True)


def _bars(ax, df, col, title, log=True):
    exps = list(dict.fromkeys(df["experiment"]))
    present = list(dict.fromkeys(df["method"]))
    methods = [m for m in ORDER if m in present] + [m for m in present if m not in ORDER]
    w = 0.8 / max(len(methods), 1)
    colors = plt.get_cmap("tab10")
    for i, m in enumerate(methods):
        vals = [df[(df.experiment == e) & (df.method == m)][col].mean() for e in exps]
        ax.bar(np.arange(len(exps)) + i * w, vals, w, label=m, color=colors(i % 10))
    ax.set_xticks(np.arange(len(exps)) + 0.4 - w / 2)
    ax.set_xticklabels(exps, rotation=45, ha="right")
    if log:
        ax.set_yscale("log")
    ax.set_title(title)


def paper_plots(df: pd.DataFrame, tag: str = "", pairs: dict | None = None):
    ok = df[df["error"].isna()] if "error" in df else df
    ok = ok[ok["min_ess_bulk"].notna()] if "min_ess_bulk" in ok else ok
    ok = collapse_single(ok)
    if len(ok):
        for col, fname, title in [("iter_per_s", "iter", "iterations / s (sampling phase)"),
                                  ("min_ess_per_iter", "ess", "min bulk ESS / iteration (global params)"),
                                  ("min_ess_per_s", "ess_per_s", "min bulk ESS / s (global params)")]:
            fig, ax = plt.subplots(figsize=(max(8, 1.2 * ok.experiment.nunique() + 4), 4.5))
            _bars(ax, ok, col, title)
            ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
            fig.tight_layout()
            fig.savefig(os.path.join(RESULTS, f"paper{tag}_{fname}.png"), dpi=110)
            plt.close(fig)
    if pairs:
        grouse_pairs(pairs, tag)


def grouse_pairs(pairs: dict, tag: str = ""):
    """σ_BROOD vs σ_LOCATION and σ vs σ_LOCATION per method, divergent transitions in red; divergence table."""
    methods = list(pairs)
    fig, axes = plt.subplots(2, len(methods), figsize=(3.0 * len(methods), 6), squeeze=False)
    rows = []
    for j, m in enumerate(methods):
        s = pairs[m]
        div = np.asarray(s.get("_diverging", np.zeros(1, bool))).reshape(-1).astype(bool)
        sb = np.asarray(s["sd_BROOD"]).reshape(-1)
        sl = np.asarray(s["sd_LOCATION"]).reshape(-1)
        sg = np.asarray(s["sigma"]).reshape(-1)
        rows.append(dict(method=m, divergences=int(div.sum()), draws=len(div)))
        for i, (x, xl) in enumerate([(sb, "sd_BROOD"), (sg, "sigma")]):
            ax = axes[i, j]
            ax.scatter(np.log(x[~div]), np.log(sl[~div]), s=2, alpha=0.3, c="k")
            ax.scatter(np.log(x[div]), np.log(sl[div]), s=6, c="r")
            ax.set_xlabel(f"log {xl}")
            ax.set_ylabel("log sd_LOCATION")
            if i == 0:
                ax.set_title(f"{m}\n{int(div.sum())} divergent", fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, f"grouseticks{tag}_pairs.png"), dpi=110)
    plt.close(fig)
    with open(os.path.join(RESULTS, f"grouseticks{tag}_divergences.md"), "w") as f:
        f.write("# grouseticks: divergent transitions after warmup (seed 0)\n\n"
                + to_markdown(pd.DataFrame(rows), ["method", "divergences", "draws"]) + "\n")
