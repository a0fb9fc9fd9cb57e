"""Posterior results: brms-like summaries, ArviZ conversion, posterior predictions and the brms workflow
(``fixef``, ``coef``, ``bayes_R2``, ``pp_check``, ``conditional_effects``, ``loo``, ``save`` / ``load``).

``Fit(model, samples)`` works for any sampler: ``samples`` is a dict of arrays with leading dims (chain, draw)
and the keys of ``model.sample()``: beta (p,), sigma (() or (K,) for sigma_by), sd_<term> (d,),
corr_<term> (d, d) for d > 1, u_<term> (G, d); with a sigma formula b_sigma, sd_sigma_<term>, corr_sigma_<term>,
u_sigma_<term>. MAP/VI results use one chain (or one draw) the same way.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from . import diagnostics
from . import loo as loo_module
from .design import DesignError, normalize_dtypes

__all__ = ["Fit", "load"]


_STATS = {"mean": np.mean, "sd": lambda a, axis: np.std(a, axis=axis, ddof=1), "median": np.median,
          "min": np.min, "max": np.max}


def _stat_fn(stat):
    """A statistic by name (mean, sd, median, min, max) or a function f(array) applied along an axis."""
    if callable(stat):
        return lambda a, axis: np.apply_along_axis(stat, axis, a)
    if stat not in _STATS:
        raise ValueError(f"stat must be one of {sorted(_STATS)} or a function, got {stat!r}")
    return _STATS[stat]


def _categorical_levels(spec, columns) -> dict:
    """{data column: fitted levels} for the categorical predictors of a formulaic model spec (``x`` or ``C(x)``)."""
    import re

    out = {}
    for expr, (kind, state) in getattr(spec, "encoder_state", {}).items():
        if getattr(kind, "value", kind) != "categorical" or "categories" not in state:
            continue
        m = re.fullmatch(r"\s*(?:C|factor)\(\s*`?([^,`)]+)`?\s*(?:,.*)?\)\s*", expr)
        col = expr if expr in columns else (m.group(1).strip() if m else None)
        if col in columns:
            out[col] = list(state["categories"])
    return out


def _check_levels(spec, data: pd.DataFrame, where: str) -> None:
    """Raise naming the column and level when new_data has a level of a categorical predictor that the fitted
    data did not have (formulaic would only warn and encode it as the reference level)."""
    for col, cats in _categorical_levels(spec, data.columns).items():
        seen, seen_str = set(cats), {str(c) for c in cats}  # 3.0 matches a fitted level 3, "3" too
        unseen = sorted({str(v) for v in pd.unique(data[col])
                         if not pd.isna(v) and v not in seen and str(v) not in seen_str})
        if unseen:
            raise DesignError(f"new_data column {col!r} has level(s) {unseen} not seen in the fitted data "
                              f"({where}); fitted levels are {cats}")


def _matrix(spec, data: pd.DataFrame, where: str) -> pd.DataFrame:
    import warnings

    from formulaic.errors import DataMismatchWarning

    data = normalize_dtypes(data, data.columns)  # string / Int64 / Arrow columns as in the fitted design
    _check_levels(spec, data, where)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", DataMismatchWarning)  # any other level mismatch: an error, not a guess
            return spec.get_model_matrix(data, na_action="raise")
    except Exception as exc:
        raise DesignError(f"cannot build {where} for new_data: {exc}") from None


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

    def save(self, path) -> None:
        """Write the fit (formula, options, priors, data, draws, diagnostics) to ``path``; read it with
        ``lmmarg.load``. One zip file of .npy arrays and JSON metadata that loads without running code, written
        atomically (a failed save leaves the earlier file intact) and checksummed (lmmarg.saving)."""
        from . import saving

        saving.save_fit(self, path)

    @property
    def n_chains(self) -> int:
        return self.samples["beta"].shape[0]

    @property
    def n_draws(self) -> int:
        return self.samples["beta"].shape[1]

    # -- named scalar quantities --------------------------------------------------------------------------------
    @staticmethod
    def _labels(terms, sfx: str = "") -> dict:
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
            out[f"b_{n}"] = s["beta"][..., j]
        sspec = m.sigma_spec
        if sspec.kind == "formula":
            for j, n in enumerate(sspec.design.fixed_names):
                out[f"b_sigma_{n}"] = s["b_sigma"][..., j]
        parts = [("", m.terms)] + ([("sigma_", sspec.design.terms)] if sspec.kind == "formula" else [])
        for sfx, terms in parts:
            lab = self._labels(terms, sfx)
            for t in terms:
                g, pre = lab[t.name], ("sigma_" if sfx else "")
                sd = s.get(f"sd_{sfx}{t.name}")
                if sd is None:
                    continue
                for j, c in enumerate(t.columns):
                    out[f"sd_{g}__{pre}{c}"] = sd[..., j]
                corr = s.get(f"corr_{sfx}{t.name}")
                if corr is not None:
                    for a in range(t.d):
                        for b in range(a + 1, t.d):
                            out[f"cor_{g}__{pre}{t.columns[a]}__{pre}{t.columns[b]}"] = corr[..., a, b]
        if "sigma" in s:
            if s["sigma"].ndim == 2:
                out["sigma"] = s["sigma"]
            else:
                for k, lev in enumerate(sspec.levels):
                    out[f"sigma[{lev}]"] = s["sigma"][..., k]
        if ranef:
            for sfx, terms in parts:
                lab = self._labels(terms, sfx)
                for t in terms:
                    u = s.get(f"u_{sfx}{t.name}")
                    if u is None:
                        continue
                    pre = "sigma_" if sfx else ""
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
        return {t.name: pd.DataFrame(self.samples[f"u_{t.name}"].mean((0, 1)), index=t.levels, columns=t.columns)
                for t in self.model.terms if f"u_{t.name}" in self.samples}

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
        sspec = m.sigma_spec
        parts = [("", m.terms)] + ([("sigma_", sspec.design.terms)] if sspec.kind == "formula" else [])
        for sfx, terms in parts:
            lab = self._labels(terms, sfx)
            by_label: dict = {}
            for t in terms:
                if f"u_{sfx}{t.name}" in self.samples:
                    by_label.setdefault(lab[t.name], []).append(t)
            for g, ts in by_label.items():
                name = f"r_{g}" if not sfx else f"r_{g}__sigma"
                vars_[name] = np.concatenate([self.samples[f"u_{sfx}{t.name}"] for t in ts], -1)
                coords[f"{name}__level"] = list(ts[0].levels)
                coords[f"{name}__col"] = [("sigma_" if sfx else "") + c for t in ts for c in t.columns]
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
        if kind == "integrated":
            return loo_module.pointwise_loglik(self)
        if kind != "conditional":
            raise ValueError(f"kind must be 'integrated' or 'conditional', got {kind!r}")
        m = self.model
        mu = self._linpred_train()
        if m.family_spec.is_glmm:
            from .families import pointwise_log_lik
            return pointwise_log_lik(m.family_spec, np.asarray(m.y, float), m.trials,
                                     mu + (0.0 if m.design.offset is None else m.design.offset))
        sig = self._sigma_train()
        y = np.asarray(m.y, float)
        ll = -0.5 * np.log(2 * np.pi) - np.log(sig) - 0.5 * ((y - mu) / sig) ** 2
        if m.family == "lognormal":
            ll = ll - np.log(m.design.y)
        return ll

    def _offset(self, new: pd.DataFrame | None):
        """The formula's offset for the fitted rows (new=None) or for new_data: (n,), or None without offsets."""
        d = self.model.design
        if not getattr(d, "offset_specs", None):
            return None
        if new is None:
            return d.offset
        return sum(np.asarray(_matrix(sp, new, f"offset({e})"), float)[:, 0]
                   for sp, e in zip(d.offset_specs, d.spec.offsets))

    def _linpred_train(self):
        """Xβ + Σ Z u on the fitted rows, (chain, draw, N), without any offset (it compares with model.y, the
        working response)."""
        m, s = self.model, self.samples
        mu = s["beta"] @ np.asarray(m.design.X).T
        for t in m.terms:
            mu = mu + np.sum(t.Z * s[f"u_{t.name}"][..., t.codes, :], -1)
        return mu

    def residual_sd(self) -> np.ndarray:
        """Residual SD of every fitted row per draw, (chain, draw, N) (Gaussian scale: of log y for lognormal)."""
        return np.broadcast_to(self._sigma_train(), self.samples["beta"].shape[:2] + (self.model.n_obs,))

    def _sigma_train(self):
        m, s = self.model, self.samples
        sspec = m.sigma_spec
        if sspec.kind == "none":
            raise ValueError(f"family {m.family!r} has no residual SD")
        if sspec.kind == "constant":
            return s["sigma"][..., None]
        if sspec.kind == "by":
            return s["sigma"][..., sspec.codes]
        eta = s["b_sigma"] @ np.asarray(sspec.design.X).T
        for t in sspec.design.terms:
            eta = eta + np.sum(t.Z * s[f"u_sigma_{t.name}"][..., t.codes, :], -1)
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
        if log_likelihood is True:
            log_likelihood = "integrated"
        if log_likelihood:
            try:
                kw["log_likelihood"] = {"y": self.log_likelihood(kind=log_likelihood)}
            except loo_module.LooCostError as exc:
                from ._warnings import warn_user
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
            ts = [t for t in m.terms if lab[t.name] == g and f"u_{t.name}" in self.samples]
            if not ts:
                continue
            cols = list(dict.fromkeys(c for t in ts for c in t.columns))
            G = ts[0].n_groups
            tot = {c: np.broadcast_to(beta[:, m.fixed_names.index(c), None], (S, G)).copy()
                   if c in m.fixed_names else np.zeros((S, G)) for c in cols}
            for t in ts:
                u = self.samples[f"u_{t.name}"].reshape(S, G, t.d)
                for j, c in enumerate(t.columns):
                    tot[c] = tot[c] + u[:, :, j]
            frames = {c: pd.DataFrame(self._stats(tot[c], prob), index=list(ts[0].levels)) for c in cols}
            out[g] = pd.concat(frames, axis=1)
        return out

    def bayes_R2(self, prob: float = 0.95) -> pd.DataFrame:
        """Bayesian R² (Gelman, Goodrich, Gabry & Vehtari 2019; brms's ``bayes_R2``): per draw
        var(ŷ) / (var(ŷ) + var(y − ŷ)) with ŷ = E[y | β, u, σ] on the fitted rows (random effects included).
        Returns a one-row DataFrame (row "R2") with Estimate, Est.Error, Q2.5, Q97.5."""
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
        import warnings

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
        import warnings

        from ._warnings import warn_user

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
        done = self.__dict__.setdefault("_loo_cache", {}).setdefault("reloo", {})
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
        import matplotlib.pyplot as plt

        if kind not in ("dens_overlay", "stat"):
            raise ValueError(f"kind must be 'dens_overlay' or 'stat', got {kind!r}")
        S = self.n_chains * self.n_draws
        nd = min(S, 50 if kind == "dens_overlay" else S) if ndraws is None else ndraws
        yrep = self.predict(draws=nd, seed=seed)  # (nd, N)
        y = np.asarray(self.model.design.y, float)
        if ax is None:
            _, ax = plt.subplots()
        label = self.model.design.response
        if kind == "dens_overlay":
            from scipy.stats import gaussian_kde

            lo, hi = np.quantile(np.concatenate([y, yrep.ravel()]), [0.001, 0.999])
            grid = np.linspace(lo, hi, 200)
            for i in range(nd):
                ax.plot(grid, gaussian_kde(yrep[i])(grid), color="C0", alpha=0.2, lw=0.7,
                        label="y_rep" if i == 0 else None)
            ax.plot(grid, gaussian_kde(y)(grid), color="k", lw=2, label="y")
            ax.set_xlabel(label)
            ax.set_ylabel("density")
            ax.legend()
            return ax
        fn = _stat_fn(stat)
        name = stat if isinstance(stat, str) else getattr(stat, "__name__", "stat")
        if group is None:
            ax.hist(fn(yrep, axis=1), bins=30, color="C0", alpha=0.6, label=f"{name}(y_rep)")
            ax.axvline(fn(y, axis=0), color="k", lw=2, label=f"{name}(y)")
            ax.set_xlabel(f"{name} of {label}")
            ax.legend()
            return ax
        data = self.model.design.data
        if group not in data.columns:
            raise ValueError(f"pp_check(group={group!r}): no data column {group!r}; columns are "
                             f"{list(data.columns)}")
        codes, levels = pd.factorize(data[group], sort=True)
        G = len(levels)
        order = np.argsort(codes, kind="stable")
        starts = np.r_[0, np.cumsum(np.bincount(codes, minlength=G))[:-1]]
        obs = np.array([fn(seg, axis=0) for seg in np.split(y[order], starts[1:])])
        rep = np.stack([fn(seg, axis=1) for seg in np.split(yrep[:, order], starts[1:], axis=1)], 1)  # (nd, G)
        q = np.quantile(rep, [(1 - prob) / 2, 1 - (1 - prob) / 2], axis=0)
        x = np.arange(G)
        ax.vlines(x, q[0], q[1], color="C0", lw=3, alpha=0.6, label=f"{name}(y_rep), {prob:.0%} interval")
        ax.plot(x, obs, "ko", label=f"{name}(y)")
        ax.set_xticks(x, [str(v) for v in levels], rotation=90)
        ax.set_xlabel(group)
        ax.set_ylabel(f"{name} of {label}")
        ax.legend()
        ax.figure.tight_layout()  # room for the rotated level labels
        return ax

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
        m = self.model
        data = m.design.data
        used = self._predictor_columns()
        if var not in data.columns or var not in used["fixed"]:
            raise ValueError(f"conditional_effects: {var!r} is not a predictor of the fixed effects; they use "
                             f"{sorted(used['fixed'])}")
        conditions = dict(conditions or {})
        unknown = [k for k in conditions if k not in data.columns]
        if unknown:
            raise ValueError(f"conditional_effects: conditions name unknown column(s) {unknown}")
        col = data[var]
        levels = _categorical_levels(m.design.fixed_spec, data.columns)  # includes C(x) of a numeric x
        categorical = var in levels
        if categorical:
            grid = levels[var]
        else:
            grid = np.linspace(col.min(), col.max(), resolution)
        new = pd.DataFrame({var: grid})
        for c in sorted(used["fixed"] | used["other"]):
            if c == var:
                continue
            if c in conditions:
                new[c] = conditions[c]
            elif c in used["groups"]:
                new[c] = "lmmarg_new_level_"  # an unseen level: its random effects are zero below
            else:
                s = data[c]
                if c in levels:  # a factor: its reference (first fitted) level
                    new[c] = pd.Series([levels[c][0]] * len(new), dtype=s.dtype)
                elif pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
                    new[c] = s.mean()
                else:  # a non-numeric column outside the fixed part (random slopes, sigma formula)
                    ref = (s.cat.categories[0] if isinstance(s.dtype, pd.CategoricalDtype)
                           else sorted(s.unique(), key=str)[0])
                    new[c] = pd.Series([ref] * len(new), dtype=s.dtype)
        # binomial: per trial (the probability of success), as brms with trials = 1
        draws = self.predict(new, kind=kind, new_levels="zero", trials=1 if m.family == "binomial" else None)
        lo, hi = np.quantile(draws, [(1 - prob) / 2, 1 - (1 - prob) / 2], axis=0)
        out = new.drop(columns=[c for c in used["groups"] if c in new.columns and c not in conditions and c != var])
        out = out.assign(estimate=draws.mean(0), lower=lo, upper=hi)
        if plot:
            import matplotlib.pyplot as plt

            if ax is None:
                _, ax = plt.subplots()
            if categorical:
                x = np.arange(len(out))
                ax.errorbar(x, out["estimate"], yerr=[out["estimate"] - out["lower"], out["upper"] - out["estimate"]],
                            fmt="o", color="C0", capsize=3)
                ax.set_xticks(x, [str(v) for v in out[var]])
            else:
                ax.plot(out[var], out["estimate"], color="C0")
                ax.fill_between(out[var], out["lower"], out["upper"], color="C0", alpha=0.3)
            ax.set_xlabel(var)
            ax.set_ylabel(m.design.response)
            out.attrs["ax"] = ax
        return out

    def _predictor_columns(self) -> dict:
        """Data columns the model uses: {"fixed": in the fixed effects, "groups": grouping factors, "other": in
        random-effect terms, the sigma formula or sigma_by}."""
        import formulaic

        m = self.model
        cols = set(map(str, m.design.data.columns))

        def variables(expr, spec=None):
            # a fitted formulaic ModelSpec lists every column its terms read, inside stateful transforms too
            # (scale(x), poly(x, 2), center(x), bs(x)); Formula(...).required_variables leaves those out
            found = set(formulaic.Formula(expr).required_variables)
            found |= set(getattr(spec, "required_variables", None) or ())
            return found & cols

        d = m.design
        fixed = variables(d.spec.fixed, d.fixed_spec)
        offsets = set()
        for i, e in enumerate(d.spec.offsets or []):
            specs = getattr(d, "offset_specs", None) or []
            offsets |= variables(e, specs[i] if i < len(specs) else None)
        groups, other = set(), set()
        sspec = m.sigma_spec
        terms = list(m.terms) + (list(sspec.design.terms) if sspec.kind == "formula" else [])
        for t in terms:
            groups |= set(t.factors)
            other |= variables(t.expr, getattr(t, "model_spec", None))
        if sspec.kind == "formula":
            other |= variables(sspec.design.spec.fixed, sspec.design.fixed_spec)
        if sspec.kind == "by":
            other |= {f.strip() for f in sspec.by.split(":")}
        return {"fixed": fixed, "groups": groups - fixed, "other": other | offsets | (groups - fixed)}

    # -- prediction -----------------------------------------------------------------------------------------------
    def _term_effects(self, t, u, sd, corr, new: pd.DataFrame, new_levels: str, rng) -> np.ndarray:
        """Σ_c Z_new[:, c] u[draw, level(row), c] for one term: (S, n); unseen levels per ``new_levels``."""
        mm = _matrix(t.model_spec, new, f"the columns of random-effect term {t.name!r}")
        missing = [c for c in t.columns if c not in mm.columns]
        if missing:
            raise DesignError(f"new_data gives term {t.name!r} no column(s) {missing}")
        Z = np.asarray(mm[t.columns], float)
        for f in t.factors:
            if f not in new.columns:
                raise DesignError(f"new_data lacks grouping column {f!r} of term {t.name!r}")
        index = {k: i for i, k in enumerate(t.level_keys)}
        index_str = {tuple(map(str, k)): i for i, k in enumerate(t.level_keys)}
        keys = list(zip(*[new[f].tolist() for f in t.factors]))
        codes = np.empty(len(keys), np.int64)
        unseen: dict = {}
        for r, k in enumerate(keys):
            i = index.get(k, index_str.get(tuple(map(str, k))))
            if i is None:
                if new_levels == "error":
                    raise ValueError(f"new_data has level {':'.join(map(str, k))!r} of grouping factor "
                                     f"{t.group!r} (term {t.name!r}) not seen in the fitted data; pass "
                                     "new_levels='sample' or 'zero' to predict for new groups")
                i = -1 - unseen.setdefault(k, len(unseen))
            codes[r] = i
        S, G, d = u.shape
        if unseen:
            if new_levels == "sample":
                L = sd[:, :, None] * (np.linalg.cholesky(corr) if corr is not None else np.ones((S, 1, 1)))
                eps = rng.standard_normal((S, len(unseen), d))
                extra = np.einsum("sij,skj->ski", L, eps)
            else:
                extra = np.zeros((S, len(unseen), d))
            u = np.concatenate([u, extra], 1)
            codes = np.where(codes < 0, G + (-1 - codes), codes)
        return np.sum(Z[None] * u[:, codes, :], -1)

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
        if new_levels not in ("sample", "zero", "error"):
            raise ValueError(f"new_levels must be 'sample', 'zero' or 'error', got {new_levels!r}")
        if kind not in ("response", "mean", "linpred"):
            raise ValueError(f"kind must be 'response', 'mean' or 'linpred', got {kind!r}")
        m = self.model
        new = m.design.data if new_data is None else (pd.DataFrame(new_data) if isinstance(new_data, dict)
                                                      else new_data)
        if not isinstance(new, pd.DataFrame):
            raise TypeError(f"new_data must be a pandas DataFrame or dict of columns, got {type(new).__name__}")
        new = new.rename(columns=str).reset_index(drop=True)
        rng = np.random.default_rng(seed)
        S_all = self.n_chains * self.n_draws
        flat = {k: v.reshape((S_all,) + v.shape[2:]) for k, v in self.samples.items()}
        if draws is None:
            idx = np.arange(S_all)
        else:
            if not isinstance(draws, (int, np.integer)) or not 1 <= draws <= S_all:
                raise ValueError(f"draws must be an integer in [1, {S_all}], got {draws!r}")
            idx = np.sort(rng.choice(S_all, size=draws, replace=False))
        fl = {k: v[idx] for k, v in flat.items()}
        X = _matrix(m.design.fixed_spec, new, "the fixed-effects matrix")
        X = np.asarray(X[list(m.fixed_names)], float) if m.fixed_names else np.zeros((len(new), 0))
        mu = fl["beta"] @ X.T
        off = self._offset(None if new_data is None else new)
        if off is not None:
            mu = mu + off  # offset(...) terms enter every kind, the linear predictor included

        def effects(terms, sfx):
            tot = 0.0
            for t in terms:
                key = f"u_{sfx}{t.name}"
                if key not in fl:
                    raise ValueError(f"samples lack {key!r}: recover the random effects before predicting")
                tot = tot + self._term_effects(t, fl[key], fl[f"sd_{sfx}{t.name}"], fl.get(f"corr_{sfx}{t.name}"),
                                               new, new_levels, rng)
            return tot

        mu = mu + effects(m.terms, "")
        if m.family_spec.is_glmm:
            return self._glmm_predict(mu, None if new_data is None else new, kind, rng, trials)
        sspec = m.sigma_spec
        if sspec.kind == "constant":
            sig = fl["sigma"][:, None]
        elif sspec.kind == "by":
            factors = [f.strip() for f in sspec.by.split(":")]
            index = {tuple(map(str, k)): i for i, k in enumerate(sspec.level_keys)}
            keys = list(zip(*[new[f].tolist() for f in factors]))
            codes = []
            for k in keys:
                i = index.get(tuple(map(str, k)))
                if i is None:
                    raise ValueError(f"new_data has level {':'.join(map(str, k))!r} of sigma_by={sspec.by!r} "
                                     "not seen in the fitted data")
                codes.append(i)
            sig = fl["sigma"][:, np.asarray(codes, np.int64)]
        else:
            Xs = _matrix(sspec.design.fixed_spec, new, "the sigma formula's fixed-effects matrix")
            Xs = np.asarray(Xs[list(sspec.design.fixed_names)], float)
            sig = np.exp(fl["b_sigma"] @ Xs.T + effects(sspec.design.terms, "sigma_"))
        sig = np.broadcast_to(sig, mu.shape)
        if kind == "linpred":
            return mu
        if kind == "mean":
            return np.exp(mu + 0.5 * sig**2) if m.family == "lognormal" else mu
        y = mu + sig * rng.standard_normal(mu.shape)
        return np.exp(y) if m.family == "lognormal" else y

    def _glmm_predict(self, eta, new, kind: str, rng, trials=None) -> np.ndarray:
        """predict() of a GLMM family from the linear predictor eta (S, n)."""
        from . import families
        m = self.model
        if kind == "linpred":
            return eta
        if trials is not None:
            if m.family != "binomial":
                raise ValueError(f"trials= applies to family='binomial', not {m.family!r}")
            n = np.broadcast_to(np.asarray(trials, float), eta.shape[-1:])
            if (n <= 0).any() or (n != np.round(n)).any():
                raise ValueError("trials must be positive integers")
        else:
            n = m.trials if new is None else _new_trials(m, new)
        p = families.mean(m.family_spec, eta)
        if kind == "mean":
            return p * n
        if m.family == "poisson":
            return rng.poisson(p).astype(float)
        return rng.binomial(np.broadcast_to(n, p.shape).astype(np.int64), np.clip(p, 0.0, 1.0)).astype(float)


def _new_trials(m, new: pd.DataFrame) -> np.ndarray:
    """(n,) trials of new rows: ones unless binomial; the trials= column or the cbind() sum for binomial."""
    if m.family != "binomial":
        return np.ones(len(new))
    if m.trials_column is not None:
        if m.trials_column not in new.columns:
            raise DesignError(f"new_data needs the trials column {m.trials_column!r} of the binomial model")
        return np.asarray(new[m.trials_column], float)
    spec = m.design.spec
    if spec.failures is None:
        return np.ones(len(new))  # a 0/1 response fitted as binomial: one trial per row
    import formulaic
    try:
        mm = formulaic.model_matrix(f"0 + I(({spec.response}) + ({spec.failures}))", new, na_action="raise")
    except Exception as exc:
        raise DesignError(f"new_data needs the columns of cbind({spec.response}, {spec.failures}) for the binomial "
                          f"trials: {exc}") from None
    return np.asarray(mm, float)[:, 0]


def load(path, allow_pickle: bool = False) -> Fit:
    """Read a fit written by ``Fit.save(path)``, checking its checksums (lmmarg.saving.load_fit).

    allow_pickle=True also reads pickled content (files of lmmarg 0.1, or items ``save`` warned it pickled):
    unpickling runs code stored in the file, so pass it only for files you trust."""
    from . import saving

    return saving.load_fit(path, allow_pickle=allow_pickle)
