"""The process-wide cache of compiled programs, shared between potentials of one structure and shapes.

``Programs.of(pot)`` returns the jitted programs of a ``lmmarg.potential.Potential`` (density, constrain, recovery,
NUTS drivers; the data an argument of each), cached under ``signature(pot)``: a digest of the density's jaxpr with
the data abstract. Refitting a model to new data of the same shapes (simulation-based calibration, bootstrap,
cross-validation folds) then compiles nothing again.

Compiled programs are not free to keep: on XLA:CPU each holds memory mappings of its machine code (about 1,300 for
one structure's density, constrain, recovery and NUTS programs), and Linux allows 65,530 per process; a process that
kept every structure and option set it ever compiled crashed inside XLA after a few hundred fits (the test suite).
So the cache is small (``PROGRAM_CACHE_SIZE`` structures, ``DRIVERS_PER_STRUCTURE`` NUTS drivers each; assign
these module attributes to change them), every new structure counts towards ``lmmarg.compile.limits``' bound, and
``lmmarg.compile.release_compiled`` empties it.
"""
from __future__ import annotations

import hashlib
import re
import threading
from collections import OrderedDict

import jax
import numpy as np

from . import limits, xla
from .limits import TRACE_LOCK

__all__ = ["Programs", "signature", "PROGRAM_CACHE_SIZE", "DRIVERS_PER_STRUCTURE", "PROGRAM_SHARE_MAX_BYTES"]

PROGRAM_CACHE_SIZE = 2                # structures whose programs stay cached in a process (least recently used go)
DRIVERS_PER_STRUCTURE = 2             # NUTS drivers (warmup, chains, options) kept per structure (least recent go)
# The programs of a cached structure hold its first potential (their closures read its structure: sites, terms,
# transforms); potentials with more data than this keep their own programs, so a large data set is never pinned
PROGRAM_SHARE_MAX_BYTES = 32 << 20


def _data_bytes(data) -> int:
    return int(sum(np.size(x) * np.dtype(getattr(x, "dtype", np.float64)).itemsize for x in jax.tree.leaves(data)))


def signature(pot) -> str:
    """A digest of everything the compiled programs of ``pot`` (a ``lmmarg.potential.Potential``) depend on except
    the values in ``pot.data``: the jaxpr of its density with the data abstract (structure, priors' families, every
    literal constant), the values of any constants captured in it, the data's tree structure (with the plan's
    static fields) and shapes, and the names and shapes of its sites and outputs. Equal signatures: a program
    compiled for one potential computes the other's results when given the other's data."""
    wide = jax.dtypes.canonicalize_dtype(np.float64)
    params = {n: jax.ShapeDtypeStruct(s, wide) for n, s in pot.unc_shapes.items()}
    with TRACE_LOCK:
        closed = jax.make_jaxpr(pot.density)(params, pot.data)
    h = hashlib.sha256()
    text = re.sub(r" at 0x[0-9a-f]+", "", str(closed.jaxpr))   # function reprs inside printed parameters
    h.update(text.encode())
    for c in closed.consts:
        a = np.asarray(c)
        h.update(repr((a.shape, a.dtype.str)).encode())
        h.update(a.tobytes())
    leaves, tree = jax.tree.flatten(pot.data)
    m = pot.model
    static = (str(tree), [(np.shape(x), str(getattr(x, "dtype", type(x)))) for x in leaves],
              list(pot.unc_shapes.items()), pot.output_keys, pot.marg, sorted(pot.centered.items()),
              [(t.name, tuple(t.columns), t.d, t.n_groups) for t in m.terms], list(m.fixed_names), m.family,
              m.dtype.name if hasattr(m.dtype, "name") else str(m.dtype), pot.b_sites)
    h.update(repr(static).encode())
    return h.hexdigest()


class Programs:
    """The jitted programs of one model structure, the data an argument of each (``Potential.data``):

    density(params, data) -> scalar; constrain(params (S, ...), data) -> public parameters (S, ...);
    recover(bs)(key, batch index, draws (bs, ...), data) -> {"u_<term>": (bs, G, d)}; driver(key, make):
    lmmarg.inference.nuts's compiled NUTS drivers, keyed by their options.

    ``Programs.of(pot)`` returns the programs cached for ``signature(pot)`` (up to PROGRAM_CACHE_SIZE structures,
    for potentials with at most PROGRAM_SHARE_MAX_BYTES of data), so that refitting a model to new data of the same
    shapes -- simulation-based calibration, bootstrap, cross-validation folds -- compiles nothing again.

    Thread-safe: one structure's programs (and its NUTS drivers) may serve fits in several threads; every new
    structure counts towards ``lmmarg.compile.limits.MAX_COMPILED_STRUCTURES`` (``lmmarg.compile.cache_info()``)."""

    _cache: OrderedDict = OrderedDict()
    _lock = threading.Lock()

    def __init__(self, pot):
        self.template = pot
        self.density = jax.jit(pot.density)   # also called inside the NUTS programs: no compile options here
        self.constrain = xla.jit(jax.vmap(pot.constrain_one, in_axes=(0, None)), data=pot.data)
        self._recover = {}
        self.drivers = OrderedDict()      # lmmarg.inference.nuts: options -> compiled driver (``driver``)
        self._own_lock = threading.Lock()  # guards drivers and _recover (fits in several threads share them)

    def driver(self, key, make):
        """The NUTS driver cached under `key` (built by make() when missing); at most DRIVERS_PER_STRUCTURE are kept,
        the least recently used dropped."""
        with self._own_lock:   # make() only builds jit wrappers (nothing is traced or compiled here)
            if key in self.drivers:
                self.drivers.move_to_end(key)
                return self.drivers[key]
            d = self.drivers[key] = make()
            while len(self.drivers) > DRIVERS_PER_STRUCTURE:
                self.drivers.popitem(last=False)
            return d

    def recover(self, bs: int):
        """The compiled recovery of a batch of bs draws: (key, batch index, draws, data) -> {"u_<term>": (bs, G,
        d)}; the per-draw keys are derived inside (fold_in the batch index, split)."""
        with self._own_lock:
            if bs not in self._recover:
                one = jax.vmap(self.template.recover_one, in_axes=(0, 0, None))
                self._recover[bs] = xla.jit(
                    lambda key, b, c, data: one(jax.random.split(jax.random.fold_in(key, b), bs), c, data),
                    data=self.template.data)
            return self._recover[bs]

    @classmethod
    def of(cls, pot) -> Programs:
        """The programs of ``pot``'s structure: cached ones when an earlier potential had the same signature, else
        new ones (cached unless pot's data exceed PROGRAM_SHARE_MAX_BYTES)."""
        if _data_bytes(pot.data) > PROGRAM_SHARE_MAX_BYTES:
            limits.note_compiled_structure(limits.SAMPLER_WEIGHT)
            return cls(pot)
        sig = signature(pot)
        with cls._lock:
            if sig in cls._cache:
                cls._cache.move_to_end(sig)
                return cls._cache[sig]
        # counted outside _lock: it may release the compiled caches (Programs.clear takes _lock)
        limits.note_compiled_structure(limits.SAMPLER_WEIGHT)
        with cls._lock:
            if sig in cls._cache:            # another thread built it meanwhile
                return cls._cache[sig]
            progs = cls._cache[sig] = cls(pot)
            while len(cls._cache) > PROGRAM_CACHE_SIZE:
                cls._cache.popitem(last=False)
            return progs

    @classmethod
    def cached(cls) -> tuple:
        """The programs cached now, least recently used first (at most PROGRAM_CACHE_SIZE)."""
        with cls._lock:
            return tuple(cls._cache.values())

    @classmethod
    def clear(cls) -> None:
        """Drop every cached structure's programs (potentials that hold theirs keep them)."""
        with cls._lock:
            cls._cache.clear()


limits.register_releaser(Programs.clear)
limits.register_size("programs", lambda: len(Programs.cached()))
