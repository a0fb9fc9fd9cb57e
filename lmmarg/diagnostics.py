"""Convergence diagnostics of MCMC draws: rank-normalized split R-hat, bulk and tail effective sample size.

The estimators of Vehtari, Gelman, Simpson, Carpenter & Bürkner (2021), "Rank-normalization, folding, and
localization: an improved R-hat for assessing convergence of MCMC", as Stan, posterior (R) and ArviZ compute them;
the results equal ArviZ 0.23's ``rhat`` (method "rank") and ``ess`` (methods "bulk", "tail") to rounding (tested).
Written here, with NumPy only, because every fit reports them: importing ArviZ takes longer than sampling a small
model (docs/benchmarks.md, 'Measurements behind the code').

Every function takes draws of shape (chains, draws) for one quantity; ``summarize`` takes (chains, draws, R).
"""
from __future__ import annotations

import numpy as np
from scipy.special import ndtri

MIN_DRAWS = 4                 # fewer draws per chain: the diagnostics are undefined (NaN)
BLOM_OFFSET = 3.0 / 8.0       # rank -> normal quantile offset (Blom 1958), as in the paper
TAIL_PROBS = (0.05, 0.95)     # tail ESS: the smaller ESS of the indicators of these two quantiles


def _valid(x: np.ndarray, min_chains: int = 1) -> bool:
    return bool(np.all(np.isfinite(x))) and x.shape[1] >= MIN_DRAWS and x.shape[0] >= min_chains


def _split(x: np.ndarray) -> np.ndarray:
    """(m, n) -> (2m, n // 2): each chain's first and last halves as separate chains (the middle draw of an odd n
    is dropped)."""
    half = x.shape[1] // 2
    return np.concatenate([x[:, :half], x[:, x.shape[1] - half:]], axis=0)


def _average_ranks(v: np.ndarray) -> np.ndarray:
    """Ranks 1..n of a flat array, ties given their average rank."""
    order = np.argsort(v, kind="mergesort")
    s = v[order]
    first = np.r_[True, s[1:] != s[:-1]]
    group = np.cumsum(first) - 1
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], len(s)]
    avg = (starts + ends + 1) / 2.0          # mean of the 1-based positions starts+1 .. ends
    ranks = np.empty(len(v))
    ranks[order] = avg[group]
    return ranks


def _z_scale(x: np.ndarray) -> np.ndarray:
    """Rank-normalize: normal quantiles of the pooled ranks (Blom's offset), same shape."""
    r = _average_ranks(x.ravel())
    return ndtri((r - BLOM_OFFSET) / (x.size - 2 * BLOM_OFFSET + 1)).reshape(x.shape)


def _rhat(x: np.ndarray) -> float:
    """Gelman-Rubin potential scale reduction of (m, n) chains (no splitting)."""
    n = x.shape[1]
    between = n * np.var(x.mean(axis=1), ddof=1)
    within = np.mean(np.var(x, axis=1, ddof=1))
    return float(np.sqrt((between / within + n - 1) / n))


def rhat(x) -> float:
    """Rank-normalized split R-hat of draws (chains, draws): the larger of the bulk (rank-normalized) and tail
    (rank-normalized |x - median|) split R-hat. NaN for fewer than 2 chains or 4 draws or non-finite draws."""
    x = np.asarray(x, float)
    if not _valid(x, min_chains=2):
        return np.nan
    s = _split(x)
    folded = np.abs(s - np.median(s))
    return max(_rhat(_z_scale(s)), _rhat(_z_scale(folded)))


def _autocov(x: np.ndarray) -> np.ndarray:
    """Autocovariances of each chain (m, n) at lags 0..n-1 (biased, divided by n), by FFT."""
    n = x.shape[1]
    m = 1 << (2 * n - 1).bit_length()
    f = np.fft.rfft(x - x.mean(axis=1, keepdims=True), n=m, axis=1)
    return np.fft.irfft(f * np.conjugate(f), n=m, axis=1)[:, :n] / n


def _ess(x: np.ndarray) -> float:
    """ESS of (m, n) chains: Geyer's initial positive then initial monotone sequence of the combined
    autocorrelations (Stan's estimator)."""
    m, n = x.shape
    if np.max(x) - np.min(x) < np.finfo(float).resolution:
        return float(x.size)
    acov = _autocov(x)
    mean_var = np.mean(acov[:, 0]) * n / (n - 1.0)
    var_plus = mean_var * (n - 1.0) / n
    if m > 1:
        var_plus += np.var(x.mean(axis=1), ddof=1)
    rho = 1.0 - (mean_var - acov.mean(axis=0)) / var_plus     # rho[t] for every lag t (rho[0] replaced by 1)
    rho_t = np.zeros(n)
    rho_t[0] = even = 1.0
    rho_t[1] = odd = rho[1]
    t = 1
    while t < n - 3 and even + odd > 0.0:     # initial positive sequence of pair sums
        even, odd = rho[t + 1], rho[t + 2]
        if even + odd >= 0:
            rho_t[t + 1], rho_t[t + 2] = even, odd
        t += 2
    max_t = t - 2
    if even > 0:
        rho_t[max_t + 1] = even
    t = 1
    while t <= max_t - 2:                     # initial monotone sequence
        if rho_t[t + 1] + rho_t[t + 2] > rho_t[t - 1] + rho_t[t]:
            rho_t[t + 1] = rho_t[t + 2] = (rho_t[t - 1] + rho_t[t]) / 2.0
        t += 2
    total = m * n
    tau = -1.0 + 2.0 * np.sum(rho_t[: max_t + 1]) + np.sum(rho_t[max_t + 1: max_t + 2])
    tau = max(tau, 1.0 / np.log10(total))
    return np.nan if np.isnan(rho_t).any() else float(total / tau)


def ess_bulk(x) -> float:
    """Bulk ESS of draws (chains, draws): the ESS of the rank-normalized split chains."""
    x = np.asarray(x, float)
    if not _valid(x):
        return np.nan
    return _ess(_z_scale(_split(x)))


def ess_tail(x) -> float:
    """Tail ESS of draws (chains, draws): the smaller ESS of the split-chain indicators x <= q for the 5 % and 95 %
    quantiles q."""
    x = np.asarray(x, float)
    if not _valid(x):
        return np.nan
    return min(_ess(_split((x <= np.quantile(x, p)).astype(float))) for p in TAIL_PROBS)


def summarize(arr) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ess_bulk, ess_tail, rhat), each (R,), of draws (chains, draws, R); R-hat NaN for one chain."""
    arr = np.asarray(arr, float)
    cols = [arr[:, :, r] for r in range(arr.shape[-1])]
    return (np.array([ess_bulk(c) for c in cols]), np.array([ess_tail(c) for c in cols]),
            np.array([rhat(c) for c in cols]))
