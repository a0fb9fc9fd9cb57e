"""Sufficient statistics from data in chunks: fit data sets larger than one machine's memory (issue #29).

For the Gaussian families (gaussian, lognormal) with a scalar σ and every random-effect term integrated out, all
the marginal engine needs from the N rows is a sum over rows, grouped by *cell* (the unique combination of the
terms' groups; ``lmmarg.marginal.statistics``). This module computes those sums one chunk of rows at a time
(a pandas DataFrame, or a pyarrow Table / RecordBatch: one Parquet row group, one Dask partition) and merges them
(``lmmarg.sources`` streams files, pyarrow datasets and Dask DataFrames through it):

1. the levels pass: ``chunk_levels(formula, chunk)`` per chunk (a pure function: it runs on Dask workers) gives a
   :class:`ChunkLevels` (the levels of every grouping factor and categorical column, and the first ≤ SAMPLE_ROWS
   rows of the chunk as a sample); ``a + b`` merges them (associative; the levels do not depend on the chunk order,
   the sample is the first non-empty chunk's). ``design_spec_from_levels(formula, levels)`` then builds the
   :class:`DesignSpec`, fixed for the whole data set: formulaic model specs of the fixed part, of each term's Z and
   of the offsets (fitted on the sample with every collected level, applied to every chunk identically) and a
   provisional centre β_c, the OLS β of the sample: the driver sees only that sample, never the other rows.
   ``design_spec(formula, chunks)`` does both over an iterable of chunks;
2. ``chunk_statistics(spec, chunk)``: a pure function from one chunk to its :class:`SufficientStatistics`;
3. ``merge(a, b)`` / ``a + b``: associative and commutative (up to rounding), cells keyed by the grouping factors'
   level *values*, so that statistics of different files (even with different ``DesignSpec`` level sets, when
   their fixed-effect columns agree) merge; ``SufficientStatistics.engine_arrays(order)`` gives the plan's layout.

Centring. Sums are kept around β_c, not around β = 0: S_zr = Σ Zt (y − X β_c), Xᵀr, rᵀr. Moving to another centre
β0 is exact algebra (Δ = β0 − β_c: S_zr − S_zX Δ, Xᵀr − XᵀX Δ, rᵀr − 2 ΔᵀXᵀr + ΔᵀXᵀXΔ), but it cancels digits in
rᵀr when |XΔ| is much larger than the residuals: around β = 0 (raw yᵀy) a response with mean 10⁶ and residual SD
10⁻² keeps no digit of the residual sum of squares. Around β_c, Δ is the (small) difference between the sample's OLS
and the full OLS. Chunks of one ``DesignSpec`` share β_c, so that their merge is a plain sum.

Column moments. The statistics also carry :class:`DataMoments`: :class:`ColumnMoments` (n, non-zeros, min, max,
mean, Σ (x − mean)²) of the fixed-effect columns X, of every term's Z columns and of the working response (y, or
log y for lognormal, minus the offsets), for unit-free coordinates and default priors without the rows. They are
merged by Chan, Golub & LeVeque's pairwise update with the mean carried in two doubles, so that a column with mean
10⁶ and SD 10⁻² keeps its variance to about machine precision whatever the chunks.

Not supported (refused with a DesignError): stateful transforms (``center(x)``, ``scale(x)``, ``poly(x)``, splines:
their state would come from one chunk), GLMM families and ``cbind()`` responses.

Public: DesignSpec, TermSpec, SufficientStatistics, PartialStatistics, ColumnMoments, DataMoments, ChunkLevels,
SAMPLE_ROWS, formula_columns, chunk_levels, design_spec_from_levels, collect_levels, design_spec, chunk_statistics,
statistics, merge, merge_many, load_statistics.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import tempfile
from dataclasses import dataclass

import formulaic
import numpy as np
import pandas as pd
from formulaic.transforms import TRANSFORMS

from .codes import unique_rows
from .design import DesignError, level_label, normalize_dtypes, used_columns
from .formula import FormulaSpec, parse_formula, quote_columns, strip_ansi
from .marginal.plan import CellSums
from .marginal.statistics import aggregate, cell_statistics
from .moments import ColumnMoments, DataMoments

__all__ = ["DesignSpec", "TermSpec", "SufficientStatistics", "PartialStatistics", "ColumnMoments", "DataMoments",
           "ChunkLevels", "SAMPLE_ROWS", "formula_columns", "chunk_levels", "design_spec_from_levels", "merge_many",

           "collect_levels", "design_spec", "chunk_statistics", "statistics", "merge", "load_statistics"]

FORMAT = "lmmarg-sufficient-1"
SAMPLE_ROWS = 1000   # rows of the first non-empty chunk that fix the formulaic specs and the provisional centre


# --------------------------------------------------------------------------- the design, fixed over all chunks


@dataclass(frozen=True, eq=False)
class TermSpec:
    """One random-effect term: name (as ``lmmarg.design`` names it), group, factors (grouping columns), expr,
    columns (its d Z columns), correlated, model_spec (formulaic, applied to every chunk)."""
    name: str
    group: str
    factors: tuple
    expr: str
    columns: tuple
    correlated: bool
    model_spec: object


@dataclass(frozen=True, eq=False)
class DesignSpec:
    """What is fixed for the whole data set (p fixed effects, D = Σ d of the terms).

    spec: the parsed formula (dotted column names quoted); family: "gaussian" or "lognormal"; fixed_spec and
    fixed_names (p); offset_specs; terms: TermSpec per term (formula order); factors: the grouping columns (first
    appearance order); levels: {column: tuple of levels} for grouping factors and categorical columns;
    categories: {column: the categorical categories that order its levels, or None (natural order)}; used: every
    column the formula uses; centre (p,): the provisional centre β_c of the sums."""
    spec: FormulaSpec
    family: str
    fixed_spec: object
    fixed_names: tuple
    offset_specs: tuple
    terms: tuple
    factors: tuple
    levels: dict
    categories: dict
    used: tuple
    centre: np.ndarray

    @property
    def signature(self) -> dict:
        """What two statistics must share to be added (JSON-able)."""
        return {"family": self.family, "response": self.spec.response, "fixed_names": list(self.fixed_names),
                "offsets": list(self.spec.offsets), "factors": list(self.factors),
                "terms": [[t.name, t.group, list(t.factors), list(t.columns), t.correlated] for t in self.terms]}


def _py(v):
    """A NumPy scalar as the Python scalar (levels are compared, hashed and saved as Python values)."""
    return v.item() if isinstance(v, np.generic) else v


def _frame(chunk, index) -> pd.DataFrame:
    if hasattr(chunk, "to_pandas"):  # pyarrow Table / RecordBatch
        chunk = chunk.to_pandas()
    if isinstance(chunk, dict):
        chunk = pd.DataFrame(chunk)
    if not isinstance(chunk, pd.DataFrame):
        raise TypeError(f"chunk {index} must be a pandas DataFrame, a pyarrow Table/RecordBatch or a dict of "
                        f"columns, got {type(chunk).__name__}")
    return chunk.rename(columns=str).reset_index(drop=True)


def _check_chunk(df: pd.DataFrame, used, index) -> pd.DataFrame:
    """Raise naming the column (and the chunk) when a used column is absent or has NaN/inf; normalized dtypes."""
    for col in used:
        if col not in df.columns:
            raise DesignError(f"chunk {index} has no column {col!r} (used by the formula); its columns are "
                              f"{list(df.columns)}")
    df = normalize_dtypes(df, used)
    for col in used:
        s = df[col]
        bad = s.isna().to_numpy().copy()
        if pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
            bad |= ~np.isfinite(s.to_numpy(dtype=float, na_value=np.nan))
        if bad.any():
            raise DesignError(f"column {col!r} of chunk {index} has missing or non-finite values ({int(bad.sum())} "
                              f"rows, first at row {int(np.flatnonzero(bad)[0])}); clean the data first")
    return df


def _distinct(s: pd.Series) -> tuple[set, tuple | None]:
    """The distinct values of one column (Python scalars) and its categorical (categories, ordered), else None."""
    _, uniq = pd.factorize(s, sort=False, use_na_sentinel=False)
    values = {_py(v) for v in np.asarray(uniq, dtype=object)}
    cats = None
    if isinstance(s.dtype, pd.CategoricalDtype):
        cats = (tuple(_py(c) for c in s.cat.categories), bool(s.cat.ordered))
    return values, cats


def _ordered(values, categories) -> tuple:
    """Levels as ``lmmarg.design`` orders them: by the categorical categories, else sorted (by str if mixed)."""
    if categories is not None:
        rank = {c: i for i, c in enumerate(categories)}
        return tuple(sorted(values, key=lambda v: rank.get(v, len(rank))))
    try:
        return tuple(sorted(values))
    except TypeError:
        return tuple(sorted(values, key=str))


def _quoted(spec: FormulaSpec, columns) -> FormulaSpec:
    """``spec`` with dotted column names in backticks where they are data columns (as ``build_design`` does)."""
    cols = set(columns)

    def q(expr):
        return expr if expr is None else quote_columns(expr, cols)

    bars = tuple(dataclasses.replace(b, expr=q(b.expr)) for b in spec.bars)
    response = spec.response if spec.response in cols else q(spec.response)
    return dataclasses.replace(spec, response=response, fixed=q(spec.fixed), bars=bars,
                               offsets=tuple(q(e) for e in spec.offsets))


def _model_spec(expr: str, df: pd.DataFrame, where: str):
    try:
        with np.errstate(all="ignore"):
            mm = formulaic.model_matrix(expr, df, na_action="ignore")
    except Exception as exc:
        raise DesignError(f"cannot build the model matrix of {where} {expr!r}: {strip_ansi(exc)}") from None
    spec = mm.model_spec
    if spec.transform_state:
        raise DesignError(f"{where} {expr!r} uses a stateful transform ({', '.join(map(str, spec.transform_state))}): "
                          "from chunks its state would come from one chunk; compute the column beforehand")
    return spec


def _categorical_columns(spec: FormulaSpec, df: pd.DataFrame, used) -> set:
    """Columns formulaic encodes as categorical (string/categorical columns, C(x) of a numeric x) in the fixed part
    or a term's expression. It depends on the formula and the columns' dtypes only: kept per (spec, dtypes), so
    that a stream of batches asks formulaic once."""
    key = (spec, tuple((c, str(df[c].dtype)) for c in used if c in df.columns))
    if key not in _CATEGORICAL:
        if len(_CATEGORICAL) > 256:
            _CATEGORICAL.clear()
        _CATEGORICAL[key] = _categorical_columns_now(spec, df, used)
    return set(_CATEGORICAL[key])


_CATEGORICAL: dict = {}


def _categorical_columns_now(spec: FormulaSpec, df: pd.DataFrame, used) -> set:
    out = set()
    for expr, where in [(spec.fixed, "the fixed effects")] + [(b.expr, f"term ({b.expr} | {b.group})")
                                                                for b in spec.bars]:
        ms = _model_spec(expr, df, where)
        kinds = {str(f): kind for f, (kind, _) in ms.encoder_state.items()}
        for factor, variables in ms.factor_variables.items():
            if getattr(kinds.get(str(factor)), "value", None) == "categorical":
                out |= set(map(str, variables)) & set(used)
    return out


def _parsed(formula, columns) -> tuple[FormulaSpec, tuple, tuple]:
    """(spec with dotted data columns quoted, used columns, grouping factors) of ``formula`` over ``columns``; kept
    per (formula, columns): every batch of a stream asks again."""
    key = (formula, tuple(columns))
    if key not in _PARSED:
        if len(_PARSED) > 256:
            _PARSED.clear()
        _PARSED[key] = _parsed_now(formula, columns)
    return _PARSED[key]


_PARSED: dict = {}


def _parsed_now(formula, columns) -> tuple[FormulaSpec, tuple, tuple]:
    spec = formula if isinstance(formula, FormulaSpec) else parse_formula(formula)
    if spec.failures is not None:
        raise DesignError("cbind() responses (binomial GLMMs) have no sufficient statistics; use a Gaussian family")
    spec = _quoted(spec, columns)
    _refuse_stateful(spec)
    return spec, tuple(used_columns(spec)), tuple(dict.fromkeys(f for b in spec.bars for f in b.factors))


def _refuse_stateful(spec: FormulaSpec) -> None:
    """Raise naming a stateful transform (center, scale, poly, splines) before any data is read: formulaic does not
    list their arguments among the required variables, so a reader projecting on the used columns would drop them."""
    names = sorted(k for k, v in TRANSFORMS.items() if getattr(v, "__is_stateful_transform__", False) and k != "Q")
    pattern = re.compile(r"(?<![\w.])(" + "|".join(map(re.escape, names)) + r")\s*\(")
    for expr, where in ([(spec.response, "the response"), (spec.fixed, "the fixed effects")]
                        + [(f"offset({e})", "the offset") for e in spec.offsets]
                        + [(b.expr, f"term ({b.expr} | {b.group})") for b in spec.bars]):
        m = pattern.search(re.sub(r"`[^`]*`", " ", expr))
        if m:
            raise DesignError(f"{where} {expr!r} uses a stateful transform ({m.group(1)}): from chunks its state "
                              "would come from one chunk; compute the column beforehand")


def formula_columns(formula, columns) -> tuple:
    """The data columns ``formula`` (a string or parsed FormulaSpec) uses, formula order, dotted names resolved
    against ``columns`` (the data's column names): what a reader must load (``lmmarg.sources`` projects on them)."""
    return _parsed(formula, [str(c) for c in columns])[1]


@dataclass(frozen=True, eq=False)
class ChunkLevels:
    """What the levels pass collects (``chunk_levels``); ``a + b`` merges two (associative, so a tree reduction
    works; the levels are a union, the sample is the first non-empty operand's: merge in chunk order).

    values: {column: frozenset of level values} of the grouping factors and categorical columns; categories:
    {column: frozenset of the chunks' (categorical categories, ordered), None for a non-categorical chunk};
    categorical: the columns formulaic encodes as categorical; n_rows: rows seen; sample: the first ≤ SAMPLE_ROWS
    rows (used columns only) of the first non-empty chunk, or None."""
    values: dict
    categories: dict
    categorical: frozenset
    n_rows: int
    sample: pd.DataFrame | None

    def __add__(self, other: "ChunkLevels") -> "ChunkLevels":
        if not isinstance(other, ChunkLevels):
            return NotImplemented
        values = {c: self.values.get(c, frozenset()) | other.values.get(c, frozenset())
                  for c in dict.fromkeys(list(self.values) + list(other.values))}
        cats = {c: self.categories.get(c, frozenset()) | other.categories.get(c, frozenset())
                for c in dict.fromkeys(list(self.categories) + list(other.categories))}
        return ChunkLevels(values, cats, self.categorical | other.categorical, self.n_rows + other.n_rows,
                           self.sample if self.sample is not None else other.sample)

    def __radd__(self, other):
        return self if isinstance(other, int) and other == 0 else NotImplemented   # sum([...]) starts at 0

    def category_order(self) -> dict:
        """{column: the categorical categories ordering its levels when every chunk has the same ones, else None}."""
        return {c: (next(iter(k))[0] if len(k) == 1 and None not in k else None) for c, k in self.categories.items()}

    def levels(self) -> dict:
        """{column: tuple of levels} in ``lmmarg.design``'s order (the categorical order, else sorted)."""
        order = self.category_order()
        return {c: _ordered(v, order.get(c)) for c, v in self.values.items()}


_NO_LEVELS = ChunkLevels({}, {}, frozenset(), 0, None)


def chunk_levels(formula, chunk, index=0) -> ChunkLevels:
    """The levels pass over one chunk (a DataFrame, pyarrow Table/RecordBatch or dict of columns): pure, no state
    between chunks. ``index`` names the chunk in errors (missing columns, missing values)."""
    df = _frame(chunk, index)
    spec, used, factors = _parsed(formula, df.columns)
    df = _check_chunk(df, used, index)
    if len(df) == 0:
        return _NO_LEVELS
    sample = df.iloc[:SAMPLE_ROWS][list(used)].copy()
    categorical = frozenset(_categorical_columns(spec, sample, used))
    values, cats = {}, {}
    for col in dict.fromkeys(factors + tuple(sorted(categorical))):
        v, c = _distinct(df[col])
        values[col], cats[col] = frozenset(v), frozenset([c])
    return ChunkLevels(values, cats, categorical, len(df), sample)


def _check_family(family: str) -> None:
    if family not in ("gaussian", "lognormal"):
        raise ValueError(f"sufficient statistics serve the Gaussian families 'gaussian' and 'lognormal', not "
                         f"{family!r}")


def collect_levels(formula, chunks) -> dict:
    """{column: tuple of levels}: every grouping factor's and categorical column's levels over all ``chunks``
    (an iterable of DataFrames / pyarrow tables), in ``lmmarg.design``'s order (the categorical order when every
    chunk has the same categories, else sorted), independent of the chunk order."""
    return sum((chunk_levels(formula, c, i) for i, c in enumerate(chunks)), _NO_LEVELS).levels()


def _prototype(spec: DesignSpec) -> dict:
    """What rebuilds the formulaic specs of ``spec`` without rows (``design_spec_from_meta``): the used columns and
    the levels of the categorical columns that are not grouping factors (JSON-able)."""
    return {"used": list(spec.used),
            "levels": {c: [_py(v) for v in lv] for c, lv in spec.levels.items() if c not in spec.factors},
            "categories": {c: (None if k is None else [_py(v) for v in k]) for c, k in spec.categories.items()
                           if c not in spec.factors}}


def design_spec_from_levels(formula, levels: ChunkLevels, family: str = "gaussian") -> DesignSpec:
    """The :class:`DesignSpec` of ``formula`` from the merged levels pass (``levels.sample`` fixes the formulaic
    specs, with every collected level, and its OLS β is the provisional centre β_c). family: "gaussian" or
    "lognormal" (the sums are then those of log y)."""
    _check_family(family)
    if levels.sample is None:
        raise DesignError("the chunks hold no rows")
    sample = levels.sample
    spec, used, _ = _parsed(formula, sample.columns)
    all_levels, categories = levels.levels(), levels.category_order()
    proto = sample.copy()   # the sample with every collected level: the formulaic specs see all of them
    for col in levels.categorical:
        proto[col] = pd.Categorical(proto[col].astype(object), categories=list(all_levels[col]))
    fixed_spec = _model_spec(spec.fixed, proto, "the fixed effects")
    offsets = tuple(_model_spec(f"0 + I({e})", proto, f"offset({e})") for e in spec.offsets)
    terms, seen = [], {}
    for bar in spec.bars:
        where = f"random-effect term ({bar.expr} | {bar.group})"
        ms = _model_spec(bar.expr, proto, where)
        pieces = [(bar.expr, ms)]
        if not bar.correlated:  # ||: one term per formula term, as lmmarg.design splits it
            pieces = [(e, _model_spec(e, proto, where)) for e in
                      ("1" if str(t) == "1" else f"0 + {t}" for t in ms.term_indices)]
        for expr, st in pieces:
            k = seen.get(bar.group, 0)
            seen[bar.group] = k + 1
            terms.append(TermSpec(bar.group if k == 0 else f"{bar.group}.{k}", bar.group, bar.factors, expr,
                                  tuple(st.column_names), bar.correlated, st))
    p = len(fixed_spec.column_names)
    ds = DesignSpec(spec=spec, family=family, fixed_spec=fixed_spec, fixed_names=tuple(fixed_spec.column_names),
                    offset_specs=offsets, terms=tuple(terms),
                    factors=tuple(dict.fromkeys(f for t in terms for f in t.factors)), levels=all_levels,
                    categories=categories, used=used, centre=np.zeros(p))
    X, y, _, _, _ = _evaluate(ds, sample, "sample")
    centre = np.linalg.lstsq(X, y, rcond=None)[0] if p else np.zeros(0)
    return dataclasses.replace(ds, centre=centre)


def design_spec(formula, chunks, family: str = "gaussian") -> DesignSpec:
    """The :class:`DesignSpec` of ``formula`` over all ``chunks`` (one pass over them; see the module docstring).

    family: "gaussian" or "lognormal" (the sums are then those of log y)."""
    _check_family(family)
    levels = sum((chunk_levels(formula, c, i) for i, c in enumerate(chunks)), _NO_LEVELS)
    return design_spec_from_levels(formula, levels, family)


# --------------------------------------------------------------------------- one chunk


def _codes(s: pd.Series, levels: tuple, col: str, index) -> np.ndarray:
    """(n,) int64 positions of the values of ``s`` in ``levels``; raise naming a level the levels lack."""
    codes, uniq = pd.factorize(s, sort=False, use_na_sentinel=False)
    uniq = [_py(v) for v in np.asarray(uniq, dtype=object)]
    pos = pd.Index(list(levels), dtype=object).get_indexer(pd.Index(uniq, dtype=object))
    if (pos < 0).any():
        bad = [v for v, k in zip(uniq, pos) if k < 0]
        raise DesignError(f"column {col!r} of chunk {index} has the level(s) {bad[:5]!r} that the collected levels "
                          f"lack; collect the levels over every chunk (design_spec / collect_levels)")
    return pos[codes].astype(np.int64)


def _matrix(model_spec, df: pd.DataFrame, where: str, index) -> np.ndarray:
    with np.errstate(all="ignore"):
        mm = model_spec.get_model_matrix(df)
    values = np.asarray(mm, dtype=float).reshape(len(df), -1)
    bad = ~np.isfinite(values)
    if bad.any():
        col = list(mm.columns)[np.flatnonzero(bad.any(0))[0]]
        raise DesignError(f"column {col!r} of {where} is not finite in chunk {index} (first at row "
                          f"{int(np.flatnonzero(bad.any(1))[0])}, e.g. log of 0)")
    return values


def _response(spec: DesignSpec, df: pd.DataFrame, index) -> np.ndarray:
    expr = spec.spec.response
    name = expr[1:-1] if expr.startswith("`") and expr.endswith("`") else expr
    if name in df.columns:
        s = df[name]
        if not (pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s)):
            raise DesignError(f"response {expr!r} must be numeric, got dtype {s.dtype} in chunk {index}")
        y = s.to_numpy(dtype=float)
    else:
        try:
            with np.errstate(all="ignore"):
                y = np.asarray(formulaic.model_matrix(f"{expr} ~ 1", df, na_action="ignore").lhs, dtype=float)
        except Exception as exc:
            raise DesignError(f"cannot evaluate the response {expr!r} in chunk {index}: {strip_ansi(exc)}") from None
        if y.ndim != 2 or y.shape[1] != 1:
            raise DesignError(f"response {expr!r} must be a single numeric column")
        y = y[:, 0]
    if not np.isfinite(y).all():
        row = int(np.flatnonzero(~np.isfinite(y))[0])
        raise DesignError(f"response {expr!r} is not finite in chunk {index} (row {row})")
    return y


def _evaluate(spec: DesignSpec, df: pd.DataFrame, index):
    """(X (n, p), working y (n,), Zt (n, D) the terms' columns stacked, factor codes (n, n_factors), Σ log y)."""
    for col in spec.levels:
        if col not in spec.factors:  # a categorical column: its levels must be known (factors are coded below)
            _codes(df[col], spec.levels[col], col, index)
    codes = np.stack([_codes(df[f], spec.levels[f], f, index) for f in spec.factors], axis=1) \
        if spec.factors else np.zeros((len(df), 0), np.int64)
    X = _matrix(spec.fixed_spec, df, "the fixed effects", index)
    Zt = np.concatenate([_matrix(t.model_spec, df, f"term {t.name!r}", index) for t in spec.terms]
                        + [np.zeros((len(df), 0))], axis=1)
    y = _response(spec, df, index)
    sum_log_y = 0.0
    if spec.family == "lognormal":
        if (y <= 0).any():
            raise DesignError(f"family='lognormal' needs a positive response; {spec.spec.response!r} is "
                              f"{y[y <= 0][0]} in chunk {index}")
        y = np.log(y)
        sum_log_y = float(y.sum())
    for e, os_ in zip(spec.spec.offsets, spec.offset_specs):
        y = y - _matrix(os_, df, f"offset({e})", index)[:, 0]
    return X, y, Zt, codes, sum_log_y


def _cells(codes: np.ndarray, sizes) -> tuple[np.ndarray, np.ndarray]:
    """(unique rows (n_cells, k), inverse (n,)): one cell when there are no factors (and rows)."""
    n, k = codes.shape
    if k == 0:
        return np.zeros((1 if n else 0, 0), np.int64), np.zeros(n, np.int64)
    return unique_rows(codes, sizes)


def chunk_statistics(spec: DesignSpec, chunk, index=0) -> "SufficientStatistics":
    """The statistics of one chunk (a DataFrame, pyarrow Table or RecordBatch); ``index`` names it in errors.
    Pure: no state is kept between chunks; one pass of weighted bincounts per product of columns, no Python loop
    over rows or groups."""
    df = _check_chunk(_frame(chunk, index), spec.used, index)
    p, D = len(spec.fixed_names), sum(len(t.columns) for t in spec.terms)
    levels = tuple(spec.levels[f] for f in spec.factors)
    cats = tuple(spec.categories.get(f) for f in spec.factors)
    meta = dict(spec.signature, formula=spec.spec.formula, prototype=_prototype(spec))
    if len(df) == 0:
        moments = DataMoments(ColumnMoments.empty(p), ColumnMoments.empty(D), ColumnMoments.empty(1))
        return SufficientStatistics(meta, levels, cats, spec.centre.copy(), 0, np.zeros((p, p)),
                                    np.zeros(p), 0.0, 0.0, np.zeros((0, len(levels)), np.int64), np.zeros(0, np.int64),
                                    np.zeros((0, D, D)), np.zeros((0, D)), np.zeros((0, D, p)), moments, spec)
    X, y, Zt, codes, sum_log_y = _evaluate(spec, df, index)
    if X.shape[1] != p:
        raise DesignError(f"chunk {index}: the fixed effects have {X.shape[1]} columns, the spec {p}")
    r = y - X @ spec.centre
    uniq, cell = _cells(codes, [len(v) for v in levels])
    S_zz, S_zr, S_zX = cell_statistics(cell, uniq.shape[0], Zt, X, r)
    moments = DataMoments(ColumnMoments.of(X), ColumnMoments.of(Zt), ColumnMoments.of(y[:, None]))
    return SufficientStatistics(meta, levels, cats, spec.centre.copy(), len(df), X.T @ X, X.T @ r,
                                float(r @ r), sum_log_y, uniq, np.bincount(cell, minlength=uniq.shape[0]),
                                S_zz, S_zr, S_zX, moments, spec)


def statistics(spec: DesignSpec, chunks) -> "SufficientStatistics":
    """The merged statistics of an iterable of chunks (one pass; memory of one chunk plus the cells)."""
    out = None
    for index, chunk in enumerate(chunks):
        s = chunk_statistics(spec, chunk, index)
        out = s if out is None else out + s
    if out is None:
        raise DesignError("no chunks")
    return out


# --------------------------------------------------------------------------- merged statistics


@dataclass(frozen=True, eq=False)
class SufficientStatistics:
    """Sums over rows around ``centre`` β_c (p,), r = y − X β_c, with n_cells cells keyed by the grouping factors'
    level values.

    meta: the model signature (``DesignSpec.signature``); factor_levels: per grouping factor its levels;
    factor_categories: per factor the categorical categories ordering them, or None; n_obs; XtX (p, p),
    Xtr (p,), rr (): Xᵀr, rᵀr; sum_log_y: Σ log y (lognormal's Jacobian, else 0); cell_factors (n_cells,
    n_factors) codes into factor_levels; cell_n (n_cells,); S_zz (n_cells, D, D), S_zr (n_cells, D), S_zX
    (n_cells, D, p) with D the columns of every term in formula order; moments: the :class:`DataMoments` of X, Z
    and the working response, or None (a file saved before them); design_spec: the :class:`DesignSpec` the sums
    were computed with (its formulaic specs evaluate new data), or None (not saved: None after ``load``);
    source_summary: what ``lmmarg.sources.sufficient_statistics`` read, e.g. "read 2,000,000 rows from 8 files:
    3 terms, 10,050 groups, 412,300 cells" ("" otherwise; :meth:`describe` gives the part after the colon)."""
    meta: dict
    factor_levels: tuple
    factor_categories: tuple
    centre: np.ndarray
    n_obs: int
    XtX: np.ndarray
    Xtr: np.ndarray
    rr: float
    sum_log_y: float
    cell_factors: np.ndarray
    cell_n: np.ndarray
    S_zz: np.ndarray
    S_zr: np.ndarray
    S_zX: np.ndarray
    moments: DataMoments | None = None
    design_spec: DesignSpec | None = None
    source_summary: str = ""

    @property
    def n_cells(self) -> int:
        return int(self.cell_factors.shape[0])

    @property
    def formula(self) -> str | None:
        """The formula the statistics were computed for (None for files saved without it)."""
        return self.meta.get("formula")

    def describe(self) -> str:
        """"3 terms, 10,050 groups, 412,300 cells": the terms, the observed groups (over distinct grouping
        factors: terms on one group count its groups once) and the cells."""
        groups, seen = 0, set()
        for name, group, *_ in self.terms:
            if group not in seen:
                seen.add(group)
                groups += len(self.term_levels(name)[1])
        t = len(self.terms)
        return f"{t} term{'s' * (t != 1)}, {groups:,} groups, {self.n_cells:,} cells"

    @property
    def terms(self) -> tuple:
        """Per term (name, group, factors, columns, correlated), formula order."""
        return tuple((t[0], t[1], tuple(t[2]), tuple(t[3]), t[4]) for t in self.meta["terms"])

    @property
    def fixed_names(self) -> tuple:
        return tuple(self.meta["fixed_names"])

    def recentred(self, centre) -> "SufficientStatistics":
        """The same statistics around another centre (p,): exact algebra, see the module docstring."""
        centre = np.asarray(centre, dtype=float)
        d = centre - self.centre
        if not d.any():
            return self
        return dataclasses.replace(self, centre=centre, Xtr=self.Xtr - self.XtX @ d,
                                   rr=float(self.rr - 2 * d @ self.Xtr + d @ self.XtX @ d),
                                   S_zr=self.S_zr - self.S_zX @ d)

    def ols_beta(self) -> np.ndarray:
        """The OLS β (p,) of the whole data (``lmmarg.marginal.statistics.centre_beta``'s, from the sums)."""
        if not self.XtX.size:
            return np.zeros(0)
        delta = (np.linalg.solve(self.XtX, self.Xtr) if np.linalg.cond(self.XtX) < 1e8
                 else np.linalg.lstsq(self.XtX, self.Xtr, rcond=None)[0])
        return self.centre + delta

    def term_levels(self, name: str) -> tuple[np.ndarray, tuple]:
        """(codes (n_cells,) of each cell's group, labels of the groups) of one term: the observed combinations of
        its factors' levels, in lexicographic order of the factors' level order (``lmmarg.design.grouping_codes``)."""
        names = [t[0] for t in self.terms]
        if name not in names:
            raise KeyError(f"no term {name!r}; terms are {names}")
        fi = [self.meta["factors"].index(f) for f in self.terms[names.index(name)][2]]
        uniq, codes = _cells(self.cell_factors[:, fi], [len(self.factor_levels[j]) for j in fi])
        labels = tuple(level_label(tuple(self.factor_levels[j][k] for j, k in zip(fi, row))) for row in uniq)
        return codes, labels

    def engine_arrays(self, order=None, beta0=None) -> CellSums:
        """The statistics in the engine's layout (``lmmarg.marginal.CellSums``: cells in the lexicographic order of
        their codes, as ``lmmarg.codes.unique_rows`` orders them, with cell_n and each term's level labels) for the
        terms ``order`` (names or indices; default all, formula order; a subset sums the cells over the other
        terms), centred at ``beta0`` (default: the OLS β).

        The plan (``lmmarg.marginal.plan.build_plan``) stacks its units chain first, terms on one grouping factor
        merged into one unit: pass the terms in that order (``[i for src in plan.structure.unit_src for i in
        src]``) and the cells and columns come out as the plan's."""
        names = [t[0] for t in self.terms]
        order = list(range(len(names))) if order is None else [o if isinstance(o, int) else names.index(o)
                                                                for o in order]
        beta0 = self.ols_beta() if beta0 is None else np.asarray(beta0, dtype=float)
        s = self.recentred(beta0)
        dims = [len(t[3]) for t in self.terms]
        offs = np.concatenate([[0], np.cumsum(dims)]).astype(int)
        cols = np.concatenate([np.arange(offs[i], offs[i + 1]) for i in order] + [np.zeros(0, int)]).astype(int)
        per = [self.term_levels(names[i]) for i in order]
        tc = np.stack([c for c, _ in per], 1) if per else np.zeros((self.n_cells, 0), np.int64)
        uniq, inv = _cells(tc, [len(lab) for _, lab in per])
        n, D, p = uniq.shape[0], len(cols), self.XtX.shape[0]
        ix = np.ix_(np.arange(self.n_cells), cols, cols)
        return CellSums(
            names=tuple(names[i] for i in order), n_groups=tuple(len(lab) for _, lab in per),
            dims=tuple(dims[i] for i in order), codes=uniq,
            cell_n=np.bincount(inv, weights=self.cell_n, minlength=n).astype(np.int64),
            S_zz=aggregate(inv, n, s.S_zz[ix].reshape(self.n_cells, D * D)).reshape(n, D, D),
            S_zr=aggregate(inv, n, s.S_zr[:, cols]),
            S_zX=aggregate(inv, n, s.S_zX[:, cols, :].reshape(self.n_cells, D * p)).reshape(n, D, p),
            XtX=s.XtX, Xtr=s.Xtr, rr=float(s.rr), beta0=beta0, n_obs=int(self.n_obs),
            levels=tuple(lab for _, lab in per))

    def cell_sums(self) -> CellSums:
        """Every term's sums in formula order around this object's centre, as the engine's
        ``lmmarg.marginal.plan_from_statistics`` takes them (it re-centres at the OLS β itself)."""
        return self.engine_arrays(beta0=self.centre)

    def __add__(self, other) -> "SufficientStatistics":
        return merge(self, other)

    def __radd__(self, other):
        return self if isinstance(other, int) and other == 0 else merge(other, self)   # sum([...]) starts at 0

    def _write(self, f) -> None:
        """The .npz (meta as JSON text, arrays; no pickles) to the binary file object ``f``."""
        meta = dict(self.meta, format=FORMAT, n_obs=int(self.n_obs), rr=float(self.rr), sum_log_y=float(self.sum_log_y),
                    factor_levels=[list(v) for v in self.factor_levels],
                    factor_categories=[None if c is None else list(c) for c in self.factor_categories])
        try:
            text = json.dumps(meta, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"cannot save levels that are not str/int/float/bool ({exc}); convert the grouping "
                             "columns to str") from None
        np.savez(f, meta=np.array(text), centre=self.centre, XtX=self.XtX, Xtr=self.Xtr, cell_factors=self.cell_factors,
                 cell_n=self.cell_n, S_zz=self.S_zz, S_zr=self.S_zr, S_zX=self.S_zX,
                 **(self.moments.arrays() if self.moments is not None else {}))

    def save(self, path) -> None:
        """Write an .npz (no pickles), atomically: a temporary file in the same directory, then os.replace."""
        path = os.fspath(path)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                self._write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    def to_bytes(self) -> bytes:
        """The .npz that :meth:`save` writes, as bytes (``from_bytes`` reads them; saved fits embed them)."""
        buf = io.BytesIO()
        self._write(buf)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "SufficientStatistics":
        """Read what :meth:`to_bytes` returned."""
        return cls.load(io.BytesIO(bytes(data)))

    @classmethod
    def load(cls, path) -> "SufficientStatistics":
        """Read what :meth:`save` wrote."""
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.pop("format", None) != FORMAT:
                raise ValueError(f"{path} is not a file of lmmarg sufficient statistics ({FORMAT})")
            arrays = {k: z[k] for k in ("centre", "XtX", "Xtr", "cell_factors", "cell_n", "S_zz", "S_zr", "S_zX")}
            moments = DataMoments.from_arrays(z)
        levels = tuple(tuple(v) for v in meta.pop("factor_levels"))
        cats = tuple(None if c is None else tuple(c) for c in meta.pop("factor_categories"))
        n_obs, rr, sum_log_y = int(meta.pop("n_obs")), float(meta.pop("rr")), float(meta.pop("sum_log_y"))
        return cls(meta, levels, cats, arrays["centre"], n_obs, arrays["XtX"], arrays["Xtr"], rr, sum_log_y,
                   arrays["cell_factors"].astype(np.int64), arrays["cell_n"].astype(np.int64), arrays["S_zz"],
                   arrays["S_zr"], arrays["S_zX"], moments)


PartialStatistics = SufficientStatistics   # one chunk's statistics are merged statistics of one chunk

load_statistics = SufficientStatistics.load


def _union_levels(j: int, items) -> tuple:
    """(levels, categories, [remap of each item's codes into the levels]) of grouping factor j over ``items``."""
    levels, cats = items[0].factor_levels[j], items[0].factor_categories[j]
    for x in items[1:]:
        if x.factor_categories[j] != cats:
            raise ValueError(f"cannot add statistics whose grouping factor {items[0].meta['factors'][j]!r} is ordered "
                             f"by different categorical categories ({cats} vs {x.factor_categories[j]}); give the "
                             "column one dtype")
    if all(x.factor_levels[j] == levels for x in items[1:]):
        idx = np.arange(len(levels))
        return levels, cats, [idx] * len(items)
    levels = _ordered(set().union(*(x.factor_levels[j] for x in items)), cats)
    index = pd.Index(list(levels), dtype=object)
    return levels, cats, [index.get_indexer(pd.Index(list(x.factor_levels[j]), dtype=object)) for x in items]


def merge(a: SufficientStatistics, b: SufficientStatistics) -> SufficientStatistics:
    """a + b: the statistics of the union of their rows, around a's centre (b is re-centred if needed).
    Associative and commutative up to rounding; cells matched by level values; the moments are merged (None when
    either lacks them), the design_spec is a's (else b's), the source_summary is dropped. Raises ValueError naming
    what differs when a and b are statistics of different models."""
    return merge_many([a, b])


def merge_many(items) -> SufficientStatistics:
    """The merge of a list of statistics in one pass (``merge`` of two is the special case): one union of the
    level sets, one factorization of the concatenated cell keys and one weighted bincount per summed column, so
    that a stream of k batches merged in groups costs O(total cells), not O(k × cells) as pairwise merges into a
    growing total would."""
    items = list(items)
    if not items:
        raise ValueError("merge_many needs at least one SufficientStatistics")
    for x in items:
        if not isinstance(x, SufficientStatistics):
            raise TypeError(f"cannot add {type(items[0]).__name__} and {type(x).__name__}")
    a = items[0]
    for b in items[1:]:
        for key in ("family", "response", "fixed_names", "offsets", "factors", "terms"):
            if a.meta.get(key) != b.meta.get(key):
                raise ValueError(f"cannot add statistics of different models: their {key} differ: "
                                 f"{a.meta.get(key)!r} vs {b.meta.get(key)!r}")
    if len(items) == 1:
        return a
    items = [a] + [b.recentred(a.centre) for b in items[1:]]
    nf = len(a.factor_levels)
    union = [_union_levels(j, items) for j in range(nf)]
    keys = np.concatenate([np.stack([u[2][k][x.cell_factors[:, j]] for j, u in enumerate(union)], 1) if nf
                           else x.cell_factors for k, x in enumerate(items)])
    uniq, inv = _cells(keys, [len(u[0]) for u in union])
    n, D, p = uniq.shape[0], a.S_zz.shape[1], a.XtX.shape[0]

    def agg(name, shape):
        cat = np.concatenate([getattr(x, name) for x in items])
        return aggregate(inv, n, cat.reshape(len(inv), int(np.prod(shape)))).reshape((n,) + shape)

    moments = None
    if all(x.moments is not None for x in items):
        moments = items[0].moments
        for x in items[1:]:
            moments = moments + x.moments
    return SufficientStatistics(
        a.meta, tuple(u[0] for u in union), tuple(u[1] for u in union), a.centre, sum(x.n_obs for x in items),
        sum(x.XtX for x in items), sum(x.Xtr for x in items), float(sum(x.rr for x in items)),
        float(sum(x.sum_log_y for x in items)), uniq,
        np.bincount(inv, weights=np.concatenate([x.cell_n for x in items]), minlength=n).astype(np.int64),
        agg("S_zz", (D, D)), agg("S_zr", (D,)), agg("S_zX", (D, p)), moments,
        next((x.design_spec for x in items if x.design_spec is not None), None))
