"""BLAS threads while small dense blocks are factorized on CPU.

XLA:CPU runs Cholesky factorizations and triangular solves through SciPy's OpenBLAS, which starts one worker
thread per core and lets them busy-wait between calls. For the dense block of a marginalized model (tens to a few
hundred rows) those threads buy nothing, and when anything else shares the cores (parallel chains, a second
process, CI) they take CPU from the thread doing the work: on a loaded machine, one value-and-gradient of the
dillonE1 model with every class marginalized (dense block 80 x 80) took several times the CPU time it takes with
one BLAS thread (docs/benchmarks.md, 'Measurements behind the code').

``blas_threads(dense_size)`` limits those pools to one thread for the duration of a fit when the dense block is
smaller than ``SMALL_DENSE`` rows and restores them afterwards; large blocks keep the library's default. It is a
no-op when threadpoolctl is missing or no OpenBLAS/MKL pool is loaded (e.g. on GPU-only installs). The
environment variable ``LMMARG_BLAS_THREADS`` (an integer, or ``"default"`` to leave the pools alone) overrides it.

Documented internal API (lmmarg.inference's fits and the tests): ``blas_threads(dense_size)``, ``SMALL_DENSE``.
"""
from __future__ import annotations

import contextlib
import os

__all__ = ["blas_threads", "SMALL_DENSE"]

SMALL_DENSE = 512   # dense blocks with fewer rows run with one BLAS thread


def _requested(dense_size: int):
    """Thread count to impose (None: leave the pools alone)."""
    env = os.environ.get("LMMARG_BLAS_THREADS", "").strip().lower()
    if not env:
        return 1 if dense_size < SMALL_DENSE else None
    if env == "default":
        return None
    if not env.isdigit() or int(env) < 1:
        raise ValueError(f"LMMARG_BLAS_THREADS must be a positive integer or 'default', got {env!r}")
    return int(env)


@contextlib.contextmanager
def blas_threads(dense_size: int):
    """Context manager: BLAS pools limited to one thread (see module docstring) while the block runs."""
    n = _requested(int(dense_size))
    if n is None:
        yield None
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional at run time: without it the pools keep their defaults
        yield None
        return
    with threadpool_limits(limits=n, user_api="blas") as lim:
        yield lim
