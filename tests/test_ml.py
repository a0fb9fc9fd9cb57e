"""ML / REML fits against lme4 (tests/golden/lme4.json; R is never called here)."""
import json
import pathlib
import warnings

import numpy as np
import pytest


import lmmarg  # noqa: E402
from lmmarg import datasets  # noqa: E402

GOLDEN = json.loads((pathlib.Path(__file__).parent / "golden" / "lme4.json").read_text())

CASES = {
    "sleepstudy": ("Reaction ~ Days + (Days | Subject)", "sleepstudy"),
    "sleepstudy_uncorr": ("Reaction ~ Days + (Days || Subject)", "sleepstudy"),
    "penicillin": ("diameter ~ 1 + (1 | plate) + (1 | sample)", "penicillin"),
    "pastes": ("strength ~ 1 + (1 | batch/cask)", "pastes"),
    "dyestuff": ("Yield ~ 1 + (1 | Batch)", "dyestuff"),
    "grouseticks": ("logTICKS ~ YEAR + HEIGHT + (1 | BROOD) + (1 | LOCATION)", "grouseticks"),
    "pastes_cask_singular": ("strength ~ 1 + (1 | cask)", "pastes"),
}

_models: dict = {}
_fits: dict = {}


def get_fit(key: str, reml: bool):
    if key not in _models:
        f, d = CASES[key]
        _models[key] = lmmarg.Model(f, datasets.load(d))
    if (key, reml) not in _fits:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # singular-fit warning is tested separately
            _fits[key, reml] = _models[key].fit_ml(reml=reml)
    return _models[key], _fits[key, reml]


def lme4_term(golden: dict, term) -> tuple[dict, bool]:
    """The golden 'random' entry of an lmmarg term (lme4 writes nested groups reversed: cask:batch)."""
    if term.name in golden["random"]:
        return golden["random"][term.name], False
    rev = ":".join(reversed(term.name.split(":")))
    return golden["random"][rev], True


PARAMS = [(k, r) for k in CASES for r in (False, True)]


@pytest.mark.parametrize("key,reml", PARAMS)
def test_criterion_and_estimates_match_lme4(key, reml):
    model, fit = get_fit(key, reml)
    g = GOLDEN[f"{key}_{'reml' if reml else 'ml'}"]
    assert fit.converged
    if reml:
        assert fit.reml_criterion == pytest.approx(g["REMLcrit"], rel=1e-8)
    assert fit.loglik == pytest.approx(g["logLik"], rel=1e-8)
    assert fit.loglik_ml == pytest.approx(g["logLik_ML"], rel=1e-7)
    beta_ref = np.array([g["fixef_formulaic"][n] for n in model.fixed_names])
    se_ref = np.array([g["se_formulaic"][n] for n in model.fixed_names])
    np.testing.assert_allclose(fit.beta, beta_ref, rtol=1e-5, atol=1e-6 * np.abs(beta_ref).max())
    np.testing.assert_allclose(fit.se, se_ref, rtol=1e-4)
    assert fit.sigma == pytest.approx(g["sigma"], rel=1e-5)
    assert fit.is_singular == g["isSingular"]
    for t in model.terms:
        ref, reversed_names = lme4_term(g, t)
        np.testing.assert_allclose(fit.sd[t.name], ref["sd"], rtol=1e-4, atol=1e-4 * g["sigma"])
        if t.d > 1:
            np.testing.assert_allclose(fit.corr[t.name], np.array(ref["corr"]), atol=1e-4)
        labels = [":".join(reversed(lv.split(":"))) if reversed_names else lv for lv in t.levels]
        u_ref = np.array([ref["ranef"][lv] for lv in labels])
        scale = max(np.abs(u_ref).max(), g["sigma"])
        np.testing.assert_allclose(fit.ranef[t.name], u_ref, atol=1e-4 * scale)
        assert fit.ranef[t.name].shape == (t.n_groups, t.d)


def test_loglik_equals_engine_log_marginal_at_estimates():
    model, fit = get_fit("sleepstudy", False)
    assert model.log_marginal(fit.beta, fit.sigma, fit.cov) == pytest.approx(fit.loglik, rel=1e-10)
    # a perturbed point is worse (it is a maximum)
    worse = {k: v * 1.05 for k, v in fit.cov.items()}
    assert model.log_marginal(fit.beta, fit.sigma, worse) < fit.loglik
    assert model.log_marginal(fit.beta + 0.5, fit.sigma, fit.cov) < fit.loglik


def test_se_is_gls_covariance():
    model, fit = get_fit("grouseticks", True)
    X = model.design.X
    V = fit.sigma ** 2 * np.eye(model.n_obs)
    for t in model.terms:
        Zs = t.Z_sparse.toarray()
        V += Zs @ np.kron(np.eye(t.n_groups), fit.cov[t.name]) @ Zs.T
    cov = np.linalg.inv(X.T @ np.linalg.solve(V, X))
    np.testing.assert_allclose(fit.se, np.sqrt(np.diag(cov)), rtol=1e-8)
    np.testing.assert_allclose(fit.vcov, cov, rtol=1e-8, atol=1e-12)


def test_singular_fit_is_flagged_and_warns():
    model = lmmarg.Model(*[CASES["pastes_cask_singular"][0], datasets.load("pastes")])
    with pytest.warns(UserWarning, match="boundary \\(singular\\) fit"):
        fit = model.fit_ml()
    assert fit.is_singular
    assert fit.sd["cask"][0] < 1e-3
    assert "boundary (singular) fit: see help('isSingular')" in str(fit)


def test_summary_layout_reml():
    _, fit = get_fit("sleepstudy", True)
    s = fit.summary()
    assert s.startswith("Linear mixed model fit by REML ['lmerMod']")
    assert "Formula: Reaction ~ Days + (Days | Subject)" in s
    assert "REML criterion at convergence: 1743.6" in s
    assert "Scaled residuals:" in s
    lines = s.splitlines()
    head = lines[lines.index("Random effects:") + 1].split()
    assert head == ["Groups", "Name", "Variance", "Std.Dev.", "Corr"]
    subj = [ln for ln in lines if ln.startswith(" Subject")][0].split()
    assert subj[:4] == ["Subject", "(Intercept)", "612.1", "24.74"]
    days = lines[lines.index(next(ln for ln in lines if ln.startswith(" Subject"))) + 1].split()
    assert days == ["Days", "35.07", "5.922", "0.07"]
    assert any(ln.split()[:3] == ["Residual", "654.9", "25.59"] for ln in lines)
    assert "Number of obs: 180, groups:  Subject, 18" in s
    assert "Estimate Std. Error t value" in s
    inter = next(ln for ln in lines if ln.startswith("(Intercept)")).split()
    assert inter == ["(Intercept)", "251.41", "6.825", "36.84"]


def test_summary_layout_ml_crossed():
    _, fit = get_fit("pastes", False)
    s = str(fit)
    assert s.startswith("Linear mixed model fit by maximum likelihood  ['lmerMod']")
    assert "AIC" in s and "logLik" in s and "-124.0" in s
    # lme4 order: more levels first
    assert s.index(" batch:cask") < s.index(" batch ")
    assert "Number of obs: 60, groups:  batch:cask, 30; batch, 10" in s
    assert fit.aic == pytest.approx(-2 * fit.loglik + 2 * 4)  # β, 2 θ, σ (lme4: 256.0)


def test_bad_theta0_names_parameter():
    model, _ = get_fit("sleepstudy", False)
    with pytest.raises(ValueError, match="theta0"):
        model.fit_ml(theta0=[1.0, 0.0])


def test_compiled_once_per_model():
    model, fit = get_fit("dyestuff", False)
    cache = model.cache.ml
    fit2 = model.fit_ml()
    assert fit2.time_compile_s == 0.0 and model.cache.ml is cache
    assert fit2.loglik == pytest.approx(fit.loglik, rel=1e-12)


def test_lognormal_loglik_includes_jacobian():
    data = datasets.load("sleepstudy")
    m_log = lmmarg.Model("Reaction ~ Days + (Days | Subject)", data, family="lognormal")
    data = data.assign(logR=np.log(data["Reaction"]))
    m_g = lmmarg.Model("logR ~ Days + (Days | Subject)", data)
    f1, f2 = m_log.fit_ml(), m_g.fit_ml()
    np.testing.assert_allclose(f1.beta, f2.beta, rtol=1e-6)
    assert f1.loglik == pytest.approx(f2.loglik - np.log(data["Reaction"]).sum(), rel=1e-10)
