"""The brms workflow on a fit: pickling/saving, ArviZ groups, fixef/coef, pp_check, conditional_effects,
integrated LOO (checked against a dense computation from the full marginal covariance), compare, R formula
habits and warnings. One small NUTS fit per module; everything else uses hand-made draws."""


import os  # noqa: E402
import pickle  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402

import matplotlib  # noqa: E402

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

import lmmarg  # noqa: E402
from lmmarg.results import loo as lmloo  # noqa: E402
from lmmarg.design import DesignError  # noqa: E402
from lmmarg.formula import FormulaError  # noqa: E402
from lmmarg.results import Fit  # noqa: E402

from modelcache import sleepstudy, sleepstudy_fit, sleepstudy_ml_fit, sleepstudy_model  # noqa: E402

C, D = 2, 4  # chains, draws of hand-made samples


@pytest.fixture(scope="module")
def sleep():
    return sleepstudy()


@pytest.fixture(scope="module")
def fit():
    return sleepstudy_fit(draws=200, warmup=200, chains=2, seed=1)


def fake_samples(model, seed=0, chains=C, draws=D):
    """Plausible draws on the response's scale: β around OLS, σ and SDs around sd(y) / 3, random correlations."""
    rng = np.random.default_rng(seed)
    X, y = model.design.X, model.y
    b = np.linalg.lstsq(X, y, rcond=None)[0]
    sy = y.std()
    s = {"beta": b + rng.normal(0, 0.05 * sy, (chains, draws, len(b)))}
    sspec = model.sigma_spec
    s["sigma"] = np.abs(rng.normal(sy / 3, sy / 30, (chains, draws) + ((len(sspec.levels),) if sspec.kind == "by"
                                                                         else ())))
    for t in model.terms:
        s[f"sd_{t.name}"] = np.abs(rng.normal(sy / 3, sy / 10, (chains, draws, t.d)))
        if t.d > 1:
            A = rng.normal(size=(chains, draws, t.d, t.d))
            S = A @ np.swapaxes(A, -1, -2) + np.eye(t.d)
            dd = np.sqrt(np.einsum("...ii->...i", S))
            s[f"corr_{t.name}"] = S / dd[..., :, None] / dd[..., None, :]
        s[f"u_{t.name}"] = rng.normal(0, sy / 3, (chains, draws, t.n_groups, t.d))
    return s


def dense_reference(fit, group=None):
    """log p(y_i | y_-i, θ) (or per group) from the full marginal covariance V, inverted densely: (C, D, ·)."""
    m, s = fit.model, fit.samples
    sig = fit.residual_sd()
    jac = -np.log(m.design.y) if m.family == "lognormal" else np.zeros(m.n_obs)
    out = np.zeros((fit.n_chains, fit.n_draws, m.n_obs))
    if group is not None:
        codes = np.unique(m.design.data[group].astype(str), return_inverse=True)[1]
        out = np.zeros((fit.n_chains, fit.n_draws, codes.max() + 1))
    for c in range(fit.n_chains):
        for d in range(fit.n_draws):
            V = np.diag(sig[c, d] ** 2)
            for t in m.terms:
                sd = s[f"sd_{t.name}"][c, d]
                R = s[f"corr_{t.name}"][c, d] if t.d > 1 else np.eye(1)
                Z = t.Z_sparse.toarray()
                V = V + Z @ np.kron(np.eye(t.n_groups), np.diag(sd) @ R @ np.diag(sd)) @ Z.T
            P = np.linalg.inv(V)
            Pr = P @ (m.y - m.design.X @ s["beta"][c, d])
            if group is None:
                out[c, d] = -0.5 * np.log(2 * np.pi / np.diag(P)) - 0.5 * Pr**2 / np.diag(P) + jac
                continue
            for g in range(codes.max() + 1):
                ii = np.flatnonzero(codes == g)
                Pgg = P[np.ix_(ii, ii)]
                out[c, d, g] = (-0.5 * len(ii) * np.log(2 * np.pi) + 0.5 * np.linalg.slogdet(Pgg)[1]
                                - 0.5 * Pr[ii] @ np.linalg.solve(Pgg, Pr[ii]) + jac[ii].sum())
    return out


# -- pickling ---------------------------------------------------------------------------------------------------


def test_fit_pickles_and_predicts_after_loading(fit, tmp_path, sleep):
    new = pd.DataFrame({"Days": [0, 5], "Subject": ["308", "new"]})
    before = fit.predict(new, seed=3)
    again = pickle.loads(pickle.dumps(fit))
    np.testing.assert_allclose(again.predict(new, seed=3), before)
    fit.save(tmp_path / "fit.pkl")
    loaded = lmmarg.load(tmp_path / "fit.pkl")
    assert isinstance(loaded, Fit)
    np.testing.assert_allclose(loaded.predict(new, seed=3), before)
    assert list(loaded.summary().index) == list(fit.summary().index)
    # the loaded model still evaluates its marginal likelihood (caches rebuilt on demand)
    cov = {"Subject": np.diag([500.0, 30.0])}
    assert loaded.model.log_marginal([250, 10], 25, cov) == pytest.approx(fit.model.log_marginal([250, 10], 25, cov))
    with open(tmp_path / "other.pkl", "wb") as fh:
        pickle.dump({"not": "a fit"}, fh)
    with pytest.raises(TypeError, match="not an lmmarg fit"):
        lmmarg.load(tmp_path / "other.pkl")


# -- ArviZ, fixef, coef -----------------------------------------------------------------------------------------


def test_to_arviz_groups_and_plots(fit):
    import arviz as az

    idata = fit.to_arviz()
    for g in ("posterior", "posterior_predictive", "log_likelihood", "sample_stats", "observed_data"):
        assert hasattr(idata, g), g
    post = idata.posterior
    assert {"b_Intercept", "b_Days", "sd_Subject__Intercept", "sd_Subject__Days", "cor_Subject__Intercept__Days",
            "sigma", "r_Subject"} == set(post.data_vars)
    assert post["b_Days"].shape == (2, 200)
    assert post["r_Subject"].shape == (2, 200, 18, 2)
    assert list(post["r_Subject"].coords["r_Subject__col"].values) == ["Intercept", "Days"]
    np.testing.assert_allclose(post["b_Days"].values, fit.samples["beta"][..., 1])
    assert idata.posterior_predictive["y"].shape == (2, 200, 180)
    np.testing.assert_allclose(idata.log_likelihood["y"].values, fit.log_likelihood())
    np.testing.assert_allclose(idata.observed_data["y"].values, fit.model.design.y)
    axes = az.plot_trace(idata, var_names=["b_Intercept", "b_Days", "cor_Subject__Intercept__Days"])
    assert axes.shape == (3, 2)  # one row per coefficient
    az.plot_ppc(idata, num_pp_samples=10)
    plt.close("all")
    assert not hasattr(fit.to_arviz(log_likelihood=None, posterior_predictive=False), "log_likelihood")


def test_fixed_parameters_go_to_constant_data(sleep):
    m = lmmarg.Model("Reaction ~ Days + (Days | Subject)", sleep, priors={"sd_Subject__Days": 5.0})
    s = fake_samples(m)
    s["sd_Subject"][..., 1] = 5.0
    idata = Fit(m, s).to_arviz(log_likelihood=False, posterior_predictive=False)
    assert "sd_Subject__Days" not in idata.posterior and np.ravel(idata.constant_data["sd_Subject__Days"])[0] == 5.0


def test_fixef_and_coef(fit):
    fe = fit.fixef()
    assert list(fe.index) == ["Intercept", "Days"]
    assert list(fe.columns) == ["Estimate", "Est.Error", "Q2.5", "Q97.5"]
    b = fit.samples["beta"].reshape(-1, 2)
    np.testing.assert_allclose(fe["Estimate"], b.mean(0))
    np.testing.assert_allclose(fe["Q97.5"], np.quantile(b, 0.975, axis=0))
    co = fit.coef()["Subject"]
    u = fit.samples["u_Subject"].reshape(-1, 18, 2)
    lv = fit.model.terms[0].levels
    assert list(co.index) == lv and list(dict.fromkeys(co.columns.get_level_values(0))) == ["Intercept", "Days"]
    np.testing.assert_allclose(co["Days"]["Estimate"], (b[:, 1:2] + u[:, :, 1]).mean(0))
    np.testing.assert_allclose(co["Intercept"]["Q2.5"], np.quantile(b[:, :1] + u[:, :, 0], 0.025, axis=0))


def test_bayes_r2(fit):
    r2 = fit.bayes_R2()
    mu = fit.predict(kind="mean")
    e = fit.model.design.y[None] - mu
    per_draw = mu.var(1, ddof=1) / (mu.var(1, ddof=1) + e.var(1, ddof=1))
    assert r2.loc["R2", "Estimate"] == pytest.approx(per_draw.mean())
    assert 0.6 < r2.loc["R2", "Estimate"] < 0.95  # subject effects explain most of the variance


# -- integrated LOO ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("formula,data,kw,group", [
    ("Reaction ~ Days + (Days | Subject)", "sleepstudy", {}, "Subject"),
    ("Reaction ~ Days + (Days || Subject)", "sleepstudy", {}, "Subject"),
    ("Reaction ~ Days + (Days | Subject)", "sleepstudy", {"family": "lognormal"}, "Subject"),
    ("diameter ~ 1 + (1 | plate) + (1 | sample)", "Penicillin", {}, "sample"),   # crossed
    ("strength ~ 1 + (1 | batch/cask)", "Pastes", {}, "batch"),                 # nested
    ("diameter ~ 1 + (1 | plate) + (1 | sample)", "Penicillin", {"sigma_by": "sample"}, "plate"),
    ("Reaction ~ Days", "sleepstudy", {}, "Subject"),                           # no random effects
])
def test_integrated_loglik_matches_dense_marginal(formula, data, kw, group):
    m = lmmarg.Model(formula, lmmarg.datasets.load(data), **kw)
    f = Fit(m, fake_samples(m))
    np.testing.assert_allclose(lmloo.pointwise_loglik(f), dense_reference(f), rtol=1e-10, atol=1e-8)
    got, labels = lmloo.group_loglik(f, group)
    assert len(labels) == m.design.data[group].nunique()
    np.testing.assert_allclose(got, dense_reference(f, group), rtol=1e-10, atol=1e-8)


def test_too_large_dense_block_falls_back(monkeypatch):
    m = lmmarg.Model("diameter ~ 1 + (1 | plate) + (1 | sample)", lmmarg.datasets.load("Penicillin"))
    f = Fit(m, fake_samples(m))
    monkeypatch.setattr(lmloo, "MAX_DENSE", 3)  # sample's 6 levels: pretend they are too many
    with pytest.raises(lmloo.LooCostError, match="integrated=False"):
        f.loo()
    with pytest.warns(UserWarning, match="conditional on the sampled random effects") as rec:
        idata = f.to_arviz(posterior_predictive=False)
    assert os.path.basename(rec[0].filename) == "test_workflow.py"
    np.testing.assert_allclose(idata.log_likelihood["y"].values, f.log_likelihood(kind="conditional"))


def test_loo_integrated_and_leave_group_out(fit):
    import arviz as az

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ArviZ's Pareto-k warnings on a short chain
        li = fit.loo()
        lc = fit.loo(integrated=False)
        lg = fit.loo(group="Subject")
    assert isinstance(li, az.ELPDData) and li.n_data_points == 180 and lg.n_data_points == 18
    np.testing.assert_allclose(li.loo_i.values.sum(), li.elpd_loo)
    # integrating the effects out: far fewer effective parameters than conditioning on 36 random effects
    assert li.p_loo < 15 < lc.p_loo
    assert (li.pareto_k.values > 0.7).sum() <= (lc.pareto_k.values > 0.7).sum()
    assert li.attrs["lmmarg_scale"] == "Reaction"
    with pytest.raises(ValueError, match="no term or data column 'Subjekt'"):
        fit.loo(group="Subjekt")


def test_compare_warns_on_different_response_scales(sleep):
    m_log = lmmarg.Model("log(Reaction) ~ Days + (Days | Subject)", sleep)
    m_ln = lmmarg.Model("Reaction ~ Days + (Days | Subject)", sleep, family="lognormal")
    f_log, f_ln = Fit(m_log, fake_samples(m_log)), Fit(m_ln, fake_samples(m_ln, seed=1))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        lmmarg.compare({"log": f_log, "lognormal": f_ln})
    scale = [w for w in rec if "different response scales" in str(w.message)]
    assert len(scale) == 1 and "'log(Reaction)'" in str(scale[0].message)
    assert os.path.basename(scale[0].filename) == "test_workflow.py"  # points at the caller
    # same model twice: no scale warning, a ranked table
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        table = lmmarg.compare({"a": f_ln, "b": Fit(m_ln, fake_samples(m_ln, seed=2))})
    assert not [w for w in rec if "different response scales" in str(w.message)]
    assert list(table["rank"]) == [0, 1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pareto k of 8 hand-made draws
        obs, subj = f_ln.loo(), f_ln.loo(group="Subject")
    with pytest.raises(ValueError, match="leave out different units"):
        lmmarg.compare({"obs": obs, "subject": subj})


# -- plots ------------------------------------------------------------------------------------------------------


def test_pp_check_kinds(fit):
    ax = fit.pp_check(ndraws=10)
    assert len(ax.lines) == 11  # 10 replicated densities + the observed one
    ax = fit.pp_check("stat", stat="sd")
    assert len(ax.patches) == 30 and len(ax.lines) == 1
    ax = fit.pp_check("stat", group="Subject")
    assert len(ax.get_xticks()) == 18
    with pytest.raises(ValueError, match="kind must be"):
        fit.pp_check("violin")
    with pytest.raises(ValueError, match="no data column 'Subjekt'"):
        fit.pp_check("stat", group="Subjekt")
    plt.close("all")


def test_conditional_effects_numeric(fit):
    ce = fit.conditional_effects("Days", resolution=5, plot=True)
    assert list(ce.columns) == ["Days", "estimate", "lower", "upper"]
    np.testing.assert_allclose(ce["Days"], np.linspace(0, 9, 5))
    b = fit.samples["beta"].reshape(-1, 2)
    mu = b[:, :1] + b[:, 1:] * ce["Days"].to_numpy()[None]  # random effects at zero
    np.testing.assert_allclose(ce["estimate"], mu.mean(0))
    np.testing.assert_allclose(ce["lower"], np.quantile(mu, 0.025, axis=0))
    assert ce.attrs["ax"].get_xlabel() == "Days"
    with pytest.raises(ValueError, match="not a predictor of the fixed effects"):
        fit.conditional_effects("Subject")
    plt.close("all")


def test_conditional_effects_factor_and_other_predictors():
    rng = np.random.default_rng(0)
    n = 120
    df = pd.DataFrame({"g": rng.choice(["a", "b", "c"], n), "x": rng.normal(2, 1, n),
                       "s": rng.integers(0, 10, n).astype(str)})
    df["y"] = rng.normal(size=n)
    m = lmmarg.Model("y ~ g + x + (1 | s)", df)
    f = Fit(m, fake_samples(m))
    ce = f.conditional_effects("g")
    assert list(ce["g"]) == ["a", "b", "c"] and np.allclose(ce["x"], df["x"].mean())
    b = f.samples["beta"].reshape(-1, 4)  # Intercept, g[T.b], g[T.c], x
    est = [(b[:, 0] + b[:, 3] * df["x"].mean() + (b[:, k] if k else 0)).mean() for k in (0, 1, 2)]
    np.testing.assert_allclose(ce["estimate"], est)
    ce = f.conditional_effects("x", resolution=3, conditions={"g": "c"})
    np.testing.assert_allclose(ce["estimate"], (b[:, :1] + b[:, 2:3] + b[:, 3:] * ce["x"].to_numpy()).mean(0))


# -- R habits, warnings, names ----------------------------------------------------------------------------------


def test_r_formula_habits(sleep):
    m = lmmarg.Model("Reaction ~ Days + I(Days^2) + (1 | Subject)", sleep)
    np.testing.assert_allclose(m.design.X[:, 2], sleep["Days"].to_numpy() ** 2)  # a square, not Days XOR 2
    a = lmmarg.Model("Reaction ~ factor(Days) + (1 | Subject)", sleep)
    b = lmmarg.Model("Reaction ~ C(Days) + (1 | Subject)", sleep)
    np.testing.assert_array_equal(a.design.X, b.design.X)
    assert lmmarg.formula.r_habits("(a + b)^2 + log(x^2) + as.factor(g)") == "(a + b)^2 + log(x**2) + C(g)"
    with pytest.raises(FormulaError, match=r"offset\(\) in 'offset\(Days\)'.*top-level term"):
        lmmarg.Model("Reaction ~ Days + (offset(Days) | Subject)", sleep)


def test_double_bar_splits_like_lme4_expand_double_verts():
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"M": rng.choice(list("ABC"), 90), "W": rng.integers(0, 6, 90).astype(str),
                       "x": rng.normal(size=90), "y": rng.normal(size=90)})
    m = lmmarg.Model("y ~ 1 + (x * M || W)", df)
    # lme4: (1 | W) + (0 + x | W) + (0 + M | W) + (0 + x:M | W)
    assert [t.columns for t in m.terms] == [["Intercept"], ["x"], ["M[A]", "M[B]", "M[C]"],
                                            ["x:M[A]", "x:M[B]", "x:M[C]"]]
    np.testing.assert_array_equal(m.terms[2].Z, pd.get_dummies(df["M"]).to_numpy(float))
    f = Fit(m, fake_samples(m))  # prediction rebuilds each piece's own columns
    new = pd.DataFrame({"x": [1.0], "M": ["B"], "W": ["0"]})
    s = f.samples
    g = m.terms[0].levels.index("0")
    want = (s["beta"][..., 0] + s["u_W"][..., g, 0] + s["u_W.1"][..., g, 0] + s["u_W.2"][..., g, 1]
            + s["u_W.3"][..., g, 1]).reshape(-1)
    np.testing.assert_allclose(f.predict(new, kind="linpred")[:, 0], want)


def test_offset_term_in_fitting_and_prediction(sleep):
    d = sleep.assign(t=1.0 + sleep["Days"] / 3)
    m = lmmarg.Model("Reaction ~ Days + offset(2 * t) + (1 | Subject)", d)
    ref = lmmarg.Model("I(Reaction - 2 * t) ~ Days + (1 | Subject)", d)
    np.testing.assert_allclose(m.y, ref.y)  # the model is fitted on the response minus the offset
    assert m.fixed_names == ["Intercept", "Days"]
    f = Fit(m, fake_samples(m))
    b = f.samples["beta"].reshape(-1, 2)
    new = pd.DataFrame({"Days": [1.0, 1.0], "t": [0.0, 5.0], "Subject": ["new", "new"]})
    mu = f.predict(new, kind="linpred", new_levels="zero")
    np.testing.assert_allclose(mu, b[:, :1] + b[:, 1:] + 2 * new["t"].to_numpy()[None])
    # fitted rows: the default prediction carries the training offset
    np.testing.assert_allclose(f.predict(kind="linpred").reshape(C, D, -1),
                               f._linpred_train() + 2 * d["t"].to_numpy())
    # the integrated LOO is the same as for the model of the shifted response
    fr = Fit(ref, f.samples)
    np.testing.assert_allclose(lmloo.pointwise_loglik(f), lmloo.pointwise_loglik(fr))
    with pytest.raises(DesignError, match="offset"):
        f.predict(new.drop(columns="t"))
    with pytest.raises(FormulaError, match="cannot be subtracted"):
        lmmarg.Model("Reaction ~ Days - offset(t) + (1 | Subject)", d)


def test_discrete_response_warns_at_user_line(sleep):
    d = sleep.assign(fast=(sleep["Reaction"] < 280).astype(int), n=(sleep["Days"] % 3))
    with pytest.warns(UserWarning, match="0 and 1.*family='bernoulli'") as rec:
        lmmarg.Model("fast ~ Days + (1 | Subject)", d)
    assert os.path.basename(rec[0].filename) == "test_workflow.py"
    with pytest.warns(UserWarning, match="counts.*family='poisson'"):
        lmmarg.Model("n ~ Days + (1 | Subject)", d)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lmmarg.Model("Reaction ~ Days + (1 | Subject)", sleep)


def test_unseen_fixed_effect_level_raises():
    df = pd.DataFrame({"y": np.arange(12.0) / 3, "g": list("abc") * 4, "s": list("pq") * 6})
    m = lmmarg.Model("y ~ g + (1 | s)", df)
    f = Fit(m, fake_samples(m))
    with pytest.raises(DesignError, match=r"column 'g' has level\(s\) \['z'\]"):
        f.predict(pd.DataFrame({"g": ["a", "z"], "s": ["p", "p"]}))
    assert f.predict(pd.DataFrame({"g": ["c"], "s": ["p"]})).shape == (C * D, 1)


def test_public_submodules_after_import():
    code = "import lmmarg; print(lmmarg.results.Fit.__name__, lmmarg.loo.compare.__name__, lmmarg.priors.LKJ.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["Fit", "compare", "LKJ"]


def test_prior_and_summary_names_agree():
    rng = np.random.default_rng(0)
    n = 200
    df = pd.DataFrame({"subj": rng.integers(0, 10, n).astype(str), "w": rng.normal(size=n)})
    df["y"] = rng.normal(size=n)
    m = lmmarg.Model("y ~ w + (w || subj)", df, sigma="~ 1 + (w | subj)")
    f = Fit(m, {**fake_samples(m), "b_sigma": np.zeros((C, D, 1)), "sd_sigma_subj": np.ones((C, D, 2)),
                "corr_sigma_subj": np.broadcast_to(np.eye(2), (C, D, 2, 2)),
                "u_sigma_subj": np.zeros((C, D, 10, 2))})
    labels = set(m.priors.table["parameter"])
    rows = set(f.summary().index)
    assert {"sd_subj__Intercept", "sd_subj__w", "sd_subj__sigma_Intercept", "sd_subj__sigma_w"} <= labels & rows
    assert "cor_sigma_subj" in labels


def test_map_summary_has_no_spread(sleep):
    m = lmmarg.Model("Reaction ~ Days + (Days | Subject)", sleep)
    s = fake_samples(m, chains=1, draws=1)
    summ = Fit(m, s, method="map").summary()
    assert summ["sd"].isna().all() and summ["q2.5"].isna().all()
    np.testing.assert_allclose(summ.loc["b_Days", "mean"], s["beta"][0, 0, 1])


def test_guide_workflow_section_runs_as_written(tmp_path, monkeypatch):
    """Every python block of docs/guide.md section 10 runs, in order, in a scratch directory."""
    import re

    text = open(os.path.join(os.path.dirname(__file__), "..", "docs", "guide.md")).read()
    section = text[text.index("## 10. The brms workflow"):]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) >= 5
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ArviZ's Pareto-k and the documented scale warnings
        for code in blocks:
            exec(compile(code, "docs/guide.md", "exec"), ns)
    assert (tmp_path / "pp_check.png").exists() and (tmp_path / "sleep_fit.lmm").exists()
    assert ns["logo"].n_data_points == 18
    plt.close("all")


def test_map_and_ml_fits_pickle_after_their_caches_exist():
    """fit_map / fit_ml leave compiled caches on the model; pickling drops them and the copies still work."""
    model, fml = sleepstudy_model(), sleepstudy_ml_fit()      # the shared model, fitted by fit_ml already
    fmap = model.fit_map()
    back = pickle.loads(pickle.dumps(fmap))
    assert back.predict(lmmarg.datasets.load("sleepstudy").head(2), draws=1).shape == (1, 2)
    ml2 = pickle.loads(pickle.dumps(fml))
    assert ml2.loglik == pytest.approx(fml.loglik)
    assert ml2.model.fit_ml().loglik == pytest.approx(fml.loglik, rel=1e-10)
