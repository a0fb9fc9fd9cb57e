"""model.sample(): recovery of known parameters, marginalized vs. unmarginalized agreement, outputs."""
import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

import lmmarg  # noqa: E402

TRUTH = {"b_Intercept": 2.0, "b_x": -1.0, "sd_g__Intercept": 1.0, "sd_g__x": 0.5, "sigma": 0.8}


def sim(n=400, G=30, seed=1):
    rng = np.random.default_rng(seed)
    g = np.arange(n) % G
    x = rng.normal(size=n)
    R = np.array([[1.0, 0.3], [0.3, 1.0]])
    S = np.diag([1.0, 0.5]) @ R @ np.diag([1.0, 0.5])
    u = rng.multivariate_normal(np.zeros(2), S, size=G)
    y = 2.0 - 1.0 * x + u[g, 0] + u[g, 1] * x + 0.8 * rng.normal(size=n)
    return pd.DataFrame({"y": y, "x": x, "g": [f"s{i:02d}" for i in g]}), u


@pytest.fixture(scope="module")
def fit_d2():
    data, u = sim()
    model = lmmarg.Model("y ~ x + (x | g)", data)
    return model.sample(draws=300, warmup=300, chains=4, seed=0, progress_bar=False), u


def test_posterior_intervals_cover_truth(fit_d2):
    fit, _ = fit_d2
    s = fit.summary()
    for name, val in TRUTH.items():
        lo, hi = s.loc[name, "q2.5"], s.loc[name, "q97.5"]
        assert lo < val < hi, (name, lo, val, hi)
    assert (s["r_hat"] < 1.05).all()
    assert (s["ess_bulk"] > 200).all()
    assert fit.diagnostics["divergences"] <= 5


def test_recovered_effects_track_truth(fit_d2):
    fit, u_true = fit_d2
    u = fit.samples["u_g"]
    assert u.shape == (4, 300, 30, 2)
    post = u.mean((0, 1))
    assert np.corrcoef(post[:, 0], u_true[:, 0])[0, 1] > 0.9
    assert np.corrcoef(post[:, 1], u_true[:, 1])[0, 1] > 0.6


def test_summary_names_samples_and_arviz(fit_d2):
    fit, _ = fit_d2
    s = fit.summary()
    assert list(s.index) == ["b_Intercept", "b_x", "sd_g__Intercept", "sd_g__x", "cor_g__Intercept__x", "sigma"]
    assert {"mean", "sd", "q2.5", "q97.5", "ess_bulk", "ess_tail", "r_hat"} <= set(s.columns)
    assert set(fit.samples) == {"beta", "sigma", "sd_g", "corr_g", "u_g"}
    assert fit.samples["beta"].shape == (4, 300, 2)
    d = fit.diagnostics
    for k in ("divergences", "mean_tree_depth", "step_size", "time_compile", "time_mcmc", "time_recover"):
        assert k in d
    idata = fit.to_arviz()
    assert hasattr(idata, "posterior") and hasattr(idata, "sample_stats")
    assert idata.posterior["b_x"].shape == (4, 300)  # brms names, one variable per coefficient
    assert list(idata.posterior["r_g"].coords["r_g__col"].values) == ["Intercept", "x"]
    assert "diverging" in idata.sample_stats
    idata2 = fit.to_arviz(log_likelihood=True)
    assert idata2.log_likelihood["y"].shape == (4, 300, 400)
    r = fit.summary(ranef=True)
    assert "r_g[s00,Intercept]" in r.index and "r_g[s29,x]" in r.index


def test_marginalized_and_unmarginalized_agree():
    rng = np.random.default_rng(7)
    G, n = 15, 150
    g = np.arange(n) % G
    y = 1.0 + rng.normal(size=G)[g] * 0.8 + rng.normal(size=n) * 0.6
    model = lmmarg.Model("y ~ 1 + (1 | g)", pd.DataFrame({"y": y, "g": g.astype(str)}))
    a = model.sample(draws=500, warmup=400, chains=2, seed=1, progress_bar=False)
    b = model.sample(draws=500, warmup=400, chains=2, seed=2, marginalize="none", progress_bar=False)
    assert b.diagnostics["hmc_terms"] == ["g"] and a.diagnostics["marginalized"] == ["g"]
    sa, sb = a.summary(), b.summary()
    for name in ["b_Intercept", "sd_g__Intercept", "sigma"]:
        se = np.sqrt(sa.loc[name, "sd"] ** 2 / sa.loc[name, "ess_bulk"] + sb.loc[name, "sd"] ** 2 /
                     sb.loc[name, "ess_bulk"])
        assert abs(sa.loc[name, "mean"] - sb.loc[name, "mean"]) < 4.5 * se, name
        assert sb.loc[name, "sd"] == pytest.approx(sa.loc[name, "sd"], rel=0.3), name
    # random effects: recovered (a) vs sampled (b)
    ua, ub = a.samples["u_g"].mean((0, 1)), b.samples["u_g"].mean((0, 1))
    np.testing.assert_allclose(ua, ub, atol=0.15)


def test_lognormal_sigma_by_short_run():
    rng = np.random.default_rng(3)
    n, G = 200, 10
    g, h = np.arange(n) % G, rng.integers(0, 2, n)
    ly = 0.5 + rng.normal(size=G)[g] * 0.4 + np.where(h == 0, 0.2, 0.6) * rng.normal(size=n)
    data = pd.DataFrame({"y": np.exp(ly), "g": g.astype(str), "h": np.where(h == 0, "a", "b")})
    model = lmmarg.Model("y ~ 1 + (1 | g)", data, family="lognormal", sigma_by="h")
    fit = model.sample(draws=150, warmup=150, chains=2, seed=0, progress_bar=False)
    assert fit.samples["sigma"].shape == (2, 150, 2)
    s = fit.summary()
    assert "sigma[a]" in s.index and "sigma[b]" in s.index
    assert s.loc["sigma[a]", "mean"] < s.loc["sigma[b]", "mean"]
    pred = fit.predict(data.iloc[:5], draws=50)
    assert pred.shape == (50, 5) and (pred > 0).all()


def test_distributional_sigma_short_run():
    rng = np.random.default_rng(4)
    n, G = 240, 12
    g, c = np.arange(n) % G, rng.integers(0, 2, n).astype(float)
    y = 1.0 + rng.normal(size=G)[g] * 0.5 + np.exp(-1.0 + 0.8 * c) * rng.normal(size=n)
    data = pd.DataFrame({"y": y, "g": g.astype(str), "c": c})
    model = lmmarg.Model("y ~ 1 + (1 | g)", data, sigma="~ c + (1 | g)")
    fit = model.sample(draws=150, warmup=150, chains=2, seed=0, progress_bar=False)
    s = fit.summary()
    assert {"b_sigma_Intercept", "b_sigma_c", "sd_g__sigma_Intercept", "sd_g__Intercept"} <= set(s.index)
    assert s.loc["b_sigma_c", "q2.5"] > 0.2  # clearly larger residual SD for c = 1
    assert fit.samples["u_sigma_g"].shape == (2, 150, 12, 1)
    assert fit.samples["u_g"].shape == (2, 150, 12, 1)
