"""fit_ml / REML never stop short of lme4's best optimum (tests/golden/lme4_optima.json, made by
tests/golden/make_lme4_optima.R with bobyqa, Nelder_Mead and nloptwrap), the returned optimum is a local minimum in
every feasible direction, and the optimum does not depend on the units or offsets of the covariates."""
import json
import pathlib
import warnings

import numpy as np
import pandas as pd
import pytest

import lmmarg
from lmmarg import datasets
from lmmarg.inference.ml import profiled_deviance

ROOT = pathlib.Path(__file__).resolve().parents[1]
OPTIMA = json.loads((ROOT / "tests" / "golden" / "lme4_optima.json").read_text())
BENCH = ROOT / "benchmarks" / "data"


def _sleep():
    d = datasets.load("sleepstudy")
    return d.assign(Days2=d["Days"] ** 2)


def _csv(name, categorical=()):
    return pd.read_csv(BENCH / name, dtype={c: str for c in categorical})


# key -> (lmmarg formula, data loader); the R formulas are in the JSON under the same key
MODELS = {
    "sleepstudy": ("Reaction ~ Days + (Days | Subject)", _sleep),
    "sleepstudy_uncorr": ("Reaction ~ Days + (Days || Subject)", _sleep),
    "sleepstudy_quad3": ("Reaction ~ Days + (Days + Days2 | Subject)", _sleep),
    "penicillin": ("diameter ~ 1 + (1 | plate) + (1 | sample)", lambda: datasets.load("penicillin")),
    "pastes": ("strength ~ 1 + (1 | batch/cask)", lambda: datasets.load("pastes")),
    "pastes_cask_singular": ("strength ~ 1 + (1 | cask)", lambda: datasets.load("pastes")),
    "dyestuff": ("Yield ~ 1 + (1 | Batch)", lambda: datasets.load("dyestuff")),
    "grouseticks": ("logTICKS ~ YEAR + HEIGHT + (1 | BROOD) + (1 | LOCATION)", lambda: datasets.load("grouseticks")),
    "grouseticks_nested": ("logTICKS ~ YEAR + HEIGHT + (1 | LOCATION/BROOD)", lambda: datasets.load("grouseticks")),
    "grouseticks_year3": ("logTICKS ~ YEAR + HEIGHT + (YEAR | LOCATION)", lambda: datasets.load("grouseticks")),
    "dillonE1": ("log(rt) ~ int + (int | subj) + (int | item)", lambda: _csv("dillonE1.csv")),
    "dutch": ("NP1 ~ condition + (condition | subject) + (condition | item)", lambda: _csv("dutch.csv")),
    "english": ("NP1 ~ condition + (condition | subject) + (condition | item)", lambda: _csv("english.csv")),
    "eeg": ("n400 ~ cloze + (cloze | subj) + (cloze | item)", lambda: _csv("eeg_complete.csv")),
    "gg05": ("log(RT) ~ condition + (condition | subj) + (condition | item) + (condition | experiment)",
             lambda: _csv("gg05_rc.csv")),
    "mandarin": ("log(rt) ~ type + (type | subj) + (type | item)", lambda: _csv("gibsonwu.csv")),
    "mandarin2": ("log(rt) ~ condition + (condition | subj) + (condition | item)", lambda: _csv("gibsonwu2.csv")),
    "pupil": ("p_size ~ load + (load | subj)", lambda: _csv("pupil_complete.csv")),
    "stroop": ("log(RT) ~ condition + (condition | subj)", lambda: _csv("stroop.csv")),
    "electric": ("y ~ 0 + C(grade):C(treatment) + (1 | pair)", lambda: _csv("electric.csv")),
    "fibrosis_uncorr": ("FVC ~ 1 + Weeks + (1 + Weeks || Patient)", lambda: _csv("fibrosis.csv")),
    "fibrosis_full": ("FVC ~ Weeks * Sex + Age + SmokingStatus + (Weeks | Patient)", lambda: _csv("fibrosis.csv")),
    "grouseticks_raw": ("TICKS ~ YEAR + HEIGHT + (1 | BROOD) + (1 | LOCATION)", lambda: datasets.load("grouseticks")),
    "insteval": ("y ~ service + (1 | s) + (1 | d) + (1 | dept)",
                 lambda: _csv("InstEval.csv", ("s", "d", "dept", "service", "studage", "lectage"))),
}
CASES = sorted(k for k in OPTIMA if not k.startswith("_"))
# gg05: experiment coincides with condition (tedrg2 = subjgap, tedrg3 = objgap), so under REML the fixed effects absorb
# (condition | experiment) and the criterion is flat in its θ: lme4 stops anywhere there; lmmarg reaches the optimum
# value and says the parameters are not identified instead of claiming convergence.
NOT_IDENTIFIED = {"gg05_reml": "experiment"}
_models: dict = {}


def model_for(key: str):
    name = OPTIMA[key]["model"]
    if name not in _models:
        f, load = MODELS[name]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # raw TICKS: the count-response-as-gaussian warning (lme4's model)
            _models[name] = lmmarg.Model(f, load())
    return _models[name]


def test_every_golden_model_is_covered():
    assert {OPTIMA[k]["model"] for k in CASES} == set(MODELS)


@pytest.mark.parametrize("key", CASES)
def test_reaches_lme4_best_optimum(key):
    g = OPTIMA[key]
    model = model_for(key)
    assert model.n_obs == g["nobs"]
    reml, best = bool(g["REML"]), g["best_criterion"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # singular fits warn; tested elsewhere
        fit = model.fit_ml(reml=reml)
    ours = fit.reml_criterion if reml else -2 * (fit.loglik - model.log_jacobian)
    # lmmarg reaches lme4's best optimizer's criterion or a better one (1e-6 relative, the issue's target)
    assert ours <= best + 1e-6 * abs(best), (key, ours, best, g["criterion"])
    if key in NOT_IDENTIFIED:
        assert not fit.converged
        assert any("not uniquely determined" in m and NOT_IDENTIFIED[key] in m for m in fit.checks.messages)
    else:
        assert fit.converged, (key, fit.checks)


def _feasible_directions(theta, lower, rng, n=12):
    """Random unit directions that keep θ's diagonals ≥ 0 for small steps (inward at the boundary)."""
    out = []
    at_bound = (lower == 0) & (theta <= 1e-8)
    for _ in range(n):
        d = rng.standard_normal(theta.size)
        d[at_bound] = np.abs(d[at_bound])
        out.append(d / np.linalg.norm(d))
    for k in np.flatnonzero(lower == 0):                       # each diagonal alone, both ways where feasible
        e = np.zeros(theta.size)
        e[k] = 1.0
        out.append(e)
        if not at_bound[k]:
            out.append(-e)
    return out


def _simulate(rng, n_groups=30, n_per=8, sd_slope=0.0, corr=0.0, crossed=True):
    """y = 1 + 0.5 x + (1 + x | g) [+ (1 | h)] + ε with a near-singular truth (slope SD 0 or |corr| = 1)."""
    g = np.repeat(np.arange(n_groups), n_per)
    x = rng.normal(size=g.size) * 3 + 10        # uncentred, unit-full covariate
    S = np.array([[1.0, corr * sd_slope], [corr * sd_slope, sd_slope ** 2]])
    w, V = np.linalg.eigh(S)
    b = rng.standard_normal((n_groups, 2)) @ (V * np.sqrt(np.clip(w, 0, None))).T
    y = 1 + 0.5 * x + b[g, 0] + b[g, 1] * x + rng.standard_normal(g.size)
    df = pd.DataFrame({"y": y, "x": x, "g": g.astype(str)})
    if crossed:
        h = rng.integers(0, 6, g.size)
        df["h"] = h.astype(str)
        df["y"] += 0.3 * rng.standard_normal(6)[h]
    return df


@pytest.mark.parametrize("seed,sd_slope,corr,reml", [(0, 0.0, 0.0, False), (1, 0.3, 1.0, False),
                                                      (2, 0.0, 0.0, True), (3, 0.2, -1.0, True)])
def test_no_feasible_direction_lowers_the_profiled_criterion(seed, sd_slope, corr, reml):
    rng = np.random.default_rng(seed)
    df = _simulate(rng, sd_slope=sd_slope, corr=corr)
    model = lmmarg.Model("y ~ x + (x | g) + (1 | h)", df)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = model.fit_ml(reml=reml)
    theta = fit.theta
    lower = fit.theta_lower
    f0 = profiled_deviance(model, theta, reml=reml)
    crit = fit.reml_criterion if reml else fit.deviance
    assert f0 == pytest.approx(crit, rel=1e-10)
    for d in _feasible_directions(theta, lower, rng):
        for eps in (1e-4, 1e-3, 1e-2):
            f = profiled_deviance(model, theta + eps * d, reml=reml)
            assert f >= f0 - 1e-7 * abs(f0), (d, eps, f - f0)


@pytest.mark.parametrize("transform", ["scale_up", "scale_down", "shift"])
def test_optimum_is_equivariant_to_covariate_units(transform):
    """Days·100, Days·1e-3 and Days + 1e4 are reparameterizations of (Days | Subject): same logLik, β and
    covariances transformed exactly as the units (issue: units must not change the answer)."""
    base = datasets.load("sleepstudy")
    ref = lmmarg.Model("Reaction ~ Days + (Days | Subject)", base).fit_ml()
    a, b = {"scale_up": (100.0, 0.0), "scale_down": (1e-3, 0.0), "shift": (1.0, 1e4)}[transform]
    d = base.assign(Days=base["Days"] * a + b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # Days + 1e4: |corr| ≈ 1 in these units, so θ₂₂ < 1e-4 (lme4's "singular")
        fit = lmmarg.Model("Reaction ~ Days + (Days | Subject)", d).fit_ml()
    assert fit.converged
    assert fit.loglik == pytest.approx(ref.loglik, rel=1e-9)
    assert fit.sigma == pytest.approx(ref.sigma, rel=1e-6)
    # Days_new = a·Days + b  ⇒  slope_new = slope / a, intercept_new = intercept - b·slope / a
    np.testing.assert_allclose(fit.beta[1], ref.beta[1] / a, rtol=1e-6)
    np.testing.assert_allclose(fit.beta[0], ref.beta[0] - b * ref.beta[1] / a, rtol=1e-6)
    T = np.array([[1.0, -b / a], [0.0, 1.0 / a]])             # u_new = T u
    np.testing.assert_allclose(fit.cov["Subject"], T @ ref.cov["Subject"] @ T.T,
                               rtol=1e-5, atol=1e-6 * np.abs(T @ ref.cov["Subject"] @ T.T).max())


def test_theta0_is_honoured_and_converted():
    """A user start in lme4's θ reaches the same optimum; θ reported with non-negative diagonals."""
    model = model_for("sleepstudy_ml")
    fit = model.fit_ml(theta0=[0.1, 0.0, 0.3])
    ref = model.fit_ml()
    assert fit.loglik == pytest.approx(ref.loglik, rel=1e-10)
    assert fit.theta[0] >= 0 and fit.theta[2] >= 0
    with pytest.raises(ValueError, match="finite"):
        model.fit_ml(theta0=[np.nan, 0.0, 1.0])


def test_failed_check_reports_not_converged():
    """An optimizer stopped after 1 iteration must not claim convergence, and says which check failed."""
    model = model_for("eeg_ml")
    with pytest.warns(UserWarning, match="failed to converge") as rec:
        fit = model.fit_ml(maxiter=1)
    assert not fit.converged
    assert fit.checks.messages
    assert "Model failed to converge" in str(fit)
    assert any(r.filename == __file__ for r in rec), [r.filename for r in rec]   # points at the user's line


def test_constant_response_is_refused():
    d = datasets.load("sleepstudy").assign(Reaction=3.0)
    with pytest.raises(ValueError, match="'Reaction' is constant"):
        lmmarg.Model("Reaction ~ Days + (Days | Subject)", d).fit_ml()


@pytest.mark.parametrize("scale,shift", [(1e-9, 0.0), (1e9, 0.0), (1.0, 1e4)])
def test_ml_is_equivariant_to_response_units(scale, shift):
    """y·a + b: β scales (intercept shifts), σ and SDs scale, correlations and θ unchanged, logLik moves by -N log a."""
    base = datasets.load("sleepstudy")
    ref = lmmarg.Model("Reaction ~ Days + (Days | Subject)", base).fit_ml()
    data = base.assign(Reaction=base.Reaction * scale + shift)
    fit = lmmarg.Model("Reaction ~ Days + (Days | Subject)", data).fit_ml()
    assert fit.converged
    np.testing.assert_allclose(fit.theta, ref.theta, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(fit.beta, ref.beta * scale + np.array([shift, 0.0]), rtol=1e-7)
    assert fit.sigma == pytest.approx(ref.sigma * scale, rel=1e-7)
    np.testing.assert_allclose(fit.sd["Subject"], ref.sd["Subject"] * scale, rtol=1e-5)
    assert fit.loglik == pytest.approx(ref.loglik - len(base) * np.log(scale), rel=1e-10)


def test_offset_enters_fitted_values():
    """offset(k) shifts the response's known part: β̂ and σ̂ as for y - k, fitted values include the offset."""
    base = datasets.load("sleepstudy")
    k = np.linspace(0.0, 30.0, len(base))
    fit = lmmarg.Model("Reaction ~ Days + offset(k) + (Days | Subject)", base.assign(k=k)).fit_ml()
    ref = lmmarg.Model("Reaction ~ Days + (Days | Subject)", base.assign(Reaction=base.Reaction - k)).fit_ml()
    np.testing.assert_allclose(fit.beta, ref.beta, rtol=1e-8)
    np.testing.assert_allclose(fit.fitted(), ref.fitted() + k, rtol=1e-8)
    np.testing.assert_allclose(fit.residuals(), ref.residuals(), rtol=1e-6, atol=1e-8)
