"""Unit-free numerics: rescaling the response or a covariate changes posterior draws exactly as the units do (up
to Monte Carlo error) and leaves the sampler's efficiency alike (issue: y·1e-12 used to freeze every SD)."""
import warnings

import pytest

import lmmarg
from lmmarg import datasets

FORMULA = "Reaction ~ Days + (Days | Subject)"


def _fit(data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # short runs: SamplerWarnings about ESS are expected
        return lmmarg.Model(FORMULA, data).sample(chains=2, warmup=300, draws=300, seed=1, progress_bar=False)


@pytest.fixture(scope="module")
def base():
    return datasets.load("sleepstudy")


@pytest.fixture(scope="module")
def ref(base):
    return _fit(base).summary()


@pytest.mark.parametrize("what,a", [("Reaction", 1e-12), ("Reaction", 1e9), ("Days", 1e9)])
def test_posterior_is_equivariant_to_units(base, ref, what, a):
    s = _fit(base.assign(**{what: base[what] * a})).summary()
    # parameters carry units: y-units (a for Reaction), per-Days units (1/a for Days)
    unit = {"b_Intercept": a if what == "Reaction" else 1.0,
            "b_Days": a if what == "Reaction" else 1 / a,
            "sd_Subject__Intercept": a if what == "Reaction" else 1.0,
            "sd_Subject__Days": a if what == "Reaction" else 1 / a,
            "cor_Subject__Intercept__Days": 1.0,
            "sigma": a if what == "Reaction" else 1.0}
    for name, u in unit.items():
        m0, sd0 = ref.loc[name, "mean"], ref.loc[name, "sd"]
        # Monte Carlo error of the difference of two means with ESS >= ~150 each: well within 0.5 posterior SD
        assert abs(s.loc[name, "mean"] / u - m0) < 0.5 * sd0, (name, s.loc[name, "mean"] / u, m0, sd0)
        assert s.loc[name, "sd"] / u == pytest.approx(sd0, rel=0.35), name
        assert s.loc[name, "ess_bulk"] > 100, (name, s.loc[name, "ess_bulk"])
