"""Priors: data-scaled defaults, overrides by brms-like name, fixed parameters, errors."""
import jax


import numpy as np  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

import lmmarg  # noqa: E402
from lmmarg.priors import LKJ  # noqa: E402


@pytest.fixture(scope="module")
def data():
    return lmmarg.datasets.load("sleepstudy")


def test_default_table(data):
    m = lmmarg.Model("Reaction ~ Days + (Days | Subject)", data)
    tab = m.priors.table
    assert list(tab["parameter"]) == ["b_Intercept", "b_Days", "sigma", "sd_Subject__Intercept", "sd_Subject__Days",
                                      "cor_Subject"]
    assert set(tab["source"]) == {"default"}
    y = data["Reaction"].to_numpy()
    mad = 1.4826 * np.median(np.abs(y - np.median(y)))
    p = m.priors["b_Intercept"].dist
    assert isinstance(p, dist.StudentT) and float(p.loc) == pytest.approx(np.median(y))
    assert float(p.scale) == pytest.approx(max(2.5, mad))
    b = m.priors["b_Days"].dist
    assert float(b.scale) == pytest.approx(2.5 * y.std(ddof=1) / data["Days"].std(ddof=1))
    text = str(m.priors)
    assert "student_t(3" in text and "lkj(1)" in text and "half_student_t" in text


def test_overrides_most_specific_wins(data):
    m = lmmarg.Model("Reaction ~ Days + (Days | Subject)", data,
                     priors={"b": dist.Normal(0, 10), "sd": dist.HalfNormal(30), "sd_Subject__Days": dist.HalfNormal(5),
                             "cor": LKJ(2.0), "sigma": dist.Exponential(0.1)})
    pr = m.priors
    assert float(pr["b_Days"].dist.scale) == 10 and pr["b_Days"].source == "user"
    assert pr["b_Intercept"].source == "default"
    assert float(pr["sd_Subject__Intercept"].dist.scale) == 30
    assert float(pr["sd_Subject__Days"].dist.scale) == 5
    assert pr["cor_Subject"].dist.eta == 2.0
    assert isinstance(pr["sigma"].dist, dist.Exponential)
    assert "user" in str(pr)


def test_fixed_parameters_are_constant_and_not_sampled(data):
    m = lmmarg.Model("Reaction ~ Days + (Days | Subject)", data,
                     priors={"sd_Subject__Days": 5.0, "cor_Subject": 0.0, "b_Days": 10.0})
    pot = m.potential()
    assert "sd_Subject__Days" not in pot.sites and "cor_Subject" not in pot.sites and "b_Days" not in pot.sites
    assert "sd_Subject__Intercept" in pot.sites
    draws = pot.constrain(pot.init_params(jax.random.PRNGKey(0), num_chains=3))
    np.testing.assert_allclose(draws["sd_Subject"][:, 1], 5.0)
    np.testing.assert_allclose(draws["corr_Subject"], np.broadcast_to(np.eye(2), (3, 2, 2)))
    np.testing.assert_allclose(draws["beta"][:, 1], 10.0)
    assert len(np.unique(draws["beta"][:, 0])) == 3
    assert "fixed 5" in str(m.priors)


def test_fix_every_sd_like_instEval(data):
    m = lmmarg.Model("Reaction ~ Days + (1 | Subject) + (0 + Days | Subject)", data, priors={"sd": 1.0})
    pot = m.potential()
    assert not any(n.startswith("sd_") for n in pot.sites)
    d = pot.constrain(pot.init_params(jax.random.PRNGKey(0), 2))
    assert (d["sd_Subject"] == 1).all() and (d["sd_Subject.1"] == 1).all()


def test_unknown_and_bad_priors(data):
    with pytest.raises(ValueError, match="unknown prior name.*sd_Subjct.*valid names"):
        lmmarg.Model("Reaction ~ Days + (Days | Subject)", data, priors={"sd_Subjct": dist.HalfNormal(1)})
    with pytest.raises(ValueError, match="sigma"):
        lmmarg.Model("Reaction ~ Days + (Days | Subject)", data, priors={"sigma": dist.Normal(0, 1)})
    with pytest.raises(ValueError, match=">= 0"):
        lmmarg.Model("Reaction ~ Days + (Days | Subject)", data, priors={"sd": -1})
    with pytest.raises(TypeError, match="cor"):
        lmmarg.Model("Reaction ~ Days + (Days | Subject)", data, priors={"cor": dist.Normal(0, 1)})
    with pytest.raises(ValueError, match="sigma_by"):
        lmmarg.Model("Reaction ~ Days + (Days | Subject)", data, sigma_by="Subject", sigma="~ Days")
    with pytest.raises(lmmarg.DesignError, match="Grp"):
        lmmarg.Model("Reaction ~ Days + (Days | Subject)", data, sigma_by="Grp")


def test_sigma_formula_priors():
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"y": rng.normal(size=60), "c": np.tile([0.0, 1.0], 30), "g": np.repeat(list("abcdef"), 10)})
    m = lmmarg.Model("y ~ c + (1 | g)", df, sigma="~ c + (c | g)", priors={"b_sigma": dist.Normal(0, 0.5)})
    names = list(m.priors.table["parameter"])
    assert "sigma" not in names
    assert {"b_sigma_Intercept", "b_sigma_c", "sd_g__sigma_Intercept", "sd_g__sigma_c"} <= set(names)
    assert float(m.priors["b_sigma_c"].dist.scale) == 0.5
    pot = m.potential()
    assert "z_sigma_g" in pot.sites and "cor_sigma_g" in pot.sites
