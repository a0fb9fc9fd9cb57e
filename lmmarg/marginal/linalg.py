"""Small dense and batched linear algebra of the marginal engine (a documented internal API).

Everything here is shape-polymorphic JAX with explicit reverse passes where autodiff is slow on XLA:CPU; the engine
(:mod:`lmmarg.marginal.kernels`) and the block strategies (:mod:`lmmarg.marginal.blocks`) are its users.

Batched small blocks (d <= UNROLL_MAX are unrolled or written as broadcast products):
  chol_inv, chol_small, spd_inv_logdet, small_precision, adjugate_det_2x2, matvec, bmm, small_mm, small_sandwich,
  small_left_product, sandwich.
Dense blocks (the Schur complement F_DD):
  chol, dense_chol, upper_inv, spd_inverse, dense_logdet_gram (log|F| and B^T F^{-1} B with a one-inverse reverse
  pass), dense_logdet_quad, outer_gram, unpack_symmetric, eye_kron, add_identity.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.scipy.linalg import solve_triangular

UNROLL_MAX = 6
LOG2PI = 1.8378770664093453


def _chol_entries(A):
    """The lower Cholesky factor of SPD (..., d, d) as a d x d list of (...) arrays (None above the diagonal), by
    the unrolled recursion: elementwise operations only (no LAPACK call, differentiable); NaN on failure."""
    d = A.shape[-1]
    L = [[None] * d for _ in range(d)]
    for j in range(d):
        s = A[..., j, j]
        for k in range(j):
            s = s - L[j][k] ** 2
        L[j][j] = jnp.sqrt(s)
        for i in range(j + 1, d):
            t = A[..., i, j]
            for k in range(j):
                t = t - L[i][k] * L[j][k]
            L[i][j] = t / L[j][j]
    return L


def chol_small(A):
    """Lower Cholesky factor of a batch of small SPD matrices (..., d, d) -> (..., d, d), unrolled for any d: no
    batched LAPACK call (XLA:CPU's batched LAPACK kernels can deadlock inside loops; lmmarg.results.loo)."""
    d = A.shape[-1]
    L = _chol_entries(A)
    zero = jnp.zeros_like(A[..., 0, 0])
    return jnp.stack([jnp.stack([L[i][j] if j <= i else zero for j in range(d)], -1) for i in range(d)], -2)


def chol_inv(A):
    """Batched Cholesky of SPD (..., d, d) -> (diag L (..., d), L^{-1} (..., d, d)).

    Unrolled elementwise for small d (fast on CPU, differentiable); NaN on failure.
    """
    d = A.shape[-1]
    if d > UNROLL_MAX:
        L = jnp.linalg.cholesky(A)
        eye = jnp.broadcast_to(jnp.eye(d, dtype=A.dtype), A.shape)
        Linv = lax.linalg.triangular_solve(L, eye, left_side=True, lower=True)
        return jnp.diagonal(L, axis1=-2, axis2=-1), Linv
    L = _chol_entries(A)
    Li = [[None] * d for _ in range(d)]
    for i in range(d):
        Li[i][i] = 1.0 / L[i][i]
        for j in range(i):
            t = L[i][j] * Li[j][j]
            for k in range(j + 1, i):
                t = t + L[i][k] * Li[k][j]
            Li[i][j] = -t * Li[i][i]
    zero = jnp.zeros_like(A[..., 0, 0])
    Linv = jnp.stack(
        [jnp.stack([Li[i][j] if j <= i else zero for j in range(d)], axis=-1) for i in range(d)],
        axis=-2,
    )
    return jnp.stack([L[i][i] for i in range(d)], axis=-1), Linv


SIGNS_2X2 = np.array([[1.0, -1.0], [-1.0, 1.0]])


def adjugate_det_2x2(A):
    """(adj A, det A) of (..., 2, 2) without reading single entries (the reverse pass of each read would be one
    padded kernel): with rot(A) = A rotated by 180 degrees and S the checkerboard of signs, adj = S * rot(A)^T and
    det = 1/2 sum S * A * rot(A)."""
    rot, signs = jnp.flip(A, axis=(-2, -1)), jnp.asarray(SIGNS_2X2, A.dtype)
    return signs * jnp.swapaxes(rot, -1, -2), 0.5 * jnp.sum(signs * A * rot, axis=(-2, -1))


def spd_inv_logdet(A):
    """(A^{-1}, log|A|) for a batch of SPD (..., d, d): closed forms for d <= 2 (intercept-and-slope blocks: a few
    elementwise operations, fused), the unrolled Cholesky above. NaN where A is not positive definite."""
    d = A.shape[-1]
    if d == 1:
        return 1.0 / A, jnp.log(A.reshape(A.shape[:-2]))
    if d == 2:
        adj, det = adjugate_det_2x2(A)
        det = jnp.where((A[..., 0, 0] > 0) & (det > 0), det, jnp.nan)   # (the condition is not differentiated)
        return adj / det[..., None, None], jnp.log(det)
    diag, Linv = chol_inv(A)
    return small_mm(jnp.swapaxes(Linv, -1, -2), Linv), 2.0 * jnp.sum(jnp.log(diag), axis=-1)


def small_precision(lam):
    """(Sigma^{-1}, log|Sigma|, ok) for Sigma = lam lam^T, lam (d, d). ok is False where Sigma is singular; the
    values then come from a finite substitute, so that gradients stay finite (a NaN branch under jnp.where would
    still poison them: 0 * inf). d <= 2 from lam's determinant and adjugate (exact for triangular lam, no
    cancellation in Sigma's determinant; both are polynomials in lam, finite for any finite lam); above, an
    unrolled Cholesky of Sigma after a gradient-free check."""
    d = lam.shape[0]
    eye = jnp.eye(d, dtype=lam.dtype)
    if d <= 2:
        def adjugate_det(m):
            return (jnp.ones_like(m), m.reshape(())) if d == 1 else adjugate_det_2x2(m)
        det = adjugate_det(lam)[1]
        good = (det != 0) & jnp.isfinite(det)
        adj, det = adjugate_det(jnp.where(good, lam, eye))   # substitute Sigma = I: the dense block stays SPD
        inv = adj / det                                      # lam^{-1}
        return small_mm(inv.T, inv), 2.0 * jnp.log(jnp.abs(det)), good
    S = small_mm(lam, lam.T)
    diag, Ci = chol_inv(lax.stop_gradient(S))
    good = jnp.all(diag > 0) & jnp.all(jnp.isfinite(Ci))
    diag, Ci = chol_inv(jnp.where(good, S, eye))                           # Sigma = C C^T, Ci = C^{-1}
    return small_mm(Ci.T, Ci), 2.0 * jnp.sum(jnp.log(diag)), good


def matvec(A, x):
    """Batched matrix-vector product (..., a, b) x (..., b) -> (..., a)."""
    return jnp.sum(A * x[..., None, :], axis=-1)


def bmm(A, B):
    """Batched small matmul (..., a, b) x (..., b, c) -> (..., a, c) by broadcasting (XLA:CPU's batched dot is
    slow for tiny matrices and huge batches)."""
    return jnp.sum(A[..., :, :, None] * B[..., None, :, :], axis=-2)


def small_mm(A, B):
    """A @ B with broadcasting over leading dims; for a short contraction (<= UNROLL_MAX) as a sum of broadcast
    products. XLA:CPU emits each small dot as its own kernel (one LLVM module to compile each, forward and
    reverse; docs/benchmarks.md, 'Measurements behind the code'); the broadcast form fuses with its neighbours."""
    if A.shape[-1] > UNROLL_MAX:
        return jnp.matmul(A, B)
    return jnp.sum(A[..., :, :, None] * B[..., None, :, :], axis=-2)


SANDWICH_MAX = 2**20   # elements of the broadcast product in small_sandwich (one reduction instead of two)


def small_sandwich(A, X, B):
    """A X_g B for one small A (i, a), B (b, j) and a batch X (G, a, b) -> (G, i, j): one broadcast product
    reduced once (one kernel forward, fewer in reverse) while it stays below SANDWICH_MAX elements, else two
    small_mm products."""
    if max(A.shape[1], B.shape[0]) > UNROLL_MAX or X.size * A.shape[0] * B.shape[1] > SANDWICH_MAX:
        return small_mm(small_mm(A, X), B)
    return jnp.sum(A[None, :, :, None, None] * X[:, None, :, :, None] * B[None, None, None, :, :], axis=(2, 3))


def small_left_product(A, B):
    """A @ B_g for one small A (a, d) and a batch B (G, d, k) -> (G, a, k).

    As a sum of broadcast products for small d: XLA:CPU lowers a tiny-d contraction over a long batch written as
    a dot to kernels wrapped in transposes and copies, forward and reverse; the broadcast form made dillonE1's
    value-and-gradient faster, unrolling into scaled slices less so (docs/benchmarks.md, 'Measurements behind the
    code')."""
    if B.shape[1] > UNROLL_MAX:
        return jnp.einsum("ad,gdk->gak", A, B)
    return jnp.sum(A[None, :, :, None] * B[:, None, :, :], axis=2)


@jax.custom_vjp
def outer_gram(W):
    """W W^T (n, n) for W (n, k): one dense product; its reverse is one product too (autodiff forms two)."""
    return W @ W.T


def _outer_gram_fwd(W):
    return W @ W.T, W


def _outer_gram_bwd(W, g):
    return ((g + g.T) @ W,)


outer_gram.defvjp(_outer_gram_fwd, _outer_gram_bwd)


def sandwich(Lam, H):
    """Lam^T H_k Lam for a batch H (k, D, D) and one Lam (D, D), as two plain GEMMs."""
    k, D, _ = H.shape
    T = (H.reshape(k * D, D) @ Lam).reshape(k, D, D)            # H Lam
    return (jnp.swapaxes(T, 1, 2).reshape(k * D, D) @ Lam).reshape(k, D, D).swapaxes(1, 2)


@jax.custom_vjp
def unpack_symmetric(t, tri):
    """The symmetric (n, n) matrix whose upper triangle (row-major, T = n (n + 1) / 2 entries) is t: t[tri].

    Reverse pass: the cotangent of entry (i, j), i <= j, is g[i, j] + g[j, i] (once on the diagonal): two gathers,
    where autodiff of the gather would scatter-add n^2 values into T."""
    return t[tri]


def _unpack_fwd(t, tri):
    return t[tri], tri


def _unpack_bwd(tri, g):
    n = g.shape[0]
    iu, ju = np.triu_indices(n)
    gs = g + jnp.where(jnp.eye(n, dtype=bool), 0.0, g.T)
    return gs[iu, ju], None


unpack_symmetric.defvjp(_unpack_fwd, _unpack_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def eye_kron(P, G: int):
    """I_G kron P (G d, G d) for P (d, d): one broadcast product; reverse pass: the sum of the G diagonal blocks of
    the cotangent (a strided gather), where autodiff would reduce all (G d)^2 entries."""
    d = P.shape[0]
    eye = jnp.eye(G, dtype=P.dtype)
    return (eye[:, None, :, None] * P[None, :, None, :]).reshape(G * d, G * d)


def _eye_kron_fwd(P, G):
    return eye_kron(P, G), None


def _eye_kron_bwd(G, _, g):
    d = g.shape[0] // G
    g4 = g.reshape(G, d, G, d)
    idx = jnp.arange(G)
    return (jnp.sum(g4[idx, :, idx, :], axis=0),)


eye_kron.defvjp(_eye_kron_fwd, _eye_kron_bwd)

def add_identity(M):
    """M + I for a square M (a diagonal scatter: no n x n identity is materialized)."""
    i = jnp.arange(M.shape[0])
    return M.at[i, i].add(1.0)


def chol(F):
    """Lower Cholesky factor of a symmetric F (symmetric by construction: no input symmetrization pass)."""
    return lax.linalg.cholesky(F, symmetrize_input=False)


TRI_INV_BLOCK = 40        # triangular inverses up to this size are one triangular solve; larger ones are halved
                          # (20 ran no faster and compiled twice the kernels, taking longer to compile)
TRI_INV_MAX_LEAVES = 8    # ... into at most this many solves (larger leaves for large n: a bounded program size)
BLOCKED_INVERSE_MAX = 512  # above this, LAPACK's triangular solves beat the halving (the halving wins at n = 400,
                           # LAPACK at n = 1500; docs/benchmarks.md, 'Measurements behind the code')


def tri_inv_leaf(n: int) -> int:
    """The block size ``upper_inv`` halves an (n, n) factor down to: TRI_INV_BLOCK, or n / TRI_INV_MAX_LEAVES."""
    return max(TRI_INV_BLOCK, -(-n // TRI_INV_MAX_LEAVES))


def upper_inv_split(n: int, leaf: int | None = None):
    """Where ``upper_inv`` halves an (n, n) factor (its result's block [h:, :h] is zero), or None if it does not."""
    return None if n <= (tri_inv_leaf(n) if leaf is None else leaf) else n // 2


def upper_inv(U, leaf: int | None = None):
    """U^{-1} for an upper-triangular U (n, n), by halving down to blocks of ``leaf`` (default: TRI_INV_BLOCK, or
    n / TRI_INV_MAX_LEAVES if larger): [[P, Q], [0, R]]^{-1} = [[P^-1, -P^-1 Q R^-1], [0, R^-1]].

    The off-diagonal blocks become GEMMs; XLA:CPU's triangular solve against an identity runs at a fraction of
    GEMM speed: the halving beats one solve at n = 80 and 160 (docs/benchmarks.md, 'Measurements behind the code')."""
    n = U.shape[0]
    leaf = tri_inv_leaf(n) if leaf is None else leaf      # fixed by the whole factor's size, down the recursion
    h = upper_inv_split(n, leaf)
    if h is None:
        return lax.linalg.triangular_solve(U, jnp.eye(n, dtype=U.dtype), left_side=True, lower=False)
    Pi, Ri = upper_inv(U[:h, :h], leaf), upper_inv(U[h:, h:], leaf)
    return jnp.block([[Pi, -(Pi @ (U[:h, h:] @ Ri))], [jnp.zeros((n - h, h), U.dtype), Ri]])


def spd_inverse(L):
    """F^{-1} = X X^T with X = L^{-T}, from the lower Cholesky factor L of F: a blocked triangular inverse, then
    X X^T from X's blocks [[P, Q], [0, R]] by two GEMMs that skip the zero block, in the form XLA:CPU runs fastest
    (A B^T): half the flops of one GEMM of the whole X, and faster up to BLOCKED_INVERSE_MAX
    (benchmarks/dense_inverse.py; docs/benchmarks.md, 'Measurements behind the code'). cho_solve against the
    identity above BLOCKED_INVERSE_MAX."""
    n = L.shape[0]
    if n > BLOCKED_INVERSE_MAX:
        return jax.scipy.linalg.cho_solve((L, True), jnp.zeros((n, n), L.dtype).at[jnp.arange(n), jnp.arange(n)].set(1))
    X = upper_inv(L.T)
    h = upper_inv_split(n)
    if h is None:
        return X @ X.T
    # X = [[P, Q], [0, R]]: X X^T = [[P P^T + Q Q^T, Q R^T], [R Q^T, R R^T]] skips the zero block's products
    top = X[:h] @ X[:h].T                                  # (h, h)
    low = X[h:, h:] @ X[:, h:].T                           # (n - h, n) = [R Q^T, R R^T]
    return jnp.concatenate([jnp.concatenate([top, low[:, :h].T], axis=1), low], axis=0)


def dense_chol(F, x):
    """Cholesky L of the dense block, z = L^{-1} x (x (n,) or (n, k)) and log|F|."""
    L = chol(F)
    return L, solve_triangular(L, x, lower=True), 2.0 * jnp.sum(jnp.log(jnp.diagonal(L)))


@jax.custom_vjp
def dense_logdet_gram(F, B):
    """(log|F|, B^T F^{-1} B) for SPD F (n, n) and B (n, k).

    Reverse mode via one F^{-1} (JAX's Cholesky VJP is slow on CPU): dF = g_ld F^{-1} - Y G Y^T, dB = 2 Y G with
    Y = F^{-1} B and G the symmetrized cotangent of the Gram matrix."""
    return _gram_fwd(F, B)[0]


def _gram_fwd(F, B):
    L, W, logdet = dense_chol(F, B)
    return (logdet, W.T @ W), (L, B)


def _gram_bwd(res, g):
    L, B = res
    gl, gG = g
    Finv = spd_inverse(L)
    Y = Finv @ B
    Gs = 0.5 * (gG + gG.T)
    YG = Y @ Gs
    outer = YG * Y.T if Y.shape[1] == 1 else YG @ Y.T     # k = 1 (the density): elementwise, fused, no GEMM
    return gl * Finv - outer, 2.0 * YG


dense_logdet_gram.defvjp(_gram_fwd, _gram_bwd)


def dense_logdet_quad(F, x):
    """log|F| - x^T F^{-1} x for SPD F (n, n), x (n,): dense_logdet_gram with one right-hand side."""
    logdet, G = dense_logdet_gram(F, x[:, None])
    return logdet - G[0, 0]
