"""Plan: the static, data-dependent part of the marginal likelihood (built once per data set, then a JAX pytree).

``build_plan`` is a short composition of plan-time steps, each in its own module:

1. :mod:`~lmmarg.marginal.structure`: the marginalized classes, merged per grouping factor, split into a *chain*
   of nested classes (eliminated block-diagonally, finest first) and a *dense* block (its Schur complement
   factorized densely, size ``dense_size``), laid out as *units* ``[chain units, dense units]``;
2. :mod:`~lmmarg.marginal.statistics`: *cells* (unique combinations of the units' groups) and the per-cell
   sufficient statistics, so that for scalar σ and no offset a kernel call never touches the N rows;
3. :mod:`~lmmarg.marginal.blocks`: the block strategies (level-1 fill, chain fills, dense form), chosen there by
   a documented cost model.

The plan is three typed records: ``structure`` (:class:`Structure`, static sizes and orders), ``stats``
(:class:`Statistics`, arrays) and ``blocks`` (:class:`Blocks`, the strategies and the one-level constants
:class:`OneLevel`). A few shortcuts (``plan.X``, ``plan.dtype``, ``plan.dense_size`` ...) read through to them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ..codes import unique_rows
from . import statistics as stats_mod
from .blocks import (BetaBlock, BetaPlacement, ChainChoice, DenseProductFill, Level1Choice, PairListFill, PooledFill,
                     PrecisionForm, ScaledForm, choose_chain_fill, choose_level1_fill, dense_form, option)
from .structure import (LARGE_DENSE, ClassSpec, MarginalTooLarge, auto_marginalize, default_dense_limit,
                        dense_seconds, dense_size, dim, merge_same_grouping, partition, too_large_message)

__all__ = ["ClassSpec", "Plan", "Structure", "Statistics", "Blocks", "OneLevel", "MarginalTooLarge", "build_plan",
           "CellSums", "plan_from_statistics",
           "auto_marginalize", "default_dense_limit", "dense_seconds", "LARGE_DENSE", "BETA",
           "DenseProductFill", "PairListFill", "PooledFill"]

BETA = -1  # unit source id of the fixed effects when they are marginalized


@dataclass(frozen=True)
class Structure:
    """Static sizes and orders of a plan (hashable: part of a compiled program's key).

    marginalized: class indices integrated out (their order fixes ``scales``); chain, dense: the classes in the
    chain (finest first) and the dense block; beta: where a marginalized β went (:class:`BetaPlacement`) or
    None; class_names; per unit (``[chain units, dense units]``): unit_names, unit_dims d_u, unit_groups G_u,
    unit_src (positions in ``marginalized`` of the terms it stacks, (BETA,) for β); term_dims: d of each
    marginalized term; n_chain_units K; dense_offsets (start of each dense unit in the dense layout);
    dense_size ds; n_cells; n_obs N; n_fixed p; dense_limit; dtype_name."""
    marginalized: tuple = ()
    chain: tuple = ()
    dense: tuple = ()
    beta: Optional[BetaPlacement] = None
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
    dense_limit: int = 4000
    dtype_name: str = "float64"

    @property
    def D(self) -> int:
        """Columns of all units."""
        return int(sum(self.unit_dims))

    @property
    def chain_dim(self) -> int:
        """Columns of the chain units (a cell's first chain_dim statistics)."""
        return int(sum(self.unit_dims[: self.n_chain_units]))

    @property
    def m(self) -> int:
        """Columns of the dense units per cell."""
        return self.D - self.chain_dim


@dataclass(frozen=True, eq=False)
class Statistics:
    """Array leaves of a plan (N obs, p fixed effects, D unit columns, K chain levels, m dense columns per cell).

    X (N, p), y (N,), Zt (N, D) unit columns, cell (N,) int; S_zz (n_cells, D, D), S_zr (n_cells, D), S_zX
    (n_cells, D, p), XtX (p, p), Xtr (p,), rr (), beta0 (p,): statistics of r0 = y − X β0; cell_node: K arrays
    (n_cells,) the node of each cell at chain level j; parent: K−1 arrays (G_j,) the level-(j+1) node of each
    level-j node; dense_idx (n_cells, m) positions of each cell in the dense block; S_DD (ds, ds) the dense
    block's own statistics (chain and dense block only, else None)."""
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
    dense_idx: jax.Array
    S_DD: Optional[jax.Array] = None


jax.tree_util.register_dataclass(Statistics, data_fields=[f.name for f in dataclasses.fields(Statistics)],
                                 meta_fields=[])


class OneLevel(NamedTuple):
    """Constants of the one-level path (one chain level + a dense block, scalar σ): A0 (G₀, d₀, d₀) group sums of
    Z₀ᵀZ₀; the level-1 coupling B (ds, G₀ d₀) as entries B_rows, B_cols, B_vals (nnz,); group / dense sums of
    Z ᵀr0 and ZᵀX: a_r (G₀, d₀), a_X (G₀, d₀, p), x_r (ds,), x_X (ds, p)."""
    A0: jax.Array
    B_rows: jax.Array
    B_cols: jax.Array
    B_vals: jax.Array
    a_r: jax.Array
    a_X: jax.Array
    x_r: jax.Array
    x_X: jax.Array


@dataclass(frozen=True, eq=False)
class Blocks:
    """The block strategies of a plan (:mod:`lmmarg.marginal.blocks`).

    chain_fills: per chain level, its fill for per-observation σ; level1: the constant-structure fill of the
    finest level for scalar σ (a chain and a dense block), or None; one_level: :class:`OneLevel` when the chain has
    one level, else None; dense_form (static): ScaledForm or PrecisionForm for the one-level dense block."""
    chain_fills: tuple = ()
    level1: object = None
    one_level: Optional[OneLevel] = None
    dense_form: object = ScaledForm()


jax.tree_util.register_dataclass(Blocks, data_fields=["chain_fills", "level1", "one_level"],
                                 meta_fields=["dense_form"])


@dataclass(frozen=True, eq=False)
class Plan:
    """Static plan for the engine (:mod:`lmmarg.marginal.kernels`), a JAX pytree: structure (static), stats and
    blocks (arrays). See the module docstring."""
    structure: Structure
    stats: Statistics
    blocks: Blocks

    # -- shortcuts used across the package
    @property
    def X(self):
        return self.stats.X

    @property
    def y(self):
        return self.stats.y

    @property
    def beta0(self):
        return self.stats.beta0

    @property
    def dtype(self):
        return jnp.dtype(self.structure.dtype_name)

    @property
    def dtype_name(self) -> str:
        return self.structure.dtype_name

    @property
    def n_obs(self) -> int:
        return self.structure.n_obs

    @property
    def n_fixed(self) -> int:
        return self.structure.n_fixed

    @property
    def n_cells(self) -> int:
        return self.structure.n_cells

    @property
    def dense_size(self) -> int:
        return self.structure.dense_size

    @property
    def marginalized(self) -> tuple:
        return self.structure.marginalized

    @property
    def chain(self) -> tuple:
        return self.structure.chain

    @property
    def dense(self) -> tuple:
        return self.structure.dense

    @property
    def unit_names(self) -> tuple:
        return self.structure.unit_names

    @property
    def unit_dims(self) -> tuple:
        return self.structure.unit_dims

    @property
    def n_chain_units(self) -> int:
        return self.structure.n_chain_units

    @property
    def beta_block(self) -> Optional[BetaPlacement]:
        """Where a marginalized β is eliminated (:class:`BetaPlacement`), None when β is sampled."""
        return self.structure.beta

    @property
    def marginalize_beta(self) -> bool:
        return self.structure.beta is not None

    @property
    def dense_form(self) -> str:
        """Name of the one-level dense form: "scaled" or "precision"."""
        return self.blocks.dense_form.name

    @property
    def fills(self) -> tuple:
        """Names of the chain levels' fills for per-observation σ ("pairs", "mtm", "none")."""
        return tuple(f.name for f in self.blocks.chain_fills)

    def with_dense_form(self, form) -> "Plan":
        """This plan (the same device arrays) with the one-level dense form set ("scaled" / "precision").

        "precision" needs a nonsingular Λ for every dense class: log_marginal then returns −inf where one is
        singular (a zero SD), so ML fits, which may stop on that boundary, keep "scaled". Recovery and conditional
        means always use the scaled form."""
        form = dense_form(form)
        if form == self.blocks.dense_form:
            return self
        return dataclasses.replace(self, blocks=dataclasses.replace(self.blocks, dense_form=form))

    def with_response(self, y) -> "Plan":
        """This plan with the response y (N,) replaced (the statistics of r0 are then stale: only the per-cell
        paths that read y, the weighted solves of the GLMM engine, may use it)."""
        return dataclasses.replace(self, stats=dataclasses.replace(self.stats, y=y))

    def describe(self) -> str:
        """Human-readable summary of the elimination plan."""
        st, bl = self.structure, self.blocks
        lines = [f"Marginal plan: N={st.n_obs}, p={st.n_fixed}, cells={st.n_cells}, dtype={st.dtype_name}"]
        if st.D == 0:
            lines.append("  nothing marginalized (plain Gaussian likelihood)")
            return "\n".join(lines)
        K = st.n_chain_units
        for j in range(K):
            fill = bl.chain_fills[j].name
            if j == 0 and bl.level1 is not None:
                fill = (f"constant structure, {bl.level1.label()} (scalar sigma"
                        + ("; one-level constants)" if bl.one_level is not None else ")")
                        + (f", {fill} otherwise" if fill != "none" else ""))
            lines.append(f"  chain level {j + 1}: {st.unit_names[j]!r} "
                         f"({st.unit_groups[j]} groups x d={st.unit_dims[j]}), fill={fill}")
        if st.dense_size:
            parts = [f"{st.unit_names[u]!r} ({st.unit_groups[u]} x {st.unit_dims[u]})"
                     for u in range(K, len(st.unit_dims))]
            lines.append(f"  dense block: size {st.dense_size} = " + " + ".join(parts)
                         + (", precision form" if isinstance(bl.dense_form, PrecisionForm) and bl.one_level is not None
                            else ""))
        else:
            lines.append("  dense block: none")
        return "\n".join(lines)


jax.tree_util.register_dataclass(Plan, data_fields=["stats", "blocks"], meta_fields=["structure"])


# --------------------------------------------------------------------------- build


class _Unit(NamedTuple):
    """One elimination unit at plan time: name, Z (N, d), codes (N,), n_groups, src (see Structure.unit_src)."""
    name: str
    Z: np.ndarray
    codes: np.ndarray
    n_groups: int
    src: tuple


def _check_inputs(X, y, classes, marginalize, marginalize_beta):
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if X.ndim == 1:
        X = X[:, None]
    if y.shape[0] != X.shape[0]:
        raise ValueError(f"X has {X.shape[0]} rows but y has {y.shape[0]}")
    marg = tuple(int(i) for i in marginalize)
    if len(set(marg)) != len(marg) or any(i < 0 or i >= len(classes) for i in marg):
        raise ValueError(f"marginalize must be distinct indices into classes, got {marginalize}")
    return X, y, marg, bool(marginalize_beta and X.shape[1] > 0)


def _beta_placement(beta_block, marginalize_beta: bool, last_ok: bool, has_dense: bool):
    """Where a marginalized β is eliminated (None when it is sampled)."""
    if beta_block is BetaBlock.LAST and marginalize_beta and not last_ok:
        raise ValueError("beta_block='last' needs scalar_sigma=True and every class marginalized")
    if not marginalize_beta:
        return None
    if beta_block is BetaBlock.LAST or (beta_block is BetaBlock.AUTO and last_ok):
        return BetaPlacement.LAST
    return BetaPlacement.DENSE if has_dense else BetaPlacement.CHAIN


def _units(merged, members, marg, chain_m, dense_m, placement, X) -> tuple[list, int]:
    """The elimination units [chain (finest first), dense], β as a one-group unit where placed; and K."""
    N = X.shape[0]

    def unit(k):
        c = merged[k]
        return _Unit(c.name, c.Z, c.codes, int(c.n_groups), tuple(marg.index(i) for i in members[k]))

    beta = _Unit("beta", X, np.zeros(N, np.int64), 1, (BETA,))
    units = [unit(k) for k in chain_m] + ([beta] if placement is BetaPlacement.CHAIN else [])
    K = len(units)
    units += [unit(k) for k in dense_m] + ([beta] if placement is BetaPlacement.DENSE else [])
    return units, K


def _cells(units, N: int):
    """(cell_codes (n_cells, n_units), cell (N,)): the unique combinations of the units' group codes."""
    if units:
        cell_codes, cell = unique_rows(np.stack([u.codes for u in units], axis=1), tuple(u.n_groups for u in units))
    else:
        cell_codes, cell = np.zeros((1, 0), np.int64), np.zeros(N, np.int64)
    if N == 0:
        cell_codes = np.zeros((1, len(units)), np.int64)
    return cell_codes, cell


def _chain_tree(cell_codes, units, K: int):
    """(cell_node: per chain level the node of each cell, parent: per level but the last the parent node)."""
    cell_node = [cell_codes[:, j].astype(np.int64) for j in range(K)]
    parent = []
    for j in range(K - 1):
        par = np.zeros(units[j].n_groups, np.int64)
        par[cell_node[j]] = cell_codes[:, j + 1]
        parent.append(par)
    return cell_node, parent


def _dense_layout(cell_codes, units, K: int):
    """(dense_offsets per dense unit, dense_idx (n_cells, m) positions of each cell's dense columns)."""
    dims = [u.Z.shape[1] for u in units]
    offsets, off = [], 0
    for u in range(K, len(units)):
        offsets.append(off)
        off += units[u].n_groups * dims[u]
    if K == len(units):
        return offsets, np.zeros((cell_codes.shape[0], 0), np.int64)
    idx = np.concatenate([offsets[u - K] + cell_codes[:, u:u + 1] * dims[u] + np.arange(dims[u])[None, :]
                          for u in range(K, len(units))], axis=1)
    return offsets, idx


def _level1_blocks(S_zz, S_zr, S_zX, cell_node, dense_idx, units, K, ds, level1_fill):
    """(S_DD, level-1 fill or None, OneLevel or None) for a chain and a dense block; (None, None, None) otherwise."""
    if not (K and dense_idx.shape[1]):
        return None, None, None
    dims = [u.Z.shape[1] for u in units]
    Dc, d0, G0, n_cells = int(sum(dims[:K])), dims[0], units[0].n_groups, S_zz.shape[0]
    S_DD = stats_mod.dense_stats(S_zz, dense_idx, Dc, ds)
    Bcsc, Bent = stats_mod.level1_B(S_zz, cell_node[0], dense_idx, d0, Dc, G0, ds)
    one = C = None
    if K == 1:  # one chain level: the constants of the one-level path
        (A0, *B), rhs = stats_mod.level1_stats(S_zz, S_zr, S_zX, cell_node[0], dense_idx, d0, G0, ds, Bent)
        one = OneLevel(A0, *B, *rhs)
        C = np.concatenate([one.a_X, one.a_r[:, :, None]], axis=2)
    else:
        A0 = stats_mod.aggregate(cell_node[0], G0, S_zz[:, :d0, :d0].reshape(n_cells, -1)).reshape(G0, d0, d0)
    fill = choose_level1_fill(Bcsc, A0, d0, G0, ds, level1_fill, C, S_DD)
    return S_DD, fill, (one if fill is not None else None)


def _structure(classes, marg, X, beta_block, marginalize_beta: bool, last_ok: bool, dense_limit, dtype):
    """Step 1 of a plan, rows or statistics alike: (chain, dense, placement, units, K, ds, dense_limit). Terms on one
    grouping factor form one class (block-diagonal Λ; docs/math.md, section 3); X (n, p): β's unit where placed."""
    n, p = X.shape
    merged, members = merge_same_grouping(classes, marg, n)
    chain_m, dense_m = partition(merged, range(len(merged)))
    chain = [i for k in chain_m for i in members[k]]
    dense = [i for k in dense_m for i in members[k]]
    placement = _beta_placement(beta_block, marginalize_beta, last_ok, bool(dense))
    p_beta = p if placement is BetaPlacement.DENSE else 0
    ds = dense_size(classes, dense) + p_beta
    dense_limit = default_dense_limit(jnp.dtype(dtype).itemsize) if dense_limit is None else dense_limit
    if ds > dense_limit:
        raise MarginalTooLarge(too_large_message(classes, marg, chain, dense, ds, dense_limit, p_beta))
    units, K = _units(merged, members, marg, chain_m, dense_m, placement, X)
    return chain, dense, placement, units, K, ds, dense_limit


def build_plan(X, y, classes: list, marginalize: list, *, marginalize_beta: bool = False,
               dense_limit: int | None = None, scalar_sigma: bool = False, level1_fill=Level1Choice.AUTO,
               chain_fill=ChainChoice.AUTO, beta_block=BetaBlock.AUTO, dtype=jnp.float64) -> Plan:
    """Build the static plan.

    X (N, p), y (N,), classes: list of ClassSpec, marginalize: indices of the classes integrated out (their order
    fixes the order of ``scales`` in the kernels). With ``marginalize_beta`` β is integrated out too (prior given
    per call). With ``scalar_sigma`` the plan serves scalar σ only (it skips the level-1 cell-pair table that a
    per-observation σ needs). ``level1_fill`` (:class:`~lmmarg.marginal.blocks.Level1Choice` or its value),
    ``chain_fill`` (:class:`~lmmarg.marginal.blocks.ChainChoice`) and ``beta_block``
    (:class:`~lmmarg.marginal.blocks.BetaBlock`) force a block strategy (tests and benchmarks); AUTO lets
    :mod:`~lmmarg.marginal.blocks` choose by its cost model. Raises MarginalTooLarge if the dense block exceeds
    ``dense_limit`` (default: ``default_dense_limit``, set by the machine's memory).
    """
    level1_fill = option(Level1Choice, level1_fill, "level1_fill")
    chain_fill = option(ChainChoice, chain_fill, "chain_fill")
    beta_block = option(BetaBlock, beta_block, "beta_block")
    classes = list(classes)
    X, y, marg, marginalize_beta = _check_inputs(X, y, classes, marginalize, marginalize_beta)
    N, p = X.shape
    dt = jax.dtypes.canonicalize_dtype(dtype)

    # 1. structure
    last_ok = scalar_sigma and len(marg) == len(classes) and len(marg) > 0
    chain, dense, placement, units, K, ds, dense_limit = _structure(classes, marg, X, beta_block, marginalize_beta,
                                                                    last_ok, dense_limit, dtype)
    cell_codes, cell = _cells(units, N)

    # 2. sufficient statistics around an OLS β0 (it keeps r0 small: no cancellation in r0ᵀr0)
    Zt = np.concatenate([u.Z for u in units], axis=1) if units else np.zeros((N, 0))
    beta0 = stats_mod.centre_beta(X, y) if (p and N) else np.zeros(p)
    r0 = y - X @ beta0
    S_zz, S_zr, S_zX = stats_mod.cell_statistics(cell, cell_codes.shape[0], Zt, X, r0)

    sums = CellSums(tuple(u.name for u in units), tuple(u.n_groups for u in units),
                    tuple(u.Z.shape[1] for u in units), cell_codes, S_zz, S_zr, S_zX, X.T @ X, X.T @ r0,
                    float(r0 @ r0), beta0, N)
    return _assemble(classes, marg, chain, dense, placement, units, K, cell_codes, sums, ds, dense_limit, level1_fill,
                     chain_fill, scalar_sigma, dt, rows=(X, y, Zt, cell))


def _assemble(classes, marg, chain, dense, placement, units, K, cell_codes, sums: "CellSums", ds, dense_limit,
              level1_fill, chain_fill, scalar_sigma, dt, rows=None) -> Plan:
    """Step 3 of build_plan: the block strategies from the statistics (``sums``: in unit column order around
    ``sums.beta0``, by the plan's cells), then the plan's device arrays. rows: (X, y,
    Zt, cell) of the data, or None for a plan built from statistics alone (scalar σ, every class marginalized:
    the paths that never read a row)."""
    cell_node, parent = _chain_tree(cell_codes, units, K)
    dense_offsets, dense_idx = _dense_layout(cell_codes, units, K)
    S_zz, S_zr, S_zX = sums.S_zz, sums.S_zr, sums.S_zX
    S_DD, level1, one = _level1_blocks(S_zz, S_zr, S_zX, cell_node, dense_idx, units, K, ds, level1_fill)
    m = dense_idx.shape[1]
    chain_fills = [choose_chain_fill(cell_node[j], units[j].n_groups, units[j].Z.shape[1], m, ds,
                                     cell_codes.shape[0], dense_idx, chain_fill,
                                     with_table=not (j == 0 and level1 is not None and scalar_sigma))
                   for j in range(K)]
    npdt = np.dtype(jnp.dtype(dt).name)
    # cast on the host and device_put (jnp.asarray would compile a staging copy per shape)
    f = lambda a: None if a is None else jax.device_put(np.asarray(a, dtype=npdt))  # noqa: E731
    i32 = lambda a: None if a is None else jax.device_put(np.asarray(a, dtype=np.int32))  # noqa: E731
    X, y, Zt, cell = rows if rows is not None else (None,) * 4
    structure = Structure(
        marginalized=marg, chain=tuple(chain), dense=tuple(dense), beta=placement,
        class_names=tuple(c.name for c in classes), unit_names=tuple(u.name for u in units),
        unit_dims=tuple(u.Z.shape[1] for u in units), unit_groups=tuple(u.n_groups for u in units),
        unit_src=tuple(u.src for u in units), term_dims=tuple(dim(classes[i]) for i in marg), n_chain_units=K,
        dense_offsets=tuple(dense_offsets), dense_size=int(ds), n_cells=int(cell_codes.shape[0]),
        n_obs=int(sums.n_obs), n_fixed=int(sums.XtX.shape[0]), dense_limit=int(dense_limit),
        dtype_name=jnp.dtype(dt).name)
    statistics = Statistics(
        X=f(X), y=f(y), Zt=f(Zt), cell=i32(cell), S_zz=f(S_zz), S_zr=f(S_zr), S_zX=f(S_zX),
        XtX=f(sums.XtX), Xtr=f(sums.Xtr), rr=f(sums.rr), beta0=f(sums.beta0),
        cell_node=tuple(i32(a) for a in cell_node), parent=tuple(i32(a) for a in parent),
        dense_idx=i32(dense_idx), S_DD=f(S_DD))
    blocks = Blocks(
        chain_fills=tuple(fl.to_device(f, i32) for fl in chain_fills),
        level1=None if level1 is None else level1.to_device(f, i32),
        one_level=None if one is None else OneLevel(f(one.A0), i32(one.B_rows), i32(one.B_cols), f(one.B_vals),
                                                    f(one.a_r), f(one.a_X), f(one.x_r), f(one.x_X)))
    return Plan(structure, statistics, blocks)



class CellSums(NamedTuple):
    """The sufficient statistics of a data set by cell, from rows that need not sit in one process (lmmarg's
    chunked statistics, another site's data): what :func:`plan_from_statistics` takes.

    names (n_terms,) term names; n_groups (n_terms,); dims (n_terms,) d_t; codes (n_cells, n_terms) int: each
    cell's group of each term (any order of cells; a cell may repeat: its sums are added); columns of a cell's
    sums in term order (term t's d_t columns at offset Σ_{s<t} d_s, D = Σ d_t) around a centre β_c (p,) (any:
    zeros give raw sums; one near the OLS keeps r0ᵀr0's digits): S_zz (n_cells, D, D) = Σ z zᵀ, S_zr (n_cells, D) =
    Σ z (y − xᵀβ_c), S_zX (n_cells, D, p) = Σ z xᵀ; global XtX (p, p), Xtr (p,) = Σ x (y − xᵀβ_c), rr () =
    Σ (y − xᵀβ_c)², beta0 = β_c, n_obs; optionally cell_n (n_cells,) rows per cell and levels (per term its group
    labels, code k = the k-th label), which the plan does not read."""
    names: tuple
    n_groups: tuple
    dims: tuple
    codes: np.ndarray
    S_zz: np.ndarray
    S_zr: np.ndarray
    S_zX: np.ndarray
    XtX: np.ndarray
    Xtr: np.ndarray
    rr: float
    beta0: np.ndarray
    n_obs: int
    cell_n: Optional[np.ndarray] = None
    levels: tuple = ()


def plan_from_statistics(cells: CellSums, *, marginalize_beta: bool = False, dense_limit: int | None = None,
                         level1_fill=Level1Choice.AUTO, beta_block=BetaBlock.AUTO, dtype=jnp.float64) -> Plan:
    """The plan of a data set from its sufficient statistics alone (no rows): every term marginalized, scalar σ.

    Equal to ``build_plan(X, y, classes, all terms, scalar_sigma=True)`` on the rows the statistics summarize, for
    every path that reads no row: the density and its gradient, the profiled ML criterion, conditional means and
    draws, β integrated out last. The plan's row arrays (X, y, Zt, cell) are None. β is re-centred here around
    β0 = argmin |y − Xβ|² from the global sums: with δ = β0 − β_c, r0ᵀr0 = rr − 2δᵀXtr + δᵀXᵀXδ (exact; in
    floating point it keeps its digits when β_c is near β0, e.g. a first chunk's OLS)."""
    beta_block = option(BetaBlock, beta_block, "beta_block")
    if beta_block is BetaBlock.AUTO:   # the only placement the statistics serve (see below)
        beta_block = BetaBlock.LAST
    if marginalize_beta and beta_block is BetaBlock.UNIT:
        raise ValueError("a plan from statistics integrates beta out last (beta_block='last'): beta as an "
                         "elimination unit needs the per-cell sums of X Xᵀ, which the statistics do not hold")
    n_cells, n_terms = np.shape(cells.codes)
    D = int(sum(cells.dims))
    p = np.shape(cells.XtX)[0]
    want = {"S_zz": (n_cells, D, D), "S_zr": (n_cells, D), "S_zX": (n_cells, D, p), "Xtr": (p,), "beta0": (p,)}
    for name, shape in want.items():
        if np.shape(getattr(cells, name)) != shape:
            raise ValueError(f"CellSums.{name} must be {shape} for {n_cells} cells, terms {tuple(cells.names)} "
                             f"(D = {D} columns) and p = {p} fixed effects; got {np.shape(getattr(cells, name))}")
    if not (len(cells.names) == len(cells.n_groups) == len(cells.dims) == n_terms):
        raise ValueError(f"CellSums: names, n_groups and dims need one entry per column of codes ({n_terms})")
    offsets = np.concatenate([[0], np.cumsum(cells.dims)]).astype(int)
    classes = [ClassSpec(str(name), np.zeros((n_cells, int(d))), np.asarray(cells.codes[:, t], np.int64), int(G))
               for t, (name, G, d) in enumerate(zip(cells.names, cells.n_groups, cells.dims))]
    XtX, Xtr = np.asarray(cells.XtX, float), np.asarray(cells.Xtr, float)
    marg = tuple(range(n_terms))
    beta_marg = bool(marginalize_beta and p)
    chain, dense, placement, units, K, ds, dense_limit = _structure(
        classes, marg, np.zeros((n_cells, p)), beta_block, beta_marg, True, dense_limit, dtype)
    cell_codes, cell = _cells(units, n_cells)
    # unit column order: each unit stacks its terms' columns (Structure.unit_src)
    cols = np.concatenate([np.arange(offsets[h], offsets[h + 1]) for u in units for h in u.src]
                          + [np.zeros(0, int)]).astype(int)   # no terms: no columns
    n_plan = cell_codes.shape[0]
    S_zz = stats_mod.aggregate(cell, n_plan, cells.S_zz[:, cols][:, :, cols].reshape(n_cells, -1)).reshape(n_plan, D, D)
    S_zr = stats_mod.aggregate(cell, n_plan, cells.S_zr[:, cols])
    S_zX = stats_mod.aggregate(cell, n_plan, cells.S_zX[:, cols, :].reshape(n_cells, -1)).reshape(n_plan, D, p)
    delta = np.zeros(p)
    if p and cells.n_obs:   # the OLS step from the centre: β0 = β_c + δ, XᵀX δ = Xᵀr_c
        delta = (np.linalg.solve(XtX, Xtr) if np.linalg.cond(XtX) < 1e8
                 else np.linalg.lstsq(XtX, Xtr, rcond=None)[0])
    sums = CellSums(tuple(u.name for u in units), tuple(u.n_groups for u in units), tuple(u.Z.shape[1] for u in units),
                    cell_codes, S_zz, S_zr - S_zX @ delta, S_zX, XtX, Xtr - XtX @ delta,
                    float(cells.rr - 2.0 * delta @ Xtr + delta @ XtX @ delta), np.asarray(cells.beta0, float) + delta,
                    int(cells.n_obs))
    return _assemble(classes, marg, chain, dense, placement, units, K, cell_codes, sums, ds, dense_limit,
                     level1_fill, ChainChoice.AUTO, True, jax.dtypes.canonicalize_dtype(dtype))
