"""Finite-difference Hessians from exact gradients, for the optimizers' convergence checks (ML, MAP)."""
from __future__ import annotations

import numpy as np

__all__ = ["hessian_from_gradients"]


def hessian_from_gradients(value_and_grad, x: np.ndarray, grad: np.ndarray, idx, step: float,
                           central: bool = False) -> np.ndarray:
    """Symmetrized (k, k) Hessian of f in the coordinates idx (k,) at x (n,).

    value_and_grad: x -> (value, gradient (n,)); grad: the gradient at x. Forward differences (k evaluations) or,
    with ``central``, central ones (2k); the step of coordinate j is step * max(1, |x_j|).
    """
    idx = np.asarray(idx)
    H = np.empty((idx.size, idx.size))
    for a, k in enumerate(idx):
        h = step * max(1.0, abs(x[k]))
        xp = x.copy()
        xp[k] += h
        if central:
            xm = x.copy()
            xm[k] -= h
            H[:, a] = (value_and_grad(xp)[1][idx] - value_and_grad(xm)[1][idx]) / (2 * h)
        else:
            H[:, a] = (value_and_grad(xp)[1][idx] - grad[idx]) / h
    return 0.5 * (H + H.T)
