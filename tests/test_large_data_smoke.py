"""Smoke test of benchmarks/large_data.py (issue #29) in --quick mode (2e4 rows, 4 Parquet files): the ML fits
from the Parquet directory, from two halves' merged statistics and from a Dask DataFrame on a 2-worker LocalCluster
agree with the pandas DataFrame fit, and the scale modes (file, DuckDB, Dask, each in its own process) each write
their row. Results go to tmp_path. Timings are never asserted.

The package ``benchmarks`` is imported from the repository root (pyproject.toml: pytest's ``pythonpath = ["."]``)."""
import importlib.util
import json

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("pyarrow")
pytest.importorskip("distributed")
HAS_DUCKDB = importlib.util.find_spec("duckdb") is not None   # the bench extra; the test extra runs without it

from benchmarks import large_data  # noqa: E402


def test_quick_runs_every_mode_and_agrees(tmp_path):
    data = tmp_path / "data"
    df = large_data.main(["--quick", "--no-sample", "--out", str(tmp_path), "--data-dir", str(data)])
    csv = pd.read_csv(tmp_path / "large_data_quick.csv")
    assert list(csv.columns) == large_data.COLUMNS
    modes = {"correctness-dir", "correctness-merged", "correctness-dask", "correctness-pandas", "file", "duckdb",
             "dask"}
    assert set(csv["mode"]) == modes
    assert (csv["rows"] == 20_000).all() and (csv["files"] == 4).all()
    # every mode ran (a failed scale child leaves NaN and its error in the notes); without duckdb its row says so
    ran = csv if HAS_DUCKDB else csv[csv["mode"] != "duckdb"]
    assert ran["wall_s"].notna().all() and (ran["wall_s"] > 0).all(), csv[["mode", "notes"]].to_string()
    assert (ran["peak_rss_mb"] > 0).all()
    if not HAS_DUCKDB:
        assert "duckdb" in csv.loc[csv["mode"] == "duckdb", "notes"].iloc[0]

    corr = df[df["mode"].str.startswith("correctness-")]
    assert (corr["rel_loglik"] <= 1e-8).all(), corr[["mode", "rel_loglik"]]
    assert (corr["rel_loglik_at_ref"] <= 1e-8).all(), corr[["mode", "rel_loglik_at_ref"]]
    # estimates from rounding-different sums: the optimizer's stopping point moves by its tolerance, not more
    assert (corr["rel_estimates"] <= 1e-5).all(), corr[["mode", "rel_estimates"]]
    ref = float(csv.loc[csv["mode"] == "correctness-pandas", "loglik"].iloc[0])
    for mode in ("file", "dask"):   # the scale children fit the same files
        assert float(csv.loc[csv["mode"] == mode, "loglik"].iloc[0]) == pytest.approx(ref, rel=1e-8)
    if HAS_DUCKDB:
        assert "groups" in csv.loc[csv["mode"] == "duckdb", "notes"].iloc[0]

    # the data directory is reused when its manifest matches, and regenerated when the parameters change
    manifest = json.loads((data / large_data.MANIFEST).read_text())
    assert manifest["rows"] == 20_000 and manifest["A"] == large_data.a_levels(20_000)
    before = (data / "part-00000.parquet").stat().st_mtime_ns
    large_data.generate(data, 20_000, 4)
    assert (data / "part-00000.parquet").stat().st_mtime_ns == before
    large_data.generate(data, 1_000, 2)
    assert len(large_data.parquet_files(data)) == 2
    assert np.isclose(pd.read_parquet(data).shape[0], 1_000)


def test_plot_needs_two_row_counts(tmp_path):
    csv, png = tmp_path / "r.csv", tmp_path / "r.png"
    rows = [dict(rows=n, files=4, mode=m, wall_s=0.1 * n / 1e4, peak_rss_mb=100.0, loglik=np.nan, notes="")
            for n in (10_000,) for m in large_data.SCALE_MODES]
    large_data.write(rows, csv)
    assert not large_data.plot(csv, png) and not png.exists()
    large_data.write([dict(r, rows=100_000) for r in rows], csv)
    assert large_data.plot(csv, png) and png.stat().st_size > 0
