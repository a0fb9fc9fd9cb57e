"""parameterization="conditional": u_h = Λ_h (m(θ) + S(θ) ε_h) for terms left to HMC (lmmarg.marginal.conditional).

(a) exactness: the log density at (θ, ε) is the centred one at (θ, u) plus log|det ∂u/∂ε| (with the Jacobian
computed by JAX), and a short NUTS run matches marginalize="all"; (b) m is the exact conditional mean to within a
small error and S Sᵀ matches the exact conditional covariance; (c) bad inputs are refused with clear errors. The
V⁻¹ products it is built on (kernels.residual_precision) are checked against a dense V.
"""
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from numpyro.handlers import substitute, trace

import lmmarg
from lmmarg.marginal import ClassSpec, build_plan, kernels
from lmmarg.marginal.conditional import cond_term, conditional_transform


def crossed(A=30, B=20, n=600, seed=0, sd_a=0.7, sd_b=0.5, slope=False):
    rng = np.random.default_rng(seed)
    a, b, x = rng.integers(0, A, n), rng.integers(0, B, n), rng.normal(size=n)
    y = 1 + 0.5 * x + sd_a * rng.normal(size=A)[a] + sd_b * rng.normal(size=B)[b] + rng.normal(size=n)
    if slope:
        y = y + 0.3 * rng.normal(size=A)[a] * x
    return pd.DataFrame(dict(y=y, x=x, a=[f"a{i}" for i in a], b=[f"b{i}" for i in b],
                             k=rng.choice(["k0", "k1"], n)))


# ---------------------------------------------------------------------------------------------- V^{-1} products
def _dense_Z(Z, codes, G):
    N, d = Z.shape
    M = np.zeros((N, G * d))
    for j in range(d):
        M[np.arange(N), codes * d + j] = Z[:, j]
    return M


@pytest.mark.parametrize("marg", [[1], [0, 1], [1, 2], [0, 1, 2], [2, 3], []])
@pytest.mark.parametrize("scalar", [True, False])
def test_residual_precision_matches_dense(marg, scalar):
    rng = np.random.default_rng(1)
    N, G = 300, [15, 10, 6, 3]
    codes = [rng.integers(0, g, N) for g in G[:3]]
    codes.append(codes[2] % 3)        # class 3: a coarsening of class 2 (nested: a two-level chain)
    x = rng.normal(size=N)
    Zs = [np.c_[np.ones(N), x], np.ones((N, 1)), np.ones((N, 1)), np.ones((N, 1))]
    Ls = [np.array([[0.7, 0.0], [0.2, 0.3]]), np.array([[0.5]]), np.array([[0.9]]), np.array([[0.4]])]
    X, y = np.c_[np.ones(N), x], rng.normal(size=N)
    plan = build_plan(X, y, [ClassSpec(f"c{i}", Zs[i], codes[i], G[i]) for i in range(4)], marg,
                      scalar_sigma=scalar)
    sig = 1.3 if scalar else rng.uniform(0.5, 2.0, N)
    V = np.diag(np.broadcast_to(sig, (N,)) ** 2)
    for i in marg:
        Zf = _dense_Z(Zs[i], codes[i], G[i])
        V = V + Zf @ np.kron(np.eye(G[i]), Ls[i] @ Ls[i].T) @ Zf.T
    e = rng.normal(size=(N, 3))
    want = np.linalg.solve(V, e)

    @jax.jit   # as the sampler runs it: called eagerly, every primitive would be compiled on its own
    def solve(s, lams, rhs):
        apply, ok = kernels.residual_precision(plan, s, lams)
        return apply(rhs), apply(rhs[:, 0]), ok
    many, one, ok = solve(sig, tuple(Ls[i] for i in marg), e)
    assert bool(ok)
    np.testing.assert_allclose(np.asarray(many), want, atol=1e-10)
    np.testing.assert_allclose(np.asarray(one), want[:, 0], atol=1e-10)


# ---------------------------------------------------------------------------------------------- (a) exactness
def _u_of(pot, vals, name):
    return trace(substitute(pot.model_fn, vals)).get_trace()[f"u_{name}"]["value"]


@pytest.mark.parametrize("formula,marginalize,cond,kw", [
    ("y ~ x + (1 | a) + (1 | b)", ["b"], ["a"], {}),
    ("y ~ x + (x | a) + (1 | b)", ["b"], ["a"], {}),                     # d = 2: a block per group
    ("y ~ x + (1 | a) + (1 | b)", "none", ["a", "b"], {}),               # two conditional terms, nothing marginalized
    ("y ~ x + (1 | a) + (1 | b)", ["b"], ["a"], {"sigma_by": "k"}),      # per-observation residual SD
])
def test_log_density_is_the_centred_one_plus_the_jacobian(formula, marginalize, cond, kw):
    m = lmmarg.Model(formula, crossed(slope="x |" in formula), **kw)
    pc = m.potential(marginalize, {n: "conditional" for n in cond})
    pu = m.potential(marginalize, {n: "centered" for n in cond})
    assert all(f"z_{n}" in pc.sites and f"u_{n}" in pc.output_keys for n in cond)
    vals = pc.to_constrained(pc.init_params(jax.random.PRNGKey(3), num_chains=None))
    # jitted, as the sampler runs the model: called eagerly, every primitive would be compiled on its own
    us = jax.jit(lambda v: {n: _u_of(pc, v, n) for n in cond})(vals)
    centred = {k: v for k, v in vals.items() if not k.startswith("z_")}
    centred.update({f"u_{n}": u for n, u in us.items()})

    def u_flat(z_flat):   # (θ fixed) ε -> u, all conditional terms stacked
        vv, i = dict(vals), 0
        for n in cond:
            k = vals[f"z_{n}"].size
            vv[f"z_{n}"] = z_flat[i:i + k].reshape(vals[f"z_{n}"].shape)
            i += k
        return jnp.concatenate([_u_of(pc, vv, n).reshape(-1) for n in cond])

    z0 = jnp.concatenate([vals[f"z_{n}"].reshape(-1) for n in cond])
    sign, logdet = np.linalg.slogdet(np.asarray(jax.jit(jax.jacfwd(u_flat))(z0)))
    assert sign != 0
    lhs = float(jax.jit(pc.log_density)(vals))
    rhs = float(jax.jit(pu.log_density)(centred)) + logdet
    assert np.isfinite(lhs)
    np.testing.assert_allclose(lhs, rhs, rtol=0, atol=1e-8 * max(1.0, abs(lhs)))
    # the deterministic u_<term> is what constrain returns
    out = pc.constrain({k: v[None] for k, v in pc.unconstrain(vals).items()})
    for n in cond:
        np.testing.assert_allclose(out[f"u_{n}"][0], np.asarray(us[n]), atol=1e-10)


def test_nuts_matches_marginalizing_everything():
    m = lmmarg.Model("y ~ x + (1 | a) + (1 | b)", crossed(seed=2))
    rows = ["b_Intercept", "b_x", "sd_a__Intercept", "sd_b__Intercept", "sigma"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = m.sample(draws=800, warmup=300, chains=1, seed=1, progress_bar=False)
        fit = m.sample(draws=800, warmup=300, chains=1, seed=2, marginalize=["b"],
                       parameterization={"a": "conditional"}, progress_bar=False)
    s0, s1 = ref.summary().loc[rows], fit.summary().loc[rows]
    se = np.sqrt(s0["sd"] ** 2 / s0["ess_bulk"] + s1["sd"] ** 2 / s1["ess_bulk"])
    assert (np.abs(s0["mean"] - s1["mean"]) < 4 * se).all(), pd.concat([s0, s1], axis=1)
    np.testing.assert_allclose(s1["sd"], s0["sd"], rtol=0.25)
    assert fit.diagnostics["divergences"] == 0
    # effects: the sampled a and the recovered b agree with the fully marginalized fit's recovered ones
    for t in ("a", "b"):
        np.testing.assert_allclose(fit.samples[f"u_{t}"].mean((0, 1)), ref.samples[f"u_{t}"].mean((0, 1)),
                                   atol=0.1)


# ---------------------------------------------------------------------------------------------- (b) m and S
def _easy():
    d = crossed(A=25, B=20, n=2000, seed=4)
    m = lmmarg.Model("y ~ x + (1 | a) + (1 | b)", d)
    t_a, t_b = m.terms
    plan_b = m.plan(["b"])
    beta, sigma = jnp.array([1.0, 0.5]), 1.0
    La, Lb = jnp.array([[0.7]]), jnp.array([[0.5]])
    ct = cond_term(t_a.Z, t_a.codes, t_a.n_groups, jnp.float64)
    return m, t_a, t_b, plan_b, ct, beta, sigma, La, Lb


def _transform(plan_b, ct):
    """conditional_transform of the one conditional term ct, jitted as the sampler runs it (called eagerly, every
    primitive would be compiled on its own): (beta, sigma, Lb, La, eps, sweeps=, coarse=) -> (v per term, log|J|).
    ct is closed over (its n_groups is static)."""
    @functools.partial(jax.jit, static_argnames=("sweeps", "coarse"))
    def transform(plan, beta, sigma, Lb, La, eps, sweeps=None, coarse=True):
        return conditional_transform(plan, beta, sigma, (Lb,), None, [ct], [La], [eps], sweeps=sweeps, coarse=coarse)
    return functools.partial(transform, plan_b)


def test_mean_is_close_to_the_exact_conditional_mean():
    m, t_a, t_b, plan_b, ct, beta, sigma, La, Lb = _easy()
    exact = np.asarray(jax.jit(kernels.conditional_mean)(m.plan("all"), beta, sigma, (La, Lb))[0])[:, 0]
    # conditional SD of each effect (for the error in units of the sampler's ε)
    A_diag = 1.0 + 0.49 * np.bincount(t_a.codes, minlength=t_a.n_groups) / sigma**2
    sd = 0.7 / np.sqrt(A_diag)
    zero = jnp.asarray(np.zeros((t_a.n_groups, 1)))
    transform = _transform(plan_b, ct)
    for sweeps, tol in ((None, 0.4), (2, 0.02), (3, 1e-3)):   # the default (one sweep), then converging
        v, _ = transform(beta, sigma, Lb, La, zero, sweeps=sweeps)
        err = (np.asarray(v[0])[:, 0] * 0.7 - exact) / sd
        assert np.max(np.abs(err)) < tol, (sweeps, np.max(np.abs(err)))
    # without the coarse space a few sweeps leave the common shift of all levels behind
    v, _ = transform(beta, sigma, Lb, La, zero, sweeps=3, coarse=False)
    err_nc = (np.asarray(v[0])[:, 0] * 0.7 - exact) / sd
    assert np.max(np.abs(err_nc)) > 1.0


def test_scale_matches_the_exact_conditional_covariance():
    m, t_a, t_b, plan_b, ct, beta, sigma, La, Lb = _easy()
    N, G = m.n_obs, t_a.n_groups
    Za, Zb = _dense_Z(np.ones((N, 1)), t_a.codes, G), _dense_Z(np.ones((N, 1)), t_b.codes, t_b.n_groups)
    V = sigma**2 * np.eye(N) + 0.25 * Zb @ Zb.T
    P = np.eye(G) + 0.49 * Za.T @ np.linalg.solve(V, Za)          # precision of v_a given θ (b integrated out)

    for coarse in (True, False):
        def v_of(e, coarse=coarse):
            return conditional_transform(plan_b, beta, sigma, (Lb,), None, [ct], [La], [e.reshape(G, 1)],
                                         coarse=coarse)[0][0].reshape(-1)

        S = np.asarray(jax.jit(jax.jacfwd(v_of))(jnp.zeros(G)))
        logjac = float(_transform(plan_b, ct)(beta, sigma, Lb, La, jnp.zeros((G, 1)), coarse=coarse)[1])
        np.testing.assert_allclose(np.linalg.slogdet(S)[1], logjac, atol=1e-9)
        ratio = np.diag(S @ S.T) / np.diag(np.linalg.inv(P))
        # covariance of ε given θ: S⁻¹ P⁻¹ S⁻ᵀ (N(0, I) for an exact S)
        Sinv = np.linalg.inv(S)
        ev = np.linalg.eigvalsh(Sinv @ np.linalg.inv(P) @ Sinv.T)
        if coarse:
            assert np.all(np.abs(ratio - 1) < 0.1), ratio
            assert 0.9 < ev.min() and ev.max() < 1.1, (ev.min(), ev.max())
        else:   # D alone: right except along the common shift of all levels
            assert ev.max() > 2.0 and np.sort(ev)[-2] < 1.1


# ---------------------------------------------------------------------------------------------- (c) bad input
def test_bad_inputs():
    d = crossed()
    m = lmmarg.Model("y ~ x + (1 | a) + (1 | b)", d)
    with pytest.raises(ValueError, match="'conditional'"):
        m.potential(["b"], {"a": "conditonal"})
    with pytest.raises(ValueError, match="laplace"):
        m.potential("none", {"a": "laplace", "b": "conditional"})
    ms = lmmarg.Model("y ~ x + (1 | a) + (1 | b)", d, sigma="~ x")
    with pytest.raises(ValueError, match="sigma_by"):
        ms.potential(["b"], {"a": "conditional"})
    d01 = d.assign(y=(d.y > 1).astype(float))
    mb = lmmarg.Model("y ~ x + (1 | a) + (1 | b)", d01, family="bernoulli")
    with pytest.raises(ValueError, match="Gaussian families.*laplace"):
        mb.potential(["b"], {"a": "conditional"})
    with pytest.raises(ValueError, match="unknown term"):
        m.potential(["b"], {"c": "conditional"})
    # a term that is integrated out anyway: nothing to reparameterize, as for "centered"
    pot = m.potential("all", "conditional")
    assert "z_a" not in pot.sites and "u_a" not in pot.sites
