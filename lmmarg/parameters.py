"""The parameter map: names of the public parameters and the map from their draws to the engine's arguments.

Every other module asks this one for a site name or for Λ; none formats ``f"sd_{...}"`` itself.

Public draws (what ``Fit.samples`` holds, with leading (chains, draws) dimensions):

====================  ==================  =====================================================================
key                   shape (one draw)    meaning
====================  ==================  =====================================================================
``beta``              (p,)                fixed effects, in ``Model.fixed_names`` order
``sigma``             () or (K,)          residual SD (K levels of ``sigma_by``)
``shape`` / ``phi``   ()                  dispersion of negbinomial / gamma (shape) and beta (phi)
``b_sigma``           (p_σ,)              fixed effects of a ``sigma=`` formula (log scale)
``sd_<term>``         (d,)                SDs of a random-effect term's columns
``corr_<term>``       (d, d)              its correlation matrix (d > 1)
``u_<term>``          (G, d)              its effects per group
``z_<term>``          (G, d)              standard-normal effects of a non-centred or conditional term
====================  ==================  =====================================================================

A term of the ``sigma=`` formula uses the same names with the part ``"sigma_"`` in front of the term's name
(``sd_sigma_<term>``, ``u_sigma_<term>``). Prior sites (``Model.priors``) are one per scalar:
``b_<name>``, ``b_sigma_<name>``, ``sigma``, ``sd_<part><term>__<column>``, ``cor_<part><term>``.

The engine takes Λ_l, the lower factor of the l-th term's covariance (Σ_l = Λ_l Λ_lᵀ), as ``scales``; it is
``relative_factor(sd, chol(corr))`` = diag(sd) chol(corr).
"""
from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

SIGMA_PART = "sigma_"   # the part prefix of the sigma formula's terms


def _part(sigma_part: bool) -> str:
    return SIGMA_PART if sigma_part else ""


def fixed_site(name: str, sigma_part: bool = False) -> str:
    """Prior site of one fixed effect: ``b_<name>`` (``b_sigma_<name>`` in the sigma formula)."""
    return f"b_{_part(sigma_part)}{name}"


def sd_site(term: str, column: str | None = None, sigma_part: bool = False) -> str:
    """``sd_<term>`` (the (d,) SDs of a term), or with ``column`` the prior site ``sd_<term>__<column>``."""
    base = f"sd_{_part(sigma_part)}{term}"
    return base if column is None else f"{base}__{column}"


def corr_site(term: str, sigma_part: bool = False) -> str:
    """``corr_<term>``: the (d, d) correlation matrix of a term's draws."""
    return f"corr_{_part(sigma_part)}{term}"


def cor_prior_site(term: str, sigma_part: bool = False) -> str:
    """``cor_<term>``: the prior site of a term's correlation Cholesky factor (LKJ)."""
    return f"cor_{_part(sigma_part)}{term}"


def effects_site(term: str, sigma_part: bool = False) -> str:
    """``u_<term>``: the (G, d) effects of a term."""
    return f"u_{_part(sigma_part)}{term}"


def standard_site(term: str, sigma_part: bool = False) -> str:
    """``z_<term>``: the (G, d) standard-normal coordinates of a non-centred or conditional term."""
    return f"z_{_part(sigma_part)}{term}"


def sd_label(group: str, column: str, sigma_part: bool = False) -> str:
    """brms's row label of one SD in summaries: ``sd_<group>__<column>``."""
    return f"sd_{group}__{_part(sigma_part)}{column}"


def relative_factor(sd, corr_chol):
    """Λ = diag(sd) L with L = chol(corr): sd (..., d), corr_chol (..., d, d) or None (d = 1) -> (..., d, d).

    Works on NumPy and JAX arrays alike (broadcasting only)."""
    if corr_chol is None:
        return sd[..., :, None] * np.eye(sd.shape[-1], dtype=getattr(sd, "dtype", None))
    return sd[..., :, None] * corr_chol


def relative_factor_any(sd: np.ndarray, corr: np.ndarray | None) -> np.ndarray:
    """Λ with Λ Λᵀ = diag(sd) corr diag(sd) for NumPy draws, singular correlations too: sd (S, d), corr
    (S, d, d) or None -> (S, d, d).

    A boundary draw (|ρ| = 1) has no Cholesky factor; the symmetric eigen-decomposition keeps it finite. Λ is
    then not triangular, which every consumer (the engine, LOO, prediction of new levels) accepts."""
    S, d = sd.shape
    if corr is None or d == 1:
        return sd[:, :, None] * np.eye(d)[None]
    w, V = np.linalg.eigh(corr)
    return sd[:, :, None] * (V * np.sqrt(np.clip(w, 0, None))[:, None, :])


class KernelArgs(NamedTuple):
    """What the marginal engine takes besides its plan (one draw, no leading dimensions).

    beta (p,); sigma () or (N,) (None for a GLMM family; the dispersion () for negbinomial / gamma / beta);
    scales: Λ_l (d_l, d_l) per marginalized term in the potential's ``marg`` order; offset (N,) of the terms left
    to HMC, or None."""
    beta: object
    sigma: object
    scales: tuple
    offset: object


def kernel_args(draw: dict, terms, marg, *, sigma, offset, beta=None) -> KernelArgs:
    """The one map from a draw of the public parameters to the marginal engine's arguments.

    draw: one draw (``Potential.constrain``'s keys, no leading dims); terms: the model's random-effect terms (their
    ``name`` and ``d``); marg: indices of the marginalized terms; sigma: draw -> the residual SD () or (N,) (None
    for a GLMM family), e.g. ``ModelParts.sigma_obs``; offset: {term name: u (G, d)} of the terms left to HMC ->
    (N,) or None, e.g. ``ModelParts.offset``; beta: the fixed effects to use instead of ``draw["beta"]`` (zeros
    when they are integrated out). Returns KernelArgs with scales Λ_l = relative_factor(sd_l, chol(corr_l)) in
    ``marg`` order. Jit-friendly."""
    draw = {k: jnp.asarray(v) for k, v in draw.items()}
    scales, u = [], {}
    for h, t in enumerate(terms):
        if h in marg:
            chol = jnp.linalg.cholesky(draw[corr_site(t.name)]) if t.d > 1 else None
            scales.append(relative_factor(draw[sd_site(t.name)], chol))
        else:
            u[t.name] = draw[effects_site(t.name)]
    return KernelArgs(draw["beta"] if beta is None else beta, sigma(draw), tuple(scales), offset(u))
