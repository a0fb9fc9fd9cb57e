"""Test-suite set-up, shared by every test module.

* One BLAS thread (set before NumPy loads its BLAS): the dense oracles work on tiny matrices, where OpenBLAS's
  worker threads only spin (``lmmarg.inference._blas`` does the same for the library's own small blocks).
* JAX's float64 mode: the oracle comparisons are at 1e-10 (``Model(dtype="float64")`` would turn it on anyway;
  kernels called directly need it set).
* lmmarg's persistent compilation cache in a fresh temporary directory (``LMMARG_JAX_CACHE``, unless set): the
  suite exercises the default-on cache without reading or filling the user's own.
* After each test module, lmmarg's shared compiled programs and JAX's executable caches are released (see
  ``_release_compiled_programs``).
* ``dense_reference`` (the O(N^3) oracle) is importable as a top-level module: pytest puts this rootdir-relative
  folder first on the import path, so test modules simply ``from dense_reference import ...``.
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


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """After each test module: drop lmmarg's shared programs and JAX's caches of compiled executables. The suite
    compiles hundreds of models in one process, and compiled XLA:CPU programs hold memory mappings of their machine
    code (a Linux process may have 65,530); what a module's own globals still reference stays alive."""
    yield
    from lmmarg.potential import Programs
    Programs._cache.clear()
    jax.clear_caches()
    gc.collect()
