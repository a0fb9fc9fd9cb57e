"""GLMM families (bernoulli, binomial, poisson) with Laplace-marginalized random effects.

Oracles: a dense NumPy Newton reference (tests/glmm_reference.py) on random designs, finite differences for the
implicit gradients, glmer golden values (tests/golden/glmer.json, made by make_glmer_golden.R).
"""
from __future__ import annotations

import functools
import json
import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from scipy.special import expit, ndtr

import lmmarg
from lmmarg.design import DesignError
from lmmarg.marginal import laplace

from glmm_reference import laplace_reference

GOLDEN = json.loads((pathlib.Path(__file__).parent / "golden" / "glmer.json").read_text())


def _simulate(formula_kind, family, link, N=300, Ga=15, Gb=6, seed=0, trials_max=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=N)
    a = rng.integers(0, Ga, N)
    b = rng.integers(0, Gb, N)
    eta = 0.2 + 0.5 * x + 0.7 * rng.normal(size=Ga)[a] + 0.4 * rng.normal(size=Ga)[a] * x
    if formula_kind != "one":
        eta = eta + 0.5 * rng.normal(size=Gb)[b]
    n = np.ones(N) if trials_max == 1 else rng.integers(1, trials_max + 1, N).astype(float)
    if family == "poisson":
        y = rng.poisson(np.exp(eta)).astype(float)
    else:
        p = expit(eta) if link == "logit" else ndtr(eta)
        y = rng.binomial(n.astype(int), p).astype(float)
    return pd.DataFrame(dict(y=y, n=n, x=x, a=a.astype(str), b=b.astype(str), ab=(a * 100 + b % 3).astype(str)))


CASES = [
    ("y ~ x + (1 | a)", "one", "bernoulli", "logit", 1),
    ("y ~ x + (x | a)", "one", "binomial", "probit", 5),
    ("y ~ x + (1 | a) + (1 | b)", "crossed", "poisson", "log", 1),
    ("y ~ x + (x | a) + (1 | b)", "crossed", "bernoulli", "probit", 1),
    ("y ~ x + (1 | a) + (1 | a:b)", "nested", "binomial", "logit", 4),
    ("y ~ x + (x || a) + (1 | b)", "crossed", "poisson", "log", 1),   # a's two terms share one engine unit
]


def _model(formula, kind, family, link, tmax, seed=0):
    d = _simulate(kind, family, link, seed=seed, trials_max=tmax)
    return lmmarg.Model(formula, d, family=family, link=link, trials="n" if family == "binomial" else None)


def _covs(m):
    out = {}
    for t in m.terms:
        out[t.name] = np.array([[0.6, 0.15], [0.15, 0.3]]) if t.d == 2 else np.array([[0.5]])
    return out


@pytest.mark.parametrize("formula,kind,family,link,tmax", CASES)
def test_laplace_matches_dense_oracle(formula, kind, family, link, tmax):
    m = _model(formula, kind, family, link, tmax)
    beta, cov = np.array([0.1, 0.4]), _covs(m)
    ref = laplace_reference(m.design.X, [t.Z for t in m.terms], [t.codes for t in m.terms], m.y, m.trials,
                            family, link, beta, [cov[t.name] for t in m.terms],
                            n_groups=[t.n_groups for t in m.terms])
    assert m.log_marginal(beta, None, cov) == pytest.approx(ref["loglik"], abs=1e-8, rel=1e-10)
    modes = m.ranef_mean(beta, None, cov)
    for t, u_ref in zip(m.terms, ref["u_modes"]):
        np.testing.assert_allclose(modes[t.name], u_ref, atol=1e-7)


@pytest.mark.parametrize("family,link", [("bernoulli", "logit"), ("bernoulli", "probit"), ("poisson", "log")])
def test_implicit_gradient_matches_finite_differences(family, link):
    m = _model("y ~ x + (x | a) + (1 | b)", "crossed", family, link, 1, seed=3)
    lp = m.laplace_plan()

    def f(p):
        L1 = jnp.array([[p[2], 0.0], [p[3], p[4]]])
        return laplace.log_marginal(lp, p[:2], (L1, jnp.array([[p[5]]])))

    p0 = jnp.array([0.1, 0.4, 0.7, 0.2, 0.3, 0.5])
    g = np.asarray(jax.jit(jax.grad(f))(p0))
    fj, h = jax.jit(f), 1e-6
    fd = np.array([(fj(p0.at[i].add(h)) - fj(p0.at[i].add(-h))) / (2 * h) for i in range(6)])
    np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-5)


def test_singular_covariance_and_invalid_input():
    m = _model("y ~ x + (x | a) + (1 | b)", "crossed", "bernoulli", "logit", 1)
    beta = np.array([0.1, 0.4])
    cov = {"a": np.array([[0.5, 0.0], [0.0, 0.0]]), "b": np.zeros((1, 1))}
    ref = laplace_reference(m.design.X, [t.Z for t in m.terms], [t.codes for t in m.terms], m.y, m.trials,
                            "bernoulli", "logit", beta, [cov[t.name] for t in m.terms],
                            n_groups=[t.n_groups for t in m.terms])
    assert m.log_marginal(beta, None, cov) == pytest.approx(ref["loglik"], abs=1e-8)
    assert m.log_marginal([np.nan, 0.4], None, cov) == -np.inf
    with pytest.raises(ValueError, match="no residual SD"):
        m.log_marginal(beta, 1.0, cov)


# ------------------------------------------------------------------------------------------------ glmer parity
def _golden_data(key):
    v = GOLDEN[key]
    if key == "cbpp_expanded":
        return pd.read_csv(pathlib.Path(__file__).parent / "golden" / "cbpp_expanded.csv",
                           dtype={"herd": str, "period": str})
    if key.startswith("cbpp"):
        d = lmmarg.datasets.load("cbpp")
        d["pnum"] = d["period"].astype(float) - 2.5
        return d
    if key.startswith("grouse"):
        d = lmmarg.datasets.load("grouseticks")
        dv = v["derived"]
        d["HEIGHT_c"] = (d["HEIGHT"] - dv["height_mean"]) / dv["height_sd"]
        return d
    return lmmarg.datasets.load("VerbAgg")


@functools.lru_cache(maxsize=None)
def _golden_model(key):
    """The model of a golden case, built once per process: the log-likelihood, ML and binomial-vs-bernoulli tests
    share it (they only read it)."""
    v = GOLDEN[key]
    return lmmarg.Model(v["formula"], _golden_data(key), family=v["family"], link=v["link"])


SMALL_GOLDEN = ["cbpp_binomial", "cbpp_probit", "cbpp_slope", "cbpp_expanded", "grouseticks_poisson",
                "grouseticks_poisson_olre"]


@pytest.mark.parametrize("key", SMALL_GOLDEN + ["verbagg_bernoulli"])
def test_loglik_at_glmer_estimates(key):
    """Our Laplace value at glmer's estimates and two other points equals the converged Laplace value
    (``logLik_exact``: PIRLS to 1e-13 and the determinant at the final weights, computed in R) to 1e-9 relative.
    glmer's own logLik uses the weights of the iteration before its last (tests/golden/README.md): within
    5e-6 relative of it. Conditional modes agree with ranef() to glmer's PIRLS tolerance."""
    v = GOLDEN[key]
    m = _golden_model(key)
    for p in [v] + v["points"]:
        beta = np.array([list(p["beta"].values())[i] for i in range(len(m.fixed_names))])
        cov = {t.name: np.array(p["cov"][t.name]) for t in m.terms}
        ll = m.log_marginal(beta, None, cov)
        assert ll == pytest.approx(p["logLik_exact"], rel=1e-9)
        assert ll == pytest.approx(p["logLik"], rel=5e-6)
    beta = np.array([v["beta_formulaic"][n] for n in m.fixed_names])
    modes = m.ranef_mean(beta, None, {t.name: np.array(v["cov"][t.name]) for t in m.terms})
    for t in m.terms:
        ref = v["ranef"][t.name]
        ref_u = np.asarray(ref["values"], float)
        order = [list(map(str, ref["levels"])).index(str(lev)) for lev in t.levels]
        np.testing.assert_allclose(modes[t.name], ref_u[order], atol=5e-3)


@pytest.mark.parametrize("key", SMALL_GOLDEN)
def test_fit_ml_reaches_glmer_optimum(key):
    v = GOLDEN[key]
    m = _golden_model(key)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = m.fit_ml()
    assert fit.converged
    ref = v["exact_fit"]                  # the maximizer of the converged Laplace criterion (R, glmer's devfun)
    assert fit.loglik >= ref["logLik"] - 1e-6
    assert fit.loglik >= v["logLik_exact"] - 1e-6   # at least as good as glmer's own estimates
    beta_ref = np.array([list(ref["beta"].values())[i] for i in range(len(m.fixed_names))])
    np.testing.assert_allclose(fit.beta, beta_ref, atol=2e-3)
    for t in m.terms:
        np.testing.assert_allclose(fit.cov[t.name], np.array(ref["cov"][t.name]), atol=5e-3)
    assert "Laplace Approximation" in str(fit) and "z value" in str(fit)
    modes = m.ranef_mean(fit.beta, None, fit.cov)
    for t in m.terms:
        np.testing.assert_allclose(fit.ranef[t.name], modes[t.name], atol=1e-7)


def test_binomial_equals_expanded_bernoulli():
    """cbpp as binomial counts and as one 0/1 row per animal: the same likelihood up to the binomial coefficients."""
    a, b = _golden_model("cbpp_binomial"), _golden_model("cbpp_expanded")
    beta, cov = np.array([-1.4, -1.0, -1.1, -1.6]), {"herd": np.array([[0.4]])}
    coef = GOLDEN["_binomial_coefficients"]["sum_lchoose_cbpp"]
    assert a.log_marginal(beta, None, cov) - coef == pytest.approx(b.log_marginal(beta, None, cov), abs=1e-8)


# ------------------------------------------------------------------------------------------------ entry points
@pytest.fixture(scope="module")
def crossed_fit():
    m = _model("y ~ x + (1 | a) + (1 | b)", "crossed", "bernoulli", "logit", 1, seed=5)
    return m, m.sample(draws=150, warmup=150, chains=2, progress_bar=False)


def test_sample_predict_and_arviz(crossed_fit):
    m, fit = crossed_fit
    assert set(fit.samples) >= {"beta", "sd_a", "sd_b", "u_a", "u_b"}
    assert "sigma" not in fit.samples
    assert fit.samples["u_a"].shape == (2, 150, 15, 1) and np.isfinite(fit.samples["u_a"]).all()
    assert "Laplace-marginalized" in repr(fit)
    p = fit.predict(kind="mean", draws=20)
    assert p.shape == (20, m.n_obs) and ((p > 0) & (p < 1)).all()
    yrep = fit.predict(draws=20)
    assert set(np.unique(yrep)) <= {0.0, 1.0}
    new = m.design.data.iloc[:4].copy()
    new["a"] = "unseen"
    assert fit.predict(new, kind="linpred", draws=5).shape == (5, 4)
    with pytest.raises(ValueError, match="unseen"):
        fit.predict(new, new_levels="error")
    ll = fit.log_likelihood(kind="conditional")
    assert ll.shape == (2, 150, m.n_obs) and (ll <= 0).all()
    idata = fit.to_arviz(log_likelihood="conditional")
    assert "posterior_predictive" in idata.groups()


def test_integrated_loo_by_laplace_cavity(crossed_fit):
    """The cavity approximation of log p(y_i | y_-i, θ) against the Laplace marginal with and without row i
    (dense oracle), at a few draws: both approximate the same density, to a few 1e-2 here."""
    m, fit = crossed_fit
    ll = fit.log_likelihood()            # integrated (default)
    assert ll.shape == (2, 150, m.n_obs) and np.isfinite(ll).all() and (ll < 0).all()
    s = fit.samples
    Zs, codes, G = [t.Z for t in m.terms], [t.codes for t in m.terms], [t.n_groups for t in m.terms]
    for c, k, i in [(0, 10, 3), (1, 100, 77)]:
        covs = [np.array([[s[f"sd_{t.name}"][c, k, 0] ** 2]]) for t in m.terms]
        args = ("bernoulli", "logit", s["beta"][c, k], covs)
        full = laplace_reference(m.design.X, Zs, codes, m.y, m.trials, *args, n_groups=G)["loglik"]
        keep = np.arange(m.n_obs) != i
        minus = laplace_reference(m.design.X[keep], [z[keep] for z in Zs], [q[keep] for q in codes], m.y[keep],
                                  m.trials[keep], *args, n_groups=G)["loglik"]
        assert ll[c, k, i] == pytest.approx(full - minus, abs=0.05)
    assert np.isfinite(fit.loo().elpd_loo)


def test_laplace_centred_parameterization_is_exact_model():
    """marginalize="none", parameterization="laplace": u = mode + L^{-T} ε is a reparameterization of the full
    joint, so at any ε the potential equals the noncentred joint at the same u plus the log-Jacobian."""
    m = _model("y ~ x + (1 | a)", "one", "binomial", "logit", 4, seed=2)
    pot = m.potential(marginalize="none", parameterization="laplace")
    assert "z_a" in pot.sites and "u_a" not in pot.sites
    fit = m.sample(draws=100, warmup=100, chains=1, marginalize="none", parameterization="laplace",
                   progress_bar=False)
    assert "exact posterior" in repr(fit)
    assert np.isfinite(fit.samples["u_a"]).all()
    with pytest.raises(ValueError, match="marginalize='none'"):
        m.potential(marginalize="all", parameterization="laplace")


def test_fit_map_and_vi_run():
    m = _model("y ~ x + (1 | a)", "one", "poisson", "log", 1, seed=4)
    fit = m.fit_map()
    assert np.isfinite(fit.samples["beta"]).all() and np.isfinite(fit.samples["u_a"]).all()


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_responses_name_column_and_row():
    d = pd.DataFrame(dict(y=[0, 1, 2, 0], x=[0.1, 0.2, 0.3, 0.4], g=list("aabb"), n=[3, 3, 1, 0],
                          s=[1, 2, 3, 0]))
    with pytest.raises(DesignError, match=r"'y' is 2 at row 2"):
        lmmarg.Model("y ~ x + (1 | g)", d, family="bernoulli")
    with pytest.raises(DesignError, match="non-negative integer counts.*row 1"):
        lmmarg.Model("y ~ x + (1 | g)", d.assign(y=[0, -1, 2, 0]), family="poisson")
    with pytest.raises(DesignError, match="row 1"):
        lmmarg.Model("y ~ x + (1 | g)", d.assign(y=[0, 1.5, 2, 0]), family="poisson")
    with pytest.raises(DesignError, match="exceed the trials.*row 2"):
        lmmarg.Model("s ~ x + (1 | g)", d.assign(n=[3, 3, 1, 1]), family="binomial", trials="n")
    with pytest.raises(DesignError, match="zero trials"):
        lmmarg.Model("y ~ x + (1 | g)", d.assign(y=[0, 1, 1, 0]), family="binomial", trials="n")
    with pytest.raises(DesignError, match="needs the trials"):
        lmmarg.Model("s ~ x + (1 | g)", d, family="binomial")
    with pytest.raises(DesignError, match="binomial response"):
        lmmarg.Model("cbind(s, n) ~ x + (1 | g)", d, family="poisson")
    with pytest.raises(ValueError, match="no link 'log'"):
        lmmarg.Model("y ~ x + (1 | g)", d, family="bernoulli", link="log")
    with pytest.raises(ValueError, match="residual SD"):
        lmmarg.Model("y ~ x + (1 | g)", d.assign(y=[0, 1, 1, 0]), family="bernoulli", sigma_by="g")
    with pytest.raises(ValueError, match="REML"):
        lmmarg.Model("y ~ x + (1 | g)", d.assign(y=[0, 1, 1, 0]), family="bernoulli").fit_ml(reml=True)


def test_gaussian_on_binary_or_counts_warns_about_the_family():
    d = pd.DataFrame(dict(y=[0, 1, 1, 0, 1, 0], x=np.arange(6.0), g=list("aabbcc")))
    with pytest.warns(UserWarning, match="family='bernoulli'"):
        lmmarg.Model("y ~ x + (1 | g)", d)
    with pytest.warns(UserWarning, match="family='poisson'"):
        lmmarg.Model("y ~ x + (1 | g)", d.assign(y=[0, 3, 1, 0, 5, 2]))


def test_family_strings_and_cbind_expression():
    d = lmmarg.datasets.load("cbpp")
    m = lmmarg.Model("cbind(incidence, size - incidence) ~ period + (1 | herd)", d, family="binomial(probit)")
    assert (m.family, m.link) == ("binomial", "probit")
    np.testing.assert_array_equal(m.trials, d["size"].to_numpy(float))
    m2 = lmmarg.Model("incidence ~ period + (1 | herd)", d, family="binomial", link="probit", trials="size")
    cov = {"herd": np.array([[0.3]])}
    beta = np.zeros(4)
    assert m.log_marginal(beta, None, cov) == pytest.approx(m2.log_marginal(beta, None, cov), abs=1e-10)


def test_laplace_centred_density_identities():
    """Gaussian: the Laplace-centred joint (Jacobian included, ε's N(0, I) taken out) equals the exact marginal
    log p(y | θ) at every ε (ε | y, θ is exactly standard normal). GLMM (canonical link): at ε = 0 it equals the
    Laplace approximation."""
    from lmmarg import numpyro_model as pt
    sleep = lmmarg.datasets.load("sleepstudy")
    m = lmmarg.Model("Reaction ~ Days + (Days | Subject)", sleep)
    pot = m.potential(marginalize="none", parameterization="laplace")
    beta, sigma = np.array([250.0, 10.0]), 25.0
    L = np.array([[24.0, 0.0], [1.0, 5.0]])
    t = m.terms[0]
    rng = np.random.default_rng(0)
    # jitted, as the sampler runs them: called eagerly, every primitive would be compiled on its own
    gaussian_centred = jax.jit(lambda b, s, lams, e: pt.gaussian_centred(pot.plan, b, s, lams, e, tuple(pot.parts.Z),
                                                                         tuple(pot.parts.codes)))
    for scale in (0.0, 1.0, 3.0):
        eps = (jnp.asarray(scale * rng.normal(size=(t.n_groups, 2))),)
        val, _ = gaussian_centred(jnp.asarray(beta), sigma, (jnp.asarray(L),), eps)
        assert float(val) == pytest.approx(m.log_marginal(beta, sigma, {"Subject": L @ L.T}), rel=1e-11)
    g = _model("y ~ x + (x | a) + (1 | b)", "crossed", "poisson", "log", 1, seed=7)
    cov = _covs(g)
    lams = tuple(jnp.asarray(np.linalg.cholesky(cov[t.name])) for t in g.terms)
    zeros = tuple(jnp.zeros((t.n_groups, t.d)) for t in g.terms)
    lplan = g.laplace_plan()
    val, us = jax.jit(lambda b, lam, z: laplace.laplace_centred(lplan, b, lam, z))(jnp.array([0.1, 0.4]), lams, zeros)
    assert float(val) == pytest.approx(g.log_marginal([0.1, 0.4], None, cov), rel=1e-11)
    modes = g.ranef_mean([0.1, 0.4], None, cov)
    np.testing.assert_allclose(np.asarray(us[0]), modes["a"], atol=1e-9)


def test_binomial_predict_trials_and_conditional_effects():
    d = lmmarg.datasets.load("cbpp")
    m = lmmarg.Model("cbind(incidence, size - incidence) ~ period + (1 | herd)", d, family="binomial")
    fit = m.sample(draws=50, warmup=50, chains=1, progress_bar=False)
    mean = fit.predict(kind="mean", draws=10)
    np.testing.assert_allclose(mean / d["size"].to_numpy(float), fit.predict(kind="mean", draws=10, trials=1))
    ce = fit.conditional_effects("period")
    assert ((ce["estimate"] > 0) & (ce["estimate"] < 1)).all()   # per trial: probabilities
    new = d.drop(columns=["incidence"]).iloc[:3]
    with pytest.raises(DesignError, match="cbind"):
        fit.predict(new, kind="mean")
    assert fit.predict(new, kind="mean", trials=[1, 2, 3], draws=4).shape == (4, 3)
    import pickle
    m2 = pickle.loads(pickle.dumps(m))
    cov = {"herd": np.array([[0.4]])}
    assert m2.log_marginal(np.zeros(4), None, cov) == m.log_marginal(np.zeros(4), None, cov)
