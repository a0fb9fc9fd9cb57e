"""NUTS on the marginal posterior of the global parameters; random effects recovered exactly afterwards.

The chunked driver (``chain_method="vectorized"``; "parallel", the default, runs it on every local device) runs
the chains as jitted chunks of iterations, one compiled program per (model structure and shapes,
marginalization, warmup, chains, NUTS options) for every chunk length and every data set of those shapes (the
data are an argument, ``lmmarg.compile.programs``). The progress report advances only when a chunk's results
are on the host (JAX dispatches asynchronously, so counting dispatched chunks would run ahead of the sampler),
names the phase (compiling / warmup / sampling), shows the divergences after warmup so far and an ETA. After every
fit the sampler's diagnostics are checked as brms/Stan do and problems are reported as ``SamplerWarning``.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
import sys
import threading
import time
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.infer import MCMC, NUTS
from numpyro.infer.hmc import hmc

from ..compile import persistent
from ..compile import xla
from ..compile.limits import TRACE_LOCK, check_address_space
from .. import parameters
from .._warnings import warn_user
from ..degenerate import check_residual, check_sampler_scales, separation, separation_message
from ..potential import default_marginalize_beta
from ..results.fit import Fit
from . import precondition
from .blas import blas_threads

__all__ = ["sample", "use_cores", "SamplerWarning", "fetch"]

logger = logging.getLogger(__name__)

_EXTRA = ("diverging", "num_steps", "adapt_state.step_size", "accept_prob", "potential_energy")
# brms / Stan argument names accepted as aliases of NumPyro's
_ALIASES = {"adapt_delta": "target_accept_prob", "max_treedepth": "max_tree_depth"}
# NUTS options a caller may set (the model, potential and init strategy are lmmarg's)
_NUTS_DEFAULTS = {k: p.default for k, p in inspect.signature(NUTS.__init__).parameters.items()
                  if k not in ("self", "model", "potential_fn", "kinetic_fn", "init_strategy")}
_NUTS_OPTIONS = tuple(_NUTS_DEFAULTS)
_INITS = ("mode", "center")
_TARGET_CHUNK_S = 0.25  # seconds of sampling between two progress updates
_FIRST_CHUNK = 10  # iterations of the first chunks, before the speed is known
_MAX_CHUNK = 250  # iterations per chunk at most (output buffer length, one compiled program for all lengths)
_CHUNK_BYTES = 64 << 20  # ... and at most this much output per chunk


class SamplerWarning(UserWarning):
    """A problem found in the sampler's diagnostics after a fit (divergences, R-hat, ESS, tree depth)."""


@contextlib.contextmanager
def _compile_timer():
    """Seconds JAX spends tracing, lowering and compiling inside the block (via jax.monitoring events), in this
    thread only."""
    acc = {"s": 0.0}
    events = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
              "/jax/core/compile/backend_compile_duration")
    me = threading.get_ident()

    def listener(event, duration, **kwargs):
        if event in events and threading.get_ident() == me:
            acc["s"] += duration

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield acc
    finally:
        try:
            jax.monitoring.unregister_event_duration_listener(listener)
        except (AssertionError, ValueError):
            pass


@contextlib.contextmanager
def _in_background(fn):
    """Run fn() in a thread during the block (which then waits for it): {"s": its tracing and compilation
    seconds}. Errors in fn are dropped: it only warms caches (the work it prepares is redone if it failed)."""
    acc = {"s": 0.0}

    def work():
        with _compile_timer() as c:
            try:
                fn()
            except Exception:   # noqa: BLE001 -- a cache warm-up; the caller compiles on demand anyway
                pass
        acc["s"] = c["s"]

    t = threading.Thread(target=work, name="lmmarg-compile-outputs", daemon=True)
    t.start()
    try:
        yield acc
    finally:
        t.join()


# -- progress ------------------------------------------------------------------------------------------------------
def _interactive() -> bool:
    """A terminal or a Jupyter kernel: a live bar. Otherwise (CI logs, redirected stderr) a few plain lines."""
    if "ipykernel" in sys.modules:
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class _NoProgress:
    live = False

    def __call__(self, phase: str, done: int, total: int, divergences: int) -> None:
        pass

    def close(self) -> None:
        pass


class _Callback(_NoProgress):
    """progress_bar=callable: called as f(phase, done, total, divergences) after each finished chunk."""
    live = True

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, phase, done, total, divergences):
        self.fn(phase, done, total, divergences)


class _Bar(_NoProgress):
    """A tqdm bar over warmup + draws iterations; the phase is its description, divergences its postfix."""
    live = True

    def __init__(self, total: int, chains: int):
        from tqdm.auto import tqdm
        self.bar = tqdm(total=total, desc="NUTS compiling", unit="it", leave=False, dynamic_ncols=True)
        self.chains, self.phase = chains, "compiling"

    def __call__(self, phase, done, total, divergences):
        if self.phase == "compiling":  # first chunk done: restart tqdm's clock so that rate and ETA exclude the
            self.bar.reset()           # compilation, and count the first chunk as already done
            self.bar.n = self.bar.last_print_n = self.bar.initial = done
        if phase == "sampling":
            self.bar.set_postfix_str(f"{divergences} divergent", refresh=False)
        self.bar.update(done - self.bar.n)  # redraws at most every 0.1 s (tqdm's mininterval)
        if phase != self.phase:  # always shown, however fast the run
            self.phase = phase
            self.bar.set_description_str(f"NUTS {phase}", refresh=True)

    def close(self):
        self.bar.close()


class _Lines(_NoProgress):
    """Non-interactive runs: one line per phase start and per 10 % of the iterations, to stderr."""
    live = True

    def __init__(self, total: int, chains: int):
        self.t0, self.next, self.phase, self.first = time.perf_counter(), 0.1, None, None

    def __call__(self, phase, done, total, divergences):
        now = time.perf_counter()
        if self.first is None:  # the speed is measured from the first finished chunk on (no compilation)
            self.first = (now, done)
        frac = done / total
        if phase == self.phase and frac < self.next and done < total:
            return
        self.phase, self.next = phase, math.floor(frac * 10 + 1e-9) / 10 + 0.1
        t1, d1 = self.first
        eta = f"{(now - t1) / (done - d1) * (total - done):.0f} s" if done > d1 else "-"
        print(f"lmmarg NUTS {phase}: {done}/{total} iterations ({frac:.0%}), {divergences} divergent after "
              f"warmup, {now - self.t0:.0f} s elapsed, ETA {eta}", file=sys.stderr, flush=True)


def _progress(progress_bar, total: int, chains: int):
    if callable(progress_bar):
        return _Callback(progress_bar)
    if not progress_bar:
        return _NoProgress()
    return (_Bar if _interactive() else _Lines)(total, chains)


# -- the chunked driver -------------------------------------------------------------------------------------------
def fetch(out, n: int):
    """The first n iterations of a chunk's output as NumPy arrays; blocks until the chunk has run. The one place
    the driver waits for the device (public so that tests can watch it)."""
    return jax.tree.map(lambda x: np.asarray(x)[:n], jax.device_get(out))


def _fields(state):
    """What is kept of each iteration: (z, diverging, num_steps, step_size, accept_prob, potential_energy)."""
    return (state.z, state.diverging, state.num_steps, state.adapt_state.step_size, state.accept_prob,
            state.potential_energy)


class _HostCalls:
    """Starting points and the potential's value and gradient on the flat layout, as host functions of one data
    set (what ``_starts`` calls): from the compiled programs ``_start`` (key, data) and ``_vg`` (x, data)."""

    def start_points(self, key) -> np.ndarray:
        """(chains, D) jittered data-scaled starting points (``Potential.start_points``, unchecked)."""
        return np.asarray(self._call(0, key, self.data), np.float64)

    def value_and_grad(self, x):
        v, g = self._call(1, jnp.asarray(x, jax.dtypes.canonicalize_dtype(np.float64)), self.data)
        return float(v), np.asarray(g, dtype=np.float64)


def _start_program(pot, lay, chains: int):
    """Jitted (key, data) -> (chains, D) jittered data-scaled starting points, flat (one program, not dozens of
    eager operations that would each compile)."""
    return xla.jit(lambda key, data: lay.flatten(pot.start_points(key, chains, data)), data=pot.data)


def _value_and_grad_program(density, lay, data):
    """Jitted (x (D,), data) -> (potential, gradient) on the flat layout (the mode search); data: the arrays it
    will be called with (their shapes choose the compiler options)."""
    return xla.jit(jax.value_and_grad(lambda x, d: density(lay.unflatten(x), d)), data=data)


class _Driver:
    """NUTS for `chains` vectorized chains, compiled once per (model structure and shapes, warmup, chains, NUTS
    options): one instance serves every potential with the same ``lmmarg.compile.signature``.

    The chains move in the whitened coordinates z of a ``precondition.Metric`` (x = mean + R z, see
    lmmarg.inference.precondition). The metric and the data (``Potential.data``: plan, priors, standardization)
    are arguments of the compiled programs, so another start or curvature (another seed) and another data set of
    the same shapes (a refit, simulation-based calibration) reuse them. Iterations run as jitted chunks (a loop
    over NumPyro's functional NUTS kernel; adaptation happens inside the kernel while the iteration count is below
    `warmup`). The chunk length is an argument too (the output buffer holds `capacity` iterations), so chunks can
    follow the sampler's speed and stop exactly at the end of warmup without recompiling. ``bind(data)`` gives the
    host-side calls for one data set.
    """

    def __init__(self, progs, lay: precondition.Layout, warmup: int, chains: int, nuts_kwargs: dict,
                 devices: int = 1):
        # the jitted density is traced once for the several places NUTS evaluates it (init, leapfrog): less tracing
        # time (docs/benchmarks.md, 'Measurements behind the code'); XLA inlines it, the program is the same
        pe, pot = progs.density, progs.template

        def potential_gen(metric, data):
            return lambda z: pe(lay.unflatten(precondition.to_position(metric, z)), data)

        init_kernel, sample_kernel = hmc(potential_fn_gen=potential_gen, algo="NUTS")
        opts = {**_NUTS_DEFAULTS, **nuts_kwargs}
        self.warmup, self.chains, self.layout, self.devices = warmup, chains, lay, devices
        per = chains // devices   # chains per device, vectorized on it
        self.capacity = int(max(1, min(_MAX_CHUNK, _CHUNK_BYTES // (8 * per * (lay.size + 6)))))
        cap = self.capacity
        self.batched = _chains_batched()

        def init(key, z0, metric, data):
            keys = jax.random.split(key, z0.shape[0])
            one = lambda k, z: init_kernel(z, warmup, **opts, model_args=(metric, data), rng_key=k)  # noqa: E731
            return jax.vmap(one)(keys, z0) if self.batched else jax.lax.map(lambda a: one(*a), (keys, z0))

        def iterations(step, state, n, metric, data):
            """n iterations of `step` from `state` -> (state, buffer (cap, ...) of `_fields`)."""
            buf = jax.tree.map(lambda x: jnp.zeros((cap,) + x.shape, x.dtype), _fields(state))

            def body(i, carry):
                st, b = carry
                st = step(st, (metric, data), {})
                b = jax.tree.map(lambda a, x: jax.lax.dynamic_update_index_in_dim(a, x, i, 0), b, _fields(st))
                return st, b

            return jax.lax.fori_loop(0, n, body, (state, buf))

        def chunk(state, n, metric, data):
            if self.batched:   # every chain in lockstep, one iteration at a time
                return iterations(jax.vmap(sample_kernel, in_axes=(0, None, None)), state, n, metric, data)
            # one chain after the other, each for the whole chunk: (chains, cap, ...) -> (cap, chains, ...)
            st, b = jax.lax.map(lambda s: iterations(sample_kernel, s, n, metric, data), state)
            return st, jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), b)

        if devices == 1:
            self._init, self._chunk = xla.jit(init, data=pot.data), xla.jit(chunk, data=pot.data)
        else:   # the same programs on every device, `per` chains each (XLA host devices on a CPU, or GPUs)
            self._init = jax.pmap(init, in_axes=(0, 0, None, None))
            self._chunk = jax.pmap(chunk, in_axes=(0, None, None, None))
        self._start, self._vg = _start_program(pot, lay, chains), _value_and_grad_program(pe, lay, pot.data)
        self.compiled = None
        self._compile_lock = threading.Lock()

    def bind(self, data) -> _Run:
        """The host-side calls of this driver for one data set (a ``Potential.data``)."""
        return _Run(self, data)

    def compile(self, data):
        """Trace the four programs of a run (starting points, the potential's value and gradient for the mode
        search, NUTS init, a chunk of iterations) one after the other, then compile them concurrently: XLA
        compiles without the GIL, so on a multi-core machine a cold start costs about the longest compilation
        instead of their sum. Tracing stays in this thread (NumPyro's handler stack is global; its kernel fixes
        the adaptation schedule when init is traced, before the chunk)."""
        with self._compile_lock:   # fits in several threads that share this driver compile it once
            if self.compiled is not None:
                return
            wide = jax.dtypes.canonicalize_dtype(np.float64)
            D, P = self.layout.size, self.devices
            spec = lambda *shape: jax.ShapeDtypeStruct(shape, wide)   # noqa: E731
            g = self.layout.n_dense
            metric = precondition.Metric(spec(D), spec(g, g), spec(D - g))
            key = jax.random.PRNGKey(0)
            keys = key if P == 1 else jax.random.split(key, P)
            z0 = spec(self.chains, D) if P == 1 else spec(P, self.chains // P, D)
            # traced under lmmarg's trace lock (NumPyro's handler stack is process-global), compiled after
            with TRACE_LOCK:
                lowered = [self._start.lower(key, data), self._vg.lower(spec(D), data)]
                init = self._init.lower(keys, z0, metric, data)
                lowered += [init, self._chunk.lower(init.out_info, np.int32(0), metric, data)]
            with ThreadPoolExecutor(max_workers=len(lowered)) as pool:
                self.compiled = list(pool.map(lambda lo: lo.compile(), lowered))

    def _to_devices(self, z0):
        return z0 if self.devices == 1 else z0.reshape((self.devices, -1) + z0.shape[1:])


class _Run(_HostCalls):
    """A compiled ``_Driver`` with one data set bound: starting points, mode search, NUTS init and the chunks."""

    def __init__(self, driver: _Driver, data):
        self.driver, self.data = driver, data
        self.warmup, self.devices, self.capacity = driver.warmup, driver.devices, driver.capacity

    def _call(self, i: int, *args):
        return self.driver.compiled[i](*args)

    def init(self, keys, z0, metric):
        return self._call(2, keys, z0, metric, self.data)

    def chunk(self, state, n: int, metric):
        return self._call(3, state, np.int32(n), metric, self.data)

    def start(self, key, z0: np.ndarray, metric: precondition.Metric, fallback):
        """Initial states of the chains at z0 (chains, D); chains whose start has a non-finite potential restart
        from the matching row of `fallback()` (valid points)."""
        keys = key if self.devices == 1 else jax.random.split(key, self.devices)
        to_dev = self.driver._to_devices
        state = self.init(keys, to_dev(z0), metric)
        bad = ~np.isfinite(np.asarray(state.potential_energy).reshape(-1))
        if bad.any():
            state = self.init(keys, to_dev(np.where(bad[:, None], fallback(), z0)), metric)
        return state

    def _fetch(self, out, n: int):
        """The first n iterations of a chunk's output as NumPy arrays (n, chains, ...); blocks until it has run."""
        if self.devices > 1:   # (devices, capacity, per, ...) -> (capacity, chains, ...)
            out = jax.tree.map(lambda x: np.moveaxis(np.asarray(x), 0, 1).reshape((x.shape[1], -1) + x.shape[3:]),
                               jax.device_get(out))
        return fetch(out, n)

    def _size(self, start: int, total: int, sec_per_iter, live: bool) -> int:
        n = self.capacity
        if live:  # about _TARGET_CHUNK_S of work per chunk, so that progress updates are frequent but cheap
            n = _FIRST_CHUNK if sec_per_iter is None else int(_TARGET_CHUNK_S / max(sec_per_iter, 1e-9))
            n = max(1, min(self.capacity, n))
        end = self.warmup if start < self.warmup else total  # a chunk never straddles the end of warmup
        return min(n, end - start)

    def run(self, state, metric, draws: int, report):
        """(chains, draws, ...) post-warmup outputs of `_fields` (positions in whitened coordinates). Two chunks are
        in flight at a time (the device never waits for the host); `report` is called after a chunk's results were
        fetched, never before.
        """
        total = self.warmup + draws
        pending, kept = deque(), []
        dispatched, divergences, sec_per_iter, t_last = 0, 0, None, None
        while pending or dispatched < total:
            while len(pending) < 2 and dispatched < total:
                n = self._size(dispatched, total, sec_per_iter, report.live)
                state, out = self.chunk(state, n, metric)
                pending.append((dispatched, n, out, time.perf_counter()))
                dispatched += n
            start, n, out, t_disp = pending.popleft()
            host = self._fetch(out, n)
            now = time.perf_counter()
            sec_per_iter = (now - max(t_disp, t_last or t_disp)) / n
            t_last = now
            phase = "warmup" if start < self.warmup else "sampling"
            if phase == "sampling":
                kept.append(host)
                divergences += int(host[1].sum())
            report(phase, start + n, total, divergences)
        out = jax.tree.map(lambda *xs: np.concatenate(xs, 0), *kept)
        return jax.tree.map(lambda x: np.swapaxes(x, 0, 1), out)  # (iterations, chains, ...) -> (chains, ...)


def _driver(pot, lay, warmup, chains, nuts_kwargs, devices=1) -> _Driver:
    """The driver cached with the potential's programs (shared by potentials of one structure and shapes; a fresh
    one when the options are not hashable)."""
    progs = pot.programs
    try:
        key = (warmup, chains, devices, _chains_batched(), tuple(sorted(nuts_kwargs.items())))
        hash(key)
    except TypeError:  # e.g. an array-valued inverse_mass_matrix
        return _Driver(progs, lay, warmup, chains, nuts_kwargs, devices)
    return progs.driver(key, lambda: _Driver(progs, lay, warmup, chains, nuts_kwargs, devices))


def use_cores(n: int | None = None) -> int:
    """Make n CPU cores (default: all) XLA host devices, so that ``sample()`` (chain_method="parallel", the
    default) runs its chains on them in parallel: brms's ``cores`` / ``options(mc.cores = n)``. Call it right after
    ``import lmmarg``, before any JAX computation (JAX fixes its devices when it starts; without this call it sees
    one CPU device and every chain of a fit runs on one core). Returns n. On a machine whose default JAX backend
    is an accelerator, its devices are used whatever this says."""
    n = int(n or os.cpu_count() or 1)
    if n < 1:
        raise ValueError(f"use_cores needs n >= 1, got {n}")
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:
        have = len(jax.devices("cpu"))
        if have != n:
            raise RuntimeError(f"use_cores({n}) must run before any JAX computation: JAX has started with {have} CPU "
                               f"device(s). Call lmmarg.use_cores right after `import lmmarg` (or set XLA_FLAGS="
                               f"--xla_force_host_platform_device_count={n} before starting Python).") from None
    return n


def _chains_batched() -> bool:
    """Whether the chains on one device run batched (vmap, in lockstep: every iteration costs the longest
    trajectory of the batch) or one after the other (lax.map). Batched on accelerators, where a batch of chains
    costs about one chain. On a CPU a batch costs the sum of its chains anyway (measured on dillonE1:
    docs/benchmarks.md, 'Measurements behind the code'), so the chains run one after the other and no chain
    waits for the longest trajectory; and the engine's dense LAPACK calls stay unbatched: jaxlib 0.10's batched
    CPU LAPACK kernels split their batch over XLA's intra-op thread pool and block on it, which deadlocks when
    programs on several host devices (chain_method="parallel") hold every pool thread."""
    return jax.default_backend() != "cpu"


def _device_groups(chains: int) -> int:
    """How many devices the chains are spread over with chain_method="parallel": the largest divisor of `chains`
    not above the number of local devices (1: vectorized on one device)."""
    n = jax.local_device_count()
    return max(k for k in range(1, min(n, chains) + 1) if chains % k == 0)


def _numpyro_mcmc(pot, lay, metric, key, z0, warmup, draws, chains, chain_method, progress_bar, nuts_kwargs):
    """NumPyro's own MCMC driver, for chain_method "sequential" (positions in whitened coordinates; the metric is a
    constant of this program)."""
    pe, data = pot.programs.density, pot.data
    m = precondition.Metric(*(jnp.asarray(a) for a in metric))
    kernel = NUTS(potential_fn=lambda z: pe(lay.unflatten(precondition.to_position(m, z)), data), **nuts_kwargs)
    mcmc = MCMC(kernel, num_warmup=warmup, num_samples=draws, num_chains=chains, chain_method=chain_method,
                progress_bar=bool(progress_bar))
    with TRACE_LOCK:   # NumPyro's driver traces the potential as it goes: held throughout (lmmarg.compile.limits)
        mcmc.run(key, init_params=z0[0] if chains == 1 else z0, extra_fields=_EXTRA)
    ex = mcmc.get_extra_fields(group_by_chain=True)
    z = np.asarray(mcmc.get_samples(group_by_chain=True))
    return z, *(np.asarray(ex[k]) for k in _EXTRA)


class _Eager(_HostCalls):
    """Start points and value-and-gradient for the "sequential" path, compiled on first use."""

    def __init__(self, pot, lay, chains):
        self.data = pot.data
        self._programs = (_start_program(pot, lay, chains),
                          _value_and_grad_program(pot.programs.density, lay, pot.data))

    def _call(self, i: int, *args):
        with TRACE_LOCK:   # the first call traces the potential (NumPyro's handler stack is process-global)
            return self._programs[i](*args)


def _fixed_effects_at_zero(pot, lay, x: np.ndarray) -> np.ndarray:
    """Starting points x (chains, D) with every fixed effect moved by minus its data-scaled centre (the GLM
    estimate, ``Potential.data["start"]``), i.e. jittered around 0, the other sites unchanged. For separated data
    that estimate runs off to |η| ~ 30 (coefficients ~1e4), where the Laplace mode search fails: the mode search
    and the chains would start where the potential is infinite."""
    vals = {k: np.asarray(v) for k, v in pot.to_constrained(lay.unflatten(jnp.asarray(x))).items()}
    center = pot.data["start"]["center"]
    fixed, sigma_fixed = parameters.fixed_site(""), parameters.fixed_site("", sigma_part=True)  # name prefixes
    for n in vals:
        if n.startswith(fixed) and not n.startswith(sigma_fixed) and center.get(n) is not None:
            vals[n] = vals[n] - np.asarray(center[n])
    return np.asarray(lay.flatten(pot.unconstrain(vals)), np.float64)


def _starts(programs, pot, lay, init: str, key, seed: int, chains: int, separated: bool = False):
    """(metric, z0 (chains, D), fallback, info): the whitening and the chains' starting points; fallback() gives
    (chains, D) valid replacements for starts whose potential is not finite. separated: the data are separated
    (lmmarg.degenerate): the fixed effects start around 0, not at the GLM estimates.

    "mode": the Laplace approximation at the posterior mode (lmmarg.inference.precondition); the chains start
    uniformly within ±1 posterior SD of the mode in every whitened direction, and fall back to the mode itself.
    "center": unit scales, starts at the data-scaled centre jittered by ``Potential.init_params`` (invalid ones
    replaced by its checked starts). A mode that cannot be found falls back to "center" (recorded in info).
    programs: start_points(key) and value_and_grad(x), host functions (a compiled _Driver, or _Eager)."""
    wide = jax.dtypes.canonicalize_dtype(np.float64)
    x_start = programs.start_points(key)
    info = {"init": init}
    if separated:
        x_start = _fixed_effects_at_zero(pot, lay, x_start)
        info["start"] = "fixed effects at 0 (separated data: the GLM estimates do not exist)"
    if init == "mode" and lay.n_dense < lay.size:
        # effects left to HMC beyond the dense block: their joint mode with θ does not describe the posterior
        # (noncentered effects of a data-dominated term pin the SD there; seen: sd stuck at 9x its value)
        init = "center"
        info["init"] = "center (random effects left to HMC beyond the whitened block)"
    if init == "mode":
        metric, info_mode = precondition.laplace_metric(programs.value_and_grad, lay, x_start[0])
        info.update(info_mode)
        if metric is not None:
            z0 = np.random.default_rng([seed, 1]).uniform(-1.0, 1.0, (chains, lay.size))
            metric = precondition.Metric(*(np.asarray(a, wide) for a in metric))
            return metric, z0.astype(wide), lambda: np.zeros_like(z0, dtype=wide), info
        info["init"] = "center (no usable posterior mode)"
    metric = precondition.identity_metric(lay, wide)

    def checked():
        return np.asarray(lay.flatten(pot.init_params(key, num_chains=chains)), wide)
    return metric, x_start.astype(wide), checked, info


def _nuts_options(kwargs: dict) -> dict:
    """NUTS options with brms's names mapped to NumPyro's; unknown keywords refused, naming lmmarg's arguments."""
    out, given = {}, {}
    for k, v in kwargs.items():
        name = _ALIASES.get(k, k)
        if name not in _NUTS_OPTIONS:
            own = [p for p in inspect.signature(sample).parameters if p not in ("model", "nuts_kwargs")]
            raise TypeError(
                f"sample() got an unexpected keyword argument {k!r}. Its arguments are {', '.join(own)}, and the "
                f"NUTS options {', '.join(_NUTS_OPTIONS)} (brms's adapt_delta and max_treedepth are accepted for "
                "target_accept_prob and max_tree_depth)")
        if name in out:
            raise TypeError(f"sample() got both {given[name]!r} and {k!r}, which are the same option; give one")
        out[name], given[name] = v, k
    tap = out.setdefault("target_accept_prob", 0.8)
    if isinstance(tap, bool) or not isinstance(tap, (int, float, np.number)) or not 0 < tap < 1:
        raise ValueError(f"{given.get('target_accept_prob', 'target_accept_prob')} must be a number in (0, 1), "
                         f"got {tap!r}")
    depth = out.get("max_tree_depth", 10)
    depths = depth if isinstance(depth, tuple) else (depth,)
    if not 1 <= len(depths) <= 2 or any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1
                                        for d in depths):
        raise ValueError(f"{given.get('max_tree_depth', 'max_tree_depth')} must be an integer >= 1 (or a pair "
                         f"(warmup, sampling)), got {depth!r}")
    return out


def _check_counts(draws, warmup, chains, nuts_kwargs) -> None:
    for name, v, lo in (("draws", draws, 1), ("warmup", warmup, 0), ("chains", chains, 1)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    if warmup == 0 and not {"step_size", "inverse_mass_matrix"} <= set(nuts_kwargs):
        # measured: sleepstudy with warmup=0 and even a well-adapted step_size (but the identity mass matrix)
        # diverges on every transition
        raise ValueError("warmup=0 leaves NUTS with nothing adapted (step size 1, identity mass matrix: nearly "
                         "every transition diverges); use warmup >= 1 (e.g. warmup=200), or give both step_size= "
                         "and inverse_mass_matrix= to sample without adaptation")


def _user_stacklevel() -> int:
    """stacklevel for warnings.warn called from the caller of this function that points at the first frame
    outside lmmarg (the user's line), however deep inside lmmarg the warning is raised."""
    pkg = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
    f, level = sys._getframe(1), 1
    while f is not None and os.path.abspath(f.f_code.co_filename).startswith(pkg):
        f, level = f.f_back, level + 1
    return level


def _diagnostic_warnings(fit, nuts_kwargs: dict) -> list[str]:
    """brms/Stan's post-fit checks: divergences, tree depth hits, R-hat > 1.01, bulk/tail ESS < 100 per chain."""
    d, msgs = fit.diagnostics, []
    n = d["chains"] * d["draws"]
    if d["divergences"]:
        more = (f" or integrate more terms out (marginalize=, now {d['hmc_terms']} are sampled)"
                if d["hmc_terms"] else "")
        msgs.append(f"There were {d['divergences']} divergent transitions after warmup ({d['divergences'] / n:.1%} "
                    f"of {n}); the draws may be biased. Raise adapt_delta (target_accept_prob, now "
                    f"{nuts_kwargs['target_accept_prob']:g}), e.g. sample(adapt_delta=0.95){more}.")
    if d["max_tree_depth_hits"]:
        msgs.append(f"{d['max_tree_depth_hits']} of {n} transitions after warmup hit the maximum tree depth of "
                    f"{d['max_tree_depth']} (an efficiency concern): raise max_treedepth (max_tree_depth), "
                    f"e.g. sample(max_treedepth={d['max_tree_depth'] + 2}).")
    if d["draws"] < 4:
        return msgs
    s = fit.summary()
    if not {"r_hat", "ess_bulk", "ess_tail"} <= set(s.columns):
        return msgs
    rhat = s["r_hat"].dropna()
    if (rhat > 1.01).any():
        bad = rhat[rhat > 1.01].sort_values(ascending=False)
        msgs.append(f"The largest R-hat is {bad.iloc[0]:.3f} ({', '.join(bad.index[:5])}; above 1.01 "
                    f"for {len(bad)} parameter{'s' * (len(bad) > 1)}): the chains have not mixed. Run more "
                    "iterations (warmup and draws).")
    need = 100 * d["chains"]
    for col, what, why in (("ess_bulk", "Bulk", "posterior means and medians"),
                           ("ess_tail", "Tail", "posterior variances and tail quantiles")):
        ess = s[col].dropna()
        if (ess < need).any():
            msgs.append(f"{what} effective sample size (ESS) is too low: {ess.min():.0f} for {ess.idxmin()} "
                        f"(Stan asks for 100 per chain, {need}); {why} may be unreliable. Run more draws.")
    return msgs


def sample(model, draws: int = 1000, warmup: int = 1000, chains: int = 4, seed: int = 0, marginalize="all",
           chain_method: str = "parallel", progress_bar=True, parameterization=None,
           recover: bool = True, compilation_cache=None, init: str = "mode", marginalize_beta: bool | None = None,
           **nuts_kwargs):
    """Sample the posterior with NUTS (NumPyro) on the marginal likelihood.

    marginalize: "all" (default) | "none" | "auto" | list of term names integrated out analytically.
    parameterization: "noncentered" (default) | "centered" | {term: ...} for terms left to HMC.
    chain_method: "parallel" (default; the chains spread over the local devices: several GPUs, or CPU cores made
        XLA host devices with ``numpyro.set_host_device_count(n)`` before JAX starts; with one device it is
        "vectorized"), "vectorized" (all chains in one program on one device: batched in lockstep on an
        accelerator, one after the other within each chunk on a CPU), or "sequential" (NumPyro's MCMC).
    progress_bar: True (a live bar in a terminal or notebook, a few plain lines otherwise), False, or a callable
        f(phase, done, total, divergences) called after each finished chunk of iterations ("vectorized" only).
    compilation_cache: None (default: JAX's persistent cache on, see lmmarg.compile.persistent), True, False or a
        directory.
    init: "mode" (default): find the posterior mode, start the chains within about one posterior SD of it and let
        NUTS move in coordinates whitened by the curvature there (an affine map: the posterior is unchanged; see
        lmmarg.inference.precondition); "center": start at a jittered data-scaled centre, unit scales.
    marginalize_beta: integrate the fixed effects out too (Gaussian families, normal priors on every fixed effect);
        they are then drawn exactly after sampling, with the random effects (even when recover=False). None
        (default): when every term is marginalized and every fixed effect has a normal prior
        (lmmarg.potential.default_marginalize_beta: chosen by measurement).
    nuts_kwargs: NUTS options (numpyro.infer.NUTS): target_accept_prob (brms: adapt_delta), max_tree_depth
        (brms: max_treedepth), dense_mass, step_size, ...; other keywords are refused.
    Returns lmmarg.results.Fit; samples have leading dims (chains, draws) and include every "u_<term>".
    Problems in the diagnostics (divergences, R-hat > 1.01, ESS < 100 per chain, tree depth hits) are reported
    as lmmarg.inference.nuts.SamplerWarning.
    """
    nuts_kwargs = _nuts_options(nuts_kwargs)
    _check_counts(draws, warmup, chains, nuts_kwargs)
    if chain_method not in ("vectorized", "sequential", "parallel"):
        raise ValueError(f"chain_method must be 'vectorized', 'sequential' or 'parallel', got {chain_method!r}")
    if init not in _INITS:
        raise ValueError(f"init must be one of {', '.join(map(repr, _INITS))}, got {init!r}")

    check_residual(model, "sample")
    check_sampler_scales(model, "sample")
    sep = separation(model)
    if sep is not None:
        warn_user(f"sample: {separation_message(model, sep)}. The priors keep the posterior proper, but along that "
                  "direction it is the prior's tail: check that the priors of those coefficients are what you mean "
                  "(model.priors)")
    check_address_space("sample()")
    persistent.apply(compilation_cache)
    if marginalize_beta is None:
        marginalize_beta = default_marginalize_beta(model, marginalize, parameterization)
    pot = model.potential(marginalize, parameterization, marginalize_beta)
    if not pot.sites:
        raise ValueError("every parameter is fixed by the priors: nothing to sample")
    k_init, k_mcmc, k_rec = jax.random.split(jax.random.PRNGKey(seed), 3)
    lay = precondition.layout(pot)
    devices = _device_groups(chains) if chain_method == "parallel" else 1
    t0 = time.perf_counter()
    outputs = {"s": 0.0}   # compile seconds of the constrain / recovery programs, overlapped with sampling
    with blas_threads(pot.plan.dense_size):
        # shown while compiling, too (NumPyro's driver shows its own)
        report = _NoProgress() if chain_method == "sequential" else _progress(progress_bar, warmup + draws, chains)
        try:
            if chain_method == "sequential":
                programs = _Eager(pot, lay, chains)
            else:
                driver = _driver(pot, lay, warmup, chains, nuts_kwargs, devices)
                driver.compile(pot.data)
                programs = driver.bind(pot.data)
            t_c = time.perf_counter()
            with _compile_timer() as comp_init:
                metric, z0, fallback, init_info = _starts(programs, pot, lay, init, k_init, seed, chains,
                                                          separated=sep is not None)
            t1 = time.perf_counter()
            with _compile_timer() as comp:
                if chain_method == "sequential":
                    z, div, n_steps, step_size, accept, pe = _numpyro_mcmc(
                        pot, lay, metric, k_mcmc, z0, warmup, draws, chains, chain_method, progress_bar, nuts_kwargs)
                else:
                    # nothing else executes while NUTS runs: XLA:CPU was seen to stall with every thread idle when
                    # a recovery program ran concurrently with a chunk (as it did in group LOO, see lmmarg.results.loo)
                    state = programs.start(k_mcmc, z0, metric, fallback)
                    with _in_background(lambda: pot.compile_outputs(recover)) as outputs:
                        z, div, n_steps, step_size, accept, pe = programs.run(state, metric, draws, report)
        finally:
            report.close()
        raw = lay.unflatten(precondition.to_position(metric, np.asarray(z, np.float64), np), np)
        t2 = time.perf_counter()
        samples = pot.constrain(raw)
        t3 = time.perf_counter()
        if recover or pot.marginalize_beta:
            drawn = pot.recover(samples, k_rec)
            samples.update(drawn if recover else {"beta": drawn["beta"]})
        t4 = time.perf_counter()

    n_steps = np.asarray(n_steps)
    max_depth = nuts_kwargs.get("max_tree_depth", 10)
    max_depth = max_depth[-1] if isinstance(max_depth, tuple) else max_depth  # (warmup, sampling): sampling's
    depth = np.ceil(np.log2(n_steps + 1)).astype(int)
    stats = {
        "diverging": np.asarray(div),
        "n_steps": n_steps,
        "tree_depth": depth,
        "step_size": np.asarray(step_size),
        "acceptance_rate": np.asarray(accept),
        "lp": -np.asarray(pe),
    }
    diagnostics = {
        "divergences": int(stats["diverging"].sum()),
        "divergences_per_chain": stats["diverging"].sum(1).tolist(),
        "max_tree_depth": int(max_depth),
        "max_tree_depth_hits": int((depth >= max_depth).sum()),
        "mean_tree_depth": float(depth.mean()),
        "mean_n_steps": float(n_steps.mean()),
        "step_size": stats["step_size"][:, -1].tolist(),
        "mean_acceptance": float(stats["acceptance_rate"].mean()),
        # tracing and compiling NUTS and the mode search (wall time: the programs compile concurrently)
        "time_compile": (t_c - t0) + comp_init["s"] + comp["s"],
        # constrain and recovery programs, compiled while NUTS ran (not part of the wall time unless they took longer)
        "time_compile_outputs": outputs["s"],
        "time_init": t1 - t_c - comp_init["s"],  # posterior mode and curvature (init="mode"), compilation excluded
        "time_mcmc": t2 - t1 - comp["s"],  # warmup + sampling, compilation excluded
        "time_total": time.perf_counter() - t0,
        "time_constrain": t3 - t2,
        "time_recover": t4 - t3,  # including its compilation (once per model and batch size)
        "chains": chains, "draws": draws, "warmup": warmup, "chain_method": chain_method, "devices": devices,
        "target_accept_prob": float(nuts_kwargs["target_accept_prob"]),
        "marginalized": list(pot.marginalized_terms), "hmc_terms": list(pot.hmc_terms),
        "marginalize_beta": pot.marginalize_beta,
        "compilation_cache": persistent.active_cache_dir(),
        **init_info,
    }
    fit = Fit(model, samples, sample_stats=stats, diagnostics=diagnostics, method="nuts", potential=pot)
    fit.diagnostics["warnings"] = _diagnostic_warnings(fit, nuts_kwargs)
    for msg in fit.diagnostics["warnings"]:
        warnings.warn(msg, SamplerWarning, stacklevel=_user_stacklevel())
    return fit
