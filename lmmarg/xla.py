"""How lmmarg compiles its programs: ``jit`` is ``jax.jit`` with XLA options chosen for the marginal engine.

A potential's value-and-gradient is ~120 small fusions (the engine's blocks are small: 2 x 2 leaves, an 80 x 80
dense block on dillonE1). XLA:CPU's MLIR fusion emitters spend most of the compile time on them; its LLVM IR
emitters compile the same program in ~60 % of the time and run it at the same speed (dillonE1, every term
marginalized, one core: compile 2.59 -> 1.51 s, 146 vs 150 us per value-and-gradient in a compiled loop;
``benchmarks/engine_cost.py``). Users pay compilation on every fit, so lmmarg's own programs (NUTS, recovery,
ML, MAP/VI, LOO) use these options on CPU. Other backends, and a jaxlib that does not know an option, get none.
``LMMARG_XLA_DEFAULTS=1`` turns them off (for comparisons).
"""
from __future__ import annotations

import functools
import logging
import os

import jax

__all__ = ["jit", "compiler_options", "CPU_COMPILER_OPTIONS"]

logger = logging.getLogger(__name__)

CPU_COMPILER_OPTIONS = {"xla_cpu_use_fusion_emitters": False}


@functools.lru_cache(maxsize=None)
def _options_for(backend: str) -> tuple:
    if backend != "cpu" or os.environ.get("LMMARG_XLA_DEFAULTS", "").lower() in ("1", "true", "yes", "on"):
        return ()
    try:   # an option this jaxlib does not know makes compilation fail: probe once
        jax.jit(lambda x: x + 1, compiler_options=CPU_COMPILER_OPTIONS).lower(1.0).compile()
    except Exception as e:  # noqa: BLE001 - any failure means: compile with XLA's defaults
        logger.debug("XLA options %s not accepted (%s); using XLA's defaults", CPU_COMPILER_OPTIONS, e)
        return ()
    return tuple(CPU_COMPILER_OPTIONS.items())


def compiler_options() -> dict:
    """The XLA compiler options lmmarg compiles its programs with on the default backend ({} for XLA's defaults)."""
    return dict(_options_for(jax.default_backend()))


def jit(fn, **kwargs):
    """``jax.jit(fn, **kwargs)`` with ``compiler_options()`` (the backend is read now: call it when building a
    program, not at import)."""
    return jax.jit(fn, compiler_options=compiler_options() or None, **kwargs)
