r"""Block strategies of the marginal engine: how each block of F's elimination is formed, one type per strategy.

The engine (:mod:`lmmarg.marginal.kernels`) eliminates F = I + Ztᵀ W Zt as a chain of nested classes (finest
first) and one dense Schur block F_DD (docs/math.md, sections 3–5). Three choices are made per plan, each by a type
with a *build* step (plan time, NumPy, from the statistics) and *call* steps (traced, their contribution to F_DD
and to the right-hand sides); :func:`choose_level1_fill` and :func:`choose_chain_fill` pick them by the cost model
below and nothing else in the package compares strategy names.

**Level-1 fill** (scalar σ): the chain's finest level contributes K = Σ_g B_g R_g B_gᵀ to F_DD, where B is the
constant coupling of its groups to the dense block and R_g = Λ₀ (I + Λ₀ᵀ A_g Λ₀ / σ²)⁻¹ Λ₀ᵀ depends on the group
only through A_g = Σ Z₀ᵀZ₀. Per-call cost in dense multiply-adds:

=====================  ==========================================  =========================================
type                   cost                                        memory bound
=====================  ==========================================  =========================================
:class:`DenseProductFill`  ds G₀ d₀ (d₀ + ds): K = W Wᵀ, one GEMM     ds G₀ d₀ ≤ DENSE_B_MAX_ENTRIES
:class:`PairListFill`      PAIR_ENTRY_COST × (entry pairs per group)/2  ≤ PAIR_MAX_ENTRIES
:class:`PooledFill`        POOLED_ENTRY_COST × U d₀² ds (ds + k₀)       ≤ POOLED_MAX_ENTRIES
=====================  ==========================================  =========================================

(U: classes of groups with equal A_g; the pooled cost is set by the groups alone, never by N or the cells.)
Each provides ``leaf_statistics`` (the A of the leaves it works on), ``leaves`` (per-group leaf factors -> its
leaves), ``schur`` (M = S_DD/σ² − K/σ⁴), ``rhs`` (eliminated right-hand sides of the one-level path),
``logdet`` (Σ over groups of the leaves' log-determinants) and ``per_group``.

**Chain fill** (per-observation σ, per cell, every chain level): :class:`PairsChainFill` (a scatter of same-node
cell pairs, cost n_pairs m² (d + 6)) or :class:`ProductChainFill` (M = stacked L_g⁻¹ C_g, F_DD −= MᵀM, cost
G d ds² + n_cells d m 6); :class:`NoChainFill` without a dense block.

**Dense form** of the one-level Schur block: :class:`ScaledForm` F_DD = I + Λ_Dᵀ M Λ_D (any Λ, zero variances
included: ML, recovery) or :class:`PrecisionForm` F̃ = Σ_D⁻¹ + M, log|F_DD| = log|F̃| + log|Σ_D| (nonsingular
Λ_D only: the sampler, whose SDs are exp(·) > 0; it never scales the ds × ds block by Λ_D).

Options arrive as the enums :class:`Level1Choice`, :class:`ChainChoice`, :class:`BetaBlock` (strings with the same
values are accepted at the API boundary); :class:`BetaPlacement` records where a marginalized β went.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp
from jax import lax
from jax.scipy.linalg import block_diag

from .linalg import (add_identity, eye_kron, outer_gram, small_left_product, small_mm, small_precision,
                     small_sandwich, unpack_symmetric)
from .statistics import same_node_pairs

__all__ = ["Level1Choice", "ChainChoice", "BetaBlock", "BetaPlacement", "DenseProductFill", "PairListFill",
           "PooledFill", "PairsChainFill", "ProductChainFill", "NoChainFill", "ScaledForm", "PrecisionForm",
           "choose_level1_fill", "choose_chain_fill", "dense_form", "dense_scale", "dense_scale_rows",
           "level1_R", "level1_Q", "class_grams"]

# Cost model (docs/math.md, section 5), in units of one multiply-add of a dense product. A coefficient-list entry is
# a gather, a multiply and a scattered segment-sum in both passes: about 100 dense multiply-adds on XLA:CPU.
PAIR_ENTRY_COST = 100.0
DENSE_B_MAX_ENTRIES = 4e6    # the dense B (ds, G_0, d0) of DenseProductFill: at most 32 MB in float64
PAIR_MAX_ENTRIES = 4e7       # coefficient-list entries of PairListFill
POOLED_MAX_ENTRIES = 2e7     # constants of PooledFill (U d0^2 ds (ds + k0)): at most 160 MB in float64
POOLED_ENTRY_COST = 4.0      # a pooled constant is streamed from memory once per call in each pass: memory-bound
POOLED_BLAS_MAX_CLASSES = 1024   # build the pooled constants by one BLAS product per class (a loop) up to this many
PRODUCT_FILL_MAX_ENTRIES = 1.5e8  # the stacked M (G d, ds) of ProductChainFill must fit comfortably


class Level1Choice(str, enum.Enum):
    """build_plan's ``level1_fill``: AUTO (cheapest by the cost model) or force one strategy."""
    AUTO = "auto"
    DENSE = "dense"
    PAIRS = "pairs"
    POOLED = "pooled"


class ChainChoice(str, enum.Enum):
    """build_plan's ``chain_fill`` (per-observation σ): AUTO, or force PAIRS / PRODUCT ("mtm")."""
    AUTO = "auto"
    PAIRS = "pairs"
    PRODUCT = "mtm"


class BetaBlock(str, enum.Enum):
    """build_plan's ``beta_block``: where a marginalized β is eliminated. UNIT: one more one-group unit (any σ,
    offsets allowed); LAST: after every random effect, a p × p Schur complement of the primitive's k = p + 1 Gram
    (scalar σ, every class marginalized, no offset); AUTO: LAST where it applies."""
    AUTO = "auto"
    UNIT = "unit"
    LAST = "last"


class BetaPlacement(str, enum.Enum):
    """Where the plan put a marginalized β (Plan.beta_block; None when β is sampled)."""
    LAST = "last"
    DENSE = "dense"
    CHAIN = "chain"


def option(enum_type, value, name: str):
    """``value`` (an enum member or its string) as a member of ``enum_type``; a clear ValueError otherwise."""
    try:
        return enum_type(value)
    except ValueError:
        raise ValueError(f"{name} must be one of {tuple(e.value for e in enum_type)}, got {value!r}") from None


def _pytree(data: list, meta: list = ()):
    """Register a frozen dataclass as a JAX pytree (arrays in ``data``, static values in ``meta``)."""
    def wrap(cls):
        jax.tree_util.register_dataclass(cls, data_fields=list(data), meta_fields=list(meta))
        return cls
    return wrap


# --------------------------------------------------------------------------- the dense block's Λ_D


def _dense_units(plan):
    st = plan.structure
    return range(st.n_chain_units, len(st.unit_dims))


def dense_lam_vector(plan, lams):
    """(ds,) diagonal of Λ_D when every dense unit is scalar (d = 1), else None."""
    st = plan.structure
    if not all(st.unit_dims[u] == 1 for u in _dense_units(plan)):
        return None
    return jnp.concatenate([jnp.broadcast_to(lams[u][0, 0], (st.unit_groups[u],)) for u in _dense_units(plan)])


def dense_scale_rows(plan, lams, x):
    """Λ_Dᵀ x for x (ds, k) in the dense layout (per dense unit)."""
    lam = dense_lam_vector(plan, lams)
    if lam is not None:
        return lam[:, None] * x
    st, out = plan.structure, []
    for u in _dense_units(plan):
        lo, G, d = st.dense_offsets[u - st.n_chain_units], st.unit_groups[u], st.unit_dims[u]
        blk = x[lo:lo + G * d].reshape(G, d, -1)
        out.append(small_left_product(lams[u].T, blk).reshape(G * d, -1))
    return jnp.concatenate(out, axis=0)


def dense_scale(plan, lams, M):
    """Λ_Dᵀ M Λ_D for a (ds, ds) matrix in the dense layout: one elementwise pass when every dense unit is
    scalar, else two passes of dense_scale_rows (no ds³ work)."""
    lam = dense_lam_vector(plan, lams)
    if lam is not None:
        return lam[:, None] * M * lam[None, :]
    return dense_scale_rows(plan, lams, dense_scale_rows(plan, lams, M).T).T


@dataclass(frozen=True)
class ScaledForm:
    """F_DD = I + Λ_Dᵀ M Λ_D: valid for any Λ (zero variances included)."""
    name = "scaled"

    def matrix(self, plan, lams, M):
        """(F_DD (ds, ds), log-determinant shift 0) from the dense statistics M (ds, ds)."""
        return add_identity(dense_scale(plan, lams, M)), jnp.zeros((), M.dtype)

    def rhs(self, plan, lams, xt):
        """x_D = Λ_Dᵀ x̃ (ds, k) from the eliminated right-hand sides x̃ before Λ_D."""
        return dense_scale_rows(plan, lams, xt)


@dataclass(frozen=True)
class PrecisionForm:
    """F̃ = Σ_D⁻¹ + M with F_DD = Λ_Dᵀ F̃ Λ_D and Σ_D = blockdiag_u(I_{G_u} ⊗ Σ_u): log|F_DD| = log|F̃| +
    Σ_u G_u log|Σ_u|; Σ_u⁻¹ enters only the G_u d_u² diagonal-block entries. Nonsingular Λ_D only: the shift is
    NaN (log_marginal: −inf) where a Σ_u is singular, with finite substitutes so that gradients stay finite."""
    name = "precision"

    def matrix(self, plan, lams, M):
        st = plan.structure
        blocks, shift, ok = [], jnp.zeros((), M.dtype), jnp.ones((), bool)
        for u in _dense_units(plan):
            P, logdet, good = small_precision(lams[u])                        # Σ_u⁻¹, log|Σ_u|
            ok = ok & good
            blocks.append(eye_kron(P, st.unit_groups[u]))   # no scatter: elementwise, fused with the addition
            shift = shift + st.unit_groups[u] * logdet
        Sinv = blocks[0] if len(blocks) == 1 else block_diag(*blocks)
        return M + Sinv, jnp.where(ok, shift, jnp.nan)

    def rhs(self, plan, lams, xt):
        """x̃ itself: x_Dᵀ F_DD⁻¹ x_D = x̃ᵀ F̃⁻¹ x̃."""
        return xt


DENSE_FORMS = {"scaled": ScaledForm(), "precision": PrecisionForm()}


def dense_form(form):
    """The dense-form strategy for a name ("scaled" / "precision") or a strategy object."""
    if isinstance(form, (ScaledForm, PrecisionForm)):
        return form
    if form not in DENSE_FORMS:
        raise ValueError(f"dense_form must be one of {tuple(DENSE_FORMS)}, got {form!r}")
    return DENSE_FORMS[form]


# --------------------------------------------------------------------------- level-1 fills (scalar σ)


def level1_R(lams, Linv):
    """R_g = Λ₀ A_g⁻¹ Λ₀ᵀ (n, d₀, d₀) from Linv = chol(I + A_g)⁻¹ (n, d₀, d₀)."""
    return small_sandwich(lams[0], small_mm(jnp.swapaxes(Linv, -1, -2), Linv), lams[0].T)


def level1_Q(lams, Linv):
    """Q_g = Λ₀ L_g⁻ᵀ (n, d₀, d₀), so that R_g = Q_g Q_gᵀ."""
    return small_mm(lams[0], jnp.swapaxes(Linv, -1, -2))


class _PerGroupFill:
    """Shared steps of the fills whose leaves are the level-1 groups themselves."""
    needs_leaf_factors = False

    def label(self) -> str:
        """How ``Plan.describe`` names this fill."""
        return self.name

    def leaf_statistics(self, one):
        return one.A0

    def leaves(self, Linv):
        return Linv

    def per_group(self, x):
        return x

    def logdet(self, logdets):
        return jnp.sum(logdets)

    def rhs(self, plan, one, lams, s2, R, c):
        """(chain Gram (k, k), x̃ (ds, k)) for right-hand sides [X r0] c: group sums, then one product with B."""
        x_cols = jnp.concatenate([one.x_X, one.x_r[:, None]], axis=1)
        a_raw = jnp.einsum("gak,kl->gal", jnp.concatenate([one.a_X, one.a_r[:, :, None]], axis=2), c)
        return self.rhs_from_sums(plan, one, s2, R, a_raw, small_mm(x_cols, c))

    def rhs_from_sums(self, plan, one, s2, R, a_raw, x_raw):
        """(chain Gram (k, k) = Σ_g z_gᵀ z_g, x̃ (ds, k)) from raw group sums a_raw (G₀, d₀, k) of Z₀ᵀr and dense
        sums x_raw (ds, k) of Z_Dᵀr; R per leaf as ``schur`` takes it."""
        w = jnp.einsum("gab,gbk->gak", self.per_group(R), a_raw)
        gram = jnp.einsum("gak,gal->kl", a_raw, w) / s2**2
        return gram, (x_raw - self.cross(plan, one, w) / s2) / s2

    def cross(self, plan, one, w):
        """B w (ds, k) for w (G₀, d₀, k): a segment sum of B's entries."""
        k = w.shape[-1]
        return jax.ops.segment_sum(one.B_vals[:, None] * w.reshape(-1, k)[one.B_cols], one.B_rows,
                                   plan.structure.dense_size)


@_pytree(data=["Bc"])
@dataclass(frozen=True)
class DenseProductFill(_PerGroupFill):
    """K = W Wᵀ, W_g = B_g Q_g (R_g = Q_g Q_gᵀ): one dense product. Bc: B laid out (ds, d₀, G₀), so that forming
    W scales contiguous rows (entry [t, a, g] = B[t, (g, a)])."""
    Bc: jax.Array
    name = "dense products"
    needs_leaf_factors = True

    @staticmethod
    def build(B, d0: int, G0: int, ds: int) -> "DenseProductFill":
        return DenseProductFill(np.ascontiguousarray(B.toarray().reshape(ds, G0, d0).transpose(0, 2, 1)))

    def to_device(self, f, i32):
        return DenseProductFill(f(self.Bc))

    def schur(self, plan, S_DD, lams, s2, Linv, R):
        Q = level1_Q(lams, Linv)
        d0, ds = Q.shape[-1], plan.structure.dense_size
        W = jnp.stack([sum(self.Bc[:, a, :] * Q[None, :, a, b] for a in range(d0)) for b in range(d0)], axis=1)
        return S_DD / s2 - outer_gram(W.reshape(ds, -1)) / s2**2

    def cross(self, plan, one, w):
        """B w as one dense product instead of a scatter of its entries."""
        k = w.shape[-1]
        return self.Bc.reshape(plan.structure.dense_size, -1) @ jnp.swapaxes(w, 0, 1).reshape(-1, k)


@_pytree(data=["coef", "rid", "seg", "targets", "targets_t"], meta=["n_targets"])
@dataclass(frozen=True)
class PairListFill(_PerGroupFill):
    """K from sorted coefficient lists over same-group entry pairs of B: coef (E,), rid (E,) index into R.ravel(),
    seg (E,) sorted target id, targets (T,) flat upper-triangle positions in the dense block, targets_t (T,) their
    mirrored positions (ds² on the diagonal); n_targets = T (static)."""
    coef: jax.Array
    rid: jax.Array
    seg: jax.Array
    targets: jax.Array
    targets_t: jax.Array
    n_targets: int = 0
    name = "coefficient lists"

    @staticmethod
    def build(B, d0: int, G0: int, ds: int) -> "PairListFill":
        col = np.repeat(np.arange(G0 * d0), np.diff(B.indptr))
        g = col // d0
        ea, eb = same_node_pairs(g, G0)  # entry pairs sharing a group
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
        return PairListFill(coef, rid, seg, targets, targets_t, int(targets.size))

    def to_device(self, f, i32):
        return PairListFill(f(self.coef), i32(self.rid), i32(self.seg), i32(self.targets), i32(self.targets_t),
                            self.n_targets)

    def schur(self, plan, S_DD, lams, s2, Linv, R):
        ds = plan.structure.dense_size
        R = level1_R(lams, Linv) if R is None else R
        bil = (self.coef, self.rid, self.seg, self.targets, self.targets_t)
        K = _bilinear_K(R.reshape(-1), bil, ds * ds, self.n_targets).reshape(ds, ds)
        return S_DD / s2 - K / s2**2


@_pytree(data=["cls", "rep", "count", "A", "K", "PM", "tri"])
@dataclass(frozen=True)
class PooledFill:
    """Level-1 groups pooled into U classes of equal A_g (so equal R_g): per-call work in U.

    cls (G₀,) class of each group, rep (U,) one group of each class, count (U,) groups per class, A (U, d₀, d₀)
    the shared A; K (U n_ab + 1, T): for each class and pair a ≤ b (n_ab = d₀(d₀ + 1)/2) the upper triangle
    (T = ds(ds + 1)/2 entries) of S_uab = Σ_{g∈u} (B_g[:, a] B_g[:, b]ᵀ + its transpose if a < b), so that K =
    Σ_u Σ_{a≤b} R_u[a, b] S_uab, and last the upper triangle of S_DD (M = S_DD/σ² − K/σ⁴ is one matrix-vector
    product); tri (ds, ds): position in that upper triangle of every entry (i, j) (a gather rebuilds it); for the
    one-level path (else None) PM (U d₀ d₀, ds k₀ + k₀ k₀) = [P | M] with row (u, a, b) of P = Σ_{g∈u} B_g[:, a]
    C_g[b] and of M = Σ_{g∈u} C_g[a]ᵀ C_g[b] over the k₀ = p + 1 columns C_g = [Σ Z₀ᵀX, Σ Z₀ᵀr0]."""
    cls: jax.Array
    rep: jax.Array
    count: jax.Array
    A: jax.Array
    K: jax.Array
    PM: Optional[jax.Array]
    tri: jax.Array
    name = "pooled classes of equal group statistics"
    needs_leaf_factors = False

    @staticmethod
    def build(B, A0, d0: int, G0: int, ds: int, C, S_DD) -> "PooledFill":
        """C (G₀, d₀, k₀) the one-level right-hand-side columns or None; S_DD (ds, ds) the dense statistics."""
        cls, rep, count = pool_groups(A0)
        U = rep.size
        Ind = sp.csr_matrix((np.ones(G0), (cls, np.arange(G0))), shape=(U, G0))
        Bcols = [B[:, np.arange(G0) * d0 + a].tocoo() for a in range(d0)]            # (ds, G_0) per column a
        Bblk = [sp.csr_matrix((Ba.data, (cls[Ba.col] * ds + Ba.row, Ba.col)), shape=(U * ds, G0)) for Ba in Bcols]
        K = class_grams(B, Bcols, Bblk, cls, count, d0, G0, ds)
        PM = None
        if C is not None:
            k0 = C.shape[2]
            P = np.empty((U, d0, d0, ds, k0))
            M = np.empty((U, d0, d0, k0, k0))
            for a in range(d0):
                for b in range(d0):
                    P[:, a, b] = np.asarray(Bblk[a] @ C[:, b, :]).reshape(U, ds, k0)
                    M[:, a, b] = (Ind @ (C[:, a, :, None] * C[:, b, None, :]).reshape(G0, k0 * k0)).reshape(U, k0, k0)
            PM = np.concatenate([P.reshape(U * d0 * d0, -1), M.reshape(U * d0 * d0, -1)], axis=1)
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

    def to_device(self, f, i32):
        return PooledFill(i32(self.cls), i32(self.rep), f(self.count), f(self.A), f(self.K),
                          None if self.PM is None else f(self.PM), i32(self.tri))

    def label(self) -> str:
        return f"{self.name} ({self.rep.shape[0]} classes)"

    def leaf_statistics(self, one):
        return self.A

    def leaves(self, Linv):
        return Linv[self.rep]

    def per_group(self, x):
        return x[self.cls]

    def logdet(self, logdets):
        return jnp.sum(self.count * logdets)

    def schur(self, plan, S_DD, lams, s2, Linv, R):
        """M from the pooled constants (S_DD is their last row): one matrix-vector product, value and reverse."""
        R = level1_R(lams, Linv) if R is None else R
        d = R.shape[-1]
        iu, ju = np.triu_indices(d)
        select = np.zeros((d * d, iu.size))
        select[iu * d + ju, np.arange(iu.size)] = 1.0
        # the upper entries by a one-hot contraction: reading entries would cost a padded kernel each in reverse,
        # a gather a scatter loop
        upper = jnp.sum(R.reshape(-1, d * d, 1) * jnp.asarray(select, R.dtype), axis=1)
        coef = jnp.concatenate([upper.reshape(-1) * (-1.0 / s2**2), (1.0 / s2)[None]])
        return unpack_symmetric(coef @ self.K, self.tri)

    def rhs(self, plan, one, lams, s2, R, c):
        """Every term a contraction of per-class constants (work in U, ds, p; none in G₀, cells or N)."""
        x_cols = jnp.concatenate([one.x_X, one.x_r[:, None]], axis=1)          # (ds, p + 1)
        k0, ds = c.shape[0], plan.structure.dense_size
        rPM = R.reshape(-1) @ self.PM                                          # one matrix-vector product for both
        Bw_cols, Mc = rPM[:ds * k0].reshape(ds, k0), rPM[ds * k0:].reshape(k0, k0)
        gram = small_mm(small_mm(c.T, Mc), c) / s2**2
        return gram, small_mm(x_cols - Bw_cols / s2, c) / s2

    def rhs_from_sums(self, plan, one, s2, R, a_raw, x_raw):
        return _PerGroupFill.rhs_from_sums(self, plan, one, s2, R, a_raw, x_raw)

    def cross(self, plan, one, w):
        return _PerGroupFill.cross(self, plan, one, w)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _bilinear_K(Rf, bil, size, n_targets):
    """Flat K (size,) = B blockdiag(R_g) Bᵀ from the constant structure bil = (coef, rid, seg, targets, targets_t):
    each upper-triangle target is a sorted segment sum of coef * R[rid], mirrored at targets_t (diagonal dropped)."""
    coef, rid, seg, targets, targets_t = bil
    Ku = jax.ops.segment_sum(coef * Rf[rid], seg, n_targets, indices_are_sorted=True)
    Kf = jnp.zeros(size, coef.dtype).at[targets].add(Ku, indices_are_sorted=True, unique_indices=True)
    return Kf.at[targets_t].add(Ku, mode="drop", unique_indices=True)


def _bilinear_K_fwd(Rf, bil, size, n_targets):
    return _bilinear_K(Rf, bil, size, n_targets), (Rf.shape[0], bil)


def _bilinear_K_bwd(size, n_targets, res, g):
    """Explicit reverse pass: the cotangent of each target (upper + mirrored entry) once, then the sorted entries.

    It costs the same as autodiff's transpose; kept because the other form changes the gradient's last bits, and
    with fit_ml's ftol = 1e-15 (below the criterion's round-off) an ML fit can then take more evaluations."""
    nR, bil = res
    coef, rid, seg, targets, targets_t = bil
    gu = g[targets] + g.at[targets_t].get(mode="fill", fill_value=0.0)
    gu = lax.optimization_barrier(gu)
    gR = jax.ops.segment_sum(coef * gu[seg], rid, nR)
    return gR, jax.tree_util.tree_map(jnp.zeros_like, bil)


_bilinear_K.defvjp(_bilinear_K_fwd, _bilinear_K_bwd)


def pool_groups(A0: np.ndarray):
    """Classes of level-1 groups with identical A_g (G₀, d₀, d₀) -> (cls (G₀,), rep (U,), count (U,))."""
    G0 = A0.shape[0]
    _, rep, cls, count = np.unique(A0.reshape(G0, -1), axis=0, return_index=True, return_inverse=True,
                                   return_counts=True)
    return np.asarray(cls).reshape(-1), rep, count


def class_grams(B, Bcols, Bblk, cls, count, d0: int, G0: int, ds: int,
                blas_max_classes: int = POOLED_BLAS_MAX_CLASSES) -> np.ndarray:
    """K (U, d₀, d₀, ds, ds): K[u, a, b] = Σ over the groups g of class u of B[:, (g, a)] B[:, (g, b)]ᵀ.

    When B is small enough to hold dense (DENSE_B_MAX_ENTRIES) and the classes are few (blas_max_classes), one
    BLAS product per class and column pair (the groups of a class side by side): ~ds² G₀ d₀² multiply-adds at
    BLAS speed. Otherwise sparse products (Bblk @ Bcolsᵀ), whose cost grows with the squared entries per group."""
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


def choose_level1_fill(B, A0, d0: int, G0: int, ds: int, choice=Level1Choice.AUTO, C=None, S_DD=None):
    """The level-1 fill for scalar σ, chosen here and only here by the cost model of the module docstring.

    B (ds, G₀ d₀) CSC: the constant coupling; A0 (G₀, d₀, d₀) group sums of Z₀ᵀZ₀; choice: a
    :class:`Level1Choice` (AUTO: cheapest); C (G₀, d₀, k₀) one-level right-hand-side columns (pooled only);
    S_DD (ds, ds) the dense block's own statistics (pooled only). Returns a fill, or None if none fits in memory."""
    choice = option(Level1Choice, choice, "level1_fill")
    col = np.repeat(np.arange(G0 * d0), np.diff(B.indptr))
    counts = np.bincount(col // d0, minlength=G0).astype(np.int64)
    n_half = int((counts**2).sum()) / 2
    U = pool_groups(A0)[1].size
    k0 = 0 if C is None else C.shape[2]
    pooled_entries = U * (d0 * (d0 + 1) // 2 * ds * (ds + 1) // 2 + d0 * d0 * ds * k0)
    costs = {
        Level1Choice.DENSE: ds * G0 * d0 * (d0 + ds) if ds * G0 * d0 <= DENSE_B_MAX_ENTRIES else np.inf,
        Level1Choice.PAIRS: PAIR_ENTRY_COST * n_half if n_half <= PAIR_MAX_ENTRIES else np.inf,
        Level1Choice.POOLED: POOLED_ENTRY_COST * pooled_entries if pooled_entries <= POOLED_MAX_ENTRIES else np.inf,
    }
    if choice is Level1Choice.AUTO:
        choice = min(costs, key=costs.get)
        if not np.isfinite(costs[choice]):
            return None
    if choice is Level1Choice.DENSE:
        return DenseProductFill.build(B, d0, G0, ds)
    if choice is Level1Choice.PAIRS:
        return PairListFill.build(B, d0, G0, ds)
    return PooledFill.build(B, A0, d0, G0, ds, C, S_DD)


# --------------------------------------------------------------------------- chain fills (per-observation σ)


@_pytree(data=["pa", "pb", "ia", "ib"])
@dataclass(frozen=True)
class PairsChainFill:
    """F_DD −= Σ over same-node cell pairs (k, k') of V_kᵀ V_k' placed at (idx_k, idx_k'): pa, pb (n_pairs,) the
    pairs, ia, ib (n_pairs, m) their dense positions (precomputed: no constant gather folded at compile time).
    None arrays: the plan was built for scalar σ only (the level-1 constant fill serves it)."""
    pa: Optional[jax.Array]
    pb: Optional[jax.Array]
    ia: Optional[jax.Array]
    ib: Optional[jax.Array]
    name = "pairs"

    @staticmethod
    def build(node, G: int, dense_idx, with_table: bool = True) -> "PairsChainFill":
        if not with_table:
            return PairsChainFill(None, None, None, None)
        pa, pb = same_node_pairs(node, G)
        return PairsChainFill(pa, pb, dense_idx[pa], dense_idx[pb])

    def to_device(self, f, i32):
        return self if self.pa is None else PairsChainFill(*(i32(a) for a in (self.pa, self.pb, self.ia, self.ib)))

    def fill(self, plan, j: int, F, V):
        """F (ds, ds) minus level j's fill-in; V (n_cells, d_j, m) = L_node⁻¹ C_k."""
        if self.pa is None:
            raise ValueError("this plan was built for a scalar sigma (build_plan(..., scalar_sigma=True)); "
                             "build it with scalar_sigma=False for per-observation sigma")
        P = jnp.einsum("pim,pin->pmn", V[self.pa], V[self.pb])
        return F.at[self.ia[:, :, None], self.ib[:, None, :]].add(-P)


@_pytree(data=[])
@dataclass(frozen=True)
class ProductChainFill:
    """F_DD −= MᵀM with M (G_j d_j, ds) the stacked rows L_g⁻¹ C_g of level j's groups."""
    name = "mtm"

    @staticmethod
    def build() -> "ProductChainFill":
        return ProductChainFill()

    def to_device(self, f, i32):
        return self

    def fill(self, plan, j: int, F, V):
        st, idx, node = plan.structure, plan.stats.dense_idx, plan.stats.cell_node[j]
        d, G = st.unit_dims[j], st.unit_groups[j]
        rows = node[:, None] * d + jnp.arange(d)[None, :]
        M = jnp.zeros((G * d, st.dense_size), F.dtype)  # row block g: L_g^{-1} C_g
        M = M.at[rows[:, :, None], idx[:, None, :]].add(V)
        return F - M.T @ M


@_pytree(data=[])
@dataclass(frozen=True)
class NoChainFill:
    """No dense block: nothing to fill."""
    name = "none"

    def to_device(self, f, i32):
        return self


def choose_chain_fill(node, G: int, d: int, m: int, dense_size: int, n_cells: int, dense_idx,
                      choice=ChainChoice.AUTO, with_table: bool = True):
    """The fill of one chain level for per-observation σ, by the cost model of the module docstring (or forced by
    ``choice``). with_table=False: the level-1 constant fill serves the scalar σ this plan is for, so a pairs
    fill keeps no pair table."""
    choice = option(ChainChoice, choice, "chain_fill")
    if not m:
        return NoChainFill()
    if choice is ChainChoice.AUTO:
        counts = np.bincount(node, minlength=G)
        n_pairs = int((counts.astype(np.int64) ** 2).sum())
        cost_pairs = n_pairs * m * m * (d + 6)
        cost_product = G * d * dense_size * dense_size + n_cells * d * m * 6
        fits = G * d * dense_size <= PRODUCT_FILL_MAX_ENTRIES
        choice = ChainChoice.PAIRS if (not fits or cost_pairs < cost_product) else ChainChoice.PRODUCT
    if choice is ChainChoice.PRODUCT:
        return ProductChainFill.build()
    return PairsChainFill.build(node, G, dense_idx, with_table)
