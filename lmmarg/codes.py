"""Integer group codes: the two operations the design and the marginal plan both need, each one O(N) pass.

>>> import numpy as np
>>> from lmmarg.codes import nested, unique_rows
>>> nested(np.array([0, 0, 1, 2]), np.array([5, 5, 5, 7]))
True
>>> unique_rows(np.array([[1, 0], [0, 2], [1, 0]]), [2, 3])[1].tolist()
[1, 0, 1]
"""
from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["nested", "unique_rows"]


def nested(fine: np.ndarray, coarse: np.ndarray) -> bool:
    """True if every observed group of ``fine`` lies in exactly one group of ``coarse``. fine, coarse: (N,) ints.

    One pass: scatter one coarse code per fine group, then compare every row with it (no sort)."""
    if fine.size == 0:
        return True
    fine = np.asarray(fine, dtype=np.int64)
    seen = np.empty(int(fine.max()) + 1, np.int64)
    seen[fine] = coarse
    return bool(np.array_equal(seen[fine], coarse))


def unique_rows(codes: np.ndarray, sizes) -> tuple[np.ndarray, np.ndarray]:
    """Unique rows of non-negative integer codes (N, k) with codes[:, j] < sizes[j], in lexicographic order, and the
    row of each observation: (uniq (n, k), inverse (N,)). One mixed-radix int64 key and a hash factorization (O(N))
    when the key fits in 62 bits, else NumPy's sort of rows."""
    N, k = codes.shape
    sizes = [max(int(s), 1) for s in sizes]
    if k == 0 or float(np.prod([float(s) for s in sizes])) >= 2.0**62:
        uniq, inv = np.unique(codes, axis=0, return_inverse=True)
        return uniq, np.asarray(inv).reshape(-1)
    strides = np.cumprod([1] + sizes[::-1][:-1])[::-1].astype(np.int64)    # last column varies fastest
    key = np.asarray(codes, dtype=np.int64) @ strides
    inv, ukey = pd.factorize(key, sort=True)                               # sort=True: lexicographic rows
    uniq = (ukey[:, None] // strides[None, :]) % np.asarray(sizes, np.int64)[None, :]
    return uniq.astype(np.int64), inv.astype(np.int64)
