"""A model's design from sufficient statistics (issue #29): names, terms and structure, no rows.

``lmmarg.Model(formula, statistics)`` (or a Parquet/CSV path, a pyarrow Dataset, a Dask DataFrame, which
``lmmarg.sources`` turns into statistics first) builds a :class:`StatisticsDesign` instead of a
``lmmarg.design.Design``. It has the same names (``fixed_names``, ``terms`` with ``name``, ``group``, ``columns``,
``levels``, ``n_groups``, ``d``; ``structure``, ``n_obs``, ``response``, ``summary``) and ``None`` where a Design
holds rows (``data``, ``X``, ``y``, each term's ``Z`` and ``codes``). The model's plan comes from the statistics
(``lmmarg.marginal.plan_from_statistics``), its unit-free coordinates and default priors from the column moments
(``lmmarg.sufficient.ColumnMoments``).

What needs the rows (LOO, ``pp_check`` and fitted values on the training data, terms left to HMC, ``sigma_by`` or
a sigma formula, GLMM families, saving the data with a fit) raises :class:`RowsNeeded`, naming the feature.

Public: StatisticsDesign, StatisticsTerm, RowsNeeded, statistics_design, require_rows, standardizer,
moment_summary, design_spec_from_meta.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .codes import unique_rows
from .design import (DesignError, Structure, design_summary, level_label, standardizer_from_moments,
                     structure_of)
from .formula import FormulaSpec, parse_formula
from .sufficient import ChunkLevels, design_spec_from_levels

__all__ = ["StatisticsDesign", "StatisticsTerm", "RowsNeeded", "statistics_design", "require_rows",
           "standardizer", "moment_summary", "design_spec_from_meta"]


class RowsNeeded(DesignError):
    """A feature that needs the rows of the data was asked of a model built from sufficient statistics."""


def require_rows(model, feature: str) -> None:
    """Raise :class:`RowsNeeded` naming ``feature`` when ``model`` was built from sufficient statistics."""
    if getattr(model, "statistics", None) is not None:
        raise RowsNeeded(
            f"{feature} needs the rows of the data, but this model was built from sufficient statistics "
            f"({model.n_obs:,} rows summarized; no row is kept). Build the model from a pandas DataFrame (or a "
            f"sample of one) for {feature}; everything else (fit_ml, sample with every term integrated out, "
            "fit_map, fit_vi, random effects, summaries, predict on new rows) works from the statistics.")


@dataclass(eq=False)
class StatisticsTerm:
    """One random-effect term of a statistics-backed model: the fields of ``lmmarg.design.RandomTerm`` without its
    rows (``Z`` and ``codes`` are None). levels: group labels; level_keys: per group the tuple of factor values;
    cell_codes (n_cells,): each cell's group (the statistics' cells)."""
    name: str
    group: str
    factors: tuple
    expr: str
    columns: list
    levels: list
    level_keys: list
    cell_codes: np.ndarray = field(repr=False)
    correlated: bool = True
    model_spec: object = field(default=None, repr=False)
    Z: None = None
    codes: None = None

    @property
    def n_groups(self) -> int:
        return len(self.levels)

    @property
    def d(self) -> int:
        return len(self.columns)


@dataclass(eq=False)
class StatisticsDesign:
    """The design of a model from sufficient statistics (see the module docstring): spec, statistics
    (``lmmarg.sufficient.SufficientStatistics``), fixed_names (p), terms (StatisticsTerm, formula order), structure,
    fixed_spec and offset_specs (formulaic specs for new rows; None when the statistics came without them)."""
    spec: FormulaSpec
    statistics: object
    fixed_names: list
    terms: list
    structure: Structure
    fixed_spec: object = None
    offset_specs: list = field(default_factory=list)
    data = None
    X = None
    y = None
    offset = None
    failures = None

    @property
    def n_obs(self) -> int:
        return int(self.statistics.n_obs)

    @property
    def response(self) -> str:
        return self.spec.response

    def term(self, name: str) -> StatisticsTerm:
        for t in self.terms:
            if t.name == name:
                return t
        raise KeyError(f"no random-effect term {name!r}; terms are {[t.name for t in self.terms]}")

    def summary(self, title: str = "Linear mixed model") -> str:
        """lme4-like description as ``lmmarg.design.Design.summary``, plus the number of cells summarized."""
        return design_summary(title, self.spec.formula,
                              f"{self.n_obs} (from sufficient statistics: {self.statistics.n_cells:,} cells)",
                              self.fixed_names, self.terms, self.structure)

    __str__ = summary


def statistics_design(formula, stats, spec=None) -> StatisticsDesign:
    """The :class:`StatisticsDesign` of ``formula`` over ``stats`` (SufficientStatistics). spec: the
    ``lmmarg.sufficient.DesignSpec`` the statistics were computed with (its formulaic specs serve ``predict``), or
    None. Raises DesignError when the formula is not the one the statistics were computed for."""
    fspec = formula if isinstance(formula, FormulaSpec) else parse_formula(formula)
    meta = stats.meta
    theirs = getattr(stats, "formula", None) or meta.get("formula")
    if theirs is not None and _canonical(theirs) != _canonical(fspec.formula):
        raise DesignError(f"the statistics were computed for the formula {theirs!r}, not {fspec.formula!r}; compute "
                          "them again for this formula (lmmarg.sufficient_statistics)")
    if fspec.failures is not None:
        raise DesignError("cbind() responses (binomial GLMMs) cannot be fitted from sufficient statistics")
    if [b.group for b in fspec.bars] and not stats.terms:
        raise DesignError("the statistics hold no random-effect terms, but the formula has some")
    if spec is None:   # statistics loaded from a file or sent by another site: specs from the recorded levels
        spec = design_spec_from_meta(stats)
    factors = list(meta["factors"])
    terms = []
    specs = {t.name: t for t in (spec.terms if spec is not None else ())}
    for name, group, tfactors, columns, correlated in stats.terms:
        fi = [factors.index(f) for f in tfactors]
        sizes = [len(stats.factor_levels[j]) for j in fi]
        uniq, codes = unique_rows(np.asarray(stats.cell_factors[:, fi], np.int64), sizes)
        keys = [tuple(stats.factor_levels[j][k] for j, k in zip(fi, row)) for row in uniq]
        ts = specs.get(name)
        terms.append(StatisticsTerm(name=name, group=group, factors=tuple(tfactors),
                                    expr=ts.expr if ts is not None else "", columns=list(columns),
                                    levels=[level_label(k) for k in keys], level_keys=keys,
                                    cell_codes=codes.astype(np.int64), correlated=bool(correlated),
                                    model_spec=None if ts is None else ts.model_spec))
    return StatisticsDesign(spec=fspec, statistics=stats, fixed_names=list(stats.fixed_names), terms=terms,
                            structure=structure_of(terms, [t.cell_codes for t in terms]),
                            fixed_spec=None if spec is None else spec.fixed_spec,
                            offset_specs=[] if spec is None else list(spec.offset_specs))


def design_spec_from_meta(stats):
    """The DesignSpec of statistics that came without one (loaded from a file, another site's): its formulaic
    specs rebuilt from a synthetic frame with every recorded level (the specs depend on the formula and the levels
    only: stateful transforms are refused). None for statistics saved before the prototype was recorded."""
    proto = stats.meta.get("prototype")
    if proto is None or stats.meta.get("formula") is None:
        return None
    factors = list(stats.meta["factors"])
    levels = {c: tuple(v) for c, v in proto["levels"].items()}
    levels.update({f: tuple(stats.factor_levels[j]) for j, f in enumerate(factors)})
    n = max([2] + [len(v) for v in levels.values()])
    frame = {}
    for c in proto["used"]:
        lv = levels.get(c)
        frame[c] = ([lv[i % len(lv)] for i in range(n)] if lv else 1.0 + 0.5 * (np.arange(n) % 3))
    sample = pd.DataFrame(frame)
    cats = {c: frozenset([None if k is None else tuple(k)]) for c, k in proto["categories"].items()}
    cats.update({f: frozenset([stats.factor_categories[j]]) for j, f in enumerate(factors)})
    values = {c: frozenset(v) for c, v in levels.items()}
    chunk = ChunkLevels(values, cats, frozenset(proto["levels"]), n, sample)
    spec = design_spec_from_levels(stats.meta["formula"], chunk, stats.meta.get("family", "gaussian"))
    return dataclasses.replace(spec, centre=np.asarray(stats.centre, float).copy())


def _canonical(formula: str) -> str:
    return "".join(str(formula).split())


def standardizer(m, cols=None) -> np.ndarray:
    """``lmmarg.design.column_standardizer`` from column moments (``lmmarg.sufficient.ColumnMoments``) of the
    columns ``cols`` (default all k) -> (k, k)."""
    pick = slice(None) if cols is None else np.asarray(cols, int)
    a = [np.asarray(getattr(m, f), float).reshape(-1)[pick] for f in ("n", "nnz", "min", "max", "mean", "m2")]
    return standardizer_from_moments(*a)


def moment_summary(m, j: int = 0) -> tuple[float, float]:
    """(mean, SD with ddof=1) of column j of ColumnMoments ``m``."""
    n = float(np.asarray(m.n)[j])
    mean = float(np.asarray(m.mean)[j])
    sd = float(np.sqrt(np.asarray(m.m2)[j] / (n - 1))) if n > 1 else 0.0
    return mean, sd
