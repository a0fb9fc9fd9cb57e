"""How lmmarg compiles its programs: ``jit`` is ``jax.jit`` with XLA options chosen for the marginal engine
(``lmmarg.compile.jit``).

A potential's value-and-gradient is ~120 small fusions (the engine's blocks are small: 2 x 2 leaves, an 80 x 80
dense block on dillonE1), and XLA:CPU compiles each fusion into a kernel of its own (each costs LLVM time). Users pay
compilation on every fit, so lmmarg's own programs (NUTS, recovery, ML, MAP/VI, LOO) use these options on CPU
(the measurements: docs/benchmarks.md, 'Measurements behind the code'):

- ``xla_cpu_use_fusion_emitters=False``: XLA:CPU's LLVM IR emitters compile the same program faster than its MLIR
  fusion emitters and run it at the same speed (dillonE1, every term marginalized, one core;
  ``benchmarks/engine_cost.py``).
- for programs whose data have no long axis (``SMALL_DATA_MAX_DIM``; pass ``data=``), XLA's tree-reduction
  rewrite is off. It turns every reduction over more than 32 entries into a windowed reduction plus a final one:
  two more kernels, and the producer no longer fuses into the reduction. On dillonE1 it made 11 of the 55 compiled
  modules and compiled measurably slower with it than without (medians of alternating processes); the sums it
  splits there have 36-80 terms. Over long axes (a class left to HMC: sums over the N observations) the rewrite
  runs faster per call, and is kept.
- for the same programs, XLA:CPU's memory-optimized instruction order
  (``xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED``) instead of its concurrency-optimized default.
  XLA:CPU's runtime runs the compiled kernels as a dataflow graph and hands kernels that are ready together to its
  thread pool; for kernels of a few microseconds a handoff costs more than the overlap gains. The memory-optimized
  order reuses buffers, which chains most kernels, so a call hands off less. dillonE1's value-and-gradient: fewer
  context switches per call, and faster called from Python (paired blocks in one process, one core or two); in a
  compiled loop and in compile time, no change. On larger small-data programs (N = 10,000, 300 x 60 crossed
  levels) the difference was within noise either way.

Other backends get none; a jaxlib that does not know an option compiles without that one. ``LMMARG_XLA_DEFAULTS=1``
turns them all off (for comparisons).

Documented internal API (besides ``__all__``): ``accepted(options) -> bool``, the probe of whether this jaxlib
compiles with ``options``; ``options_for(backend, short)``, the options kept per backend (cached: call
``options_for.cache_clear()`` after changing ``LMMARG_XLA_DEFAULTS`` in a running process).
"""
from __future__ import annotations

import functools
import logging
import os

import jax
import numpy as np

__all__ = ["jit", "compiler_options", "CPU_COMPILER_OPTIONS", "SMALL_DATA_OPTIONS", "SMALL_DATA_MAX_DIM"]

logger = logging.getLogger(__name__)

CPU_COMPILER_OPTIONS = {"xla_cpu_use_fusion_emitters": False}
# programs on small data: many kernels of a few microseconds each (see the module docstring)
SMALL_DATA_OPTIONS = {"xla_disable_hlo_passes": "tree_reduction_rewriter",
                      "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
SMALL_DATA_MAX_DIM = 16_384   # data with an axis at least this long (observations) keep XLA's defaults for both


def accepted(options: dict) -> bool:
    """Whether this jaxlib compiles with ``options`` (an unknown option makes compilation fail: probe once)."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=options).lower(1.0).compile()
    except Exception as e:  # noqa: BLE001 - any failure means: compile with XLA's defaults
        logger.debug("XLA options %s not accepted (%s); using XLA's defaults", options, e)
        return False
    return True


@functools.lru_cache(maxsize=None)
def options_for(backend: str, short: bool = False) -> tuple:
    """The options for `backend` as a tuple of items; each option is kept only if this jaxlib accepts it (with the
    ones kept before it), so a jaxlib that drops one option keeps the others."""
    if backend != "cpu" or os.environ.get("LMMARG_XLA_DEFAULTS", "").lower() in ("1", "true", "yes", "on"):
        return ()
    kept: dict = {}
    for key, value in {**CPU_COMPILER_OPTIONS, **(SMALL_DATA_OPTIONS if short else {})}.items():
        if accepted({**kept, key: value}):
            kept[key] = value
    return tuple(kept.items())


def _longest_axis(data) -> int:
    """The longest axis of any array in the pytree ``data`` (0 for none)."""
    return max((max(np.shape(leaf), default=1) for leaf in jax.tree.leaves(data)), default=0)


def compiler_options(data=None) -> dict:
    """The XLA compiler options lmmarg compiles its programs with on the default backend ({} for XLA's defaults).

    data: the pytree of arrays the program computes on (its arguments or what it closes over); only its shapes
    are read. With data whose longest axis is below SMALL_DATA_MAX_DIM, the options include SMALL_DATA_OPTIONS;
    without data (unknown sizes), they do not."""
    short = data is not None and _longest_axis(data) < SMALL_DATA_MAX_DIM
    return dict(options_for(jax.default_backend(), short))


def jit(fn, data=None, **kwargs):
    """``jax.jit(fn, **kwargs)`` with ``compiler_options(data)`` (the backend is read now: call it when building a
    program, not at import). data: see ``compiler_options``."""
    return jax.jit(fn, compiler_options=compiler_options(data) or None, **kwargs)
