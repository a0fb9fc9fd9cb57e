"""The dense block's inverse F^{-1} = X X^T (X = L^{-T} upper triangular, from the blocked triangular inverse):
one GEMM of the whole X against the two GEMMs of ``linalg.spd_inverse`` that skip X's zero lower-left block,
side by side in one run, each timed inside a compiled loop with lmmarg's XLA options.

Writes benchmarks/results/dense_inverse.md.

    OPENBLAS_NUM_THREADS=1 taskset -c 0 python -m benchmarks.dense_inverse [--sizes 80 160 400]
"""
from __future__ import annotations

import argparse
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)

from lmmarg.compile import xla  # noqa: E402
from lmmarg.marginal import linalg  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
ITERS = 1000


def one_gemm(L):
    X = linalg.upper_inv(L.T)
    return X @ X.T


def per_call_us(fn, L, rounds: int = 5) -> float:
    """Median microseconds per call of fn(L) inside one compiled loop (the loop carries a dependency on fn's output,
    so no call is hoisted or skipped)."""
    def loop(L):
        return jax.lax.fori_loop(0, ITERS, lambda i, c: c + fn(L + c * 1e-30)[0, 0] * 1e-30, jnp.zeros_like(L))

    f = xla.jit(loop, data=L)
    jax.block_until_ready(f(L))
    ts = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        jax.block_until_ready(f(L))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)) / ITERS * 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[80, 160, 400])
    a = ap.parse_args(argv)
    rows = []
    for n in a.sizes:
        A = np.random.default_rng(0).normal(size=(n, n))
        L = jnp.asarray(np.linalg.cholesky(A @ A.T / n + np.eye(n)))
        ref = np.linalg.inv(np.asarray(L @ L.T))
        for fn in (one_gemm, linalg.spd_inverse):
            np.testing.assert_allclose(np.asarray(fn(L)), ref, rtol=1e-8, atol=1e-10)
        full, split = per_call_us(one_gemm, L), per_call_us(linalg.spd_inverse, L)
        rows.append((n, full, split))
        print(f"n = {n}: one GEMM {full:.1f} us, two GEMMs skipping the zero block {split:.1f} us", flush=True)
    md = ["# Dense block inverse F^-1 = X X^T from the blocked triangular inverse X = L^-T", "",
          "| n | one GEMM X X^T (µs) | `_spd_inverse`: two GEMMs skipping X's zero block (µs) | ratio |",
          "|---|---|---|---|"]
    md += [f"| {n} | {f:.1f} | {s:.1f} | {s / f:.2f}× |" for n, f, s in rows]
    md += ["", "Both include the blocked triangular inverse. Each in a compiled loop of "
               f"{ITERS} calls, median of 5; {platform.processor() or platform.machine()}, jax {jax.__version__}, "
               "float64, one BLAS thread, lmmarg's XLA options."]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "dense_inverse.md").write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
