"""lmmarg.compile.xla: the XLA options lmmarg compiles its own programs with."""
import jax
import jax.numpy as jnp
import numpy as np

from lmmarg.compile import xla


def test_cpu_programs_compile_with_the_options_and_compute_the_same(monkeypatch):
    """On CPU lmmarg's jit passes CPU_COMPILER_OPTIONS (this jaxlib accepts them) and computes what jax.jit does;
    LMMARG_XLA_DEFAULTS=1 switches to XLA's defaults."""
    assert jax.default_backend() == "cpu"
    xla.options_for.cache_clear()
    assert xla.compiler_options() == xla.CPU_COMPILER_OPTIONS

    def f(x):
        return jnp.sum(jnp.tanh(x) @ x.T) + jnp.linalg.slogdet(x @ x.T + jnp.eye(x.shape[0]))[1]

    x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 6)))
    a, ga = xla.jit(jax.value_and_grad(f))(x)
    b, gb = jax.jit(jax.value_and_grad(f))(x)
    np.testing.assert_allclose(a, b, rtol=1e-12)
    np.testing.assert_allclose(ga, gb, rtol=1e-10, atol=1e-12)
    monkeypatch.setenv("LMMARG_XLA_DEFAULTS", "1")
    xla.options_for.cache_clear()
    try:
        assert xla.compiler_options() == {}
    finally:
        monkeypatch.delenv("LMMARG_XLA_DEFAULTS")
        xla.options_for.cache_clear()


def test_small_data_options_follow_the_data_and_compute_the_same():
    """Programs on data without a long axis compile without XLA's tree-reduction rewrite (fewer kernels) and with its
    memory-optimized kernel order (fewer thread handoffs); data with an axis of SMALL_DATA_MAX_DIM or more, and
    programs without data, keep XLA's defaults. Values and gradients agree with jax.jit's to round-off, for
    reductions shorter and longer than the rewrite's window of 32."""
    xla.options_for.cache_clear()
    short = {"a": np.zeros((40, 3)), "b": [np.zeros(100)]}
    long = {"a": np.zeros((40, 3)), "y": np.zeros(xla.SMALL_DATA_MAX_DIM)}
    assert xla.compiler_options(short) == {**xla.CPU_COMPILER_OPTIONS, **xla.SMALL_DATA_OPTIONS}
    assert xla.compiler_options(long) == xla.CPU_COMPILER_OPTIONS
    assert xla.compiler_options() == xla.CPU_COMPILER_OPTIONS

    def f(x, data):
        return jnp.sum(jnp.log1p(x[:, None] * data["b"][0][None, :80] ** 2)) + jnp.sum(data["a"] * x[:40, None])

    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.uniform(size=1000))
    data = {"a": jnp.asarray(rng.normal(size=(40, 3))), "b": [jnp.asarray(rng.normal(size=100))]}
    g = jax.value_and_grad(f)
    hlo = xla.jit(g, data=data).lower(x, data).compile().as_text()
    assert "reduce-window" not in hlo
    a, ga = xla.jit(g, data=data)(x, data)
    b, gb = jax.jit(g)(x, data)
    np.testing.assert_allclose(a, b, rtol=1e-12)
    np.testing.assert_allclose(ga, gb, rtol=1e-12, atol=1e-14)


def test_an_option_this_jaxlib_rejects_is_dropped_alone(monkeypatch):
    """Each option is probed with those kept before it: a jaxlib that does not know the scheduler option still
    gets the others."""
    real = xla.accepted
    monkeypatch.setattr(xla, "accepted", lambda options: "xla_cpu_scheduler_type" not in options and real(options))
    xla.options_for.cache_clear()
    try:
        opts = xla.compiler_options({"a": np.zeros(10)})
        assert "xla_cpu_scheduler_type" not in opts
        assert opts == {**xla.CPU_COMPILER_OPTIONS, "xla_disable_hlo_passes": "tree_reduction_rewriter"}
    finally:
        xla.options_for.cache_clear()
