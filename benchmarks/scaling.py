"""Time of one jitted value-and-gradient call of the marginal log-density versus N.

Synthetic crossed design: 100 subjects × 50 items, correlated intercept + slope for each (d = 2), N from 1e3 to
1e6. Two settings:
  (a) "subj marginalized, item in HMC": the item effects enter the residual as an offset (per-call O(N));
  (b) "all marginalized": every per-call quantity comes from sufficient statistics precomputed once
      (per-call cost independent of N; it depends on the number of subject × item cells, ≤ 5000).
Also: the large crossed design `y ~ x + (1 | a) + (1 | b)` (10,000 × 100 groups, N = 1e5, 2e6, 1e7): Model()+plan
time against one pandas groupby-sum pass, peak memory, per-call time; and, on InstEval
(`y ~ service + (1|s) + (1|d) + (1|dept:service)`), the time per call for each marginalization choice.
Writes benchmarks/results/scaling.{csv,md,png}, scaling_crossed.csv and insteval_calls.csv.

    python -m benchmarks.scaling [--quick] [--repeats 20]
"""
from __future__ import annotations

import argparse
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

jax.config.update("jax_enable_x64", True)

from lmmarg.marginal import ClassSpec, build_plan, kernels  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results"


def synthetic(n: int, n_subj: int = 100, n_item: int = 50, seed: int = 0):
    rng = np.random.default_rng(seed)
    subj = rng.integers(n_subj, size=n)
    item = rng.integers(n_item, size=n)
    x = rng.normal(size=n)
    X = np.column_stack([np.ones(n), x])
    Z = X.copy()
    u_s = rng.normal(size=(n_subj, 2)) * [1.0, 0.3]
    u_i = rng.normal(size=(n_item, 2)) * [0.5, 0.2]
    y = X @ [1.0, 0.5] + (Z * u_s[subj]).sum(1) + (Z * u_i[item]).sum(1) + rng.normal(size=n)
    classes = [ClassSpec("subj", Z, subj, n_subj), ClassSpec("item", Z, item, n_item)]
    return X, y, classes


def time_call(fn, args, repeats: int) -> tuple[float, float]:
    """(compile+first call seconds, median seconds per call after compilation)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return first, float(np.median(times))


def scaling_rows(sizes, repeats):
    rows = []
    L = jnp.array([[1.0, 0.0], [0.1, 0.3]])
    beta = jnp.array([1.0, 0.5])
    for n in sizes:
        X, y, classes = synthetic(n)
        # (a) subj marginalized, item effects sampled by HMC -> offset = Z_item u_item[codes]
        plan_a = build_plan(X, y, classes, [0])
        Zi, ci = jnp.asarray(classes[1].Z), jnp.asarray(classes[1].codes)

        def f_a(beta, log_sigma, L, u_item, plan=plan_a, Zi=Zi, ci=ci):
            offset = jnp.sum(Zi * u_item[ci], axis=1)
            return kernels.log_marginal(plan, beta, jnp.exp(log_sigma), (L,), offset=offset)

        g_a = jax.jit(jax.value_and_grad(f_a, argnums=(0, 1, 2, 3)))
        first, per = time_call(g_a, (beta, jnp.array(0.0), L, jnp.zeros((50, 2))), repeats)
        rows.append(dict(setting="a: subj marginalized, item in HMC", N=n, compile_s=first, call_s=per))
        # (b) both marginalized -> sufficient statistics
        plan_b = build_plan(X, y, classes, [0, 1])

        def f_b(beta, log_sigma, L1, L2, plan=plan_b):
            return kernels.log_marginal(plan, beta, jnp.exp(log_sigma), (L1, L2))

        g_b = jax.jit(jax.value_and_grad(f_b, argnums=(0, 1, 2, 3)))
        first, per = time_call(g_b, (beta, jnp.array(0.0), L, 0.5 * L), repeats)
        rows.append(dict(setting="b: all marginalized (sufficient statistics)", N=n, compile_s=first, call_s=per,
                         cells=plan_b.n_cells))
        print(rows[-2]["setting"], n, f"{rows[-2]['call_s'] * 1e3:.3f} ms", "|",
              rows[-1]["setting"], f"{rows[-1]['call_s'] * 1e3:.3f} ms", flush=True)
    return pd.DataFrame(rows)


def crossed_frame(n: int, n_a: int = 10_000, n_b: int = 100, seed: int = 0) -> pd.DataFrame:
    """y ~ x + (1 | a) + (1 | b) with a: n_a levels, b: n_b levels, uniformly crossed (so at large N almost every
    (a, b) cell is non-empty: 632k cells at N = 1e6)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(n_a, size=n)
    b = rng.integers(n_b, size=n)
    x = rng.normal(size=n)
    y = 1.0 + 0.5 * x + rng.normal(size=n_a)[a] + 0.5 * rng.normal(size=n_b)[b] + rng.normal(size=n)
    return pd.DataFrame({"y": y, "x": x, "a": a, "b": b})


BUILD_REPEATS = 3   # builds (and groupby passes) timed per size; the fastest of each counts


def crossed_rows(sizes, repeats):
    """Large crossed design, every term marginalized, scalar σ: Model()+plan time against one pandas groupby-sum
    pass over the same frame, peak memory, and the time of one value-and-gradient of the marginal density."""
    import resource

    import lmmarg

    rows = []
    for n in sizes:
        df = crossed_frame(n)
        # best of BUILD_REPEATS for both sides (as timeit does): the first pass of either pays one-time costs
        # (page faults of fresh arrays, lazy imports) that vary from run to run
        t_groupby = np.inf
        for _ in range(BUILD_REPEATS):
            t0 = time.perf_counter()
            df.groupby(["a", "b"])[["y", "x"]].sum()
            t_groupby = min(t_groupby, time.perf_counter() - t0)
        t_model = t_plan = np.inf
        for _ in range(BUILD_REPEATS):
            model = plan = None   # the previous build is freed first: the peak memory is one build's
            t0 = time.perf_counter()
            model = lmmarg.Model("y ~ x + (1 | a) + (1 | b)", df)
            t1 = time.perf_counter()
            plan = model.plan("all")
            t2 = time.perf_counter()
            if t2 - t0 < t_model + t_plan:
                t_model, t_plan = t1 - t0, t2 - t1
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

        def f(beta, log_sigma, la, lb, plan=plan):
            return kernels.log_marginal(plan, beta, jnp.exp(log_sigma), (la, lb))

        g = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))
        first, per = time_call(g, (jnp.array([1.0, 0.5]), jnp.array(0.0), jnp.ones((1, 1)), 0.5 * jnp.ones((1, 1))),
                               repeats)
        rows.append(dict(N=n, cells=plan.n_cells, groupby_s=t_groupby, model_s=t_model, plan_s=t_plan,
                         build_over_groupby=(t_model + t_plan) / t_groupby, peak_rss_gb=peak_gb, compile_s=first,
                         call_s=per, fill=type(plan.blocks.level1).__name__))
        print("crossed", n, f"build {(t_model + t_plan):.2f}s ({rows[-1]['build_over_groupby']:.1f}x groupby), "
              f"{per * 1e3:.3f} ms/call, {plan.n_cells} cells, peak {peak_gb:.2f} GB", flush=True)
        del model, plan, df
    return pd.DataFrame(rows)


def slope(df, setting):
    d = df[df.setting == setting]
    return float(np.polyfit(np.log(d.N), np.log(d.call_s), 1)[0])


def insteval_rows(repeats, quick):
    path = HERE / "data" / "InstEval.csv"
    if not path.exists():
        path = HERE.parent.parent / "shared" / "data" / "InstEval.csv"  # benchmark-only fallback
    df = pd.read_csv(path, dtype=str)
    if quick:
        df = df.iloc[:5000]
    y = df.y.astype(float).to_numpy()
    X = np.column_stack([np.ones(len(df)), (df.service == "1").astype(float)])
    classes = []
    for name, col in [("s", df.s), ("d", df.d), ("dept:service", df.dept + ":" + df.service)]:
        codes, levels = pd.factorize(col, sort=True)
        classes.append(ClassSpec(name, np.ones((len(df), 1)), codes.astype(np.int64), len(levels)))
    rows = []
    for label, marg in [("none", []), ("s", [0]), ("d", [1]), ("dept:service", [2]), ("all", [0, 1, 2])]:
        t0 = time.perf_counter()
        plan = build_plan(X, y, classes, marg)
        build = time.perf_counter() - t0
        hmc = [i for i in range(3) if i not in marg]
        Zs = [(jnp.asarray(classes[i].codes), classes[i].n_groups) for i in hmc]

        def f(beta, log_sigma, log_sds, us, plan=plan, Zs=Zs, marg=tuple(marg)):
            offset = sum((u[c] for (c, _), u in zip(Zs, us)), jnp.zeros(len(y)))
            scales = tuple(jnp.exp(log_sds[i]).reshape(1, 1) for i in marg)
            return kernels.log_marginal(plan, beta, jnp.exp(log_sigma), scales, offset=offset)

        g = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))
        args = (jnp.array([3.0, 0.0]), jnp.array(0.0), jnp.zeros(3), tuple(jnp.zeros(G) for _, G in Zs))
        first, per = time_call(g, args, repeats)
        rows.append(dict(marginalized=label, N=len(y), plan_build_s=build, compile_s=first, call_s=per,
                         dense_size=plan.dense_size, cells=plan.n_cells))
        print("InstEval", label, f"{per * 1e3:.2f} ms/call", flush=True)
    return pd.DataFrame(rows)


def plot(df, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for setting, d in df.groupby("setting"):
        ax.loglog(d.N, d.call_s * 1e3, "o-", label=f"{setting} (slope {slope(df, setting):.2f})")
    ax.set_xlabel("observations N")
    ax.set_ylabel("ms per jitted value-and-grad call")
    ax.set_title("lmmarg marginal log-density: cost vs N (CPU, float64)")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, for the smoke test")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = [1000, 3000] if args.quick else [1000, 3000, 10_000, 30_000, 100_000, 300_000, 1_000_000]
    df = scaling_rows(sizes, 3 if args.quick else args.repeats)
    df.to_csv(out / "scaling.csv", index=False)
    a, b = df.setting.unique()
    tb = df[df.setting == b].set_index("N").call_s
    ratio = float(tb.iloc[-1] / tb.loc[10_000]) if 10_000 in tb.index else float("nan")
    lines = [f"# Marginal log-density scaling ({platform.processor() or platform.machine()}, "
             f"{jax.devices()[0].platform}, jax {jax.__version__}, float64)", "",
             "| setting | N | cells | compile+first call (s) | ms / value-and-grad call |", "|---|---|---|---|---|"]
    for r in df.itertuples():
        cells = "" if pd.isna(getattr(r, "cells", np.nan)) else int(r.cells)
        lines.append(f"| {r.setting} | {r.N:,} | {cells} | {r.compile_s:.2f} | {r.call_s * 1e3:.3f} |")
    lines += ["", f"- log-log slope (a): {slope(df, a):.3f} (target ≤ 1.05)",
              f"- log-log slope (b): {slope(df, b):.3f}; t(1e6)/t(1e4) = {ratio:.2f} (target ≤ 2)"]
    plot(df, out / "scaling.png")
    big = [20_000, 100_000] if args.quick else [100_000, 2_000_000, 10_000_000]
    cr = crossed_rows(big, 3 if args.quick else args.repeats)
    cr.to_csv(out / "scaling_crossed.csv", index=False)
    t = cr.set_index("N")
    lines += ["", "## Large crossed design: `y ~ x + (1 | a) + (1 | b)`, 10,000 × 100 groups, all marginalized",
              "", "| N | cells | level-1 fill | groupby-sum (s) | Model() (s) | plan (s) | build / groupby "
              "| peak RSS (GB) | compile+first (s) | ms / value-and-grad |", "|---" * 10 + "|"]
    for r in cr.itertuples():
        lines.append(f"| {r.N:,} | {r.cells:,} | {r.fill} | {r.groupby_s:.2f} | {r.model_s:.2f} | {r.plan_s:.2f} | "
                     f"{r.build_over_groupby:.1f} | {r.peak_rss_gb:.2f} | {r.compile_s:.2f} | {r.call_s * 1e3:.3f} |")
    if not args.quick:
        lines += ["", f"- per call t(2e6)/t(1e5) = {t.call_s[2_000_000] / t.call_s[100_000]:.2f} (target ≤ 1.5)",
                  f"- Model()+plan at 2e6 = {t.build_over_groupby[2_000_000]:.1f}× one groupby-sum (target ≤ 5)"]
    ins = insteval_rows(3 if args.quick else args.repeats, args.quick)
    ins.to_csv(out / "insteval_calls.csv", index=False)
    lines += ["", "## InstEval: one value-and-grad call per marginalization choice", "",
              "| marginalized | N | dense Schur size | cells | plan build (s) | compile+first (s) | ms / call |",
              "|---|---|---|---|---|---|---|"]
    for r in ins.itertuples():
        lines.append(f"| {r.marginalized} | {r.N:,} | {r.dense_size} | {r.cells} | {r.plan_build_s:.2f} | "
                     f"{r.compile_s:.2f} | {r.call_s * 1e3:.2f} |")
    (out / "scaling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
