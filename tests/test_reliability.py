"""Reliability on odd inputs (issue 16): float32 next to float64, clear errors/warnings naming the culprit,
and a fixed-effects rank check that is linear in N."""
import os
import subprocess
import sys
import textwrap
import warnings

import jax
import numpy as np
import numpyro.distributions as dist
import pandas as pd
import pytest

import lmmarg
from lmmarg.design import DesignError, aliased_columns, build_design, clearly_full_rank, qr_r
from lmmarg.formula import FormulaError
from lmmarg.priors import LKJ, half_student_t


SLEEP_FORMULA = "Reaction ~ Days + (Days | Subject)"


@pytest.fixture(scope="module")
def sleep():
    return lmmarg.datasets.load("sleepstudy")


def frame(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"y": rng.normal(size=n), "x": rng.normal(size=n), "s": rng.normal(size=n),
                         "g": np.repeat(list("abcdefgh"), n // 8)})


# ----------------------------------------------------------------------------------------- float32 next to float64
def test_float32_and_float64_models_coexist(sleep):
    m64 = lmmarg.Model(SLEEP_FORMULA, sleep)
    m32 = lmmarg.Model(SLEEP_FORMULA, sleep, dtype="float32")
    assert jax.config.jax_enable_x64  # a float64 model exists: x64 is on for the whole process
    cov = {"Subject": np.array([[600.0, 10.0], [10.0, 35.0]])}
    l64, l32 = m64.log_marginal([251.0, 10.0], 25.0, cov), m32.log_marginal([251.0, 10.0], 25.0, cov)
    assert l32 == pytest.approx(l64, rel=1e-5)
    f64 = m64.fit_ml()
    for _ in range(2):  # the second fit reuses the float32 model's compiled criterion
        f32 = m32.fit_ml()
        assert f32.loglik == pytest.approx(f64.loglik, abs=1e-3)
        np.testing.assert_allclose(f32.beta, f64.beta, rtol=1e-3)
        assert f32.sigma == pytest.approx(f64.sigma, rel=1e-3)
    with warnings.catch_warnings():  # 10 draws warn about ESS/R-hat; only the dtypes and finiteness matter here
        warnings.simplefilter("ignore")
        fit = m32.sample(draws=10, warmup=10, chains=2, progress_bar=False)
    beta = np.asarray(fit.samples["beta"])
    assert beta.shape == (2, 10, 2) and np.isfinite(beta).all()
    assert np.isfinite(np.asarray(fit.samples["corr_Subject"])).all()
    assert np.isfinite(np.asarray(fit.samples["u_Subject"])).all()


def test_float32_model_survives_x64_switched_on_later():
    """A float32 model built and used with x64 off keeps working after a float64 model turns x64 on."""
    code = textwrap.dedent(f"""
        import jax, numpy as np, lmmarg
        df = lmmarg.datasets.load("sleepstudy")
        m32 = lmmarg.Model({SLEEP_FORMULA!r}, df, dtype="float32")
        assert not jax.config.jax_enable_x64
        cov = {{"Subject": np.array([[600.0, 10.0], [10.0, 35.0]])}}
        before = m32.log_marginal([251.0, 10.0], 25.0, cov)
        ll_before = m32.fit_ml().loglik
        m64 = lmmarg.Model({SLEEP_FORMULA!r}, df)
        assert jax.config.jax_enable_x64
        assert abs(m32.log_marginal([251.0, 10.0], 25.0, cov) - before) < 1e-3
        assert abs(m32.fit_ml().loglik - m64.fit_ml().loglik) < 1e-3
        assert abs(ll_before - m64.fit_ml().loglik) < 1e-3
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "JAX_ENABLE_X64"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                         check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


# ----------------------------------------------------------------------------------------- odd inputs
def test_group_column_with_1_and_string_1():
    df = frame()
    df["h"] = pd.Series([1] * 20 + ["1"] * 20, dtype=object)
    with pytest.raises(DesignError, match=r"grouping column 'h' .*1 \(int\) and '1' \(str\).*astype\(str\)"):
        lmmarg.Model("y ~ x + (1 | h)", df)


def test_data_column_named_intercept():
    df = frame().assign(Intercept=np.arange(40.0))
    with pytest.raises(DesignError, match="data column 'Intercept' .*rename"):
        lmmarg.Model("y ~ x + Intercept + (1 | g)", df)
    assert lmmarg.Model("y ~ x + (1 | g)", df).fixed_names == ["Intercept", "x"]  # unused: harmless


@pytest.mark.parametrize("kind", ["object", "float"])
def test_nan_in_sigma_by_column(kind):
    df = frame()
    h = np.tile([0.0, 1.0], 20)
    df["h"] = h if kind == "float" else np.where(h == 0, "u", "v").astype(object)
    df.loc[3, "h"] = np.nan
    with pytest.raises(DesignError, match="missing or non-finite values in column 'h'"):
        lmmarg.Model("y ~ x + (1 | g)", df, sigma_by="h")
    with pytest.warns(UserWarning, match="dropped 1 of 40 rows.*'h'"):
        m = lmmarg.Model("y ~ x + (1 | g)", df, sigma_by="h", na_action="drop")
    assert m.n_obs == 39 and len(m.sigma_spec.levels) == 2
    assert "nan" not in m.sigma_spec.levels and len(m.sigma_spec.codes) == 39


@pytest.mark.parametrize("name,value", [("sigma", np.nan), ("b_x", np.inf), ("sd", np.nan), ("cor", np.nan)])
def test_prior_fixed_at_non_finite_value(name, value):
    with pytest.raises(ValueError, match=f"prior '{name}'.*finite"):
        lmmarg.Model("y ~ x + (x | g)", frame(), priors={name: value})


def test_invalid_prior_parameters_name_the_prior():
    with pytest.raises(ValueError, match="LKJ.*eta must be .*> 0, got -1"):
        LKJ(-1)
    with pytest.raises(ValueError, match="scale must be .*> 0"):
        half_student_t(3, -1.0)
    df = frame()
    # NumPyro validates its own arguments at construction unless told not to (dist.HalfNormal(-1) raises on the
    # user's line); lmmarg checks them either way, naming the prior
    with pytest.raises(ValueError, match=r"prior 'sd'.*rate=-1.0 of Exponential is invalid"):
        lmmarg.Model("y ~ x + (1 | g)", df, priors={"sd": dist.Exponential(-1.0, validate_args=False)})
    with pytest.raises(ValueError, match=r"prior 'b'.*scale=inf of Normal is not finite"):
        lmmarg.Model("y ~ x + (1 | g)", df, priors={"b": dist.Normal(0.0, np.inf)})
    with pytest.raises(ValueError, match=r"prior 'cor'.*concentration must be a finite number > 0, got inf"):
        lmmarg.Model("y ~ x + (x | g)", df, priors={"cor": dist.LKJCholesky(2, np.inf)})


def test_grouping_factor_also_a_fixed_factor_warns():
    with pytest.warns(UserWarning, match="grouping factor 'g' is also a fixed effect") as rec:
        lmmarg.Model("y ~ g + (1 | g)", frame())
    assert any(w.filename == __file__ for w in rec)  # points at the user's line
    # a numeric fixed effect next to the grouping factor is a common, identified model: no warning
    df = frame().assign(t=np.repeat(np.arange(8.0), 5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lmmarg.Model("y ~ t + (1 | t)", df)


def test_duplicated_random_term_is_an_error():
    with pytest.raises(FormulaError, match=r"\(1 \| g\) appears twice"):
        lmmarg.Model("y ~ x + (1 | g) + (1 | g)", frame())
    with pytest.raises(FormulaError, match=r"\['Intercept'\] of grouping factor 'g' appear in two terms"):
        lmmarg.Model("y ~ x + (x || g) + (1 | g)", frame())  # after the || expansion
    lmmarg.Model("y ~ x + (1 | g) + (0 + x | g)", frame())  # same factor, different columns: fine


def test_duplicate_column_names_in_data():
    df = frame()
    df.columns = ["y", "x", "x", "g"]
    with pytest.raises(DesignError, match=r"duplicate column name\(s\) \['x'\]"):
        lmmarg.Model("y ~ x + (1 | g)", df)


@pytest.mark.parametrize("name", ["my g", "2g"])
def test_backtick_quoted_grouping_names(name):
    df = frame()
    ref = lmmarg.Model("y ~ x + (x | g)", df)
    m = lmmarg.Model(f"y ~ x + (x | `{name}`)", df.rename(columns={"g": name}))
    assert [t.name for t in m.terms] == [name]
    np.testing.assert_array_equal(m.terms[0].codes, ref.terms[0].codes)
    assert m.terms[0].levels == ref.terms[0].levels
    assert f"sd_{name}__x" in m.priors.by_site


def test_backtick_quoted_fixed_name_with_dot():
    df = frame().rename(columns={"x": "my.x"})
    m = lmmarg.Model("y ~ `my.x` + (1 | g)", df)
    assert m.fixed_names == ["Intercept", "my.x"]
    np.testing.assert_array_equal(m.design.X[:, 1], df["my.x"].to_numpy())


def test_unused_level_of_a_fixed_factor():
    df = frame()
    df["f"] = pd.Categorical(np.tile(["lo", "hi"], 20), categories=["lo", "mid", "hi"])
    with pytest.warns(UserWarning, match=r"factor 'f' has unused level\(s\) \['mid'\]") as rec:
        m = lmmarg.Model("y ~ f + (1 | g)", df)
    assert any(w.filename == __file__ for w in rec)
    assert m.fixed_names == ["Intercept", "f[T.hi]"]


def test_empty_interaction_cell_is_named_as_such():
    df = frame()
    df["a"] = np.tile(["p", "q"], 20)
    df["b"] = np.where(df["a"] == "p", np.tile(["v", "u", "u", "u"], 10), "u")  # no row has (q, v)
    with pytest.raises(DesignError, match=r"rank deficient.*\['a\[T.q\]:b\[T.v\]'\] are all zero"):
        build_design("y ~ a * b + (1 | g)", df)


def test_sigma_formula_with_na_drop_does_not_suggest_drop():
    df = frame()
    df.loc[5, "s"] = np.nan
    with pytest.raises(DesignError, match="column 's'.*na_action='drop'"):
        lmmarg.Model("y ~ x + (1 | g)", df, sigma="~ s")
    with pytest.warns(UserWarning, match="dropped 1 of 40 rows.*'s'"):
        m = lmmarg.Model("y ~ x + (1 | g)", df, sigma="~ s", na_action="drop")
    assert m.n_obs == 39 and m.sigma_spec.design.X.shape == (39, 2)


# ----------------------------------------------------------------------------------------- rank check
def test_rank_check_names_only_aliased_columns():
    rng = np.random.default_rng(3)
    n = 200
    x, z = rng.normal(size=n), rng.normal(size=n)
    X = np.column_stack([np.ones(n), x, 2 * x - 1, np.zeros(n), z * 1e6, x + z])
    names = ["Intercept", "x", "x2", "zero", "z", "xz"]
    assert aliased_columns(X[:, [0, 1, 4]], ["Intercept", "x", "z"]) == []  # fast path (Gram)
    assert clearly_full_rank(X[:, [0, 1, 4]]) and not clearly_full_rank(X)
    assert aliased_columns(X, names) == ["x2", "zero", "xz"]  # xz = x + 1e-6 z: aliased despite the scales
    X[:, 5] += 1e-4 * rng.normal(size=n)  # a near but not exact combination is kept (decided by the QR)
    assert aliased_columns(X, names) == ["x2", "zero"]
    assert aliased_columns(X[:, [0, 1, 4, 5]], ["Intercept", "x", "z", "xz"]) == []


def test_chunked_qr_matches_direct_qr():
    rng = np.random.default_rng(4)
    X = rng.normal(size=(1000, 7)) * [1, 10, 1e-3, 1, 1, 1e5, 1]
    R = qr_r(X, chunk_bytes=8 * 7 * 50)  # 50-row chunks
    np.testing.assert_allclose(np.abs(R), np.abs(np.linalg.qr(X, mode="r")), rtol=1e-9, atol=1e-9 * np.abs(R).max())


def test_dense_limit_is_a_model_option_and_large_blocks_say_their_cost(monkeypatch):
    """The dense-block limit is a Model option (MarginalTooLarge's advice names it) and blocks above LARGE_DENSE
    warn with the measured cost of one evaluation."""
    import lmmarg.dense_warning as dense_warning
    import lmmarg.marginal.plan as plan_mod
    from lmmarg.marginal import MarginalTooLarge
    rng = np.random.default_rng(0)
    n = 400
    d = pd.DataFrame(dict(y=rng.normal(size=n), a=rng.integers(0, 80, n).astype(str),
                          b=rng.integers(0, 60, n).astype(str)))
    m = lmmarg.Model("y ~ (1 | a) + (1 | b)", d, dense_limit=50)
    with pytest.raises(MarginalTooLarge, match=r"Model\(\.\.\., dense_limit=\.\.\.\)"):
        m.plan("all")
    monkeypatch.setattr(dense_warning, "LARGE_DENSE", 10)
    m = lmmarg.Model("y ~ (1 | a) + (1 | b)", d, dense_limit=100)
    with pytest.warns(UserWarning, match=r"dense Schur block of size 60 .* s per value and gradient"):
        m.plan("all")
    assert plan_mod.default_dense_limit() > 4000
