"""Runs inside the Bambi virtualenv (see peers_bambi.py): fit, time, compute ESS, print one RESULT json line."""
import json
import sys
import time
import warnings

warnings.filterwarnings("ignore")


def main(cfg_path):
    cfg = json.load(open(cfg_path))
    import arviz as az
    import bambi as bmb
    import numpy as np
    import pandas as pd

    df = pd.read_csv(cfg["data"])
    for f in cfg["factors"]:
        df[f] = df[f].astype(str)

    def prior(spec, group=False):
        if isinstance(spec, (int, float)):
            return bmb.Prior("Normal", mu=0.0, sigma=float(spec)) if group else float(spec)
        name, kw = spec
        p = bmb.Prior(name, **kw)
        return bmb.Prior("Normal", mu=0.0, sigma=p) if group else p

    priors = {k: prior(v) for k, v in cfg["priors"].items()}
    priors.update({k: prior(v, group=True) for k, v in cfg["group"].items()})
    method = "numpyro" if cfg["backend"] == "numpyro" else "pymc"

    def fit(warmup, draws, seed):
        m = bmb.Model(cfg["formula"], df, priors=priors, noncentered=True)
        t = time.perf_counter()
        kw = dict(draws=draws, tune=warmup, chains=cfg["chains"], random_seed=seed, inference_method=method)
        if method == "pymc":
            kw.update(cores=1, progressbar=False)
        else:
            kw.update(chain_method="sequential", progressbar=False)
        idata = m.fit(**kw)
        return idata, time.perf_counter() - t

    fit(5, 5, cfg["seed"] + 2000)  # warm imports / caches, not timed
    idata, t_full = fit(cfg["warmup"], cfg["draws"], cfg["seed"])
    _, t_tiny = fit(10, 10, cfg["seed"] + 1000)
    post = idata.posterior
    glob = [v for v in post.data_vars if "|" not in v or v.endswith("_sigma")]
    u = [v for v in post.data_vars if "|" in v and not v.endswith("_sigma")]
    e = az.ess(post[glob], method="bulk")
    et = az.ess(post[glob], method="tail")
    vals = np.concatenate([np.atleast_1d(e[v].values).ravel() for v in glob])
    tails = np.concatenate([np.atleast_1d(et[v].values).ravel() for v in glob])
    eu = az.ess(post[u], method="bulk") if u else None
    uvals = np.concatenate([np.atleast_1d(eu[v].values).ravel() for v in u]) if u else np.array([np.nan])
    samp = (t_full - t_tiny) * cfg["draws"] / (cfg["warmup"] + cfg["draws"])
    samp = samp if samp > 0.05 * t_full else float("nan")  # estimate unusable (noise larger than signal)
    n_iter = cfg["draws"] * cfg["chains"]
    div = int(idata.sample_stats["diverging"].values.sum()) if "diverging" in idata.sample_stats else -1
    steps = idata.sample_stats.get("n_steps", idata.sample_stats.get("tree_size"))
    res = dict(chains=cfg["chains"], draws=cfg["draws"], compile_s=t_tiny, warmup_s=np.nan, sample_s=samp,
               total_s=t_full, iter_per_s=n_iter / samp,
               leapfrog_per_draw=float(steps.values.mean()) if steps is not None else np.nan,
               divergences=div, n_global=len(vals), min_ess_bulk=float(vals.min()), mean_ess_bulk=float(vals.mean()),
               min_ess_tail=float(tails.min()), mean_ess_tail=float(tails.mean()),
               worst_param=str(glob[int(np.argmin([float(np.min(e[v].values)) for v in glob]))]),
               min_ess_per_s=float(vals.min()) / samp, mean_ess_per_s=float(vals.mean()) / samp,
               min_ess_per_s_total=float(vals.min()) / t_full, min_ess_per_iter=float(vals.min()) / n_iter,
               mean_ess_per_iter=float(vals.mean()) / n_iter, u_median_ess=float(np.nanmedian(uvals)),
               u_median_ess_per_s=float(np.nanmedian(uvals)) / samp,
               bambi_version=bmb.__version__)
    print("RESULT " + json.dumps(res))


if __name__ == "__main__":
    main(sys.argv[1])
