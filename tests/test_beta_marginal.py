"""Fixed effects integrated out by the sampler (``sample(marginalize_beta=True)``): the density against a dense
computation, the exact recovery of beta after sampling, and the errors for models it does not apply to."""
import warnings

import numpy as np
import numpyro.distributions as dist
import pandas as pd
import pytest
from scipy import stats

import lmmarg
from lmmarg.potential import default_marginalize_beta

PRIORS = {"Intercept": dist.Normal(1.0, 2.0), "b": dist.Normal(-0.5, 3.0)}


def sim(n=180, G=9, seed=0):
    rng = np.random.default_rng(seed)
    g = rng.integers(0, G, n)
    x = rng.normal(size=n)
    h = rng.integers(0, 3, n)
    u = rng.normal(size=(G, 2)) * [0.6, 0.3]
    y = 1.0 + 0.5 * x + u[g, 0] + u[g, 1] * x + (0.3 + 0.2 * h) * rng.normal(size=n)
    return pd.DataFrame({"y": y, "x": x, "g": [f"g{i:02d}" for i in g], "h": [f"h{i}" for i in h]})


def _lkj2(r):
    return {"cor_g": np.array([[1.0, 0.0], [r, np.sqrt(1 - r * r)]])}


@pytest.mark.parametrize("sigma_by", [None, "h"])
def test_density_integrates_beta_against_its_normal_prior(sigma_by):
    """log p(theta | y) with beta integrated out minus log p(theta, beta | y) with beta sampled equals, in dense
    algebra, log N(y; X mu, V + X S S^T X^T) - log N(y; X beta, V) - log N(beta; mu, S S^T): the priors of theta,
    the Jacobians and the constants cancel, so this checks exactly the integral."""
    data = sim()
    model = lmmarg.Model("y ~ x + (x | g)", data, priors=PRIORS, sigma_by=sigma_by)
    sig = np.array([0.3, 0.5, 0.7]) if sigma_by else np.asarray(0.45)
    theta = {"sigma": sig, "sd_g__Intercept": 0.5, "sd_g__x": 0.25, **_lkj2(0.3)}
    beta = np.array([0.8, 0.35])
    got_m = float(model.potential(marginalize_beta=True).log_density(
        {k: np.asarray(v, float) for k, v in theta.items()}))
    got_s = float(model.potential().log_density(
        {k: np.asarray(v, float) for k, v in {**theta, "b_Intercept": beta[0], "b_x": beta[1]}.items()}))
    y = data["y"].to_numpy()
    n = len(y)
    X = np.column_stack([np.ones(n), data["x"]])
    gi = pd.Categorical(data["g"]).codes
    Z = np.zeros((n, 18))
    Z[np.arange(n), 2 * gi] = 1.0
    Z[np.arange(n), 2 * gi + 1] = data["x"]
    S = np.diag([0.5, 0.25]) @ np.array([[1, 0.3], [0.3, 1]]) @ np.diag([0.5, 0.25])
    s_obs = sig[pd.Categorical(data["h"]).codes] if sigma_by else np.full(n, float(sig))
    V = Z @ np.kron(np.eye(9), S) @ Z.T + np.diag(s_obs**2)
    mu, B = np.array([1.0, -0.5]), np.diag([4.0, 9.0])
    want = (stats.multivariate_normal(X @ mu, V + X @ B @ X.T).logpdf(y)
            - stats.multivariate_normal(X @ beta, V).logpdf(y) - stats.multivariate_normal(mu, B).logpdf(beta))
    np.testing.assert_allclose(got_m - got_s, want, rtol=1e-9)


def test_sampling_with_beta_integrated_out_recovers_beta():
    data = sim(seed=3)
    model = lmmarg.Model("y ~ x + (x | g)", data, priors=PRIORS)
    kw = dict(chains=2, warmup=300, draws=600, progress_bar=False, seed=1)
    with warnings.catch_warnings():   # short runs: the low-ESS warnings are expected
        warnings.simplefilter("ignore")
        ref = model.sample(**kw, marginalize_beta=False)
        fit = model.sample(**kw)   # the default with normal priors and every term marginalized
    assert fit.diagnostics["marginalize_beta"] and not ref.diagnostics["marginalize_beta"]
    assert "b_Intercept" not in fit.potential.sites and "b_x" not in fit.potential.sites
    assert fit.samples["beta"].shape == (2, 600, 2) and fit.samples["u_g"].shape == (2, 600, 9, 2)
    s_ref, s = ref.summary(), fit.summary()
    for name in ("b_Intercept", "b_x", "sd_g__Intercept", "sigma"):
        se = np.hypot(s_ref.loc[name, "sd"] / np.sqrt(s_ref.loc[name, "ess_bulk"]),
                      s.loc[name, "sd"] / np.sqrt(s.loc[name, "ess_bulk"]))
        assert abs(s.loc[name, "mean"] - s_ref.loc[name, "mean"]) < 5 * se, name
        assert s.loc[name, "sd"] == pytest.approx(s_ref.loc[name, "sd"], rel=0.25), name
    # beta is drawn even without recovering the random effects
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        light = model.sample(**kw, marginalize_beta=True, recover=False)
    assert light.samples["beta"].shape == (2, 600, 2) and "u_g" not in light.samples
    np.testing.assert_allclose(light.samples["beta"].mean((0, 1)), fit.samples["beta"].mean((0, 1)),
                               atol=4 * s.loc["b_x", "sd"] / np.sqrt(s.loc["b_x", "ess_bulk"]) + 1e-3)


def test_default_integrates_beta_out_only_where_measured_to_win():
    data = sim()
    normal = lmmarg.Model("y ~ x + (x | g)", data, priors=PRIORS)
    assert default_marginalize_beta(normal) and default_marginalize_beta(normal, ["g"])
    assert not default_marginalize_beta(normal, "none")                      # effects left to HMC
    assert not default_marginalize_beta(lmmarg.Model("y ~ x + (x | g)", data))  # student_t intercept (brms)
    data["k"] = (data["y"] > 1).astype(int)
    assert not default_marginalize_beta(lmmarg.Model("k ~ x + (1 | g)", data, family="bernoulli", priors=PRIORS))


def test_marginalize_beta_refuses_what_it_cannot_integrate():
    data = sim()
    with pytest.raises(ValueError, match="b_Intercept has the prior"):
        lmmarg.Model("y ~ x + (x | g)", data).sample(marginalize_beta=True, draws=10, warmup=10)
    fixed = lmmarg.Model("y ~ x + (x | g)", data, priors={**PRIORS, "b_x": 0.5})
    with pytest.raises(ValueError, match="b_x is fixed"):
        fixed.potential(marginalize_beta=True)
    data["k"] = (data["y"] > 1).astype(int)
    glmm = lmmarg.Model("k ~ x + (1 | g)", data, family="bernoulli", priors=PRIORS)
    with pytest.raises(ValueError, match="Gaussian families"):
        glmm.potential(marginalize_beta=True)
    model = lmmarg.Model("y ~ x + (x | g)", data, priors=PRIORS)
    with pytest.raises(ValueError, match="parameterization='conditional'"):
        model.potential(marginalize="none", parameterization="conditional", marginalize_beta=True)

