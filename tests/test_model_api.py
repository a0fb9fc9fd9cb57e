"""Model.log_marginal / ranef_mean against lme4 (golden values in tests/golden/lme4.json, produced by R once)."""
import json
import pathlib

import numpy as np
import pytest

import lmmarg
from lmmarg import datasets


GOLDEN = json.loads((pathlib.Path(__file__).parent / "golden" / "lme4.json").read_text())

CASES = {  # golden key -> (dataset, formula, {lme4 group name: lmmarg term name})
    "sleepstudy_ml": ("sleepstudy", "Reaction ~ Days + (Days | Subject)", {"Subject": "Subject"}),
    "sleepstudy_uncorr_ml": ("sleepstudy", "Reaction ~ Days + (Days || Subject)",
                             {"Subject": "Subject", "Subject.1": "Subject.1"}),
    "penicillin_ml": ("Penicillin", "diameter ~ 1 + (1 | plate) + (1 | sample)",
                      {"plate": "plate", "sample": "sample"}),
    "pastes_ml": ("Pastes", "strength ~ 1 + (1 | batch/cask)", {"cask:batch": "batch:cask", "batch": "batch"}),
    "dyestuff_ml": ("Dyestuff", "Yield ~ 1 + (1 | Batch)", {"Batch": "Batch"}),
    "grouseticks_ml": ("grouseticks", "logTICKS ~ YEAR + HEIGHT + (1 | BROOD) + (1 | LOCATION)",
                       {"BROOD": "BROOD", "LOCATION": "LOCATION"}),
}


def _lmmarg_level(lme4_group: str, level: str) -> str:
    # lme4 writes the nested term "cask:batch" with labels "a:A"; lmmarg writes "batch:cask" with "A:a"
    return ":".join(reversed(level.split(":"))) if lme4_group == "cask:batch" else level


def _setup(key):
    data, formula, names = CASES[key]
    g = GOLDEN[key]
    model = lmmarg.Model(formula, datasets.load(data))
    beta = [g["fixef_formulaic"][n] for n in model.fixed_names]
    cov = {names[grp]: np.atleast_2d(r["cov"]) for grp, r in g["random"].items()}
    return model, g, beta, cov, names


@pytest.mark.parametrize("key", list(CASES))
def test_log_marginal_equals_lme4_loglik_at_lme4_estimates(key):
    model, g, beta, cov, _ = _setup(key)
    ll = model.log_marginal(beta, g["sigma"], cov)
    assert ll == pytest.approx(g["logLik"], rel=1e-6)


@pytest.mark.parametrize("key", ["sleepstudy_ml", "pastes_ml", "penicillin_ml"])
def test_ranef_mean_equals_lme4_conditional_modes(key):
    model, g, beta, cov, names = _setup(key)
    means = model.ranef_mean(beta, g["sigma"], cov)
    for grp, r in g["random"].items():
        term = model.design.term(names[grp])
        for level, values in r["ranef"].items():
            got = means[term.name][term.levels.index(_lmmarg_level(grp, level))]
            np.testing.assert_allclose(got, values, rtol=2e-4, atol=2e-4 * (1 + np.abs(values).max()))


def test_log_marginal_rejects_bad_covariances():
    model = lmmarg.Model("Reaction ~ Days + (Days | Subject)", datasets.load("sleepstudy"))
    good = {"Subject": [[500.0, 10.0], [10.0, 30.0]]}
    assert np.isfinite(model.log_marginal([250, 10], 25, good))
    assert model.log_marginal([250, 10], 25, {"Subject": [[500.0, 200.0], [200.0, 30.0]]}) == -np.inf
    singular = model.log_marginal([250, 10], 25, {"Subject": [[500.0, 0.0], [0.0, 0.0]]})
    assert np.isfinite(singular)
    with pytest.raises(ValueError, match="2x2"):
        model.log_marginal([250, 10], 25, {"Subject": [[1.0]]})
    with pytest.raises(ValueError, match="missing \\['Subject'\\]"):
        model.log_marginal([250, 10], 25, {})
    with pytest.raises(ValueError, match="beta must have 2 entries"):
        model.log_marginal([250], 25, good)


def test_marginalize_choice_resolution():
    model = lmmarg.Model("diameter ~ 1 + (1 | plate) + (1 | sample)", datasets.load("Penicillin"))
    assert model.resolve_marginalize("all") == (0, 1)
    assert model.resolve_marginalize("none") == ()
    assert model.resolve_marginalize(["sample"]) == (1,)
    assert model.resolve_marginalize("auto") == (0, 1)
    big = lmmarg.Model("y ~ 1 + (1 | s) + (1 | d)", _crossed_frame(n_s=60, n_d=80, n=600))
    assert big.auto_dense_limit == 32
    assert big.resolve_marginalize("auto") in ((0,), (1,))  # a dense block of 60 or 80 is too costly here
    assert big.resolve_marginalize("all") == (0, 1)
    with pytest.raises(ValueError, match="unknown term 'plates'"):
        model.resolve_marginalize(["plates"])


def _crossed_frame(n_s, n_d, n, seed=0):
    import pandas as pd
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"y": rng.normal(size=n), "s": rng.integers(n_s, size=n).astype(str),
                         "d": rng.integers(n_d, size=n).astype(str)})


def test_kernel_names_the_engine_kernels():
    """Model.kernel(name): the model's jitted engine kernel; an unknown name raises a ValueError that names it and
    lists the kernels (not an AttributeError from the module)."""
    model = lmmarg.Model("Reaction ~ Days + (Days | Subject)", datasets.load("sleepstudy"))
    assert model.kernel("log_marginal") is model.kernel("log_marginal")      # compiled once per model
    with pytest.raises(ValueError, match=r"no kernel 'log_marginl'.*'conditional_mean'"):
        model.kernel("log_marginl")
    with pytest.raises(ValueError, match="no kernel 'Factor'"):             # a record type, not a kernel
        model.kernel("Factor")
