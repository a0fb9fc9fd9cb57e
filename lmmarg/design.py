"""Build the model design from a parsed formula and a data frame (stage 2 of the pipeline).

The design holds X (N, p), y (N,), and for every random-effect term its per-observation columns Z (N, d),
integer group codes (N,), level labels, a sparse Z for users, the nesting/crossing structure between terms and
the per-group sufficient statistics. Everything is NumPy; the JAX kernels receive it through `lmmarg.marginal`.
"""
from __future__ import annotations

import difflib
import warnings
from dataclasses import dataclass, field
from functools import cached_property

import formulaic
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .formula import BarTerm, FormulaError, FormulaSpec, parse_formula

__all__ = ["DesignError", "RandomTerm", "Structure", "Design", "build_design"]


class DesignError(ValueError):
    """Bad data for the model; the message names the column, term or level at fault."""


@dataclass(eq=False)
class RandomTerm:
    """One random-effect class: u_g ~ N(0, Σ) i.i.d. over the groups g, Σ of size d × d.

    name: unique term name (grouping expression as written, ".1", ".2" appended to repeats).
    group: grouping expression, e.g. "batch:cask"; factors: its columns.
    columns: formulaic names of the term's d columns, e.g. ["Intercept", "Days"].
    levels: group labels, in the order of every per-group array; codes: (N,) int index into levels.
    Z: (N, d) per-observation columns.
    """

    name: str
    group: str
    factors: tuple[str, ...]
    expr: str
    columns: list[str]
    levels: list[str]
    codes: np.ndarray
    Z: np.ndarray
    correlated: bool = True
    model_spec: object = field(default=None, repr=False)
    level_keys: list[tuple] = field(default_factory=list, repr=False)

    @property
    def n_groups(self) -> int:
        return len(self.levels)

    @property
    def d(self) -> int:
        return self.Z.shape[1]

    @cached_property
    def Z_sparse(self) -> sp.csr_matrix:
        """(N, n_groups * d) sparse Z; column g * d + j is column j of group g (lme4's order)."""
        n, d = self.Z.shape
        rows = np.repeat(np.arange(n), d)
        cols = (self.codes[:, None] * d + np.arange(d)[None, :]).ravel()
        return sp.csr_matrix((self.Z.ravel(), (rows, cols)), shape=(n, self.n_groups * d))


@dataclass
class Structure:
    """Relations between random-effect terms.

    relations[(a, b)] for term names a != b is one of "nested" (every group of a lies in one group of b),
    "contains" (the reverse), "same" (same grouping factor) or "crossed".
    kind: "none", "single", "nested", "crossed" or "nested+crossed" (over distinct grouping factors).
    """

    relations: dict
    kind: str

    def relation(self, a: str, b: str) -> str:
        return self.relations[(a, b)]

    def __str__(self) -> str:
        lines = [f"structure: {self.kind}"]
        for (a, b), rel in self.relations.items():
            if rel in ("nested", "crossed") and (rel == "nested" or a < b):
                lines.append(f"  {a} {'nested in' if rel == 'nested' else 'crossed with'} {b}")
        return "\n".join(lines)


@dataclass(eq=False)
class Design:
    """All model matrices for one formula and data set. Shapes: X (N, p), y (N,), term.Z (N, d)."""

    spec: FormulaSpec
    data: pd.DataFrame
    y: np.ndarray
    X: np.ndarray
    fixed_names: list[str]
    terms: list[RandomTerm]
    structure: Structure
    fixed_spec: object = field(default=None, repr=False)

    @property
    def n_obs(self) -> int:
        return len(self.y)

    @property
    def response(self) -> str:
        return self.spec.response

    def term(self, name: str) -> RandomTerm:
        for t in self.terms:
            if t.name == name:
                return t
        raise KeyError(f"no random-effect term {name!r}; terms are {[t.name for t in self.terms]}")

    @cached_property
    def stats(self) -> dict:
        """Sufficient statistics, computed once: XtX (p,p), Xty (p,), yty, and per term name
        ZtZ (G,d,d), ZtX (G,d,p), Zty (G,d), n (G,) observations per group."""
        out = {"XtX": self.X.T @ self.X, "Xty": self.X.T @ self.y, "yty": float(self.y @ self.y)}
        for t in self.terms:
            G, d, p = t.n_groups, t.d, self.X.shape[1]
            seg = lambda w: np.bincount(t.codes, weights=w, minlength=G)  # noqa: E731
            out[t.name] = {
                "ZtZ": np.stack([[seg(t.Z[:, a] * t.Z[:, b]) for b in range(d)] for a in range(d)], -1).transpose(1, 0, 2)
                if d else np.zeros((G, 0, 0)),
                "ZtX": np.stack([[seg(t.Z[:, a] * self.X[:, j]) for j in range(p)] for a in range(d)], 0).transpose(2, 0, 1),
                "Zty": np.stack([seg(t.Z[:, a] * self.y) for a in range(d)], -1),
                "n": np.bincount(t.codes, minlength=G),
            }
        return out

    def summary(self) -> str:
        """Compact lme4-like description: N, fixed columns, each term with d and groups, structure."""
        lines = [
            f"Linear mixed model: {self.spec.formula}",
            f"  observations: {self.n_obs}",
            f"  fixed effects ({len(self.fixed_names)}): {', '.join(self.fixed_names)}",
            "  random effects:",
        ]
        width = max([len(t.name) for t in self.terms] + [4])
        for t in self.terms:
            corr = "" if t.d == 1 else (" correlated" if t.correlated else "")
            lines.append(f"    {t.name:<{width}}  groups {t.n_groups:>6}  d={t.d}  [{', '.join(t.columns)}]{corr}")
        if not self.terms:
            lines.append("    (none)")
        lines.extend("  " + s for s in str(self.structure).splitlines())
        return "\n".join(lines)

    __str__ = summary


# ---------------------------------------------------------------------------------------------------------------
# building


def _unknown_column(name: str, data: pd.DataFrame, where: str) -> DesignError:
    close = difflib.get_close_matches(name, [str(c) for c in data.columns], n=3)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else f"; columns are {list(data.columns)}"
    return DesignError(f"unknown column {name!r} in {where}{hint}")


def _variables(expr: str, where: str) -> set[str]:
    try:
        return set(formulaic.Formula(expr).required_variables)
    except Exception as exc:  # formulaic's own parser errors
        raise FormulaError(f"cannot parse {where} {expr!r}: {exc}") from None


def _check_columns(spec: FormulaSpec, data: pd.DataFrame) -> list[str]:
    """Return every data column the formula uses; raise naming the first unknown one."""
    used: dict[str, str] = {}
    for v in _variables(f"{spec.response} ~ 1", "response"):
        used.setdefault(v, f"the response {spec.response!r}")
    for v in _variables(spec.fixed, "fixed effects"):
        used.setdefault(v, "the fixed effects")
    for bar in spec.bars:
        for v in _variables(bar.expr, f"random-effect term ({bar.expr} | {bar.group})"):
            used.setdefault(v, f"random-effect term ({bar.expr} | {bar.group})")
        for f in bar.factors:
            used.setdefault(f, f"grouping factor of ({bar.expr} | {bar.group})")
    columns = set(map(str, data.columns))
    for name, where in used.items():
        if name not in columns:
            # formulaic also reports names of functions it could not resolve; only flag plain names
            raise _unknown_column(name, data, where)
    return list(used)


def _handle_missing(data: pd.DataFrame, used: list[str], na_action: str) -> pd.DataFrame:
    bad_rows = np.zeros(len(data), bool)
    culprits = []
    for col in used:
        s = data[col]
        missing = s.isna().to_numpy().copy()
        if pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
            missing |= ~np.isfinite(s.to_numpy(dtype=float, na_value=np.nan))
        if missing.any():
            culprits.append(f"{col!r} ({missing.sum()} rows, first at row {np.flatnonzero(missing)[0]})")
            bad_rows |= missing
    if not bad_rows.any():
        return data
    if na_action == "raise":
        raise DesignError(
            "missing or non-finite values in column " + ", ".join(culprits)
            + "; clean the data or pass na_action='drop' to drop those rows with a warning"
        )
    warnings.warn(f"dropped {bad_rows.sum()} of {len(data)} rows with missing/non-finite values in "
                  + ", ".join(culprits), stacklevel=4)
    return data.loc[~bad_rows]


def _model_matrix(expr: str, data: pd.DataFrame, where: str):
    try:
        with np.errstate(all="ignore"):
            mm = formulaic.model_matrix(expr, data, na_action="ignore")
    except Exception as exc:
        raise DesignError(f"cannot build the model matrix of {where} {expr!r}: {exc}") from None
    values = np.asarray(mm, dtype=float)
    bad = ~np.isfinite(values)
    if bad.any():
        col = list(mm.columns)[np.flatnonzero(bad.any(0))[0]]
        row = int(np.flatnonzero(bad.any(1))[0])
        raise DesignError(f"column {col!r} of {where} is not finite (first at row {row}, e.g. log of 0)")
    return values, list(mm.columns), mm.model_spec


def _response(expr: str, data: pd.DataFrame) -> np.ndarray:
    raw = data[expr] if expr in data.columns else None
    if raw is not None and not (pd.api.types.is_numeric_dtype(raw) and not pd.api.types.is_bool_dtype(raw)):
        raise DesignError(f"response {expr!r} must be numeric, got dtype {raw.dtype}")
    try:
        with np.errstate(all="ignore"):
            mm = formulaic.model_matrix(f"{expr} ~ 1", data, na_action="ignore")
    except Exception as exc:
        raise DesignError(f"cannot evaluate the response {expr!r}: {exc}") from None
    lhs = mm.lhs
    if lhs.shape[1] != 1:
        raise DesignError(f"response {expr!r} must be a single numeric column, got {list(lhs.columns)}")
    y = np.asarray(lhs, dtype=float)[:, 0]
    if not np.isfinite(y).all():
        row = int(np.flatnonzero(~np.isfinite(y))[0])
        raise DesignError(f"response {expr!r} is not finite at row {row} (value {y[row]})")
    return y


def _aliased_columns(X: np.ndarray, names: list[str]) -> list[str]:
    """Columns of X that are linear combinations of earlier columns (lme4 drops these)."""
    scale = np.sqrt((X**2).sum(0))
    scale[scale == 0] = 1.0
    Xs = X / scale
    kept, aliased = [], []
    for j in range(X.shape[1]):
        cand = Xs[:, kept + [j]]
        s = np.linalg.svd(cand, compute_uv=False)
        if s.size and s[-1] <= 1e-9 * max(s[0], 1.0):
            aliased.append(names[j])
        else:
            kept.append(j)
    return aliased


def _level_key(values: pd.Series) -> tuple[np.ndarray, list]:
    """Sorted distinct values of one grouping factor (natural order: numeric or categorical order, else text)."""
    if isinstance(values.dtype, pd.CategoricalDtype):
        cats = [c for c in values.cat.categories if (values == c).any()]
        return values.astype(object).to_numpy(), cats
    uniq = pd.unique(values)
    try:
        order = sorted(uniq)
    except TypeError:
        order = sorted(uniq, key=str)
    return values.to_numpy(dtype=object), order


def _grouping(data: pd.DataFrame, factors: tuple[str, ...]) -> tuple[np.ndarray, list[str], list[tuple]]:
    """Integer codes (N,) and labels of the interaction of `factors`, levels in lexicographic factor order."""
    per_factor = []
    for f in factors:
        vals, order = _level_key(data[f])
        rank = {v: i for i, v in enumerate(order)}
        per_factor.append((np.fromiter((rank[v] for v in vals), dtype=np.int64, count=len(vals)), order))
    # one int64 key per row (mixed radix over the factors' level counts) keeps the lexicographic order
    radix = [max(len(order), 1) for _, order in per_factor]
    if float(np.prod(np.asarray(radix, dtype=float))) < 2.0**62:
        key = np.zeros(len(data), np.int64)
        for (c, _), r in zip(per_factor, radix):
            key = key * r + c
        ukey, codes = np.unique(key, return_inverse=True)
        uniq = np.empty((ukey.size, len(per_factor)), np.int64)
        for j in reversed(range(len(per_factor))):
            uniq[:, j] = ukey % radix[j]
            ukey = ukey // radix[j]
    else:
        uniq, codes = np.unique(np.stack([c for c, _ in per_factor], 1), axis=0, return_inverse=True)
    keys = [tuple(per_factor[j][1][k] for j, k in enumerate(row)) for row in uniq]
    labels = [":".join(str(v) for v in key) for key in keys]
    return codes.reshape(-1).astype(np.int64), labels, keys


def _structure(terms: list[RandomTerm]) -> Structure:
    relations = {}

    def nested(a: RandomTerm, b: RandomTerm) -> bool:
        """Every level of a lies in one level of b (distinct (a, b) code pairs = levels of a)."""
        key = a.codes.astype(np.int64) * max(b.n_groups, 1) + b.codes
        return len(np.unique(key)) == a.n_groups

    kinds = set()
    for a in terms:
        for b in terms:
            if a is b:
                continue
            if a.group == b.group:
                relations[(a.name, b.name)] = "same"
            elif nested(a, b):
                relations[(a.name, b.name)] = "nested"
                kinds.add("nested")
            elif nested(b, a):
                relations[(a.name, b.name)] = "contains"
            else:
                relations[(a.name, b.name)] = "crossed"
                kinds.add("crossed")
    groups = {t.group for t in terms}
    kind = ("none" if not terms else "single" if len(groups) == 1 else
            "+".join(k for k in ("nested", "crossed") if k in kinds))
    return Structure(relations=relations, kind=kind)


def _unique_names(terms: list[RandomTerm]) -> None:
    seen: dict[str, int] = {}
    for t in terms:
        k = seen.get(t.group, 0)
        t.name = t.group if k == 0 else f"{t.group}.{k}"
        seen[t.group] = k + 1


def _random_terms(spec: FormulaSpec, data: pd.DataFrame) -> list[RandomTerm]:
    terms = []
    for bar in spec.bars:
        where = f"random-effect term ({bar.expr} | {bar.group})"
        Z, cols, mspec = _model_matrix(bar.expr, data, where)
        if Z.shape[1] == 0:
            raise DesignError(f"{where} has no columns")
        codes, levels, keys = _grouping(data, bar.factors)
        pieces = [list(range(len(cols)))] if bar.correlated else [[j] for j in range(len(cols))]
        for idx in pieces:
            terms.append(RandomTerm(name=bar.group, group=bar.group, factors=bar.factors, expr=bar.expr,
                                    columns=[cols[j] for j in idx], levels=levels, codes=codes,
                                    Z=np.ascontiguousarray(Z[:, idx]), correlated=bar.correlated,
                                    model_spec=mspec, level_keys=keys))
    _unique_names(terms)
    return terms


def _warn_identifiability(terms: list[RandomTerm], n_obs: int) -> None:
    for t in terms:
        if t.n_groups < 2:
            warnings.warn(f"grouping factor {t.group!r} of term {t.name!r} has a single level "
                          f"({t.levels[0]!r}): its variance is not identified", stacklevel=4)
        elif t.n_groups * t.d >= n_obs:
            warnings.warn(f"term {t.name!r}: number of observations (={n_obs}) <= number of random effects "
                          f"(={t.n_groups * t.d}); its variance and the residual variance are probably "
                          "unidentifiable", stacklevel=4)


def build_design(formula: str | FormulaSpec, data, na_action: str = "raise") -> Design:
    """Parse `formula` and build every model matrix from `data` (a pandas DataFrame or dict of columns).

    na_action: "raise" (default: rows with NaN/inf in used columns are an error naming the column) or "drop"
    (drop them with a warning giving the count).
    """
    spec = formula if isinstance(formula, FormulaSpec) else parse_formula(formula)
    if na_action not in ("raise", "drop"):
        raise ValueError(f"na_action must be 'raise' or 'drop', got {na_action!r}")
    if isinstance(data, dict):
        data = pd.DataFrame(data)
    if not isinstance(data, pd.DataFrame):
        raise TypeError(f"data must be a pandas DataFrame or a dict of columns, got {type(data).__name__}")
    if len(data) == 0:
        raise DesignError("data has no rows")
    data = data.rename(columns=str)
    used = _check_columns(spec, data)
    data = _handle_missing(data, used, na_action).reset_index(drop=True)
    if len(data) == 0:
        raise DesignError("no rows left after dropping missing values")
    y = _response(spec.response, data)
    X, fixed_names, fixed_spec = _model_matrix(spec.fixed, data, "the fixed effects")
    aliased = _aliased_columns(X, fixed_names)
    if aliased:
        raise DesignError(f"fixed-effects model matrix is rank deficient: column(s) {aliased} are linear "
                          "combinations of earlier columns; remove them from the formula")
    terms = _random_terms(spec, data)
    _warn_identifiability(terms, len(y))
    return Design(spec=spec, data=data, y=y, X=X, fixed_names=fixed_names, terms=terms,
                  structure=_structure(terms), fixed_spec=fixed_spec)
