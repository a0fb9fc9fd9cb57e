"""Test-suite set-up, shared by every test module.

* One BLAS thread (set before NumPy loads its BLAS): the dense oracles work on tiny matrices, where OpenBLAS's
  worker threads only spin (``lmmarg.inference.blas`` does the same for the library's own small blocks).
* JAX's float64 mode: the oracle comparisons are at 1e-10 (``Model(dtype="float64")`` would turn it on anyway;
  kernels called directly need it set).
* lmmarg's persistent compilation cache in a fresh temporary directory (``LMMARG_JAX_CACHE``, unless set): the
  suite exercises the default-on cache without reading or filling the user's own. The directory is made once, by
  the process that starts the run; pytest-xdist's worker processes inherit it, so a program one worker compiled
  is loaded from disk by the other (test modules share many model structures). Each process switches the cache on
  as it starts (``lmmarg.compile.persistent.apply``: what its first ``sample()`` or ``fit_ml()`` would do), so
  programs compiled before any fit (NumPyro's MCMC on an lmmarg potential, the benchmarks' harness) are shared too.
* Compiled programs are shared across test modules: lmmarg bounds its own compiled structures
  (``lmmarg.compile.limits``), and after a module the suite releases everything only when the process holds many memory
  mappings (``_release_when_large``; tests jit functions of their own that lmmarg does not count).
* The suite runs in parallel processes (pytest-xdist, ``-n auto --dist loadfile`` in the README's command): a test
  module's tests stay in one process, so its module-scoped fixtures are built once. The modules are handed out
  longest first (``LONGEST_FIRST``, then the others in their usual order; xdist's own reordering by test count is
  switched off): a long module handed out last would keep one worker busy after the others have finished.
* ``dense_reference`` (the O(N^3) oracle) is importable as a top-level module: pytest puts this rootdir-relative
  folder first on the import path, so test modules simply ``from dense_reference import ...``. So is
  ``modelcache``: models and fits that several test modules use, built once per process.
"""
import atexit
import gc
import os
import shutil
import tempfile

if "LMMARG_JAX_CACHE" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="lmmarg-test-jax-cache-")
    os.environ["LMMARG_JAX_CACHE"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)

from lmmarg.compile import persistent  # noqa: E402

persistent.apply()


# Release compiled programs after a module once the process holds this many memory mappings (a Linux process may
# have 65,530; one compiled XLA:CPU program holds tens to hundreds, and one process runs hundreds of models).
RELEASE_AT_MAPPINGS = 20_000


def _mappings() -> int:
    try:
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)
    except OSError:      # not Linux: release after every module, as the suite did before sharing programs
        return RELEASE_AT_MAPPINGS


@pytest.fixture(autouse=True, scope="module")
def _release_when_large():
    """After each test module: when the process holds many memory mappings, drop lmmarg's shared programs and JAX's
    caches of compiled executables (``lmmarg.compile.release_compiled``); what a module's own globals still
    reference stays alive."""
    yield
    if _mappings() >= RELEASE_AT_MAPPINGS:
        from lmmarg.compile import release_compiled
        release_compiled()
        gc.collect()


# The longest test modules, longest first (their share of the suite's CPU time, measured with --durations); modules
# not named here follow in collection order. Only the order changes: a module's tests stay together and in order.
LONGEST_FIRST = ("test_benchmarks_smoke.py", "test_glmm.py", "test_docs_examples.py", "test_marginal.py",
                 "test_statistics_model.py", "test_conditional_param.py", "test_potential.py", "test_families.py",
                 "test_precondition.py", "test_large_data_smoke.py", "test_workflow.py", "test_programs.py",
                 "test_mapvi.py", "test_ml_optima.py", "test_concurrency.py", "test_sources.py")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):   # pytest-xdist: keep the collection order made below
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable: other modules keep their order
