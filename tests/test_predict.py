"""Fit.predict on a Fit built from a hand-made samples dict (no sampling needed): exact linear predictors,
new-level modes, lognormal scale, sigma_by."""


import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

import lmmarg  # noqa: E402
from lmmarg.results import Fit  # noqa: E402

C, D = 2, 50


@pytest.fixture(scope="module")
def model():
    return lmmarg.Model("Reaction ~ Days + (Days | Subject)", lmmarg.datasets.load("sleepstudy"))


def fake_samples(model, rng):
    t = model.terms[0]
    return {"beta": rng.normal([250, 10], [5, 1], size=(C, D, 2)), "sigma": np.abs(rng.normal(25, 1, size=(C, D))),
            "sd_Subject": np.abs(rng.normal([25, 6], 1, size=(C, D, 2))),
            "corr_Subject": np.broadcast_to(np.array([[1, 0.2], [0.2, 1]]), (C, D, 2, 2)).copy(),
            "u_Subject": rng.normal(0, 20, size=(C, D, t.n_groups, 2))}


def test_linpred_exact_for_seen_levels(model):
    rng = np.random.default_rng(0)
    s = fake_samples(model, rng)
    fit = Fit(model, s)
    new = pd.DataFrame({"Days": [0, 3, 9], "Subject": ["308", "309", "372"]})
    mu = fit.predict(new, kind="linpred")
    assert mu.shape == (C * D, 3)
    lv = model.terms[0].levels
    b, u = s["beta"].reshape(-1, 2), s["u_Subject"].reshape(C * D, -1, 2)
    for r, (days, subj) in enumerate(zip(new["Days"], new["Subject"])):
        g = lv.index(subj)
        np.testing.assert_allclose(mu[:, r], b[:, 0] + b[:, 1] * days + u[:, g, 0] + u[:, g, 1] * days)
    # response draws scatter around mu with sd sigma
    yr = fit.predict(new, seed=1)
    z = (yr - mu) / s["sigma"].reshape(-1, 1)
    assert abs(z.mean()) < 0.2 and 0.8 < z.std() < 1.2
    sub = fit.predict(new, draws=10, seed=3)
    assert sub.shape == (10, 3)
    # default new_data = the fitted rows; matches the training linear predictor
    np.testing.assert_allclose(fit.predict(kind="linpred"), fit._linpred_train().reshape(C * D, -1))


def test_new_levels_modes(model):
    rng = np.random.default_rng(1)
    s = fake_samples(model, rng)
    fit = Fit(model, s)
    new = pd.DataFrame({"Days": [2, 2, 2], "Subject": ["308", "new1", "new1"]})
    zero = fit.predict(new, new_levels="zero", kind="linpred")
    b = s["beta"].reshape(-1, 2)
    np.testing.assert_allclose(zero[:, 1], b[:, 0] + 2 * b[:, 1])
    samp = fit.predict(new, new_levels="sample", kind="linpred", seed=0)
    np.testing.assert_allclose(samp[:, 0], zero[:, 0])
    np.testing.assert_allclose(samp[:, 1], samp[:, 2])  # one new group shared by its rows
    dev = samp[:, 1] - zero[:, 1]  # u0 + 2 u1 with u ~ N(0, Sigma) per draw
    sd, r = s["sd_Subject"].reshape(-1, 2), 0.2
    expect = np.sqrt(np.mean(sd[:, 0] ** 2 + 4 * sd[:, 1] ** 2 + 4 * r * sd[:, 0] * sd[:, 1]))
    assert 0.75 * expect < dev.std() < 1.25 * expect
    with pytest.raises(ValueError, match=r"'new1'.*'Subject'"):
        fit.predict(new, new_levels="error")
    with pytest.raises(ValueError, match="new_levels"):
        fit.predict(new, new_levels="bogus")
    with pytest.raises(lmmarg.DesignError):
        fit.predict(pd.DataFrame({"Subject": ["308"]}))


def test_lognormal_and_sigma_by_predictions():
    rng = np.random.default_rng(2)
    n = 60
    df = pd.DataFrame({"y": np.exp(rng.normal(size=n)), "g": np.repeat(list("abc"), 20),
                       "h": np.tile(["p", "q"], 30)})
    m = lmmarg.Model("y ~ 1 + (1 | g)", df, family="lognormal", sigma_by="h")
    S = 4000
    s = {"beta": np.full((1, S, 1), 0.5), "sigma": np.tile([0.1, 0.5], (1, S, 1)), "sd_g": np.full((1, S, 1), 0.3),
         "u_g": np.zeros((1, S, 3, 1))}
    fit = Fit(m, s, method="test")
    new = pd.DataFrame({"g": ["a", "b"], "h": ["p", "q"]})
    y = fit.predict(new, seed=0)
    assert (y > 0).all()
    np.testing.assert_allclose(np.median(y, 0), np.exp(0.5), rtol=0.05)
    np.testing.assert_allclose(np.log(y).std(0), [0.1, 0.5], rtol=0.08)
    np.testing.assert_allclose(fit.predict(new, kind="mean")[0], np.exp(0.5 + 0.5 * np.array([0.01, 0.25])))
    with pytest.raises(ValueError, match="sigma_by"):
        fit.predict(pd.DataFrame({"g": ["a"], "h": ["zz"]}))


def test_fit_validates_samples(model):
    with pytest.raises(ValueError, match="beta"):
        Fit(model, {"sigma": np.ones((1, 3))})
    with pytest.raises(ValueError, match="leading dims"):
        Fit(model, {"beta": np.ones((1, 3, 2)), "sigma": np.ones((2, 3))})
