"""Smoke test of benchmarks/sampler.py: its quick geometry part runs two short fits of dillonE1 (init="center" and
init="mode") and writes its table. The fits run in the test's process (``--in-process``: the programs the two share
compile once); benchmarks/glmm_speed.py's smoke test covers the fresh-process workers. Timings are never asserted."""
import pandas as pd

from benchmarks import sampler


def test_sampler_benchmark_quick_geometry(tmp_path):
    out = str(tmp_path / "sampler_quick")
    sampler.main(["--quick", "--parts", "geometry", "--out", out, "--in-process"])
    df = pd.read_csv(out + ".csv")
    assert list(df["init"]) == ["center", "mode"]
    assert "error" not in df or df["error"].isna().all(), df.get("error")
    assert (df["min_ess_bulk"] > 0).all() and (df["leapfrog_per_draw"] >= 1).all()
    assert "Geometry" in open(out + ".md").read()
