"""Peer: Bambi (PyMC or NumPyro NUTS), run as a subprocess in its own virtualenv so it cannot disturb the
system packages. Create it with

    python -m venv ~/bambi-venv && ~/bambi-venv/bin/pip install bambi numpyro jax "matplotlib<3.11"

or point LMMARG_BAMBI_PYTHON at another interpreter that has bambi. Bambi cannot express correlated random
effects (LKJ): for those experiments it fits the *uncorrelated* model (same marginal priors), flagged in `note`.
Distributional-scale models (stroop, electric) are skipped.

Timing: Bambi compiles inside fit(). After an untimed warm-up fit (imports, caches), the full fit is timed
(t_full), then a tiny fit (10 + 10 iterations, ≈ compile time t_tiny); sample_s = (t_full − t_tiny) · draws /
(warmup + draws) estimates the sampling phase (NaN when that difference is within noise), labelled in `note`.
`min_ess_per_s_total` (ESS / t_full) is the robust figure for Bambi.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import numpyro.distributions as dist

HERE = os.path.dirname(os.path.abspath(__file__))
BAMBI_PYTHON = os.environ.get("LMMARG_BAMBI_PYTHON", os.path.expanduser("~/bambi-venv/bin/python"))


def _prior_spec(d):
    """numpyro distribution / number → (bambi name, kwargs) or a float."""
    if isinstance(d, (int, float)):
        return float(d)
    if isinstance(d, dist.Normal):
        return ["Normal", {"mu": float(d.loc), "sigma": float(d.scale)}]
    if isinstance(d, dist.HalfNormal):
        return ["HalfNormal", {"sigma": float(d.scale)}]
    if isinstance(d, dist.HalfCauchy):
        return ["HalfCauchy", {"beta": float(d.scale)}]
    raise ValueError(f"no Bambi translation for prior {d}")


def bambi_spec(exp, model) -> dict:
    """Formula, Gaussian-scale response and priors of an experiment in Bambi's terms."""
    from .experiments import resolve_prior
    resp = exp.formula.split("~")[0].strip()
    rhs = exp.formula.split("~", 1)[1]
    formula = (f"log({resp}) ~{rhs}" if exp.family == "lognormal" else exp.formula).replace("||", "|")
    pri = {}
    if "Intercept" in model.fixed_names:
        pri["Intercept"] = _prior_spec(resolve_prior(exp.priors, "b", col="Intercept"))
    others = [c for c in model.fixed_names if c != "Intercept"]
    if others:
        pri["common"] = _prior_spec(resolve_prior(exp.priors, "b", col=others[0]))
    pri["sigma"] = _prior_spec(resolve_prior(exp.priors, "sigma"))
    group = {}
    for t in model.terms:
        for c in t.columns:
            expr = "1" if c == "Intercept" else c.split("[")[0]
            group[f"{expr}|{t.group}"] = _prior_spec(resolve_prior(exp.priors, "sd", t, c))
    correlated = any(t.d > 1 and t.correlated for t in model.terms)
    return dict(formula=formula, priors=pri, group=group, correlated=correlated)


def run_bambi(exp, backend: str, *, seed=0, warmup=1000, draws=2000, chains=1, quick=False, timeout=3600) -> dict:
    """One Bambi run → benchmark row (same columns as harness.metrics where they apply)."""
    row = dict(experiment=exp.name, method=f"bambi-{backend}", seed=seed)
    if not os.path.exists(BAMBI_PYTHON):
        print(f"[bambi] skipped: no interpreter at {BAMBI_PYTHON} (see peers_bambi.py)", file=sys.stderr)
        return {**row, "error": "skipped: bambi virtualenv absent"}
    if exp.custom:
        return {**row, "error": "skipped: distributional residual scale not set up for Bambi"}
    from .experiments import build_model
    model = build_model(exp, quick=quick)
    spec = bambi_spec(exp, model)
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data.csv")
        exp.data(quick).to_csv(data, index=False)
        cfg = dict(spec, data=data, backend=backend, seed=seed, warmup=warmup, draws=draws, chains=chains,
                   factors=sorted({f for t in model.terms for f in t.factors}))
        cfg_path = os.path.join(tmp, "cfg.json")
        with open(cfg_path, "w") as f:
            json.dump(cfg, f)
        try:
            p = subprocess.run([BAMBI_PYTHON, os.path.join(HERE, "_bambi_worker.py"), cfg_path],
                               capture_output=True, text=True, timeout=timeout, cwd=tmp)
        except subprocess.TimeoutExpired:
            return {**row, "error": f"timeout after {timeout}s"}
        out = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if p.returncode or not out:
            return {**row, "error": ("bambi failed: " + p.stderr[-300:]).replace("\n", " ")}
        res = json.loads(out[-1][7:])
    note = "estimated sampling time (see peers_bambi.py)"
    if spec["correlated"]:
        note += "; UNCORRELATED random effects (Bambi has no LKJ), a different model"
    return {**row, **res, "note": note}
