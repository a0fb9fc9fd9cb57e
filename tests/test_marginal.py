"""Tests of lmmarg.marginal against a dense O(N^3) Gaussian oracle.

Every kernel call is jitted (eager dispatch compiles each primitive per shape,
which is far slower for these many small designs), with per-function XLA
options that cut XLA:CPU compile time several-fold (no global XLA_FLAGS).
The dense oracle works on tiny matrices, where multi-threaded OpenBLAS only
spins; one BLAS thread is requested (effective if NumPy is not imported yet).
"""
import dataclasses
import functools
import inspect
import subprocess
import sys

import jax


import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from dense_reference import dense_conditional, dense_logpdf  # noqa: E402

from lmmarg.marginal import (  # noqa: E402
    ClassSpec,
    MarginalTooLarge,
    auto_marginalize,
    build_plan,
)
from lmmarg.marginal import conditional_mean as _cond_mean  # noqa: E402
from lmmarg.marginal import conditional_sample, kernels, linalg  # noqa: E402
from lmmarg.marginal import log_marginal as _log_marginal  # noqa: E402

_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
if "compiler_options" in inspect.signature(jax.jit).parameters:
    _jit = functools.partial(jax.jit, compiler_options=_FAST_COMPILE)
else:  # older jax
    _jit = jax.jit

log_marginal = _jit(_log_marginal)
conditional_mean = _jit(_cond_mean)
# the small linear-algebra helpers, jitted once for the module (eagerly, each primitive would compile on its own)
spd_inv_logdet = _jit(linalg.spd_inv_logdet)
small_precision = _jit(linalg.small_precision)
small_mm = _jit(linalg.small_mm)
matmul = _jit(jnp.matmul)
dense_logdet_gram = _jit(kernels.dense_logdet_gram)

# ----------------------------------------------------------------------------- designs


def _Z(rng, N, d):
    return np.column_stack([np.ones(N)] + [rng.normal(size=N) for _ in range(d - 1)])


def _codes(rng, N, G, balanced):
    if balanced:
        return rng.permutation(np.arange(N) % G)
    codes = rng.choice(G - 3, N, p=rng.dirichlet(np.full(G - 3, 0.8)))
    i = rng.choice(N, 2, replace=False)
    codes[i] = [G - 3, G - 1]  # two singleton groups; group G - 2 is empty
    return codes


def _crossed(rng, sizes, reps, balanced, N):
    if balanced:
        grid = np.stack(np.meshgrid(*[np.arange(g) for g in sizes], indexing="ij"), -1)
        grid = np.repeat(grid.reshape(-1, len(sizes)), reps, axis=0)
        return [grid[:, j] for j in range(len(sizes))]
    return [_codes(rng, N, g, False) for g in sizes]


def make_design(kind, seed, dims, balanced):
    """Random LMM design -> dict(X, y, classes, beta, sigma, lams)."""
    rng = np.random.default_rng(seed)
    if kind == "one":
        codes = [_codes(rng, 90, 9, balanced)]
        names, groups = ["g"], [9]
    elif kind == "nested":
        batch = _codes(rng, 100, 5, balanced)
        cask = batch * 3 + (rng.permutation(np.arange(100) % 3) if balanced else rng.integers(0, 3, 100))
        codes, names, groups = [batch, cask], ["batch", "batch:cask"], [5, 15]
    elif kind == "crossed":
        codes = _crossed(rng, [10, 6], 2, balanced, 110)
        names, groups = ["subj", "item"], [10, 6]
    elif kind == "crossed3":
        codes = _crossed(rng, [7, 5, 4], 1, balanced, 120)
        names, groups = ["a", "b", "c"], [7, 5, 4]
    elif kind == "nested_crossed":
        N = 120
        batch = _codes(rng, N, 5, balanced)
        cask = batch * 3 + rng.integers(0, 3, N)
        op = _codes(rng, N, 4, balanced)
        codes, names, groups = [op, batch, cask], ["op", "batch", "batch:cask"], [4, 5, 15]
    elif kind == "xgrp":  # (1 + x || g): two classes with identical grouping
        g = _codes(rng, 80, 8, balanced)
        codes, names, groups = [g, g], ["g", "g.x"], [8, 8]
    elif kind == "xcrossed":  # (1 + x || subj) + (1 + x || item), crossed
        s, i = _crossed(rng, [9, 7], 2, balanced, 126)
        codes, names, groups = [s, i, s, i], ["subj", "item", "subj.x", "item.x"], [9, 7, 9, 7]
    else:
        raise ValueError(kind)
    N = len(codes[0])
    classes = [ClassSpec(n, _Z(rng, N, d), c, G) for n, c, G, d in zip(names, codes, groups, dims)]
    if kind == "xgrp":
        classes[1] = ClassSpec("g.x", rng.normal(size=(N, dims[1])), codes[1], groups[1])
    if kind == "xcrossed":
        for j in (2, 3):
            classes[j] = ClassSpec(names[j], rng.normal(size=(N, dims[j])), codes[j], groups[j])
    X = np.column_stack([np.ones(N), rng.normal(size=N)])
    beta = np.array([0.5, -0.3])
    lams = [_lam(rng, d) for d in dims]
    y = X @ beta + 0.7 * rng.normal(size=N)
    for c, L in zip(classes, lams):
        u = rng.normal(size=(c.n_groups, L.shape[0])) @ L.T
        y += np.sum(c.Z * u[c.codes], axis=1)
    return dict(X=X, y=y, classes=classes, beta=beta, sigma=0.7, lams=lams, rng=rng)


def _lam(rng, d):
    L = np.tril(rng.normal(size=(d, d)) * 0.4)
    L[np.diag_indices(d)] = rng.uniform(0.3, 1.2, d)
    return L


def _offset(des, others):
    """Contribution of the classes in ``others`` with random effects drawn once."""
    rng = np.random.default_rng(99)
    off = np.zeros(len(des["y"]))
    for i in others:
        c = des["classes"][i]
        u = rng.normal(size=(c.n_groups, c.Z.shape[1]))
        off += np.sum(c.Z * u[c.codes], axis=1)
    return off


BETA_PRIOR = (np.array([0.2, -0.1]), np.array([[1.5, 0.0], [0.4, 0.8]]))

DESIGNS = [
    ("one", 0, (1,), True),
    ("one", 1, (4,), False),
    ("nested", 2, (1, 2), False),
    ("nested", 3, (2, 1), True),
    ("crossed", 4, (2, 2), True),
    ("crossed", 5, (1, 3), False),
    ("crossed3", 6, (1, 1, 2), False),
    ("crossed3", 7, (2, 1, 1), True),
    ("nested_crossed", 8, (1, 2, 1), False),
    ("nested_crossed", 9, (2, 1, 2), True),
    ("xgrp", 10, (1, 1), False),
    ("xcrossed", 11, (1, 1, 1, 1), True),
    ("xcrossed", 12, (1, 2, 1, 1), False),
]


def _rel(a, b):
    return abs(float(a) - float(b)) / abs(float(b))


def _ref(des, marg, beta, sigma, lams, offset=None, beta_prior=None):
    return dense_logpdf(des["X"], des["y"], des["classes"], marg, beta, sigma, lams, offset, beta_prior)


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("case", range(len(DESIGNS)))
def test_log_marginal_matches_dense(case):
    kind, seed, dims, balanced = DESIGNS[case]
    des = make_design(kind, seed, dims, balanced)
    X, y, classes, beta, lams = des["X"], des["y"], des["classes"], des["beta"], des["lams"]
    marg = list(range(len(classes)))[::-1]  # caller order != class order
    sc = tuple(lams[i] for i in marg)
    N = len(y)
    plan = build_plan(X, y, classes, marg)
    assert plan.marginalized == tuple(marg)
    sig_i = des["rng"].uniform(0.4, 1.3, N)
    off = des["rng"].normal(size=N)
    # fast path always; the other kernel paths rotate over the designs (compile time)
    other = [(0.7, off), (sig_i, None), (sig_i, off)][case % 3]
    for sigma, offset in [(0.7, None), other]:
        val = log_marginal(plan, beta, sigma, sc, offset)
        assert _rel(val, _ref(des, marg, beta, sigma, sc, offset)) < 1e-10
    planb = build_plan(X, y, classes, marg, marginalize_beta=True)
    sigma, offset = [(0.7, None), (sig_i, off)][case % 2]
    val = log_marginal(planb, None, sigma, sc, offset, beta_prior=BETA_PRIOR)
    assert _rel(val, _ref(des, marg, None, sigma, sc, offset, BETA_PRIOR)) < 1e-10


@pytest.mark.parametrize(
    "kind,seed,dims,marg",
    [
        ("crossed3", 11, (1, 2, 1), [2]),
        ("crossed3", 12, (1, 2, 1), [1, 0]),
        ("nested_crossed", 13, (2, 1, 1), [2, 1]),
        ("nested_crossed", 14, (1, 1, 2), [0, 2]),
    ],
)
def test_partial_marginalization(kind, seed, dims, marg):
    des = make_design(kind, seed, dims, False)
    others = [i for i in range(len(des["classes"])) if i not in marg]
    off = _offset(des, others)
    sc = tuple(des["lams"][i] for i in marg)
    plan = build_plan(des["X"], des["y"], des["classes"], marg)
    sigma = 0.8 if seed % 2 else des["rng"].uniform(0.5, 1.0, len(des["y"]))
    val = log_marginal(plan, des["beta"], sigma, sc, off)
    assert _rel(val, _ref(des, marg, des["beta"], sigma, sc, off)) < 1e-10
    planb = build_plan(des["X"], des["y"], des["classes"], marg, marginalize_beta=True)
    val = log_marginal(planb, None, 0.8, sc, off, beta_prior=BETA_PRIOR)
    assert _rel(val, _ref(des, marg, None, 0.8, sc, off, BETA_PRIOR)) < 1e-10


def test_nothing_or_only_beta_marginalized():
    des = make_design("crossed", 15, (1, 1), False)
    X, y, classes = des["X"], des["y"], des["classes"]
    off = _offset(des, [0, 1])
    sig_i = des["rng"].uniform(0.5, 1.0, len(y))
    plan = build_plan(X, y, classes, [])
    assert plan.dense_size == 0 and plan.chain == () and plan.dense == ()
    for sigma, offset in [(0.9, None), (0.9, off), (sig_i, off)]:
        val = log_marginal(plan, des["beta"], sigma, (), offset)
        assert _rel(val, _ref(des, [], des["beta"], sigma, (), offset)) < 1e-10
    assert conditional_mean(plan, des["beta"], 0.9, (), off) == ()
    planb = build_plan(X, y, classes, [], marginalize_beta=True)
    assert planb.beta_block == "chain"
    for sigma, offset in [(0.9, None), (sig_i, off)]:
        val = log_marginal(planb, None, sigma, (), offset, beta_prior=BETA_PRIOR)
        assert _rel(val, _ref(des, [], None, sigma, (), offset, BETA_PRIOR)) < 1e-10
    mean = conditional_mean(planb, None, sig_i, (), off, beta_prior=BETA_PRIOR)
    rm, _, _ = dense_conditional(X, y, classes, [], None, sig_i, (), off, BETA_PRIOR)
    np.testing.assert_allclose(mean[0], rm, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("kind,seed,dims", [("crossed", 16, (2, 1)), ("nested_crossed", 17, (1, 2, 1))])
def test_float32(kind, seed, dims):
    des = make_design(kind, seed, dims, False)
    marg = list(range(len(dims)))
    sc = tuple(np.float32(des["lams"][i]) for i in marg)
    plan = build_plan(des["X"], des["y"], des["classes"], marg, dtype=jnp.float32)
    assert plan.stats.S_zz.dtype == jnp.float32 and plan.X.dtype == jnp.float32
    sig_i = des["rng"].uniform(0.5, 1.0, len(des["y"]))
    off = des["rng"].normal(size=len(des["y"]))
    for sigma, offset in [(0.7, None), (sig_i, off)]:
        val = log_marginal(plan, np.float32(des["beta"]), sigma, sc, offset)
        assert val.dtype == jnp.float32
        assert _rel(val, _ref(des, marg, des["beta"], sigma, sc, offset)) < 1e-3
    ref = _ref(des, marg, des["beta"], 0.7, sc)   # the precision form (the sampler's) in float32 too
    assert _rel(log_marginal(plan.with_dense_form("precision"), np.float32(des["beta"]), 0.7, sc), ref) < 1e-3
    planb = build_plan(des["X"], des["y"], des["classes"], marg, marginalize_beta=True, dtype=jnp.float32)
    ref = _ref(des, marg, None, 0.7, sc, None, BETA_PRIOR)
    for form in ("scaled", "precision"):
        val = log_marginal(planb.with_dense_form(form), None, 0.7, sc, beta_prior=BETA_PRIOR)
        assert val.dtype == jnp.float32 and _rel(val, ref) < 1e-3
    mean = conditional_mean(planb, None, 0.7, sc, beta_prior=BETA_PRIOR)
    assert all(m.dtype == jnp.float32 for m in mean)


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize(
    "kind,seed,dims,mbeta,per_obs",
    [
        ("crossed", 18, (2, 1), False, False),
        ("nested_crossed", 19, (1, 2, 2), False, True),
        ("nested", 20, (2, 1), True, False),
        ("crossed3", 21, (1, 1, 2), True, True),
        ("xcrossed", 44, (1, 2, 1, 1), False, False),
        ("xcrossed", 45, (1, 1, 1, 1), True, True),
    ],
)
def test_gradients_match_finite_differences(kind, seed, dims, mbeta, per_obs):
    des = make_design(kind, seed, dims, False)
    marg = list(range(len(dims)))
    N = len(des["y"])
    plan = build_plan(des["X"], des["y"], des["classes"], marg, marginalize_beta=mbeta)
    off = des["rng"].normal(size=N) * 0.3 if per_obs else None
    theta = dict(
        beta=jnp.asarray(des["beta"]),
        sigma=jnp.asarray(des["rng"].uniform(0.5, 1.0, N) if per_obs else 0.7),
        scales=tuple(jnp.asarray(des["lams"][i]) for i in marg),
        prior=tuple(jnp.asarray(a) for a in BETA_PRIOR),
    )

    def f(t):
        return _log_marginal(plan, t["beta"], t["sigma"], t["scales"], off, t["prior"] if mbeta else None)

    g = _jit(jax.grad(f))(theta)
    f = _jit(f)
    leaves, tdef = jax.tree_util.tree_flatten(theta)
    rng = np.random.default_rng(seed)
    for _ in range(4):
        dirs = [jnp.asarray(np.tril(rng.normal(size=x.shape)) if x.ndim == 2 else rng.normal(size=x.shape))
                for x in leaves]
        v = jax.tree_util.tree_unflatten(tdef, dirs)
        plus = jax.tree_util.tree_map(lambda a, b: a + 1e-5 * b, theta, v)
        minus = jax.tree_util.tree_map(lambda a, b: a - 1e-5 * b, theta, v)
        fd = (f(plus) - f(minus)) / (2 * 1e-5)
        an = sum(jnp.vdot(a, b) for a, b in zip(jax.tree_util.tree_leaves(g), dirs))
        assert abs(float(fd - an)) <= 1e-6 * (1 + abs(float(an))), (float(fd), float(an))


# ----------------------------------------------------------------------------- recovery


def _flat(tup):
    return np.concatenate([np.ravel(np.asarray(a)) for a in tup])


@pytest.mark.parametrize(
    "kind,seed,dims,marg,mbeta",
    [
        ("one", 22, (3,), [0], False),
        ("nested", 23, (1, 2), [1, 0], True),
        ("crossed", 24, (2, 2), [0, 1], True),
        ("crossed3", 25, (1, 2, 1), [2, 0, 1], False),
        ("nested_crossed", 26, (2, 1, 1), [0, 1, 2], True),
        ("nested_crossed", 27, (1, 1, 2), [2, 0], False),
        ("xgrp", 28, (1, 2), [0, 1], True),
        ("xcrossed", 41, (1, 1, 1, 1), [3, 0, 1, 2], False),
        ("xcrossed", 42, (1, 1, 2, 1), [1, 2, 0], True),
    ],
)
def test_conditional_mean_matches_dense(kind, seed, dims, marg, mbeta):
    des = make_design(kind, seed, dims, False)
    N = len(des["y"])
    others = [i for i in range(len(dims)) if i not in marg]
    off = _offset(des, others) if others else None
    sc = tuple(des["lams"][i] for i in marg)
    sig_i = des["rng"].uniform(0.5, 1.0, N)
    bp = BETA_PRIOR if mbeta else None
    plan = build_plan(des["X"], des["y"], des["classes"], marg, marginalize_beta=mbeta)
    for sigma in [[0.7, sig_i][seed % 2]]:
        mean = conditional_mean(plan, des["beta"], sigma, sc, off, bp)
        rm, _, sizes = dense_conditional(des["X"], des["y"], des["classes"], marg, des["beta"], sigma, sc, off, bp)
        assert len(mean) == len(marg) + mbeta
        for a, i in zip(mean, marg):
            assert a.shape == (des["classes"][i].n_groups, dims[i])
        if mbeta:
            assert mean[-1].shape == (2,)
        np.testing.assert_allclose(_flat(mean), rm, rtol=1e-8, atol=1e-8 * np.abs(rm).max())


@pytest.mark.parametrize(
    "kind,seed,dims,mbeta",
    [("nested_crossed", 29, (1, 2, 1), True), ("nested", 30, (2, 1), True), ("crossed", 31, (1, 2), False),
     ("xcrossed", 43, (1, 1, 1, 1), False)],
)
def test_conditional_sample_moments(kind, seed, dims, mbeta):
    des = make_design(kind, seed, dims, False)
    marg = list(range(len(dims)))
    sc = tuple(des["lams"][i] for i in marg)
    bp = BETA_PRIOR if mbeta else None
    plan = build_plan(des["X"], des["y"], des["classes"], marg, marginalize_beta=mbeta)
    n = 20000
    keys = jax.random.split(jax.random.PRNGKey(seed), n)
    draws = _jit(jax.vmap(lambda k: conditional_sample(plan, k, des["beta"], 0.7, sc, None, bp)))(keys)
    S = np.concatenate([np.asarray(a).reshape(n, -1) for a in draws], axis=1)
    rm, rc, _ = dense_conditional(des["X"], des["y"], des["classes"], marg, des["beta"], 0.7, sc, None, bp)
    sd = np.sqrt(np.diag(rc))
    assert np.all(np.abs(S.mean(0) - rm) <= 5 * sd / np.sqrt(n))
    C = np.cov(S, rowvar=False)
    se = np.sqrt((np.outer(sd**2, sd**2) + rc**2) / n)
    assert np.all(np.abs(C - rc) <= 6 * se)


def test_vmap_over_parameter_draws():
    des = make_design("nested_crossed", 32, (1, 1, 2), False)
    marg = [0, 1, 2]
    plan = build_plan(des["X"], des["y"], des["classes"], marg, marginalize_beta=True)
    B = 3
    rng = np.random.default_rng(0)
    sig = jnp.asarray(rng.uniform(0.5, 1.0, B))
    scs = tuple(jnp.asarray(np.stack([_lam(rng, des["lams"][i].shape[0]) for _ in range(B)])) for i in marg)
    mus = jnp.asarray(rng.normal(size=(B, 2)))
    S = jnp.asarray(BETA_PRIOR[1])

    def one(key, s, sc, mu):
        return conditional_sample(plan, key, None, s, sc, None, (mu, S))

    keys = jax.random.split(jax.random.PRNGKey(1), B)
    out = _jit(jax.vmap(one))(keys, sig, scs, mus)
    assert out[0].shape == (B, 4, 1) and out[-1].shape == (B, 2)
    lm = _jit(jax.vmap(lambda s, sc, mu: _log_marginal(plan, None, s, sc, None, (mu, S))))(sig, scs, mus)
    for b in range(B):
        single = log_marginal(plan, None, sig[b], tuple(a[b] for a in scs), None, (mus[b], S))
        np.testing.assert_allclose(lm[b], single, rtol=1e-12)
        ref = _jit(one)(keys[b], sig[b], tuple(a[b] for a in scs), mus[b])
        np.testing.assert_allclose(_flat([o[b] for o in out]), _flat(ref), rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- edge cases


def test_singular_scale_is_finite_and_exact():
    des = make_design("crossed", 33, (2, 2), False)
    marg = [0, 1]
    L0 = np.array([[0.8, 0.0], [0.5, 0.0]])  # rank one: zero second column
    L1 = np.zeros((2, 2))  # class switched off entirely
    plan = build_plan(des["X"], des["y"], des["classes"], marg)
    vg = _jit(jax.value_and_grad(lambda b, s, sc: _log_marginal(plan, b, s, sc), argnums=(0, 1, 2)))
    val, g = vg(jnp.asarray(des["beta"]), 0.7, (jnp.asarray(L0), jnp.asarray(L1)))
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(g))
    sig_i = des["rng"].uniform(0.5, 1.0, len(des["y"]))
    val_i = log_marginal(plan, des["beta"], sig_i, (L0, L1))
    for v, sigma in [(val, 0.7), (val_i, sig_i)]:
        assert np.isfinite(v)
        assert _rel(v, _ref(des, marg, des["beta"], sigma, (L0, L1))) < 1e-10
        assert _rel(v, _ref(des, [0], des["beta"], sigma, (L0,))) < 1e-10
    mean = conditional_mean(plan, des["beta"], 0.7, (L0, L1))
    assert np.all(mean[1] == 0) and np.all(np.isfinite(mean[0]))


def test_nonfinite_inputs_give_minus_inf():
    des = make_design("crossed", 34, (1, 2), False)
    marg = [0, 1]
    plan = build_plan(des["X"], des["y"], des["classes"], marg)
    beta = jnp.asarray(des["beta"])
    sc = tuple(jnp.asarray(des["lams"][i]) for i in marg)
    N = len(des["y"])
    vg = _jit(jax.value_and_grad(lambda b, s, sc, off: _log_marginal(plan, b, s, sc, off), argnums=(0, 1, 2)))
    sig, off = jnp.full(N, 0.7), jnp.zeros(N)
    bad_scale = (sc[0], sc[1].at[1, 0].set(jnp.nan))
    cases = [
        (beta, jnp.nan, sc, None),  # fast path
        (beta, 0.7, sc, None),  # valid, fast path
        (beta, sig.at[3].set(jnp.nan), sc, off),  # general path from here on
        (beta, sig.at[3].set(-1.0), sc, off),
        (beta, sig.at[3].set(0.0), sc, off),
        (beta.at[0].set(jnp.inf), sig, sc, off),
        (beta, sig, bad_scale, off),
        (beta, sig, sc, off.at[5].set(jnp.inf)),
        (beta, sig, sc, off),  # valid
    ]
    for k, (b, s, scl, o) in enumerate(cases):
        val, g = vg(b, jnp.asarray(s), scl, o)
        assert np.isfinite(val) if k in (1, 8) else val == -jnp.inf
        assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(g))
    planb = build_plan(des["X"], des["y"], des["classes"], marg, marginalize_beta=True)
    bad_prior = (jnp.array([jnp.nan, 0.0]), jnp.eye(2))
    assert log_marginal(planb, None, 0.7, sc, None, bad_prior) == -jnp.inf
    mean = conditional_mean(planb, None, 0.7, sc, None, bad_prior)
    assert all(np.all(np.isnan(m)) for m in mean)


def test_marginal_too_large_names_classes():
    rng = np.random.default_rng(35)
    N = 400
    classes = [
        ClassSpec("subj", _Z(rng, N, 2), rng.integers(0, 60, N), 60),
        ClassSpec("item", _Z(rng, N, 2), rng.integers(0, 50, N), 50),
        ClassSpec("site", _Z(rng, N, 1), rng.integers(0, 3, N), 3),
    ]
    X, y = np.ones((N, 1)), rng.normal(size=N)
    with pytest.raises(MarginalTooLarge) as exc:
        build_plan(X, y, classes, [0, 1, 2], dense_limit=50)
    msg = str(exc.value)
    assert "item" in msg and "site" in msg and "subj" in msg and "50" in msg
    assert "HMC" in msg
    assert isinstance(exc.value, ValueError)
    build_plan(X, y, classes, [0, 1, 2], dense_limit=103)  # 50 * 2 + 3 fits


def test_auto_marginalize_toy():
    rng = np.random.default_rng(36)
    N = 300
    subj = rng.integers(0, 40, N)
    classes = [
        ClassSpec("item", _Z(rng, N, 2), rng.integers(0, 30, N), 30),  # 60 dense coefficients
        ClassSpec("subj", _Z(rng, N, 1), subj, 40),  # finest: chain
        ClassSpec("site", _Z(rng, N, 1), subj // 10, 4),  # subj nested in site: chain
        ClassSpec("day", _Z(rng, N, 1), rng.integers(0, 7, N), 7),  # 7 dense coefficients
    ]
    assert auto_marginalize(classes, dense_limit=4000) == [0, 1, 2, 3]
    assert auto_marginalize(classes, dense_limit=20) == [0, 2, 3]  # item in chain, site+day dense
    assert auto_marginalize(classes, dense_limit=10) == [1, 2, 3]
    assert auto_marginalize(classes, dense_limit=0) == [1, 2]
    plan = build_plan(np.ones((N, 1)), rng.normal(size=N), classes, [0, 1, 2, 3])
    assert plan.chain == (1, 2) and plan.dense == (0, 3) and plan.dense_size == 67


def test_plan_structure_pytree_and_jit():
    des = make_design("nested_crossed", 37, (1, 2, 1), True)
    plan = build_plan(des["X"], des["y"], des["classes"], [2, 0, 1], marginalize_beta=True)
    assert plan.chain == (2, 1) and plan.dense == (0,) and plan.beta_block == "dense"
    assert plan.marginalized == (2, 0, 1)
    assert plan.dense_size == 4 + 2 and isinstance(plan.n_cells, int)
    text = plan.describe()
    assert "batch:cask" in text and "op" in text and "dense" in text
    leaves, tdef = jax.tree_util.tree_flatten(plan)
    assert all(isinstance(x, jax.Array) for x in leaves)
    plan2 = jax.tree_util.tree_unflatten(tdef, leaves)
    assert plan2.chain == plan.chain
    sc = tuple(des["lams"][i] for i in plan.marginalized)
    a = log_marginal(plan, None, 0.7, sc, None, BETA_PRIOR)  # plan as a jit argument
    b = _jit(lambda s: _log_marginal(plan, None, s, sc, None, BETA_PRIOR))(0.7)  # closed over
    np.testing.assert_allclose(a, b, rtol=1e-12)
    xg = build_plan(*[make_design("xgrp", 38, (1, 1), False)[k] for k in ("X", "y", "classes")], [0, 1])
    assert xg.dense == () and len(xg.chain) == 2
    # terms on one grouping factor share one unit, Lambda block-diagonal over them
    assert xg.structure.unit_src == ((0, 1),) and xg.unit_dims == (2,) and xg.structure.term_dims == (1, 1)
    xc = build_plan(*[make_design("xcrossed", 40, (1, 2, 1, 1), True)[k] for k in ("X", "y", "classes")],
                    [3, 1, 0, 2])
    assert xc.structure.unit_src == ((2, 3), (0, 1)) and xc.unit_dims == (2, 3) and xc.dense_size == 7 * 3
    assert xc.blocks.one_level is not None and "'subj+subj.x' (9 groups x d=2)" in xc.describe()
    assert "'item.x+item' (7 x 3)" in xc.describe()
    assert kernels.term_shape(xc, 2) == (9, 1) and kernels.term_shape(xc, 1) == (7, 2)
    cr = build_plan(*[make_design("crossed", 39, (1, 1), True)[k] for k in ("X", "y", "classes")], [1, 0])
    assert cr.chain == (0,) and cr.dense == (1,)


@pytest.mark.parametrize("mode", ["pairs", "mtm"])
def test_fill_strategies_agree(mode):
    des = make_design("nested_crossed", 40, (2, 1, 2), False)
    marg = [0, 1, 2]
    sc = tuple(des["lams"][i] for i in marg)
    plan = build_plan(des["X"], des["y"], des["classes"], marg, marginalize_beta=True, chain_fill=mode)
    assert plan.fills == (mode, mode)
    sig_i = des["rng"].uniform(0.5, 1.0, len(des["y"]))
    val = log_marginal(plan, None, sig_i, sc, None, BETA_PRIOR)
    assert _rel(val, _ref(des, marg, None, sig_i, sc, None, BETA_PRIOR)) < 1e-10
    mean = conditional_mean(plan, None, sig_i, sc, None, BETA_PRIOR)
    rm, _, _ = dense_conditional(des["X"], des["y"], des["classes"], marg, None, sig_i, sc, None, BETA_PRIOR)
    np.testing.assert_allclose(_flat(mean), rm, rtol=1e-8, atol=1e-10)


def test_import_does_not_enable_x64():
    code = "import jax, lmmarg.marginal; assert not jax.config.jax_enable_x64"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_dense_logdet_gram_value_and_gradient():
    """The custom-VJP dense block (log|F|, Bᵀ F⁻¹ B) matches plain linear algebra and its JAX autodiff."""
    from lmmarg.marginal import kernels

    rng = np.random.default_rng(3)
    A = rng.normal(size=(7, 7))
    F = jnp.asarray(A @ A.T + 7 * np.eye(7))
    B = jnp.asarray(rng.normal(size=(7, 3)))
    W = jnp.asarray(rng.normal(size=(3, 3)))

    def loss(f, F, B):
        ld, G = f(F, B)
        return 0.7 * ld + jnp.sum(W * G)

    plain = lambda F, B: (jnp.linalg.slogdet(F)[1], B.T @ jnp.linalg.solve(F, B))  # noqa: E731
    ld, G = dense_logdet_gram(F, B)
    ld0, G0 = _jit(plain)(F, B)
    assert abs(float(ld - ld0)) < 1e-12
    np.testing.assert_allclose(G, G0, rtol=1e-12)
    # compare along symmetric perturbations of F (the function is defined on symmetric matrices)
    gF, gB = _jit(jax.grad(loss, argnums=(1, 2)), static_argnums=0)(kernels.dense_logdet_gram, F, B)
    gF0, gB0 = _jit(jax.grad(loss, argnums=(1, 2)), static_argnums=0)(plain, F, B)
    np.testing.assert_allclose(gF + gF.T, gF0 + gF0.T, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(gB, gB0, rtol=1e-10, atol=1e-12)


FILL_TYPES = {"dense": "DenseProductFill", "pairs": "PairListFill", "pooled": "PooledFill"}


@pytest.mark.parametrize("fill", ["dense", "pairs", "pooled"])
@pytest.mark.parametrize("kind,seed,dims,marg", [("crossed", 41, (2, 1), [0, 1]),
                                                 ("crossed3", 42, (1, 2, 1), [0, 1, 2]),
                                                 ("crossed3", 43, (2, 1, 1), [1, 2])])
def test_one_level_path_matches_generic(kind, seed, dims, marg, fill):
    """The constant-statistics path (one chain level + dense block, scalar σ) gives the generic elimination's value
    and gradient, with and without an offset, with the level-1 fill as dense products, sorted coefficient lists or
    pooled classes of equal group statistics (build_plan's level1_fill option)."""
    from lmmarg.marginal import kernels

    des = make_design(kind, seed, dims, False)
    plan = build_plan(des["X"], des["y"], des["classes"], marg, level1_fill=fill)
    assert plan.blocks.one_level is not None and plan.n_chain_units == 1
    assert type(plan.blocks.level1).__name__ == FILL_TYPES[fill]
    generic = dataclasses.replace(plan, blocks=dataclasses.replace(plan.blocks, one_level=None, level1=None))
    others = [i for i in range(len(des["classes"])) if i not in marg]
    offset = jnp.asarray(_offset(des, others)) if others else None
    sc = tuple(jnp.asarray(des["lams"][i]) for i in marg)
    beta, sigma = jnp.asarray(des["beta"]), jnp.asarray(0.8)

    def f(pl, beta, sigma, sc):
        return kernels.log_marginal(pl, beta, sigma, sc, offset)

    vg = _jit(jax.value_and_grad(f, argnums=(1, 2, 3)))
    v1, g1 = vg(plan, beta, sigma, sc)
    v0, g0 = vg(generic, beta, sigma, sc)
    assert _rel(v1, v0) < 1e-12
    assert _rel(v1, _ref(des, marg, des["beta"], 0.8, [np.asarray(s) for s in sc], offset)) < 1e-10
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g0)):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-10)


def test_scalar_sigma_plan_rejects_vector_sigma():
    des = make_design("crossed", 44, (1, 1), False)
    plan = build_plan(des["X"], des["y"], des["classes"], [0, 1], scalar_sigma=True)
    if plan.fills[0] != "pairs":
        pytest.skip("level-1 fill is not the pair scatter for this design")
    assert plan.blocks.chain_fills[0].pa is None
    with pytest.raises(ValueError, match="scalar sigma"):
        log_marginal(plan, des["beta"], np.full(len(des["y"]), 0.7), tuple(des["lams"][:2]))
    full = build_plan(des["X"], des["y"], des["classes"], [0, 1])
    sc = tuple(des["lams"][:2])
    assert _rel(log_marginal(plan, des["beta"], 0.7, sc), log_marginal(full, des["beta"], 0.7, sc)) < 1e-12


@pytest.mark.parametrize("fill", ["dense", "pairs", "pooled"])
def test_structured_fill_in_nested_chain(fill):
    """Nested chain + crossed dense block, scalar σ: every level-1 constant-structure fill (dense products, sparse
    lists, pooled classes) gives the dense-oracle value."""
    des = make_design("nested_crossed", 45, (2, 1, 2), False)
    marg = [0, 1, 2]
    plan = build_plan(des["X"], des["y"], des["classes"], marg, level1_fill=fill)
    assert type(plan.blocks.level1).__name__ == FILL_TYPES[fill]
    assert plan.n_chain_units == 2 and plan.blocks.level1 is not None and plan.blocks.one_level is None
    sc = tuple(des["lams"][i] for i in marg)
    val = log_marginal(plan, des["beta"], 0.7, sc)
    assert _rel(val, _ref(des, marg, des["beta"], 0.7, sc)) < 1e-10


def test_pooled_fill_merges_groups_with_equal_statistics():
    """Intercept-only crossed classes: level-1 groups with the same size share R_g, so the pooled fill has fewer
    classes than groups, and value, gradient and conditional means still equal the dense oracle / other fills."""
    from lmmarg.marginal import kernels

    rng = np.random.default_rng(7)
    N, Ga, Gb = 400, 60, 9
    a = np.repeat(np.arange(Ga), rng.integers(3, 10, Ga))[:N]
    a = np.concatenate([a, rng.integers(0, Ga, N - a.size)]) if a.size < N else a
    b = rng.integers(0, Gb, N)
    one = np.ones((N, 1))
    X = np.column_stack([np.ones(N), rng.normal(size=N)])
    y = X @ [1.0, 0.4] + rng.normal(size=Ga)[a] + 0.5 * rng.normal(size=Gb)[b] + rng.normal(size=N)
    classes = [ClassSpec("a", one, a, Ga), ClassSpec("b", one, b, Gb)]
    pooled = build_plan(X, y, classes, [0, 1], level1_fill="pooled")
    pairs = build_plan(X, y, classes, [0, 1], level1_fill="pairs")
    U = pooled.blocks.level1.rep.shape[0]
    assert U < Ga and U == np.unique(np.bincount(a, minlength=Ga)).size
    sc = (jnp.array([[0.9]]), jnp.array([[0.6]]))
    beta, sigma = jnp.array([0.8, 0.3]), jnp.asarray(1.1)
    ref = dense_logpdf(X, y, classes, [0, 1], np.asarray(beta), 1.1, [np.asarray(s) for s in sc])
    f = lambda pl, beta, sigma, sc: kernels.log_marginal(pl, beta, sigma, sc)  # noqa: E731
    vg = _jit(jax.value_and_grad(f, argnums=(1, 2, 3)))
    v1, g1 = vg(pooled, beta, sigma, sc)
    v0, g0 = vg(pairs, beta, sigma, sc)
    assert _rel(v1, ref) < 1e-10
    for x1, x0 in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g0)):
        np.testing.assert_allclose(x1, x0, rtol=1e-9, atol=1e-10)
    m1 = conditional_mean(pooled, beta, sigma, sc)
    m0 = conditional_mean(pairs, beta, sigma, sc)
    for x1, x0 in zip(m1, m0):
        np.testing.assert_allclose(x1, x0, rtol=1e-9, atol=1e-11)


def test_too_large_advice_names_terms_that_resolve():
    """MarginalTooLarge's suggestion names terms (not indices), so it works as written in Model(marginalize=...)."""
    import ast
    import re

    from lmmarg.marginal import MarginalTooLarge

    des = make_design("crossed3", 46, (1, 1, 1), False)
    with pytest.raises(MarginalTooLarge) as err:
        build_plan(des["X"], des["y"], des["classes"], [0, 1, 2], dense_limit=6)
    names = ast.literal_eval(re.search(r"marginalize=(\[.*?\])", str(err.value)).group(1))
    assert names and set(names) <= {c.name for c in des["classes"]}
    idx = [[c.name for c in des["classes"]].index(n) for n in names]
    plan = build_plan(des["X"], des["y"], des["classes"], idx, dense_limit=6)
    assert plan.dense_size <= 6



@pytest.mark.parametrize("form", ["y ~ x + (x | a) + (x | b)", "y ~ x + (1 | a) + (x | b)",
                                  "y ~ x + (1 | a) + (1 | b)"])
def test_one_level_recovery_matches_the_general_elimination(form):
    """Scalar σ, one chain level + dense block: conditional means and draws come from the plan's constants
    (the one-level draw in lmmarg.marginal.kernels); they equal the per-cell elimination of a per-observation-σ plan
    (same ε)."""
    import pandas as pd

    from lmmarg import Model
    from lmmarg.marginal import kernels
    rng = np.random.default_rng(0)
    n = 600
    df = pd.DataFrame({"a": rng.integers(0, 40, n).astype(str), "b": rng.integers(0, 7, n).astype(str),
                       "x": rng.normal(size=n)})
    df["y"] = rng.normal(size=n) + df.x
    m = Model(form, df)
    p1, p2 = m.plan("all"), m.plan("all", per_obs_sigma=True)
    assert p1.blocks.one_level is not None   # the one-level path; a vector σ takes the general elimination
    beta, sig = jnp.array([0.3, 0.8]), 0.9
    sc = [jnp.asarray(np.tril(rng.normal(size=(t.d, t.d))) + np.eye(t.d)) for t in m.terms]
    sc = [sc[h] for h in p1.marginalized]
    for a, b in zip(conditional_mean(p1, beta, sig, sc),
                    conditional_mean(p2, beta, jnp.full(n, sig), sc)):
        np.testing.assert_allclose(a, b, atol=1e-12)
    key = jax.random.PRNGKey(3)
    draw = _jit(kernels.conditional_sample)
    for a, b in zip(draw(p1, key, beta, sig, sc),
                    draw(p2, key, beta, jnp.full(n, sig), sc)):
        np.testing.assert_allclose(a, b, atol=1e-12)


def test_pooled_class_grams_dense_and_sparse_builds_agree():
    """The pooled fill's constants K_u = sum_{g in class u} B_g B_g^T: one BLAS product per class (few classes)
    and the sparse product (many classes) give the same matrices."""
    import scipy.sparse as sp

    from lmmarg.marginal.blocks import class_grams

    rng = np.random.default_rng(44)
    ds, G0, d0, U = 7, 30, 2, 5
    B = sp.random(ds, G0 * d0, density=0.3, random_state=rng, format="csc")
    cls = rng.integers(0, U, G0)
    count = np.bincount(cls, minlength=U)
    Bcols = [B[:, np.arange(G0) * d0 + a].tocoo() for a in range(d0)]
    Bblk = [sp.csr_matrix((Ba.data, (cls[Ba.col] * ds + Ba.row, Ba.col)), shape=(U * ds, G0)) for Ba in Bcols]
    dense = class_grams(B, Bcols, Bblk, cls, count, d0, G0, ds)
    sparse = class_grams(B, Bcols, Bblk, cls, count, d0, G0, ds, blas_max_classes=0)
    Bd = B.toarray().reshape(ds, G0, d0)
    want = np.stack([np.einsum("iga,jgb->abij", Bd[:, cls == u], Bd[:, cls == u]) for u in range(U)])
    np.testing.assert_allclose(dense, want, atol=1e-12)
    np.testing.assert_allclose(sparse, want, atol=1e-12)


@pytest.mark.parametrize(
    "kind,seed,dims",
    [("one", 45, (2,)), ("crossed", 46, (2, 2)), ("nested_crossed", 47, (1, 2, 1)), ("xcrossed", 48, (1, 1, 2, 1))],
)
def test_beta_eliminated_last_matches_dense(kind, seed, dims):
    """beta_block='last' (the default for scalar-sigma plans with every class marginalized): beta eliminated by a
    p x p Schur complement after the random effects. Density, conditional means (beta last) and sampling moments
    against the dense oracle, and the density equal to the beta-as-a-unit plan's."""
    des = make_design(kind, seed, dims, False)
    marg = list(range(len(dims)))[::-1]
    sc = tuple(des["lams"][i] for i in marg)
    plan = build_plan(des["X"], des["y"], des["classes"], marg, marginalize_beta=True, scalar_sigma=True)
    unit = build_plan(des["X"], des["y"], des["classes"], marg, marginalize_beta=True, scalar_sigma=True,
                      beta_block="unit")
    assert plan.beta_block == "last" and unit.beta_block in ("dense", "chain")
    assert plan.dense_size == unit.dense_size - (2 if unit.beta_block == "dense" else 0)
    val = log_marginal(plan, None, 0.7, sc, None, BETA_PRIOR)
    ref = _ref(des, marg, None, 0.7, sc, None, BETA_PRIOR)
    assert _rel(val, ref) < 1e-10
    assert _rel(log_marginal(unit, None, 0.7, sc, None, BETA_PRIOR), ref) < 1e-10
    mean = conditional_mean(plan, None, 0.7, sc, None, BETA_PRIOR)
    rm, rc, _ = dense_conditional(des["X"], des["y"], des["classes"], marg, None, 0.7, sc, None, BETA_PRIOR)
    assert len(mean) == len(marg) + 1 and mean[-1].shape == (2,)
    np.testing.assert_allclose(_flat(mean), rm, rtol=1e-8, atol=1e-8 * np.abs(rm).max())
    # gradients through the Schur complement (sigma, the scales, the prior) are finite and match the unit plan's
    grad = _jit(jax.grad(lambda p, s, L: kernels.log_marginal(p, None, s, L, None, BETA_PRIOR), argnums=(1, 2)))
    g_last, g_unit = grad(plan, 0.7, sc), grad(unit, 0.7, sc)
    np.testing.assert_allclose(_flat(jax.tree_util.tree_leaves(g_last)), _flat(jax.tree_util.tree_leaves(g_unit)),
                               rtol=1e-7, atol=1e-9)
    if kind == "crossed":
        n = 20000
        keys = jax.random.split(jax.random.PRNGKey(seed), n)
        draws = _jit(jax.vmap(lambda k: conditional_sample(plan, k, None, 0.7, sc, None, BETA_PRIOR)))(keys)
        S = np.concatenate([np.asarray(a).reshape(n, -1) for a in draws], axis=1)
        sd = np.sqrt(np.diag(rc))
        assert np.all(np.abs(S.mean(0) - rm) <= 5 * sd / np.sqrt(n))
        C = np.cov(S, rowvar=False)
        assert np.all(np.abs(C - rc) <= 6 * np.sqrt((np.outer(sd**2, sd**2) + rc**2) / n))
    with pytest.raises(ValueError, match="beta_block='last'"):
        log_marginal(plan, None, jnp.full(len(des["y"]), 0.7), sc, None, BETA_PRIOR)
    with pytest.raises(ValueError, match="beta_block"):
        build_plan(des["X"], des["y"], des["classes"], marg[:-1], marginalize_beta=True, scalar_sigma=True,
                   beta_block="last")


@pytest.mark.parametrize("fill", ["dense", "pairs", "pooled"])
@pytest.mark.parametrize("kind,seed,dims,marg,mbeta", [("crossed", 51, (2, 2), [0, 1], False),
                                                       ("crossed", 52, (1, 3), [0, 1], True),
                                                       ("crossed3", 53, (1, 2, 1), [0, 1, 2], False),
                                                       ("crossed3", 54, (2, 1, 2), [0, 1, 2], True),
                                                       ("crossed3", 55, (2, 1, 1), [1, 2], False),
                                                       ("xcrossed", 56, (1, 2, 1, 1), [0, 1, 2, 3], False)])
def test_precision_dense_form_matches_scaled_and_dense(kind, seed, dims, marg, mbeta, fill):
    """The precision form of the one-level dense block (F~ = Sigma_D^-1 + M, log|F| = log|F~| + log|Sigma_D|, the
    sampler's potential) gives the scaled form's value and gradient and the dense oracle's value: one or several
    dense units, d = 1 to 3, terms stacked on one grouping factor, an HMC offset, beta integrated out last."""
    des = make_design(kind, seed, dims, False)
    scaled = build_plan(des["X"], des["y"], des["classes"], marg, level1_fill=fill, scalar_sigma=True,
                        marginalize_beta=mbeta)
    assert scaled.blocks.one_level is not None and scaled.dense_form == "scaled"
    prec = scaled.with_dense_form("precision")
    assert prec.dense_form == "precision" and "precision form" in prec.describe()
    others = [i for i in range(len(des["classes"])) if i not in marg]
    offset = jnp.asarray(_offset(des, others)) if others else None
    sc = tuple(jnp.asarray(des["lams"][i]) for i in marg)
    beta, sigma = jnp.asarray(des["beta"]), jnp.asarray(0.8)
    bp = tuple(jnp.asarray(a) for a in BETA_PRIOR) if mbeta else None

    def f(pl, beta, sigma, sc):
        return kernels.log_marginal(pl, beta, sigma, sc, offset, bp)

    vg = _jit(jax.value_and_grad(f, argnums=(1, 2, 3)))
    v1, g1 = vg(prec, beta, sigma, sc)
    v0, g0 = vg(scaled, beta, sigma, sc)
    assert _rel(v1, v0) < 1e-12
    ref = _ref(des, marg, des["beta"], 0.8, [np.asarray(s) for s in sc], offset, BETA_PRIOR if mbeta else None)
    assert _rel(v1, ref) < 1e-10
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g0)):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-9)


def test_precision_dense_form_singular_lambda_is_minus_inf_with_finite_gradient():
    """A zero SD of a dense class: the scaled form stays exact (lme4's boundary), the precision form (which needs
    Sigma_D^-1) returns -inf with a finite gradient instead of NaN; an invalid form name is refused."""
    des = make_design("crossed", 57, (2, 2), False)
    scaled = build_plan(des["X"], des["y"], des["classes"], [0, 1], scalar_sigma=True)
    prec = scaled.with_dense_form("precision")
    dense_term = scaled.structure.unit_src[-1][0]              # the marginalized term that forms the dense block
    sc = [jnp.asarray(L) for L in des["lams"]]
    sc[dense_term] = sc[dense_term].at[1, :].set(0.0)   # second SD of the dense term is 0: Lambda singular
    beta, sigma = jnp.asarray(des["beta"]), jnp.asarray(0.8)
    f = _jit(jax.value_and_grad(lambda pl, b, s, sc: kernels.log_marginal(pl, b, s, sc), argnums=(1, 2, 3)))
    v0, _ = f(scaled, beta, sigma, tuple(sc))
    assert np.isfinite(float(v0))
    assert _rel(v0, _ref(des, [0, 1], des["beta"], 0.8, [np.asarray(s) for s in sc])) < 1e-10
    v1, g1 = f(prec, beta, sigma, tuple(sc))
    assert float(v1) == -np.inf
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree_util.tree_leaves(g1))
    with pytest.raises(ValueError, match="dense_form must be one of"):
        scaled.with_dense_form("cholesky")


@pytest.mark.parametrize("n", [7, 21, 80, 161, 600])
def test_spd_inverse_blocked_and_lapack_paths(n):
    """F^-1 from its Cholesky factor: one triangular solve and one GEMM (n <= TRI_INV_BLOCK), the halved inverse
    and two GEMMs that skip its zero block (up to BLOCKED_INVERSE_MAX; odd sizes split unevenly), LAPACK's solves
    above; equal to NumPy's inverse, and symmetric."""
    rng = np.random.default_rng(n)
    A = rng.normal(size=(n, n))
    F = A @ A.T / n + np.eye(n)
    Finv = np.asarray(_jit(linalg.spd_inverse)(jnp.asarray(np.linalg.cholesky(F))))
    np.testing.assert_allclose(Finv, np.linalg.inv(F), rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(Finv, Finv.T, rtol=0, atol=1e-12)


def test_gather_only_reverse_passes_match_autodiff():
    """The custom reverse passes of the symmetric unpacking and of I_G kron P equal autodiff of the plain forms."""
    rng = np.random.default_rng(5)
    n, G, d = 6, 4, 3
    iu, ju = np.triu_indices(n)
    tri = np.empty((n, n), np.int32)
    tri[iu, ju] = np.arange(iu.size)
    tri[ju, iu] = np.arange(iu.size)
    t = jnp.asarray(rng.normal(size=iu.size))
    W = jnp.asarray(rng.normal(size=(n, n)))
    g1 = _jit(jax.grad(lambda t: jnp.sum(W * linalg.unpack_symmetric(t, jnp.asarray(tri)) ** 2)))(t)
    g0 = _jit(jax.grad(lambda t: jnp.sum(W * t[tri] ** 2)))(t)
    np.testing.assert_allclose(g1, g0, rtol=1e-12)
    P = jnp.asarray(rng.normal(size=(d, d)))
    W2 = jnp.asarray(rng.normal(size=(G * d, G * d)))
    v1, h1 = _jit(jax.value_and_grad(lambda P: jnp.sum(W2 * jnp.sin(linalg.eye_kron(P, G)))))(P)
    v0, h0 = _jit(jax.value_and_grad(lambda P: jnp.sum(W2 * jnp.sin(jnp.kron(jnp.eye(G), P)))))(P)
    assert abs(float(v1 - v0)) < 1e-12
    np.testing.assert_allclose(h1, h0, rtol=1e-12)


@pytest.mark.parametrize("shapes", [((2, 2), (2, 2)), ((5, 3, 2), (2, 4)), ((3, 2), (4, 2, 3)), ((2, 7), (7, 3))])
def test_small_mm_equals_matmul(shapes):
    """The broadcast product of short contractions (and matmul above _UNROLL_MAX) equals A @ B, values and
    gradients."""
    rng = np.random.default_rng(len(shapes[0]))
    A, B = (jnp.asarray(rng.normal(size=s)) for s in shapes)
    np.testing.assert_allclose(small_mm(A, B), matmul(A, B), rtol=1e-13, atol=1e-14)
    W = jnp.asarray(rng.normal(size=matmul(A, B).shape))
    g1 = _jit(jax.grad(lambda A, B: jnp.sum(W * linalg.small_mm(A, B)), argnums=(0, 1)))(A, B)
    g0 = _jit(jax.grad(lambda A, B: jnp.sum(W * jnp.matmul(A, B)), argnums=(0, 1)))(A, B)
    for a, b in zip(g1, g0):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("d", [1, 2, 3])
def test_small_spd_inverse_and_precision(d):
    """Closed forms (d <= 2) and the unrolled Cholesky (d = 3): A^{-1} and log|A| of a batch of SPD blocks, NaN for
    an indefinite one; Sigma^{-1}, log|Sigma| for Sigma = lam lam^T (lam triangular or not), and for a singular
    lam ok = False with finite values and gradients."""
    rng = np.random.default_rng(d)
    B = rng.normal(size=(5, d, d))
    A = B @ np.swapaxes(B, 1, 2) + 0.5 * np.eye(d)
    inv, logdet = spd_inv_logdet(jnp.asarray(A))
    np.testing.assert_allclose(inv, np.linalg.inv(A), rtol=1e-11)
    np.testing.assert_allclose(logdet, np.linalg.slogdet(A)[1], rtol=1e-12)
    bad = -np.eye(d)[None] if d == 1 else np.diag([1.0, -1.0] + [1.0] * (d - 2))[None]
    assert np.isnan(np.asarray(spd_inv_logdet(jnp.asarray(bad))[1])).all()
    for lam in (np.tril(rng.normal(size=(d, d))) + 2 * np.eye(d), rng.normal(size=(d, d)) + 2 * np.eye(d)):
        P, ld, ok = small_precision(jnp.asarray(lam))
        S = lam @ lam.T
        np.testing.assert_allclose(P, np.linalg.inv(S), rtol=1e-10)
        np.testing.assert_allclose(ld, np.linalg.slogdet(S)[1], rtol=1e-12)
        assert bool(ok)
    sing = np.zeros((d, d))
    sing[0, 0] = 1.0 if d > 1 else 0.0   # rank d - 1
    P, ld, ok = small_precision(jnp.asarray(sing))
    assert not bool(ok) and np.isfinite(np.asarray(P)).all() and np.isfinite(float(ld))
    g = _jit(jax.grad(lambda m: jnp.sum(linalg.small_precision(m)[0]) + linalg.small_precision(m)[1]))(
        jnp.asarray(sing))
    assert np.isfinite(np.asarray(g)).all()


@pytest.mark.parametrize("G", [4, 300_000])
def test_small_sandwich_both_paths(G):
    """A X_g B in one broadcast reduction (small batches) and as two products (above SANDWICH_MAX) equal einsum."""
    rng = np.random.default_rng(G)
    A, B = jnp.asarray(rng.normal(size=(2, 2))), jnp.asarray(rng.normal(size=(2, 2)))
    X = jnp.asarray(rng.normal(size=(G, 2, 2)))
    np.testing.assert_allclose(_jit(linalg.small_sandwich)(A, X, B),
                               _jit(functools.partial(jnp.einsum, "ia,gab,bj->gij"))(A, X, B), rtol=1e-12, atol=1e-13)
