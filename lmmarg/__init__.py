"""lmmarg: Bayesian linear mixed models with the random effects integrated out analytically.

The marginal density p(y | β, σ, Σ) is evaluated in time linear in the number of observations (Woodbury identity
and matrix determinant lemma over a tree of random-effect classes); NumPyro's NUTS samples what is left and the
random effects are recovered exactly afterwards. Method: Lai, Domke & Sheldon, NeurIPS 2024 (arXiv 2410.24079).
"""
__version__ = "0.1.0"  # before the submodules: lmmarg.saving records it in saved files

from . import datasets
from .design import Design, DesignError, RandomTerm, build_design
from .formula import FormulaError, parse_formula
from .model import Model, load
from .sources import sufficient_statistics
from .sufficient import SufficientStatistics
# public submodules, reachable as attributes right after `import lmmarg` (lmmarg.results.Fit, lmmarg.priors.LKJ, ...)
from . import design, formula, inference, marginal, model, potential, priors, results, saving  # noqa: E402
from .inference import mapvi, ml, nuts  # noqa: E402  (loads lmmarg.inference.ml, ...)
from .results import Fit, compare
from .results import loo  # lmmarg.loo: the documented name of lmmarg.results.loo (the same module object)
from .inference.nuts import use_cores

del mapvi, ml, nuts  # reachable as lmmarg.inference.<name>, not as top-level names

__all__ = ["Model", "Fit", "Design", "DesignError", "FormulaError", "RandomTerm", "build_design", "parse_formula",
           "compare", "load", "use_cores", "sufficient_statistics", "SufficientStatistics", "datasets", "design",
           "formula", "inference", "loo", "marginal", "model", "potential", "priors", "results", "saving",
           "__version__"]
