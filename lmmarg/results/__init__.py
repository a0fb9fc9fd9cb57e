"""What a fit returns, and what is computed from it.

* ``lmmarg.results.fit``: ``Fit`` (posterior draws: summaries, ArviZ, the brms workflow);
* ``lmmarg.results.predict``: posterior predictions (``Fit.predict``, ``Fit.conditional_effects``);
* ``lmmarg.results.plots``: ``pp_check`` and the conditional-effects plot (matplotlib);
* ``lmmarg.results.loo``: integrated leave-one-out, reloo and ``compare``;
* ``lmmarg.results.ml``: ``MLFit`` (ML / REML estimates, lme4's printed summary) and ``ConvergenceChecks``.

``lmmarg.load(path)`` (in lmmarg.model, above both the Model and its results) reads a fit saved by ``Fit.save``.
"""
from __future__ import annotations

from . import fit, loo, ml, plots, predict
from .fit import Fit
from .loo import compare
from .ml import ConvergenceChecks, MLFit

__all__ = ["Fit", "MLFit", "ConvergenceChecks", "compare", "fit", "loo", "ml", "plots", "predict"]

