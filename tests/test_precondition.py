"""init="mode": the posterior mode and the whitening of NUTS' coordinates by the curvature there
(lmmarg.inference.precondition), and that it changes the geometry only, not the posterior."""
import jax
import numpy as np
import pytest

from lmmarg import Model
from lmmarg.inference import precondition

from modelcache import sleepstudy_model


def test_laplace_metric_of_a_gaussian_is_exact():
    """For a Gaussian potential the mode is the mean and R R^T is the covariance; directions of weak or negative
    curvature keep unit scale."""
    rng = np.random.default_rng(0)
    A = rng.normal(size=(4, 4))
    prec = A @ A.T + 0.5 * np.eye(4)
    mean = rng.normal(size=4) * 3
    lay = precondition.Layout(("x",), ((4,),), 4)

    def vg(x):
        d = x - mean
        return 0.5 * d @ prec @ d, prec @ d

    metric, info = precondition.laplace_metric(vg, lay, np.zeros(4))
    np.testing.assert_allclose(metric.mean, mean, atol=1e-6)
    np.testing.assert_allclose(metric.root @ metric.root.T, np.linalg.inv(prec), rtol=1e-6, atol=1e-9)
    z = rng.normal(size=(3, 4))
    np.testing.assert_allclose(precondition.from_position(metric, np.asarray(precondition.to_position(metric, z))),
                               z, atol=1e-10)
    assert info["weak_directions"] == 0
    root, weak = precondition._root(np.diag([4.0, 1e-4, -1.0]))
    assert weak == 2
    np.testing.assert_allclose(root @ root.T, np.diag([0.25, 1.0, 1.0]))


def test_layout_puts_global_sites_first_and_round_trips():
    pot = sleepstudy_model().potential("none")
    lay = precondition.layout(pot)
    assert not any(n.startswith(("z_", "u_")) for n in lay.names[:-1]) and lay.names[-1].startswith("z_")
    assert lay.size == 6 + 36 and lay.n_dense == lay.size        # small: every coordinate dense
    p = pot.init_params(jax.random.PRNGKey(0), num_chains=3)
    back = lay.unflatten(lay.flatten(p))
    assert all(np.array_equal(back[k], p[k]) for k in p)


@pytest.fixture(scope="module")
def sleep():
    return sleepstudy_model()


def test_mode_and_center_starts_sample_the_same_posterior(sleep):
    fits = {i: sleep.sample(draws=400, warmup=300, chains=2, seed=2, init=i, progress_bar=False)
            for i in ("mode", "center")}
    a, b = fits["mode"].summary(), fits["center"].summary()
    for p in ("b_Intercept", "b_Days", "sigma", "sd_Subject__Intercept", "sd_Subject__Days"):
        se = np.hypot(a.loc[p, "sd"] / np.sqrt(a.loc[p, "ess_bulk"]), b.loc[p, "sd"] / np.sqrt(b.loc[p, "ess_bulk"]))
        assert abs(a.loc[p, "mean"] - b.loc[p, "mean"]) < 4 * se, p
    d = fits["mode"].diagnostics
    assert d["init"] == "mode" and d["time_init"] >= 0 and d["mode_max_abs_grad"] < 1e-3
    assert fits["center"].diagnostics["init"] == "center"


def test_large_n_narrow_posterior_has_short_trees():
    """σ at N = 200,000 has a posterior SD of ~0.2 % on the log scale: from the mode, in whitened coordinates,
    NUTS needs few leapfrog steps even after a short warmup."""
    import pandas as pd
    rng = np.random.default_rng(1)
    n = 200_000
    g = rng.integers(0, 50, n)
    df = pd.DataFrame({"g": g.astype(str), "x": rng.normal(size=n)})
    df["y"] = 2 + df.x + rng.normal(size=50)[g] + rng.normal(size=n)
    fit = Model("y ~ x + (1 | g)", df).sample(draws=200, warmup=150, chains=2, seed=0, progress_bar=False)
    assert fit.diagnostics["init"] == "mode"      # a stationary point in posterior-SD units, not raw gradients
    assert fit.diagnostics["mean_n_steps"] < 8
    assert fit.diagnostics["divergences"] == 0


def test_bad_init_is_refused(sleep):
    with pytest.raises(ValueError, match="init must be one of 'mode', 'center'"):
        sleep.sample(init="random", progress_bar=False)


_PARALLEL = """
import numpyro
numpyro.set_host_device_count(2)
import warnings, numpy as np
warnings.simplefilter("ignore")
from lmmarg import Model, datasets
m = Model("Reaction ~ Days + (Days | Subject)", datasets.load("sleepstudy"))
seen = []
fit = m.sample(draws=300, warmup=200, chains=4, chain_method="parallel", seed=0,
               progress_bar=lambda phase, done, total, div: seen.append(done))
ref = m.sample(draws=300, warmup=200, chains=4, seed=0, chain_method="vectorized", progress_bar=False)
assert fit.diagnostics["devices"] == 2 and ref.diagnostics["devices"] == 1, fit.diagnostics["devices"]
assert fit.samples["beta"].shape == (4, 300, 2) and fit.samples["u_Subject"].shape == (4, 300, 18, 2)
assert seen == sorted(seen) and seen[-1] == 500
a, b = fit.samples["beta"].reshape(-1, 2), ref.samples["beta"].reshape(-1, 2)
se = np.hypot(a.std(0), b.std(0)) / np.sqrt(600)
assert (np.abs(a.mean(0) - b.mean(0)) < 5 * se).all(), (a.mean(0), b.mean(0), se)
# chains differ from each other (each device got its own keys and starts)
assert np.ptp(fit.samples["sigma"].mean(1)) > 0
print("OK")
"""


def test_parallel_chains_over_two_host_devices():
    """chain_method="parallel" spreads the chains over XLA host devices (2 here, set before JAX starts, hence a
    subprocess): same shapes and posterior as the vectorized run, progress in order."""
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-c", _PARALLEL], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and "OK" in p.stdout, p.stderr[-2000:]


_PARALLEL_DENSE = """
import lmmarg
assert lmmarg.use_cores(2) == 2
import warnings, numpy as np
warnings.simplefilter("ignore")
from lmmarg import Model, datasets
m = Model("diameter ~ 1 + (1 | plate) + (1 | sample)", datasets.load("Penicillin"))
fit = m.sample(draws=100, warmup=100, chains=4, seed=0, progress_bar=False)   # the default: parallel
assert fit.diagnostics["devices"] == 2 and np.isfinite(fit.samples["sigma"]).all()
assert lmmarg.use_cores(2) == 2           # unchanged: fine after JAX started
try:
    lmmarg.use_cores(3)
except RuntimeError as e:
    assert "before any JAX computation" in str(e), e
else:
    raise AssertionError("use_cores(3) after JAX started should fail")
print("OK")
"""


def test_parallel_chains_with_a_dense_block_do_not_deadlock():
    """lmmarg.use_cores(2) makes two host devices and the default sample() uses them. Crossed terms: the density
    factorizes a dense block with LAPACK. jaxlib 0.10's batched CPU LAPACK kernels
    wait on XLA's intra-op thread pool, which the programs of two host devices occupy: two batched chains per
    device deadlocked. On a CPU the chains of a device run one after the other (unbatched calls)."""
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-c", _PARALLEL_DENSE], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "OK" in p.stdout, p.stderr[-2000:]


def test_chains_one_after_the_other_equal_batched_chains(monkeypatch):
    """The CPU driver maps the chains of a device one after the other; the accelerator driver batches them in
    lockstep. Same keys and starts, same kernel: the same draws."""
    import lmmarg
    from lmmarg import datasets
    from lmmarg.inference import nuts
    m = lmmarg.Model("diameter ~ 1 + (1 | plate) + (1 | sample)", datasets.load("Penicillin"))
    out = {}
    for batched in (False, True):
        monkeypatch.setattr(nuts, "_chains_batched", lambda b=batched: b)
        fit = m.sample(draws=30, warmup=30, chains=2, seed=4, progress_bar=False)
        out[batched] = fit.samples
    for k in ("beta", "sigma", "sd_plate", "u_plate"):
        np.testing.assert_allclose(out[False][k], out[True][k], rtol=1e-7, atol=1e-9, err_msg=k)


def test_a_runaway_mode_search_falls_back_to_the_center(sleep):
    """Centred effects left to HMC: the joint density grows without bound as an SD and its effects go to 0, so
    there is no mode to start from; sample() notices (the search ends away from a stationary point) and starts as
    init="center" does, instead of whitening by the curvature of a degenerate point."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = sleep.sample(draws=100, warmup=150, chains=2, seed=0, marginalize="none", parameterization="centered",
                           progress_bar=False)
    d = fit.diagnostics
    assert d["init"].startswith("center") and "no usable mode" in d["mode_message"]
    assert d["mean_n_steps"] < 200
