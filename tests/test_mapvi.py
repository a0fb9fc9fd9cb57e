"""MAP and VI on the marginal: MAP equals a brute-force optimum, VI lands near NUTS."""
import jax
import numpy as np
import pandas as pd
import pytest
import scipy.optimize


import lmmarg  # noqa: E402


def simulated(seed=1, G=12, n=8):
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(G), n)
    x = rng.normal(size=G * n)
    u = rng.normal(scale=1.5, size=G)
    y = 2.0 + 0.7 * x + u[g] + rng.normal(scale=1.0, size=G * n)
    return pd.DataFrame({"y": y, "x": x, "g": [f"g{k:02d}" for k in g]})


@pytest.fixture(scope="module")
def model():
    return lmmarg.Model("y ~ x + (1 | g)", simulated())


def _brute_force(objective, x0s):
    best = None
    for x0 in x0s:
        r = scipy.optimize.minimize(objective, x0, method="Nelder-Mead",
                                    options=dict(xatol=1e-9, fatol=1e-11, maxiter=40000, maxfev=40000))
        if best is None or r.fun < best.fun:
            best = r
    return best


@pytest.mark.parametrize("jacobian", [False, True])
def test_map_matches_brute_force_optimum(model, jacobian):
    fit = model.fit_map(jacobian=jacobian)
    assert fit.method == "map" and fit.diagnostics["converged"]
    pot = model.potential()
    names = list(pot.sites)
    assert sorted(names) == sorted(["b_Intercept", "b_x", "sigma", "sd_g__Intercept"])

    @jax.jit
    def dens(v):  # same density, written independently: constrained values, optional log-Jacobian
        vals = {"b_Intercept": v[0], "b_x": v[1], "sigma": jax.numpy.exp(v[2]),
                "sd_g__Intercept": jax.numpy.exp(v[3])}
        return -(pot.log_density(vals) + (v[2] + v[3] if jacobian else 0.0))

    def objective(v):
        return float(dens(np.asarray(v, dtype=float)))

    starts = [np.array([0.0, 0.0, 0.0, 0.0]), np.array([3.0, 1.0, 1.0, -1.0]), np.array([1.0, -1.0, -0.5, 1.0])]
    bf = _brute_force(objective, starts)
    mine = np.array([fit.mode["beta"][0], fit.mode["beta"][1], np.log(fit.mode["sigma"]),
                     np.log(fit.mode["sd_g"][0])])
    assert objective(mine) <= bf.fun + 1e-7
    np.testing.assert_allclose(mine, bf.x, atol=2e-3)
    assert fit.diagnostics["objective"] == pytest.approx(objective(mine), abs=1e-6)


def test_map_result_shape_and_ranef(model):
    fit = model.fit_map()
    assert fit.samples["beta"].shape == (1, 1, 2)
    assert fit.samples["u_g"].shape == (1, 1, 12, 1)
    # random effects = exact conditional means at the mode
    cov = {"g": np.atleast_2d(fit.mode["sd_g"] ** 2)}
    ref = model.ranef_mean(fit.mode["beta"], fit.mode["sigma"], cov)["g"]
    np.testing.assert_allclose(fit.samples["u_g"][0, 0], ref, rtol=1e-8, atol=1e-10)
    assert "b_x" in fit.summary().index


def test_map_close_to_ml_with_weak_priors():
    """With nearly flat priors the MAP (no Jacobian) is the ML estimate."""
    import numpyro.distributions as dist
    pri = {"Intercept": dist.Normal(0, 1e4), "b": dist.Normal(0, 1e4), "sigma": dist.HalfNormal(1e4),
           "sd": dist.HalfNormal(1e4)}
    m = lmmarg.Model("y ~ x + (1 | g)", simulated(seed=3), priors=pri)
    mp, ml = m.fit_map(), m.fit_ml()
    np.testing.assert_allclose(mp.mode["beta"], ml.beta, rtol=1e-4)
    assert mp.mode["sigma"] == pytest.approx(ml.sigma, rel=1e-4)
    assert mp.mode["sd_g"][0] == pytest.approx(ml.sd["g"][0], rel=1e-3)


@pytest.fixture(scope="module")
def nuts(model):
    return model.sample(draws=500, warmup=500, chains=2, seed=0, progress_bar=False)


@pytest.mark.parametrize("guide", ["normal", pytest.param("lowrank", marks=pytest.mark.slow)])
def test_vi_close_to_nuts(model, nuts, guide):
    vi = model.fit_vi(guide=guide, steps=2000, draws=1000, seed=0)
    assert vi.method == "vi"
    assert vi.samples["beta"].shape == (1, 1000, 2)
    assert vi.samples["u_g"].shape == (1, 1000, 12, 1)
    for key in ("beta", "sigma", "sd_g", "u_g"):
        a, b = nuts.samples[key], vi.samples[key]
        m_n, s_n = a.mean(axis=(0, 1)), a.std(axis=(0, 1))
        m_v = b.mean(axis=(0, 1))
        assert np.all(np.abs(m_v - m_n) < 2 * s_n), (guide, key, m_v, m_n, s_n)
    # posterior SDs of the fixed effects in the right range (not collapsed)
    ratio = vi.samples["beta"].std(axis=(0, 1)) / nuts.samples["beta"].std(axis=(0, 1))
    assert np.all((ratio > 0.5) & (ratio < 2.0)), (guide, ratio)


@pytest.mark.slow
def test_vi_flow_runs(model):
    vi = model.fit_vi(guide="flow", steps=200, draws=50, seed=1)
    assert vi.samples["sd_g"].shape == (1, 50, 1)
    assert np.isfinite(vi.losses[-1])


def test_vi_bad_arguments(model):
    with pytest.raises(ValueError, match="guide"):
        model.fit_vi(guide="banana")
    with pytest.raises(ValueError, match="steps"):
        model.fit_vi(steps=0)
    with pytest.raises(ValueError, match="starts"):
        model.fit_map(starts=0)


def test_map_boundary_mode_is_not_a_false_stop():
    """No group effect in the data: the penalized-ML mode may sit at sd -> 0; fit_map must end at the best mode of
    several starts (edge restarts), report its checks and not claim a failure for the boundary itself."""
    rng = np.random.default_rng(5)
    g = np.repeat(np.arange(10), 6)
    x = rng.normal(size=g.size) * 50 + 1e3             # badly scaled, uncentred covariate
    df = pd.DataFrame({"y": 1 + 0.01 * x + rng.normal(size=g.size), "x": x, "g": g.astype(str)})
    model = lmmarg.Model("y ~ x + (x | g)", df)
    fit = model.fit_map()
    d = fit.diagnostics
    assert {"max_abs_grad", "hessian_min_eig", "n_boundary", "messages"} <= set(d["checks"])
    assert d["converged"] == (not d["checks"]["messages"])
    several = model.fit_map(starts=4, seed=3)
    assert d["objective"] <= several.diagnostics["objective"] + 1e-6 * abs(several.diagnostics["objective"])
