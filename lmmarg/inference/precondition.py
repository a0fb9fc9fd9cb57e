"""Where NUTS starts and the coordinates it moves in: a Laplace approximation at the posterior mode.

NUTS adapts its step size and a diagonal mass matrix during warmup, starting from unit scales. Posteriors whose
scales are far from one (σ at N = 5e5 has a posterior SD of ~1e-3 on the log scale) or strongly correlated
(an intercept and the SD of its term) cost long trees until the adaptation catches up, and a short warmup may
never get there. Marginalization leaves few global parameters, so the posterior mode and the Hessian there are
cheap: we start the chains around the mode and let NUTS move in whitened coordinates z,

    x = mode + R z,   R Rᵀ = H⁻¹  (H: Hessian of the potential at the mode, on the first ``n_dense`` coordinates),

with the remaining coordinates (random effects left to HMC, already on unit scale) shifted but not rescaled. The
map is affine with a constant Jacobian, so the posterior of x is exactly the one of the potential; only the
geometry NUTS sees changes (near-Gaussian posteriors become near N(0, I): step size ~1, short trees from the
first warmup iteration). The mode, R and the scales enter the compiled sampler as arguments (``Metric``), so one
compiled program serves every start and curvature of a model (the data themselves are still constants of it).

Shapes: D = number of unconstrained coordinates of the potential, Dg = ``Layout.n_dense`` (≤ D).
"""
from __future__ import annotations

import math
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

__all__ = ["Layout", "Metric", "layout", "identity_metric", "laplace_metric", "to_position", "from_position"]

# Coordinates whose curvature is taken densely by finite differences of the gradient (2 gradients each). The
# global parameters of a marginalized model are far fewer; random effects left to HMC beyond this stay unscaled.
DENSE_MAX = 100
# Hessian eigenvalues below this (a posterior scale above 10 sampler units, or a non-convex direction at an
# inexact mode) say nothing reliable about the scale: such directions keep unit scale.
CURVATURE_MIN = 1e-2
# Finite-difference step of the Hessian, as a fraction of each coordinate's posterior SD (a first pass at
# FD_FIRST_STEP finds the SDs): small against the scale on which the log density departs from a quadratic,
# large against round-off.
FD_REL_STEP = 1e-2
FD_FIRST_STEP = 1e-4
MODE_MAXITER = 500
MODE_GTOL = 1e-6
# A mode is used only where the search ended at a stationary point -- the gradient in whitened coordinates, i.e.
# the distance to the mode of the local quadratic in posterior SDs, is below MODE_GRAD_OK (a raw gradient would
# depend on the curvature: 1e-2 is nothing for σ at N = 5e5) -- within MODE_MAX_SHIFT sampler units of its start:
# a search that runs off (the density of a centred hierarchical model grows without bound as an SD and its
# effects go to 0) has no mode to start from, and NUTS then starts as with init="center".
MODE_GRAD_OK = 0.1
MODE_MAX_SHIFT = 15.0


class Layout(NamedTuple):
    """Order of the potential's sites in the flat position vector: the global parameters first (the dense
    block), then the random effects left to HMC. names: site names; shapes: unconstrained shapes."""
    names: tuple
    shapes: tuple
    n_dense: int

    @property
    def size(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def flatten(self, params: dict, xp=jnp):
        """{site: (*lead, *shape)} -> (*lead, D)."""
        parts = []
        for n, s in zip(self.names, self.shapes):
            v = params[n]
            lead = v.shape[: v.ndim - len(s)]
            parts.append(xp.reshape(v, lead + (math.prod(s),)))
        return xp.concatenate(parts, axis=-1)

    def unflatten(self, flat, xp=jnp) -> dict:
        """(*lead, D) -> {site: (*lead, *shape)}."""
        out, i = {}, 0
        lead = flat.shape[:-1]
        for n, s in zip(self.names, self.shapes):
            k = math.prod(s)
            out[n] = xp.reshape(flat[..., i:i + k], lead + tuple(s))
            i += k
        return out


def _is_effect(name: str) -> bool:
    return name.startswith(("z_", "u_"))


def layout(pot) -> Layout:
    """The flat layout of a ``lmmarg.potential.Potential``: global sites first. When the whole position is
    small (≤ DENSE_MAX) every coordinate is in the dense block."""
    glob = [n for n in pot.unc_shapes if not _is_effect(n)]
    rest = [n for n in pot.unc_shapes if _is_effect(n)]
    names = tuple(glob + rest)
    shapes = tuple(tuple(pot.unc_shapes[n]) for n in names)
    size = sum(math.prod(s) for s in shapes)
    n_glob = sum(math.prod(pot.unc_shapes[n]) for n in glob)
    return Layout(names, shapes, size if size <= DENSE_MAX else min(n_glob, DENSE_MAX))


class Metric(NamedTuple):
    """x = mean + [root @ z[:Dg], scale * z[Dg:]]. mean (D,), root (Dg, Dg), scale (D - Dg,)."""
    mean: jax.Array
    root: jax.Array
    scale: jax.Array


def to_position(metric: Metric, z, xp=jnp):
    """Whitened z (*lead, D) -> the potential's coordinates x (*lead, D)."""
    g = metric.root.shape[0]
    head = z[..., :g] @ metric.root.T
    return metric.mean + xp.concatenate([head, z[..., g:] * metric.scale], axis=-1)


def from_position(metric: Metric, x, xp=np):
    """The inverse of ``to_position`` (host side): x (*lead, D) -> z (*lead, D)."""
    g = metric.root.shape[0]
    d = x - metric.mean
    head = xp.linalg.solve(metric.root, d[..., :g].T).T if g else d[..., :0]
    return xp.concatenate([head, d[..., g:] / metric.scale], axis=-1)


def identity_metric(lay: Layout, dtype=np.float64) -> Metric:
    return Metric(np.zeros(lay.size, dtype), np.eye(lay.n_dense, dtype=dtype),
                  np.ones(lay.size - lay.n_dense, dtype))


def _hessian(vg, x: np.ndarray, idx: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """Symmetrized central-difference Hessian of the potential on coordinates idx, from exact gradients."""
    H = np.empty((idx.size, idx.size))
    for a, (k, h) in enumerate(zip(idx, steps)):
        xp, xm = x.copy(), x.copy()
        xp[k] += h
        xm[k] -= h
        H[:, a] = (vg(xp)[1][idx] - vg(xm)[1][idx]) / (2 * h)
    return 0.5 * (H + H.T)


def _root(H: np.ndarray) -> tuple[np.ndarray, int]:
    """R with R Rᵀ = H⁻¹ on the directions of reliable curvature, unit scale elsewhere; and how many
    directions were floored."""
    w, V = np.linalg.eigh(H)
    weak = ~(w > CURVATURE_MIN)
    w = np.where(weak, 1.0, w)
    return V * (1.0 / np.sqrt(w)), int(weak.sum())


def laplace_metric(vg, lay: Layout, x0: np.ndarray) -> tuple[Metric | None, dict]:
    """The posterior mode (L-BFGS from x0) and the whitening there.

    vg: x (D,) -> (potential, gradient), host floats (non-finite values reported as +inf).
    Returns (Metric, info), or (None, info) when no finite mode was found (the caller falls back to unit scales).
    """
    t0 = time.perf_counter()

    def f(x):
        v, g = vg(x)
        if not (np.isfinite(v) and np.isfinite(g).all()):
            return np.inf, np.zeros_like(x)
        return v, g

    res = scipy.optimize.minimize(f, x0, jac=True, method="L-BFGS-B",
                                  options=dict(maxiter=MODE_MAXITER, gtol=MODE_GTOL, ftol=1e-14, maxcor=20))
    x = np.asarray(res.x, float)
    v, g = f(x)
    info = {"mode_iterations": int(res.nit), "mode_evaluations": int(res.nfev), "mode_potential": float(v),
            "mode_max_abs_grad": float(np.max(np.abs(g), initial=0.0)), "mode_message": str(res.message)}
    def refuse(why):
        info["mode_message"] = f"no usable mode: {why} ({info['mode_message']})"
        info["time_mode"] = time.perf_counter() - t0
        return None, info

    shift = float(np.max(np.abs(x - x0), initial=0.0))
    if not np.isfinite(v) or shift > MODE_MAX_SHIFT:
        return refuse(f"potential {v:.6g}, moved {shift:.3g} from the start")
    idx = np.arange(lay.n_dense)
    H = _hessian(f, x, idx, np.full(idx.size, FD_FIRST_STEP))
    sd = 1.0 / np.sqrt(np.clip(np.diag(H), 1.0, None))   # no step beyond FD_REL_STEP of unit scale
    H = _hessian(f, x, idx, FD_REL_STEP * sd)
    if not np.isfinite(H).all():
        return refuse("non-finite curvature")
    root, weak = _root(H)
    white = float(np.max(np.abs(np.concatenate([root.T @ g[:lay.n_dense], g[lay.n_dense:]])), initial=0.0))
    info["mode_whitened_grad"] = white
    if not white <= MODE_GRAD_OK:
        return refuse(f"whitened gradient {white:.3g}")
    info.update(weak_directions=weak, time_mode=time.perf_counter() - t0)
    return Metric(x, root, np.ones(lay.size - lay.n_dense)), info
