"""The 13 experiments of Lai, Domke & Sheldon (NeurIPS 2024): data, lme4 formula, family and priors.

Priors use lmmarg's brms-like keys ("Intercept", "b", "b_<name>", "sigma", "sd", "sd_<term>", "sd_<term>__<col>",
"cor"); a number fixes the parameter. The same dict drives lmmarg (Model(priors=...)), the hand-written NumPyro
peers (peers_numpyro.py) and Bambi (peers_bambi.py), so every method samples the same posterior.

Two experiments are not plain LMMs with one residual SD (`custom` is set; their peers are hand-written):
- stroop: distributional residual scale  log σ_n = c0 + s_subj,0 + t_n (c1 + s_subj,1)  with its own correlated
  subject effects: Model(..., sigma="~ t + (t | subj)"). The scale's subject effects are sampled by HMC.
- electric: pair intercepts a_pair ~ N(100 μ[grade(pair)], 1) and a residual SD per grade, log σ_g ~ N(0, 1).
  The mean 100 μ[grade] is a fixed per-grade intercept with prior N(0, 100) (the same law), so the model is
  y ~ 0 + grade + grade:treatment + (1 | pair), SD(pair) fixed at 1, sigma_by="grade_f" with σ_g ~ LogNormal(0,1).
  This is exactly the paper's model up to that reparameterization of the pair means.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import pandas as pd

import numpyro.distributions as dist

from .harness import read_data


@dataclass
class Experiment:
    name: str
    file: str                          # benchmarks/data/<file>, or lmmarg's bundled data set of that name
    formula: str
    family: str
    priors: dict
    prep: Optional[Callable] = None
    custom: Optional[str] = None       # "stroop" | "electric": model beyond a plain LMM (see module docstring)
    paper_name: str = ""
    notes: str = ""
    bambi_formula: Optional[str] = None  # uncorrelated version Bambi can express (None: same formula)
    extra: dict = field(default_factory=dict)

    def data(self, quick: bool = False) -> pd.DataFrame:
        df = read_data(self.file)
        if self.prep is not None:
            df = self.prep(df)
        if quick and len(df) > 3000:
            df = df.sample(n=3000, random_state=0).reset_index(drop=True)
        return df


def _cog(sd_scale, sigma_scale=5.0, a=10.0, b=5.0):
    return {"Intercept": dist.Normal(0.0, a), "b": dist.Normal(0.0, b), "sigma": dist.HalfNormal(sigma_scale),
            "sd": dist.HalfNormal(sd_scale), "cor": dist.LKJCholesky(2, 2.0)}


def _str_cols(*cols):
    def f(df):
        df = df.copy()
        for c in cols:
            df[c] = df[c].astype(str).str.strip()
        return df
    return f


def _grouse(df):
    df = _str_cols("BROOD", "LOCATION")(df)
    df["year"] = df["YEAR"].astype(float)       # the paper uses YEAR as a number (95, 96, 97)
    return df


def _electric(df):
    df = df.copy()
    df["grade_f"] = "g" + df["grade"].astype(str)
    df["pair"] = df["pair"].astype(str)
    df["treatment"] = df["treatment"].astype(float)
    return df


def _stroop(df):
    df = _str_cols("subj")(df)
    df["t"] = np.where(df["condition"] == "Incongruent", 1.0, -1.0)   # LabelEncoder·2−1 as in the paper
    return df


EXPERIMENTS = {e.name: e for e in [
    Experiment("dillonE1", "dillonE1.csv", "rt ~ int + (int | subj) + (int | item)", "lognormal", _cog(5.0),
               _str_cols("subj", "item")),
    Experiment("dutch", "dutch.csv", "NP1 ~ condition + (condition | subject) + (condition | item)", "gaussian",
               _cog(1.0), _str_cols("subject", "item")),
    Experiment("eeg", "eeg_complete.csv", "n400 ~ cloze + (cloze | subj) + (cloze | item)", "gaussian",
               _cog(20.0, sigma_scale=50.0, b=10.0), _str_cols("subj", "item")),
    Experiment("english", "english.csv", "NP1 ~ condition + (condition | subject) + (condition | item)",
               "gaussian", _cog(1.0), _str_cols("subject", "item")),
    Experiment("gg05", "gg05_rc.csv",
               "RT ~ condition + (condition | subj) + (condition | item) + (condition | experiment)", "lognormal",
               _cog(5.0), _str_cols("subj", "item", "experiment")),
    Experiment("mandarin", "gibsonwu.csv", "rt ~ type + (type | subj) + (type | item)", "lognormal", _cog(5.0),
               _str_cols("subj", "item"), paper_name="gibsonwu"),
    Experiment("mandarin2", "gibsonwu2.csv", "rt ~ condition + (condition | subj) + (condition | item)",
               "lognormal", _cog(5.0), _str_cols("subj", "item"), paper_name="gibsonwu2"),
    Experiment("pupil", "pupil_complete.csv", "p_size ~ load + (load | subj)", "gaussian",
               {"Intercept": dist.Normal(1000.0, 500.0), "b": dist.Normal(0.0, 100.0),
                "sigma": dist.HalfNormal(1000.0), "sd": dist.HalfNormal(1000.0), "cor": dist.LKJCholesky(2, 2.0)},
               _str_cols("subj")),
    Experiment("stroop", "stroop.csv", "RT ~ t + (t | subj)", "lognormal",
               {"Intercept": dist.Normal(6.0, 1.5), "b": dist.Normal(0.0, 0.01), "sd": dist.HalfNormal(1.0),
                "cor": dist.LKJCholesky(2, 2.0), "Intercept_sigma": dist.Normal(0.0, 1.0),
                "b_sigma": dist.Normal(0.0, 1.0), "sd_sigma": dist.HalfNormal(1.0),
                "cor_sigma": dist.LKJCholesky(2, 2.0)},
               _stroop, custom="stroop", extra={"sigma": "~ t + (t | subj)"},
               notes="distributional scale log σ = c0 + c1 t + (t | subj) via Model(sigma=...); the scale's "
                     "subject effects are always sampled (noncentered)."),
    Experiment("InstEval", "InstEval.csv", "y ~ service + (1 | s) + (1 | d) + (1 | dept)", "gaussian",
               {"Intercept": dist.Normal(0.0, 5.0), "b": dist.Normal(0.0, 1.0), "sigma": dist.HalfNormal(1.0),
                "sd": 1.0}, _str_cols("s", "d", "dept")),
    Experiment("grouseticks", "grouseticks.csv", "TICKS ~ year + cHEIGHT + (1 | BROOD) + (1 | LOCATION)",
               "gaussian",
               {"Intercept": dist.Normal(0.0, float(np.sqrt(2.0))), "b": dist.Normal(0.0, 1.0),
                "sigma": dist.HalfCauchy(5.0), "sd": dist.HalfCauchy(5.0)}, _grouse,
               notes="paper: two group means m_brood, m_location ~ N(0,1) (only their sum is identified); here one "
                     "Intercept ~ N(0, √2), the law of that sum."),
    Experiment("electric", "electric.csv", "y ~ 0 + grade_f + grade_f:treatment + (1 | pair)", "gaussian",
               {"b": dist.Normal(0.0, 100.0), "sd": 1.0, "sigma": dist.LogNormal(0.0, 1.0)}, _electric,
               custom="electric", extra={"sigma_by": "grade_f"},
               notes="100·μ[grade] with μ ~ N(0,1) is written as a per-grade intercept ~ N(0,100) (same law); "
                     "σ per grade via sigma_by, σ_g ~ LogNormal(0,1) ≡ log σ_g ~ N(0,1)."),
    Experiment("fibrosis", "fibrosis.csv", "FVC ~ 1 + Weeks + (1 + Weeks || Patient)", "gaussian",
               {"Intercept": dist.Normal(0.0, 500.0), "b": dist.Normal(0.0, 3.0), "sigma": dist.HalfCauchy(100.0),
                "sd_Patient__Intercept": dist.HalfCauchy(100.0), "sd_Patient__Weeks": dist.HalfCauchy(3.0)},
               _str_cols("Patient")),
]}

def build_model(exp: Experiment, quick: bool = False):
    """The lmmarg.Model of an experiment (data subsampled to 3000 rows when quick)."""
    import lmmarg
    df = exp.data(quick)
    return lmmarg.Model(exp.formula, df, family=exp.family, priors=dict(exp.priors), **exp.extra)


def resolve_prior(priors: dict, kind: str, term=None, col: str | None = None, sfx: str = ""):
    """lmmarg's precedence (most specific key first). kind: "b" | "sd" | "cor" | "sigma"; term: RandomTerm;
    sfx "sigma_" for the parameters of a distributional scale formula."""
    if kind == "b":
        if sfx:
            keys = [f"b_sigma_{col}"] + (["Intercept_sigma"] if col == "Intercept" else ["b_sigma"])
        else:
            keys = [f"b_{col}"] + (["Intercept"] if col == "Intercept" else ["b"])
    elif kind == "sd":
        keys = [f"sd_{sfx}{term.name}__{col}", f"sd_{sfx}{term.name}"]
        if term.group != term.name:
            keys += [f"sd_{sfx}{term.group}__{col}", f"sd_{sfx}{term.group}"]
        keys.append(f"sd_{sfx}".rstrip("_"))
    elif kind == "cor":
        keys = [f"cor_{sfx}{term.name}", f"cor_{sfx}".rstrip("_")]
    else:
        keys = [kind]
    for k in keys:
        if k in priors:
            return priors[k]
    if kind == "cor":
        return dist.LKJCholesky(2, 1.0)
    raise KeyError(f"no prior for {kind} {term or ''} {col or ''}: tried {keys}")
