"""The drop-in NumPyro potential: contract, and log densities against a dense brute-force computation."""
import jax


import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import numpyro  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from scipy import stats  # noqa: E402

import lmmarg  # noqa: E402
from lmmarg.priors import LKJ  # noqa: E402


def sim(n=240, G=12, seed=0, positive=False):
    rng = np.random.default_rng(seed)
    g = rng.integers(0, G, n)
    x = rng.normal(size=n)
    h = rng.integers(0, 3, n)
    c = rng.integers(0, 2, n).astype(float)
    u = rng.normal(size=(G, 2)) * [0.6, 0.3]
    y = 1.0 + 0.5 * x + u[g, 0] + u[g, 1] * x + (0.3 + 0.2 * h) * rng.normal(size=n)
    if positive:
        y = np.exp(y)
    return pd.DataFrame({"y": y, "x": x, "g": [f"g{i:02d}" for i in g], "h": [f"h{i}" for i in h], "c": c})


def half_t(v, scale):
    return np.log(2) + stats.t.logpdf(v, 3, 0, scale)


def test_potential_contract_runs_as_written():
    """docs/guide.md's NumPyro example (its model of section 3), run as tests/test_docs_examples.py runs it: 50
    warmup iterations and 100 draws, no progress bar. The same program, so one of the two loads it from the shared
    compilation cache (tests/conftest.py)."""
    data = lmmarg.datasets.load("sleepstudy")
    model = lmmarg.Model("Reaction ~ Days + (Days | Subject)", data, priors={
        "b_Days": dist.Normal(0, 20), "sd": dist.HalfNormal(50), "cor": LKJ(2.0), "sigma": dist.Exponential(0.05)})
    key = jax.random.PRNGKey(0)
    pot = model.potential(marginalize="all")
    kernel = numpyro.infer.NUTS(potential_fn=pot.potential_fn)
    mcmc = numpyro.infer.MCMC(kernel, num_warmup=50, num_samples=100, num_chains=4, chain_method="vectorized",
                              progress_bar=False)
    mcmc.run(key, init_params=pot.init_params(key, num_chains=4))
    draws = pot.constrain(mcmc.get_samples(group_by_chain=True))
    effects = pot.recover(draws, key)
    assert set(draws) == {"beta", "sigma", "sd_Subject", "corr_Subject"}
    assert draws["beta"].shape == (4, 100, 2) and draws["sigma"].shape == (4, 100)
    assert draws["sd_Subject"].shape == (4, 100, 2) and draws["corr_Subject"].shape == (4, 100, 2, 2)
    np.testing.assert_allclose(draws["corr_Subject"][..., 0, 0], 1.0)
    assert effects["u_Subject"].shape == (4, 100, 18, 2)
    assert np.isfinite(effects["u_Subject"]).all()
    # sane posterior location even after a short run
    assert 230 < draws["beta"][..., 0].mean() < 275 and 5 < draws["beta"][..., 1].mean() < 16
    # recovered effects track the per-subject deviations (intercept+slope per subject from lme4 ~ +-40)
    assert 5 < np.abs(effects["u_Subject"].mean((0, 1))).mean() < 60


def test_init_params_shapes_and_finite():
    model = lmmarg.Model("y ~ x + (x | g)", sim())
    pot = model.potential()
    init = pot.init_params(jax.random.PRNGKey(1), num_chains=3)
    assert set(init) == set(pot.sites)
    for k, v in init.items():
        assert v.shape == (3,) + pot.unc_shapes[k]
    pe = jax.jit(jax.vmap(pot.potential_fn))(init)
    assert np.isfinite(np.asarray(pe)).all()
    one = pot.init_params(jax.random.PRNGKey(1), num_chains=None)
    assert one["b_x"].shape == ()


def test_numpyro_model_with_initialize_model_and_predictive():
    model = lmmarg.Model("y ~ x + (x | g)", sim())
    fn = model.numpyro_model()
    # initialize_model eagerly, as NumPyro's MCMC calls it; the potential and Predictive jitted, as samplers and
    # users run them (called eagerly, every primitive would be compiled on its own)
    info, potential_fn, postprocess_fn, _ = numpyro.infer.util.initialize_model(jax.random.PRNGKey(0), fn)
    assert np.isfinite(jax.jit(potential_fn)(info.z))
    prior = jax.jit(numpyro.infer.Predictive(fn, num_samples=5))(jax.random.PRNGKey(1))
    assert prior["beta"].shape == (5, 2) and prior["corr_g"].shape == (5, 2, 2)


def _check_jacobian(pot, values):
    @jax.jit   # as the sampler runs it: called eagerly, every primitive would be compiled on its own
    def terms(values):
        unc = pot.unconstrain(values)
        logJ = sum(jnp.sum(pot.transforms[n].log_abs_det_jacobian(unc[n], jnp.asarray(values[n])))
                   for n in pot.sites)
        return pot.potential_fn(unc), pot.log_density(values), logJ

    pe, ld, logJ = terms(values)
    np.testing.assert_allclose(float(pe), -(float(ld) + float(logJ)), rtol=1e-9, atol=1e-8)


def _lkj2(r):
    return {"cor_g": np.array([[1.0, 0.0], [r, np.sqrt(1 - r * r)]])}


def test_lognormal_sigma_by_density_matches_dense():
    data = sim(positive=True)
    model = lmmarg.Model("y ~ x + (x | g)", data, family="lognormal", sigma_by="h")
    pot = model.potential()
    sig = np.array([0.3, 0.5, 0.7])
    vals = {"b_Intercept": 0.9, "b_x": 0.45, "sigma": sig, "sd_g__Intercept": 0.5, "sd_g__x": 0.25, **_lkj2(0.3)}
    vals = {k: np.asarray(v, float) for k, v in vals.items()}
    got = float(jax.jit(pot.log_density)(vals))
    # dense
    ly = np.log(data["y"].to_numpy())
    X = np.column_stack([np.ones(len(ly)), data["x"]])
    gi = pd.Categorical(data["g"]).codes
    Z = np.zeros((len(ly), 2 * 12))
    Z[np.arange(len(ly)), 2 * gi] = 1.0
    Z[np.arange(len(ly)), 2 * gi + 1] = data["x"]
    S = np.diag([0.5, 0.25]) @ np.array([[1, 0.3], [0.3, 1]]) @ np.diag([0.5, 0.25])
    hcode = pd.Categorical(data["h"]).codes
    cov = Z @ np.kron(np.eye(12), S) @ Z.T + np.diag(sig[hcode] ** 2)
    ll = stats.multivariate_normal(X @ [0.9, 0.45], cov).logpdf(ly) - ly.sum()
    s_mad = max(2.5, 1.4826 * np.median(np.abs(ly - np.median(ly))))
    lp = (stats.t.logpdf(0.9, 3, np.median(ly), s_mad) + stats.norm.logpdf(0.45, 0, 2.5 * ly.std(ddof=1) /
                                                                            data["x"].std(ddof=1))
          + half_t(sig, s_mad).sum() + half_t(0.5, s_mad) + half_t(0.25, s_mad) + np.log(0.5))
    np.testing.assert_allclose(got, ll + lp, rtol=1e-9)
    assert model.log_jacobian == pytest.approx(-ly.sum())
    _check_jacobian(pot, vals)


def test_distributional_sigma_density_matches_dense_and_none_marginalization():
    data = sim(seed=3)
    model = lmmarg.Model("y ~ x + (1 | g)", data, sigma="~ c + (1 | h)")
    G = 12
    rng = np.random.default_rng(0)
    zs = rng.normal(size=(3, 1))
    u = rng.normal(size=(G, 1)) * 0.6
    base = {"b_Intercept": 1.1, "b_x": 0.4, "sd_g__Intercept": 0.6, "b_sigma_Intercept": -1.0, "b_sigma_c": 0.3,
            "sd_sigma_h__Intercept": 0.4, "z_sigma_h": zs}
    ly = data["y"].to_numpy()
    X = np.column_stack([np.ones(len(ly)), data["x"]])
    gi = pd.Categorical(data["g"]).codes
    hi = pd.Categorical(data["h"]).codes
    c = data["c"].to_numpy()
    sig = np.exp(-1.0 + 0.3 * c + 0.4 * zs[hi, 0])
    s_mad = max(2.5, 1.4826 * np.median(np.abs(ly - np.median(ly))))
    lp = (stats.t.logpdf(1.1, 3, np.median(ly), s_mad) + stats.norm.logpdf(0.4, 0, 2.5 * ly.std(ddof=1) /
                                                                           data["x"].std(ddof=1))
          + half_t(0.6, s_mad) + stats.t.logpdf(-1.0, 3, 0, 2.5) + stats.norm.logpdf(0.3, 0, 1 / c.std(ddof=1))
          + half_t(0.4, 2.5) + stats.norm.logpdf(zs).sum())
    # marginalized
    pot = model.potential("all")
    vals = {k: np.asarray(v, float) for k, v in base.items()}
    Z = np.zeros((len(ly), G))
    Z[np.arange(len(ly)), gi] = 1.0
    cov = 0.36 * Z @ Z.T + np.diag(sig**2)
    dense = stats.multivariate_normal(X @ [1.1, 0.4], cov).logpdf(ly) + lp
    np.testing.assert_allclose(float(jax.jit(pot.log_density)(vals)), dense, rtol=1e-9)
    _check_jacobian(pot, vals)
    # nothing marginalized, centered: u is a site
    pot2 = model.potential("none", parameterization="centered")
    assert "u_g" in pot2.sites and "z_g" not in pot2.sites
    vals2 = dict(vals, u_g=u)
    cond = stats.norm.logpdf(ly, X @ [1.1, 0.4] + u[gi, 0], sig).sum() + stats.norm.logpdf(u, 0, 0.6).sum()
    np.testing.assert_allclose(float(jax.jit(pot2.log_density)(vals2)), cond + lp, rtol=1e-9)
    # noncentered (default): z_g site, u = sd * z
    pot3 = model.potential("none")
    assert "z_g" in pot3.sites
    vals3 = dict(vals, z_g=u / 0.6)
    cond3 = stats.norm.logpdf(ly, X @ [1.1, 0.4] + u[gi, 0], sig).sum() + stats.norm.logpdf(u / 0.6).sum()
    np.testing.assert_allclose(float(jax.jit(pot3.log_density)(vals3)), cond3 + lp, rtol=1e-9)


def test_recover_matches_exact_conditional_moments():
    data = sim(n=120, G=6, seed=5)
    model = lmmarg.Model("y ~ x + (1 | g)", data)
    pot = model.potential()
    draws = {"beta": np.tile([1.0, 0.5], (2, 1500, 1)), "sigma": np.full((2, 1500), 0.5),
             "sd_g": np.full((2, 1500, 1), 0.7)}
    u = pot.recover(draws, jax.random.PRNGKey(0))["u_g"]
    assert u.shape == (2, 1500, 6, 1)
    # exact Gaussian conditional
    y = data["y"].to_numpy()
    gi = pd.Categorical(data["g"]).codes
    Z = np.zeros((len(y), 6))
    Z[np.arange(len(y)), gi] = 1
    r = y - 1.0 - 0.5 * data["x"].to_numpy()
    prec = Z.T @ Z / 0.25 + np.eye(6) / 0.49
    C = np.linalg.inv(prec)
    m = C @ Z.T @ r / 0.25
    flat = u.reshape(-1, 6)
    np.testing.assert_allclose(flat.mean(0), m, atol=5 * np.sqrt(np.diag(C) / 3000).max())
    np.testing.assert_allclose(flat.std(0), np.sqrt(np.diag(C)), rtol=0.08)


def test_potential_uses_the_precision_dense_form_unless_an_sd_is_fixed_at_zero():
    """The sampler's potential forms the dense block in precision form (lmmarg.potential.dense_form) and equals
    the scaled form's density and gradient; a prior fixing a random-effect SD at 0 (a singular Lambda) keeps the
    scaled form."""
    df = sim(seed=3)
    m = lmmarg.Model("y ~ x + (x | g) + (1 | h)", df)
    pot = m.potential("all")
    assert pot.plan.blocks.one_level is not None and pot.plan.dense_form == "precision"
    params = pot.init_params(jax.random.PRNGKey(1), num_chains=None)
    vg = jax.jit(jax.value_and_grad(pot.density))
    v1, g1 = vg(params, pot.data)
    v0, g0 = vg(params, dict(pot.data, plan=pot.plan.with_dense_form("scaled")))
    assert abs(float(v1 - v0)) < 1e-9 * abs(float(v0))
    for k in g0:
        np.testing.assert_allclose(g1[k], g0[k], rtol=1e-7, atol=1e-9)
    m0 = lmmarg.Model("y ~ x + (x | g) + (1 | h)", df, priors={"sd_g__x": 0.0})
    assert lmmarg.potential.dense_form(m0).name == "scaled"
    assert m0.potential("all").plan.dense_form == "scaled"


@pytest.mark.parametrize("d", [2, 3, 4, 6, 9])
def test_unrolled_corr_cholesky_and_lkj_equal_numpyro(d):
    """lmmarg's correlation-Cholesky transform and LKJ density (elementwise for d <= UNROLLED_CORR_MAX, NumPyro's
    code above) equal NumPyro's: factor, log|J|, log density and the gradient of their sum; float32 in stays
    float32."""
    import numpyro.distributions as dist
    from numpyro.distributions.transforms import CorrCholeskyTransform

    from lmmarg import distributions as lmd

    x = jnp.asarray(np.random.default_rng(d).normal(size=(4, d * (d - 1) // 2)))
    ref, ours = CorrCholeskyTransform(), lmd.CorrCholeskyTransform()
    # jitted: eager dispatch of the unrolled elementwise code compiles every primitive separately (minutes)
    y0, y1 = jax.jit(lambda v: ref(v))(x), jax.jit(lambda v: ours(v))(x)
    np.testing.assert_allclose(y1, y0, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(jax.jit(ours.log_abs_det_jacobian)(x, y1), jax.jit(ref.log_abs_det_jacobian)(x, y0),
                               rtol=1e-11)
    np.testing.assert_allclose(jax.jit(lmd.LKJCholesky(d, 1.7).log_prob)(y0),
                               jax.jit(dist.LKJCholesky(d, 1.7).log_prob)(y0), rtol=1e-12)

    def total(tr, lkj):
        return lambda x: jnp.sum(lkj.log_prob(tr(x)) + tr.log_abs_det_jacobian(x, tr(x)))
    np.testing.assert_allclose(jax.jit(jax.grad(total(ours, lmd.LKJCholesky(d, 1.7))))(x),
                               jax.jit(jax.grad(total(ref, dist.LKJCholesky(d, 1.7))))(x), rtol=1e-9, atol=1e-11)
    assert jax.jit(lambda v: ours(v))(x.astype(jnp.float32)).dtype == jnp.float32
    # NumPyro's validation kept (its mask gives -inf under jit too; jitted for the reason above)
    assert not np.isfinite(float(jax.jit(lmd.LKJCholesky(d, 1.7).log_prob)(2.0 * jnp.eye(d))))
