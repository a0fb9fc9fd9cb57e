"""Posterior results: brms-like summaries, ArviZ conversion and posterior predictions.

``Fit(model, samples)`` works for any sampler: ``samples`` is a dict of arrays with leading dims (chain, draw)
and the keys of ``model.sample()``: beta (p,), sigma (() or (K,) for sigma_by), sd_<term> (d,),
corr_<term> (d, d) for d > 1, u_<term> (G, d); with a sigma formula b_sigma, sd_sigma_<term>, corr_sigma_<term>,
u_sigma_<term>. MAP/VI results use one chain (or one draw) the same way.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .design import DesignError

__all__ = ["Fit"]


def _matrix(spec, data: pd.DataFrame, where: str) -> pd.DataFrame:
    try:
        return spec.get_model_matrix(data, na_action="raise")
    except Exception as exc:
        raise DesignError(f"cannot build {where} for new_data: {exc}") from None


class Fit:
    """Posterior draws of a model with summaries (``summary()``), ``diagnostics``, ``to_arviz()``, ``predict()``.

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

    @property
    def n_chains(self) -> int:
        return self.samples["beta"].shape[0]

    @property
    def n_draws(self) -> int:
        return self.samples["beta"].shape[1]

    # -- named scalar quantities --------------------------------------------------------------------------------
    def _labels(self, terms, sfx: str) -> dict:
        groups = [t.group for t in terms]
        return {t.name: (t.group if groups.count(t.group) == 1 or t.group == t.name else t.name) for t in terms}

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
        r_hat (rank-normalized, ArviZ). Rows are brms-like names (see ``draws_by_name``)."""
        import arviz as az
        import xarray as xr

        rows = self.draws_by_name(ranef=ranef)
        names = list(rows)
        arr = np.stack([rows[n] for n in names], -1)  # (chain, draw, R)
        lo, hi = (1 - prob) / 2, 1 - (1 - prob) / 2
        q = np.quantile(arr, [lo, hi], axis=(0, 1))
        df = pd.DataFrame({"mean": arr.mean((0, 1)), "sd": arr.std((0, 1), ddof=1) if arr.shape[0] * arr.shape[1] > 1
                           else np.zeros(len(names)),
                           f"q{100 * lo:g}": q[0], f"q{100 * hi:g}": q[1]}, index=names)
        if self.n_draws >= 4:
            ds = xr.Dataset({"x": (("chain", "draw", "row"), arr)})
            const = np.ptp(arr, axis=(0, 1)) == 0
            with np.errstate(all="ignore"):
                ess_b = az.ess(ds, method="bulk")["x"].values
                ess_t = az.ess(ds, method="tail")["x"].values
                rhat = az.rhat(ds)["x"].values if self.n_chains > 1 else np.full(len(names), np.nan)
            df["ess_bulk"] = np.where(const, np.nan, ess_b)
            df["ess_tail"] = np.where(const, np.nan, ess_t)
            df["r_hat"] = np.where(const, np.nan, rhat)
        return df

    def __repr__(self) -> str:
        d = self.diagnostics
        head = f"{self.method} fit of {self.model.formula}: {self.n_chains} chains x {self.n_draws} draws"
        if "divergences" in d:
            head += f", {d['divergences']} divergences"
        return head + "\n" + self.summary().to_string(float_format=lambda x: f"{x:.4g}")

    def ranef(self) -> dict:
        """Posterior means of the random effects: {term: DataFrame (levels x columns)}."""
        return {t.name: pd.DataFrame(self.samples[f"u_{t.name}"].mean((0, 1)), index=t.levels, columns=t.columns)
                for t in self.model.terms if f"u_{t.name}" in self.samples}

    # -- ArviZ ----------------------------------------------------------------------------------------------------
    def _coords_dims(self):
        m = self.model
        coords, dims = {"fixed": list(m.fixed_names), "obs": np.arange(m.n_obs)}, {"beta": ["fixed"]}
        sspec = m.sigma_spec
        if sspec.kind == "by":
            coords["sigma_level"] = list(sspec.levels)
            dims["sigma"] = ["sigma_level"]
        parts = [("", m.terms)]
        if sspec.kind == "formula":
            coords["fixed_sigma"] = list(sspec.design.fixed_names)
            dims["b_sigma"] = ["fixed_sigma"]
            parts.append(("sigma_", sspec.design.terms))
        for sfx, terms in parts:
            for t in terms:
                n = f"{sfx}{t.name}"
                coords[f"{n}__col"] = list(t.columns)
                coords[f"{n}__col2"] = list(t.columns)
                coords[f"{n}__level"] = list(t.levels)
                dims[f"sd_{n}"] = [f"{n}__col"]
                dims[f"corr_{n}"] = [f"{n}__col", f"{n}__col2"]
                dims[f"u_{n}"] = [f"{n}__level", f"{n}__col"]
        return coords, dims

    def log_likelihood(self) -> np.ndarray:
        """Pointwise log p(y_i | β, u, σ) conditional on the (recovered) random effects: (chain, draw, N).
        For lognormal the density is of the original y (Jacobian -log y_i included)."""
        m = self.model
        mu = self._linpred_train()
        sig = self._sigma_train()
        y = np.asarray(m.y, float)
        ll = -0.5 * np.log(2 * np.pi) - np.log(sig) - 0.5 * ((y - mu) / sig) ** 2
        if m.family == "lognormal":
            ll = ll - np.log(m.design.y)
        return ll

    def _linpred_train(self):
        m, s = self.model, self.samples
        mu = s["beta"] @ np.asarray(m.design.X).T
        for t in m.terms:
            mu = mu + np.sum(t.Z * s[f"u_{t.name}"][..., t.codes, :], -1)
        return mu

    def _sigma_train(self):
        m, s = self.model, self.samples
        sspec = m.sigma_spec
        if sspec.kind == "constant":
            return s["sigma"][..., None]
        if sspec.kind == "by":
            return s["sigma"][..., sspec.codes]
        eta = s["b_sigma"] @ np.asarray(sspec.design.X).T
        for t in sspec.design.terms:
            eta = eta + np.sum(t.Z * s[f"u_sigma_{t.name}"][..., t.codes, :], -1)
        return np.exp(eta)

    def to_arviz(self, log_likelihood: bool = False):
        """arviz.InferenceData with posterior (keys as in ``samples``, named coords), sample_stats (NUTS:
        diverging, tree_depth, n_steps, step_size, acceptance_rate, lp), observed_data (y) and, if
        ``log_likelihood=True``, the pointwise log-likelihood conditional on the recovered random effects
        (cheap: (chain, draw, N); note LOO on it is conditional on the effects, not marginal)."""
        import arviz as az

        coords, dims = self._coords_dims()
        post = dict(self.samples)
        dims = {k: v for k, v in dims.items() if k in post}
        kw = {}
        if log_likelihood:
            kw["log_likelihood"] = {"y": self.log_likelihood()}
            dims["y"] = ["obs"]
        return az.from_dict(posterior=post, sample_stats=self.sample_stats or None,
                            observed_data={"y": np.asarray(self.model.design.y)}, coords=coords, dims=dims, **kw)

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
                kind: str = "response") -> np.ndarray:
        """Posterior predictive draws for the rows of ``new_data`` (default: the fitted data).

        draws: None (all chain x draw) or a number of draws picked at random (seeded).
        new_levels: unseen groups get effects drawn from N(0, Σ) per draw ("sample"), zero ("zero"), or raise
        naming the term and level ("error").
        kind: "response" (draws of y; lognormal on the y scale), "mean" (E[y | params]: μ, or exp(μ + σ²/2)
        for lognormal) or "linpred" (μ, the Gaussian-scale linear predictor).
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
