"""Posterior results: brms-like summaries, ArviZ conversion, posterior predictions and the brms workflow
(``fixef``, ``coef``, ``bayes_R2``, ``pp_check``, ``conditional_effects``, ``loo``, ``save`` / ``load``).

``Fit(model, samples)`` works for any sampler: ``samples`` is a dict of arrays with leading dims (chain, draw)
and the keys of ``model.sample()`` (lmmarg.parameters): beta (p,), sigma (() or (K,) for sigma_by), sd_<term>
(d,), corr_<term> (d, d) for d > 1, u_<term> (G, d); with a sigma formula b_sigma, sd_sigma_<term>,
corr_sigma_<term>, u_sigma_<term>. MAP/VI results use one chain (or one draw) the same way.

Predictions live in lmmarg.results.predict, plots in lmmarg.results.plots, integrated LOO in lmmarg.results.loo;
the methods here call them.
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from .. import diagnostics
from .. import parameters
from .. import saving
from .._warnings import warn_user
from ..families import pointwise_log_lik
from ..statdesign import require_rows
from . import loo as loo_module
from . import plots
from . import predict as prediction

__all__ = ["Fit"]


class Fit:
    """Posterior draws of a model with summaries (``summary()``, ``fixef()``, ``coef()``, ``ranef()``,
    ``bayes_R2()``), ``diagnostics``, ``to_arviz()``, ``predict()``, checks and plots (``pp_check()``,
    ``conditional_effects()``), integrated leave-one-out (``loo()``) and ``save()``; picklable.

    samples: {key: array (chain, draw, ...)}; sample_stats: {name: (chain, draw)} (NUTS statistics);
    diagnostics: dict of divergences, tree depth, step sizes and timings; method: "nuts" | "map" | "vi" | ...
    """

    def __init__(self, model, samples: dict, sample_stats: dict | None = None, diagnostics: dict | None = None,
                 method: str = "nuts", potential=None):
        self.model = model
        self.samples = {k: np.asarray(v) for k, v in samples.items()}
        if "beta" not in self.samples:
            raise ValueError("samples must contain 'beta' with leading dims (chain, draw)")
        lead = self.samples["beta"].shape[:2]
        for k, v in self.samples.items():
            if v.shape[:2] != lead:
                raise ValueError(f"samples[{k!r}] has leading dims {v.shape[:2]}, expected (chain, draw) = {lead}")
        self.sample_stats = {k: np.asarray(v) for k, v in (sample_stats or {}).items()}
        self.diagnostics = dict(diagnostics or {})
        self.method = method
        self.potential = potential

    # -- pickling -------------------------------------------------------------------------------------------
    def __getstate__(self) -> dict:
        """Drop what cannot (or need not) be pickled: the NumPyro potential (local closures, compiled kernels) and
        compiled LOO kernels; the model drops its own caches (``Model.__getstate__``). Both rebuild on demand."""
        state = dict(self.__dict__)
        state["potential"] = None
        state.pop("_loo_cache", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    @property
    def loo_cache(self) -> dict:
        """What lmmarg.results.loo computed for this fit, kept on it and not pickled: {"pointwise": (chain, draw,
        N), ("group", name): ((chain, draw, G), labels), "reloo": {row: elpd_i}, ("program", ...): compiled
        programs}. Filled by lmmarg.results.loo and ``loo(reloo=...)``."""
        cache = getattr(self, "_loo_cache", None)
        if cache is None:
            cache = self._loo_cache = {}
        return cache

    def save(self, path) -> None:
        """Write the fit (formula, options, priors, data, draws, diagnostics) to ``path``; read it with
        ``lmmarg.load``. One zip file of .npy arrays and JSON metadata that loads without running code, written
        atomically (a failed save leaves the earlier file intact) and checksummed (lmmarg.saving)."""
        saving.save_fit(self, path)

    @property
    def n_chains(self) -> int:
        return self.samples["beta"].shape[0]

    @property
    def n_draws(self) -> int:
        return self.samples["beta"].shape[1]

    # -- named scalar quantities --------------------------------------------------------------------------------
    @staticmethod
    def _labels(terms) -> dict:
        """{term name: brms group label}: the grouping factor, as in the prior table and brms; a term's own name
        ("g.1") only where two terms on the same factor have a column of the same name, e.g. (1|g) + (1|g)."""
        return {t.name: (t.name if any(o is not t and o.group == t.group and set(o.columns) & set(t.columns)
                                       for o in terms) else t.group) for t in terms}

    def draws_by_name(self, ranef: bool = False) -> dict:
        """{brms-like row name: (chain, draw) array}: b_<x>, sd_<group>__<col>, cor_<group>__<a>__<b>, sigma;
        with a sigma formula b_sigma_<x>, sd_<group>__sigma_<col>, cor_<group>__sigma_<a>__sigma_<b>;
        ranef=True adds r_<group>[<level>,<col>]."""
        m, s = self.model, self.samples
        out = {}
        for j, n in enumerate(m.fixed_names):
            out[parameters.fixed_site(n)] = s["beta"][..., j]
        sspec = m.sigma_spec
        if sspec.kind == "formula":
            for j, n in enumerate(sspec.design.fixed_names):
                out[parameters.fixed_site(n, sigma_part=True)] = s["b_sigma"][..., j]
        parts = self._parts()
        for part, terms in parts:
            lab = self._labels(terms)
            for t in terms:
                g, pre = lab[t.name], (parameters.SIGMA_PART if part else "")
                sd = s.get(parameters.sd_site(t.name, sigma_part=part))
                if sd is None:
                    continue
                for j, c in enumerate(t.columns):
                    out[parameters.sd_label(g, c, sigma_part=part)] = sd[..., j]
                corr = s.get(parameters.corr_site(t.name, sigma_part=part))
                if corr is not None:
                    for a in range(t.d):
                        for b in range(a + 1, t.d):
                            out[f"cor_{g}__{pre}{t.columns[a]}__{pre}{t.columns[b]}"] = corr[..., a, b]
        if sspec.kind == "dispersion" and sspec.dispersion in s:
            out[sspec.dispersion] = s[sspec.dispersion]
        if "sigma" in s:
            if s["sigma"].ndim == 2:
                out["sigma"] = s["sigma"]
            else:
                for k, lev in enumerate(sspec.levels):
                    out[f"sigma[{lev}]"] = s["sigma"][..., k]
        if ranef:
            for part, terms in parts:
                lab = self._labels(terms)
                for t in terms:
                    u = s.get(parameters.effects_site(t.name, sigma_part=part))
                    if u is None:
                        continue
                    pre = parameters.SIGMA_PART if part else ""
                    for gi, lev in enumerate(t.levels):
                        for j, c in enumerate(t.columns):
                            out[f"r_{lab[t.name]}[{lev},{pre}{c}]"] = u[..., gi, j]
        return out

    def summary(self, prob: float = 0.95, ranef: bool = False) -> pd.DataFrame:
        """Posterior summary: mean, sd, equal-tailed interval (q2.5, q97.5 for prob=0.95), ess_bulk, ess_tail,
        r_hat (rank-normalized split R-hat; ``lmmarg.diagnostics``, equal to ArviZ's). Rows are brms-like names
        (see ``draws_by_name``). A single-draw fit (MAP) has NaN sd and interval: it is a point estimate."""
        rows = self.draws_by_name(ranef=ranef)
        names = list(rows)
        arr = np.stack([rows[n] for n in names], -1)  # (chain, draw, R)
        lo, hi = (1 - prob) / 2, 1 - (1 - prob) / 2
        q = np.quantile(arr, [lo, hi], axis=(0, 1))
        if arr.shape[0] * arr.shape[1] == 1:  # a point estimate (MAP): no posterior spread to report
            q = np.full_like(q, np.nan)
        df = pd.DataFrame({"mean": arr.mean((0, 1)), "sd": arr.std((0, 1), ddof=1) if arr.shape[0] * arr.shape[1] > 1
                           else np.full(len(names), np.nan),
                           f"q{100 * lo:g}": q[0], f"q{100 * hi:g}": q[1]}, index=names)
        if self.n_draws >= 4:
            const = np.ptp(arr, axis=(0, 1)) == 0
            with np.errstate(all="ignore"):
                ess_b, ess_t, rhat = diagnostics.summarize(arr)
            df["ess_bulk"] = np.where(const, np.nan, ess_b)
            df["ess_tail"] = np.where(const, np.nan, ess_t)
            df["r_hat"] = np.where(const, np.nan, rhat)
        return df

    def __repr__(self) -> str:
        d = self.diagnostics
        head = f"{self.method} fit of {self.model.formula}: {self.n_chains} chains x {self.n_draws} draws"
        if "divergences" in d:
            head += f", {d['divergences']} divergences"
        fam = self.model.family_spec
        if fam.is_glmm:
            pot = getattr(self, "potential", None)
            marg = [] if pot is None else pot.marginalized_terms
            head += (f"\nfamily {fam}; random effects {marg} Laplace-marginalized (approximate: see docs/glmm.md), "
                     "their draws from the Laplace Gaussian at each draw's mode" if marg else
                     f"\nfamily {fam}; every random effect sampled by HMC (exact posterior)")
        return head + "\n" + self.summary().to_string(float_format=lambda x: f"{x:.4g}")

    def ranef(self) -> dict:
        """Posterior means of the random effects: {term: DataFrame (levels x columns)}."""
        site = parameters.effects_site
        return {t.name: pd.DataFrame(self.samples[site(t.name)].mean((0, 1)), index=t.levels, columns=t.columns)
                for t in self.model.terms if site(t.name) in self.samples}

    def _parts(self) -> list:
        """[(sigma_part, terms)]: the model's random-effect terms (False) and the sigma formula's (True)."""
        sspec = self.model.sigma_spec
        return [(False, self.model.terms)] + ([(True, sspec.design.terms)] if sspec.kind == "formula" else [])

    # -- ArviZ ----------------------------------------------------------------------------------------------------
    def _posterior_vars(self) -> tuple[dict, dict, dict, dict]:
        """brms-named posterior variables for ArviZ: (vars {name: (chain, draw, ...)}, dims, coords, constants).

        Scalars b_<x>, sd_<group>__<col>, cor_<group>__<a>__<b>, sigma (one panel each in ``az.plot_trace``);
        sigma with dim ``sigma_level`` for sigma_by; r_<group> (chain, draw, level, col) per grouping factor.
        Parameters fixed by a prior (constant over every draw) go to ``constants`` instead: a constant trace
        breaks ArviZ's density plots."""
        m = self.model
        rows = self.draws_by_name()
        vars_, dims, coords, const = {}, {}, {}, {}
        for k, v in rows.items():
            if k.startswith("sigma["):
                continue
            vars_[k] = v
        if "sigma" in self.samples and self.samples["sigma"].ndim == 3:
            vars_["sigma"] = self.samples["sigma"]
            coords["sigma_level"] = list(m.sigma_spec.levels)
            dims["sigma"] = ["sigma_level"]
        for part, terms in self._parts():
            lab = self._labels(terms)
            by_label: dict = {}
            for t in terms:
                if parameters.effects_site(t.name, sigma_part=part) in self.samples:
                    by_label.setdefault(lab[t.name], []).append(t)
            for g, ts in by_label.items():
                name = f"r_{g}" if not part else f"r_{g}__sigma"
                vars_[name] = np.concatenate([self.samples[parameters.effects_site(t.name, sigma_part=part)]
                                              for t in ts], -1)
                coords[f"{name}__level"] = list(ts[0].levels)
                coords[f"{name}__col"] = [(parameters.SIGMA_PART if part else "") + c for t in ts for c in t.columns]
                dims[name] = [f"{name}__level", f"{name}__col"]
        if self.n_chains * self.n_draws > 1:
            for k in list(vars_):
                v = vars_[k]
                if v.ndim == 2 and np.ptp(v) == 0:
                    const[k] = np.asarray(v.reshape(-1)[0])
                    del vars_[k]
        return vars_, dims, coords, const

    def log_likelihood(self, kind: str = "integrated") -> np.ndarray:
        """Pointwise log-likelihood per draw: (chain, draw, N).

        kind="integrated" (default): log p(y_i | y_-i, θ) with every random effect integrated out (the leave-one-out
        predictive density given the global parameters θ; lmmarg.loo). kind="conditional":
        log p(y_i | β, u, σ) given the recovered random effects (cheaper; PSIS-LOO on it is unreliable because each
        observation moves its own group's effect). For lognormal both are densities of the original y (Jacobian
        −log y_i included)."""
        require_rows(self.model, "Fit.log_likelihood (pointwise log-likelihoods of the training rows)")
        if kind == "integrated":
            return loo_module.pointwise_loglik(self)
        if kind != "conditional":
            raise ValueError(f"kind must be 'integrated' or 'conditional', got {kind!r}")
        m = self.model
        mu = self._linpred_train()
        if m.family_spec.is_glmm:
            site = m.family_spec.dispersion   # shape / phi per draw (chain, draw) -> (chain, draw, 1)
            return pointwise_log_lik(m.family_spec, np.asarray(m.y, float), m.trials,
                                     mu + (0.0 if m.design.offset is None else m.design.offset),
                                     None if site is None else np.asarray(self.samples[site], float)[..., None])
        sig = self._sigma_train()
        y = np.asarray(m.y, float)
        ll = -0.5 * np.log(2 * np.pi) - np.log(sig) - 0.5 * ((y - mu) / sig) ** 2
        if m.family == "lognormal":
            ll = ll - np.log(m.design.y)
        return ll

    def _linpred_train(self):
        """Xβ + Σ Z u on the fitted rows, (chain, draw, N), without any offset (it compares with model.y, the
        working response)."""
        m, s = self.model, self.samples
        require_rows(m, "fitted values on the training rows")
        mu = s["beta"] @ np.asarray(m.design.X).T
        for t in m.terms:
            mu = mu + np.sum(t.Z * s[parameters.effects_site(t.name)][..., t.codes, :], -1)
        return mu

    def residual_sd(self) -> np.ndarray:
        """Residual SD of every fitted row per draw, (chain, draw, N) (Gaussian scale: of log y for lognormal)."""
        return np.broadcast_to(self._sigma_train(), self.samples["beta"].shape[:2] + (self.model.n_obs,))

    def _sigma_train(self):
        m, s = self.model, self.samples
        sspec = m.sigma_spec
        if sspec.kind in ("none", "dispersion"):
            raise ValueError(f"family {m.family!r} has no residual SD"
                             + (f" (its dispersion is {sspec.dispersion!r})" if sspec.dispersion else ""))
        if sspec.kind == "constant":
            return s["sigma"][..., None]
        if sspec.kind == "by":
            return s["sigma"][..., sspec.codes]
        eta = s["b_sigma"] @ np.asarray(sspec.design.X).T
        for t in sspec.design.terms:
            eta = eta + np.sum(t.Z * s[parameters.effects_site(t.name, sigma_part=True)][..., t.codes, :], -1)
        return np.exp(eta)

    def to_arviz(self, log_likelihood="integrated", posterior_predictive: bool = True, seed: int = 0):
        """arviz.InferenceData with groups

        * posterior: brms-named parameters (``b_Days``, ``sd_Subject__Intercept``, ``cor_Subject__Intercept__Days``,
          ``sigma``: one trace panel each) and ``r_<group>`` (chain, draw, level, col) random effects;
        * posterior_predictive: ``y`` (chain, draw, N), draws of the response for the fitted rows (original scale);
        * log_likelihood: ``y`` (chain, draw, N): "integrated" (default, log p(y_i | y_-i, θ), see
          ``log_likelihood()``), "conditional" (given the recovered effects) or None/False to skip
          (True means "integrated");
        * sample_stats (NUTS: diverging, tree_depth, n_steps, step_size, acceptance_rate, lp);
        * observed_data: ``y`` (N,); constant_data: parameters fixed by a prior.
        """
        import arviz as az

        post, dims, coords, const = self._posterior_vars()
        kw = {}
        if self.model.statistics is not None:   # no rows: no observed data, pointwise likelihood or predictions
            return az.from_dict(posterior=post, sample_stats=self.sample_stats or None, coords=coords, dims=dims,
                                **({"constant_data": const} if const else {}))
        if log_likelihood is True:
            log_likelihood = "integrated"
        if log_likelihood:
            try:
                kw["log_likelihood"] = {"y": self.log_likelihood(kind=log_likelihood)}
            except loo_module.LooCostError as exc:
                warn_user(f"to_arviz: log_likelihood holds the likelihood conditional on the sampled random "
                          f"effects, not the integrated one: {exc}")
                kw["log_likelihood"] = {"y": self.log_likelihood(kind="conditional")}
        if posterior_predictive:
            yrep = self.predict(seed=seed)
            kw["posterior_predictive"] = {"y": yrep.reshape(self.n_chains, self.n_draws, -1)}
        if const:
            kw["constant_data"] = const
        coords["obs"] = np.arange(self.model.n_obs)
        dims["y"] = ["obs"]
        return az.from_dict(posterior=post, sample_stats=self.sample_stats or None,
                            observed_data={"y": np.asarray(self.model.design.y)}, coords=coords, dims=dims, **kw)

    # -- brms-like tables -----------------------------------------------------------------------------------------
    @staticmethod
    def _stats(draws: np.ndarray, prob: float) -> dict:
        """brms columns over the flattened draws (axis 0): Estimate, Est.Error, Q<lo>, Q<hi>."""
        lo, hi = (1 - prob) / 2, 1 - (1 - prob) / 2
        q = np.quantile(draws, [lo, hi], axis=0)
        err = draws.std(0, ddof=1) if draws.shape[0] > 1 else np.full(draws.shape[1:], np.nan)
        return {"Estimate": draws.mean(0), "Est.Error": err, f"Q{100 * lo:g}": q[0], f"Q{100 * hi:g}": q[1]}

    def fixef(self, prob: float = 0.95) -> pd.DataFrame:
        """Population-level effects like brms's ``fixef()``: rows ``model.fixed_names``; columns Estimate (posterior
        mean), Est.Error (posterior SD), Q2.5, Q97.5 (equal-tailed ``prob`` interval)."""
        b = self.samples["beta"].reshape(-1, len(self.model.fixed_names))
        return pd.DataFrame(self._stats(b, prob), index=list(self.model.fixed_names))

    def coef(self, prob: float = 0.95) -> dict:
        """Group-level coefficients like brms's ``coef()``: population effect + random effect per level, per draw.

        Returns {group: DataFrame}, rows the group's levels, columns a MultiIndex (coefficient, statistic) with
        statistics Estimate, Est.Error, Q2.5, Q97.5; coefficients are the group's random-effect columns (a column
        without a fixed counterpart is the random effect alone). ``coef()["Subject"]["Days"]`` is one table."""
        m = self.model
        S = self.n_chains * self.n_draws
        beta = self.samples["beta"].reshape(S, -1)
        lab = self._labels(m.terms)
        out: dict = {}
        for g in dict.fromkeys(lab[t.name] for t in m.terms):
            ts = [t for t in m.terms if lab[t.name] == g and parameters.effects_site(t.name) in self.samples]
            if not ts:
                continue
            cols = list(dict.fromkeys(c for t in ts for c in t.columns))
            G = ts[0].n_groups
            tot = {c: np.broadcast_to(beta[:, m.fixed_names.index(c), None], (S, G)).copy()
                   if c in m.fixed_names else np.zeros((S, G)) for c in cols}
            for t in ts:
                u = self.samples[parameters.effects_site(t.name)].reshape(S, G, t.d)
                for j, c in enumerate(t.columns):
                    tot[c] = tot[c] + u[:, :, j]
            frames = {c: pd.DataFrame(self._stats(tot[c], prob), index=list(ts[0].levels)) for c in cols}
            out[g] = pd.concat(frames, axis=1)
        return out

    def bayes_R2(self, prob: float = 0.95) -> pd.DataFrame:
        """Bayesian R² (Gelman, Goodrich, Gabry & Vehtari 2019; brms's ``bayes_R2``): per draw
        var(ŷ) / (var(ŷ) + var(y − ŷ)) with ŷ = E[y | β, u, σ] on the fitted rows (random effects included).
        Returns a one-row DataFrame (row "R2") with Estimate, Est.Error, Q2.5, Q97.5."""
        require_rows(self.model, "Fit.bayes_R2")
        yhat = self.predict(kind="mean")  # (S, N) on the response scale
        y = np.asarray(self.model.design.y, float)
        vf, ve = yhat.var(1, ddof=1), (y[None] - yhat).var(1, ddof=1)
        r2 = (vf / (vf + ve))[:, None]
        return pd.DataFrame(self._stats(r2, prob), index=["R2"])

    # -- model checking and comparison ----------------------------------------------------------------------------
    def loo(self, group: str | None = None, pointwise: bool = True, integrated: bool = True, reloo=None,
            progress: bool = True, **kwargs):
        """PSIS-LOO (``arviz.loo``) on the integrated log-likelihood; returns ArviZ's ELPDData.

        group=None: leave one observation out, log p(y_i | y_-i, θ) per draw θ, every random effect integrated out
        (lmmarg.loo.pointwise_loglik). group="Subject" (a term name, grouping expression or data column): leave
        one group out, log p(y_g | y_-g, θ) (lmmarg.loo.group_loglik): predicts a new subject's data.
        integrated=False uses the likelihood conditional on the recovered effects (pointwise only).
        The result's ``attrs["lmmarg_scale"]`` names what the density is of (the response as written), used by
        ``lmmarg.compare`` to flag fits on different scales. kwargs go to ``arviz.loo``.

        reloo (brms's ``reloo``; integrated leave-one-observation-out only): observations whose Pareto k exceeds
        0.7 (PSIS over the global parameters unreliable) are refitted without them and get their exact
        elpd_i = log mean_s p(y_i | y_-i, θ_s) over the refit's draws (``lmmarg.loo.reloo_points``); their k is
        then 0 and ``attrs["lmmarg_reloo"]`` lists them. None (default): automatically when at most
        ``lmmarg.loo.RELOO_MAX`` = 10 observations are flagged (otherwise a warning says how many); True: always;
        False: never. Each refit costs about one fit; results are kept on the fit. progress: progress bars for
        computations longer than a few seconds (the log-likelihood, the refits).
        """
        require_rows(self.model, "Fit.loo")
        import arviz as az

        if reloo not in (None, True, False):
            raise ValueError(f"reloo must be None (automatic), True or False, got {reloo!r}")
        if reloo and (group is not None or not integrated):
            raise ValueError("reloo applies to the integrated leave-one-observation-out (group=None, integrated=True)")

        if self.n_chains * self.n_draws < 2:
            raise ValueError(f"loo needs posterior draws; this {self.method} fit has a single draw")
        if group is None:
            ll = loo_module.pointwise_loglik(self, progress) if integrated else self.log_likelihood(kind="conditional")
            dims, coords = ["obs"], {"obs": np.arange(self.model.n_obs)}
        else:
            if not integrated:
                raise ValueError("loo(group=...) is only available on the integrated likelihood")
            ll, labels = loo_module.group_loglik(self, group, progress)
            dims, coords = ["group"], {"group": labels}
        post, pdims, pcoords, _ = self._posterior_vars()
        post = {k: v for k, v in post.items() if v.ndim == 2}  # scalars are enough for the relative ESS
        idata = az.from_dict(posterior=post, log_likelihood={"y": ll}, coords=coords, dims={"y": dims})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = az.loo(idata, pointwise=True, **kwargs)
        out.attrs["lmmarg_reloo"] = []
        if group is None and integrated and reloo is not False:
            out = self._reloo(out, ll, reloo, progress)
        for w in caught:  # ArviZ's Pareto-k warning only while unreliable points remain (not after reloo)
            if out["warning"] or "Pareto" not in str(w.message):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if not pointwise:
            out = out.drop(["loo_i", "pareto_k"], errors="ignore")
        out.attrs["lmmarg_scale"] = loo_module.response_scale(self)
        out.attrs["lmmarg_group"] = group
        return out

    def _reloo(self, out, ll, reloo, progress: bool):
        """``out`` (arviz ELPDData, pointwise) with the observations of Pareto k > 0.7 replaced by exact refits
        (see ``loo``); the refits' elpd_i are kept on the fit."""
        k = np.asarray(out["pareto_k"])
        bad = [int(i) for i in np.flatnonzero(k > loo_module.RELOO_K)]
        if not bad:
            return out
        if reloo is None and len(bad) > loo_module.RELOO_MAX:
            warn_user(f"loo: {len(bad)} observations have Pareto k > {loo_module.RELOO_K} (more than "
                      f"lmmarg.loo.RELOO_MAX = {loo_module.RELOO_MAX} refits): their elpd is unreliable. "
                      "loo(reloo=True) refits the model "
                      f"without each of them.")
            return out
        done = self.loo_cache.setdefault("reloo", {})
        todo = [i for i in bad if i not in done]
        if todo:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the refits' sampler warnings are about refits, not this fit
                done.update(loo_module.reloo_points(self, todo, progress=progress))
        out = out.copy()
        loo_i = np.asarray(out["loo_i"], float).copy()
        loo_i[bad] = [done[i] for i in bad]
        k = k.copy()
        k[bad] = 0.0
        S = self.n_chains * self.n_draws
        flat = np.asarray(ll).reshape(S, -1)
        lppd = float(np.sum(np.logaddexp.reduce(flat, axis=0) - np.log(S)))
        n = len(loo_i)
        out["loo_i"] = out["loo_i"].copy(data=loo_i)
        out["pareto_k"] = out["pareto_k"].copy(data=k)
        out["elpd_loo"] = float(loo_i.sum())
        out["se"] = float(np.sqrt(n * np.var(loo_i)))
        out["p_loo"] = lppd - float(loo_i.sum())
        out["warning"] = bool((k > loo_module.RELOO_K).any())
        out.attrs["lmmarg_reloo"] = bad
        return out

    # -- checks and plots (lmmarg.results.plots) -------------------------------------------------------------------
    def pp_check(self, kind: str = "dens_overlay", ndraws: int | None = None, stat: str = "mean",
                 group: str | None = None, prob: float = 0.9, ax=None, seed: int = 0):
        """Posterior predictive check (brms's ``pp_check``), drawn with matplotlib; returns the axes.

        kind="dens_overlay": kernel densities of ``ndraws`` (default 50) replicated data sets y_rep (thin) over the
        observed y (thick). kind="stat": histogram of ``stat`` ("mean", "sd", "median", "min", "max" or a
        function of a 1-D array) over y_rep draws (default all) with the observed value; with
        ``group="Subject"`` (a data column) the ``prob`` interval of the statistic per level with the observed
        value (brms's stat_grouped). Replicates are ``predict()`` draws for the fitted rows (existing groups keep
        their effects), on the original response scale.
        """
        require_rows(self.model, "Fit.pp_check")
        return plots.pp_check(self, kind=kind, ndraws=ndraws, stat=stat, group=group, prob=prob, ax=ax, seed=seed)

    def conditional_effects(self, var: str, resolution: int = 100, prob: float = 0.95, kind: str = "mean",
                            conditions: dict | None = None, plot: bool = False, ax=None) -> pd.DataFrame:
        """Posterior of the expected response along one predictor (brms's ``conditional_effects``).

        var: a data column used by the fixed effects. Numeric: ``resolution`` points from its min to max;
        categorical: its levels. Other predictors are held at their mean (numeric) or reference level
        (categorical) unless given in ``conditions`` ({column: value}); random effects are zero (population
        level). kind: "mean" (E[y], default), "linpred" or "response" (predictive draws); a binomial model is
        shown per trial (the probability).
        Returns a DataFrame: ``var``, the other predictors' values, estimate (posterior mean), lower, upper
        (equal-tailed ``prob`` interval). plot=True also draws it (line and band, or points and intervals) on
        ``ax`` (new axes by default), stored in ``result.attrs["ax"]``.
        """
        require_rows(self.model, "Fit.conditional_effects")
        out, categorical = prediction.conditional_effects(self, var, resolution=resolution, prob=prob, kind=kind,
                                                          conditions=conditions)
        if plot:
            out.attrs["ax"] = plots.draw_conditional_effects(out, var, categorical, self.model.design.response, ax)
        return out

    # -- prediction (lmmarg.results.predict) ---------------------------------------------------------------------
    def predict(self, new_data=None, draws: int | None = None, new_levels: str = "sample", seed: int = 0,
                kind: str = "response", trials=None) -> np.ndarray:
        """Posterior predictive draws for the rows of ``new_data`` (default: the fitted data).

        draws: None (all chain x draw) or a number of draws picked at random (seeded).
        new_levels: unseen groups get effects drawn from N(0, Σ) per draw ("sample"), zero ("zero"), or raise
        naming the term and level ("error").
        kind: "response" (draws of y; lognormal on the y scale), "mean" (E[y | params]: μ, or exp(μ + σ²/2)
        for lognormal) or "linpred" (μ, the Gaussian-scale linear predictor).
        GLMM families: "linpred" is η on the link scale, "mean" E[y | η] (trials × probability for binomial, the
        probability for bernoulli, the rate for poisson; brms's posterior_epred), "response" draws of y. A binomial
        model needs the trials of new rows: the cbind() columns or the trials= column in ``new_data``, or
        ``trials`` (a number or an array, one per row).
        Returns an array (n_draws, n_new), draws flattened over (chain, draw) in chain-major order.
        """
        return prediction.predict(self, new_data, draws=draws, new_levels=new_levels, seed=seed, kind=kind,
                                  trials=trials)
