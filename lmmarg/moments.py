"""Column moments of data seen in chunks: n, non-zeros, min, max, mean and m2 = Σ(x − mean)² per column, merged
exactly (Chan, Golub & LeVeque's pairwise update with the mean carried as a double-double), so that a column with
mean 10⁶ and SD 10⁻² keeps its variance whatever the chunks (``lmmarg.sufficient`` carries them for the model's
unit-free coordinates and default priors without rows; docs/math.md §3).

Public: ColumnMoments, DataMoments.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ColumnMoments", "DataMoments"]


@dataclass(frozen=True, eq=False)
class ColumnMoments:
    """Moments of k columns over rows (arrays (k,)): n rows, nnz non-zero rows, min, max (+inf / −inf with no rows),
    mean, m2 = Σ (x − mean)², and mean_lo: what the mean holds below mean's last digit (mean + mean_lo is the mean
    to about twice double precision; it keeps every digit of m2 when chunks with a large common mean and a small
    spread are merged). ``a + b``: the moments of the union of the rows (Chan, Golub & LeVeque's pairwise update),
    associative and commutative up to rounding."""
    n: np.ndarray
    nnz: np.ndarray
    min: np.ndarray
    max: np.ndarray
    mean: np.ndarray
    m2: np.ndarray
    mean_lo: np.ndarray

    FIELDS = ("n", "nnz", "min", "max", "mean", "m2", "mean_lo")

    @classmethod
    def empty(cls, k: int) -> "ColumnMoments":
        z = np.zeros(k)
        return cls(np.zeros(k, np.int64), np.zeros(k, np.int64), np.full(k, np.inf), np.full(k, -np.inf), z, z, z)

    @classmethod
    def of(cls, values) -> "ColumnMoments":
        """The moments of the columns of ``values`` (n, k): two passes (mean, then deviations), compensated."""
        values = np.asarray(values, dtype=float)
        n, k = values.shape
        if n == 0:
            return cls.empty(k)
        hi = values.mean(0)
        dev = values - hi       # exact where x and the mean are within a factor 2 (a large common mean)
        lo = dev.mean(0)
        return cls(np.full(k, n, np.int64), np.count_nonzero(values, axis=0).astype(np.int64), values.min(0),
                   values.max(0), hi, ((dev - lo) ** 2).sum(0), lo)

    @property
    def var(self) -> np.ndarray:
        """(k,) the variance with ddof=1 (NaN with fewer than 2 rows)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.n > 1, self.m2 / np.maximum(self.n - 1, 1), np.nan)

    def __add__(self, other: "ColumnMoments") -> "ColumnMoments":
        if not isinstance(other, ColumnMoments):
            return NotImplemented
        a, b = self, other
        if a.n.shape != b.n.shape:
            raise ValueError(f"cannot add the moments of {a.n.shape[0]} and {b.n.shape[0]} columns")
        n = a.n + b.n
        fb = b.n / np.maximum(n, 1)
        delta = (b.mean - a.mean) + (b.mean_lo - a.mean_lo)
        t = a.mean_lo + delta * fb
        hi = a.mean + t
        bt = hi - a.mean    # Knuth's two-sum: hi + lo == a.mean + t exactly
        lo = (a.mean - (hi - bt)) + (t - bt)
        m2 = a.m2 + b.m2 + delta ** 2 * a.n * fb
        a_empty, b_empty = a.n == 0, b.n == 0

        def pick(x, xa, xb):
            return np.where(a_empty, xb, np.where(b_empty, xa, x))

        return ColumnMoments(n, a.nnz + b.nnz, np.minimum(a.min, b.min), np.maximum(a.max, b.max),
                             pick(hi, a.mean, b.mean), pick(m2, a.m2, b.m2), pick(lo, a.mean_lo, b.mean_lo))


@dataclass(frozen=True, eq=False)
class DataMoments:
    """:class:`ColumnMoments` of the fixed-effect columns X (p), of every term's Z columns (D, formula term order,
    the column order of S_zz) and of the working response y (1 column: y, or log y for lognormal, minus the
    offsets); ``a + b`` merges them."""
    X: ColumnMoments
    Z: ColumnMoments
    y: ColumnMoments

    def __add__(self, other: "DataMoments") -> "DataMoments":
        if not isinstance(other, DataMoments):
            return NotImplemented
        return DataMoments(self.X + other.X, self.Z + other.Z, self.y + other.y)

    def arrays(self) -> dict:
        """{"moments_X_mean": (p,), ...}: every array, for an .npz."""
        return {f"moments_{part}_{f}": getattr(getattr(self, part), f) for part in ("X", "Z", "y")
                for f in ColumnMoments.FIELDS}

    @classmethod
    def from_arrays(cls, z) -> "DataMoments | None":
        """What :meth:`arrays` wrote (a mapping), or None when it holds no moments (a file saved before them)."""
        if "moments_y_n" not in z:
            return None
        return cls(*(ColumnMoments(*(np.asarray(z[f"moments_{part}_{f}"]) for f in ColumnMoments.FIELDS))
                     for part in ("X", "Z", "y")))
