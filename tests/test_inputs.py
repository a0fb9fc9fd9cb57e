"""Inputs people have (issue #30): pandas extension dtypes, bool responses, non-ASCII / dotted / backticked names,
interaction labels, error texts, lme4/brms argument names, prior-name spellings."""
import re
import warnings

import numpy as np
import numpyro.distributions as dist
import pandas as pd
import pytest

import lmmarg
from lmmarg.design import DesignError, level_label, normalize_dtypes
from lmmarg.formula import FormulaError, quote_columns
from lmmarg.model import looks_like_counts

try:
    import pyarrow  # noqa: F401
    HAS_ARROW = True
except ImportError:
    HAS_ARROW = False


def _data(n=80, seed=1):
    rng = np.random.default_rng(seed)
    d = pd.DataFrame({"y": rng.normal(size=n), "x": rng.normal(size=n), "c": rng.choice(["a", "b", "c"], n),
                      "g": np.repeat([f"g{i}" for i in range(10)], n // 10), "t": rng.integers(1, 5, n),
                      "s": rng.choice(["u", "v"], n), "size": rng.integers(3, 8, n)})
    d["y"] += np.repeat(rng.normal(size=10), n // 10)  # a real group effect: ML fits off the boundary
    d["inc"] = rng.binomial(d["size"], 0.4)
    d["cnt"] = rng.poisson(2.0, n)
    d["hit"] = rng.integers(0, 2, n)
    return d


def _arrow(d):
    return d.astype({"y": "double[pyarrow]", "x": "double[pyarrow]", "c": "string[pyarrow]", "g": "string[pyarrow]",
                     "t": "int64[pyarrow]", "s": "string[pyarrow]", "size": "int64[pyarrow]", "inc": "int64[pyarrow]",
                     "cnt": "int64[pyarrow]", "hit": "int64[pyarrow]"})


CONVERSIONS = [pytest.param(lambda d: d.convert_dtypes(), id="convert_dtypes"),
               pytest.param(lambda d: d.astype({"c": "category", "g": "category"}).convert_dtypes(), id="category"),
               pytest.param(_arrow, id="pyarrow",
                            marks=pytest.mark.skipif(not HAS_ARROW, reason="pyarrow is not installed"))]


@pytest.mark.parametrize("convert", CONVERSIONS)
def test_extension_dtypes_give_the_numpy_model(convert):
    d = _data()
    e = convert(d)
    assert (e.dtypes != d.dtypes).any()
    f = "y ~ x + c + offset(log(t)) + (x | g)"
    a, b = lmmarg.Model(f, d, sigma_by="s"), lmmarg.Model(f, e, sigma_by="s")
    np.testing.assert_array_equal(a.design.X, b.design.X)
    np.testing.assert_array_equal(a.y, b.y)
    assert a.fixed_names == b.fixed_names and a.terms[0].levels == b.terms[0].levels
    np.testing.assert_array_equal(a.terms[0].codes, b.terms[0].codes)
    assert a.sigma_spec.levels == b.sigma_spec.levels
    beta, cov = np.array([0.1, 0.2, 0.3, -0.1]), {"g": np.array([[0.5, 0.1], [0.1, 0.3]])}
    sig = np.array([1.0, 1.3])[a.sigma_spec.codes]
    assert a.log_marginal(beta, sig, cov) == b.log_marginal(beta, sig, cov)
    # GLMM responses and trials of extension dtypes
    for formula, kw in (("cbind(inc, size - inc) ~ x + (1 | g)", dict(family="binomial")),
                        ("inc ~ x + (1 | g)", dict(family="binomial", trials="size")),
                        ("cnt ~ x + (1 | g)", dict(family="poisson")),
                        ("hit ~ x + (1 | g)", dict(family="bernoulli"))):
        ma, mb = lmmarg.Model(formula, d, **kw), lmmarg.Model(formula, e, **kw)
        args = (np.array([0.1, -0.2]), None, {"g": np.array([[0.4]])})
        assert ma.log_marginal(*args) == mb.log_marginal(*args), formula


def test_convert_dtypes_fit_ml_is_identical():
    d = _data(120, seed=3)
    f = "y ~ x + c + (1 | g)"
    a, b = lmmarg.Model(f, d).fit_ml(), lmmarg.Model(f, d.convert_dtypes()).fit_ml()
    assert a.loglik == b.loglik


def test_pd_na_behaves_like_nan():
    d = _data().convert_dtypes()
    d.loc[3, "x"] = pd.NA
    d.loc[7, "g"] = pd.NA
    with pytest.raises(DesignError, match=r"column 'x' \(1 rows, first at row 3\).*'g' \(1 rows, first at row 7\)"):
        lmmarg.Model("y ~ x + (1 | g)", d)
    with pytest.warns(UserWarning, match="dropped 2 of 80 rows"):
        m = lmmarg.Model("y ~ x + (1 | g)", d, na_action="drop")
    ref = lmmarg.Model("y ~ x + (1 | g)", _data().drop(index=[3, 7]))
    np.testing.assert_array_equal(m.design.X, ref.design.X)
    assert m.terms[0].levels == ref.terms[0].levels


def test_normalize_dtypes_gives_numpy_dtypes():
    d = pd.DataFrame({"i": pd.array([1, 2], dtype="Int64"), "b": pd.array([True, False], dtype="boolean"),
                      "s": pd.array(["a", None], dtype="string"), "f": pd.array([1.5, None], dtype="Float64")})
    out = normalize_dtypes(d, d.columns)
    assert [str(t) for t in out.dtypes] == ["int64", "bool", "object", "float64"]
    assert np.isnan(out["f"][1]) and out["s"][1] is np.nan
    assert normalize_dtypes(out, out.columns) is out  # nothing to change: no copy


BOOLS = [pytest.param(lambda s: s.astype(bool), id="numpy-bool"),
         pytest.param(lambda s: s.astype("boolean"), id="pandas-boolean"),
         pytest.param(lambda s: s.astype("bool[pyarrow]"), id="arrow-bool",
                      marks=pytest.mark.skipif(not HAS_ARROW, reason="pyarrow is not installed"))]


@pytest.mark.parametrize("to_bool", BOOLS)
def test_bool_response_for_bernoulli(to_bool):
    d = _data()
    ref = lmmarg.Model("hit ~ x + (1 | g)", d, family="bernoulli")
    m = lmmarg.Model("hit ~ x + (1 | g)", d.assign(hit=to_bool(d["hit"])), family="bernoulli")
    np.testing.assert_array_equal(m.y, ref.y)
    args = (np.array([0.1, -0.2]), None, {"g": np.array([[0.4]])})
    assert m.log_marginal(*args) == ref.log_marginal(*args)


def test_bool_predictor_and_grouping():
    d = _data().assign(flag=lambda z: z["x"] > 0)
    a = lmmarg.Model("y ~ flag + (1 | g) + (1 | flag)", d)
    b = lmmarg.Model("y ~ flag + (1 | g) + (1 | flag)", d.assign(flag=d["flag"].astype("boolean")))
    np.testing.assert_array_equal(a.design.X, b.design.X)
    assert a.terms[1].levels == b.terms[1].levels == ["False", "True"]


def _names_data():
    d = _data()
    return pd.DataFrame({"y.val": d["y"] + 5, "x.1": d["x"] + 3, "x.2": d["t"].astype(float), "g.id": d["g"],
                         "群": d["g"], "sujet_é": d["g"], "a|b": d["g"], "x|z": d["x"], "h": d["s"]})


@pytest.mark.parametrize("group", ["群", "sujet_é", "`a|b`", "g.id", "`g.id`"])
def test_grouping_names_unicode_backticks_dots(group):
    d = _names_data()
    m = lmmarg.Model(f"`y.val` ~ `x.1` + (1 | {group})", d)
    assert m.terms[0].name == group.strip("`")
    assert m.terms[0].levels == sorted(d["g.id"].unique())


def test_backticked_bar_in_fixed_part_and_slope():
    d = _names_data()
    m = lmmarg.Model("`y.val` ~ `x|z` + (`x|z` | `a|b`)", d)
    assert m.fixed_names == ["Intercept", "x|z"] and m.terms[0].columns == ["Intercept", "x|z"]
    np.testing.assert_array_equal(m.design.X[:, 1], d["x|z"])
    with pytest.raises(FormulaError, match="backticks"):
        lmmarg.Model("`y.val` ~ 1 + (1 | a|b)", d)


def test_r_style_dotted_names_are_columns_everywhere():
    d = _names_data()
    m = lmmarg.Model("log(y.val) ~ x.1:x.2 + I(x.1^2) + offset(x.2) + (x.1 | g.id)", d)
    renamed = d.rename(columns={"y.val": "yv", "x.1": "x1", "x.2": "x2", "g.id": "gid"})
    ref = lmmarg.Model("log(yv) ~ x1:x2 + I(x1^2) + offset(x2) + (x1 | gid)", renamed)
    np.testing.assert_allclose(m.design.X, ref.design.X, rtol=0, atol=0)
    np.testing.assert_array_equal(m.y, ref.y)
    np.testing.assert_array_equal(m.terms[0].Z, ref.terms[0].Z)
    assert m.fixed_names[-1] == "x.1:x.2"
    assert quote_columns("np.log(x.1) + x.1.b + `x.1`", {"x.1"}) == "np.log(`x.1`) + x.1.b + `x.1`"


def test_unknown_dotted_name_is_named():
    d = _names_data()
    with pytest.raises(DesignError, match=r"unknown column 'x\.3' in the fixed effects; did you mean .*'x\.1'"):
        lmmarg.Model("y.val ~ x.3 + (1 | g.id)", d)


def test_interaction_labels_with_colons_are_unique():
    d = pd.DataFrame({"y": np.sin(np.arange(12.0)), "a": ["x:y", "x"] * 6, "b": ["b", "y:b", "z"] * 4})
    m = lmmarg.Model("y ~ 1 + (1 | a:b)", d)
    t = m.terms[0]
    assert len(set(t.levels)) == len(t.levels) == 6  # ("x", "y:b") and ("x:y", "b") are two groups
    assert "x:`y:b`" in t.levels and "`x:y`:b" in t.levels
    assert len(set(zip(d["a"], d["b"]))) == t.n_groups
    for key, label in zip(t.level_keys, t.levels):
        assert label == level_label(key)
    assert level_label(("a`b", "c")) == "`a``b`:c"


def test_error_values_have_all_digits():
    d = _data()
    with pytest.raises(DesignError, match=r"is 1\.000000000001 at row"):
        lmmarg.Model("I(hit + 1e-12) ~ x + (1 | g)", d.assign(hit=1), family="bernoulli")
    with pytest.raises(DesignError, match=r"is 2\.0000001 at row 0"):
        lmmarg.Model("cnt ~ x + (1 | g)", d.assign(cnt=2.0 + np.r_[1e-7, np.zeros(79)]),
                     family="poisson")


def test_formulaic_errors_have_no_terminal_codes():
    d = _data().assign(use=lambda z: np.where(z["x"] > 0, "Y", "N"))
    with pytest.raises(FormulaError) as info:
        lmmarg.Model("use == 'Y' ~ x + (1 | g)", d)
    assert "\x1b" not in str(info.value) and "I(" in str(info.value)
    m = lmmarg.Model("I(use == 'Y') ~ x + (1 | g)", d, family="bernoulli")  # the suggested spelling works
    np.testing.assert_array_equal(m.y, (d["use"] == "Y").to_numpy(float))


def test_binomial_proportion_response_says_what_to_write():
    d = _data().assign(prop=lambda z: z["inc"] / z["size"])
    with pytest.raises(DesignError, match=r"proportion; write 'cbind\(inc, size - inc\) ~ \.\.\.', or 'inc ~ "
                                          r"\.\.\.' with trials='size'"):
        lmmarg.Model("I(inc / size) ~ x + (1 | g)", d, family="binomial")
    with pytest.raises(DesignError, match=r"proportion.*cbind\(successes, failures\)"):
        lmmarg.Model("prop ~ x + (1 | g)", d, family="binomial")
    with pytest.raises(DesignError, match=r"multiply it by the trials: 'I\(prop \* size\) ~ \.\.\.'"):
        lmmarg.Model("prop ~ x + (1 | g)", d, family="binomial", trials="size")
    m = lmmarg.Model("I(prop * size) ~ x + (1 | g)", d, family="binomial", trials="size")
    np.testing.assert_allclose(m.y, d["inc"])


def test_repr_names_the_family():
    d = _data()
    assert repr(lmmarg.Model("hit ~ x + (1 | g)", d, family="bernoulli")).startswith(
        "Generalized linear mixed model (bernoulli, logit link): hit ~ x")
    assert repr(lmmarg.Model("cnt ~ x + (1 | g)", d, family="poisson")).startswith(
        "Generalized linear mixed model (poisson, log link)")
    assert repr(lmmarg.Model("y ~ x + (1 | g)", d)).startswith("Linear mixed model: y ~ x")


def test_count_warning_only_for_plausible_counts():
    rng = np.random.default_rng(0)
    graded = np.clip(np.round(rng.normal(5.0, 2.0, 200)), 0, 10)
    graded[0] = 0
    counts = rng.poisson(1.5, 200).astype(float)
    skewed = rng.negative_binomial(1, 0.15, 200).astype(float)  # mean ~6, many zeros
    assert looks_like_counts(counts) and looks_like_counts(skewed)
    assert not looks_like_counts(graded)
    assert not looks_like_counts(graded + 1)  # no zeros
    d = pd.DataFrame({"g": np.repeat(list("abcdefghij"), 20), "graded": graded, "counts": counts})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lmmarg.Model("graded ~ 1 + (1 | g)", d)
    with pytest.warns(UserWarning, match="looks like counts.*family='poisson'"):
        lmmarg.Model("counts ~ 1 + (1 | g)", d)


def test_prior_names_in_the_users_spelling():
    d = _data().rename(columns={"x": "age"})
    m = lmmarg.Model("y ~ I(age^2) + (1 | g)", d, priors={"b_I(age^2)": dist.Normal(0.0, 0.5)})
    assert m.priors["b_I(age ** 2)"].source == "user" and m.priors["b_I(age ** 2)"].text == "normal(0, 0.5)"
    m2 = lmmarg.Model("y ~ I(age**2) + (1 | g)", d, priors={"b_I( age ^ 2 )": 0.0})
    assert m2.priors["b_I(age ** 2)"].fixed == 0.0
    with pytest.raises(ValueError, match=re.escape("unknown prior name(s) ['b_I(age^3)']; valid names for this "
                                                   "model are [") + ".*'b_I\\(age \\*\\* 2\\)'"):
        lmmarg.Model("y ~ I(age^2) + (1 | g)", d, priors={"b_I(age^3)": 0.0})
    with pytest.raises(ValueError, match="both name 'b_I"):
        lmmarg.Model("y ~ I(age^2) + (1 | g)", d, priors={"b_I(age^2)": 0.0, "b_I(age ** 2)": 1.0})


@pytest.fixture(scope="module")
def model():
    return lmmarg.Model("y ~ x + (1 | g)", _data())


@pytest.mark.parametrize("call, kwargs, hint", [
    ("Model", {"REML": True}, r"fit_ml\(reml=True\)"),
    ("Model", {"control": {}}, r"fit_ml\(maxiter="),
    ("Model", {"iter": 2000}, r"\.sample\(draws=, warmup="),
    ("Model", {"prior": {}}, r"priors="),
    ("Model", {"bogus": 1}, r"its arguments are formula, data, family"),
    ("fit_ml", {"REML": True}, r"fit_ml\(reml=True\)"),
    ("fit_ml", {"control": {}}, r"maxiter="),
    ("sample", {"iter": 2000}, r"draws=.*warmup="),
    ("sample", {"cores": 4}, r"lmmarg\.use_cores\(n\)"),
    ("sample", {"control": {"adapt_delta": 0.9}}, r"sample\(adapt_delta=0\.95"),
    ("sample", {"num_samples": 10}, r"draws="),
    ("fit_map", {"iter": 10}, r"maxiter="),
    ("fit_vi", {"iter": 10}, r"steps="),
    ("fit_vi", {"algorithm": "meanfield"}, r"guide='normal'"),
])
def test_lme4_brms_argument_names_point_to_lmmarg(model, call, kwargs, hint):
    with pytest.raises(TypeError, match=hint) as info:
        if call == "Model":
            lmmarg.Model("y ~ x + (1 | g)", _data(), **kwargs)
        else:
            getattr(model, call)(**kwargs)
    assert repr(next(iter(kwargs))) in str(info.value)


def test_weights_refused_with_what_to_do():
    d = _data()
    with pytest.raises(TypeError, match="weights.*not supported.*sigma_by="):
        lmmarg.Model("y ~ x + (1 | g)", d, weights=d["size"])
    with pytest.raises(TypeError, match=r"weights.*cbind\(successes, failures\).*trials="):
        lmmarg.Model("inc ~ x + (1 | g)", d, family="binomial", weights="size")


def test_swapped_arguments_and_family_objects():
    d = _data()
    with pytest.raises(TypeError, match="the formula comes first"):
        lmmarg.Model(d, "y ~ x + (1 | g)")

    class Binomial:  # e.g. statsmodels' sm.families.Binomial()
        pass

    with pytest.raises(TypeError, match="write family='binomial'"):
        lmmarg.Model("inc ~ x + (1 | g)", d, family=Binomial())


def test_predict_on_extension_dtype_new_data():
    d = _data()
    fit = lmmarg.Model("y ~ x + c + (1 | g)", d, sigma_by="s").fit_map()
    ref = fit.predict(d, kind="mean")
    np.testing.assert_array_equal(fit.predict(d.convert_dtypes(), kind="mean"), ref)
    if HAS_ARROW:
        np.testing.assert_array_equal(fit.predict(_arrow(d), kind="mean"), ref)
