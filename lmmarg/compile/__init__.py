"""How lmmarg compiles its programs and bounds what it keeps compiled.

Modules:

* ``lmmarg.compile.limits``: the trace lock (``TRACE_LOCK``: NumPyro's handler stack is process-global), the bound
  on compiled structures kept in memory (``MAX_COMPILED_STRUCTURES``, ``cache_info``, ``release_compiled``) and
  the address-space check that runs before JAX compiles (``check_address_space``, ``AddressSpaceError``).
* ``lmmarg.compile.xla``: the XLA compiler options of lmmarg's own programs (``jit``, ``compiler_options``).
* ``lmmarg.compile.persistent``: JAX's persistent compilation cache, on by default in a per-user directory
  (``set_compilation_cache``, ``active_cache_dir``, ``default_cache_dir``).
* ``lmmarg.compile.programs``: the process-wide cache of a potential's compiled programs, shared between
  potentials of one structure and shapes (``Programs``, ``signature``).

This package re-exports the public functions and classes of those modules. Settings are module attributes read at
call time: assign them on their module (``lmmarg.compile.limits.MAX_COMPILED_STRUCTURES = 8``,
``lmmarg.compile.programs.PROGRAM_CACHE_SIZE``), not on this package.
"""
from .limits import (TRACE_LOCK, AddressSpaceError, cache_info, check_address_space, note_compiled_structure,
                     release_compiled, traced, traced_call)
from .persistent import active_cache_dir, default_cache_dir, set_compilation_cache
from .programs import Programs, signature
from .xla import compiler_options, jit

__all__ = ["TRACE_LOCK", "AddressSpaceError", "cache_info", "check_address_space", "note_compiled_structure",
           "release_compiled", "traced", "traced_call", "active_cache_dir", "default_cache_dir",
           "set_compilation_cache", "Programs", "signature", "compiler_options", "jit", "limits", "persistent",
           "programs", "xla"]
