"""A plan built from sufficient statistics alone (lmmarg.marginal.plan_from_statistics) equals the plan built from
the rows: density, its gradient, conditional means and β integrated out last, for crossed, nested and same-factor
designs, with the cell sums given in any cell order and split over several chunks (repeated cells)."""
import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from lmmarg.marginal import CellSums, ClassSpec, build_plan, kernels, plan_from_statistics  # noqa: E402

# the kernels jitted once for the module, plans as pytree arguments (called eagerly, every primitive would be
# compiled on its own)
log_marginal = jax.jit(kernels.log_marginal)
conditional_mean = jax.jit(kernels.conditional_mean)


def _design(kind: str, seed: int, N: int = 300):
    rng = np.random.default_rng(seed)
    X = np.column_stack([np.ones(N), rng.normal(size=N), rng.normal(size=N)])
    x = X[:, 1:2]
    if kind == "crossed":      # (1 + x | a) + (1 | b)
        a, b = rng.integers(0, 25, N), rng.integers(0, 6, N)
        classes = [ClassSpec("a", np.column_stack([np.ones(N), x]), a, 25), ClassSpec("b", np.ones((N, 1)), b, 6)]
    elif kind == "nested":     # (1 | school) + (1 | class) with classes inside schools, crossed with (1 | rater)
        cls = rng.integers(0, 30, N)
        school = cls // 5
        rater = rng.integers(0, 4, N)
        classes = [ClassSpec("class", np.ones((N, 1)), cls, 30), ClassSpec("school", np.ones((N, 1)), school, 6),
                   ClassSpec("rater", np.column_stack([np.ones(N), x]), rater, 4)]
    else:                      # (1 | a) + (0 + x | a) + (1 | b): two terms on one grouping factor
        a, b = rng.integers(0, 12, N), rng.integers(0, 5, N)
        classes = [ClassSpec("a", np.ones((N, 1)), a, 12), ClassSpec("a.1", x, a, 12),
                   ClassSpec("b", np.ones((N, 1)), b, 5)]
    y = X @ [3.0, 0.5, -0.2] + rng.normal(size=N) + 50.0
    lams = [np.tril(rng.normal(size=(c.Z.shape[1],) * 2)) * 0.5 + np.eye(c.Z.shape[1]) for c in classes]
    return X, y, classes, lams


def _cell_sums(X, y, classes, chunks: int, rng) -> CellSums:
    """Raw term-order sums (centre 0) per (cell, chunk): rows split into chunks, each chunk's cells shuffled."""
    Z = np.concatenate([c.Z for c in classes], axis=1)
    codes = np.stack([c.codes for c in classes], axis=1)
    parts = []
    for rows in np.array_split(rng.permutation(len(y)), chunks):
        keys, inv = np.unique(codes[rows], axis=0, return_inverse=True)
        inv = inv.reshape(-1)
        order = rng.permutation(len(keys))
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        k = rank[inv]
        n = len(keys)
        zz = np.zeros((n,) + (Z.shape[1],) * 2)
        np.add.at(zz, k, Z[rows, :, None] * Z[rows, None, :])
        zy = np.zeros((n, Z.shape[1]))
        np.add.at(zy, k, Z[rows] * y[rows, None])
        zx = np.zeros((n, Z.shape[1], X.shape[1]))
        np.add.at(zx, k, Z[rows, :, None] * X[rows, None, :])
        parts.append((keys[order], zz, zy, zx))
    return CellSums(tuple(c.name for c in classes), tuple(c.n_groups for c in classes),
                    tuple(c.Z.shape[1] for c in classes), np.concatenate([q[0] for q in parts]),
                    np.concatenate([q[1] for q in parts]), np.concatenate([q[2] for q in parts]),
                    np.concatenate([q[3] for q in parts]), X.T @ X, X.T @ y, float(y @ y), np.zeros(X.shape[1]),
                    len(y))


@pytest.mark.parametrize("kind,seed", [("crossed", 1), ("nested", 2), ("same_factor", 3)])
def test_plan_from_statistics_equals_plan_from_rows(kind, seed):
    X, y, classes, lams = _design(kind, seed)
    marg = list(range(len(classes)))
    rows = build_plan(X, y, classes, marg, scalar_sigma=True)
    stats = plan_from_statistics(_cell_sums(X, y, classes, 3, np.random.default_rng(seed)))
    assert stats.X is None and stats.structure.chain == rows.structure.chain
    assert stats.n_cells == rows.n_cells and stats.n_obs == rows.n_obs
    beta, sigma = jnp.array([50.0, 0.4, -0.1]), jnp.asarray(0.9)
    sc = tuple(jnp.asarray(L) for L in lams)
    vg = jax.jit(jax.value_and_grad(kernels.log_marginal, argnums=(1, 2, 3)))
    (v0, g0), (v1, g1) = vg(rows, beta, sigma, sc), vg(stats, beta, sigma, sc)
    assert abs(float(v1 - v0)) < 1e-9 * abs(float(v0))
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g0)):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-9)
    for a, b in zip(conditional_mean(stats, beta, sigma, sc), conditional_mean(rows, beta, sigma, sc)):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10)


def test_plan_from_statistics_integrates_beta_last():
    X, y, classes, lams = _design("crossed", 4)
    prior = (np.array([40.0, 0.0, 0.0]), np.diag([20.0, 2.0, 2.0]))
    rows = build_plan(X, y, classes, [0, 1], scalar_sigma=True, marginalize_beta=True)
    stats = plan_from_statistics(_cell_sums(X, y, classes, 2, np.random.default_rng(5)), marginalize_beta=True)
    assert stats.beta_block == rows.beta_block == "last"
    sc = tuple(jnp.asarray(L) for L in lams)
    v0 = log_marginal(rows, None, 1.1, sc, None, prior)
    v1 = log_marginal(stats, None, 1.1, sc, None, prior)
    assert abs(float(v1 - v0)) < 1e-9 * abs(float(v0))
    with pytest.raises(ValueError, match="beta_block='last'"):
        plan_from_statistics(_cell_sums(X, y, classes, 2, np.random.default_rng(5)), marginalize_beta=True,
                             beta_block="unit")


def test_chunked_statistics_of_a_model_give_its_ml_criterion():
    """lmmarg.sufficient's chunked statistics (five chunks of a DataFrame) -> plan_from_statistics: the log
    marginal density equals the Model's own at the same parameters (the route from files or a cluster)."""
    import pandas as pd

    import lmmarg
    from lmmarg import sufficient

    rng = np.random.default_rng(11)
    n = 600
    df = pd.DataFrame({"a": rng.integers(0, 30, n).astype(str), "b": rng.integers(0, 5, n).astype(str),
                       "x": rng.normal(size=n), "c": rng.choice(["u", "v", "w"], n)})
    df["y"] = 100.0 + df.x + rng.normal(size=30)[df.a.astype(int)] + rng.normal(size=n)
    formula = "y ~ x + c + (x | a) + (1 | b)"
    chunks = [df.iloc[i:j] for i, j in [(0, 50), (50, 200), (200, 333), (333, 480), (480, n)]]
    spec = sufficient.design_spec(formula, chunks)
    plan = plan_from_statistics(sufficient.statistics(spec, chunks).cell_sums())
    m = lmmarg.Model(formula, df)
    cov = {"a": np.array([[0.8, 0.1], [0.1, 0.3]]), "b": np.array([[0.5]])}
    beta = np.array([100.0, 1.0, 0.1, -0.2])
    want = m.log_marginal(beta, 0.9, cov)
    scales = [np.linalg.cholesky(cov[t.name]) for t in m.terms]
    got = float(log_marginal(plan, beta, 0.9, tuple(scales)))
    assert plan.X is None and plan.n_obs == n
    assert abs(got - want) < 1e-9 * abs(want)


def test_plan_from_statistics_names_a_misshaped_sum():
    X, y, classes, _ = _design("crossed", 6)
    cells = _cell_sums(X, y, classes, 1, np.random.default_rng(6))
    with pytest.raises(ValueError, match=r"CellSums\.S_zX must be"):
        plan_from_statistics(cells._replace(S_zX=cells.S_zX[:, :, :2]))
