"""Models from sufficient statistics (issue #29): Model(formula, statistics or a file source) gives the DataFrame
model's density, ML/REML fit, conditional means, potential and predictions; what needs the rows raises RowsNeeded
naming the feature."""
import warnings

import numpy as np
import pandas as pd
import pytest

import lmmarg
from lmmarg import sufficient as su
from lmmarg.statdesign import RowsNeeded

F = "y ~ x + c + (x | a) + (1 | b)"


def make_data(seed=1, N=1500):
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, 30, N), rng.integers(0, 6, N)
    df = pd.DataFrame({"x": rng.normal(size=N) + 3.0, "c": rng.choice(["lo", "mid", "hi"], N),
                       "a": np.array([f"s{i:02d}" for i in a]), "b": b.astype(str)})
    ua = rng.normal(size=(30, 2)) * [1.0, 0.4]
    df["y"] = (10 + 0.5 * df.x + ua[a, 0] + ua[a, 1] * df.x + 0.7 * rng.normal(size=6)[b]
               + 0.5 * rng.normal(size=N) + (df.c == "hi") * 0.3)
    return df


def stats_of(df, formula=F, family="gaussian", cuts=(0, 400, 401, 1100)):
    cuts = list(cuts) + [len(df)]
    chunks = [df.iloc[cuts[i]:cuts[i + 1]] for i in range(len(cuts) - 1)]
    return su.statistics(su.design_spec(formula, chunks, family=family), chunks)


@pytest.fixture(scope="module")
def pair():
    df = make_data()
    return lmmarg.Model(F, df), lmmarg.Model(F, stats_of(df)), df


def params(m):
    beta = np.linspace(9.0, 11.0, len(m.fixed_names))
    cov = {"a": np.array([[1.0, 0.1], [0.1, 0.2]]), "b": np.array([[0.5]])}
    return beta, 0.6, cov


def test_names_levels_and_structure_match(pair):
    m, s, _ = pair
    assert s.fixed_names == m.fixed_names
    assert [t.name for t in s.terms] == [t.name for t in m.terms]
    for ts, tm in zip(s.terms, m.terms):
        assert ts.levels == tm.levels and ts.columns == tm.columns and ts.n_groups == tm.n_groups
    assert s.structure.kind == m.structure.kind == "crossed"
    assert s.n_obs == m.n_obs
    assert "sufficient statistics" in repr(s)


def test_density_and_conditional_means_equal_the_rows(pair):
    m, s, _ = pair
    beta, sigma, cov = params(m)
    a, b = m.log_marginal(beta, sigma, cov), s.log_marginal(beta, sigma, cov)
    assert abs(a - b) <= 1e-9 * abs(a)
    ra, rb = m.ranef_mean(beta, sigma, cov), s.ranef_mean(beta, sigma, cov)
    for k in ra:
        np.testing.assert_allclose(rb[k], ra[k], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("reml", [False, True])
def test_ml_and_reml_fits_equal_the_rows(pair, reml):
    m, s, _ = pair
    fa, fb = m.fit_ml(reml=reml), s.fit_ml(reml=reml)
    assert abs(fa.loglik - fb.loglik) <= 1e-9 * abs(fa.loglik)
    np.testing.assert_allclose(fb.beta, fa.beta, rtol=1e-5, atol=1e-6 * np.max(np.abs(fa.beta)))
    for k in fa.sd:
        np.testing.assert_allclose(fb.sd[k], fa.sd[k], rtol=1e-4)
    assert fb.converged
    with pytest.raises(RowsNeeded, match="fitted"):
        fb.fitted()


def test_potential_equals_the_rows_with_the_same_priors(pair):
    import jax
    import numpyro.distributions as dist
    m, s, df = pair
    # default priors from statistics use the mean and SD of y for brms's median and MAD: give data-free ones
    pri = {"Intercept": dist.Normal(10.0, 5.0), "b": dist.Normal(0.0, 2.0), "sigma": dist.HalfNormal(2.0),
           "sd": dist.HalfNormal(2.0)}
    ma, mb = lmmarg.Model(F, df, priors=pri), lmmarg.Model(F, s.statistics, priors=pri)
    pa, pb = ma.potential(), mb.potential()
    for seed in range(2):
        values = pa.to_constrained(pa.init_params(jax.random.PRNGKey(seed), num_chains=None))
        a, b = float(pa.log_density(values)), float(pb.log_density(values))
        assert np.isfinite(a) and abs(a - b) <= 1e-9 * abs(a)
    # the default priors: the same SD priors (scale max(2.5, spread of y)); the intercept's centred at mean(y)
    assert [p.text for p in s.priors if p.kind == "sd"] == [p.text for p in m.priors if p.kind == "sd"]
    icpt = [p.dist for p in s.priors if p.site == "b_Intercept"][0]
    assert abs(float(icpt.loc) - df.y.mean()) < 1e-9 * abs(df.y.mean())


def test_rows_needed_errors_name_the_feature(pair):
    m, s, df = pair
    with pytest.raises(RowsNeeded, match="marginalize"):
        s.potential(marginalize="none")
    with pytest.raises(RowsNeeded, match="sigma_by"):
        lmmarg.Model(F, s.statistics, sigma_by="b")
    with pytest.raises(RowsNeeded, match="poisson"):
        lmmarg.Model(F, s.statistics, family="poisson")
    with pytest.raises(lmmarg.DesignError, match="formula"):
        lmmarg.Model("y ~ x + (1 | a)", s.statistics)


def test_parquet_source_fit_save_load_and_predict(pair, tmp_path):
    import copy
    m, s, df = pair
    for k, part in enumerate(np.array_split(np.arange(len(df)), 3)):
        df.iloc[part].to_parquet(tmp_path / f"part-{k}.parquet")
    mf = lmmarg.Model(F, tmp_path)     # a directory of Parquet files, streamed
    beta, sigma, cov = params(m)
    a, b = m.log_marginal(beta, sigma, cov), mf.log_marginal(beta, sigma, cov)
    assert abs(a - b) <= 1e-9 * abs(a)
    with warnings.catch_warnings():   # a short run: its ESS warnings are expected
        warnings.simplefilter("ignore")
        fit = mf.sample(chains=1, warmup=60, draws=40, progress_bar=False, seed=3)
    assert set(fit.samples) >= {"beta", "sigma", "u_a", "u_b"} and np.isfinite(fit.samples["beta"]).all()
    assert list(fit.to_arviz().groups()) == ["posterior", "sample_stats"]
    with pytest.raises(RowsNeeded, match="Fit.loo"):
        fit.loo()
    with pytest.raises(RowsNeeded, match="pp_check"):
        fit.pp_check()
    with pytest.raises(RowsNeeded, match="new_data"):
        fit.predict()
    # saved with its statistics (no rows), loaded, predicting new rows as the DataFrame model does with the draws
    fit.save(tmp_path / "fit.zip")
    back = lmmarg.load(tmp_path / "fit.zip")
    assert back.model.statistics is not None and back.model.n_obs == len(df)
    as_df = copy.copy(fit)
    as_df.model = m
    new = df.iloc[:9]
    np.testing.assert_allclose(back.predict(new, kind="mean"), as_df.predict(new, kind="mean"), rtol=1e-12)
    # statistics saved to a file and loaded elsewhere: the model rebuilds its formulaic specs from the levels
    s.statistics.save(tmp_path / "s.npz")
    ml = lmmarg.Model(F, lmmarg.sufficient.load_statistics(tmp_path / "s.npz"))
    np.testing.assert_array_equal(ml.design.fixed_spec.get_model_matrix(new).to_numpy(),
                                  m.design.fixed_spec.get_model_matrix(new).to_numpy())


def test_lognormal_statistics_keep_the_jacobian():
    df = make_data(seed=4, N=600)
    df["y"] = np.exp(df.y / 5)
    f = "y ~ x + (1 | a)"
    m = lmmarg.Model(f, df, family="lognormal")
    s = lmmarg.Model(f, stats_of(df, f, family="lognormal", cuts=(0, 300)), family="lognormal")
    assert abs(m.log_jacobian - s.log_jacobian) <= 1e-10 * abs(m.log_jacobian)
    fa, fb = m.fit_ml(), s.fit_ml()
    assert abs(fa.loglik - fb.loglik) <= 1e-9 * abs(fa.loglik)
    with pytest.raises(lmmarg.DesignError, match="family"):
        lmmarg.Model(f, s.statistics)   # lognormal statistics are sums of log y


def test_guide_section_11_runs_as_written(capsys):
    """docs/guide.md section 11 (large data: files, Dask, federation) executes as printed; its True lines hold."""
    import pathlib
    import re
    text = (pathlib.Path(__file__).parent.parent / "docs" / "guide.md").read_text()
    section = text[text.index("## 11. Large data"):]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 3
    ns: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for code in blocks:
            exec(compile(code, "docs/guide.md section 11", "exec"), ns)
    out = capsys.readouterr().out
    assert out.count("True") == 2 and "False" not in out
    assert "from sufficient statistics" in out


def test_no_random_terms_and_beta_integrated_out():
    """A model without random-effect terms from statistics: its density from the sums alone, and with β integrated
    out (normal priors) the potential's density equals the DataFrame model's."""
    import jax
    import numpyro.distributions as dist
    df = make_data(seed=7, N=400)
    pri = {"Intercept": dist.Normal(10.0, 5.0), "b": dist.Normal(0.0, 2.0), "sigma": dist.HalfNormal(2.0)}
    for f in ("y ~ x + c", "y ~ x + (1 | a)"):
        m = lmmarg.Model(f, df, priors=pri)
        s = lmmarg.Model(f, stats_of(df, f, cuts=(0, 150)), priors=pri)
        beta = np.linspace(9.0, 11.0, len(m.fixed_names))
        cov = {"a": np.array([[0.7]])} if "a)" in f else {}
        a, b = m.log_marginal(beta, 0.8, cov), s.log_marginal(beta, 0.8, cov)
        assert abs(a - b) <= 1e-9 * abs(a)
        pa, pb = m.potential(marginalize_beta=True), s.potential(marginalize_beta=True)
        values = pa.to_constrained(pa.init_params(jax.random.PRNGKey(1), num_chains=None))
        la, lb = float(pa.log_density(values)), float(pb.log_density(values))
        assert np.isfinite(la) and abs(la - lb) <= 1e-9 * abs(la)
