"""lmmarg.xla: the XLA options lmmarg compiles its own programs with."""
import jax
import jax.numpy as jnp
import numpy as np

from lmmarg import xla


def test_cpu_programs_compile_with_the_options_and_compute_the_same(monkeypatch):
    """On CPU lmmarg's jit passes CPU_COMPILER_OPTIONS (this jaxlib accepts them) and computes what jax.jit does;
    LMMARG_XLA_DEFAULTS=1 switches to XLA's defaults."""
    assert jax.default_backend() == "cpu"
    xla._options_for.cache_clear()
    assert xla.compiler_options() == xla.CPU_COMPILER_OPTIONS

    def f(x):
        return jnp.sum(jnp.tanh(x) @ x.T) + jnp.linalg.slogdet(x @ x.T + jnp.eye(x.shape[0]))[1]

    x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 6)))
    a, ga = xla.jit(jax.value_and_grad(f))(x)
    b, gb = jax.jit(jax.value_and_grad(f))(x)
    np.testing.assert_allclose(a, b, rtol=1e-12)
    np.testing.assert_allclose(ga, gb, rtol=1e-10, atol=1e-12)
    monkeypatch.setenv("LMMARG_XLA_DEFAULTS", "1")
    xla._options_for.cache_clear()
    try:
        assert xla.compiler_options() == {}
    finally:
        monkeypatch.delenv("LMMARG_XLA_DEFAULTS")
        xla._options_for.cache_clear()
