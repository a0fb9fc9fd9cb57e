"""The GLMM families with a dispersion parameter: negbinomial (NB2), gamma (log link) and beta (logit link).

Checked against independent references: scipy.stats' densities, automatic derivatives of the log density,
a per-group Laplace approximation computed with scipy (and brute-force quadrature of the exact integral), and
glmmTMB's Laplace fits (tests/golden/glmmtmb.json, written by tests/golden/make_glmmtmb_golden.R on
tests/golden/families.csv).
"""
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
import scipy.integrate
import scipy.optimize
import scipy.stats

import lmmarg
from lmmarg import families
from lmmarg.design import DesignError
from lmmarg.marginal import laplace

GOLDEN = Path(__file__).parent / "golden"
FAMILIES = ("negbinomial", "gamma", "beta")


@pytest.fixture(scope="module")
def golden():
    return json.loads((GOLDEN / "glmmtmb.json").read_text())


@pytest.fixture(scope="module")
def data():
    return pd.read_csv(GOLDEN / "families.csv")


@pytest.fixture(scope="module")
def models(golden, data):
    """{family: the Model of glmmtmb.json's formula on families.csv}, shared so its kernels compile once."""
    return {fam: lmmarg.Model(golden[fam]["formula"], data, family=fam) for fam in FAMILIES}


def _scipy_logpdf(fam: str, y, mu, k):
    """log p(y | μ, dispersion) from scipy.stats, in each family's parameterization."""
    if fam == "negbinomial":
        return scipy.stats.nbinom.logpmf(y, k, k / (k + mu))
    if fam == "gamma":
        return scipy.stats.gamma.logpdf(y, a=k, scale=mu / k)
    return scipy.stats.beta.logpdf(y, mu * k, (1 - mu) * k)


def _sample_y(fam: str, rng, mu, k):
    if fam == "negbinomial":
        return rng.negative_binomial(k, k / (k + mu)).astype(float)
    if fam == "gamma":
        return rng.gamma(k, mu / k)
    return np.clip(rng.beta(mu * k, (1 - mu) * k), 1e-6, 1 - 1e-6)


@pytest.mark.parametrize("fam", FAMILIES)
def test_log_density_matches_scipy(fam):
    rng = np.random.default_rng(0)
    spec = lmmarg.families.resolve_family(fam)
    eta = rng.normal(0.3, 1.0, 200)
    mu = families.mean(spec, eta)
    for k in (0.7, 3.0, 40.0):
        y = _sample_y(fam, rng, mu, k)
        ours = families.pointwise_log_lik(spec, y, np.ones_like(y), eta, k)
        np.testing.assert_allclose(ours, _scipy_logpdf(fam, y, mu, k), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("fam", FAMILIES)
def test_score_and_observed_weight_are_derivatives(fam):
    """s = ∂ log p / ∂η and the observed W = −∂² log p / ∂η² (the Newton and Laplace weights) by autodiff."""
    rng = np.random.default_rng(1)
    spec = families.resolve_family(fam)
    eta = jnp.asarray(rng.normal(0.0, 0.8, 30))
    k = 2.5
    y = jnp.asarray(_sample_y(fam, rng, np.asarray(families.mean(spec, eta)), k))
    one = jnp.ones_like(y)
    f = lambda e, yi: families.log_lik(spec, yi, 1.0, e, k)  # noqa: E731
    s, w = families.score_weight(spec, y, one, eta, observed=True, disp=k)
    np.testing.assert_allclose(s, jax.vmap(jax.grad(f))(eta, y), rtol=1e-9, atol=1e-12)
    hess = -jax.vmap(jax.grad(jax.grad(f)))(eta, y)
    np.testing.assert_allclose(w, jnp.maximum(hess, families.MIN_WEIGHT), rtol=1e-8, atol=1e-12)


def _laplace_by_groups(fam, y, eta0, codes, sd, k):
    """Σ_g [f_g(v̂) − ½ log(−f_g''(v̂))], f_g(v) = Σ_{i in g} log p(y_i | η0_i + sd v) − v²/2 (scipy densities and
    optimizer, finite-difference curvature), and the exact Σ_g log ∫ exp(f_g) / sqrt(2π) by quadrature."""
    spec = families.resolve_family(fam)
    lap = exact = 0.0
    for g in np.unique(codes):
        yi, ei = y[codes == g], eta0[codes == g]

        def f(v, yi=yi, ei=ei):
            return float(np.sum(_scipy_logpdf(fam, yi, families.mean(spec, ei + sd * v), k))) - 0.5 * v * v

        v = scipy.optimize.minimize_scalar(lambda t: -f(t), bounds=(-8, 8), method="bounded",
                                           options=dict(xatol=1e-10)).x
        h = 1e-4
        curv = -(f(v + h) - 2 * f(v) + f(v - h)) / h**2
        lap += f(v) - 0.5 * np.log(curv)
        fv = f(v)
        half = 10 / np.sqrt(curv)
        val, _ = scipy.integrate.quad(lambda t, fv=fv: np.exp(f(t) - fv), v - half, v + half,
                                      epsabs=0, epsrel=1e-8, limit=100)
        exact += fv + np.log(val / np.sqrt(2 * np.pi))
    return lap, exact


@pytest.mark.parametrize("fam", FAMILIES)
def test_laplace_matches_independent_laplace_and_quadrature(fam, data, models):
    m = models[fam]
    # near the simulation's values (families.csv), where the Laplace approximation of 10 rows per group is good
    beta, sd, k = np.array([0.4, 0.2]), 0.6, {"negbinomial": 2.0, "gamma": 3.0, "beta": 15.0}[fam]
    ours = m.log_marginal(beta, None, {"g": np.array([[sd**2]])}, dispersion=k)
    codes = pd.factorize(data["g"])[0]
    eta0 = beta[0] + beta[1] * data["x"].to_numpy()
    lap, exact = _laplace_by_groups(fam, data[m.design.response].to_numpy(float), eta0, codes, sd, k)
    # 30 groups: the finite-difference curvature of the reference is good to ~1e-7 per group
    assert ours == pytest.approx(lap, abs=1e-5)
    # the Laplace approximation itself is close to the exact integral, not equal: within 0.01 per group
    assert ours == pytest.approx(exact, abs=0.01 * 30)


@pytest.mark.parametrize("fam", FAMILIES)
def test_log_marginal_at_glmmtmb_estimates(fam, golden, models):
    r = golden[fam]
    m = models[fam]
    beta = [r["fixef"]["(Intercept)"], r["fixef"]["x"]]
    val = m.log_marginal(beta, None, {"g": np.array([[r["sd_g"] ** 2]])}, dispersion=r["dispersion"])
    assert val == pytest.approx(r["loglik"], rel=1e-8)


def test_dispersion_gradient_matches_finite_differences(models):
    """d/dk of the Laplace criterion (implicitly through the mode, which moves with the dispersion)."""
    lp = models["negbinomial"].laplace_plan()
    beta, lam = jnp.array([0.5, 0.3]), (jnp.array([[0.5]]),)
    f = jax.jit(jax.value_and_grad(lambda k: laplace.log_marginal(lp, beta, lam, dispersion=k)))
    _, gk = f(2.0)
    h = 1e-5
    fd = (float(f(2.0 + h)[0]) - float(f(2.0 - h)[0])) / (2 * h)
    assert float(gk) == pytest.approx(fd, rel=1e-6)
    assert not np.isfinite(float(f(-1.0)[0]))      # an invalid dispersion: -inf, not an exception


@pytest.mark.parametrize("fam", FAMILIES)
def test_fit_ml_reaches_glmmtmb(fam, golden, models):
    r = golden[fam]
    m = models[fam]
    fit = m.fit_ml()
    assert fit.converged
    assert fit.loglik >= r["loglik"] - 1e-6
    assert fit.dispersion == pytest.approx(r["dispersion"], rel=1e-3)
    assert fit.sd["g"][0] == pytest.approx(r["sd_g"], rel=1e-3)
    np.testing.assert_allclose(fit.beta, [r["fixef"]["(Intercept)"], r["fixef"]["x"]], rtol=1e-3, atol=1e-4)
    assert fit.n_par == 4                                   # β (2), θ (1) and the dispersion
    text = str(fit)
    label = {"negbinomial": "Negative Binomial(", "gamma": "gamma(shape = ", "beta": "beta(phi = "}[fam]
    assert label in text and f"{fit.aic:.1f}" in text


def test_sample_predict_loo_negbinomial(data):
    sub = data[data["g"].isin(sorted(data["g"].unique())[:8])].reset_index(drop=True)
    m = lmmarg.Model("y_nb ~ x + (1 | g)", sub, family="negbinomial")
    pri = m.priors.table.set_index("parameter")["prior"]
    assert pri["shape"] == "gamma(0.01, 0.01)"
    with pytest.warns(UserWarning):    # too few draws for the ESS checks
        fit = m.sample(chains=1, warmup=100, draws=60, seed=3, progress_bar=False)
    shape = fit.samples["shape"]
    assert shape.shape == (1, 60) and np.all(shape > 0)
    assert "shape" in fit.summary().index
    yrep = fit.predict(kind="response")
    assert yrep.shape == (60, len(sub)) and np.all(yrep >= 0) and np.all(yrep == np.round(yrep))
    # NB draws are overdispersed: their variance exceeds their mean at the fitted shapes
    assert yrep.var() > 1.2 * yrep.mean()
    ll = fit.log_likelihood()
    assert ll.shape == (1, 60, len(sub)) and np.all(np.isfinite(ll))
    cond = fit.log_likelihood(kind="conditional")
    assert np.all(np.isfinite(cond)) and np.all(cond <= 0)


def test_response_checks_name_column_and_row():
    df = pd.DataFrame({"y": [1.0, 2.0, 2.5, 0.0], "g": list("aabb")})
    with pytest.raises(DesignError, match=r"negbinomial.*'y' is 2\.5 at row 2"):
        lmmarg.Model("y ~ 1 + (1 | g)", df, family="negbinomial")
    with pytest.raises(DesignError, match=r"gamma.*positive.*'y' is 0 at row 3"):
        lmmarg.Model("y ~ 1 + (1 | g)", df, family="Gamma")
    df["y"] = [0.2, 0.5, 1.0, 0.3]
    with pytest.raises(DesignError, match=r"beta.*between 0 and 1.*'y' is 1 at row 2"):
        lmmarg.Model("y ~ 1 + (1 | g)", df, family="beta")


def test_dispersion_argument_and_prior_checks(data):
    m = lmmarg.Model("y_gamma ~ x + (1 | g)", data, family="Gamma(link = 'log')")
    assert m.family == "gamma" and m.family_spec.dispersion == "shape"
    with pytest.raises(ValueError, match="needs dispersion="):
        m.log_marginal([1.0, -0.4], None, {"g": np.array([[0.3]])})
    mp = lmmarg.Model("y_nb ~ x + (1 | g)", data, family="poisson")
    with pytest.raises(ValueError, match="no dispersion"):
        mp.log_marginal([0.5, 0.3], None, {"g": np.array([[0.3]])}, dispersion=2.0)
    with pytest.raises(ValueError, match="dispersion must be > 0"):
        lmmarg.Model("y_beta ~ x + (1 | g)", data, family="beta", priors={"phi": 0.0})
    mb = lmmarg.Model("y_beta ~ x + (1 | g)", data, family="beta", priors={"phi": 10.0})
    assert mb.priors["phi"].is_fixed
