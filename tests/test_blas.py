"""BLAS thread limit around fits (lmmarg/inference/blas.py)."""
import numpy as np
import pandas as pd
import pytest
import scipy.linalg  # noqa: F401  (loads SciPy's OpenBLAS, the library XLA:CPU's LAPACK calls use)

threadpoolctl = pytest.importorskip("threadpoolctl")

import lmmarg  # noqa: E402
from lmmarg.inference import blas  # noqa: E402


def _blas_threads():
    return [p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]


@pytest.fixture
def pools(monkeypatch):
    monkeypatch.delenv("LMMARG_BLAS_THREADS", raising=False)
    before = _blas_threads()
    if not before:
        pytest.skip("no BLAS thread pool loaded")
    return before


def test_small_dense_block_runs_single_threaded_and_restores(pools):
    with blas.blas_threads(80):
        assert _blas_threads() == [1] * len(pools)
    assert _blas_threads() == pools


def test_large_dense_block_keeps_default(pools):
    with blas.blas_threads(blas.SMALL_DENSE):
        assert _blas_threads() == pools


def test_environment_override(pools, monkeypatch):
    monkeypatch.setenv("LMMARG_BLAS_THREADS", "default")
    with blas.blas_threads(10):
        assert _blas_threads() == pools
    monkeypatch.setenv("LMMARG_BLAS_THREADS", "1")
    with blas.blas_threads(10_000):
        assert _blas_threads() == [1] * len(pools)
    monkeypatch.setenv("LMMARG_BLAS_THREADS", "two")
    with pytest.raises(ValueError, match="LMMARG_BLAS_THREADS"):
        with blas.blas_threads(10):
            pass


def test_sample_and_fit_ml_limit_blas_during_the_fit(pools, monkeypatch):
    """sample() and fit_ml() run their hot loop inside blas_threads(dense block size)."""
    import lmmarg.inference.ml as ml
    import lmmarg.inference.nuts as nuts

    seen = []
    real = blas.blas_threads

    def spy(size):
        seen.append(int(size))
        return real(size)

    monkeypatch.setattr(nuts, "blas_threads", spy)
    monkeypatch.setattr(ml, "blas_threads", spy)
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"g": np.repeat(list("abcdef"), 5), "h": np.tile(list("uvwxy"), 6)})
    df["y"] = rng.normal(size=len(df)) + df["g"].map(dict(zip("abcdef", rng.normal(size=6))))
    m = lmmarg.Model("y ~ 1 + (1 | g) + (1 | h)", df)
    m.sample(draws=20, warmup=20, chains=1, progress_bar=False)
    m.fit_ml()
    ds = m.plan("all").dense_size
    assert ds > 0 and seen == [ds, ds]
    assert _blas_threads() == pools
