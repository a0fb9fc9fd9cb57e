"""Degenerate data (issue #30): each case gives the right answer or a clear error / warning, never a runaway
sampler, a silently meaningless estimate or a raw numpy warning."""
import warnings

import numpy as np
import pandas as pd
import pytest

import lmmarg
from lmmarg.degenerate import separation
from lmmarg.design import DesignError

N, G = 200, 20


def _frame(y, x, g):
    return pd.DataFrame(dict(y=y, x=x, g=np.asarray(g).astype(str)))


@pytest.fixture(scope="module")
def base():
    rng = np.random.default_rng(1)
    return rng.integers(0, G, N), rng.normal(size=N), rng


def _run(fn):
    """fn() with every warning recorded: (result, [warnings])."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = fn()
    return out, rec


# ---------------------------------------------------------------------------------------------- separation
@pytest.fixture(scope="module")
def separated(base):
    g, x, _ = base
    return lmmarg.Model("y ~ x + (1|g)", _frame((x > 0).astype(int), x, g), family="bernoulli")


def test_separation_is_detected_and_named(separated):
    sep = separation(separated)
    assert sep is not None and sep.columns == ["x"] and not sep.all_bound
    with pytest.raises(DesignError, match="separated by the fixed effect.*'x'"):
        separated.fit_ml()


def test_no_separation_on_ordinary_data(base):
    g, x, rng = base
    y = (rng.uniform(size=N) < 1 / (1 + np.exp(-x))).astype(int)
    assert separation(lmmarg.Model("y ~ x + (1|g)", _frame(y, x, g), family="bernoulli")) is None


@pytest.fixture(scope="module")
def separated_fit(separated):
    return _run(lambda: separated.sample(chains=2, warmup=200, draws=200, seed=3, progress_bar=False))


def test_separated_data_sample_well_with_a_warning(separated_fit):
    fit, rec = separated_fit
    msgs = [str(w.message) for w in rec]
    assert any("separated" in m and "'x'" in m for m in msgs)
    assert not [w for w in rec if issubclass(w.category, RuntimeWarning)]
    assert fit.diagnostics["init"] == "mode"
    assert fit.diagnostics["divergences"] <= 4
    s = fit.summary()
    assert s["r_hat"].max() < 1.05
    bx = np.asarray(fit.samples["beta"])[..., 1]
    # the prior N(0, 2.6) keeps b_x finite: a few prior SDs, not the ~1e4 of the runaway start
    assert 1.0 < np.mean(bx) < 30.0 and np.std(bx) > 0.1


# ---------------------------------------------------------------------------------------------- all 0 / all 1
@pytest.mark.parametrize("family,value,word", [("poisson", 0, "0 in every row"), ("bernoulli", 0, "0 in every row"),
                                               ("bernoulli", 1, "every row")])
def test_constant_glmm_response_has_no_ml_estimate(base, family, value, word):
    g, x, _ = base
    m = lmmarg.Model("y ~ x + (1|g)", _frame(np.full(N, value), x, g), family=family)
    sep = separation(m)
    assert sep is not None and sep.all_bound
    with pytest.raises(DesignError, match=word):
        m.fit_ml()


# ---------------------------------------------------------------------------------------------- huge counts
def _counts(base, scale):
    g, x, _ = base
    rng = np.random.default_rng(7)
    u = rng.normal(0, 0.04, G)
    y = rng.poisson(scale * np.exp(0.1 * x + u[g])).astype(float)
    df = _frame(y, x, g)
    df["ly"] = np.log(y)
    return df


@pytest.fixture(scope="module")
def huge(base):
    df = _counts(base, 1e9)
    return lmmarg.Model("y ~ x + (1|g)", df, family="poisson"), lmmarg.Model("ly ~ x + (1|g)", df)


def test_huge_counts_ml_matches_lmm_on_log_y(huge):
    pois, lmm = huge
    fit, rec = _run(pois.fit_ml)
    ref = lmm.fit_ml()
    assert not [w for w in rec if issubclass(w.category, RuntimeWarning)]
    assert fit.converged
    assert fit.sd["g"][0] == pytest.approx(ref.sd["g"][0], rel=0.05)
    np.testing.assert_allclose(fit.beta, ref.beta, atol=1e-3)
    assert np.all(np.isfinite(fit.se)) and np.all(fit.se > 0)


def test_huge_counts_sample(huge):
    pois, lmm = huge
    fit, rec = _run(lambda: pois.sample(chains=2, warmup=200, draws=200, seed=1, progress_bar=False))
    assert not [w for w in rec if issubclass(w.category, RuntimeWarning)]
    assert fit.summary()["r_hat"].max() < 1.05
    sd = np.asarray(fit.samples["sd_g"]).mean()
    assert sd == pytest.approx(lmm.fit_ml().sd["g"][0], rel=0.5)


def test_enormous_counts_raise_no_numpy_warning(base):
    m = lmmarg.Model("y ~ x + (1|g)", _counts(base, 1e18), family="poisson")
    fit, rec = _run(m.fit_ml)
    assert not [w for w in rec if issubclass(w.category, RuntimeWarning)]
    assert np.all(np.isfinite(fit.beta))


# ---------------------------------------------------------------------------------------------- exact fits
@pytest.mark.parametrize("kind", ["constant", "fitted exactly"])
@pytest.mark.parametrize("method", ["fit_ml", "sample", "fit_map", "fit_vi"])
def test_exact_gaussian_response_refused_by_every_method(base, kind, method):
    g, x, _ = base
    y = np.full(N, 3.0) if kind == "constant" else 1 + 2 * x
    m = lmmarg.Model("y ~ x + (1|g)", _frame(y, x, g))
    with pytest.raises(ValueError, match=f"{method}: the response 'y' is {kind}"):
        getattr(m, method)()


# ---------------------------------------------------------------------------------------------- float limits
@pytest.mark.parametrize("values", ["scaled", "one"])
def test_overflowing_covariate_is_a_clear_error(base, values):
    g, x, rng = base
    xs = x * 1e300 if values == "scaled" else np.where(np.arange(N) == 0, 1e300, x)
    df = _frame(1 + x + rng.normal(size=N), xs, g)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(DesignError, match="column 'x'.*overflows"):
            lmmarg.Model("y ~ x + (1|g)", df)


@pytest.mark.parametrize("scale", [1e-160, 1e-300, 1e150])
def test_extreme_covariate_scales_fit_like_unit_scale(base, scale):
    g, x, rng = base
    y = 1 + 0.5 * x + rng.normal(0, 0.5, G)[g] + rng.normal(size=N)
    ref = lmmarg.Model("y ~ x + (1|g)", _frame(y, x, g)).fit_ml()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        fit = lmmarg.Model("y ~ x + (1|g)", _frame(y, x * scale, g)).fit_ml()
    np.testing.assert_allclose(fit.beta * [1, scale], ref.beta, rtol=1e-6)
    np.testing.assert_allclose(fit.se * [1, scale], ref.se, rtol=1e-6)
    assert fit.sd["g"][0] == pytest.approx(ref.sd["g"][0], rel=1e-6)


@pytest.mark.parametrize("method", ["sample", "fit_map", "fit_vi"])
def test_tiny_covariate_scale_is_a_clear_error_for_the_sampler(base, method):
    """At x * 1e-160 the sampler's sums of squares are subnormal: sample / fit_map / fit_vi say which column to
    rescale (fit_ml, on standardized columns, fits it: the test above)."""
    g, x, rng = base
    y = 1 + 0.5 * x + rng.normal(0, 0.5, G)[g] + rng.normal(size=N)
    m = lmmarg.Model("y ~ x + (x | g)", _frame(y, x * 1e-160, g))
    with pytest.raises(DesignError, match=rf"{method}: the fixed effect 'x' has values of at most .*rescale"):
        getattr(m, method)()
