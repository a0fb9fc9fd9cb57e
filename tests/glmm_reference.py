"""Independent dense Laplace oracle for GLMMs (pure NumPy/SciPy; no lmmarg, no JAX).

It computes lme4's ``glmer(nAGQ = 1)`` Laplace log-likelihood at a given (beta, covariances), using the
same conventions as glmer (checked against ``tests/golden/glmer.json`` by
``tests/golden/check_glmer_oracle.py``):

* spherical random effects ``v ~ N(0, I_q)``, ``u = Lambda v`` and ``eta = X beta + Z Lambda v``, where
  Lambda is block diagonal with one ``Lambda_l`` (d_l x d_l, ``Lambda_l Lambda_l^T = Sigma_l``) for
  each group of each random-effect class;
* ``v_hat = argmax_v  sum_i log p(y_i | eta_i) - 1/2 ||v||^2``, found by Newton's method with step halving;
* ``loglik = sum_i log p(y_i | eta_hat_i) - 1/2 ||v_hat||^2 - 1/2 log|I + Lambda^T Z^T W Z Lambda|``, where W
  holds the **Fisher (expected) information** weights ``trials * (dmu/deta)^2 / Var(mu)`` at ``v_hat``.
  glmer uses these (its PIRLS weights). For canonical links (logit, log) they equal the observed
  information; for probit they do not;
* ``log p`` is the full log-mass, with ``log C(n, k)`` for binomial and ``-log y!`` for Poisson,
  as in lme4's ``logLik`` (the family's ``aic()``).

Families: ``"bernoulli"`` (all trials 1), ``"binomial"`` (``y`` = number of successes out of ``trials``),
``"poisson"``. Links: ``"logit"`` and ``"probit"`` for bernoulli/binomial, ``"log"`` for poisson.
"""
from __future__ import annotations

import numpy as np
from scipy import linalg, special

__all__ = ["laplace_reference", "cov_sqrt", "log_density"]

_LOG_SQRT_2PI = 0.5 * np.log(2.0 * np.pi)


def cov_sqrt(cov: np.ndarray) -> np.ndarray:
    """Return a square root L with ``L L^T = cov``.

    This is the lower Cholesky factor when ``cov`` is positive definite. Otherwise (singular) it is the
    eigen-based ``V diag(sqrt(max(w, 0)))``. The Laplace value is the same for any square root:
    ``Lambda -> Lambda Q`` only rotates v, and ``u = Lambda v`` does not change.
    """
    cov = np.atleast_2d(np.asarray(cov, dtype=float))
    cov = 0.5 * (cov + cov.T)
    try:
        return np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        w, V = np.linalg.eigh(cov)
        return V * np.sqrt(np.clip(w, 0.0, None))


def _check_family(family: str, link: str) -> None:
    ok = {"bernoulli": ("logit", "probit"), "binomial": ("logit", "probit"), "poisson": ("log",)}
    if family not in ok:
        raise ValueError(f"unknown family {family!r}")
    if link not in ok[family]:
        raise ValueError(f"link {link!r} not supported for family {family!r}")


def log_density(y, trials, eta, family: str, link: str):
    """Return (log p(y|eta) per observation, d/deta, observed information -d2/deta2, Fisher weight, mu)."""
    y = np.asarray(y, dtype=float)
    eta = np.asarray(eta, dtype=float)
    if family == "poisson":
        mu = np.exp(eta)
        lp = y * eta - mu - special.gammaln(y + 1.0)
        return lp, y - mu, mu, mu, mu
    n = np.asarray(trials, dtype=float)
    k = y
    lchoose = special.gammaln(n + 1.0) - special.gammaln(k + 1.0) - special.gammaln(n - k + 1.0)
    if link == "logit":
        log_mu = -np.logaddexp(0.0, -eta)
        log_1mmu = -np.logaddexp(0.0, eta)
        mu = np.exp(log_mu)
        lp = lchoose + k * log_mu + (n - k) * log_1mmu
        info = n * mu * np.exp(log_1mmu)          # n mu (1 - mu), observed = expected
        return lp, k - n * mu, info, info, mu
    # probit
    log_Phi = special.log_ndtr(eta)               # log Phi(eta)
    log_Phic = special.log_ndtr(-eta)             # log (1 - Phi(eta))
    log_phi = -0.5 * eta * eta - _LOG_SQRT_2PI
    r = np.exp(log_phi - log_Phi)                 # phi / Phi
    s = np.exp(log_phi - log_Phic)                # phi / (1 - Phi)
    lp = lchoose + k * log_Phi + (n - k) * log_Phic
    grad = k * r - (n - k) * s
    obs = k * r * (eta + r) + (n - k) * s * (s - eta)   # > 0: Phi is log-concave
    fisher = n * np.exp(2.0 * log_phi - log_Phi - log_Phic)   # n phi^2 / (Phi (1 - Phi))
    return lp, grad, obs, fisher, np.exp(log_Phi)


def _build(Zs, codes, covs, n_groups, N):
    blocks_Z, blocks_L, layout = [], [], []
    for k, (Zl, cl, cov) in enumerate(zip(Zs, codes, covs)):
        Zl = np.asarray(Zl, dtype=float).reshape(N, -1)
        cl = np.asarray(cl, dtype=np.int64)
        d = Zl.shape[1]
        G = int(n_groups[k]) if n_groups is not None else int(cl.max()) + 1
        if cl.min() < 0 or cl.max() >= G:
            raise ValueError(f"codes of class {k} out of range [0, {G})")
        cov = np.atleast_2d(np.asarray(cov, dtype=float))
        if cov.shape != (d, d):
            raise ValueError(f"class {k}: covariance shape {cov.shape} != ({d}, {d})")
        # columns ordered group-major: (group g, column j) -> g * d + j
        Zfull = np.zeros((N, G * d))
        cols = cl[:, None] * d + np.arange(d)[None, :]
        Zfull[np.arange(N)[:, None], cols] = Zl
        blocks_Z.append(Zfull)
        blocks_L.append(np.kron(np.eye(G), cov_sqrt(cov)))
        layout.append((G, d))
    Z = np.hstack(blocks_Z) if blocks_Z else np.zeros((N, 0))
    Lam = linalg.block_diag(*blocks_L) if blocks_L else np.zeros((0, 0))
    return Z, Lam, layout


def laplace_reference(X, Zs, codes, y, trials, family, link, beta, covs, n_groups=None,
                      tol=1e-12, max_iter=500):
    """Dense Laplace approximation of a GLMM log-likelihood (lme4's glmer nAGQ = 1 definition).

    Parameters
    ----------
    X : (N, p) fixed-effect design; beta : (p,)
    Zs : list of (N, d_l) random-effect design blocks, one per class
    codes : list of (N,) int group codes per class (0 .. G_l - 1)
    y : (N,) response (0/1 for bernoulli, successes for binomial, counts for poisson)
    trials : (N,) binomial trials (ignored for poisson; forced to 1 for bernoulli; None allowed)
    family : "bernoulli" | "binomial" | "poisson";  link : "logit" | "probit" | "log"
    covs : list of (d_l, d_l) covariance matrices Sigma_l (may be singular)
    n_groups : optional list of G_l (default: max code + 1)

    Returns
    -------
    dict with ``loglik`` (Laplace), ``cond_loglik`` (sum log p(y|eta_hat)), ``penalty`` (1/2 ||v_hat||^2),
    ``logdet`` (log|I + Lambda^T Z^T W Z Lambda|), ``u_modes`` / ``v_modes`` (per class (G_l, d_l) arrays;
    u = Lambda v), ``u``, ``v`` (flat), ``weights`` (Fisher weights W at the mode), ``eta``, ``mu``,
    ``n_iter``, ``grad_norm`` (max |gradient| at the mode).
    """
    _check_family(family, link)
    X = np.asarray(X, dtype=float)
    y = np.asarray(y, dtype=float)
    N = y.shape[0]
    X = X.reshape(N, -1)
    beta = np.asarray(beta, dtype=float).reshape(-1)
    if family == "bernoulli":
        if np.any((y != 0) & (y != 1)):
            raise ValueError("bernoulli response must be 0/1")
        trials = np.ones(N)
    elif family == "binomial":
        trials = np.asarray(trials, dtype=float).reshape(N)
        if np.any(y < 0) or np.any(y > trials):
            raise ValueError("binomial response must be in [0, trials]")
    else:
        trials = None
    Z, Lam, layout = _build(Zs, codes, covs, n_groups, N)
    ZL = Z @ Lam
    q = ZL.shape[1]
    off = X @ beta

    def objective(v):
        eta = off + ZL @ v
        lp, g, obs, fis, mu = log_density(y, trials, eta, family, link)
        return lp.sum() - 0.5 * v @ v, eta, lp, g, obs, fis, mu

    v = np.zeros(q)
    f, eta, lp, g, obs, fis, mu = objective(v)
    n_iter = 0
    for n_iter in range(1, max_iter + 1):  # noqa: B007 (reported after the loop)
        grad = ZL.T @ g - v
        H = ZL.T @ (obs[:, None] * ZL) + np.eye(q)          # negative Hessian (observed), PD
        cH = linalg.cho_factor(H, lower=True)
        step = linalg.cho_solve(cH, grad)
        t = 1.0
        while True:
            v_new = v + t * step
            f_new, *rest = objective(v_new)
            # allow for rounding in f near the optimum
            if f_new >= f - 1e-13 * max(1.0, abs(f)) or t < 1e-10:
                break
            t *= 0.5
        v = v_new
        f, eta, lp, g, obs, fis, mu = (f_new, *rest)
        if np.max(np.abs(t * step)) <= tol * max(1.0, np.max(np.abs(v))):
            break
    else:
        raise RuntimeError(f"Newton did not converge in {max_iter} iterations")
    grad = ZL.T @ g - v
    M = ZL.T @ (fis[:, None] * ZL) + np.eye(q)
    cM = linalg.cholesky(M, lower=True)
    logdet = 2.0 * np.sum(np.log(np.diag(cM)))
    cond = lp.sum()
    penalty = 0.5 * v @ v
    u = Lam @ v
    u_modes, v_modes, k = [], [], 0
    for G, d in layout:
        u_modes.append(u[k:k + G * d].reshape(G, d))
        v_modes.append(v[k:k + G * d].reshape(G, d))
        k += G * d
    return dict(loglik=cond - penalty - 0.5 * logdet, cond_loglik=cond, penalty=penalty, logdet=logdet,
                u_modes=u_modes, v_modes=v_modes, u=u, v=v, weights=fis, eta=eta, mu=mu,
                n_iter=n_iter, grad_norm=float(np.max(np.abs(grad))) if q else 0.0)
