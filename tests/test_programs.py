"""Compiled programs take the data as an argument and are shared between models of one structure and shapes."""
import jax
import numpy as np
import numpyro.distributions as dist
import pytest

from lmmarg import Model, datasets
from lmmarg.compile import programs as programs_mod
from lmmarg.compile.programs import Programs, signature

FORM = "Reaction ~ Days + (Days | Subject)"


def _data(seed: int):
    d = datasets.load("sleepstudy").copy()
    d["Reaction"] = d["Reaction"].to_numpy() + np.random.default_rng(seed).normal(0, 20, len(d))
    return d


def _run(m):
    return m.sample(draws=60, warmup=60, chains=2, seed=3, progress_bar=False)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_refit_on_new_data_reuses_programs_and_equals_a_fresh_compilation():
    Programs.clear()
    m1, m2 = Model(FORM, _data(1)), Model(FORM, _data(2))
    f1, f2 = _run(m1), _run(m2)
    assert m2.potential().programs is m1.potential().programs
    assert m2.potential().programs.template is m1.potential()
    # the second fit compiled nothing (its data went into the first fit's programs)
    assert f2.diagnostics["time_compile"] < 0.5 * f1.diagnostics["time_compile"]
    # the data really flow: another data set, another posterior
    assert not np.allclose(f1.samples["beta"], f2.samples["beta"])
    Programs.clear()
    m3 = Model(FORM, _data(2))
    f3 = _run(m3)
    assert m3.potential().programs is not m1.potential().programs
    for k in ("beta", "sigma", "sd_Subject", "corr_Subject", "u_Subject"):
        np.testing.assert_allclose(f3.samples[k], f2.samples[k], rtol=1e-9, atol=1e-12)


def test_prior_values_are_data_prior_families_are_structure():
    d = _data(1)
    wider = Model(FORM, d, priors={"b_Days": dist.Normal(0.0, 50.0)})
    narrower = Model(FORM, d, priors={"b_Days": dist.Normal(0.0, 5.0)})
    other = Model(FORM, d, priors={"b_Days": dist.StudentT(3.0, 0.0, 5.0)})
    pw, pn, po = (m.potential() for m in (wider, narrower, other))
    assert signature(pw) == signature(pn)
    assert signature(pw) != signature(po)
    assert pn.programs is pw.programs
    x = pw.init_params(jax.random.PRNGKey(0), num_chains=None)
    shared = float(pn.programs.density(x, pn.data))
    own = float(pn.density(x, pn.data))            # traced for this model alone, not through the shared program
    np.testing.assert_allclose(shared, own, rtol=1e-12)
    assert abs(shared - float(pw.potential_fn(x))) > 1e-6
    # the prior difference is exactly the change of the b_Days log density
    b = float(pn.to_constrained(x)["b_Days"])
    diff = float(dist.Normal(0.0, 50.0).log_prob(b) - dist.Normal(0.0, 5.0).log_prob(b))
    np.testing.assert_allclose(shared - float(pw.potential_fn(x)), diff, rtol=1e-9)


def test_names_and_shapes_are_part_of_the_signature():
    d = _data(1)
    renamed = d.rename(columns={"Subject": "subj"})
    a = Model(FORM, d).potential()
    b = Model("Reaction ~ Days + (Days | subj)", renamed).potential()
    c = Model(FORM, d.iloc[:170]).potential()      # fewer rows
    assert len({signature(a), signature(b), signature(c)}) == 3
    assert b.programs is not a.programs and c.programs is not a.programs


def test_large_data_keep_their_own_programs(monkeypatch):
    monkeypatch.setattr(programs_mod, "PROGRAM_SHARE_MAX_BYTES", 0)
    d = _data(1)
    a, b = Model(FORM, d).potential(), Model(FORM, d).potential()
    assert a.programs is not b.programs


def test_program_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(programs_mod, "PROGRAM_CACHE_SIZE", 2)
    Programs.clear()
    d = _data(1)
    pots = [Model(FORM, d.iloc[:n]).potential() for n in (150, 160, 170)]
    progs = [p.programs for p in pots]
    assert len(Programs.cached()) == 2
    assert progs[0] not in Programs.cached() and progs[2] in Programs.cached()


def test_drivers_per_structure_are_bounded(monkeypatch):
    monkeypatch.setattr(programs_mod, "DRIVERS_PER_STRUCTURE", 2)
    progs = Model(FORM, _data(1)).potential().programs
    progs.drivers.clear()
    made = [progs.driver(k, lambda k=k: object()) for k in ("a", "b", "a", "c")]
    assert made[0] is made[2]                       # a hit returns the cached driver
    assert list(progs.drivers) == ["a", "c"]        # "b" was the least recently used


def test_compiled_programs_do_not_depend_on_the_hash_seed():
    """The persistent compilation cache can only hit across processes if the lowered program is the same in each
    (NumPyro flattens distributions in a set's order; lmmarg's data sort them)."""
    import os
    import subprocess
    import sys
    code = ("import hashlib, jax; jax.config.update('jax_enable_x64', True); "
            "from lmmarg import Model, datasets; "
            "pot = Model('Reaction ~ Days + (Days | Subject)', datasets.load('sleepstudy')).potential(); "
            "x = pot.init_params(jax.random.PRNGKey(0), num_chains=None, check=False); "
            "print(hashlib.sha256(jax.jit(pot.density).lower(x, pot.data).as_text().encode()).hexdigest())")
    outs = {subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed},
                           capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            for seed in ("1", "2", "3")}
    assert len(outs) == 1


def _backend_compiles(fn) -> int:
    """Number of XLA compilations (in this thread) while fn() runs."""
    n = [0]

    def listener(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            n[0] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        fn()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return n[0]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("priors", [None, {"Intercept": dist.Normal(250, 100), "b": dist.Normal(0, 50)}])
def test_outputs_compiled_during_sampling_are_what_constrain_and_recover_run(priors):
    """sample() compiles the constrain and recovery programs in a background thread while NUTS runs
    (Potential.compile_outputs): the calls after sampling must find them (no compilation), also with beta
    integrated out (normal priors: beta comes from the recovery)."""
    Programs.clear()
    m = Model(FORM, _data(4), priors=priors)
    pot = m.potential(marginalize_beta=priors is not None)
    pot.compile_outputs(recover=True)
    raw = pot.init_params(jax.random.PRNGKey(0), num_chains=3)
    raw = {k: np.repeat(np.asarray(v)[:, None], 5, axis=1) for k, v in raw.items()}   # (3 chains, 5 draws, ...)
    out = {}
    assert _backend_compiles(lambda: out.update(pot.constrain(raw))) == 0
    assert _backend_compiles(lambda: out.update(pot.recover(out, jax.random.PRNGKey(1)))) == 0
    assert out["u_Subject"].shape == (3, 5, 18, 2) and out["beta"].shape == (3, 5, 2)
    fit = m.sample(draws=50, warmup=50, chains=2, progress_bar=False)
    assert fit.diagnostics["marginalize_beta"] == (priors is not None)
    assert fit.diagnostics["time_recover"] < 0.5 and fit.samples["u_Subject"].shape == (2, 50, 18, 2)
