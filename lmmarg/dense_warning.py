"""The warning about a large dense Schur block (crossed terms), given once per plan by whoever builds one
(``Model.plan``, ``lmmarg.inference.ml``): ``warn_large_dense(plan)``."""
from __future__ import annotations

from ._warnings import warn_user
from .marginal.structure import LARGE_DENSE, dense_seconds

__all__ = ["warn_large_dense"]


def warn_large_dense(plan) -> None:
    """Say what a large dense Schur block costs (measured here), once per plan: slow is allowed, silent is not."""
    n = plan.dense_size
    if n <= LARGE_DENSE:
        return
    dense = [plan.unit_names[u] for u in range(plan.n_chain_units, len(plan.unit_dims))]
    t = dense_seconds(n)
    warn_user(f"the crossed term(s) {dense} form a dense Schur block of size {n} ({8 * n * n / 2**20:.0f} MB): every "
              f"likelihood evaluation factorizes it, about {t:.2g} s per value and gradient on this machine "
              f"(fit_ml needs 30-100 evaluations, NUTS one per leapfrog step); for NUTS leave some of them to HMC "
              "(marginalize='auto' or a list of term names), with parameterization={term: 'conditional'} for terms "
              "with many observations per level (docs/guide.md, section 4)")
