"""Models and fits that several tests use, built once per test process (as MixedModels.jl's test/modelcache.jl).

Compiling dominates the suite's time: a new ``Model`` compiles its ML objective again (``fit_ml`` keeps it on the
model), and a fit that several tests read need not run more than once. Test modules import these by name
(``from modelcache import sleepstudy_model``; this folder is on the import path, like ``dense_reference``).

* ``sleepstudy()``: the sleepstudy data, a fresh copy on every call (tests may modify it).
* ``sleepstudy_model()``: ``Model("Reaction ~ Days + (Days | Subject)", sleepstudy())``, one shared instance.
* ``sleepstudy_ml_fit()``: ``sleepstudy_model().fit_ml()``, one shared ``MLFit``.
* ``sleepstudy_fit(draws, warmup, chains, seed)``: ``sleepstudy_model().sample(...)`` (no progress bar), one
  shared ``Fit`` per argument tuple.

What is shared must not be modified: the tests only read these objects (their methods keep lmmarg's own caches on
them, which is what sharing is for).
"""
from __future__ import annotations

import functools

import pandas as pd

import lmmarg

__all__ = ["SLEEPSTUDY_FORMULA", "sleepstudy", "sleepstudy_model", "sleepstudy_ml_fit", "sleepstudy_fit"]

SLEEPSTUDY_FORMULA = "Reaction ~ Days + (Days | Subject)"


@functools.lru_cache(maxsize=None)
def _sleepstudy_data() -> pd.DataFrame:
    return lmmarg.datasets.load("sleepstudy")


def sleepstudy() -> pd.DataFrame:
    """The sleepstudy data (180 rows: Reaction, Days, Subject), a copy the caller may modify."""
    return _sleepstudy_data().copy()


@functools.lru_cache(maxsize=None)
def sleepstudy_model() -> lmmarg.Model:
    """The shared ``Model("Reaction ~ Days + (Days | Subject)", sleepstudy)``."""
    return lmmarg.Model(SLEEPSTUDY_FORMULA, sleepstudy())


@functools.lru_cache(maxsize=None)
def sleepstudy_ml_fit():
    """The shared ML fit of ``sleepstudy_model()`` (``fit_ml()`` with its defaults)."""
    return sleepstudy_model().fit_ml()


@functools.lru_cache(maxsize=None)
def sleepstudy_fit(draws: int = 200, warmup: int = 200, chains: int = 2, seed: int = 1):
    """The shared ``sleepstudy_model().sample(draws=, warmup=, chains=, seed=, progress_bar=False)``."""
    return sleepstudy_model().sample(draws=draws, warmup=warmup, chains=chains, seed=seed, progress_bar=False)
