"""Smoke test of benchmarks/: every experiment's lmmarg model builds and its potential evaluates; lmmarg's
marginal likelihood matches the hand-written NumPyro peer's joint density (same model, same priors); and the
paper driver runs end to end in --quick mode on one small experiment (lmmarg + peer). Timings never asserted.

The package ``benchmarks`` is imported from the repository root (pyproject.toml: pytest's ``pythonpath = ["."]``)."""
import jax
import numpy as np
import pandas as pd
import pytest

from benchmarks import engine_cost, experiments, glmm_speed, glmm_validation, harness, paper, plots, report, sbc
from benchmarks.peers_numpyro import lmm_numpyro

jax.config.update("jax_enable_x64", True)


@pytest.mark.parametrize("name", list(experiments.EXPERIMENTS))
def test_every_experiment_builds_and_evaluates(name):
    exp = experiments.EXPERIMENTS[name]
    model = experiments.build_model(exp, quick=True)
    assert model.n_obs <= 3000
    pot = model.potential("all")
    p = pot.init_params(jax.random.PRNGKey(0), num_chains=None)
    v = float(jax.jit(pot.potential_fn)(p))
    assert np.isfinite(v), (name, v)
    c = pot.constrain({k: np.asarray(x)[None, None] for k, x in p.items()})
    assert c["beta"].shape == (1, 1, len(model.fixed_names))


def test_marginal_and_peer_agree_on_log_density():
    """Same model, same priors: lmmarg's marginal likelihood equals the peer's joint integrated over u —
    checked through the identity p(y|θ) = p(y, u|θ) / p(u|y, θ) at the conditional mean of u."""
    import jax.numpy as jnp
    from numpyro.infer.util import log_density

    exp = experiments.EXPERIMENTS["dutch"]
    model = experiments.build_model(exp, quick=True)
    pot = model.potential("all")
    z = pot.init_params(jax.random.PRNGKey(0), num_chains=None)
    c = pot.constrain({k: np.asarray(x)[None, None] for k, x in z.items()})
    beta, sigma = c["beta"][0, 0], float(c["sigma"][0, 0])
    cov = {t.name: (c[f"sd_{t.name}"][0, 0][:, None] * c[f"corr_{t.name}"][0, 0]
                    * c[f"sd_{t.name}"][0, 0][None, :]) for t in model.terms}
    lm = model.log_marginal(beta, sigma, cov) - model.log_jacobian
    umean = model.ranef_mean(beta, sigma, cov)
    # joint log p(y, u | θ) at u = E[u | y, θ] from the centered peer (likelihood + u terms only)
    peer = lmm_numpyro(model, exp.priors, centered=True)
    vals = {"b": jnp.asarray(beta), "sig": sigma}
    for t in model.terms:
        vals[f"tau_{t.name}"] = jnp.asarray(c[f"sd_{t.name}"][0, 0])
        vals[f"L_{t.name}"] = jnp.linalg.cholesky(jnp.asarray(c[f"corr_{t.name}"][0, 0]))
        vals[f"u_{t.name}"] = jnp.asarray(umean[t.name])
    _, tr = log_density(peer, (), {}, vals)
    lj = sum(float(tr[k]["fn"].log_prob(tr[k]["value"]).sum()) for k in ["y"] + [f"u_{t.name}" for t in model.terms])
    # log p(u* | y, θ) at its mode = -½ log det(2π Cov(u | y, θ)); compare via the dense reference
    from scipy.stats import multivariate_normal
    Z = np.concatenate([np.asarray(t.Z_sparse.todense()) for t in model.terms], axis=1)
    G = np.zeros((Z.shape[1], Z.shape[1]))
    o = 0
    for t in model.terms:
        for g in range(t.n_groups):
            G[o + g * t.d:o + (g + 1) * t.d, o + g * t.d:o + (g + 1) * t.d] = cov[t.name]
        o += t.n_groups * t.d
    prec = Z.T @ Z / sigma**2 + np.linalg.inv(G)
    _, logdet = np.linalg.slogdet(prec)
    log_post_at_mode = -0.5 * Z.shape[1] * np.log(2 * np.pi) + 0.5 * logdet
    assert lm == pytest.approx(lj - log_post_at_mode, rel=1e-6, abs=1e-6)
    assert multivariate_normal  # scipy available


def test_paper_quick_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "RESULTS", str(tmp_path))
    monkeypatch.setattr(paper, "RESULTS", str(tmp_path))
    monkeypatch.setattr(plots, "RESULTS", str(tmp_path))
    df = paper.main(["--quick", "--experiments", "dutch", "--methods", "all,numpyro-nc", "--draws", "10",
                     "--warmup", "10"])
    assert set(df["method"]) == {"all", "numpyro-nc"}
    assert "error" not in df or df["error"].isna().all(), df.get("error")
    assert (df["iter_per_s"] > 0).all() and (df["n_global"] == 9).all()
    assert (tmp_path / "paper_quick.csv").exists() and (tmp_path / "paper_quick.md").exists()
    assert (tmp_path / "paper_quick_iter.png").exists()


def test_time_budget_gives_a_timeout_row_and_report_merges(tmp_path, monkeypatch):
    """--max-minutes: a run past its budget becomes a row with the partial leapfrog count; report.py merges sources
    with later rows replacing earlier ones, and by default layers new partial runs over the merged table (whose rows
    keep their source)."""
    for mod in (harness, paper, plots, report):
        monkeypatch.setattr(mod, "RESULTS", str(tmp_path))
    df = paper.main(["--quick", "--experiments", "dutch", "--methods", "none", "--draws", "10", "--warmup", "10",
                     "--chunk", "5", "--max-minutes", "1e-6", "--tag", "_sweepA", "--no-plots"])
    row = df.iloc[0]
    assert row["error"].startswith("timeout") and row["iterations_done"] == 5 and row["leapfrog_steps"] >= 5
    paper.main(["--quick", "--experiments", "dutch", "--methods", "none", "--draws", "10", "--warmup", "10",
                "--chunk", "5", "--tag", "_sweepB", "--no-plots"])   # the program above: from the compilation cache
    report.main(["--sources", "paper_sweepA.csv,paper_sweepB.csv", "--tag", "_sweep"])
    merged = pd.read_csv(tmp_path / "paper_sweep.csv")
    assert len(merged) == 1 and merged["source"].iloc[0] == "paper_sweepB.csv"
    assert (tmp_path / "summary.md").exists() and (tmp_path / "paper_sweep_iter.png").exists()

    # the partials are deleted once merged; new partials are layered over the merged table by default
    timeout_row, ok_row = row.to_frame().T, merged.drop(columns="source")
    (tmp_path / "paper_sweepA.csv").unlink()
    (tmp_path / "paper_sweepB.csv").unlink()
    timeout_row.assign(seed=1).to_csv(tmp_path / "paper_sweepC.csv", index=False)   # a new seed: added
    report.main([])
    merged = pd.read_csv(tmp_path / "paper_sweep.csv").set_index("seed")
    assert merged["source"].to_dict() == {0: "paper_sweepB.csv", 1: "paper_sweepC.csv"}
    assert merged.loc[1, "error"].startswith("timeout") and pd.isna(merged.loc[0, "error"])
    ok_row.assign(seed=1).to_csv(tmp_path / "paper_sweepD.csv", index=False)   # a later partial replaces seed 1
    report.main([])
    merged = pd.read_csv(tmp_path / "paper_sweep.csv").set_index("seed")
    assert merged["source"].to_dict() == {0: "paper_sweepB.csv", 1: "paper_sweepD.csv"}
    assert pd.isna(merged.loc[1, "error"]) and merged.loc[1, "iter_per_s"] == merged.loc[0, "iter_per_s"]
    assert "sources: paper_sweepB.csv, paper_sweepD.csv" in (tmp_path / "summary.md").read_text()


def test_glmm_validation_quick_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setattr(glmm_validation, "RESULTS", str(tmp_path))
    df = glmm_validation.main(["--quick"])
    assert set(df["method"]) == {"laplace", "exact"} and set(df["design"]) == {"cbpp"}
    assert np.isfinite(df[["dmean_mcse", "dmean_sd", "dsd_mcse", "sd_ratio"]].to_numpy()).all()
    for f in ("glmm_validation_quick.csv", "glmm_validation_quick_runs.csv", "glmm_validation_quick.md",
              "glmm_validation_quick.png"):
        assert (tmp_path / f).exists(), f


def test_glmm_speed_quick_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setattr(glmm_speed, "RESULTS", str(tmp_path))
    ml, samp = glmm_speed.main(["--quick", "--no-r"])
    assert "error" not in ml or ml["error"].isna().all(), ml.get("error")
    assert "error" not in samp or samp["error"].isna().all(), samp.get("error")
    assert set(samp["method"]) == {"lmmarg laplace", "numpyro-nc"} and (samp["min_ess_per_s"] > 0).all()
    assert np.isfinite(ml["logLik"]).all()
    assert (tmp_path / "glmm_speed_quick.md").exists() and (tmp_path / "glmm_speed_quick.csv").exists()


def test_sbc_quick_runs_end_to_end(tmp_path):
    """benchmarks/sbc.py --quick: a simulated data set of each model fitted by model.sample() (one fit compiles for
    ~15 s on a CPU core, so one simulation per model); the CSV has one row per simulation and parameter with ranks in
    0..L, and the table and plot are written. Coverage and timings are not asserted."""
    df, par, runs = sbc.main(["--quick", "--sims", "1", "--out", str(tmp_path)])
    for f in ("sbc_quick.csv", "sbc_quick.md", "sbc_quick.png"):
        assert (tmp_path / f).exists(), f
    csv = pd.read_csv(tmp_path / "sbc_quick.csv")
    n_params = {name: len(sbc.MODELS[name](2024).params) for name in sbc.MODELS}
    assert len(csv) == sum(n_params.values())
    assert csv.groupby("model")["parameter"].nunique().to_dict() == n_params
    assert ((csv["rank"] >= 0) & (csv["rank"] <= csv["L"])).all()
    assert csv["hit90"].astype(bool).ge(csv["hit50"].astype(bool)).all()   # the 50 % interval lies in the 90 %
    assert set(par["model"]) == set(sbc.MODELS) and (runs["S"] == 1).all()
    assert "| slopes | cor_g__Intercept__x |" in (tmp_path / "sbc_quick.md").read_text()


def test_engine_cost_runs_end_to_end(tmp_path, monkeypatch):
    """benchmarks/engine_cost.py with one round of one block, every row built and compiled once in this process
    (``--same-process``; the fresh-process workers are covered by glmm_speed's smoke test): the table and its paired
    ratios are written. Timings are not asserted."""
    monkeypatch.setattr(engine_cost, "RESULTS", tmp_path)
    assert engine_cost.main(["--rounds", "1", "--blocks", "1", "--same-process"]) == 0
    tab = pd.read_csv(tmp_path / "engine_cost.csv")
    assert list(tab["method"]) == list(engine_cost.ROWS)
    assert (tab[["compile_s", "ms_per_value_and_grad", "ms_in_loop"]] > 0).all().all()
    assert list(tab["n_params"])[engine_cost.LMMARG_ROW] == 9 and list(tab["n_params"])[engine_cost.NUMPYRO_ROW] > 100
    md = (tmp_path / "engine_cost.md").read_text()
    assert "Ratios lmmarg / NumPyro: compile" in md and "paired over 1 × 1 blocks" in md
