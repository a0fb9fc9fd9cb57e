"""Plan: the static, data-dependent part of the marginal likelihood.

``build_plan`` runs once per data set (NumPy, not traced).  It

* stacks the marginalized random-effect classes (and optionally beta) into
  "units" laid out as ``[chain units (finest first), dense units]``;
* forms *cells*, the unique combinations of group codes of all marginalized
  classes (every observation lies in exactly one cell);
* splits the classes into a *chain* of nested classes, eliminated
  block-diagonally by tree message passing, and a *dense* block whose Schur
  complement is factorized densely (size ``dense_size``);
* precomputes per-cell sufficient statistics (``S_zz``, ``S_zr``, ``S_zX``)
  so that, for scalar sigma and no offset, a kernel call costs O(n_cells D^3)
  independently of N;
* for every chain level chooses how the dense fill-in is computed
  (``"pairs"``: scatter of same-node cell pairs, ``"mtm"``: ``M^T M``).

The result is a JAX pytree: arrays are leaves, sizes/orders are static.
"""
from __future__ import annotations

import itertools
import dataclasses
from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp

from ..codes import nested as nested_codes
from ..codes import unique_rows

__all__ = ["ClassSpec", "Plan", "MarginalTooLarge", "build_plan", "auto_marginalize", "DenseProductFill",
           "PairListFill", "PooledFill", "LEVEL1_FILLS",
           "default_dense_limit", "dense_seconds", "LARGE_DENSE"]

BETA = -1  # unit source id of the fixed effects when they are marginalized
# Cost model of the scalar-sigma level-1 fill K = sum_g B_g R_g B_g^T (docs/math.md, section 5), in units of one
# multiply-add of a dense product. A coefficient-list entry is a gather, a multiply and a scattered segment-sum in
# both passes: measured at about 100 dense multiply-adds on XLA:CPU (dense products stream at full speed).
PAIR_ENTRY_COST = 100.0
DENSE_B_MAX_ENTRIES = 4e6    # the dense B (ds, G_0, d0) of DenseProductFill: at most 32 MB in float64
PAIR_MAX_ENTRIES = 4e7       # coefficient-list entries of PairListFill
POOLED_MAX_ENTRIES = 2e7     # constants of PooledFill (U d0^2 ds (ds + k0)): at most 160 MB in float64
POOLED_ENTRY_COST = 4.0      # a pooled constant is streamed from memory once per call in each pass: memory-bound
POOLED_BLAS_MAX_CLASSES = 1024   # build the pooled constants by one BLAS product per class (a loop) up to this many
LEVEL1_FILLS = ("auto", "dense", "pairs", "pooled")
BETA_BLOCKS = ("auto", "unit", "last")   # where a marginalized beta is eliminated (build_plan's beta_block)
# How the density kernels form the one-level dense Schur block (Plan.dense_form, docs/math.md section 5):
# "scaled" F = I + Lambda_D^T M Lambda_D (any Lambda, zero variances included: ML, recovery),
# "precision" F~ = Sigma_D^{-1} + M with log|F| = log|F~| + log|Sigma_D| (nonsingular Lambda_D only: the sampler's
# potential, whose SDs are exp(.) > 0); it skips scaling the ds x ds block by Lambda_D, forward and reverse.
DENSE_FORMS = ("scaled", "precision")
# The default limit on the dense Schur block is set by memory, not by time (slow is allowed when it is said):
# a value-and-gradient holds about DENSE_WORK_COPIES (n, n) arrays (F, its Cholesky factor, F^-1, cotangents), and
# they may take DENSE_MEMORY_FRACTION of the machine's memory.
DENSE_WORK_COPIES = 6
DENSE_MEMORY_FRACTION = 0.25
LARGE_DENSE = 2000           # blocks above this size get a warning with the measured cost of one evaluation
CHAIN_FILLS = ("auto", "pairs", "mtm")


class DenseProductFill(NamedTuple):
    """Level-1 fill as one dense product K = W W^T, W_g = B_g Q_g (R_g = Q_g Q_g^T); Bc: B laid out
    (ds, d_0, G_0), so that forming W scales contiguous rows (entry [t, a, g] = B[t, (g, a)])."""

    Bc: jax.Array


class PairListFill(NamedTuple):
    """Level-1 fill from sorted coefficient lists over same-group entry pairs of B (``_bilinear_K``).

    coef (E,), rid (E,) index into R.ravel(), seg (E,) sorted target id, targets (T,) flat upper-triangle
    positions in the dense block, targets_t (T,) their mirrored positions (ds*ds on the diagonal)."""

    coef: jax.Array
    rid: jax.Array
    seg: jax.Array
    targets: jax.Array
    targets_t: jax.Array


class PooledFill(NamedTuple):
    """Level-1 groups pooled into U classes of equal A_g = sum Z_0^T Z_0 (so equal R_g): per-call work in U.

    cls (G_0,) class of each group, rep (U,) one group of each class, count (U,) groups per class,
    A (U, d0, d0) the shared A; K (U n_ab + 1, T): for each class and pair a <= b (n_ab = d0 (d0 + 1) / 2) the
    upper triangle (T = ds (ds + 1) / 2 entries) of the symmetric S_uab = sum_{g in u} (B_g[:, a] B_g[:, b]^T + its
    transpose if a < b), so that K = sum_u sum_{a<=b} R_u[a, b] S_uab, and last the upper triangle of S_DD (so that
    M = S_DD / s2 - K / s2^2 is one matrix-vector product); tri (ds, ds) int32: position in that upper
    triangle of every entry (i, j) of the full matrix (a gather rebuilds it),
    and for the one-level path (else None) the right-hand-side constants in coefficient form over the k0 = p + 1
    columns C_g = [sum Z_0^T X, sum Z_0^T r0] of each group: PM (U d0 d0, ds k0 + k0 k0) = [P | M], with row
    (u, a, b) of P (ds k0) = sum_{g in u} B_g[:, a] C_g[b] and of M (k0 k0) = sum_{g in u} C_g[a]^T C_g[b].
    Flattened so that their contraction with R (U, d0, d0) is one matrix-vector product."""

    cls: jax.Array
    rep: jax.Array
    count: jax.Array
    A: jax.Array
    K: jax.Array
    PM: Optional[jax.Array]
    tri: Optional[jax.Array] = None


@dataclass(frozen=True, eq=False)
class ClassSpec:
    """One random-effect class (term).

    name: label; Z: (N, d) per-observation columns; codes: (N,) ints in
    [0, n_groups); n_groups: number of groups (unobserved groups allowed).
    """

    name: str
    Z: np.ndarray
    codes: np.ndarray
    n_groups: int


class MarginalTooLarge(ValueError):
    """The dense Schur block of the requested marginalization exceeds ``dense_limit``."""


def _total_memory() -> float:
    """Physical memory in bytes (8 GiB if unknown)."""
    try:
        import os
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8.0 * 2**30


def default_dense_limit(itemsize: int = 8) -> int:
    """The largest dense block whose work arrays fit in DENSE_MEMORY_FRACTION of the memory (about 11,000 in
    float64 on a 24 GiB machine)."""
    return int((DENSE_MEMORY_FRACTION * _total_memory() / (DENSE_WORK_COPIES * itemsize)) ** 0.5)


def dense_seconds(n: int) -> float:
    """Measured seconds of one Cholesky factorization and inverse of an (n, n) matrix on this machine (what one
    value-and-gradient needs for the dense block), from an 800 x 800 one scaled by n^3 (calibrated: 16 s measured
    per ML evaluation at n = 5000 on a 2-core CPU, benchmarks/results/large_crossed.md)."""
    import time
    m = 800
    A = np.random.default_rng(0).standard_normal((m, m))
    A = A @ A.T + m * np.eye(m)
    t0 = time.perf_counter()
    L = np.linalg.cholesky(A)
    np.linalg.inv(L)
    return (time.perf_counter() - t0) * (n / m) ** 3


# --------------------------------------------------------------------------- pytree


@dataclass(frozen=True, eq=False)
class Plan:
    """Static plan for the kernels in :mod:`lmmarg.marginal.kernels` (a JAX pytree).

    Array leaves (N obs, p fixed effects, D = sum of unit dims, K chain levels,
    m = per-cell dense dims):
      X (N, p), y (N,), Zt (N, D) unit columns, cell (N,) int,
      S_zz (n_cells, D, D), S_zr (n_cells, D), S_zX (n_cells, D, p),
      XtX (p, p), Xtr (p,), rr (), beta0 (p,)   -- statistics of r0 = y - X beta0,
      cell_node: K arrays (n_cells,) node of each cell at chain level j,
      parent: K-1 arrays (G_j,) node at level j+1 of each level-j node,
      pairs: K entries, None or (pa, pb, idx_a, idx_b): same-node cell pairs and their dense positions
        (idx_a = dense_idx[pa], precomputed so no constant gather is folded at compile time),
      dense_idx (n_cells, m) positions of each cell in the dense block,
      S_DD (ds, ds), bilinear: constant structure of the level-1 dense fill for scalar sigma (``_bilinear_fill``:
        sorted coefficient lists, or the dense (ds, G_0, d_0) matrix B for small blocks),
      level1: one chain level + dense block only: (A0 (G_0, d_0, d_0) group sums of Z_0^T Z_0, and the level-1
        fill matrix B (ds, G_0 d_0) as entries rows, cols, vals (nnz,)),
      level1_rhs: (a_r (G_0, d_0), a_X (G_0, d_0, p), x_r (ds,), x_X (ds, p)) group / dense sums of Z^T r0, Z^T X.
    Static: everything else; among it unit_src: per unit the positions in ``marginalized`` of the terms it
    stacks (terms on one grouping factor share a unit, Lambda_u = blockdiag of theirs), (BETA,) for the fixed
    effects; term_dims: d of each marginalized term.
    """

    # --- array leaves
    X: jax.Array
    y: jax.Array
    Zt: jax.Array
    cell: jax.Array
    S_zz: jax.Array
    S_zr: jax.Array
    S_zX: jax.Array
    XtX: jax.Array
    Xtr: jax.Array
    rr: jax.Array
    beta0: jax.Array
    cell_node: tuple
    parent: tuple
    pairs: tuple
    dense_idx: jax.Array
    S_DD: Optional[jax.Array] = None
    bilinear: Optional[tuple] = None
    level1: Optional[tuple] = None
    level1_rhs: Optional[tuple] = None
    # --- static
    marginalized: tuple = field(default=())
    chain: tuple = field(default=())
    dense: tuple = field(default=())
    beta_block: Optional[str] = None
    class_names: tuple = ()
    unit_names: tuple = ()
    unit_dims: tuple = ()
    unit_groups: tuple = ()
    unit_src: tuple = ()
    term_dims: tuple = ()
    n_chain_units: int = 0
    dense_offsets: tuple = ()
    dense_size: int = 0
    n_cells: int = 0
    n_obs: int = 0
    n_fixed: int = 0
    fills: tuple = ()
    dense_limit: int = 4000
    dtype_name: str = "float64"
    n_targets: int = 0
    dense_form: str = "scaled"

    @property
    def marginalize_beta(self) -> bool:
        return self.beta_block is not None

    def with_dense_form(self, form: str) -> "Plan":
        """This plan (the same device arrays) with the density kernels' dense form set (``DENSE_FORMS``).

        "precision" needs a nonsingular Lambda for every dense class: log_marginal then returns -inf where one is
        singular (a zero SD), so ML fits, which may stop on that boundary, keep "scaled". Recovery and
        conditional means always use the scaled form."""
        if form not in DENSE_FORMS:
            raise ValueError(f"dense_form must be one of {DENSE_FORMS}, got {form!r}")
        return self if form == self.dense_form else dataclasses.replace(self, dense_form=form)

    @property
    def dtype(self):
        return jnp.dtype(self.dtype_name)

    @property
    def D(self) -> int:
        return int(sum(self.unit_dims))

    @property
    def chain_dim(self) -> int:
        return int(sum(self.unit_dims[: self.n_chain_units]))

    @property
    def m(self) -> int:
        return self.D - self.chain_dim

    def describe(self) -> str:
        """Human-readable summary of the elimination plan."""
        lines = [
            f"Marginal plan: N={self.n_obs}, p={self.n_fixed}, cells={self.n_cells}, "
            f"dtype={self.dtype_name}",
        ]
        if self.D == 0:
            lines.append("  nothing marginalized (plain Gaussian likelihood)")
            return "\n".join(lines)
        K = self.n_chain_units
        for j in range(K):
            fill = self.fills[j]
            if j == 0 and self.bilinear is not None:
                kind = {DenseProductFill: "dense products", PairListFill: "coefficient lists",
                        PooledFill: "pooled classes of equal group statistics"}[type(self.bilinear)]
                if isinstance(self.bilinear, PooledFill):
                    kind += f" ({self.bilinear.rep.shape[0]} classes)"
                fill = (f"constant structure, {kind} (scalar sigma"
                        + ("; one-level constants)" if self.level1 is not None else ")")
                        + (f", {fill} otherwise" if fill != "none" else ""))
            lines.append(
                f"  chain level {j + 1}: {self.unit_names[j]!r} "
                f"({self.unit_groups[j]} groups x d={self.unit_dims[j]}), fill={fill}"
            )
        if self.dense_size:
            parts = [
                f"{self.unit_names[u]!r} ({self.unit_groups[u]} x {self.unit_dims[u]})"
                for u in range(K, len(self.unit_dims))
            ]
            lines.append(f"  dense block: size {self.dense_size} = " + " + ".join(parts)
                         + (", precision form" if self.dense_form == "precision" and self.level1 is not None else ""))
        else:
            lines.append("  dense block: none")
        return "\n".join(lines)


_DATA_FIELDS = [
    "X", "y", "Zt", "cell", "S_zz", "S_zr", "S_zX", "XtX", "Xtr", "rr", "beta0",
    "cell_node", "parent", "pairs", "dense_idx", "S_DD", "bilinear", "level1", "level1_rhs",
]
_META_FIELDS = [
    "marginalized", "chain", "dense", "beta_block", "class_names", "unit_names",
    "unit_dims", "unit_groups", "unit_src", "term_dims", "n_chain_units", "dense_offsets",
    "dense_size", "n_cells", "n_obs", "n_fixed", "fills", "dense_limit", "dtype_name", "n_targets", "dense_form",
]
jax.tree_util.register_dataclass(Plan, data_fields=_DATA_FIELDS, meta_fields=_META_FIELDS)


# --------------------------------------------------------------------------- structure


def _class_Z(c: ClassSpec, N: int) -> np.ndarray:
    Z = np.asarray(c.Z, dtype=np.float64)
    if Z.ndim == 1:
        Z = Z[:, None]
    if Z.ndim != 2 or Z.shape[0] != N:
        raise ValueError(f"class {c.name!r}: Z must be (N={N}, d), got {Z.shape}")
    return Z


def _class_codes(c: ClassSpec, N: int) -> np.ndarray:
    codes = np.asarray(c.codes).reshape(-1)
    if codes.shape[0] != N:
        raise ValueError(f"class {c.name!r}: codes must have length N={N}")
    if not np.issubdtype(codes.dtype, np.integer):
        if not np.all(np.equal(np.mod(codes, 1), 0)):
            raise ValueError(f"class {c.name!r}: codes must be integers")
    codes = codes.astype(np.int64)
    if N and (codes.min() < 0 or codes.max() >= int(c.n_groups)):
        raise ValueError(f"class {c.name!r}: codes must lie in [0, {c.n_groups})")
    return codes


def _dim(c: ClassSpec) -> int:
    Z = np.asarray(c.Z)
    return 1 if Z.ndim == 1 else int(Z.shape[1])


def _merge_same_grouping(classes, marg, N: int):
    """Merge the marginalized classes with identical group codes into one class each.

    Returns (merged ClassSpecs with Z (N, sum of d) and validated codes, members: per merged class the original
    class indices, in ``marg`` order). Checked here: every class's Z and codes (errors name the class)."""
    merged, members = [], []
    for i in marg:
        c = classes[i]
        Z, codes = _class_Z(c, N), _class_codes(c, N)
        for k, m in enumerate(merged):
            if m.n_groups == int(c.n_groups) and np.array_equal(m.codes, codes):
                merged[k] = ClassSpec(f"{m.name}+{c.name}", np.concatenate([m.Z, Z], axis=1), m.codes, m.n_groups)
                members[k].append(i)
                break
        else:
            merged.append(ClassSpec(c.name, Z, codes, int(c.n_groups)))
            members.append([i])
    return merged, members


def _partition(classes: Sequence[ClassSpec], subset: Sequence[int], nested=None):
    """Split ``subset`` (class indices) into (chain finest-first, dense in given order)."""
    subset = list(subset)
    if not subset:
        return [], []

    def is_nested(a, b):
        if nested is not None:
            return nested[a][b]
        ca, cb = np.asarray(classes[a].codes).reshape(-1), np.asarray(classes[b].codes).reshape(-1)
        return nested_codes(ca, cb)

    def key(i):
        c = classes[i]
        return (-int(c.n_groups), -int(c.n_groups) * _dim(c), subset.index(i))

    order = sorted(subset, key=key)
    chain = [order[0]]
    for c in order[1:]:
        if all(is_nested(a, c) for a in chain):
            chain.append(c)
    dense = [i for i in subset if i not in chain]
    return chain, dense


def _dense_size(classes, dense) -> int:
    return int(sum(int(classes[i].n_groups) * _dim(classes[i]) for i in dense))


def _nested_matrix(classes):
    n = len(classes)
    codes = [np.asarray(c.codes).reshape(-1).astype(np.int64) for c in classes]
    return [[(a == b) or nested_codes(codes[a], codes[b]) for b in range(n)]
            for a in range(n)]


def auto_marginalize(classes: Sequence[ClassSpec], dense_limit: int = 4000) -> list:
    """Largest set of class indices whose dense Schur block has size <= ``dense_limit``.

    Ties (same number of classes) are broken by the larger number of marginalized
    random-effect coefficients, then by the smaller dense block.  Exhaustive for
    up to 12 classes, greedy removal beyond.  Returns sorted indices.
    """
    n = len(classes)
    if n == 0:
        return []
    nested = _nested_matrix(classes)

    def score(sub):
        chain, dense = _partition(classes, sub, nested)
        ds = _dense_size(classes, dense)
        total = sum(int(classes[i].n_groups) * _dim(classes[i]) for i in sub)
        return ds, total

    if n <= 12:
        for size in range(n, 0, -1):
            best, best_key = None, None
            for sub in itertools.combinations(range(n), size):
                ds, total = score(sub)
                if ds <= dense_limit and (best_key is None or (-total, ds) < best_key):
                    best, best_key = list(sub), (-total, ds)
            if best is not None:
                return best
        return []
    sub = list(range(n))
    while sub:
        ds, _ = score(sub)
        if ds <= dense_limit:
            return sub
        _, dense = _partition(classes, sub, nested)
        worst = max(dense, key=lambda i: int(classes[i].n_groups) * _dim(classes[i]))
        sub.remove(worst)
    return []


def _too_large_message(classes, marg, chain, dense, ds, dense_limit, p_beta=0):
    def desc(i):
        c = classes[i]
        return f"{c.name!r} ({c.n_groups} groups x d={_dim(c)} = {c.n_groups * _dim(c)})"

    sub = [classes[i] for i in marg]
    keep = [marg[i] for i in auto_marginalize(sub, dense_limit - p_beta)]
    leave = [i for i in marg if i not in keep]
    msg = (
        f"Marginalizing these classes needs a dense Schur block of size {ds} > "
        f"dense_limit={dense_limit}. Block-diagonal chain: "
        + (", ".join(desc(i) for i in chain) or "none")
        + ". Dense block: " + ", ".join(desc(i) for i in dense)
        + (f", beta ({p_beta} coefficients)" if p_beta else "") + ". "
    )
    if leave:
        msg += (
            "Suggestion: leave " + ", ".join(repr(classes[i].name) for i in leave)
            + f" to HMC (marginalize={[classes[i].name for i in sorted(keep)]}; for a term with many "
            "observations per level also parameterization={" + ", ".join(f"{classes[i].name!r}: 'conditional'"
                                                                       for i in leave)
            + "}, which samples its effects as offsets from their conditional mean given the other parameters), "
            "or raise the limit with Model(..., dense_limit=...) if memory allows (each evaluation then "
            "factorizes the dense block)."
        )
    else:
        msg += "Pass Model(..., dense_limit=...) or marginalize fewer classes."
    return msg


# --------------------------------------------------------------------------- statistics


_BINCOUNT_MAX_COLUMNS = 16   # up to this many columns one weighted bincount each beats building a sparse indicator


def _aggregate(cell: np.ndarray, n_cells: int, cols: np.ndarray, chunk: int = 1 << 22) -> np.ndarray:
    """Sum rows of ``cols`` (N, k) by cell -> (n_cells, k): one weighted bincount per column for few columns, else
    one sparse indicator product chunked over k."""
    N, k = cols.shape
    if k <= _BINCOUNT_MAX_COLUMNS:
        out = np.empty((n_cells, k))
        for j in range(k):
            out[:, j] = np.bincount(cell, weights=cols[:, j], minlength=n_cells)
        return out
    ind = sp.csr_matrix((np.ones(N), (cell, np.arange(N))), shape=(n_cells, N))
    out = np.empty((n_cells, k))
    step = max(1, chunk // max(N, 1))
    for s in range(0, k, step):
        out[:, s : s + step] = ind @ cols[:, s : s + step]
    return out


def _centre_beta(X, y) -> np.ndarray:
    """An OLS beta0 (p,) to centre the statistics around: from the normal equations when X^T X is well
    conditioned (one pass, no (N, p) SVD), else least squares. Any beta0 gives exact statistics; a good one only
    keeps r0 = y - X beta0 small (no cancellation in r0^T r0)."""
    XtX, Xty = X.T @ X, X.T @ y
    if np.linalg.cond(XtX) < 1e8:
        return np.linalg.solve(XtX, Xty)
    return np.linalg.lstsq(X, y, rcond=None)[0]


def _cell_statistics(cell: np.ndarray, n_cells: int, Zt, X, r0):
    """S_zz (n_cells, D, D), S_zr (n_cells, D), S_zX (n_cells, D, p): cell sums of Zt_i Zt_i^T, Zt_i r0_i, Zt_i X_i^T.

    One weighted np.bincount per distinct product of columns (a sequential pass over N rows into n_cells
    accumulators: no sort, no gather, no index structure); S_zz sums the upper triangle and mirrors it. Columns of
    ones (intercepts, in Z and in X) are recognized once, so that a product with one is the other column and equal
    products are summed once (y ~ x + (1 | a) + (1 | b): 3 passes instead of 9)."""
    D, p = Zt.shape[1], X.shape[1]
    cols = {("z", a): np.ascontiguousarray(Zt[:, a]) for a in range(D)}
    cols.update({("x", j): np.ascontiguousarray(X[:, j]) for j in range(p)})
    cols["r"] = np.asarray(r0)
    ones = {k for k, v in cols.items() if k != "r" and np.all(v == 1.0)}
    memo = {}

    def sums(u, v):
        key = tuple(sorted((k for k in (u, v) if k not in ones), key=str))
        if key not in memo:
            w = None if not key else cols[key[0]] if len(key) == 1 else cols[key[0]] * cols[key[1]]
            memo[key] = np.bincount(cell, weights=w, minlength=n_cells).astype(np.float64)
        return memo[key]

    S_zz = np.zeros((n_cells, D, D))
    for a in range(D):
        for b in range(a, D):
            S_zz[:, a, b] = S_zz[:, b, a] = sums(("z", a), ("z", b))
    S_zr = np.zeros((n_cells, D))
    S_zX = np.zeros((n_cells, D, p))
    for a in range(D):
        S_zr[:, a] = sums(("z", a), "r")
        for j in range(p):
            S_zX[:, a, j] = sums(("z", a), ("x", j))
    return S_zz, S_zr, S_zX


def _same_node_pairs(node: np.ndarray, G: int):
    """All ordered pairs (a, b) of cells sharing a node -> two (n_pairs,) arrays."""
    order = np.argsort(node, kind="stable")
    counts = np.bincount(node, minlength=G)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    ns = node[order]
    rep = counts[ns]
    pa = np.repeat(order, rep)
    t = np.arange(rep.sum()) - np.repeat(np.cumsum(rep) - rep, rep)
    pb = order[np.repeat(starts[ns], rep) + t]
    return pa, pb


def _choose_fill(n_pairs: int, n_nodes: int, d: int, m: int, dense_size: int, n_cells: int) -> str:
    """Pick the dense fill-in algorithm of one chain level by estimated cost."""
    cost_pairs = n_pairs * m * m * (d + 6)
    cost_mtm = n_nodes * d * dense_size * dense_size + n_cells * d * m * 6
    if n_nodes * d * dense_size > 1.5e8:  # M would not fit comfortably
        return "pairs"
    return "pairs" if cost_pairs < cost_mtm else "mtm"


def _level1_B(S_zz, node, dense_idx, d0: int, Dc: int, G0: int, ds: int):
    """The level-1 coupling B (ds, G_0 d_0) as a CSC matrix: B[idx_k b, (g, a)] = sum over the cells k of group g
    of S_k[a, Dc + b]. Returns (B, its entries (rows, cols, vals) in column order)."""
    n_cells, m = dense_idx.shape
    shape = (n_cells, d0, m)  # entries (k, a, b): S_k[a, Dc + b] at row idx_k[b], column (node_k, a)
    vals = S_zz[:, :d0, Dc:].ravel()
    rows = np.broadcast_to(dense_idx[:, None, :], shape).ravel()
    cols = (np.broadcast_to(node[:, None, None] * d0, shape) + np.arange(d0)[None, :, None]).ravel()
    B = sp.csc_matrix((vals, (rows, cols)), shape=(ds, G0 * d0))
    B.sum_duplicates()
    B.eliminate_zeros()
    col = np.repeat(np.arange(G0 * d0), np.diff(B.indptr))
    return B, (B.indices.astype(np.int64), col, B.data)


def _pair_list_fill(B, d0: int, G0: int, ds: int) -> PairListFill:
    col = np.repeat(np.arange(G0 * d0), np.diff(B.indptr))
    g = col // d0
    ea, eb = _same_node_pairs(g, G0)  # entry pairs sharing a group
    t, v, a = B.indices.astype(np.int64), B.data, col % d0
    keep = t[ea] <= t[eb]
    ea, eb = ea[keep], eb[keep]
    coef = v[ea] * v[eb]
    rid = g[ea] * d0 * d0 + a[ea] * d0 + a[eb]
    target = t[ea] * ds + t[eb]
    order = np.argsort(target, kind="stable")
    coef, rid, target = coef[order], rid[order], target[order]
    new = np.ones(target.size, bool)
    new[1:] = target[1:] != target[:-1]
    seg = np.cumsum(new) - 1
    targets = target[new]
    ti, tj = targets // ds, targets % ds
    targets_t = np.where(ti == tj, ds * ds, tj * ds + ti)
    return PairListFill(coef, rid, seg, targets, targets_t)


def _pool_groups(A0: np.ndarray):
    """Classes of level-1 groups with identical A_g (G_0, d0, d0) -> (cls (G_0,), rep (U,), count (U,))."""
    G0 = A0.shape[0]
    _, rep, cls, count = np.unique(A0.reshape(G0, -1), axis=0, return_index=True, return_inverse=True,
                                   return_counts=True)
    return np.asarray(cls).reshape(-1), rep, count


def _class_grams(B, Bcols, Bblk, cls, count, d0: int, G0: int, ds: int,
                 blas_max_classes: int = POOLED_BLAS_MAX_CLASSES) -> np.ndarray:
    """K (U, d0, d0, ds, ds): K[u, a, b] = sum over the groups g of class u of B[:, (g, a)] B[:, (g, b)]^T.

    When B is small enough to hold dense (DENSE_B_MAX_ENTRIES) and the classes are few (blas_max_classes),
    one BLAS product per class and column pair (the groups of a class side by side): ~ds^2 G_0 d0^2 multiply-adds
    at BLAS speed. Otherwise sparse products (Bblk @ Bcols^T), whose cost grows with the squared entries per group
    (at 2e6 rows, 10,000 x 100 groups: 0.11 s against 0.01 s dense)."""
    U = count.size
    K = np.empty((U, d0, d0, ds, ds))
    if ds * G0 * d0 <= DENSE_B_MAX_ENTRIES and U <= blas_max_classes:
        Bd = B.toarray().reshape(ds, G0, d0)
        order = np.argsort(cls, kind="stable")
        ends = np.cumsum(count.astype(np.int64))
        for u in range(U):
            Bu = Bd[:, order[ends[u] - count[u]:ends[u]], :]                       # (ds, n_u, d0)
            for a in range(d0):
                for b in range(d0):
                    K[u, a, b] = Bu[:, :, a] @ Bu[:, :, b].T
        return K
    for a in range(d0):
        for b in range(d0):
            K[:, a, b] = (Bblk[a] @ Bcols[b].T.tocsc()).toarray().reshape(U, ds, ds)
    return K


def _pooled_fill(B, A0, cls, rep, count, d0: int, G0: int, ds: int, C, S_DD) -> PooledFill:
    """Constants of PooledFill; C (G_0, d0, k0) group right-hand-side columns or None (no one-level path);
    S_DD (ds, ds) the dense block's own statistics (the last row of K)."""
    U = rep.size
    Ind = sp.csr_matrix((np.ones(G0), (cls, np.arange(G0))), shape=(U, G0))
    Bcols = [B[:, np.arange(G0) * d0 + a].tocoo() for a in range(d0)]            # (ds, G_0) per column a
    Bblk = [sp.csr_matrix((Ba.data, (cls[Ba.col] * ds + Ba.row, Ba.col)), shape=(U * ds, G0)) for Ba in Bcols]
    K = _class_grams(B, Bcols, Bblk, cls, count, d0, G0, ds)
    P = M = None
    if C is not None:
        k0 = C.shape[2]
        P = np.empty((U, d0, d0, ds, k0))
        M = np.empty((U, d0, d0, k0, k0))
        for a in range(d0):
            for b in range(d0):
                P[:, a, b] = np.asarray(Bblk[a] @ C[:, b, :]).reshape(U, ds, k0)
                M[:, a, b] = (Ind @ (C[:, a, :, None] * C[:, b, None, :]).reshape(G0, k0 * k0)).reshape(U, k0, k0)
    PM = None if C is None else np.concatenate([P.reshape(U * d0 * d0, -1), M.reshape(U * d0 * d0, -1)], axis=1)
    # symmetric storage of K: pairs a <= b, upper triangles only (half to a quarter of the constants to stream)
    iu, ju = np.triu_indices(ds)
    ab = [(a, b) for a in range(d0) for b in range(a, d0)]
    Ktri = np.stack([(K[:, a, b] + (np.swapaxes(K[:, a, b], 1, 2) if a != b else 0.0))[:, iu, ju]
                     for a, b in ab], axis=1).reshape(U * len(ab), iu.size)
    Ktri = np.concatenate([Ktri, S_DD[iu, ju][None, :]], axis=0)
    tri = np.empty((ds, ds), np.int64)
    tri[iu, ju] = np.arange(iu.size)
    tri[ju, iu] = np.arange(iu.size)
    return PooledFill(cls, rep, count.astype(np.float64), A0[rep], Ktri, PM, tri)


def _level1_fill(B, A0, d0: int, G0: int, ds: int, choice: str = "auto", C=None, S_DD=None):
    """The level-1 fill strategy for scalar sigma, chosen here and only here (docs/math.md, section 5).

    With H_k = S_k / sigma^2 the fill is  Lambda_D^T K Lambda_D / sigma^4  where K = B blockdiag(R_g) B^T and
    R_g = Lambda_0 (I + Lambda_0^T A_g Lambda_0 / sigma^2)^{-1} Lambda_0^T depends on the group only through A_g.
    Per-call cost in dense multiply-adds:
      dense products   ds G_0 d0 (d0 + ds)                      (ds G_0 d0 <= DENSE_B_MAX_ENTRIES)
      pair lists       PAIR_ENTRY_COST x (entry pairs sharing a group) / 2   (<= PAIR_MAX_ENTRIES)
      pooled classes   POOLED_ENTRY_COST x U d0^2 ds (ds + k0)  for U distinct A_g  (<= POOLED_MAX_ENTRIES)
    The pooled strategy is the one whose cost is set by the groups alone (never by N or the number of cells).
    choice: "auto" (cheapest), or force "dense" / "pairs" / "pooled". C: (G_0, d0, k0) one-level right-hand-side
    columns (pooled only). S_DD (ds, ds): the dense block's own statistics (pooled only: part of its K).
    Returns None if no strategy fits in memory.
    """
    if choice not in LEVEL1_FILLS:
        raise ValueError(f"level1_fill must be one of {LEVEL1_FILLS}, got {choice!r}")
    col = np.repeat(np.arange(G0 * d0), np.diff(B.indptr))
    counts = np.bincount(col // d0, minlength=G0).astype(np.int64)
    n_half = int((counts**2).sum()) / 2
    cls, rep, count = _pool_groups(A0)
    U, k0 = rep.size, (0 if C is None else C.shape[2])
    pooled_entries = U * (d0 * (d0 + 1) // 2 * ds * (ds + 1) // 2 + d0 * d0 * ds * k0)
    costs = {
        "dense": ds * G0 * d0 * (d0 + ds) if ds * G0 * d0 <= DENSE_B_MAX_ENTRIES else np.inf,
        "pairs": PAIR_ENTRY_COST * n_half if n_half <= PAIR_MAX_ENTRIES else np.inf,
        "pooled": POOLED_ENTRY_COST * pooled_entries if pooled_entries <= POOLED_MAX_ENTRIES else np.inf,
    }
    if choice == "auto":
        choice = min(costs, key=costs.get)
        if not np.isfinite(costs[choice]):
            return None
    if choice == "dense":
        return DenseProductFill(np.ascontiguousarray(B.toarray().reshape(ds, G0, d0).transpose(0, 2, 1)))
    if choice == "pairs":
        return _pair_list_fill(B, d0, G0, ds)
    return _pooled_fill(B, A0, cls, rep, count, d0, G0, ds, C, S_DD)


def _level1_stats(S_zz, S_zr, S_zX, node, dense_idx, d0: int, G0: int, ds: int, Bmat):
    """Constants of the one-level path (Plan.level1, Plan.level1_rhs)."""
    n_cells, m = dense_idx.shape
    p = S_zX.shape[2]
    A0 = _aggregate(node, G0, S_zz[:, :d0, :d0].reshape(n_cells, -1)).reshape(G0, d0, d0)
    a_r = _aggregate(node, G0, S_zr[:, :d0])
    a_X = _aggregate(node, G0, S_zX[:, :d0, :].reshape(n_cells, -1)).reshape(G0, d0, p)
    pos = dense_idx.ravel()
    x_r = _aggregate(pos, ds, S_zr[:, d0:].reshape(-1, 1))[:, 0]
    x_X = _aggregate(pos, ds, S_zX[:, d0:, :].reshape(n_cells * m, p))
    return (A0, *Bmat), (a_r, a_X, x_r, x_X)


def _dense_stats(S_zz, dense_idx, Dc: int, ds: int) -> np.ndarray:
    """Sum_k S_k[D, D] placed at (idx_k, idx_k): (ds, ds), constant."""
    out = np.zeros((ds, ds))
    np.add.at(out, (dense_idx[:, :, None], dense_idx[:, None, :]), S_zz[:, Dc:, Dc:])
    return out


def _put_fill(fill, f, i32):
    """Device copy of a level-1 fill (float arrays in the plan dtype, index arrays int32)."""
    if fill is None:
        return None
    if isinstance(fill, DenseProductFill):
        return DenseProductFill(f(fill.Bc))
    if isinstance(fill, PairListFill):
        return PairListFill(f(fill.coef), *(i32(a) for a in fill[1:]))
    return PooledFill(i32(fill.cls), i32(fill.rep), f(fill.count), f(fill.A), f(fill.K),
                      None if fill.PM is None else f(fill.PM), i32(fill.tri))


# --------------------------------------------------------------------------- build


def build_plan(
    X,
    y,
    classes: list,
    marginalize: list,
    *,
    marginalize_beta: bool = False,
    dense_limit: int | None = None,
    scalar_sigma: bool = False,
    level1_fill: str = "auto",
    chain_fill: str = "auto",
    beta_block: str = "auto",
    dtype=jnp.float64,
) -> Plan:
    """Build the static plan.

    X (N, p), y (N,), classes: list of ClassSpec, marginalize: indices of the
    classes integrated out (their order fixes the order of ``scales`` in the
    kernels).  With ``marginalize_beta`` beta is integrated out too (prior given
    per call).  With ``scalar_sigma`` the plan serves scalar sigma only (it skips the level-1 cell-pair table that
    a per-observation sigma needs).  ``level1_fill`` selects the scalar-sigma level-1 fill strategy ("auto": by the
    cost model of ``_level1_fill``; "dense", "pairs", "pooled" force one, for tests and benchmarks).
    ``chain_fill`` selects the per-cell fill of every chain level used with a per-observation sigma ("auto": by
    ``_choose_fill``'s cost model; "pairs" or "mtm" force one).
    ``beta_block`` (with ``marginalize_beta``) places beta in the elimination: "unit" as one more one-group unit
    (in the dense block when there is one, else the chain's root: any sigma, offsets allowed), "last" eliminated
    after every random effect by a p x p Schur complement of the k = p + 1 Gram of the engine primitive (scalar
    sigma, every class marginalized, no offset: the random-effect elimination stays that of the plan without
    beta), "auto" = "last" where it applies (scalar_sigma, every class marginalized), else "unit".
    Raises MarginalTooLarge if the dense block exceeds ``dense_limit`` (default: ``default_dense_limit``, set by
    the machine's memory).
    """
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if X.ndim == 1:
        X = X[:, None]
    N, p = X.shape
    if y.shape[0] != N:
        raise ValueError(f"X has {N} rows but y has {y.shape[0]}")
    classes = list(classes)
    marg = tuple(int(i) for i in marginalize)
    if len(set(marg)) != len(marg) or any(i < 0 or i >= len(classes) for i in marg):
        raise ValueError(f"marginalize must be distinct indices into classes, got {marginalize}")
    if marginalize_beta and p == 0:
        marginalize_beta = False
    dt = jax.dtypes.canonicalize_dtype(dtype)
    names = tuple(c.name for c in classes)
    if chain_fill not in CHAIN_FILLS:
        raise ValueError(f"chain_fill must be one of {CHAIN_FILLS}, got {chain_fill!r}")

    # terms on the same grouping factor (the `||` terms of one bar, `(1 | g) + (0 + x | g)`) form one class
    # with block-diagonal Lambda: one elimination unit instead of a chain of copies (docs/math.md, section 3)
    merged, members = _merge_same_grouping(classes, marg, N)
    chain_m, dense_m = _partition(merged, range(len(merged)))
    chain = [i for k in chain_m for i in members[k]]
    dense = [i for k in dense_m for i in members[k]]
    ds = _dense_size(classes, dense)
    if beta_block not in BETA_BLOCKS:
        raise ValueError(f"beta_block must be one of {BETA_BLOCKS}, got {beta_block!r}")
    last_ok = scalar_sigma and len(marg) == len(classes) and len(marg) > 0
    if beta_block == "last" and marginalize_beta and not last_ok:
        raise ValueError("beta_block='last' needs scalar_sigma=True and every class marginalized")
    placement = None   # where beta is eliminated (Plan.beta_block): "last", "dense", "chain"; None if sampled
    if marginalize_beta:
        if beta_block == "last" or (beta_block == "auto" and last_ok):
            placement = "last"
        else:
            placement = "dense" if dense else "chain"
            if dense:
                ds += p
    if dense_limit is None:
        dense_limit = default_dense_limit(jnp.dtype(dtype).itemsize)
    if ds > dense_limit:
        p_beta = p if placement == "dense" else 0
        raise MarginalTooLarge(_too_large_message(classes, marg, chain, dense, ds, dense_limit, p_beta))

    # ---- units: chain (finest first) then dense; beta as a one-group class
    units = []  # (name, Z (N,d), codes (N,), n_groups, src: marginalized positions of its terms)

    def add(k):
        c = merged[k]
        units.append((c.name, c.Z, c.codes, int(c.n_groups), tuple(marg.index(i) for i in members[k])))

    for k in chain_m:
        add(k)
    if placement == "chain":
        units.append(("beta", X, np.zeros(N, np.int64), 1, (BETA,)))
    K = len(units)
    for k in dense_m:
        add(k)
    if placement == "dense":
        units.append(("beta", X, np.zeros(N, np.int64), 1, (BETA,)))
    dims = tuple(u[1].shape[1] for u in units)
    groups = tuple(u[3] for u in units)

    # ---- cells
    if units:
        codes = np.stack([u[2] for u in units], axis=1)
        cell_codes, cell = unique_rows(codes, groups)
    else:
        cell_codes, cell = np.zeros((1, 0), np.int64), np.zeros(N, np.int64)
    if N == 0:
        cell_codes = np.zeros((1, len(units)), np.int64)
    n_cells = cell_codes.shape[0]
    Zt = np.concatenate([u[1] for u in units], axis=1) if units else np.zeros((N, 0))

    # ---- sufficient statistics around an OLS beta0 (reduces cancellation)
    beta0 = _centre_beta(X, y) if (p and N) else np.zeros(p)
    r0 = y - X @ beta0
    S_zz, S_zr, S_zX = _cell_statistics(cell, n_cells, Zt, X, r0)

    # ---- chain structure
    dense_offsets, off = [], 0
    for u in range(K, len(units)):
        dense_offsets.append(off)
        off += groups[u] * dims[u]
    assert off == ds
    cell_node, parent, pairs, fills = [], [], [], []
    m = int(sum(dims[K:]))
    for j in range(K):
        node = cell_codes[:, j].astype(np.int64)
        cell_node.append(node)
        if j + 1 < K:
            par = np.zeros(groups[j], np.int64)
            par[node] = cell_codes[:, j + 1]
            parent.append(par)
        if m:
            counts = np.bincount(node, minlength=groups[j])
            n_pairs = int((counts.astype(np.int64) ** 2).sum())
            fill = _choose_fill(n_pairs, groups[j], dims[j], m, ds, n_cells) if chain_fill == "auto" else chain_fill
        else:
            fill = "none"
        fills.append(fill)
    if m:
        dense_idx = np.concatenate(
            [
                dense_offsets[u - K] + cell_codes[:, u : u + 1] * dims[u] + np.arange(dims[u])[None, :]
                for u in range(K, len(units))
            ],
            axis=1,
        )
    else:
        dense_idx = np.zeros((n_cells, 0), np.int64)

    S_DD = bil = level1 = level1_rhs = None
    if m and K:
        Dc = int(sum(dims[:K]))
        S_DD = _dense_stats(S_zz, dense_idx, Dc, ds)
        d0, G0 = dims[0], groups[0]
        Bcsc, Bent = _level1_B(S_zz, cell_node[0], dense_idx, d0, Dc, G0, ds)
        C = None
        if K == 1:  # one chain level: the constants of the one-level path
            level1, level1_rhs = _level1_stats(S_zz, S_zr, S_zX, cell_node[0], dense_idx, d0, G0, ds, Bent)
            A0 = level1[0]
            C = np.concatenate([level1_rhs[1], level1_rhs[0][:, :, None]], axis=2)
        else:
            A0 = _aggregate(cell_node[0], G0, S_zz[:, :d0, :d0].reshape(n_cells, -1)).reshape(G0, d0, d0)
        bil = _level1_fill(Bcsc, A0, d0, G0, ds, level1_fill, C, S_DD)
        if bil is None:
            level1 = level1_rhs = None
    for j in range(K):  # level 1 with the constant-structure fill needs the pair table for a vector sigma only
        skip = fills[j] != "pairs" or (j == 0 and bil is not None and scalar_sigma)
        pairs.append(None if skip else _same_node_pairs(cell_node[j], groups[j]))
    npdt = np.dtype(jnp.dtype(dt).name)
    # cast on the host and device_put (jnp.asarray would compile a staging copy per shape)
    f = lambda a: jax.device_put(np.asarray(a, dtype=npdt))  # noqa: E731
    i32 = lambda a: jax.device_put(np.asarray(a, dtype=np.int32))  # noqa: E731
    return Plan(
        S_DD=None if S_DD is None else f(S_DD),
        bilinear=_put_fill(bil, f, i32),
        n_targets=int(bil.targets.size) if isinstance(bil, PairListFill) else 0,
        level1=None if level1 is None else (f(level1[0]), i32(level1[1]), i32(level1[2]), f(level1[3])),
        level1_rhs=None if level1_rhs is None else tuple(f(a) for a in level1_rhs),
        X=f(X), y=f(y), Zt=f(Zt), cell=i32(cell),
        S_zz=f(S_zz), S_zr=f(S_zr), S_zX=f(S_zX),
        XtX=f(X.T @ X), Xtr=f(X.T @ r0), rr=f(r0 @ r0), beta0=f(beta0),
        cell_node=tuple(i32(a) for a in cell_node),
        parent=tuple(i32(a) for a in parent),
        pairs=tuple(None if pr is None else (i32(pr[0]), i32(pr[1]), i32(dense_idx[pr[0]]), i32(dense_idx[pr[1]]))
                    for pr in pairs),
        dense_idx=i32(dense_idx),
        marginalized=marg,
        chain=tuple(chain),
        dense=tuple(dense),
        beta_block=placement,
        class_names=names,
        unit_names=tuple(u[0] for u in units),
        unit_dims=dims,
        unit_groups=groups,
        unit_src=tuple(u[4] for u in units),
        term_dims=tuple(_dim(classes[i]) for i in marg),
        n_chain_units=K,
        dense_offsets=tuple(dense_offsets),
        dense_size=int(ds),
        n_cells=int(n_cells),
        n_obs=int(N),
        n_fixed=int(p),
        fills=tuple(fills),
        dense_limit=int(dense_limit),
        dtype_name=jnp.dtype(dt).name,
    )
