"""Process-wide limits of lmmarg's compiled programs: the trace lock, the bound on compiled programs kept in memory,
and the address-space check that runs before JAX starts compiling (``lmmarg.compile`` re-exports the public names).

**Threads.** NumPyro keeps its effect handlers (``trace``, ``seed``, ``substitute``: what ``potential_energy``,
``constrain_fn`` and lmmarg's site discovery run under) on one module-global stack, so two threads that trace a
NumPyro model at the same time see each other's sites ("all sites must have unique names"). Every lmmarg code
path that traces a NumPyro model holds ``TRACE_LOCK`` (re-entrant, one per process) while it traces; the lock is
released before XLA compiles and while compiled programs (the NUTS chunks, the ML and MAP objectives) run, so fits
in several threads trace one at a time and compute concurrently. Code of your own that traces lmmarg's NumPyro
model (``Potential.potential_fn`` / ``model_fn`` under your own ``jax.jit`` or NumPyro inference) while lmmarg fits
in another thread should hold it too: ``with lmmarg.compile.TRACE_LOCK: jax.jit(pot.potential_fn).lower(x)``.

**Memory.** A compiled XLA:CPU program holds memory mappings of its machine code (tens per program; Linux allows a
process 65,530) and a few MB; JAX keeps the executables of every jitted function and shape in process-wide caches,
also after the model that made them is gone. lmmarg counts the compiled structures it builds (the programs of a
sampler structure, of an ML / MAP objective, of a model's engine kernel); after ``MAX_COMPILED_STRUCTURES`` of
them it releases its shared programs and JAX's in-memory caches (``jax.clear_caches()``; this also drops the
executables of your own jitted functions, which then compile again on their next call, from JAX's persistent
cache when it is on). ``cache_info()`` reports the counts; ``LMMARG_MAX_COMPILED`` (or assigning this module's
``MAX_COMPILED_STRUCTURES``) sets the bound (0: never release).

**Address space.** Under a low ``ulimit -v`` (RLIMIT_AS), XLA aborts the process (a segfault or "cannot allocate
memory for thread-local data") while it starts its CPU client or compiles: it reserves address space for its
thread pools and compiler (the smallest model's ``sample()`` needed just under ``MIN_ADDRESS_SPACE`` on a 2-core
Linux machine, more with more cores; docs/benchmarks.md, 'Measurements behind the code').
``check_address_space()`` (called by ``Model()``, ``sample()``, ``fit_ml()``) raises a ``MemoryError`` naming the
limit and the minimum instead.
"""
from __future__ import annotations

import os
import resource
import threading

import jax

__all__ = ["TRACE_LOCK", "MAX_COMPILED_STRUCTURES", "SAMPLER_WEIGHT", "MIN_ADDRESS_SPACE", "ADDRESS_SPACE_HEADROOM",
           "cache_info", "traced", "traced_call", "note_compiled_structure", "release_compiled", "check_address_space",
           "AddressSpaceError", "register_releaser", "register_size"]

# Held while lmmarg traces a NumPyro model (see the module docstring); re-entrant: a trace may nest another.
TRACE_LOCK = threading.RLock()


def _max_structures() -> int:
    env = os.environ.get("LMMARG_MAX_COMPILED", "").strip()
    if not env:
        return 24
    if not env.isdigit():
        raise ValueError(f"LMMARG_MAX_COMPILED must be a non-negative integer (0: never release), got {env!r}")
    return int(env)


# Weighted compiled structures built before lmmarg releases JAX's in-memory caches (0: never). One sample()
# structure (density, mode search, NUTS init and chunk, constrain, recovery) holds many times the memory mappings
# and memory of one fit_ml() objective (docs/benchmarks.md, 'Measurements behind the code'); a
# sampler structure counts SAMPLER_WEIGHT, so the default keeps at most 24 ML objectives or 6 sampler structures.
MAX_COMPILED_STRUCTURES = _max_structures()
SAMPLER_WEIGHT = 4

_state = {"built": 0, "total": 0, "releases": 0}
_releasers: list = []   # callables that drop lmmarg's own shared caches (registered by lmmarg.compile.programs)
_state_lock = threading.Lock()


def register_releaser(fn) -> None:
    """Register fn(), called by ``release_compiled`` to drop a cache of compiled programs lmmarg shares."""
    _releasers.append(fn)


def release_compiled() -> None:
    """Drop lmmarg's shared compiled programs and JAX's in-memory compilation caches now (``jax.clear_caches``).
    Programs still referenced (a potential's own programs, a driver in use) stay valid: jitted functions compile
    again on their next call."""
    with TRACE_LOCK:   # no lmmarg thread is tracing while the caches are emptied
        for fn in _releasers:
            fn()
        jax.clear_caches()
        with _state_lock:
            _state["built"] = 0
            _state["releases"] += 1


def note_compiled_structure(weight: int = 1) -> None:
    """Called by lmmarg right before it builds the programs of a new structure (they compile on first use): counts
    it with its weight (``SAMPLER_WEIGHT`` for a sampler structure, 1 for an ML / MAP objective or an engine
    kernel) and, when the count would pass ``MAX_COMPILED_STRUCTURES``, releases the compiled caches first
    (``release_compiled``), so that a long-running process that fits ever new shapes stays bounded."""
    with _state_lock:
        _state["total"] += 1
        full = 0 < MAX_COMPILED_STRUCTURES < _state["built"] + weight and _state["built"] > 0
        if not full:
            _state["built"] += weight
    if full:
        release_compiled()
        with _state_lock:
            _state["built"] += weight


def cache_info() -> dict:
    """Counts of lmmarg's compiled programs in this process: {"structures": weighted count built since the last
    release (at most MAX_COMPILED_STRUCTURES, unless one structure alone weighs more), "max_structures": the bound
    (0: none), "total_structures": structures built since the process started, "releases": how often the caches
    were released, and the size of each shared cache by name ("programs": sampler structures in
    ``lmmarg.compile.programs.Programs``' cache, at most PROGRAM_CACHE_SIZE)}."""
    with _state_lock:
        out = {"structures": _state["built"], "max_structures": MAX_COMPILED_STRUCTURES,
               "total_structures": _state["total"], "releases": _state["releases"]}
    for name, size in _sizes.items():
        out[name] = size()
    return out


_sizes: dict = {}


def register_size(name: str, fn) -> None:
    """Register fn() -> int, reported by ``cache_info`` under name."""
    _sizes[name] = fn


def traced(jitted, *args):
    """The compiled program of the jitted function ``jitted`` for ``args``: traced (``.lower``) while holding
    TRACE_LOCK, compiled after releasing it (a cached executable when it exists). Call the result with arguments of
    the same shapes and dtypes as ``args``."""
    with TRACE_LOCK:
        lowered = jitted.lower(*args)
    return lowered.compile()


def traced_call(jitted, *args):
    """``jitted(*args)``, its tracing done under TRACE_LOCK (see ``traced``)."""
    return traced(jitted, *args)(*args)


# -- address space ---------------------------------------------------------------------------------------------------
# MIN_ADDRESS_SPACE: the peak address space of the smallest sample() / fit_ml() (importing lmmarg, starting XLA's
# CPU client, one compilation), rounded up to a limit under which it ran; under a lower `ulimit -v` XLA aborted
# (docs/benchmarks.md, 'Measurements behind the code').
MIN_ADDRESS_SPACE = 3 << 30          # bytes of address space below which lmmarg refuses to start JAX work
ADDRESS_SPACE_HEADROOM = 512 << 20   # ... and what must be left above what the process has mapped already


class AddressSpaceError(MemoryError):
    """The process's address-space limit (``ulimit -v``, RLIMIT_AS) is below what XLA needs to run a fit."""


def _mapped_bytes() -> int | None:
    """The process's current address space (VmSize) in bytes, or None where /proc is not available."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_address_space(what: str = "lmmarg") -> None:
    """Raise AddressSpaceError when RLIMIT_AS (``ulimit -v``) leaves less than max(MIN_ADDRESS_SPACE, mapped now
    + ADDRESS_SPACE_HEADROOM) bytes: XLA would abort the process (segfault) while it starts or compiles. No limit
    (the default), or a platform without RLIMIT_AS: nothing to check. what: the operation, for the message."""
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    except (AttributeError, ValueError, OSError):
        return
    if soft == resource.RLIM_INFINITY or soft < 0:
        return
    mapped = _mapped_bytes() or 0
    need = max(MIN_ADDRESS_SPACE, mapped + ADDRESS_SPACE_HEADROOM)
    if soft >= need:
        return
    mb = lambda b: f"{b / 2**20:,.0f} MB"   # noqa: E731
    raise AddressSpaceError(
        f"{what}: the process's address-space limit (ulimit -v / RLIMIT_AS) is {mb(soft)}, below the {mb(need)} "
        f"that JAX/XLA needs to start and compile here (the process has mapped {mb(mapped)}; XLA reserves address "
        f"space for its thread pools and compiler and aborts the process when it cannot: measured 2.96 GB for the "
        f"smallest model on 2 cores, more with more cores; lmmarg.compile.limits.MIN_ADDRESS_SPACE = "
        f"{mb(MIN_ADDRESS_SPACE)}). Raise the limit (ulimit -v unlimited, or at least {mb(need)}); to bound memory, "
        "limit resident memory instead (cgroups, e.g. systemd-run -p MemoryMax=2G, or docker --memory)")
