"""Distributions and transforms of the correlation parameters, for the compiled potentials.

NumPyro's correlation-Cholesky transform and LKJCholesky density scatter into the triangle and gather single entries;
on XLA:CPU each of those is a compiled kernel of its own, forward and reverse, in every potential with a
correlation. The classes here compute the same values elementwise (unrolled) for factors up to
``UNROLLED_CORR_MAX`` and fall back to NumPyro's code above it. They also keep the input's dtype (NumPyro's
transform fills a buffer of JAX's default float dtype).

Documented internal API (used by ``lmmarg.numpyro_model`` and the tests):

* ``UNROLLED_CORR_MAX``: the largest d computed elementwise.
* ``corr_dim(n_free) -> d``: d of a (d, d) factor with n_free = d (d - 1) / 2 unconstrained values.
* ``signed_stick_breaking(t (..., d (d - 1) / 2), d) -> (..., d, d)``: NumPyro's signed stick-breaking, unrolled.
* ``CorrCholeskyTransform``: drop-in for ``numpyro.distributions.transforms.CorrCholeskyTransform``.
* ``CorrCholeskyConstraint`` / ``corr_cholesky``: the support of ``LKJCholesky``; ``biject_to(corr_cholesky)``
  is ``CorrCholeskyTransform()`` (registered on import).
* ``LKJCholesky``: drop-in for ``numpyro.distributions.LKJCholesky`` (same values, same validation).
* ``lkj_cholesky(d, eta, dtype) -> LKJCholesky``: the LKJ prior on a (d, d) factor in the model's dtype.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax.scipy.special import gammaln, multigammaln
from numpyro.distributions import constraints, transforms
from numpyro.distributions.util import validate_sample

__all__ = ["UNROLLED_CORR_MAX", "corr_dim", "signed_stick_breaking", "CorrCholeskyTransform",
           "CorrCholeskyConstraint", "corr_cholesky", "LKJCholesky", "lkj_cholesky"]

UNROLLED_CORR_MAX = 8   # correlation Cholesky factors up to this size: elementwise, unrolled (see below)


def corr_dim(n_free: int) -> int:
    """d of a (d, d) correlation Cholesky factor with n_free = d (d - 1) / 2 unconstrained values."""
    return int(round((1 + math.sqrt(1 + 8 * n_free)) / 2))


def signed_stick_breaking(t, d: int):
    """NumPyro's signed stick-breaking (``signed_stick_breaking_tril``) for t (..., d (d - 1) / 2) in (-1, 1), in
    the row-major order of the strictly lower triangle, unrolled: y_ij = t_ij prod_{k<j} (1 - t_ik^2)^(1/2),
    y_ii = prod_{k<i} (1 - t_ik^2)^(1/2). Elementwise only: NumPyro's form (a scatter into the triangle, a
    cumulative product, a padded shift) compiles to scatter loops and window reductions, forward and reverse, in
    every potential with a correlation."""
    eps = jnp.finfo(t.dtype).eps
    t = jnp.clip(t, -1 + eps, 1 - eps)
    one = jnp.ones_like(t[..., 0])
    entries, k = {(0, 0): one}, 0
    for i in range(1, d):
        rest = one                                # rest = prod_{k<j} (1 - t_ik^2)^(1/2)
        for j in range(i):
            entries[i, j] = t[..., k] * rest
            rest = rest * jnp.sqrt(1 - t[..., k] ** 2)
            k += 1
        entries[i, i] = rest
    return _from_entries(entries, d, t.dtype)


def _from_entries(entries: dict, d: int, dtype):
    """The (..., d, d) matrix with the given entries {(i, j): (...,) array} (zeros elsewhere), as a sum of entries
    times constant one-hot matrices: elementwise, so it fuses into its consumers (a stack is a compiled kernel of
    its own, and so is each padded cotangent of its reverse pass)."""
    out = 0.0
    for (i, j), v in entries.items():
        onehot = np.zeros((d, d))
        onehot[i, j] = 1.0
        out = out + v[..., None, None] * jnp.asarray(onehot, dtype)
    return out


class CorrCholeskyTransform(transforms.CorrCholeskyTransform):
    """NumPyro's CorrCholeskyTransform, computed elementwise for d <= UNROLLED_CORR_MAX (the same values), in the
    wider of the input's dtype and float64: NumPyro's transform fills a buffer of JAX's default float dtype (float64
    under x64), which fails for a float32 model in a process where x64 is on; the result has the input's dtype."""

    def __call__(self, x):
        wide = jnp.promote_types(x.dtype, jax.dtypes.canonicalize_dtype(np.float64))
        d = corr_dim(x.shape[-1])
        if d > UNROLLED_CORR_MAX:
            return super().__call__(x.astype(wide)).astype(x.dtype)
        return signed_stick_breaking(jnp.tanh(x.astype(wide)), d).astype(x.dtype)

    def log_abs_det_jacobian(self, x, y, intermediates=None):
        """NumPyro's value: the tanh part plus 1/2 sum_i sum_{j <= i - 2} log(1 - sum_{k <= j} y_ik^2)."""
        d = y.shape[-1]
        if d > UNROLLED_CORR_MAX:
            return super().log_abs_det_jacobian(x, y, intermediates)
        stick = jnp.zeros_like(x[..., 0])
        for i in range(2, d):
            left = 1.0
            for j in range(i - 1):
                left = left - y[..., i, j] ** 2
                stick = stick + 0.5 * jnp.log(left)
        return stick - 2.0 * jnp.sum(x + jax.nn.softplus(-2.0 * x) - math.log(2.0), axis=-1)


class CorrCholeskyConstraint(type(constraints.corr_cholesky)):
    """corr_cholesky, distinct type so that biject_to picks the dtype-preserving transform above."""


corr_cholesky = CorrCholeskyConstraint()
transforms.biject_to.register(CorrCholeskyConstraint, lambda c: CorrCholeskyTransform())


class LKJCholesky(dist.LKJCholesky):
    """NumPyro's LKJCholesky; for d <= UNROLLED_CORR_MAX the unnormalized log density is a weighted sum of the
    log-diagonal over the whole matrix (NumPyro's gather becomes a scatter loop in the reverse pass, and a read of
    single entries a padded cotangent, a compiled kernel each). Same values, same validation."""

    support = corr_cholesky

    @validate_sample
    def log_prob(self, value):
        d = self.dimension
        if d > UNROLLED_CORR_MAX:
            return super().log_prob(value)
        eta = jnp.asarray(self.concentration)
        # NumPyro's unnormalized density: sum_{i=1}^{d-1} (2 eta - (3 - d) - i) log L_ii (0-based i)
        on_diag = np.eye(d, dtype=bool)
        ones_after_first = jnp.asarray(np.diag((np.arange(d) > 0).astype(np.float64)), value.dtype)
        index = jnp.asarray(np.diag(np.arange(d, dtype=np.float64)), value.dtype)
        weight = jnp.expand_dims(2.0 * eta - (3 - d), (-2, -1)) * ones_after_first - index
        unnormalized = jnp.sum(weight * jnp.log(jnp.where(on_diag, value, 1.0)), axis=(-2, -1))
        dm1 = d - 1
        alpha = eta + 0.5 * dm1
        normalizer = 0.5 * dm1 * math.log(math.pi) + multigammaln(alpha - 0.5, dm1) - gammaln(alpha) * dm1
        return unnormalized - normalizer


def lkj_cholesky(d: int, eta: float, dtype):
    """LKJ prior on a (d, d) correlation Cholesky factor, parameters in the model's dtype."""
    return LKJCholesky(d, jnp.asarray(eta, dtype))
