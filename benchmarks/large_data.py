"""Data larger than memory (issue #29): ML fits from Parquet files, a Dask DataFrame and merged sufficient
statistics, against a pandas DataFrame fit (correctness) and against one DuckDB GROUP BY pass (cost).

    python -m benchmarks.large_data correctness [--rows 2e6] [--files 8]
    python -m benchmarks.large_data scale [--rows 1e7] [--files 100] [--sample] [--timeout 720]
    python -m benchmarks.large_data --quick [--no-sample] [--out DIR]    # 2e4 rows, 4 files, every mode

Data: ``y ~ x + c + (x | a) + (1 | b)`` simulated (β = 1, 0.5 and c effects 0.3, -0.2 for the levels c1, c2 of the
3-level string column c; a: correlated intercept and slope, SDs 0.7, 0.3, correlation 0.3; b: SD 0.5; σ = 1), with
A levels of a (rows / 500, at most 200,000; --a-levels to override) and 50 of b, written file by file (one file's
rows in memory at a time) as --files Parquet files part-00000.parquet ... into --data-dir (default
/tmp/lmmarg_large_data/rows<N>_files<F>_seed<S>). A manifest ``_manifest.json`` (pyarrow and lmmarg skip names
starting with "_") records the parameters; a directory with the same manifest is reused, one with another manifest
is regenerated, and a non-empty directory without one is refused.

Modes (each prints a table and appends rows to <out>/large_data.csv, --quick to <out>/large_data_quick.csv,
columns rows, files, mode, wall_s, peak_rss_mb, loglik, notes; <out> is benchmarks/results unless --out):

- ``correctness`` (in one process; peak RSS is the process's peak so far, the row order is dir, merged, dask,
  pandas so that the file-backed rows come before the rows are ever in memory): fit_ml from the Parquet directory,
  from two halves' statistics (``sufficient_statistics`` of each half of the files, ``s1 + s2``, saved and loaded),
  from a Dask DataFrame on a LocalCluster(n_workers=2, threads_per_worker=1; --quick: worker threads, not
  processes), and from the pandas DataFrame of all
  the rows (the reference). The notes give each model's relative difference from the reference in logLik at its own
  optimum, in logLik at the reference's estimates (``Model.log_marginal``: no optimizer in the way) and the largest
  relative difference of the estimates (β, σ, SDs, correlations). The issue's target is 1e-9 for logLik.
- ``scale`` (each in a fresh subprocess, so that peak RSS is that process's ru_maxrss): ``file`` Model(formula,
  directory) + fit_ml; ``duckdb`` one pass ``SELECT a, count(*), sum(y), sum(x*y) FROM read_parquet(glob) GROUP
  BY a`` over the same files (DuckDB's own threads, all cores); ``dask`` the Model from ``dd.read_parquet`` of the
  files on a LocalCluster(n_workers=2, threads_per_worker=1) + fit_ml (cluster start-up not timed; peak RSS is the
  driver's, the workers' peaks are in the notes); with --sample also ``sample`` (chains=2, warmup=300, draws=300 on
  the file-backed model: wall time of sample() and the minimum bulk ESS of the global parameters). The notes give
  the ratios build / DuckDB (the statistics' two passes against one GROUP BY pass) and dask / file.

Plot: when the CSV holds more than one row count for the scale modes, <out>/large_data.png (log-log wall time and
peak RSS against rows, for file, DuckDB and Dask; the latest row of each count).

Timings are measured, never asserted; the machine this ran on is noted in the notes column.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import pandas as pd

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
FORMULA = "y ~ x + c + (x | a) + (1 | b)"
COLUMNS = ["rows", "files", "mode", "wall_s", "peak_rss_mb", "loglik", "notes"]
SCALE_MODES = ("file", "duckdb", "dask")
B_LEVELS = 50
MANIFEST = "_manifest.json"
GENERATOR = 1   # bump when the simulated data change: old directories are then regenerated
QUICK = dict(rows=20_000, files=4, warmup=30, draws=30)


# --------------------------------------------------------------------------------------------------- the data


def a_levels(rows: int) -> int:
    """Levels of a: one per 500 rows, between 1 and 200,000."""
    return int(min(200_000, max(1, rows // 500)))


def default_data_dir(rows: int, files: int, seed: int) -> pathlib.Path:
    return pathlib.Path(tempfile.gettempdir()) / "lmmarg_large_data" / f"rows{rows}_files{files}_seed{seed}"


def parquet_files(data_dir) -> list[pathlib.Path]:
    return sorted(pathlib.Path(data_dir).glob("part-*.parquet"))


def generate(data_dir, rows: int, files: int, A: int | None = None, seed: int = 0) -> pathlib.Path:
    """Write ``rows`` simulated rows (columns y, x float64; c string; a, b int32) as ``files`` Parquet files into
    ``data_dir``, one file's rows in memory at a time, unless the directory's manifest already has these parameters.
    Returns the directory."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    A = a_levels(rows) if A is None else int(A)
    if files < 1 or rows < files:
        raise ValueError(f"need at least one row per file: rows={rows}, files={files}")
    params = dict(generator=GENERATOR, rows=rows, files=files, A=A, B=B_LEVELS, seed=seed, formula=FORMULA)
    d = pathlib.Path(data_dir)
    man = d / MANIFEST
    if man.exists():
        if json.loads(man.read_text()) == params and len(parquet_files(d)) == files:
            print(f"reusing the data in {d} ({rows:,} rows, {files} files)", flush=True)
            return d
        man.unlink()   # first: a directory interrupted while regenerating is never taken for complete
        for p in parquet_files(d):
            p.unlink()
    elif d.exists() and any(d.iterdir()):
        raise FileExistsError(f"--data-dir {d} is not empty and has no {MANIFEST}: not writing into it")
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rng = np.random.default_rng([seed, 0])
    sd_a, corr_a = np.array([0.7, 0.3]), 0.3
    L = np.linalg.cholesky(np.outer(sd_a, sd_a) * np.array([[1.0, corr_a], [corr_a, 1.0]]))
    u_a = rng.normal(size=(A, 2)) @ L.T              # (A, 2): intercept and slope of each level of a
    u_b = 0.5 * rng.normal(size=B_LEVELS)            # (B,)
    c_effect = np.array([0.0, 0.3, -0.2])
    c_names = np.array(["c0", "c1", "c2"], dtype=object)
    sizes = np.diff(np.linspace(0, rows, files + 1).astype(np.int64))
    for i, n in enumerate(sizes):
        r = np.random.default_rng([seed, i + 1])
        a, b = r.integers(0, A, n), r.integers(0, B_LEVELS, n)
        x, ci = r.normal(size=n), r.integers(0, 3, n)
        y = 1.0 + 0.5 * x + c_effect[ci] + u_a[a, 0] + u_a[a, 1] * x + u_b[b] + r.normal(size=n)
        table = pa.table({"y": y, "x": x, "c": pa.array(c_names[ci], type=pa.string()),
                          "a": a.astype(np.int32), "b": b.astype(np.int32)})
        path = d / f"part-{i:05d}.parquet"
        pq.write_table(table, d / f"_{path.name}.tmp", row_group_size=262_144)
        os.replace(d / f"_{path.name}.tmp", path)
        del table, a, b, x, ci, y
    man.write_text(json.dumps(params))
    print(f"wrote {rows:,} rows as {files} Parquet files into {d} in {time.perf_counter() - t0:.1f} s", flush=True)
    return d


# --------------------------------------------------------------------------------------------------- helpers


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB: VmHWM of /proc/self/status where there is one (its memory map's
    high-water mark, which starts afresh at exec), else ru_maxrss (KiB on Linux), which a child started by
    fork + exec inherits from its parent at the fork."""
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:")) / 1024.0
    except (OSError, StopIteration, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def estimates(fit) -> np.ndarray:
    """β, σ, then each term's SDs and correlations (upper triangle), terms in name order."""
    parts = [np.asarray(fit.beta, float), [float(fit.sigma)]]
    for k in sorted(fit.sd):
        parts.append(np.asarray(fit.sd[k], float))
        c = np.asarray(fit.corr[k], float)
        parts.append(c[np.triu_indices(c.shape[0], 1)])
    return np.concatenate(parts)


def rel_diff(a, b) -> float:
    a, b = np.atleast_1d(np.asarray(a, float)), np.atleast_1d(np.asarray(b, float))
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300)))


def code_version() -> str:
    """8 hex digits of a SHA-1 over lmmarg's .py files (paths and contents): rows measured on different states of a
    working tree that is being edited are told apart."""
    import hashlib

    h = hashlib.sha1()
    pkg = ROOT / "lmmarg"
    for p in sorted(pkg.rglob("*.py")):
        h.update(str(p.relative_to(pkg)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:8]


_CODE = {}   # the code_version() when the current mode started: the children import that state (or a later one)


def machine_note() -> str:
    return f"{os.cpu_count()}-core shared machine, timings indicative; lmmarg code {_CODE.get('v') or code_version()}"


def dask_cluster(processes: bool = True):
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=processes, dashboard_address=None)
    return cluster, Client(cluster)


def read_dask(data_dir):
    import dask.dataframe as dd

    return dd.read_parquet([str(p) for p in parquet_files(data_dir)], columns=["y", "x", "c", "a", "b"])


# --------------------------------------------------------------------------------------------------- correctness


def correctness(args, data_dir) -> list[dict]:
    import lmmarg
    from lmmarg.sufficient import load_statistics

    files = parquet_files(data_dir)
    fits, rows = {}, []

    def run(mode, build, note):
        t0 = time.perf_counter()
        m = build()
        fit = m.fit_ml()
        wall = time.perf_counter() - t0
        fits[mode] = (m, fit)
        rows.append(dict(rows=args.rows, files=len(files), mode=f"correctness-{mode}", wall_s=wall,
                         peak_rss_mb=peak_rss_mb(), loglik=fit.loglik, notes=note, converged=fit.converged))
        print(f"  {mode}: logLik {fit.loglik:.10f} in {wall:.1f} s (converged: {fit.converged})", flush=True)

    run("dir", lambda: lmmarg.Model(FORMULA, str(data_dir), progress=False), "Model(formula, directory)")

    def halves():
        h = len(files) // 2
        s1 = lmmarg.sufficient_statistics(FORMULA, [str(p) for p in files[:h]], progress=False)
        s2 = lmmarg.sufficient_statistics(FORMULA, [str(p) for p in files[h:]], progress=False)
        with tempfile.TemporaryDirectory() as tmp:
            (s1 + s2).save(os.path.join(tmp, "merged.npz"))
            merged = load_statistics(os.path.join(tmp, "merged.npz"))
        return lmmarg.Model(FORMULA, merged)

    run("merged", halves, "statistics of two halves of the files, s1 + s2, saved and loaded")
    # --quick: worker threads in this process (worker processes would import lmmarg first, the smoke test's largest
    # cost); the scale mode's dask row runs worker processes
    cluster, client = dask_cluster(processes=not args.quick)
    try:
        run("dask", lambda: lmmarg.Model(FORMULA, read_dask(data_dir)),
            f"dd.read_parquet on LocalCluster(n_workers=2, threads_per_worker=1, processes={not args.quick}); "
            "cluster start not timed")
    finally:
        client.close()
        cluster.close()
    run("pandas", lambda: lmmarg.Model(FORMULA, pd.read_parquet(data_dir)),
        "reference: pd.read_parquet of every file, Model(formula, DataFrame); wall includes the read")
    ref_model, ref = fits["pandas"]
    ref_est = estimates(ref)
    for row in rows:
        mode = row["mode"].removeprefix("correctness-")
        m, fit = fits[mode]
        at_ref = m.log_marginal(ref.beta, ref.sigma, ref.cov)
        row.update(rel_loglik=rel_diff(fit.loglik, ref.loglik), rel_loglik_at_ref=rel_diff(at_ref, ref.loglik),
                   rel_estimates=rel_diff(estimates(fit), ref_est))
        row["notes"] += (f"; vs pandas: logLik rel diff {row['rel_loglik']:.2e}, logLik at pandas' estimates "
                         f"{row['rel_loglik_at_ref']:.2e}, estimates max rel diff {row['rel_estimates']:.2e}"
                         f"; converged {row['converged']}; peak RSS = process peak so far; {machine_note()}")
    return rows


# --------------------------------------------------------------------------------------------------- scale (children)


def child_file(args, data_dir) -> dict:
    import lmmarg

    t0 = time.perf_counter()
    m = lmmarg.Model(FORMULA, str(data_dir), progress=False)
    t1 = time.perf_counter()
    fit = m.fit_ml()
    t2 = time.perf_counter()
    return dict(wall_s=t2 - t0, build_s=t1 - t0, fit_s=t2 - t1, loglik=fit.loglik, converged=fit.converged,
                summary=m.statistics.source_summary)


def child_duckdb(args, data_dir) -> dict:
    import duckdb

    con = duckdb.connect()
    glob = str(pathlib.Path(data_dir) / "part-*.parquet").replace("'", "''")
    t0 = time.perf_counter()
    res = con.execute(f"SELECT a, count(*) AS n, sum(y) AS sy, sum(x * y) AS sxy FROM read_parquet('{glob}') "
                      "GROUP BY a").fetchnumpy()
    wall = time.perf_counter() - t0
    threads = con.execute("SELECT current_setting('threads')").fetchone()[0]
    return dict(wall_s=wall, groups=len(res["a"]), n=int(np.sum(res["n"])), threads=int(threads))


def child_dask(args, data_dir) -> dict:
    import lmmarg

    cluster, client = dask_cluster(processes=not args.dask_threads)
    try:
        t0 = time.perf_counter()
        m = lmmarg.Model(FORMULA, read_dask(data_dir))
        t1 = time.perf_counter()
        fit = m.fit_ml()
        t2 = time.perf_counter()
        workers = client.run(peak_rss_mb)
    finally:
        client.close()
        cluster.close()
    return dict(wall_s=t2 - t0, build_s=t1 - t0, fit_s=t2 - t1, loglik=fit.loglik, converged=fit.converged,
                worker_peak_rss_mb=sorted(workers.values()))


def child_sample(args, data_dir) -> dict:
    import lmmarg

    m = lmmarg.Model(FORMULA, str(data_dir), progress=False)
    t0 = time.perf_counter()
    fit = m.sample(chains=2, warmup=args.warmup, draws=args.draws, seed=args.seed, progress_bar=False)
    wall = time.perf_counter() - t0
    s = fit.summary()
    g = s.loc[[r for r in s.index if not str(r).startswith("r_")]]
    return dict(wall_s=wall, min_ess_bulk=float(g.ess_bulk.min()), worst=str(g.ess_bulk.idxmin()),
                loglik=float("nan"))


CHILDREN = dict(file=child_file, duckdb=child_duckdb, dask=child_dask, sample=child_sample)


def run_child(args, mode, data_dir) -> dict:
    """Run one scale mode in a fresh interpreter; its result (a JSON line) plus its peak RSS, or an error."""
    cmd = [sys.executable, "-m", "benchmarks.large_data", "--child", mode, "--data-dir", str(data_dir),
           "--warmup", str(args.warmup), "--draws", str(args.draws), "--seed", str(args.seed)] \
        + (["--dask-threads"] if args.quick else [])   # the smoke test: no worker processes importing lmmarg
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return dict(error=f"did not finish within {args.timeout:.0f} s", wall_s=float("nan"))
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        tail = "\n".join(out.stderr.strip().splitlines()[-25:])
        print(f"  {mode} failed (exit {out.returncode}) after {time.perf_counter() - t0:.0f} s:\n{tail}", flush=True)
        return dict(error=f"exit {out.returncode}: {tail.splitlines()[-1] if tail else ''}", wall_s=float("nan"))
    return json.loads(lines[-1])


def scale(args, data_dir) -> list[dict]:
    modes = list(SCALE_MODES) + (["sample"] if args.sample else [])
    res = {}
    for mode in modes:
        print(f"  {mode} ...", flush=True)
        res[mode] = r = run_child(args, mode, data_dir)
        print(f"  {mode}: {r.get('wall_s', float('nan')):.2f} s, peak RSS {r.get('peak_rss_mb', float('nan')):.0f} MB",
              flush=True)
    f, db = res["file"], res["duckdb"]
    n_files = len(parquet_files(data_dir))
    rows = []
    for mode in modes:
        r = res[mode]
        if "error" in r:
            note = r["error"]
        elif mode == "file":
            note = (f"Model(formula, directory) {r['build_s']:.2f} s + fit_ml {r['fit_s']:.2f} s; "
                    f"build / DuckDB {r['build_s'] / db.get('wall_s', np.nan):.2f}x; {r['summary']}")
        elif mode == "duckdb":
            note = (f"one GROUP BY a pass, {r['groups']:,} groups, {r['threads']} DuckDB threads; "
                    f"RSS / file build {r['peak_rss_mb'] / f.get('peak_rss_mb', np.nan):.2f}x")
        elif mode == "dask":
            note = (f"dd.read_parquet + Model {r['build_s']:.2f} s + fit_ml {r['fit_s']:.2f} s on "
                    f"LocalCluster(2 workers x 1 thread), start not timed; peak RSS is the driver's, workers' "
                    f"{', '.join(f'{w:.0f}' for w in r['worker_peak_rss_mb'])} MB; dask / file wall "
                    f"{r['wall_s'] / f.get('wall_s', np.nan):.2f}x, driver RSS / file "
                    f"{r['peak_rss_mb'] / f.get('peak_rss_mb', np.nan):.2f}x; logLik - file's "
                    f"{r['loglik'] - f.get('loglik', np.nan):.2e}")
        else:
            note = (f"sample(chains=2, warmup={args.warmup}, draws={args.draws}) on the file-backed model (build "
                    f"not timed); min bulk ESS {r['min_ess_bulk']:.0f} ({r['worst']})")
        rows.append(dict(rows=args.rows, files=n_files, mode=mode, wall_s=r.get("wall_s", np.nan),
                         peak_rss_mb=r.get("peak_rss_mb", np.nan), loglik=r.get("loglik", np.nan),
                         notes=f"{note}; own process; {machine_note()}", **{k: v for k, v in r.items()
                                                                              if k in ("build_s", "min_ess_bulk")}))
    return rows


# --------------------------------------------------------------------------------------------------- output


def write(rows: list[dict], csv: pathlib.Path) -> pd.DataFrame:
    """Append rows (the columns COLUMNS) to csv; print them."""
    df = pd.DataFrame(rows)[COLUMNS]
    df.to_csv(csv, mode="a", header=not csv.exists(), index=False)
    with pd.option_context("display.max_colwidth", 90, "display.width", 200):
        print(df.drop(columns="notes").to_string(index=False, float_format=lambda v: f"{v:.6g}"))
        for _, r in df.iterrows():
            print(f"  {r['mode']}: {r['notes']}")
    return df


def plot(csv: pathlib.Path, png: pathlib.Path) -> bool:
    """Log-log wall time and peak RSS against rows for the scale modes (the latest row of each (rows, mode));
    False when the CSV has fewer than two row counts for them."""
    df = pd.read_csv(csv)
    df = df[df["mode"].isin(SCALE_MODES) & df["wall_s"].notna()].drop_duplicates(["rows", "mode"], keep="last")
    if df["rows"].nunique() < 2:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = dict(file="Model(formula, directory) + fit_ml", duckdb="DuckDB GROUP BY pass",
                  dask="Dask LocalCluster + fit_ml (driver RSS)")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for mode in SCALE_MODES:
        d = df[df["mode"] == mode].sort_values("rows")
        for ax, col in zip(axes, ("wall_s", "peak_rss_mb")):
            ax.plot(d["rows"], d[col], "o-", label=labels[mode])
    for ax, ylabel in zip(axes, ("wall time (s)", "peak RSS (MB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("rows")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{FORMULA}: statistics from Parquet files ({machine_note()})", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return True


def parse(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.large_data", description=__doc__.splitlines()[0])
    ap.add_argument("mode", nargs="?", choices=["correctness", "scale"])
    ap.add_argument("--quick", action="store_true", help="2e4 rows in 4 files through every mode (smoke test)")
    ap.add_argument("--rows", type=float, default=None, help="default 2e6 (correctness), 1e7 (scale)")
    ap.add_argument("--files", type=int, default=None, help="default 8 (correctness), 100 (scale)")
    ap.add_argument("--a-levels", type=int, default=None, help="levels of a (default rows / 500, ≤ 200,000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=None, help="default /tmp/lmmarg_large_data/rows<N>_files<F>_seed<S>")
    ap.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    ap.add_argument("--sample", action="store_true", help="scale: also sample(chains=2, ...) on the file model")
    ap.add_argument("--no-sample", action="store_true", help="--quick without the sample mode")
    ap.add_argument("--dask-threads", action="store_true", help="the dask child's workers as threads (--quick)")
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--draws", type=int, default=300)
    ap.add_argument("--timeout", type=float, default=720.0, help="seconds before a scale mode is given up")
    ap.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is None and (args.mode is None) == (not args.quick):
        ap.error("give a mode (correctness or scale) or --quick, not both")
    return args


def main(argv=None) -> pd.DataFrame | None:
    """Run the benchmark; returns the rows written (with the extra numeric fields: rel_loglik, rel_loglik_at_ref,
    rel_estimates for correctness, build_s, min_ess_bulk for scale)."""
    args = parse(argv)
    if args.child is not None:   # one scale mode in this fresh process: one JSON line on stdout
        r = CHILDREN[args.child](args, pathlib.Path(args.data_dir))
        r["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(r), flush=True)
        return None
    out = pathlib.Path(args.out) if args.out else HERE / "results"
    out.mkdir(parents=True, exist_ok=True)
    stem = "large_data_quick" if args.quick else "large_data"
    csv, png = out / f"{stem}.csv", out / f"{stem}.png"
    if args.quick:
        args.warmup, args.draws, args.sample = QUICK["warmup"], QUICK["draws"], not args.no_sample
    plans = ["correctness", "scale"] if args.quick else [args.mode]
    frames = []
    for mode in plans:
        a = argparse.Namespace(**vars(args))
        a.rows = QUICK["rows"] if args.quick else int(args.rows or (2e6 if mode == "correctness" else 1e7))
        a.files = QUICK["files"] if args.quick else args.files or (8 if mode == "correctness" else 100)
        data_dir = pathlib.Path(args.data_dir) if args.data_dir else default_data_dir(a.rows, a.files, a.seed)
        generate(data_dir, a.rows, a.files, a.a_levels, a.seed)
        _CODE["v"] = code_version()
        print(f"== {mode}: {FORMULA}, {a.rows:,} rows, {a.files} files, a: "
              f"{a.a_levels or a_levels(a.rows):,} levels, b: {B_LEVELS}", flush=True)
        rows = correctness(a, data_dir) if mode == "correctness" else scale(a, data_dir)
        write(rows, csv)
        frames.append(pd.DataFrame(rows))
    if plot(csv, png):
        print(f"plot: {png}")
    print(f"results: {csv}")
    return pd.concat(frames, ignore_index=True)


if __name__ == "__main__":
    main()
