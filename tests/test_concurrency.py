"""Fits in several threads of one process (lmmarg.compile.limits: NumPyro's handler stack is process-global, so lmmarg
traces under one lock and computes concurrently). Every concurrent result must equal the sequential result with
the same seed. Each test runs its work in daemon threads joined with a hard timeout: a deadlock fails the test
(with every thread's stack in the message) instead of hanging CI."""
import sys
import threading
import traceback

import numpy as np
import pandas as pd
import pytest

import lmmarg
from lmmarg.compile import TRACE_LOCK

# the sampler's diagnostics of these short runs are not the point (warnings.catch_warnings is not thread-safe)
pytestmark = pytest.mark.filterwarnings("ignore::lmmarg.inference.nuts.SamplerWarning")

TIMEOUT_S = 300   # per group of threads; a healthy group takes seconds to a minute on a loaded 2-core machine
FIT = dict(chains=1, warmup=100, draws=100, progress_bar=False)


def _data(seed: int, groups: int, per: int = 6) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(groups), per)
    x = rng.normal(size=g.size)
    y = 1.0 + 0.5 * x + rng.normal(size=groups)[g] + 0.7 * rng.normal(size=g.size)
    return pd.DataFrame({"y": y, "x": x, "g": [f"g{i}" for i in g]})


def _in_threads(fns: list, timeout: float = TIMEOUT_S) -> list:
    """Run each fn() in its own thread, all at once; their results in order. Fails when a thread is still running
    after `timeout` seconds (its stack in the message) and re-raises the first error of a thread."""
    results, errors = [None] * len(fns), []
    start = threading.Barrier(len(fns))

    def run(i, fn):
        try:
            start.wait(timeout)
            results[i] = fn()
        except BaseException as e:  # noqa: BLE001 -- reported by the test thread
            errors.append((i, e))

    threads = [threading.Thread(target=run, args=(i, fn), daemon=True, name=f"lmmarg-test-{i}")
               for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    alive = [t for t in threads if t.is_alive()]
    if alive:
        frames = sys._current_frames()
        stacks = "\n".join(f"--- {t.name}\n" + "".join(traceback.format_stack(frames[t.ident]))
                           for t in alive if t.ident in frames)
        pytest.fail(f"{len(alive)} thread(s) still running after {timeout} s (deadlock?):\n{stacks}")
    if errors:
        raise errors[0][1]
    return results


def _sample(model, seed):
    return model.sample(seed=seed, **FIT)


def _assert_same(a, b, what: str) -> None:
    assert set(a.samples) == set(b.samples), what
    for k in a.samples:
        np.testing.assert_allclose(a.samples[k], b.samples[k], rtol=1e-12, atol=0, err_msg=f"{what}: {k}")


def _assert_lock_free() -> None:
    assert TRACE_LOCK.acquire(blocking=False), "lmmarg's trace lock is still held after the fits"
    TRACE_LOCK.release()


SHAPES = ((0, 5), (1, 7), (2, 9))   # (seed, groups): three structures, traced concurrently when cold


def test_threads_sampling_their_own_models_match_sequential():
    """Three threads build and sample models of different shapes at once, three rounds (the first cold: every
    structure is traced and compiled concurrently; later rounds trace fresh models against cached programs)."""
    rounds = [_in_threads([lambda s=s, g=g: _sample(lmmarg.Model("y ~ x + (1 | g)", _data(s, g)), s)
                           for s, g in SHAPES])]
    reference = [_sample(lmmarg.Model("y ~ x + (1 | g)", _data(s, g)), s) for s, g in SHAPES]
    for _ in range(2):
        rounds.append(_in_threads([lambda s=s, g=g: _sample(lmmarg.Model("y ~ x + (1 | g)", _data(s, g)), s)
                                   for s, g in SHAPES]))
    for r, fits in enumerate(rounds):
        for (_, g), fit, ref in zip(SHAPES, fits, reference):
            assert fit.samples["u_g"].shape == (1, 100, g, 1)
            assert fit.samples["beta"].shape == (1, 100, 2)
            _assert_same(fit, ref, f"round {r}, {g} groups")
    _assert_lock_free()


def test_threads_sharing_one_model_match_sequential():
    """Two threads sample one Model object (one potential, one compiled driver) with two seeds, twice."""
    model = lmmarg.Model("y ~ x + (x | g)", _data(3, 6))
    for _ in range(2):
        a, b = _in_threads([lambda: _sample(model, 11), lambda: _sample(model, 12)])
        _assert_same(a, _sample(model, 11), "shared model, seed 11")
        _assert_same(b, _sample(model, 12), "shared model, seed 12")
        assert not np.array_equal(a.samples["beta"], b.samples["beta"])   # the seeds were not mixed up
        assert a.samples["corr_g"].shape == (1, 100, 2, 2)
    _assert_lock_free()


def test_ml_map_vi_and_sampling_concurrently_match_sequential():
    """fit_ml, fit_map, fit_vi and sample() at once, each on its own model, against sequential fits."""
    def ml():
        return lmmarg.Model("y ~ x + (1 | g)", _data(4, 8)).fit_ml()

    def map_():
        return lmmarg.Model("y ~ x + (1 | g)", _data(5, 6)).fit_map()

    def vi():
        return lmmarg.Model("y ~ x + (1 | g)", _data(6, 7)).fit_vi(steps=300, draws=50)

    def nuts():
        return _sample(lmmarg.Model("y ~ x + (1 | g)", _data(7, 5)), 7)

    together = _in_threads([ml, map_, vi, nuts])
    alone = [ml(), map_(), vi(), nuts()]
    (ml_c, map_c, vi_c, nuts_c), (ml_s, map_s, vi_s, nuts_s) = together, alone
    assert ml_c.converged and ml_s.converged
    np.testing.assert_allclose(ml_c.beta, ml_s.beta, rtol=1e-10)
    np.testing.assert_allclose(ml_c.theta, ml_s.theta, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(ml_c.loglik, ml_s.loglik, rtol=1e-12)
    for k in map_s.mode:
        np.testing.assert_allclose(map_c.mode[k], map_s.mode[k], rtol=1e-10, atol=1e-12, err_msg=k)
    np.testing.assert_allclose(vi_c.losses, vi_s.losses, rtol=1e-10)
    _assert_same(vi_c, vi_s, "fit_vi")
    _assert_same(nuts_c, nuts_s, "sample")
    _assert_lock_free()
