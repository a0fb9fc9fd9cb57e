"""The user-facing model object: formula + data → design → marginal kernels (stage 4 of the pipeline).

>>> import lmmarg
>>> m = lmmarg.Model("Reaction ~ Days + (Days | Subject)", lmmarg.datasets.load("sleepstudy"))
>>> m.fixed_names, [t.name for t in m.terms]
(['Intercept', 'Days'], ['Subject'])
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .design import Design, build_design

__all__ = ["Model"]


def _ensure_dtype(dtype: str):
    """float64 (the default) needs JAX's x64 mode; Model turns it on (documented in README, 'Precision')."""
    if dtype not in ("float64", "float32"):
        raise ValueError(f"dtype must be 'float64' or 'float32', got {dtype!r}")
    if dtype == "float64" and not jax.config.jax_enable_x64:
        jax.config.update("jax_enable_x64", True)
    return jnp.float64 if dtype == "float64" else jnp.float32


class Model:
    """A linear mixed model given by an lme4 formula, e.g. ``"Reaction ~ Days + (Days | Subject)"``.

    Parameters
    ----------
    formula: lme4 syntax (bars ``|``, ``||``, ``a/b``, ``a:b``; formulaic syntax elsewhere).
    data: pandas DataFrame (or dict of columns).
    na_action: "raise" (default) or "drop" (drop rows with NaN/inf in used columns, with a warning).
    dtype: "float64" (default; turns on ``jax_enable_x64``) or "float32".
    """

    def __init__(self, formula: str, data, *, na_action: str = "raise", dtype: str = "float64"):
        self.dtype = _ensure_dtype(dtype)
        self.design: Design = build_design(formula, data, na_action=na_action)
        self._plans: dict = {}

    # -- names (contract) ---------------------------------------------------------------------------------------
    @property
    def formula(self) -> str:
        return self.design.spec.formula

    @property
    def fixed_names(self) -> list[str]:
        return self.design.fixed_names

    @property
    def terms(self):
        return self.design.terms

    @property
    def structure(self):
        return self.design.structure

    @property
    def n_obs(self) -> int:
        return self.design.n_obs

    def __repr__(self) -> str:
        return self.design.summary()
