"""Design construction: shapes and values against hand-built matrices, structure detection, naming, bad input."""
import warnings

import numpy as np
import pandas as pd
import pytest

import lmmarg
from lmmarg import DesignError, FormulaError, datasets
from lmmarg.design import build_design


@pytest.fixture(scope="module")
def sleep():
    return datasets.load("sleepstudy")


def small_frame():
    return pd.DataFrame({
        "y": [1.0, 2.5, 0.3, 4.0, 2.2, 3.1, 0.7],
        "x": [0.1, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0],
        "g": ["b", "a", "a", "c", "b", "a", "c"],
        "h": [1, 1, 2, 2, 1, 2, 1],
        "cond": ["u", "v", "u", "v", "u", "v", "v"],
    })


def test_sleepstudy_design_shapes_and_names(sleep):
    m = lmmarg.Model("Reaction ~ Days + (Days | Subject)", sleep)
    assert m.fixed_names == ["Intercept", "Days"]
    (t,) = m.terms
    assert (t.name, t.group, t.columns, t.n_groups, t.d) == ("Subject", "Subject", ["Intercept", "Days"], 18, 2)
    assert t.levels[:3] == ["308", "309", "310"]
    assert m.design.X.shape == (180, 2) and t.Z.shape == (180, 2) and t.Z_sparse.shape == (180, 36)
    assert m.structure.kind == "single"
    text = repr(m)
    assert "observations: 180" in text and "Subject" in text and "d=2" in text


def test_values_against_hand_built_z():
    df = small_frame()
    d = build_design("y ~ x + (x | g)", df)
    (t,) = d.terms
    assert t.levels == ["a", "b", "c"]
    np.testing.assert_array_equal(t.codes, [1, 0, 0, 2, 1, 0, 2])
    Z = np.zeros((7, 6))
    for i, (g, x) in enumerate(zip(df.g, df.x)):
        k = "abc".index(g)
        Z[i, 2 * k], Z[i, 2 * k + 1] = 1.0, x
    np.testing.assert_allclose(t.Z_sparse.toarray(), Z)
    np.testing.assert_allclose(d.X, np.column_stack([np.ones(7), df.x]))
    np.testing.assert_allclose(d.y, df.y)
    st = d.stats
    for k in range(3):
        Zk = Z[:, 2 * k:2 * k + 2]
        np.testing.assert_allclose(st["g"]["ZtZ"][k], Zk.T @ Zk)
        np.testing.assert_allclose(st["g"]["ZtX"][k], Zk.T @ d.X)
        np.testing.assert_allclose(st["g"]["Zty"][k], Zk.T @ d.y)
    np.testing.assert_allclose(st["XtX"], d.X.T @ d.X)
    assert st["yty"] == pytest.approx(float(df.y @ df.y))


def test_factor_columns_in_fixed_and_random_parts():
    d = build_design("log(y) ~ cond * x + (cond | g)", small_frame())
    assert d.fixed_names == ["Intercept", "cond[T.v]", "x", "cond[T.v]:x"]
    assert d.terms[0].columns == ["Intercept", "cond[T.v]"]
    np.testing.assert_allclose(d.y, np.log(small_frame().y))


def test_double_bar_names_and_columns(sleep):
    d = build_design("Reaction ~ Days + (Days || Subject)", sleep)
    assert [t.name for t in d.terms] == ["Subject", "Subject.1"]
    assert [t.columns for t in d.terms] == [["Intercept"], ["Days"]]
    assert d.structure.relation("Subject", "Subject.1") == "same"


def test_nested_detection_and_interaction_levels():
    d = build_design("strength ~ 1 + (1 | batch/cask)", datasets.load("Pastes"))
    assert [t.name for t in d.terms] == ["batch", "batch:cask"]
    assert [t.n_groups for t in d.terms] == [10, 30]
    assert d.terms[1].levels[:3] == ["A:a", "A:b", "A:c"]
    assert d.structure.relation("batch:cask", "batch") == "nested"
    assert d.structure.relation("batch", "batch:cask") == "contains"
    assert d.structure.kind == "nested"


def test_crossed_detection():
    d = build_design("diameter ~ 1 + (1 | plate) + (1 | sample)", datasets.load("Penicillin"))
    assert d.structure.relation("plate", "sample") == "crossed" and d.structure.kind == "crossed"
    assert "crossed with" in str(d.structure)


def test_grouseticks_brood_nested_in_location():
    d = build_design("logTICKS ~ YEAR + HEIGHT + (1 | BROOD) + (1 | LOCATION)", datasets.load("grouseticks"))
    assert d.fixed_names == ["Intercept", "YEAR[T.96]", "YEAR[T.97]", "HEIGHT"]
    assert d.structure.relation("BROOD", "LOCATION") == "nested"


def test_interaction_grouping_factor_codes():
    df = small_frame()
    d = build_design("y ~ 1 + (1 | g:h)", df)
    (t,) = d.terms
    assert t.levels == ["a:1", "a:2", "b:1", "c:1", "c:2"]
    labels = [f"{g}:{h}" for g, h in zip(df.g, df.h)]
    assert [t.levels[c] for c in t.codes] == labels


def test_repeated_group_names_get_suffixes():
    d = build_design("y ~ x + (1 | g) + (0 + x | g) + (1 | h)", small_frame())
    assert [t.name for t in d.terms] == ["g", "g.1", "h"]


def test_mixed_nested_and_crossed_kind():
    df = pd.DataFrame({"y": np.arange(12.0), "a": list("aabbccaabbcc"), "b": ["1", "2"] * 6,
                       "s": list("pqrpqrpqrpqr")})
    d = build_design("y ~ 1 + (1 | a/b) + (1 | s)", df)
    assert d.structure.kind == "nested+crossed"


# -- bad input ----------------------------------------------------------------------------------------------------
def test_unknown_column_suggests_close_match(sleep):
    with pytest.raises(DesignError, match="unknown column 'Day'.*'Days'"):
        build_design("Reaction ~ Day + (1 | Subject)", sleep)
    with pytest.raises(DesignError, match="unknown column 'Subj'.*grouping factor"):
        build_design("Reaction ~ Days + (1 | Subj)", sleep)
    with pytest.raises(DesignError, match="unknown column 'Reactoin'.*response"):
        build_design("Reactoin ~ Days + (1 | Subject)", sleep)


def test_malformed_bar_is_a_formula_error(sleep):
    with pytest.raises(FormulaError):
        lmmarg.Model("Reaction ~ Days + (1 | )", sleep)
    with pytest.raises(FormulaError):
        lmmarg.Model("Reaction ~ Days + (1 | Subject", sleep)


def test_nan_raises_naming_column_or_drops_with_warning(sleep):
    df = sleep.copy()
    df.loc[[3, 7], "Days"] = np.nan
    df.loc[10, "Reaction"] = np.inf
    with pytest.raises(DesignError, match="na_action='drop'") as err:
        build_design("Reaction ~ Days + (1 | Subject)", df)
    assert "'Days' (2 rows" in str(err.value) and "'Reaction' (1 rows" in str(err.value)
    with pytest.warns(UserWarning, match="dropped 3 of 180 rows"):
        d = build_design("Reaction ~ Days + (1 | Subject)", df, na_action="drop")
    assert d.n_obs == 177
    df2 = sleep.copy()
    df2.loc[0, "Subject"] = None
    with pytest.raises(DesignError, match="'Subject'"):
        build_design("Reaction ~ Days + (1 | Subject)", df2)


def test_nonfinite_after_transformation(sleep):
    df = sleep.copy()
    df.loc[5, "Days"] = 0.0
    with pytest.raises(DesignError, match="not finite"):
        build_design("Reaction ~ log(Days) + (1 | Subject)", df)
    df.loc[5, "Reaction"] = -1.0
    with pytest.raises(DesignError, match="response 'log\\(Reaction\\)' is not finite at row 5"):
        build_design("log(Reaction) ~ Days + (1 | Subject)", df)


def test_non_numeric_response(sleep):
    with pytest.raises(DesignError, match="response 'Subject' must be numeric"):
        build_design("Subject ~ Days + (1 | Subject)", sleep)


def test_single_level_grouping_factor_warns(sleep):
    df = sleep.assign(one="x")
    with pytest.warns(UserWarning, match="'one'.*single level"):
        build_design("Reaction ~ Days + (1 | one)", df)


def test_too_many_random_effects_warns():
    df = small_frame()
    with pytest.warns(UserWarning, match="number of observations \\(=7\\) <= number of random effects"):
        build_design("y ~ 1 + (x | g:h)", df)


def test_rank_deficient_x_names_aliased_columns(sleep):
    df = sleep.assign(Days2=2 * sleep.Days)
    with pytest.raises(DesignError, match="rank deficient.*'Days2'"):
        build_design("Reaction ~ Days + Days2 + (1 | Subject)", df)


def test_empty_data(sleep):
    with pytest.raises(DesignError, match="no rows"):
        build_design("Reaction ~ Days + (1 | Subject)", sleep.iloc[:0])


def test_bad_na_action_and_data_type(sleep):
    with pytest.raises(ValueError, match="na_action"):
        build_design("Reaction ~ Days + (1 | Subject)", sleep, na_action="omit")
    with pytest.raises(TypeError, match="DataFrame"):
        build_design("Reaction ~ Days + (1 | Subject)", [1, 2, 3])


def test_dict_data_accepted():
    d = build_design("y ~ x + (1 | g)", small_frame().to_dict("list"))
    assert d.n_obs == 7


def test_no_warning_on_clean_data(sleep):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_design("Reaction ~ Days + (Days | Subject)", sleep)


def test_datasets_load_all_and_unknown():
    for name in datasets.available():
        assert len(datasets.load(name)) > 0
    assert set(["sleepstudy", "Penicillin", "Pastes", "Dyestuff", "grouseticks"]) <= set(datasets.available())
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        datasets.load("nope")


def test_codes_nested_and_unique_rows_match_sorting():
    """lmmarg.codes: the O(N) nesting test and the hashed unique rows agree with sort-based references, also when
    the mixed-radix key would overflow (NumPy fallback)."""
    import numpy as np

    from lmmarg.codes import nested, unique_rows

    rng = np.random.default_rng(0)
    fine = rng.integers(0, 50, 500)
    coarse = fine // 5
    assert nested(fine, coarse) and not nested(coarse, fine)
    rows = np.flatnonzero(fine == fine[0])
    assert rows.size > 1
    split = coarse.copy()
    split[rows[-1]] += 1                      # one fine group now spans two coarse groups
    assert not nested(fine, split)
    for sizes in ([7, 3, 11], [2**40, 2**30, 5]):
        codes = np.column_stack([rng.integers(0, min(s, 7), 300) for s in sizes])
        uniq, inv = unique_rows(codes, sizes)
        ref, ref_inv = np.unique(codes, axis=0, return_inverse=True)
        np.testing.assert_array_equal(uniq, ref)
        np.testing.assert_array_equal(inv, np.asarray(ref_inv).reshape(-1))
