"""Runs inside the Bambi virtualenv (see peers_bambi.py) for benchmarks/glmm_speed.py: one GLMM fit, timed from
``bmb.Model`` to the end of ``fit`` (compilation included, imports excluded), min bulk ESS over the global
parameters, divergences; prints one RESULT json line.

cfg: data (csv), factors, formula, family, priors {term: [name, kwargs]} (kwargs values may be lists: one value per
dummy column), group {"1|g": [name, kwargs]} (the SD prior of that term), backend ("pymc" | "numpyro"), seed,
warmup, draws, chains. Predictors are not centred (``center_predictors=False``): the intercept prior is on the raw
intercept, as in lmmarg.
"""
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

    def prior(spec):
        name, kw = spec
        return bmb.Prior(name, **{k: np.asarray(v) if isinstance(v, list) else v for k, v in kw.items()})

    priors = {k: prior(v) for k, v in cfg["priors"].items()}
    priors.update({k: bmb.Prior("Normal", mu=0.0, sigma=prior(v)) for k, v in cfg["group"].items()})
    method = cfg["backend"]
    t = time.perf_counter()
    m = bmb.Model(cfg["formula"], df, family=cfg["family"], priors=priors, noncentered=True,
                  center_predictors=False)
    kw = dict(draws=cfg["draws"], tune=cfg["warmup"], chains=cfg["chains"], random_seed=cfg["seed"],
              inference_method=method)
    if method == "pymc":
        kw.update(cores=1, progressbar=False)
    else:
        kw.update(chain_method="sequential", progressbar=False)
    idata = m.fit(**kw)
    total = time.perf_counter() - t
    post = idata.posterior
    glob = [v for v in post.data_vars if ("|" not in v or v.endswith("_sigma")) and v != "mu"
            and not v.endswith("_mean")]
    e = az.ess(post[glob], method="bulk")
    vals = {v: np.atleast_1d(e[v].values).ravel() for v in glob}
    allv = np.concatenate(list(vals.values()))
    div = int(idata.sample_stats["diverging"].values.sum()) if "diverging" in idata.sample_stats else -1
    steps = idata.sample_stats.get("n_steps", idata.sample_stats.get("tree_size"))
    res = dict(total_s=total, min_ess_bulk=float(allv.min()), n_global=int(allv.size),
               worst_param=min(vals, key=lambda v: vals[v].min()), divergences=div,
               leapfrog_per_draw=float(steps.values.mean()) if steps is not None else float("nan"),
               globals=glob, bambi_version=bmb.__version__)
    print("RESULT " + json.dumps(res))


if __name__ == "__main__":
    main(sys.argv[1])
