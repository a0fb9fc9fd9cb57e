"""Sufficient statistics from chunks (lmmarg.sufficient): merges in any order and partition equal the one-shot
statistics and the marginal plan's own; save/load; errors naming the column, level and chunk."""
import os
import warnings

import numpy as np
import pandas as pd
import pytest

import lmmarg
from lmmarg import sufficient as su
from lmmarg.design import DesignError

F1 = "y ~ x + c + (x | a) + (1 | b)"
F2 = "log(y) ~ x * c + offset(log(t)) + (1 | a) + (0 + x | a) + (1 | a:b)"
F3 = "y ~ x + C(b) + (x || a) + (1 | c)"   # a numeric column as a factor, || split into two terms
CUTS = [0, 113, 700, 731, 1520, 2000]
FIELDS = ("codes", "cell_n", "S_zz", "S_zr", "S_zX", "XtX", "Xtr", "rr", "beta0")


def make_data(seed=0, N=2000, mean=0.0):
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, 40, N), rng.integers(0, 7, N)
    df = pd.DataFrame({"x": rng.normal(size=N), "c": rng.choice(["lo", "mid", "hi"], N),
                       "a": np.array([f"s{i:02d}" for i in a]), "b": b, "t": rng.uniform(0.5, 2.0, N)})
    eta = 1 + 0.5 * df.x + rng.normal(size=40)[a] * (1 + 0.3 * df.x) + 0.5 * rng.normal(size=7)[b]
    df["y"] = np.exp(0.3 * (eta + rng.normal(size=N))) if mean == 0.0 else mean + 1e-2 * (eta + rng.normal(size=N))
    return df


def chunks_of(df, cuts=CUTS):
    return [df.iloc[cuts[i]:cuts[i + 1]] for i in range(len(cuts) - 1)]


def assert_same(ea, eb, rtol=1e-12):
    """Engine arrays equal field by field, to rtol relative to each array's scale."""
    for k in FIELDS:
        A, B = np.asarray(getattr(ea, k), dtype=float), np.asarray(getattr(eb, k), dtype=float)
        assert A.shape == B.shape, k
        scale = max(np.max(np.abs(A), initial=0.0), 1e-300)
        if k == "Xtr":  # ~0 at the OLS beta0: relative to the size of its terms
            scale = np.sqrt(np.max(np.abs(np.asarray(ea.XtX))) * float(ea.rr))
        np.testing.assert_allclose(A, B, rtol=0, atol=rtol * scale, err_msg=k)
    assert ea.levels == eb.levels and ea.n_obs == eb.n_obs


def compare_plan(model, stats, rtol=1e-11):
    """The statistics in the plan's unit order equal the plan's own arrays, cell by cell."""
    plan = model.plan("all")
    order = [i for src in plan.structure.unit_src for i in src]
    st = plan.stats
    # the OLS beta0 from the sums agrees with the plan's (from X and y); the rest is compared at the plan's beta0,
    # since the plan's own beta0 carries the rounding of its normal equations (any beta0 gives exact statistics)
    beta0 = np.asarray(st.beta0)
    np.testing.assert_allclose(stats.ols_beta(), beta0, rtol=0, atol=1e-12 * np.max(np.abs(beta0)))
    ea = stats.engine_arrays(order, beta0=beta0)
    assert ea.S_zz.shape == tuple(st.S_zz.shape) and ea.n_obs == plan.n_obs
    for k in ("S_zz", "S_zr", "S_zX", "XtX", "rr"):
        A, B = np.asarray(getattr(st, k)), np.asarray(getattr(ea, k))
        np.testing.assert_allclose(B, A, rtol=0, atol=rtol * np.max(np.abs(A)), err_msg=k)
    np.testing.assert_allclose(ea.Xtr, np.asarray(st.Xtr), rtol=0,
                               atol=rtol * np.sqrt(np.max(np.abs(ea.XtX)) * float(ea.rr)))
    # the groups of each term are the model's, in its order; the plan's chain levels read the cells' codes
    for col, i in enumerate(order):
        assert list(ea.levels[col]) == list(model.terms[i].levels) and ea.names[col] == model.terms[i].name
    for j in range(plan.structure.n_chain_units):
        col = order.index(plan.structure.unit_src[j][0])
        np.testing.assert_array_equal(ea.codes[:, col], np.asarray(st.cell_node[j]))
    if plan.structure.dense_size and not plan.marginalize_beta:   # the dense block's positions of each cell
        ps = plan.structure
        idx = np.concatenate([off + ea.codes[:, [order.index(ps.unit_src[u][0])]] * ps.unit_dims[u]
                              + np.arange(ps.unit_dims[u])
                              for u, off in zip(range(ps.n_chain_units, len(ps.unit_dims)), ps.dense_offsets)], axis=1)
        np.testing.assert_array_equal(idx, np.asarray(st.dense_idx))
    return ea


@pytest.fixture(scope="module")
def data():
    return make_data()


@pytest.mark.parametrize("formula", [F1, F2])
def test_chunk_orders_and_partitions_agree(data, formula):
    chunks = chunks_of(data)
    spec = su.design_spec(formula, chunks)
    parts = [su.chunk_statistics(spec, c, i) for i, c in enumerate(chunks)]
    seq = parts[0] + parts[1] + parts[2] + parts[3] + parts[4]
    tree = (parts[4] + parts[2]) + ((parts[1] + parts[3]) + parts[0])
    other = su.statistics(spec, chunks_of(data, [0, 1000, 1001, 2000]))
    whole = su.chunk_statistics(spec, data)
    beta0 = whole.ols_beta()
    ref = whole.engine_arrays(beta0=beta0)
    many = su.merge_many([parts[3], parts[0], parts[4], parts[1], parts[2]])   # one n-ary merge
    for s in (seq, tree, other, sum(reversed(parts)), many):
        assert s.n_obs == 2000 and s.n_cells == whole.n_cells
        assert_same(s.engine_arrays(beta0=beta0), ref)
    # the levels do not depend on the chunk order; another provisional centre gives the same statistics
    assert su.collect_levels(formula, chunks[::-1]) == spec.levels
    spec_rev = su.design_spec(formula, chunks[::-1])
    assert not np.allclose(spec_rev.centre, spec.centre)
    assert_same(su.statistics(spec_rev, chunks[::-1]).engine_arrays(), whole.engine_arrays(), rtol=1e-10)


@pytest.mark.parametrize("formula", [F1, F2, F3])
def test_equals_plan_statistics(data, formula):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lmmarg.Model(formula, data)
    spec = su.design_spec(formula, chunks_of(data))
    assert spec.fixed_names == tuple(model.design.fixed_names)
    assert [t.name for t in spec.terms] == [t.name for t in model.terms]
    assert [t.columns for t in spec.terms] == [tuple(t.columns) for t in model.terms]
    compare_plan(model, su.statistics(spec, chunks_of(data)))


def test_lognormal_and_categorical_order(data):
    df = data.copy()
    df["c"] = pd.Categorical(df["c"], categories=["mid", "lo", "hi"])   # the categorical order, not sorted
    formula = "y ~ x * c + (1 | b)"
    model = lmmarg.Model(formula, df, family="lognormal")
    spec = su.design_spec(formula, chunks_of(df), family="lognormal")
    assert spec.levels["c"] == ("mid", "lo", "hi")
    assert spec.fixed_names == tuple(model.design.fixed_names)
    stats = su.statistics(spec, chunks_of(df))
    compare_plan(model, stats)
    np.testing.assert_allclose(-stats.sum_log_y, model.log_jacobian, rtol=1e-12)


def test_large_mean_keeps_residual_digits():
    """Around the provisional centre rr keeps its digits where raw sums (around beta = 0) lose all of them."""
    df = make_data(seed=3, mean=1e6)
    formula = "y ~ x + (1 | a)"
    model = lmmarg.Model(formula, df)
    spec = su.design_spec(formula, chunks_of(df))
    stats = su.statistics(spec, chunks_of(df))
    compare_plan(model, stats, rtol=1e-8)
    raw = stats.recentred(np.zeros(2)).engine_arrays(beta0=np.asarray(model.plan("all").stats.beta0))
    rr = float(model.plan("all").stats.rr)
    assert abs(stats.engine_arrays().rr - rr) < 1e-8 * rr < abs(raw.rr - rr)


def test_pyarrow_chunks(data):
    pa = pytest.importorskip("pyarrow")
    chunks = [pa.Table.from_pandas(c, preserve_index=False) for c in chunks_of(data)]
    chunks[1] = chunks[1].to_batches()[0]
    spec = su.design_spec(F1, chunks)
    assert_same(su.statistics(spec, chunks).engine_arrays(), su.chunk_statistics(spec, data).engine_arrays(),
                rtol=1e-10)


def test_save_load_and_add_other_files(data, tmp_path):
    spec = su.design_spec(F1, chunks_of(data))
    whole = su.statistics(spec, chunks_of(data))
    path = tmp_path / "stats.npz"
    whole.save(path)
    assert os.listdir(tmp_path) == ["stats.npz"]  # the temporary file was renamed into place
    back = su.load_statistics(path)
    for k in ("centre", "XtX", "Xtr", "cell_factors", "cell_n", "S_zz", "S_zr", "S_zX"):
        np.testing.assert_array_equal(getattr(back, k), getattr(whole, k))
    assert (back.meta, back.factor_levels, back.factor_categories, back.n_obs, back.rr) == \
           (whole.meta, whole.factor_levels, whole.factor_categories, whole.n_obs, whole.rr)
    assert back.terms == whole.terms and back.terms[0][:3] == ("a", "a", ("a",))
    # two files with their own level sets and centres: a's groups split between them, merged by label
    first = data["a"] < "s25"
    d1, d2 = data[first], data[~first]
    s1 = su.statistics(su.design_spec(F1, [d1]), [d1])
    s2 = su.statistics(su.design_spec(F1, [d2]), [d2])
    s1.save(tmp_path / "s1.npz")
    loaded = su.load_statistics(tmp_path / "s1.npz")
    ref = whole.engine_arrays()
    assert_same((loaded + s2).engine_arrays(), ref, rtol=1e-10)
    assert_same((s2 + s1).engine_arrays(), ref, rtol=1e-10)


def test_errors(data, tmp_path):
    chunks = chunks_of(data)
    bad = list(chunks)
    bad[2] = bad[2].drop(columns="x")
    with pytest.raises(DesignError, match=r"chunk 2 has no column 'x'"):
        su.design_spec(F1, bad)
    spec = su.design_spec(F1, chunks)
    with pytest.raises(DesignError, match=r"chunk 2 has no column 'x'"):
        su.statistics(spec, bad)
    for col, level in (("a", "zz"), ("c", "extra")):
        new = chunks[0].copy()
        new.loc[new.index[3], col] = level
        with pytest.raises(DesignError, match=rf"column '{col}' of chunk 7 has the level\(s\) \['{level}'\]"):
            su.chunk_statistics(spec, new, index=7)
    nan = chunks[1].copy()
    nan.loc[nan.index[5], "x"] = np.nan
    with pytest.raises(DesignError, match=r"column 'x' of chunk 1 has missing"):
        su.statistics(spec, [chunks[0], nan])
    other = su.statistics(su.design_spec("y ~ x + (x | a) + (1 | b)", chunks), chunks)
    with pytest.raises(ValueError, match="fixed_names differ"):
        su.statistics(spec, chunks) + other
    with pytest.raises(ValueError, match="terms differ"):
        su.statistics(spec, chunks) + su.statistics(su.design_spec("y ~ x + c + (1 | a) + (1 | b)", chunks), chunks)
    with pytest.raises(DesignError, match="stateful transform"):
        su.design_spec("y ~ center(x) + (1 | a)", chunks)
    with pytest.raises(ValueError, match="Gaussian families"):
        su.design_spec(F1, chunks, family="poisson")


def test_first_chunk_lacks_levels(data):
    """Levels absent from the first chunk (the formulaic specs' sample, the centre's rank-deficient OLS) still get
    their columns and exact statistics."""
    df = data.sort_values(["c", "b"], kind="stable").reset_index(drop=True)   # chunk 0: c == "hi" and b small only
    formula = "y ~ x + c + C(b) + (x | a)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lmmarg.Model(formula, df)
    spec = su.design_spec(formula, chunks_of(df))
    assert spec.fixed_names == tuple(model.design.fixed_names) and len(spec.fixed_names) == 10
    compare_plan(model, su.statistics(spec, chunks_of(df)))


def test_subset_of_terms(data):
    """engine_arrays for some terms sums the cells over the others: the plan of a partial marginalization."""
    model = lmmarg.Model(F1, data)
    plan = model.plan(["b"], per_obs_sigma=False)
    stats = su.statistics(su.design_spec(F1, chunks_of(data)), chunks_of(data))
    ea = stats.engine_arrays(["b"], beta0=np.asarray(plan.stats.beta0))
    assert ea.S_zz.shape == (7, 1, 1) and ea.cell_n.sum() == 2000 and ea.names == ("b",)
    for k in ("S_zz", "S_zr", "S_zX"):
        A = np.asarray(getattr(plan.stats, k))
        np.testing.assert_allclose(getattr(ea, k), A, rtol=0, atol=1e-11 * np.max(np.abs(A)), err_msg=k)


@pytest.mark.parametrize("mean", [0.0, 1e6])
def test_column_moments(mean):
    """Moments merged over chunks (in any order) equal NumPy's over all rows, for a column with mean 1e6 and SD
    1e-2 too (the mean carried in two doubles keeps the digits of m2 that Chan's update alone would lose)."""
    df = make_data(seed=5, mean=mean)
    df["big"] = 1e6 + 1e-2 * np.random.default_rng(6).normal(size=len(df))
    df.loc[df.index[::7], "x"] = 0.0    # non-zeros differ from rows
    formula = "y ~ x + big + c + offset(t) + (x | a) + (1 | b)"
    spec = su.design_spec(formula, chunks_of(df))
    parts = [su.chunk_statistics(spec, c, i) for i, c in enumerate(chunks_of(df, [0, 1, 300, 301, 1000, 2000]))]
    X = np.asarray(spec.fixed_spec.get_model_matrix(df), dtype=float)
    Z = np.column_stack([np.ones(len(df)), df.x, np.ones(len(df))])
    y = (df.y - df.t).to_numpy()[:, None]
    for stats in (sum(parts), sum(reversed(parts)), (parts[3] + parts[1]) + (parts[0] + (parts[4] + parts[2]))):
        m = stats.moments
        for cm, full in ((m.X, X), (m.Z, Z), (m.y, y)):
            k = full.shape[1]
            assert list(cm.n) == [len(df)] * k and list(cm.nnz) == list(np.count_nonzero(full, axis=0))
            np.testing.assert_array_equal(cm.min, full.min(0))
            np.testing.assert_array_equal(cm.max, full.max(0))
            np.testing.assert_allclose(cm.mean, full.mean(0), rtol=1e-12, atol=0)
            var = full.var(0, ddof=1)
            np.testing.assert_allclose(cm.var, var, rtol=1e-12, atol=1e-300)
            np.testing.assert_allclose(cm.m2, var * (len(df) - 1), rtol=1e-12, atol=1e-300)
    assert spec.fixed_names[2] == "big" and 0 < m.X.var[2] < 2e-4


def test_moments_lognormal_and_old_files(data, tmp_path):
    """The response moments are those of log y minus the offsets; a file saved without moments loads with None."""
    spec = su.design_spec("y ~ x + offset(log(t)) + (1 | a)", chunks_of(data), family="lognormal")
    stats = su.statistics(spec, chunks_of(data))
    w = np.log(data.y) - np.log(data.t)
    np.testing.assert_allclose([stats.moments.y.mean[0], stats.moments.y.var[0]], [w.mean(), w.var()], rtol=1e-12)
    stats.save(tmp_path / "new.npz")
    assert su.load_statistics(tmp_path / "new.npz").moments.y.n[0] == 2000
    with np.load(tmp_path / "new.npz") as z:
        old = {k: z[k] for k in z.files if not k.startswith("moments_")}
    np.savez(tmp_path / "old.npz", **old)
    back = su.load_statistics(tmp_path / "old.npz")
    assert back.moments is None and back.n_obs == 2000
    assert (back + stats).moments is None and (stats + stats).moments.y.n[0] == 4000
