"""Check the dense Laplace oracle (tests/glmm_reference.py) against glmer's golden values (glmer.json).

Usage (from the repository root):  .venv/bin/python -m tests.golden.check_glmer_oracle [--tol-ll 1e-6] [--tol-re 1e-5]

For every model in glmer.json this rebuilds X, Z and the group codes from the bundled CSVs, using pandas and
formulaic for X and hand-built Z columns. It then evaluates the oracle at glmer's estimates and at the two
stored extra parameter points (and at the estimates of the tolPwrss = 1e-13 refit, ``exact_fit``), and compares:
  * the Laplace log-likelihood with glmer's value with PIRLS converged to round-off (``logLik_exact``;
    relative deviation, tolerance --tol-ll) and with glmer's reported ``logLik`` (tolerance --tol-ll-glmer;
    at the default tolPwrss = 1e-7, glmer's log-determinant uses the weights of the previous PIRLS iterate,
    so its logLik is off by up to ~3e-6 relative),
  * the conditional modes u_hat with ranef(fit) (absolute deviation; at the estimates only).
It prints the max deviations and exits non-zero if a tolerance is exceeded.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
from formulaic import model_matrix

from tests.glmm_reference import laplace_reference

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent

DATA = ROOT / "lmmarg" / "datasets"


def read(path: Path, factors: list[str]) -> pd.DataFrame:
    return pd.read_csv(path, dtype={c: str for c in factors})


def load_data(key: str, rec: dict) -> pd.DataFrame:
    if key.startswith("cbpp_expanded"):
        return read(HERE / "cbpp_expanded.csv", ["herd", "period"])
    if key.startswith("cbpp"):
        df = read(DATA / "cbpp.csv", ["herd", "period"])
        df["pnum"] = df["period"].astype(float) - 2.5
        return df
    if key.startswith("grouseticks"):
        df = read(DATA / "grouseticks.csv", ["INDEX", "BROOD", "YEAR", "LOCATION"])
        d = rec["derived"]
        df["HEIGHT_c"] = (df["HEIGHT"] - d["height_mean"]) / d["height_sd"]
        # same column as R computes it
        assert abs(df["HEIGHT"].mean() - d["height_mean"]) < 1e-9
        assert abs(df["HEIGHT"].std(ddof=1) - d["height_sd"]) < 1e-9
        return df
    if key.startswith("verbagg"):
        return read(DATA / "VerbAgg.csv", ["item", "id", "btype", "situ", "mode", "Gender", "resp", "r2"])
    raise KeyError(key)


def response(rec: dict, df: pd.DataFrame):
    lhs = rec["formula"].split("~")[0].strip()
    m = re.fullmatch(r"cbind\((\w+),\s*(\w+)\s*-\s*(\w+)\)", lhs)
    if m:
        k, n = m.group(1), m.group(2)
        assert m.group(3) == k
        return df[k].to_numpy(float), df[n].to_numpy(float), "binomial"
    y = df[lhs].to_numpy(float)
    if rec["family"] == "binomial":
        assert set(np.unique(y)) <= {0.0, 1.0}
        return y, np.ones_like(y), "bernoulli"
    return y, None, rec["family"]


def fixed_design(rec: dict, df: pd.DataFrame) -> np.ndarray:
    rhs = rec["formula"].split("~")[1]
    fixed = " + ".join(t.strip() for t in re.split(r"\+(?![^(]*\))", rhs) if "|" not in t)
    mm = model_matrix(fixed, df)
    names = list(rec["beta_formulaic"])
    missing = set(names) - set(mm.columns)
    assert not missing, (missing, list(mm.columns))
    return mm[names].to_numpy(float)


def re_column(name: str, df: pd.DataFrame) -> np.ndarray:
    if name == "Intercept":
        return np.ones(len(df))
    m = re.fullmatch(r"(\w+)\[T\.(.+)\]", name)
    if m:
        return (df[m.group(1)].astype(str) == m.group(2)).to_numpy(float)
    return df[name].to_numpy(float)


def random_design(rec: dict, df: pd.DataFrame):
    Zs, codes, n_groups, levels = [], [], [], []
    for term, info in rec["terms"].items():
        fac = df[info["factor"]].astype(str)
        levs = sorted(set(fac))
        assert levs == rec["ranef"][term]["levels"], f"{term}: level order differs from R"
        assert len(levs) == info["n_levels"]
        lookup = {lv: i for i, lv in enumerate(levs)}
        codes.append(fac.map(lookup).to_numpy(np.int64))
        Zs.append(np.column_stack([re_column(c, df) for c in info["columns_formulaic"]]))
        n_groups.append(len(levs))
        levels.append(levs)
    return Zs, codes, n_groups


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=str(HERE / "glmer.json"))
    ap.add_argument("--tol-ll", type=float, default=1e-9, help="relative tolerance vs logLik_exact")
    ap.add_argument("--tol-ll-glmer", type=float, default=1e-5, help="relative tolerance vs glmer's logLik")
    ap.add_argument("--tol-re", type=float, default=1e-5, help="absolute conditional-mode tolerance")
    args = ap.parse_args(argv)
    gold = json.loads(Path(args.json).read_text())
    worst_ll, worst_llg, worst_re, ok = 0.0, 0.0, 0.0, True
    print(f"{'model':26s} {'point':20s} {'glmer exact':>17s} {'oracle':>17s} {'rel dev':>9s} "
          f"{'glmer logLik':>17s} {'rel dev':>9s} {'max|du|':>9s} it")
    for key, rec in gold.items():
        if key.startswith("_"):
            continue
        df = load_data(key, rec)
        assert len(df) == rec["n"]
        y, trials, family = response(rec, df)
        X = fixed_design(rec, df)
        Zs, codes, n_groups = random_design(rec, df)
        terms = list(rec["terms"])
        points = [dict(label="estimate", beta=rec["beta"], cov=rec["cov"], logLik=rec["logLik"],
                       logLik_exact=rec["logLik_exact"])]
        points += rec["points"]
        ex = rec["exact_fit"]
        points.append(dict(label="exact_fit", beta=ex["beta"], cov=ex["cov"], logLik=None,
                           logLik_exact=ex["logLik"]))
        for pt in points:
            beta = np.array(list(pt["beta"].values()))
            covs = [np.array(pt["cov"][t], dtype=float).reshape(len(rec["terms"][t]["columns"]), -1)
                    for t in terms]
            res = laplace_reference(X, Zs, codes, y, trials, family, rec["link"], beta, covs, n_groups)
            rel = abs(res["loglik"] - pt["logLik_exact"]) / abs(pt["logLik_exact"])
            worst_ll = max(worst_ll, rel)
            ok &= rel <= args.tol_ll
            glm, relg = "", ""
            if pt["logLik"] is not None:
                r = abs(res["loglik"] - pt["logLik"]) / abs(pt["logLik"])
                worst_llg = max(worst_llg, r)
                ok &= r <= args.tol_ll_glmer
                glm, relg = f"{pt['logLik']:17.9f}", f"{r:9.2e}"
            du = ""
            if pt["label"] == "estimate":
                dmax = 0.0
                for t, um in zip(terms, res["u_modes"]):
                    ref = np.array(rec["ranef"][t]["values"], dtype=float).reshape(um.shape)
                    dmax = max(dmax, float(np.max(np.abs(um - ref))))
                worst_re = max(worst_re, dmax)
                ok &= dmax <= args.tol_re
                du = f"{dmax:9.2e}"
            print(f"{key:26s} {pt['label']:20s} {pt['logLik_exact']:17.9f} {res['loglik']:17.9f} "
                  f"{rel:9.2e} {glm:>17s} {relg:>9s} {du:>9s} {res['n_iter']}")
    print(f"\nmax relative logLik deviation vs logLik_exact: {worst_ll:.3e} (tol {args.tol_ll:g})")
    print(f"max relative logLik deviation vs glmer's logLik: {worst_llg:.3e} (tol {args.tol_ll_glmer:g})")
    print(f"max abs conditional-mode deviation: {worst_re:.3e} (tol {args.tol_re:g})")
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
