"""Plots of a Fit, drawn with matplotlib (imported on first use): ``pp_check(fit, ...)`` (brms's posterior
predictive checks) and ``draw_conditional_effects(table, ...)`` (the plot of ``Fit.conditional_effects``).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["pp_check", "draw_conditional_effects"]

_STATS = {"mean": np.mean, "sd": lambda a, axis: np.std(a, axis=axis, ddof=1), "median": np.median,
          "min": np.min, "max": np.max}


def _stat_fn(stat):
    """A statistic by name (mean, sd, median, min, max) or a function f(array) applied along an axis."""
    if callable(stat):
        return lambda a, axis: np.apply_along_axis(stat, axis, a)
    if stat not in _STATS:
        raise ValueError(f"stat must be one of {sorted(_STATS)} or a function, got {stat!r}")
    return _STATS[stat]


def pp_check(fit, kind: str = "dens_overlay", ndraws: int | None = None, stat: str = "mean",
             group: str | None = None, prob: float = 0.9, ax=None, seed: int = 0):
    """``Fit.pp_check`` (see there); returns the axes."""
    import matplotlib.pyplot as plt

    if kind not in ("dens_overlay", "stat"):
        raise ValueError(f"kind must be 'dens_overlay' or 'stat', got {kind!r}")
    S = fit.n_chains * fit.n_draws
    nd = min(S, 50 if kind == "dens_overlay" else S) if ndraws is None else ndraws
    yrep = fit.predict(draws=nd, seed=seed)  # (nd, N)
    y = np.asarray(fit.model.design.y, float)
    if ax is None:
        _, ax = plt.subplots()
    label = fit.model.design.response
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
    data = fit.model.design.data
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


def draw_conditional_effects(out: pd.DataFrame, var: str, categorical: bool, response: str, ax=None):
    """Line and band (numeric ``var``) or points and intervals (categorical) of a conditional_effects table
    (columns ``var``, estimate, lower, upper) on ``ax`` (new axes by default); returns the axes."""
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
    ax.set_ylabel(response)
    return ax
