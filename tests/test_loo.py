"""Integrated LOO: no hang on crossed designs (no batched LAPACK), both quadratic-form paths, linear cost for nested
designs, one computation per fit, reloo refits, conditional_effects through stateful transforms."""
import pickle
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pandas as pd
import pytest

import lmmarg
from lmmarg.results import loo as lmloo
from lmmarg.results import Fit


def crossed_data(n=3435, g1=148, g2=19, seed=1):
    """ScotsSec-like: rows assigned unevenly at random to a g1 x g2 grid of crossed classes."""
    rng = np.random.default_rng(seed)
    a = rng.choice(g1, n, p=rng.dirichlet(np.full(g1, 0.7)))
    b = rng.choice(g2, n, p=rng.dirichlet(np.full(g2, 0.7)))
    x = rng.normal(size=n)
    y = 5 + 0.5 * x + rng.normal(0, 1, g1)[a] + rng.normal(0, 0.5, g2)[b] + rng.normal(0, 1, n)
    return pd.DataFrame({"y": y, "x": x, "primary": [f"p{i}" for i in a], "second": [f"s{i}" for i in b]})


def draws(model, chains=2, n=3, seed=0):
    """Hand-made plausible draws of the global parameters (every term scalar)."""
    rng = np.random.default_rng(seed)
    b = np.linalg.lstsq(model.design.X, model.y, rcond=None)[0]
    sy = model.y.std()
    s = {"beta": b + rng.normal(0, 0.05 * sy, (chains, n, len(b))),
         "sigma": np.abs(rng.normal(sy / 2, sy / 20, (chains, n)))}
    for t in model.terms:
        s[f"sd_{t.name}"] = np.abs(rng.normal(sy / 3, sy / 10, (chains, n, t.d)))
    return s


_CROSSED = textwrap.dedent("""
    import numpy as np
    import lmmarg
    from lmmarg.results import Fit
    from tests.test_loo import crossed_data, draws
    m = lmmarg.Model("y ~ x + (1 | primary) + (1 | second)", crossed_data())
    f = Fit(m, draws(m, chains=4, n=64))
    ll = f.log_likelihood()
    idata = f.to_arviz(posterior_predictive=False)
    assert np.isfinite(ll).all() and idata.log_likelihood["y"].shape == (4, 64, 3435)
    print("OK")
""")


def test_crossed_loo_and_to_arviz_finish():
    """Both XLA:CPU pool threads used to wait in batched triangular solves (jaxlib 0.10's batched LAPACK blocks on
    the pool it runs on) and loo() / to_arviz() never returned on this design. Run in a subprocess: a hang fails
    after 240 s instead of stalling the suite."""
    root = __import__("pathlib").Path(__file__).parent.parent   # the repository root: `tests.test_loo` imports
    try:
        p = subprocess.run([sys.executable, "-c", _CROSSED], capture_output=True, text=True, timeout=240, cwd=root)
    except subprocess.TimeoutExpired:
        pytest.fail("integrated log-likelihood of a crossed 148 x 19 design did not finish in 240 s (hang)")
    assert p.returncode == 0 and "OK" in p.stdout, p.stderr[-2000:]


@pytest.mark.parametrize("formula,data", [
    ("y ~ x + (1 | primary) + (1 | second)", crossed_data(n=400, g1=30, g2=7)),
    ("strength ~ 1 + (1 | batch/cask)", lmmarg.datasets.load("Pastes")),
])
def test_sparse_and_dense_paths_agree(formula, data, monkeypatch):
    m = lmmarg.Model(formula, data)
    s = draws(m)
    out = {}
    for path in ("sparse", "dense"):
        monkeypatch.setattr(lmloo, "FORCE_PATH", path)
        f = Fit(m, s)
        assert lmloo.loo_cost(f)["path"] == path
        out[path] = (lmloo.pointwise_loglik(f, progress=False), lmloo.group_loglik(f, m.terms[0].name)[0])
    np.testing.assert_allclose(out["sparse"][0], out["dense"][0], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(out["sparse"][1], out["dense"][1], rtol=1e-10, atol=1e-9)
    assert np.isfinite(out["sparse"][0]).all()


def nested_data(n_per_class, n_school=60, n_class=8, seed=2):
    rng = np.random.default_rng(seed)
    school = np.repeat(np.arange(n_school), n_class * n_per_class)
    klass = np.repeat(np.arange(n_school * n_class), n_per_class)
    y = rng.normal(size=len(school)) + rng.normal(size=n_school)[school] + rng.normal(size=n_school * n_class)[klass]
    return pd.DataFrame({"y": y, "school": school.astype(str), "klass": klass.astype(str)})


def test_nested_cost_is_linear_in_rows_and_matches_the_path_taken():
    costs = []
    for n in (5, 10):
        m = lmmarg.Model("y ~ 1 + (1 | school/klass)", nested_data(n))
        c = lmloo.loo_cost(Fit(m, draws(m)))
        assert c["path"] == "sparse" and c["kmax"] == 1  # each class sits in one school
        costs.append(c["flops_per_draw"] - 2 * c["q2"] ** 3)  # the part that grows with the rows
    assert costs[1] / costs[0] < 2.2  # twice the rows: about twice the work (dense: N q2^2 would double too,
    # but q2 = 60 schools make the dense estimate 60x the sparse one)


def test_cost_limit_raises_before_any_work(monkeypatch):
    m = lmmarg.Model("y ~ 1 + (1 | school/klass)", nested_data(5))
    f = Fit(m, draws(m))
    monkeypatch.setattr(lmloo, "MAX_FLOPS", 1.0)
    with pytest.raises(lmloo.LooCostError, match="MAX_FLOPS"):
        f.loo()
    assert "pointwise" not in f.loo_cache


def test_pointwise_values_are_computed_once_and_not_pickled():
    m = lmmarg.Model("strength ~ 1 + (1 | batch/cask)", lmmarg.datasets.load("Pastes"))
    f = Fit(m, draws(m))
    ll = f.log_likelihood()
    assert f.log_likelihood() is ll and lmloo.pointwise_loglik(f) is ll  # one computation per fit
    assert not ll.flags.writeable
    idata = f.to_arviz(posterior_predictive=False)
    np.testing.assert_array_equal(idata.log_likelihood["y"].values, ll)
    again = pickle.loads(pickle.dumps(f))
    assert "pointwise" not in again.loo_cache  # the values are not pickled
    np.testing.assert_allclose(again.log_likelihood(), ll)


@pytest.fixture(scope="module")
def sleep_fit():
    m = lmmarg.Model("Reaction ~ Days + (Days | Subject)", lmmarg.datasets.load("sleepstudy"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return m.sample(chains=1, warmup=150, draws=150, progress_bar=False, seed=1)


def test_reloo_refit_gives_exact_elpd_close_to_psis(sleep_fit):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        psis = sleep_fit.loo(reloo=False)
        k = psis.pareto_k.values
        i = int(np.argmin(k))  # a well-behaved row: PSIS and the refit agree within Monte Carlo error
        got = lmloo.reloo_points(sleep_fit, [i], progress=False)
    assert set(got) == {i} and np.isfinite(got[i])
    assert abs(got[i] - psis.loo_i.values[i]) < 0.25
    with pytest.raises(ValueError, match="reloo must be"):
        sleep_fit.loo(reloo="yes")
    with pytest.raises(ValueError, match="reloo applies"):
        sleep_fit.loo(group="Subject", reloo=True)


def test_reloo_replaces_flagged_points(sleep_fit, monkeypatch):
    """The two largest-k rows flagged (threshold lowered between their k's and the rest): reloo=None refits them
    (refits replaced by a recorder here; the refit itself is tested above), their elpd is the refit's, their k is
    0, the totals follow, and the results are kept on the fit."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = sleep_fit.loo(reloo=False)
    k = base.pareto_k.values
    top = sorted(int(j) for j in np.argsort(k)[-2:])
    calls = []

    def fake_points(fit, rows, progress=True, seed=0):
        calls.append(list(rows))
        return {r: -5.0 - r for r in rows}

    monkeypatch.setattr(lmloo, "reloo_points", fake_points)
    monkeypatch.setattr(lmloo, "RELOO_K", float(np.sort(k)[-3]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = sleep_fit.loo(progress=False)
        again = sleep_fit.loo(progress=False)
    assert out.attrs["lmmarg_reloo"] == top and calls == [top]  # the second call reuses the refits
    assert [out.loo_i.values[j] for j in top] == [-5.0 - j for j in top]
    assert all(out.pareto_k.values[j] == 0 for j in top) and not out.warning
    assert out.elpd_loo == pytest.approx(out.loo_i.values.sum()) and again.elpd_loo == out.elpd_loo
    monkeypatch.setattr(lmloo, "RELOO_MAX", 1)  # too many flagged points for automatic refits: a warning
    sleep_fit.loo_cache.pop("reloo")
    with pytest.warns(UserWarning, match="2 observations have Pareto k"):
        kept = sleep_fit.loo(progress=False)
    assert kept.attrs["lmmarg_reloo"] == [] and len(calls) == 1


@pytest.mark.parametrize("term", ["scale(Days)", "poly(Days, 2)", "center(Days)", "I(Days**2)"])
def test_conditional_effects_through_stateful_transforms(term):
    data = lmmarg.datasets.load("sleepstudy")
    m = lmmarg.Model(f"Reaction ~ {term} + (1 | Subject)", data)
    f = Fit(m, draws(m, chains=1, n=5) | {"u_Subject": np.zeros((1, 5, 18, 1))})
    ce = f.conditional_effects("Days", resolution=7)
    assert list(ce["Days"]) == pytest.approx(np.linspace(0, 9, 7))
    # the grid goes through the training data's transform state (mean / sd / orthogonal basis of the fit)
    X = np.asarray(m.design.fixed_spec.get_model_matrix(pd.DataFrame({"Days": np.linspace(0, 9, 7)})))
    np.testing.assert_allclose(ce["estimate"], (f.samples["beta"][0] @ X.T).mean(0), rtol=1e-10)
