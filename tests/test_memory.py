"""Long-running processes: lmmarg's compiled programs stay bounded (lmmarg.compile.cache_info), and a low
address-space limit (ulimit -v) gives a clear MemoryError instead of XLA aborting the process."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

import lmmarg
from lmmarg.compile import limits, programs

FORMULAS = ("y ~ x + (1 | g)", "y ~ x + z + (1 | g)", "y ~ x + (x | g)", "y ~ x + (1 | g) + (1 | h)")


def _data(i: int) -> tuple[str, pd.DataFrame]:
    """A model of the i-th shape: rows, groups and terms all vary with i."""
    rng = np.random.default_rng(i)
    groups, per = 4 + i, 3 + i % 3
    n = groups * per
    g = np.repeat(np.arange(groups), per)
    x, z = rng.normal(size=n), rng.normal(size=n)
    y = 1.0 + 0.5 * x + rng.normal(size=groups)[g] + rng.normal(size=n)
    h = rng.integers(0, 3, n)
    return FORMULAS[i % 4], pd.DataFrame({"y": y, "x": x, "z": z, "g": [f"g{k}" for k in g],
                                          "h": [f"h{k}" for k in h]})


def _maps() -> int:
    with open("/proc/self/maps") as f:
        return len(f.readlines())


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux's /proc")
def test_refits_on_new_shapes_keep_compiled_programs_bounded(monkeypatch):
    """12 fit_ml() calls on models of 12 shapes: lmmarg never keeps more than MAX_COMPILED_STRUCTURES compiled
    structures, releases them when the bound is reached, and the process's memory mappings stop growing (without
    the bound: ~35 more mappings per fit, for good)."""
    monkeypatch.setattr(limits, "MAX_COMPILED_STRUCTURES", 4)
    before = limits.cache_info()
    maps, sizes = [], []
    for i in range(12):
        formula, data = _data(i)
        fit = lmmarg.Model(formula, data).fit_ml()
        assert np.isfinite(fit.loglik)
        info = limits.cache_info()
        sizes.append(info["structures"])
        assert info["programs"] <= programs.PROGRAM_CACHE_SIZE
        maps.append(_maps())
    after = limits.cache_info()
    assert max(sizes) <= 4 and after["max_structures"] == 4
    assert after["total_structures"] - before["total_structures"] >= 12   # each new shape compiled its own
    assert after["releases"] - before["releases"] >= 2
    # flattening: the last six fits map no more than the peak of the first six (plus allocator noise), whereas
    # unbounded caches grow by ~200 mappings over six fits
    assert max(maps[6:]) <= max(maps[:6]) + 60, maps


def test_release_keeps_live_programs_usable():
    """After release_compiled() (what the bound triggers), a model fitted before refits and gives the same
    answer (its programs compile again)."""
    formula, data = _data(1)
    model = lmmarg.Model(formula, data)
    first = model.fit_ml()
    limits.release_compiled()
    assert limits.cache_info()["structures"] == 0 and limits.cache_info()["programs"] == 0
    again = model.fit_ml()
    np.testing.assert_allclose(again.beta, first.beta, rtol=1e-10)
    np.testing.assert_allclose(again.loglik, first.loglik, rtol=1e-12)


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS as on Linux")
def test_low_address_space_limit_raises_memory_error():
    """Under ulimit -v 2 GB, Model() raises AddressSpaceError (a MemoryError) naming the limit and the minimum;
    without the check XLA aborts the interpreter while it starts (measured: 'cannot allocate memory for
    thread-local data', SIGABRT / segfault)."""
    code = textwrap.dedent("""
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, hard))
        import numpy as np, pandas as pd
        import lmmarg
        d = pd.DataFrame({"y": np.arange(12.0) % 5, "x": np.arange(12.0), "g": list("abc") * 4})
        try:
            lmmarg.Model("y ~ x + (1 | g)", d).sample(chains=1, warmup=20, draws=20, progress_bar=False)
        except MemoryError as e:
            print("REFUSED", type(e).__name__, e)
        else:
            print("RAN")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "REFUSED AddressSpaceError" in out.stdout, out.stdout + out.stderr[-2000:]
    assert "2,048 MB" in out.stdout and "ulimit -v" in out.stdout
    assert f"{limits.MIN_ADDRESS_SPACE / 2**20:,.0f} MB" in out.stdout
