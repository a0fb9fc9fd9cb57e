"""The sampler's user experience: honest progress, brms argument names, input checks, post-fit warnings and the
persistent compilation cache (lmmarg.inference.nuts, lmmarg.compile.persistent)."""
import os
import warnings

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

import lmmarg  # noqa: E402
from lmmarg.compile import persistent  # noqa: E402
from lmmarg.inference import nuts  # noqa: E402
from lmmarg.inference.nuts import SamplerWarning  # noqa: E402

WARMUP, DRAWS, CHAINS = 150, 300, 2
# short runs warn (R-hat, ESS) by design; the tests that check warnings record them with pytest.warns
pytestmark = pytest.mark.filterwarnings("ignore::lmmarg.inference.nuts.SamplerWarning")


@pytest.fixture(scope="module")
def model():
    rng = np.random.default_rng(3)
    G, n = 12, 120
    g = np.arange(n) % G
    x = rng.normal(size=n)
    y = 1.0 + 0.5 * x + rng.normal(size=G)[g] * 0.7 + rng.normal(size=n) * 0.5
    return lmmarg.Model("y ~ x + (1 | g)", pd.DataFrame({"y": y, "x": x, "g": [f"g{i}" for i in g]}))


@pytest.fixture(scope="module")
def spied_run(model):
    """One fit with a progress callback and a spy on the fetch of chunk results (the only place the driver
    waits for the device): every report is checked against the number of iterations fetched before it."""
    fetched, reports = {"n": 0}, []
    real = nuts.fetch

    def spy(out, n):
        host = real(out, n)
        assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(host))  # results are on the host
        fetched["n"] += n
        return host

    def callback(phase, done, total, divergences):
        reports.append((phase, done, total, divergences, fetched["n"]))

    mp = pytest.MonkeyPatch()
    mp.setattr(nuts, "fetch", spy)
    try:
        fit = model.sample(draws=DRAWS, warmup=WARMUP, chains=CHAINS, seed=0, progress_bar=callback)
    finally:
        mp.undo()
    return fit, reports


def test_progress_never_runs_ahead_of_finished_iterations(spied_run):
    fit, reports = spied_run
    assert len(reports) >= 3
    for _, done, total, _, fetched in reports:
        assert done <= fetched, "the progress report counted iterations whose results were not fetched yet"
        assert total == WARMUP + DRAWS
    dones = [r[1] for r in reports]
    assert dones == sorted(set(dones)) and dones[-1] == WARMUP + DRAWS


def test_progress_phases_in_order_and_divergences(spied_run):
    fit, reports = spied_run
    phases = [r[0] for r in reports]
    k = phases.index("sampling")
    assert set(phases[:k]) == {"warmup"} and set(phases[k:]) == {"sampling"}
    assert reports[k - 1][1] == WARMUP  # warmup is reported complete before sampling starts: no jump
    assert all(r[3] == 0 for r in reports[:k])  # divergences are counted after warmup, as Stan does
    divs = [r[3] for r in reports[k:]]
    assert divs == sorted(divs) and divs[-1] == fit.diagnostics["divergences"]


def test_warnings_follow_the_diagnostics(spied_run):
    fit, _ = spied_run
    s, msgs = fit.summary(), fit.diagnostics["warnings"]
    assert fit.diagnostics["divergences"] == 0 and not any("divergent" in m for m in msgs)
    assert fit.diagnostics["max_tree_depth_hits"] == 0 and not any("tree depth" in m for m in msgs)
    assert any("R-hat" in m for m in msgs) == bool((s["r_hat"] > 1.01).any())
    assert any("Bulk effective" in m for m in msgs) == bool((s["ess_bulk"] < 100 * CHAINS).any())
    assert any("Tail effective" in m for m in msgs) == bool((s["ess_tail"] < 100 * CHAINS).any())


def test_live_bar_names_phases_and_divergences(model, monkeypatch, capsys):
    monkeypatch.setattr(nuts, "_interactive", lambda: True)
    model.sample(draws=DRAWS, warmup=WARMUP, chains=CHAINS, seed=1)
    err = capsys.readouterr().err
    assert "NUTS warmup" in err and "NUTS sampling" in err and "divergent" in err
    assert err.index("NUTS warmup") < err.index("NUTS sampling")


def test_non_interactive_progress_is_a_few_lines(model, monkeypatch, capsys):
    monkeypatch.setattr(nuts, "_interactive", lambda: False)
    model.sample(draws=DRAWS, warmup=WARMUP, chains=CHAINS, seed=1)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("lmmarg NUTS")]
    assert 2 <= len(lines) <= 13
    assert "\r" not in "".join(lines)
    assert lines[0].startswith("lmmarg NUTS warmup") and lines[-1].startswith("lmmarg NUTS sampling")
    assert f"{WARMUP + DRAWS}/{WARMUP + DRAWS} iterations (100%)" in lines[-1]


def test_progress_bar_false_prints_nothing(model, capsys):
    model.sample(draws=DRAWS, warmup=WARMUP, chains=CHAINS, seed=1, progress_bar=False)
    assert "NUTS" not in capsys.readouterr().err


def test_brms_argument_names(model):
    fit = model.sample(draws=20, warmup=WARMUP, chains=CHAINS, seed=0, progress_bar=False, adapt_delta=0.9,
                       max_treedepth=6)
    assert fit.diagnostics["target_accept_prob"] == 0.9 and fit.diagnostics["max_tree_depth"] == 6
    with pytest.raises(TypeError, match="same option"):
        model.sample(adapt_delta=0.9, target_accept_prob=0.9)
    with pytest.raises(TypeError, match="'adapt_dleta'.*draws, warmup, chains.*target_accept_prob.*adapt_delta"):
        model.sample(adapt_dleta=0.9)
    with pytest.raises(ValueError, match="adapt_delta must be a number in \\(0, 1\\)"):
        model.sample(adapt_delta=1.5)
    with pytest.raises(ValueError, match="max_treedepth must be an integer"):
        model.sample(max_treedepth=0)


@pytest.mark.parametrize("kwargs, name", [({"warmup": 0}, "warmup"), ({"warmup": 0, "step_size": 0.1}, "warmup"),
                                          ({"warmup": -1}, "warmup"), ({"draws": 0}, "draws"),
                                          ({"chains": 0}, "chains"), ({"chains": -2}, "chains"),
                                          ({"draws": 10.5}, "draws"), ({"warmup": True}, "warmup")])
def test_bad_counts_are_refused(model, kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}[ =]"):
        model.sample(progress_bar=False, **kwargs)
    with pytest.raises(ValueError, match=f"^{name}"):
        nuts.sample(model, progress_bar=False, **kwargs)


def test_bad_run_warns_at_the_users_line(model):
    # a huge fixed step size (in the whitened coordinates, where the posterior SDs are ~1) and trees of depth 1:
    # every transition diverges and hits the tree depth
    with pytest.warns(SamplerWarning) as rec:
        fit = model.sample(draws=20, warmup=20, chains=CHAINS, seed=0, progress_bar=False, step_size=1e4,
                           adapt_step_size=False, max_treedepth=1)
    msgs = [str(w.message) for w in rec if issubclass(w.category, SamplerWarning)]
    assert msgs == fit.diagnostics["warnings"]
    assert any("divergent transitions after warmup" in m and "adapt_delta" in m for m in msgs)
    assert any("maximum tree depth of 1" in m and "max_treedepth" in m for m in msgs)
    assert any("Bulk effective sample size" in m for m in msgs)  # 40 draws cannot give 200
    assert all(w.filename == __file__ for w in rec if issubclass(w.category, SamplerWarning))


def test_recovery_and_constrain_compile_once_for_any_number_of_draws(model):
    model.sample(draws=20, warmup=WARMUP, chains=CHAINS, seed=0, progress_bar=False)
    compiles = []

    def listener(event, duration, **kw):
        # tracing happens on every in-memory cache miss, even when the persistent cache then has the program
        if event in ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/backend_compile_duration"):
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        fit2 = model.sample(draws=27, warmup=WARMUP, chains=CHAINS, seed=1, progress_bar=False)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []  # 27 draws reuse the programs compiled for 20 (driver, constrain, recovery)
    assert fit2.samples["u_g"].shape == (CHAINS, 27, 12, 1)
    assert np.isfinite(fit2.samples["u_g"]).all()


# -- persistent compilation cache -------------------------------------------------------------------------------
@pytest.fixture
def clean_cache(monkeypatch):
    """Run with lmmarg's cache state and JAX's cache directory as if nothing were configured; restore both."""
    saved_dir, saved_state = jax.config.jax_compilation_cache_dir, dict(persistent.state)
    saved_min = jax.config.jax_persistent_cache_min_compile_time_secs
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.delenv("LMMARG_JAX_CACHE", raising=False)
    jax.config.update("jax_compilation_cache_dir", None)
    persistent.state.update(ours=None, decided=False)
    yield
    jax.config.update("jax_compilation_cache_dir", saved_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", saved_min)
    persistent.state.clear()
    persistent.state.update(saved_state)
    persistent.reset_jax_cache()


def test_cache_on_by_default_in_the_per_user_dir(clean_cache, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    if os.name == "posix" and persistent.sys.platform != "darwin":
        assert persistent.default_cache_dir() == str(tmp_path / "lmmarg" / "jax")
    path = persistent.apply(None)
    assert path == persistent.default_cache_dir() == jax.config.jax_compilation_cache_dir
    assert os.path.isdir(path)
    assert persistent.set_compilation_cache(False) is None
    assert jax.config.jax_compilation_cache_dir is None


def test_cache_never_overrides_a_user_configured_cache(clean_cache, tmp_path):
    user = str(tmp_path / "mine")
    jax.config.update("jax_compilation_cache_dir", user)
    assert persistent.apply(None) == user
    assert persistent.set_compilation_cache(str(tmp_path / "other")) == user
    assert persistent.set_compilation_cache(False) == user
    assert jax.config.jax_compilation_cache_dir == user


def test_cache_respects_jax_switched_off(clean_cache):
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        assert persistent.apply(None) is None and jax.config.jax_compilation_cache_dir is None
    finally:
        jax.config.update("jax_enable_compilation_cache", True)


def test_cache_respects_jax_env_var(clean_cache, monkeypatch, tmp_path):
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "env"))
    persistent.apply(None)
    assert jax.config.jax_compilation_cache_dir is None  # JAX reads its variable itself; lmmarg sets nothing


def test_cache_off_switches(clean_cache, model, monkeypatch, tmp_path):
    monkeypatch.setenv("LMMARG_JAX_CACHE", "0")
    assert persistent.apply(None) is None and jax.config.jax_compilation_cache_dir is None
    monkeypatch.setenv("LMMARG_JAX_CACHE", str(tmp_path / "c"))
    persistent.state["decided"] = False
    assert persistent.apply(None) == str(tmp_path / "c") == jax.config.jax_compilation_cache_dir
    fit = model.sample(draws=20, warmup=WARMUP, chains=CHAINS, progress_bar=False, compilation_cache=False)
    assert jax.config.jax_compilation_cache_dir is None and fit.diagnostics["compilation_cache"] is None


def test_cache_argument_of_wrong_type_is_refused(clean_cache, model):
    with pytest.raises(TypeError, match="compilation_cache must be"):
        model.sample(compilation_cache=3)


def test_unwritable_cache_dir_falls_back_silently(clean_cache, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert persistent.set_compilation_cache(str(blocker / "sub")) is None
    assert jax.config.jax_compilation_cache_dir is None


def test_cache_is_trimmed_oldest_first(tmp_path):
    for i in range(5):
        f = tmp_path / f"entry{i}"
        f.write_bytes(b"x" * 1000)
        os.utime(f, (1000 + i, 1000 + i))
    persistent.trim(str(tmp_path), max_bytes=2500)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry3", "entry4"]
