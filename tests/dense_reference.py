"""Dense O(N^3) oracle for the marginal kernels (test helper, NumPy/SciPy only)."""
from __future__ import annotations

import numpy as np
import scipy.linalg
import scipy.sparse as sp
from scipy.stats import multivariate_normal


def dense_Z(spec) -> np.ndarray:
    """(N, n_groups * d) design of one class; column g * d + c holds Z[:, c] for group g."""
    Z = np.asarray(spec.Z, float)
    Z = Z[:, None] if Z.ndim == 1 else Z
    N, d = Z.shape
    codes = np.asarray(spec.codes).astype(int)
    rows = np.repeat(np.arange(N), d)
    cols = (codes[:, None] * d + np.arange(d)[None, :]).ravel()
    return sp.csr_matrix((Z.ravel(), (rows, cols)), shape=(N, spec.n_groups * d)).toarray()


def _prior_blocks(classes, marg, scales, X=None, beta_prior=None):
    """Stacked design Zs (N, q) and prior covariance P (q, q) of [u_l..., beta]."""
    Zs, Ps = [], []
    for lam, i in zip(scales, marg):
        c = classes[i]
        lam = np.atleast_2d(np.asarray(lam, float))
        Zs.append(dense_Z(c))
        Ps.append(np.kron(np.eye(c.n_groups), lam @ lam.T))
    if beta_prior is not None:
        S = np.asarray(beta_prior[1], float)
        Zs.append(np.asarray(X, float))
        Ps.append(S @ S.T)
    N = np.asarray(X).shape[0]
    if not Zs:
        return np.zeros((N, 0)), np.zeros((0, 0))
    return np.hstack(Zs), scipy.linalg.block_diag(*Ps)


def _mean_cov(X, classes, marg, beta, sigma, scales, offset, beta_prior):
    X = np.asarray(X, float)
    N = X.shape[0]
    b = np.asarray(beta_prior[0] if beta_prior is not None else beta, float)
    mean = X @ b + (0.0 if offset is None else np.asarray(offset, float))
    Zs, P = _prior_blocks(classes, marg, scales, X, beta_prior)
    s2 = np.broadcast_to(np.asarray(sigma, float) ** 2, (N,))
    cov = Zs @ P @ Zs.T + np.diag(s2)
    return mean, cov, Zs, P


def dense_logpdf(X, y, classes, marg, beta, sigma, scales, offset=None, beta_prior=None) -> float:
    """log N(y; X beta + offset, sum_l Z_l (I kron Lam_l Lam_l^T) Z_l^T [+ X S S^T X^T] + diag(sigma^2))."""
    mean, cov, _, _ = _mean_cov(X, classes, marg, beta, sigma, scales, offset, beta_prior)
    return float(multivariate_normal(mean=mean, cov=cov).logpdf(np.asarray(y, float)))


def dense_conditional(X, y, classes, marg, beta, sigma, scales, offset=None, beta_prior=None):
    """Gaussian conditional of the stacked [u_l (flattened row-major)..., beta] given y.

    Returns (mean (q,), cov (q, q), sizes) where sizes are the block lengths.
    """
    mean, cov, Zs, P = _mean_cov(X, classes, marg, beta, sigma, scales, offset, beta_prior)
    K = P @ Zs.T
    sol = np.linalg.solve(cov, np.column_stack([np.asarray(y, float) - mean, K.T]))
    m = K @ sol[:, 0]
    C = P - K @ sol[:, 1:]
    sizes = [classes[i].n_groups * np.atleast_2d(lam).shape[0] for lam, i in zip(scales, marg)]
    if beta_prior is not None:
        m = m + np.concatenate([np.zeros(sum(sizes)), np.asarray(beta_prior[0], float)])
        sizes.append(len(beta_prior[0]))
    return m, 0.5 * (C + C.T), sizes
